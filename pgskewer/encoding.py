"""The lossless JSON encoding of job payloads and task results.

Every payload that pgskewer enqueues and every result a step returns passes through
:func:`encode`, and every reader (task code, the CLI, the notebook widget) gets it back
through :func:`decode` or :func:`parse_payload`. The output is strictly valid UTF-8 JSON
(RFC 8259) in compact form, so it can be stored in a PostgreSQL ``json`` column and read
with plain SQL.

Plain JSON
==========

``dict`` with ``str`` keys, ``list``, ``str``, ``int``, finite ``float``, ``bool`` and
``None`` are written as the JSON they map to. Dict key order is kept on both sides and
keys are never sorted. Characters outside ASCII are written as they are, not as ``\\u``
escapes. The control characters U+0000 to U+001F, NUL included, are always escaped, as
JSON requires. DEL and the C1 controls (U+007F to U+009F) are written as they are. A string that
contains a lone surrogate (for example ``"\\ud800"``) cannot be written as UTF-8, so such
a value is written with every non-ASCII character escaped instead, and it still decodes
to the same string.

Tagged values
=============

Every other supported value becomes an object with exactly two keys, the tag key
:data:`TAG_KEY` (``"$pgskewer"``) and :data:`VALUE_KEY` (``"value"``)::

    {"$pgskewer": "datetime", "value": "2026-12-04T10:00:00+01:00"}

Tagged values nest: a tuple of datetimes is a ``tuple`` tag whose list contains
``datetime`` tags. The tags are:

=====================  ============================================================
tag                    Python type and the form of ``value``
=====================  ============================================================
``float``              ``float`` NaN, +Infinity and -Infinity, which JSON cannot
                       contain: ``"nan"``, ``"inf"`` or ``"-inf"``
``datetime``           ``datetime.datetime``: ``isoformat()`` text
``date``               ``datetime.date``: ``isoformat()`` text
``time``               ``datetime.time``: ``isoformat()`` text
``timedelta``          ``datetime.timedelta``: ``{"days": d, "seconds": s,
                       "microseconds": us}`` as normalised by ``timedelta``
``decimal``            ``decimal.Decimal``: ``str()`` of it, so the exact digits,
                       exponent, sign and NaN/sNaN/Infinity survive
``uuid``               ``uuid.UUID``: the canonical hyphenated text
``bytes``              ``bytes`` and ``memoryview``: standard base64 with padding
``bytearray``          ``bytearray``: standard base64 with padding
``tuple``              ``tuple``: a list of the encoded items
``set``                ``set``: a list of the encoded items
``frozenset``          ``frozenset``: a list of the encoded items
``dict``               a ``dict`` that has a key other than a ``str``, or that has the
                       key ``"$pgskewer"`` itself: a list of ``[key, value]`` pairs in
                       the dict's order
``numpy.ndarray``      ``numpy.ndarray``: ``{"dtype": d, "shape": [..], "data": b64}``,
                       or ``"items"`` (a flat list) in place of ``"data"`` for object
                       and ``StringDType`` arrays
``numpy.scalar``       a numpy scalar such as ``numpy.float32(1.5)``:
                       ``{"dtype": d, "data": b64}``
``pandas.Timestamp``   ``pandas.Timestamp``: ``{"iso": text, "tz": zone, "unit": u}``
``pandas.Timedelta``   ``pandas.Timedelta``: ``{"iso": text, "unit": u}``
``pandas.NaT``         ``pandas.NaT``: ``null``
=====================  ============================================================

Because every user dict with the key ``"$pgskewer"`` is written with the ``dict`` tag,
any object with that key in pgskewer's output is a tag. :func:`decode` raises
``ValueError`` for a tag it does not know and for a tagged object with other keys.

Sets are written in sorted order when ``sorted()`` accepts their items, so a set of
strings or numbers gives the same bytes in every process. Otherwise they are written in
iteration order.

What is kept and what is not
============================

- ``datetime`` and ``time`` keep microseconds and their UTC offset, including offsets
  with seconds. A ``datetime`` with a named zone such as ``zoneinfo.ZoneInfo("Europe/
  Berlin")`` decodes with a fixed ``datetime.timezone`` offset: the same instant and the
  same wall time, but not the zone name. A ``time`` whose zone gives no offset without a
  date (such as ``ZoneInfo("Europe/Berlin")``) decodes as a naive time. ``fold`` is not
  kept.
- ``memoryview`` decodes as ``bytes`` (its contents in C order), not as a view.
- numpy arrays keep dtype (with byte order and structured fields) and shape. Their
  memory layout is not kept: a Fortran-ordered or strided array decodes as a
  C-contiguous copy. Subclasses of ``ndarray`` (masked arrays, ``matrix``) are rejected.
- ``pandas.Timestamp`` keeps nanoseconds and its unit, and keeps the zone name of a
  ``zoneinfo`` zone (its ``key``) or a ``pytz`` zone (its ``zone``). Other zones decode as
  fixed offsets.
- Subclasses of the supported types are written as the base type and decode as it:
  ``OrderedDict`` and ``defaultdict`` decode as ``dict``, a named tuple as a plain
  ``tuple``, and a ``str`` or ``int`` subclass as ``str`` or ``int``. ``bool`` stays
  ``bool``.

Two kinds of values are written one way and decode as their plain data, not as the
original type, because rebuilding them would mean importing a class named in the data:

- An enum member is written as its ``value``. ``Status.SUCCESSFUL`` decodes as
  ``"successful"``.
- A dataclass instance is written as a plain JSON object of its fields, in field order,
  like ``dataclasses.asdict``. It decodes as a ``dict``.

Because of that, a dataclass instance cannot be a dict key or a set item: it would decode
as an unhashable dict, so :func:`encode` raises :class:`EncodingError` for it.

numpy and pandas
================

:func:`encode` never imports numpy or pandas. It recognises their values by the module of
the value's type, which is only possible when the library is already loaded.
:func:`decode` imports numpy or pandas only when the data contains one of their tags, and
raises ``ImportError`` naming the package when it is not installed.

Errors and limits
=================

:func:`encode` raises :class:`EncodingError` (a ``TypeError``) for a value of any other
type and for a container that contains itself. The message names the type and the
position as a JSON path such as ``$.tasks.a.result[2]``. No size limit is imposed here,
but a structure nested deeper than the interpreter's recursion limit raises
``RecursionError``, and an ``int`` with more digits than ``sys.get_int_max_str_digits()``
raises ``ValueError``.

:func:`decode` also accepts the ``NaN``, ``Infinity`` and ``-Infinity`` tokens that
Python's ``json`` module writes by default, although :func:`encode` never writes them.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import decimal
import enum
import importlib
import json
import math
import sys
import uuid
from collections.abc import Callable, Iterable
from datetime import date, datetime, time, timedelta
from types import ModuleType
from typing import Any, Final

__all__ = [
    "TAG_KEY",
    "VALUE_KEY",
    "EncodingError",
    "decode",
    "encode",
    "encode_text",
    "parse_payload",
]

#: The key that marks a tagged value. Its value names the type (see the module docs).
TAG_KEY: Final = "$pgskewer"

#: The key that contains the encoded form of a tagged value, next to :data:`TAG_KEY`.
VALUE_KEY: Final = "value"

_SUPPORTED_HINT: Final = (
    "convert it to JSON-able data (dict, list, str, int, float, bool, None) "
    "or one of the supported types"
)

# Tags whose decoded value is hashable, so it may be a dict key or a set item.
# ``tuple`` is hashable only when its items are, which _decodes_hashable checks.
_HASHABLE_TAGS: Final = frozenset(
    {
        "float",
        "datetime",
        "date",
        "time",
        "timedelta",
        "decimal",
        "uuid",
        "bytes",
        "frozenset",
        "numpy.scalar",
        "pandas.Timestamp",
        "pandas.Timedelta",
        "pandas.NaT",
    }
)

_PREVIEW_BYTES: Final = 64


class EncodingError(TypeError):
    """A value that :func:`encode` cannot write.

    ``value_type`` is the type of the offending value and ``path`` its position in the
    encoded value as a JSON path (``$`` is the value passed to :func:`encode`).
    """

    def __init__(self, message: str, *, value_type: type, path: str) -> None:
        super().__init__(message)
        self.value_type = value_type
        self.path = path


def encode(value: Any) -> bytes:
    """Encode ``value`` as compact UTF-8 JSON text.

    Raises :class:`EncodingError` when ``value`` contains a value of an unsupported type
    or a container that contains itself.
    """
    jsonable = _to_jsonable(value)
    text = json.dumps(jsonable, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        # A lone surrogate has no UTF-8 form, but JSON can still escape it as \udXXX.
        ascii_text = json.dumps(jsonable, ensure_ascii=True, allow_nan=False, separators=(",", ":"))
        return ascii_text.encode("ascii")


def encode_text(value: Any) -> str:
    """Encode ``value`` like :func:`encode` and return the JSON as ``str``."""
    return encode(value).decode("utf-8")


def decode(data: bytes | str | None) -> Any:
    """Decode JSON written by :func:`encode` back into Python values.

    ``None`` and empty input decode as ``None``. Raises ``ValueError`` for invalid
    UTF-8 (``UnicodeDecodeError``), invalid JSON (``json.JSONDecodeError``) and invalid
    tagged values, and ``ImportError`` when a numpy or pandas value needs a package that
    is not installed.
    """
    if not data:
        return None

    text = data if isinstance(data, str) else str(data, "utf-8")
    return json.loads(text, object_hook=_decode_object)


def parse_payload(payload: bytes | None) -> Any:
    """Decode a job's ``payload`` as written by :func:`encode`.

    ``None`` and an empty payload give ``None``. A payload that is not UTF-8, not JSON
    or contains an invalid tagged value raises ``ValueError`` with the reason, the position
    and the first bytes of the payload.
    """
    if not payload:
        return None

    try:
        return decode(payload)
    except UnicodeDecodeError as error:
        bad_byte = payload[error.start]
        raise ValueError(
            f"job payload is not valid UTF-8: byte 0x{bad_byte:02x} at position {error.start} "
            f"is invalid ({error.reason}); payload starts with {_preview(payload)}"
        ) from error
    except json.JSONDecodeError as error:
        raise ValueError(
            f"job payload is not valid JSON: {error.msg} at line {error.lineno} column "
            f"{error.colno} (character {error.pos}){_excerpt(error)}; payload starts with "
            f"{_preview(payload)}"
        ) from error
    except ValueError as error:
        raise ValueError(f"job payload is invalid: {error}") from error


def _preview(payload: bytes) -> str:
    """Show the start of ``payload`` as a ``bytes`` literal, marking truncation."""
    shown = repr(payload[:_PREVIEW_BYTES])
    if len(payload) > _PREVIEW_BYTES:
        return f"{shown}... ({len(payload)} bytes in total)"
    return shown


def _excerpt(error: json.JSONDecodeError) -> str:
    """Show the text around a JSON error that is not near the start of the payload."""
    if error.pos < _PREVIEW_BYTES // 2:
        return ""
    start = max(0, error.pos - 20)
    return f" near {error.doc[start : error.pos + 20]!r}"


# --- encoding ---------------------------------------------------------------------------


class _EncodeFailure(Exception):
    """Internal: an unencodable value, collecting its path while the stack unwinds."""

    def __init__(self, value_type: type, template: str) -> None:
        super().__init__(template)
        self.value_type = value_type
        self.template = template  # formatted with ``role`` and ``path``
        self.role = "value"  # or "dict key", "set item"
        self.segments: list[str] = []  # innermost first


def _to_jsonable(value: Any) -> Any:
    """Convert ``value`` into data that ``json.dumps`` writes exactly, or raise EncodingError."""
    try:
        return _Encoder().convert(value)
    except _EncodeFailure as failure:
        path = "$" + "".join(reversed(failure.segments))
        message = failure.template.format(role=failure.role, path=path)
        raise EncodingError(message, value_type=failure.value_type, path=path) from None


def _tagged(tag: str, value: Any) -> dict[str, Any]:
    return {TAG_KEY: tag, VALUE_KEY: value}


def _type_name(value_type: type) -> str:
    return value_type.__qualname__


def _unsupported(value: Any) -> _EncodeFailure:
    name = _type_name(type(value))
    return _EncodeFailure(
        type(value), f"cannot encode {{role}} of type {name!r} at {{path}}; {_SUPPORTED_HINT}"
    )


def _key_segment(key: Any) -> str:
    if isinstance(key, str):
        return f".{key}" if key.isidentifier() else f"[{json.dumps(key, ensure_ascii=False)}]"
    return f"[{_shorten(repr(key), 40)}]"


def _decodes_hashable(encoded: Any) -> bool:
    """Return whether ``encoded`` decodes as a hashable value (a valid key or set item)."""
    if type(encoded) is list:
        return False
    if type(encoded) is not dict:
        return True

    tag = encoded.get(TAG_KEY)
    if tag == "tuple":
        return all(_decodes_hashable(item) for item in encoded[VALUE_KEY])
    return tag in _HASHABLE_TAGS


def _encode_float(value: float) -> Any:
    if math.isfinite(value):
        return value
    if math.isnan(value):
        return _tagged("float", "nan")
    return _tagged("float", "inf" if value > 0 else "-inf")


def _encode_timedelta(value: timedelta) -> dict[str, Any]:
    parts = {"days": value.days, "seconds": value.seconds, "microseconds": value.microseconds}
    return _tagged("timedelta", parts)


def _encode_base64(tag: str, raw: bytes | bytearray) -> dict[str, Any]:
    return _tagged(tag, base64.b64encode(raw).decode("ascii"))


# Types whose encoding needs no recursion, looked up by exact type.
_SCALAR_ENCODERS: Final[dict[type, Callable[[Any], Any]]] = {
    float: _encode_float,
    datetime: lambda value: _tagged("datetime", value.isoformat()),
    date: lambda value: _tagged("date", value.isoformat()),
    time: lambda value: _tagged("time", value.isoformat()),
    timedelta: _encode_timedelta,
    decimal.Decimal: lambda value: _tagged("decimal", str(value)),
    uuid.UUID: lambda value: _tagged("uuid", str(value)),
    bytes: lambda value: _encode_base64("bytes", value),
    bytearray: lambda value: _encode_base64("bytearray", value),
    memoryview: lambda value: _encode_base64("bytes", value.tobytes()),
}


class _Encoder:
    """One conversion of a value into JSON-able data.

    ``convert`` returns values of the plain JSON types unchanged and builds new dicts and
    lists for containers. ``_active`` contains the ids of the containers being converted,
    which is how a container that contains itself is found.
    """

    def __init__(self) -> None:
        self._active: set[int] = set()

    def convert(self, value: Any) -> Any:
        value_type = type(value)
        if value_type is str or value_type is int or value_type is bool or value is None:
            return value
        if value_type is dict:
            return self._convert_dict(value)
        if value_type is list:
            return self._convert_list(value)
        if value_type is float:
            return value if math.isfinite(value) else _encode_float(value)

        scalar_encoder = _SCALAR_ENCODERS.get(value_type)
        if scalar_encoder is not None:
            return scalar_encoder(value)
        if value_type is tuple:
            return _tagged("tuple", self._convert_items(value))
        if value_type is set or value_type is frozenset:
            return self._convert_set(value_type.__name__, value)
        return self._convert_other(value)

    def _enter(self, container: Any) -> None:
        if id(container) in self._active:
            name = _type_name(type(container))
            raise _EncodeFailure(
                type(container),
                f"cannot encode {{role}} of type {name!r} at {{path}}: it contains itself "
                "(circular reference)",
            )
        self._active.add(id(container))

    def _convert_dict(self, value: dict[Any, Any]) -> dict[str, Any]:
        self._enter(value)
        try:
            converted = None if TAG_KEY in value else self._convert_str_dict(value)
            if converted is None:
                converted = self._convert_dict_pairs(value)
            return converted
        finally:
            self._active.discard(id(value))

    def _convert_str_dict(self, value: dict[Any, Any]) -> dict[str, Any] | None:
        """Convert a dict with only ``str`` keys, or return None if it has another key."""
        converted: dict[str, Any] = {}
        key: Any = None
        try:
            for key, item in value.items():
                if type(key) is not str:
                    return None
                converted[key] = self.convert(item)
        except _EncodeFailure as failure:
            failure.segments.append(_key_segment(key))
            raise
        return converted

    def _convert_dict_pairs(self, value: dict[Any, Any]) -> dict[str, Any]:
        """Encode a dict with non-``str`` keys or the tag key as a ``dict`` tag of pairs.

        A failure inside a key is reported at the dict's path, because a key is not a
        position that a JSON path can name.
        """
        pairs: list[list[Any]] = []
        for key, item in value.items():
            try:
                encoded_key = self._convert_hashable(key)
            except _EncodeFailure as failure:
                failure.role = "dict key" if not failure.segments else "item inside a dict key"
                failure.segments.clear()
                raise

            try:
                pairs.append([encoded_key, self.convert(item)])
            except _EncodeFailure as failure:
                failure.segments.append(_key_segment(key))
                raise
        return _tagged("dict", pairs)

    def _convert_list(self, value: list[Any]) -> list[Any]:
        self._enter(value)
        try:
            return self._convert_items(value)
        finally:
            self._active.discard(id(value))

    def _convert_items(self, items: Iterable[Any]) -> list[Any]:
        converted: list[Any] = []
        append = converted.append
        try:
            for item in items:
                append(self.convert(item))
        except _EncodeFailure as failure:
            failure.segments.append(f"[{len(converted)}]")
            raise
        return converted

    def _convert_set(self, tag: str, value: set[Any] | frozenset[Any]) -> dict[str, Any]:
        try:
            items: list[Any] = sorted(value)
        except (TypeError, ArithmeticError):  # unorderable items, or Decimal NaN comparisons
            items = list(value)

        converted: list[Any] = []
        try:
            for item in items:
                converted.append(self._convert_hashable(item))
        except _EncodeFailure as failure:
            if not failure.segments:
                failure.role = "set item"
            failure.segments.append(f"[{len(converted)}]")
            raise
        return _tagged(tag, converted)

    def _convert_hashable(self, value: Any) -> Any:
        """Convert a dict key or set item, rejecting one that would decode unhashable."""
        if type(value) is str or type(value) is int:
            return value

        converted = self.convert(value)
        if not _decodes_hashable(converted):
            name = _type_name(type(value))
            raise _EncodeFailure(
                type(value),
                f"cannot encode {{role}} of type {name!r} at {{path}}: it would decode as an "
                "unhashable dict or list; convert it to hashable data, for example a "
                "dataclass instance to a tuple of its fields",
            )
        return converted

    def _convert_other(self, value: Any) -> Any:
        """Convert enum members, numpy and pandas values, dataclasses and subclasses."""
        if isinstance(value, enum.Enum):
            return self.convert(value.value)

        package = type(value).__module__.partition(".")[0]
        if package == "numpy":
            return self._convert_numpy(value)
        if package == "pandas":
            return _convert_pandas(value)

        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return self._convert_dataclass(value)

        return self._convert_subclass(value)

    def _convert_subclass(self, value: Any) -> Any:
        """Convert an instance of a subclass of a supported type as the base type.

        The base class methods (``str.__str__`` and so on) are called directly because a
        subclass may override the conversion methods.
        """
        if isinstance(value, dict):
            return self._convert_dict(value)
        if isinstance(value, list):
            return self._convert_list(value)
        if isinstance(value, tuple):
            return _tagged("tuple", self._convert_items(value))
        if isinstance(value, frozenset):
            return self._convert_set("frozenset", value)
        if isinstance(value, set):
            return self._convert_set("set", value)
        if isinstance(value, str):
            return str.__str__(value)
        if isinstance(value, int):
            return int.__int__(value)
        if isinstance(value, float):
            return _encode_float(float.__float__(value))

        # The scalar encoders are in subclass-first order: datetime comes before date.
        for base, encoder in _SCALAR_ENCODERS.items():
            if isinstance(value, base):
                return encoder(value)
        raise _unsupported(value)

    def _convert_dataclass(self, value: Any) -> dict[str, Any]:
        self._enter(value)
        converted: dict[str, Any] = {}
        name = ""
        try:
            for field in dataclasses.fields(value):
                name = field.name
                converted[name] = self.convert(getattr(value, name))
        except _EncodeFailure as failure:
            failure.segments.append(_key_segment(name))
            raise
        finally:
            self._active.discard(id(value))
        return converted

    def _convert_numpy(self, value: Any) -> dict[str, Any]:
        numpy = sys.modules["numpy"]  # loaded, because ``value`` is one of its types
        if type(value) is numpy.ndarray:
            return self._convert_ndarray(numpy, value)
        if isinstance(value, numpy.generic):
            raw = numpy.asarray(value).tobytes()
            descr = numpy.lib.format.dtype_to_descr(value.dtype)
            return _tagged("numpy.scalar", {"dtype": descr, "data": _b64(raw)})
        raise _unsupported(value)

    def _convert_ndarray(self, numpy: ModuleType, array: Any) -> dict[str, Any]:
        shape = list(array.shape)
        # numpy 2 StringDType keeps its strings outside the array buffer, so tobytes() is useless.
        if array.dtype.kind == "T":
            items = self._convert_items(array.ravel().tolist())
            return _tagged("numpy.ndarray", {"dtype": "T", "shape": shape, "items": items})

        descr = numpy.lib.format.dtype_to_descr(array.dtype)
        if array.dtype.hasobject:
            self._enter(array)
            try:
                items = self._convert_items(array.ravel())
            finally:
                self._active.discard(id(array))
            return _tagged("numpy.ndarray", {"dtype": descr, "shape": shape, "items": items})

        raw = array.tobytes(order="C")
        return _tagged("numpy.ndarray", {"dtype": descr, "shape": shape, "data": _b64(raw)})


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _convert_pandas(value: Any) -> dict[str, Any]:
    pandas = sys.modules["pandas"]  # loaded, because ``value`` is one of its types
    if value is pandas.NaT:
        return _tagged("pandas.NaT", None)
    if isinstance(value, pandas.Timestamp):
        zone = getattr(value.tz, "key", None) or getattr(value.tz, "zone", None)
        stamp = {"iso": value.isoformat(), "tz": zone, "unit": value.unit}
        return _tagged("pandas.Timestamp", stamp)
    if isinstance(value, pandas.Timedelta):
        return _tagged("pandas.Timedelta", {"iso": value.isoformat(), "unit": value.unit})
    raise _unsupported(value)


# --- decoding ---------------------------------------------------------------------------


def _decode_object(obj: dict[str, Any]) -> Any:
    """The ``object_hook``: return plain objects unchanged, rebuild tagged values.

    ``json.loads`` calls it innermost first, so the items inside a tagged value are
    already decoded when the tag is rebuilt.
    """
    if TAG_KEY not in obj:
        return obj
    return _decode_tagged(obj)


def _decode_tagged(obj: dict[str, Any]) -> Any:
    tag = obj[TAG_KEY]
    if len(obj) != 2 or VALUE_KEY not in obj:
        keys = ", ".join(repr(key) for key in obj)
        raise ValueError(
            f"invalid tagged value: expected exactly the keys {TAG_KEY!r} and {VALUE_KEY!r}, "
            f"got {keys}"
        )

    decoder = _DECODERS.get(tag) if isinstance(tag, str) else None
    if decoder is None:
        raise ValueError(
            f"unknown {TAG_KEY!r} tag {tag!r}: this version of pgskewer cannot decode it"
        )

    try:
        return decoder(obj[VALUE_KEY])
    except (TypeError, ValueError, KeyError) as error:
        value_repr = _shorten(repr(obj[VALUE_KEY]))
        raise ValueError(f"invalid {tag!r} value {value_repr}: {error}") from error


def _shorten(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _expect(value: Any, expected: type) -> Any:
    if not isinstance(value, expected):
        raise TypeError(f"expected {expected.__name__}, got {type(value).__name__}")
    return value


def _decode_float(value: Any) -> float:
    text = _expect(value, str)
    if text not in ("nan", "inf", "-inf"):
        raise ValueError("expected 'nan', 'inf' or '-inf'")
    return float(text)


def _decode_decimal(value: Any) -> decimal.Decimal:
    try:
        return decimal.Decimal(_expect(value, str))
    except decimal.InvalidOperation:
        raise ValueError("not a decimal number") from None


def _decode_timedelta(value: Any) -> timedelta:
    parts = _expect(value, dict)
    return timedelta(
        days=_expect(parts["days"], int),
        seconds=_expect(parts["seconds"], int),
        microseconds=_expect(parts["microseconds"], int),
    )


def _decode_base64(value: Any) -> bytes:
    try:
        return base64.b64decode(_expect(value, str), validate=True)
    except binascii.Error as error:
        raise ValueError(f"invalid base64: {error}") from error


def _decode_dict(value: Any) -> dict[Any, Any]:
    decoded: dict[Any, Any] = {}
    for pair in _expect(value, list):
        if not isinstance(pair, list) or len(pair) != 2:
            raise ValueError("expected a list of [key, value] pairs")
        decoded[pair[0]] = pair[1]
    return decoded


def _import_for_decoding(name: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ImportError as error:
        raise ImportError(
            f"decoding a {name} value written by pgskewer requires {name}, which cannot be "
            f"imported ({error}); install it with `pip install {name}`",
            name=name,
        ) from error


def _decode_ndarray(value: Any) -> Any:
    numpy = _import_for_decoding("numpy")
    fields = _expect(value, dict)
    shape = tuple(_expect(fields["shape"], list))

    if fields["dtype"] == "T":
        items = _expect(fields["items"], list)
        return numpy.array(items, dtype=numpy.dtype("T")).reshape(shape)

    dtype = numpy.lib.format.descr_to_dtype(fields["dtype"])
    if "items" in fields:
        items = _expect(fields["items"], list)
        array = numpy.empty(len(items), dtype=dtype)
        # Assigning item by item keeps list and tuple items as single objects.
        for index, item in enumerate(items):
            array[index] = item
        return array.reshape(shape)

    if dtype.itemsize == 0:
        return numpy.empty(shape, dtype=dtype)
    raw = _decode_base64(fields["data"])
    return numpy.frombuffer(raw, dtype=dtype).reshape(shape).copy()


def _decode_numpy_scalar(value: Any) -> Any:
    numpy = _import_for_decoding("numpy")
    fields = _expect(value, dict)
    dtype = numpy.lib.format.descr_to_dtype(fields["dtype"])
    raw = _decode_base64(fields["data"])
    if dtype.itemsize == 0:
        return numpy.zeros((), dtype=dtype)[()]
    return numpy.frombuffer(raw, dtype=dtype)[0]


def _decode_pandas_timestamp(value: Any) -> Any:
    pandas = _import_for_decoding("pandas")
    fields = _expect(value, dict)
    stamp = pandas.Timestamp(_expect(fields["iso"], str))
    if fields["tz"] is not None:
        stamp = stamp.tz_convert(_expect(fields["tz"], str))
    return stamp.as_unit(_expect(fields["unit"], str))


def _decode_pandas_timedelta(value: Any) -> Any:
    pandas = _import_for_decoding("pandas")
    fields = _expect(value, dict)
    delta = pandas.Timedelta(_expect(fields["iso"], str))
    return delta.as_unit(_expect(fields["unit"], str))


def _decode_pandas_nat(value: Any) -> Any:
    if value is not None:
        raise ValueError("expected null")
    return _import_for_decoding("pandas").NaT


_DECODERS: Final[dict[str, Callable[[Any], Any]]] = {
    "float": _decode_float,
    "datetime": lambda value: datetime.fromisoformat(_expect(value, str)),
    "date": lambda value: date.fromisoformat(_expect(value, str)),
    "time": lambda value: time.fromisoformat(_expect(value, str)),
    "timedelta": _decode_timedelta,
    "decimal": _decode_decimal,
    "uuid": lambda value: uuid.UUID(_expect(value, str)),
    "bytes": _decode_base64,
    "bytearray": lambda value: bytearray(_decode_base64(value)),
    "tuple": lambda value: tuple(_expect(value, list)),
    "set": lambda value: set(_expect(value, list)),
    "frozenset": lambda value: frozenset(_expect(value, list)),
    "dict": _decode_dict,
    "numpy.ndarray": _decode_ndarray,
    "numpy.scalar": _decode_numpy_scalar,
    "pandas.Timestamp": _decode_pandas_timestamp,
    "pandas.Timedelta": _decode_pandas_timedelta,
    "pandas.NaT": _decode_pandas_nat,
}
