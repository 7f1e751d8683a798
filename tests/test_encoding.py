"""Tests of the lossless JSON encoding of payloads and results. No database is needed."""

from __future__ import annotations

import collections
import dataclasses
import decimal
import enum
import json
import math
import subprocess
import sys
import uuid
import zoneinfo
from datetime import UTC, date, datetime, time, timedelta, timezone
from typing import Any, NamedTuple

import pytest

from pgskewer.encoding import (
    TAG_KEY,
    VALUE_KEY,
    EncodingError,
    decode,
    encode,
    encode_text,
    parse_payload,
)

PLUS_ONE = timezone(timedelta(hours=1))
ODD_OFFSET = timezone(-timedelta(hours=3, minutes=30, seconds=15, microseconds=7))


def round_trip(value: Any) -> Any:
    return decode(encode(value))


def reject_constant(token: str) -> Any:
    raise AssertionError(f"non-standard JSON token {token!r} in output")


def strict_loads(data: bytes) -> Any:
    """Parse ``data`` as strict JSON: UTF-8 only, no NaN or Infinity tokens."""
    return json.loads(data.decode("utf-8"), parse_constant=reject_constant)


class Color(enum.Enum):
    RED = "red"
    PAIR = (1, 2)


class Level(enum.IntEnum):
    HIGH = 3


class Mood(enum.StrEnum):
    GOOD = "good"


@dataclasses.dataclass
class Point:
    x: int
    y: float
    label: str = "p"


@dataclasses.dataclass(frozen=True)
class FrozenPoint:
    x: int
    y: int


class Pair(NamedTuple):
    left: int
    right: str


class LoudStr(str):
    def __str__(self) -> str:
        return self.upper()


class Unencodable:
    pass


# --- round trips of every supported type ---------------------------------------------

ROUND_TRIP_CASES: list[tuple[str, Any]] = [
    ("none", None),
    ("true", True),
    ("false", False),
    ("int", 42),
    ("negative int", -7),
    ("big int", 2**200),
    ("float", 1.25),
    ("float max precision", 0.1 + 0.2),
    ("negative zero", -0.0),
    ("str", "plain"),
    ("unicode str", "grüße, 東京 🎉"),
    ("str with NUL and controls", "a\x00b\x1bc\n\t"),
    ("str with line separator", "a\u2028b"),
    ("str with lone surrogate", "x\ud800y"),
    ("empty list", []),
    ("empty dict", {}),
    ("list", [1, "a", None, True]),
    ("dict", {"a": 1, "b": [2, 3]}),
    ("naive datetime", datetime(2026, 12, 4, 10, 0, 0)),
    ("datetime microseconds", datetime(2026, 12, 4, 10, 0, 0, 123456)),
    ("aware datetime", datetime(2026, 12, 4, 10, 0, tzinfo=PLUS_ONE)),
    ("utc datetime", datetime(2026, 12, 4, 10, 0, 0, 1, tzinfo=UTC)),
    ("datetime odd offset", datetime(2026, 12, 4, 10, 0, 0, 5, tzinfo=ODD_OFFSET)),
    ("datetime min", datetime.min),
    ("datetime max", datetime.max),
    ("date", date(2026, 12, 4)),
    ("naive time", time(10, 11, 12, 131415)),
    ("aware time", time(10, 11, tzinfo=PLUS_ONE)),
    ("time odd offset", time(23, 59, 59, 999999, tzinfo=ODD_OFFSET)),
    ("timedelta", timedelta(days=3, seconds=4, microseconds=5)),
    ("negative timedelta", timedelta(microseconds=-1)),
    ("timedelta max", timedelta.max),
    ("decimal", decimal.Decimal("3.14159265358979323846264338327950288")),
    ("decimal exponent", decimal.Decimal("-1.20E+5")),
    ("decimal trailing zeros", decimal.Decimal("1.000")),
    ("decimal negative zero", decimal.Decimal("-0")),
    ("decimal infinity", decimal.Decimal("Infinity")),
    ("decimal negative infinity", decimal.Decimal("-Infinity")),
    ("uuid", uuid.UUID("12345678-1234-5678-1234-567812345678")),
    ("bytes", b"\x00\x01\xfe\xff binary"),
    ("empty bytes", b""),
    ("bytearray", bytearray(b"\x00mutable\xff")),
    ("set", {1, 2, 3}),
    ("empty set", set()),
    ("set of mixed types", {1, "a", (2, 3), None}),
    ("frozenset", frozenset({"x", "y"})),
    ("tuple", (1, "a", None)),
    ("empty tuple", ()),
    ("nested tuple", ((1, (2, (3,))), [4, (5,)])),
    ("int keys", {1: "one", 2: "two"}),
    ("mixed keys", {"a": 1, 2: "b", None: 3, True: 4, 1.5: 5}),
    ("tuple keys", {(1, 2): "a", (3, (4, 5)): "b"}),
    ("bytes and date keys", {b"k": 1, date(2026, 1, 1): 2}),
    ("nan and decimal keys", {decimal.Decimal("1.10"): 1, uuid.UUID(int=1): 2}),
    ("tag key escaped", {TAG_KEY: "datetime", VALUE_KEY: "2026-12-04T10:00:00"}),
    ("tag key only", {TAG_KEY: 1}),
    ("frozenset of frozensets", frozenset({frozenset({1}), frozenset({2, 3})})),
    ("set of datetimes", {datetime(2026, 1, 1), datetime(2026, 1, 2)}),
]


@pytest.mark.parametrize(
    "value", [case[1] for case in ROUND_TRIP_CASES], ids=[case[0] for case in ROUND_TRIP_CASES]
)
def test_round_trip_keeps_value_and_type(value: Any) -> None:
    decoded = round_trip(value)

    assert decoded == value
    assert type(decoded) is type(value)


@pytest.mark.parametrize(
    "value", [case[1] for case in ROUND_TRIP_CASES], ids=[case[0] for case in ROUND_TRIP_CASES]
)
def test_round_trip_nested_in_containers(value: Any) -> None:
    wrapped = {"outer": [{"inner": (value,)}, value], "after": value}

    decoded = round_trip(wrapped)

    assert decoded == wrapped
    assert type(decoded["outer"][0]["inner"]) is tuple
    assert type(decoded["outer"][0]["inner"][0]) is type(value)
    assert type(decoded["outer"][1]) is type(value)
    assert type(decoded["after"]) is type(value)


@pytest.mark.parametrize(
    "value", [case[1] for case in ROUND_TRIP_CASES], ids=[case[0] for case in ROUND_TRIP_CASES]
)
def test_output_is_strict_utf8_json(value: Any) -> None:
    data = encode(value)

    strict_loads(data)
    assert all(byte >= 0x20 for byte in data), "raw control character in output"


@pytest.mark.parametrize("special", [math.nan, math.inf, -math.inf])
def test_float_special_values_round_trip(special: float) -> None:
    data = encode([special, {"x": special}])
    decoded = decode(data)

    strict_loads(data)
    for item in (decoded[0], decoded[1]["x"]):
        assert type(item) is float
        if math.isnan(special):
            assert math.isnan(item)
        else:
            assert item == special


def test_negative_zero_keeps_sign() -> None:
    decoded = round_trip(-0.0)

    assert math.copysign(1.0, decoded) == -1.0


@pytest.mark.parametrize("text", ["NaN", "-NaN", "sNaN", "NaN123", "-sNaN7"])
def test_decimal_nan_round_trips_exactly(text: str) -> None:
    decoded = round_trip(decimal.Decimal(text))

    assert type(decoded) is decimal.Decimal
    assert str(decoded) == text


def test_decimal_keeps_exponent_and_digits() -> None:
    value = decimal.Decimal("1.2300E-30")

    decoded = round_trip(value)

    assert decoded.as_tuple() == value.as_tuple()


def test_datetime_keeps_offset_and_microseconds() -> None:
    value = datetime(2026, 12, 4, 10, 0, 0, 42, tzinfo=ODD_OFFSET)

    decoded = round_trip(value)

    assert decoded.utcoffset() == value.utcoffset()
    assert decoded.microsecond == 42
    assert decoded.replace(tzinfo=None) == value.replace(tzinfo=None)


def test_naive_datetime_stays_naive() -> None:
    decoded = round_trip(datetime(2026, 12, 4, 10, 0))

    assert decoded.tzinfo is None


def test_zoneinfo_datetime_decodes_fixed_offset() -> None:
    berlin = zoneinfo.ZoneInfo("Europe/Berlin")
    winter = datetime(2026, 12, 4, 10, 0, 0, 7, tzinfo=berlin)
    summer = datetime(2026, 7, 4, 10, 0, tzinfo=berlin)

    decoded_winter = round_trip(winter)
    decoded_summer = round_trip(summer)

    assert decoded_winter == winter
    assert decoded_winter.utcoffset() == timedelta(hours=1)
    assert isinstance(decoded_winter.tzinfo, timezone)
    assert decoded_summer.utcoffset() == timedelta(hours=2)
    assert decoded_summer.replace(tzinfo=None) == summer.replace(tzinfo=None)


def test_time_with_dateless_zone_decodes_naive() -> None:
    berlin_time = time(10, 0, tzinfo=zoneinfo.ZoneInfo("Europe/Berlin"))
    utc_time = time(10, 0, tzinfo=zoneinfo.ZoneInfo("UTC"))

    assert round_trip(berlin_time).tzinfo is None
    assert round_trip(utc_time).utcoffset() == timedelta(0)


def test_int_beyond_str_digit_limit_raises() -> None:
    with pytest.raises(ValueError, match="integer string conversion"):
        encode(10 ** (sys.get_int_max_str_digits() + 1))


def test_aware_time_keeps_tzinfo() -> None:
    decoded = round_trip(time(8, 30, 0, 1, tzinfo=PLUS_ONE))

    assert decoded.tzinfo is not None
    assert decoded.utcoffset() == timedelta(hours=1)


def test_memoryview_decodes_as_bytes() -> None:
    view = memoryview(b"abcdef")[1:4]

    decoded = round_trip(view)

    assert decoded == b"bcd"
    assert type(decoded) is bytes


def test_bool_stays_bool_next_to_ints() -> None:
    decoded = round_trip([True, 1, False, 0, {True: "t", 2: "two"}])

    assert [type(item) for item in decoded[:4]] == [bool, int, bool, int]
    assert [type(key) for key in decoded[4]] == [bool, int]


def test_int_keys_stay_int() -> None:
    decoded = round_trip({1: "a", "1": "b"})

    assert decoded == {1: "a", "1": "b"}
    assert list(decoded) == [1, "1"]


# --- key order, tag form and escaping ---------------------------------------------------


def test_key_order_preserved() -> None:
    value = {"zebra": 1, "apple": 2, "mango": {"z": 1, "a": 2}}

    data = encode(value)
    decoded = decode(data)

    assert data == b'{"zebra":1,"apple":2,"mango":{"z":1,"a":2}}'
    assert list(decoded) == ["zebra", "apple", "mango"]
    assert list(decoded["mango"]) == ["z", "a"]


def test_key_order_preserved_with_int_keys() -> None:
    value = {3: "c", "b": 2, 1: "a"}

    decoded = round_trip(value)

    assert list(decoded) == [3, "b", 1]


def test_plain_json_is_compact_and_not_ascii_escaped() -> None:
    data = encode({"name": "grüße", "items": [1, 2.5, None, True]})

    assert data == '{"name":"grüße","items":[1,2.5,null,true]}'.encode()


def test_encode_text_matches_encode() -> None:
    value = {"when": datetime(2026, 12, 4, 10, 0, tzinfo=PLUS_ONE), "name": "é"}

    assert encode_text(value) == encode(value).decode("utf-8")


def test_tagged_datetime_form() -> None:
    data = encode(datetime(2026, 12, 4, 10, 0, tzinfo=PLUS_ONE))

    assert data == b'{"$pgskewer":"datetime","value":"2026-12-04T10:00:00+01:00"}'


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (math.nan, {TAG_KEY: "float", VALUE_KEY: "nan"}),
        (-math.inf, {TAG_KEY: "float", VALUE_KEY: "-inf"}),
        (date(2026, 1, 2), {TAG_KEY: "date", VALUE_KEY: "2026-01-02"}),
        (time(1, 2, 3, 4), {TAG_KEY: "time", VALUE_KEY: "01:02:03.000004"}),
        (
            timedelta(days=-1, seconds=5),
            {TAG_KEY: "timedelta", VALUE_KEY: {"days": -1, "seconds": 5, "microseconds": 0}},
        ),
        (decimal.Decimal("1.50"), {TAG_KEY: "decimal", VALUE_KEY: "1.50"}),
        (uuid.UUID(int=255), {TAG_KEY: "uuid", VALUE_KEY: "00000000-0000-0000-0000-0000000000ff"}),
        (b"hi", {TAG_KEY: "bytes", VALUE_KEY: "aGk="}),
        (bytearray(b"hi"), {TAG_KEY: "bytearray", VALUE_KEY: "aGk="}),
        ((1, 2), {TAG_KEY: "tuple", VALUE_KEY: [1, 2]}),
        ({3, 1, 2}, {TAG_KEY: "set", VALUE_KEY: [1, 2, 3]}),
        (frozenset({"b", "a"}), {TAG_KEY: "frozenset", VALUE_KEY: ["a", "b"]}),
        ({1: "a"}, {TAG_KEY: "dict", VALUE_KEY: [[1, "a"]]}),
        ({TAG_KEY: "x"}, {TAG_KEY: "dict", VALUE_KEY: [[TAG_KEY, "x"]]}),
    ],
)
def test_tagged_forms(value: Any, expected: dict[str, Any]) -> None:
    assert strict_loads(encode(value)) == expected


def test_set_output_is_sorted() -> None:
    words = {f"word{index}" for index in range(50)}

    encoded = strict_loads(encode(words))

    assert encoded[VALUE_KEY] == sorted(words)


def test_tag_key_dict_round_trips() -> None:
    lookalike = {TAG_KEY: "tuple", VALUE_KEY: [1, 2]}
    value = {"data": lookalike, "list": [lookalike]}

    decoded = round_trip(value)

    assert decoded == value
    assert type(decoded["data"]) is dict
    assert type(decoded["data"][VALUE_KEY]) is list


def test_value_key_alone_is_plain() -> None:
    assert encode({VALUE_KEY: 1}) == b'{"value":1}'


# --- one-way types: enums, dataclasses, subclasses ---------------------------------------


def test_enum_encodes_as_value() -> None:
    decoded = round_trip([Color.RED, Color.PAIR, Level.HIGH, Mood.GOOD])

    assert decoded == ["red", (1, 2), 3, "good"]
    assert type(decoded[2]) is int
    assert type(decoded[3]) is str


def test_enum_dict_key_encodes_as_value() -> None:
    decoded = round_trip({Mood.GOOD: 1, Level.HIGH: 2})

    assert decoded == {"good": 1, 3: 2}


def test_dataclass_decodes_as_field_dict() -> None:
    value = Point(1, 2.5)

    data = encode(value)
    decoded = decode(data)

    assert data == b'{"x":1,"y":2.5,"label":"p"}'
    assert decoded == {"x": 1, "y": 2.5, "label": "p"}


def test_nested_dataclass_fields_encoded() -> None:
    value = {"points": [FrozenPoint(1, 2)], "p": Point(3, math.inf, label="far")}

    decoded = round_trip(value)

    assert decoded["points"] == [{"x": 1, "y": 2}]
    assert decoded["p"]["y"] == math.inf


def test_namedtuple_decodes_as_tuple() -> None:
    decoded = round_trip(Pair(1, "a"))

    assert decoded == (1, "a")
    assert type(decoded) is tuple


def test_dict_subclasses_decode_as_dict() -> None:
    ordered = collections.OrderedDict([("b", 1), ("a", 2)])
    default = collections.defaultdict(list, {"x": [1]})
    counter = collections.Counter({"k": 3})

    decoded = round_trip([ordered, default, counter])

    assert decoded == [{"b": 1, "a": 2}, {"x": [1]}, {"k": 3}]
    assert [type(item) for item in decoded] == [dict, dict, dict]
    assert list(decoded[0]) == ["b", "a"]


def test_str_subclass_keeps_text() -> None:
    decoded = round_trip(LoudStr("quiet"))

    assert decoded == "quiet"
    assert type(decoded) is str


def test_datetime_subclass_decodes_as_datetime() -> None:
    class StampedDatetime(datetime):
        pass

    value = StampedDatetime(2026, 12, 4, 10, 0, tzinfo=PLUS_ONE)

    decoded = round_trip(value)

    assert decoded == value
    assert type(decoded) is datetime


def test_uuid_subclass_decodes_as_uuid() -> None:
    class TaggedUUID(uuid.UUID):
        pass

    value = TaggedUUID(int=7)

    decoded = round_trip(value)

    assert decoded == uuid.UUID(int=7)
    assert type(decoded) is uuid.UUID


# --- encoding errors ----------------------------------------------------------------------


def test_unencodable_value_names_type_and_path() -> None:
    value = {"tasks": {"a": {"result": [1, 2, Unencodable()]}}}

    with pytest.raises(EncodingError) as caught:
        encode(value)

    message = str(caught.value)
    assert "'Unencodable'" in message
    assert "$.tasks.a.result[2]" in message
    assert "convert it to JSON-able data" in message
    assert caught.value.path == "$.tasks.a.result[2]"
    assert caught.value.value_type is Unencodable


def test_encoding_error_is_type_error() -> None:
    with pytest.raises(TypeError):
        encode(object())


def test_unencodable_at_root_path() -> None:
    with pytest.raises(EncodingError) as caught:
        encode(object())

    assert caught.value.path == "$"


@pytest.mark.parametrize(
    ("value", "path"),
    [
        ({"a b": [object()]}, '$["a b"][0]'),
        ({"ok": (1, (2, object()))}, "$.ok[1][1]"),
        ({5: {"x": object()}}, "$[5].x"),
        ({"s": {object()}}, "$.s[0]"),
        ({"p": Point(1, 2.0, label=object())}, "$.p.label"),  # type: ignore[arg-type]
        ({"e": Color.RED, "f": [Unencodable]}, "$.f[0]"),
    ],
)
def test_unencodable_path_forms(value: Any, path: str) -> None:
    with pytest.raises(EncodingError) as caught:
        encode(value)

    assert caught.value.path == path
    assert path in str(caught.value)


def test_unencodable_dict_key_named() -> None:
    with pytest.raises(EncodingError) as caught:
        encode({"outer": {object(): 1}})

    assert "cannot encode dict key of type 'object' at $.outer;" in str(caught.value)
    assert caught.value.path == "$.outer"


def test_unencodable_inside_tuple_key_named() -> None:
    with pytest.raises(EncodingError) as caught:
        encode({"outer": {(1, object()): 1}})

    assert "item inside a dict key of type 'object'" in str(caught.value)
    assert caught.value.path == "$.outer"


def test_unencodable_set_item_named() -> None:
    with pytest.raises(EncodingError) as caught:
        encode({"s": frozenset({Unencodable()})})

    assert "cannot encode set item of type 'Unencodable' at $.s[0]" in str(caught.value)


def test_dataclass_as_key_rejected() -> None:
    with pytest.raises(EncodingError) as caught:
        encode({FrozenPoint(1, 2): "a"})

    assert "dict key of type 'FrozenPoint' at $: it would decode as an unhashable" in str(
        caught.value
    )
    assert caught.value.value_type is FrozenPoint


def test_dataclass_in_tuple_set_item_rejected() -> None:
    with pytest.raises(EncodingError) as caught:
        encode({"s": {(1, FrozenPoint(1, 2))}})

    assert "set item of type 'tuple'" in str(caught.value)
    assert caught.value.path == "$.s[0]"


def test_circular_list_rejected() -> None:
    loop: list[Any] = [1]
    loop.append({"back": loop})

    with pytest.raises(EncodingError) as caught:
        encode(loop)

    assert "circular reference" in str(caught.value)
    assert caught.value.path == "$[1].back"


def test_circular_dict_rejected() -> None:
    loop: dict[str, Any] = {}
    loop["self"] = loop

    with pytest.raises(EncodingError) as caught:
        encode(loop)

    assert caught.value.path == "$.self"


def test_shared_object_is_not_circular() -> None:
    shared = [1, 2]

    decoded = round_trip({"a": shared, "b": shared, "c": (shared, shared)})

    assert decoded == {"a": [1, 2], "b": [1, 2], "c": ([1, 2], [1, 2])}


@pytest.mark.parametrize("value", [object(), Unencodable, print, iter([]), 1j, range(3)])
def test_unsupported_builtin_types_rejected(value: Any) -> None:
    with pytest.raises(EncodingError) as caught:
        encode({"v": value})

    assert repr(type(value).__qualname__) in str(caught.value)


# --- decoding -------------------------------------------------------------------------------


@pytest.mark.parametrize("empty", [None, b"", ""])
def test_decode_empty_is_none(empty: bytes | str | None) -> None:
    assert decode(empty) is None


def test_decode_str_and_bytes() -> None:
    assert decode('{"a":[1,2]}') == {"a": [1, 2]}
    assert decode(b'{"a":[1,2]}') == {"a": [1, 2]}
    assert decode('{"t":{"$pgskewer":"tuple","value":[1]}}') == {"t": (1,)}


def test_decode_null_is_none() -> None:
    assert decode(encode(None)) is None


def test_decode_accepts_python_nan_tokens() -> None:
    decoded = decode(b"[NaN, Infinity, -Infinity]")

    assert math.isnan(decoded[0])
    assert decoded[1:] == [math.inf, -math.inf]


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b'{"$pgskewer":"no-such-tag","value":1}', "unknown '$pgskewer' tag 'no-such-tag'"),
        (b'{"$pgskewer":7,"value":1}', "unknown '$pgskewer' tag 7"),
        (b'{"$pgskewer":"tuple"}', "expected exactly the keys"),
        (b'{"$pgskewer":"tuple","value":[],"extra":1}', "expected exactly the keys"),
        (b'{"$pgskewer":"datetime","value":5}', "invalid 'datetime' value 5"),
        (b'{"$pgskewer":"datetime","value":"yesterday"}', "invalid 'datetime' value"),
        (b'{"$pgskewer":"decimal","value":"abc"}', "not a decimal number"),
        (b'{"$pgskewer":"decimal","value":1.5}', "expected str, got float"),
        (b'{"$pgskewer":"bytes","value":"not base64!"}', "invalid base64"),
        (b'{"$pgskewer":"float","value":"1.5"}', "expected 'nan', 'inf' or '-inf'"),
        (b'{"$pgskewer":"dict","value":[[1]]}', "[key, value] pairs"),
        (b'{"$pgskewer":"dict","value":[[[1],2]]}', "invalid 'dict' value"),
        (b'{"$pgskewer":"set","value":[[1]]}', "invalid 'set' value"),
        (b'{"$pgskewer":"timedelta","value":{"days":1}}', "invalid 'timedelta' value"),
    ],
)
def test_decode_invalid_tagged_value(data: bytes, fragment: str) -> None:
    with pytest.raises(ValueError) as caught:
        decode(data)

    assert fragment in str(caught.value)


def test_decode_rejects_non_utf8_bytes() -> None:
    with pytest.raises(UnicodeDecodeError):
        decode(b'"\xff"')


# --- parse_payload ------------------------------------------------------------------------


@pytest.mark.parametrize("empty", [None, b""])
def test_parse_payload_empty_is_none(empty: bytes | None) -> None:
    assert parse_payload(empty) is None


def test_parse_payload_decodes_tagged_bytes() -> None:
    payload = encode({"when": date(2026, 12, 4), "ids": (1, 2), "blob": b"\x00"})

    assert parse_payload(payload) == {"when": date(2026, 12, 4), "ids": (1, 2), "blob": b"\x00"}


def test_parse_payload_invalid_json() -> None:
    with pytest.raises(ValueError) as caught:
        parse_payload(b'{"a": }')

    message = str(caught.value)
    assert "job payload is not valid JSON" in message
    assert "Expecting value at line 1 column 7 (character 6)" in message
    assert "payload starts with b'{\"a\": }'" in message
    assert isinstance(caught.value.__cause__, json.JSONDecodeError)


def test_parse_payload_long_invalid_json_truncated() -> None:
    payload = b"[" + b"1," * 500 + b"oops]"

    with pytest.raises(ValueError) as caught:
        parse_payload(payload)

    message = str(caught.value)
    assert f"({len(payload)} bytes in total)" in message
    assert "near '1,1,1,1,1,1,1,1,1,1,oops]'" in message
    assert len(message) < 400


def test_parse_payload_shows_control_bytes_escaped() -> None:
    payload = b"\x1b[31mnot json\x00"

    with pytest.raises(ValueError) as caught:
        parse_payload(payload)

    message = str(caught.value)
    assert "\\x1b[31m" in message
    assert "\x1b" not in message
    assert "\x00" not in message


def test_parse_payload_non_utf8() -> None:
    with pytest.raises(ValueError) as caught:
        parse_payload(b'{"a": "\xff\xfe"}')

    message = str(caught.value)
    assert "job payload is not valid UTF-8" in message
    assert "byte 0xff at position 7" in message
    assert isinstance(caught.value.__cause__, UnicodeDecodeError)


def test_parse_payload_utf16_rejected() -> None:
    with pytest.raises(ValueError) as caught:
        parse_payload('{"a": 1}'.encode("utf-16"))

    assert "not valid UTF-8" in str(caught.value)


def test_parse_payload_invalid_tag() -> None:
    with pytest.raises(ValueError) as caught:
        parse_payload(b'{"$pgskewer":"bogus","value":null}')

    assert str(caught.value).startswith("job payload is invalid: unknown '$pgskewer' tag")


def test_parse_payload_whitespace_is_invalid() -> None:
    with pytest.raises(ValueError) as caught:
        parse_payload(b"   ")

    assert "not valid JSON" in str(caught.value)


# --- numpy and pandas ------------------------------------------------------------------------


def numpy_arrays() -> list[tuple[str, Any]]:
    np = pytest.importorskip("numpy")
    structured = np.dtype([("id", "<i4"), ("pos", "<f8", (2,)), ("name", "U3")])
    return [
        ("float64", np.array([1.5, np.nan, np.inf, -0.0])),
        ("big-endian int16 2d", np.arange(6, dtype=">i2").reshape(2, 3)),
        ("bool", np.array([True, False])),
        ("complex", np.array([1 + 2j, -3.5j], dtype=np.complex64)),
        ("uint64 max", np.array([2**64 - 1], dtype=np.uint64)),
        ("float16", np.array([0.1, 65504], dtype=np.float16)),
        ("datetime64 ns", np.array(["2026-12-04T10:00:00.000000001"], dtype="M8[ns]")),
        ("timedelta64", np.array([1, -2], dtype="m8[s]")),
        ("unicode", np.array(["a", "grüße"])),
        ("bytes", np.array([b"a\x00", b"bc"])),
        ("structured", np.array([(1, (0.5, 1.5), "abc")], dtype=structured)),
        ("fortran order", np.asfortranarray(np.arange(12.0).reshape(3, 4))),
        ("strided view", np.arange(10)[::3]),
        ("zero-d", np.array(7.25)),
        ("empty", np.zeros((0, 3), dtype=np.int8)),
        ("object", np.array([1, "a", None, (1, 2)], dtype=object)),
        ("string dtype", np.array(["x", "longer"], dtype=np.dtypes.StringDType())),
    ]


def test_numpy_arrays_round_trip() -> None:
    np = pytest.importorskip("numpy")

    for name, array in numpy_arrays():
        decoded = round_trip({"array": array})["array"]

        assert type(decoded) is np.ndarray, name
        assert decoded.dtype == array.dtype, name
        assert decoded.shape == array.shape, name
        assert np.array_equal(decoded, array, equal_nan=array.dtype.kind in "fc"), name
        assert decoded.flags.writeable, name


def test_numpy_arrays_output_strict_json() -> None:
    pytest.importorskip("numpy")

    for name, array in numpy_arrays():
        data = encode(array)

        assert strict_loads(data)[TAG_KEY] == "numpy.ndarray", name


def test_numpy_object_array_items_decoded() -> None:
    np = pytest.importorskip("numpy")
    array = np.empty(2, dtype=object)
    array[0] = (1, date(2026, 1, 1))
    array[1] = {"k": b"v"}

    decoded = round_trip(array)

    assert decoded[0] == (1, date(2026, 1, 1))
    assert decoded[1] == {"k": b"v"}


def test_numpy_object_array_containing_itself_rejected() -> None:
    np = pytest.importorskip("numpy")
    array = np.empty(1, dtype=object)
    array[0] = array

    with pytest.raises(EncodingError) as caught:
        encode({"a": array})

    assert "circular reference" in str(caught.value)


def test_numpy_scalars_round_trip() -> None:
    np = pytest.importorskip("numpy")
    scalars = [
        np.float64(0.1),
        np.float32(1.5),
        np.float16(-2.0),
        np.int8(-5),
        np.uint64(2**64 - 1),
        np.bool_(True),
        np.complex128(1 - 1j),
        np.datetime64("2026-12-04T10:00:00.000000001"),
        np.timedelta64(5, "ms"),
        np.str_("grüße"),
        np.bytes_(b"ab"),
    ]

    decoded = round_trip(scalars)

    for original, result in zip(scalars, decoded, strict=True):
        assert type(result) is type(original)
        assert result == original
        assert result.dtype == original.dtype


def test_numpy_nan_scalar_round_trips() -> None:
    np = pytest.importorskip("numpy")

    decoded = round_trip(np.float32("nan"))

    assert type(decoded) is np.float32
    assert np.isnan(decoded)


def test_numpy_masked_array_rejected() -> None:
    np = pytest.importorskip("numpy")

    with pytest.raises(EncodingError) as caught:
        encode(np.ma.masked_array([1, 2], mask=[0, 1]))

    assert "'MaskedArray'" in str(caught.value)


def test_numpy_decode_without_numpy_raises_import_error(monkeypatch: pytest.MonkeyPatch) -> None:
    np = pytest.importorskip("numpy")
    data = encode({"a": np.arange(3)})
    monkeypatch.setitem(sys.modules, "numpy", None)

    with pytest.raises(ImportError) as caught:
        decode(data)

    assert "pip install numpy" in str(caught.value)


def test_pandas_timestamps_round_trip() -> None:
    pd = pytest.importorskip("pandas")
    stamps = [
        pd.Timestamp("2026-12-04T10:00:00.000000001"),
        pd.Timestamp("2026-12-04T10:00:00.123456789", tz="Europe/Berlin"),
        pd.Timestamp("2026-07-04T10:00:00", tz="UTC"),
        pd.Timestamp("2026-07-04T10:00:00+05:30"),
        pd.Timestamp("2026-07-04").as_unit("s"),
    ]

    decoded = round_trip(stamps)

    for original, result in zip(stamps, decoded, strict=True):
        assert type(result) is pd.Timestamp
        assert result == original
        assert result.unit == original.unit
        assert result.utcoffset() == original.utcoffset()
        assert str(result.tz) == str(original.tz)


def test_pandas_timedelta_and_nat_round_trip() -> None:
    pd = pytest.importorskip("pandas")
    values = [pd.Timedelta(1, "ns"), pd.Timedelta(days=-3, hours=4).as_unit("s"), pd.NaT]

    decoded = round_trip(values)

    assert type(decoded[0]) is pd.Timedelta
    assert decoded[0] == values[0]
    assert decoded[1] == values[1]
    assert decoded[1].unit == "s"
    assert decoded[2] is pd.NaT


def test_pandas_dataframe_rejected() -> None:
    pd = pytest.importorskip("pandas")

    with pytest.raises(EncodingError) as caught:
        encode({"frame": pd.DataFrame({"a": [1]})})

    assert "'DataFrame'" in str(caught.value)
    assert caught.value.path == "$.frame"


def test_plain_values_do_not_import_numpy_or_pandas() -> None:
    script = """
import sys
from datetime import datetime
from decimal import Decimal
from pgskewer.encoding import decode, encode
value = {"a": [1, 2.5, float("nan")], "when": datetime(2026, 1, 1), "d": Decimal("1"), 3: (1,)}
assert decode(encode(value))["a"][:2] == [1, 2.5]
loaded = sorted(name for name in ("numpy", "pandas") if name in sys.modules)
print(",".join(loaded) or "none")
"""
    completed = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )

    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == "none"
