"""Discovery, normalisation and password redaction of PostgreSQL DSNs.

pgskewer connects through asyncpg, which accepts only ``postgresql://`` URLs. This module
turns the forms people paste from other tools (SQLAlchemy URLs, ``postgres://``, libpq
``key=value`` strings, ``PG*`` variables) into such a URL. It also produces text about a
DSN that is safe to log. No function here puts a password into text meant for display, a
``repr`` or an exception message.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

__all__ = ["SecretDsn", "describe_dsn", "discover_dsn", "normalize_dsn", "redact_dsn"]

REDACTED = "***"

# Environment variables read by `discover_dsn`, in order of precedence.
DSN_VARIABLES = ("PGSKEWER_DSN", "DATABASE_URL")

# libpq environment variables and the connection keywords they set.
LIBPQ_VARIABLES = {
    "PGHOST": "host",
    "PGPORT": "port",
    "PGUSER": "user",
    "PGPASSWORD": "password",
    "PGDATABASE": "dbname",
    "PGSSLMODE": "sslmode",
    "PGAPPNAME": "application_name",
}

# Keywords whose values are secrets, in key=value strings and in URL query parameters.
SECRET_KEYWORDS = ("password", "sslpassword")

_URL_SCHEME = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://")
_POSTGRES_SCHEME = re.compile(r"^postgres(?:ql)?(?:\+[A-Za-z0-9_]+)?$", re.IGNORECASE)
_SECRET_QUERY = re.compile(r"(?P<key>[?&](?:ssl)?password=)[^&#]*", re.IGNORECASE)
# A keyword value is either single-quoted (with backslash escapes) or runs to the next space.
# An unterminated quote consumes the rest of the string, so a broken value is still hidden.
_SECRET_KEYWORD = re.compile(
    r"(?P<key>\b(?:ssl)?password\s*=\s*)(?:'(?:[^'\\]|\\.)*'?|\S*)", re.IGNORECASE
)
_KEYWORD_PAIR = re.compile(r"\s*(?P<key>[A-Za-z_][A-Za-z0-9_]*)\s*=\s*")


class SecretDsn:
    """A DSN whose ``str`` and ``repr`` show it with the password redacted.

    Use it to carry a DSN through objects that may be printed or logged. Call
    `get_secret_value` only where the DSN is handed to a driver.
    """

    __slots__ = ("_dsn",)

    def __init__(self, dsn: str) -> None:
        self._dsn = dsn

    def get_secret_value(self) -> str:
        """Return the DSN with its password."""
        return self._dsn

    def __str__(self) -> str:
        return redact_dsn(self._dsn)

    def __repr__(self) -> str:
        return f"SecretDsn({redact_dsn(self._dsn)!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SecretDsn):
            return NotImplemented
        return self._dsn == other._dsn

    def __hash__(self) -> int:
        return hash(self._dsn)


def discover_dsn(environ: Mapping[str, str] | None = None) -> str | None:
    """Find the DSN to use from environment variables and return it normalised.

    The order is ``PGSKEWER_DSN``, then ``DATABASE_URL``, then the libpq variables
    ``PGHOST``, ``PGPORT``, ``PGUSER``, ``PGPASSWORD``, ``PGDATABASE``, ``PGSSLMODE`` and
    ``PGAPPNAME``. The libpq variables count only when at least one of ``PGHOST``,
    ``PGDATABASE`` or ``PGUSER`` is set, and ``PGSERVICE`` (service files) is not read.
    Empty values count as unset. Returns ``None`` when nothing is set.

    Raises:
        ValueError: a DSN variable contains something that is not a PostgreSQL DSN.
    """
    if environ is None:
        environ = os.environ

    for name in DSN_VARIABLES:
        value = environ.get(name, "").strip()
        if value:
            return _normalize_variable(name, value)

    keywords = {
        keyword: environ[variable]
        for variable, keyword in LIBPQ_VARIABLES.items()
        if environ.get(variable, "").strip()
    }
    if not keywords.keys() & {"host", "dbname", "user"}:
        return None

    return _url_from_keywords(keywords)


def _normalize_variable(name: str, value: str) -> str:
    try:
        return normalize_dsn(value)
    except ValueError as exc:
        message = f"environment variable {name} is invalid: {exc}"
        if name != "PGSKEWER_DSN":
            message += "; or set PGSKEWER_DSN, which takes precedence over it"
        raise ValueError(message) from None


def normalize_dsn(dsn: str) -> str:
    """Convert a DSN to the ``postgresql://`` URL form that asyncpg accepts.

    Accepted forms:

    - ``postgresql://`` URLs, returned unchanged apart from surrounding whitespace;
    - ``postgres://`` and SQLAlchemy URLs such as ``postgresql+asyncpg://`` or
      ``postgresql+psycopg://``, whose scheme is replaced;
    - libpq ``key=value`` strings (``host=/run/postgresql dbname=app``), rebuilt as a URL.
      A host that is a directory becomes the ``host`` query parameter.

    NOTE: keywords other than host, port, user, password and dbname become URL query
    parameters, and asyncpg sends query parameters it does not know (``connect_timeout``,
    for example) to the server as settings, where they may be rejected.

    Raises:
        ValueError: the scheme is not a PostgreSQL one, or a key=value string cannot be
            parsed. The message shows the DSN with its password redacted.
    """
    text = dsn.strip()
    match = _URL_SCHEME.match(text)

    if match is None:
        if "=" not in text:
            raise ValueError(
                f"invalid DSN {redact_dsn(text)!r}: expected a postgresql:// URL "
                "or libpq key=value pairs such as 'host=127.0.0.1 dbname=app'"
            )
        return _url_from_keywords(_parse_keywords(text))

    scheme = match["scheme"]
    if not _POSTGRES_SCHEME.match(scheme):
        raise ValueError(
            f"unsupported DSN scheme {scheme!r} in {redact_dsn(text)!r}: "
            "use a postgresql://user:password@host:port/database URL"
        )
    return "postgresql://" + text[match.end() :]


def _parse_keywords(text: str) -> dict[str, str]:
    """Parse a libpq ``key=value`` string, following libpq's quoting rules."""
    keywords: dict[str, str] = {}
    position = 0

    while position < len(text):
        if text[position:].strip() == "":
            break

        pair = _KEYWORD_PAIR.match(text, position)
        if pair is None:
            raise ValueError(
                f"invalid key=value DSN {redact_dsn(text)!r} at character {position}: "
                "expected keyword=value"
            )

        value, position = _read_keyword_value(text, pair.end())
        keywords[pair["key"]] = value

    return keywords


def _read_keyword_value(text: str, start: int) -> tuple[str, int]:
    """Read one value starting at ``start`` and return it with the position after it."""
    quoted = start < len(text) and text[start] == "'"
    characters: list[str] = []
    position = start + 1 if quoted else start

    while position < len(text):
        character = text[position]
        if character == "\\" and position + 1 < len(text):
            characters.append(text[position + 1])
            position += 2
        elif quoted and character == "'":
            return "".join(characters), position + 1
        elif not quoted and character.isspace():
            break
        else:
            characters.append(character)
            position += 1

    if quoted:
        raise ValueError(
            f"invalid key=value DSN {redact_dsn(text)!r}: a quoted value has no closing quote"
        )
    return "".join(characters), position


def _url_from_keywords(keywords: Mapping[str, str]) -> str:
    """Build a ``postgresql://`` URL from libpq connection keywords."""
    remaining = dict(keywords)
    host = remaining.pop("host", "")
    port = remaining.pop("port", "")
    user = remaining.pop("user", "")
    password = remaining.pop("password", "")
    database = remaining.pop("dbname", "")

    userinfo = quote(user, safe="")
    if password:
        userinfo += ":" + quote(password, safe="")
    if userinfo:
        userinfo += "@"

    if host.startswith("/"):
        # A socket directory cannot be written in the URL's host part, so it goes in the query.
        remaining = {"host": host, **({"port": port} if port else {}), **remaining}
        netloc = ""
    else:
        netloc = _join_hosts(host, port)

    url = f"postgresql://{userinfo}{netloc}/{quote(database, safe='')}"
    if remaining:
        query = "&".join(
            f"{quote(key)}={quote(value, safe='/')}" for key, value in remaining.items()
        )
        url += "?" + query
    return url


def _join_hosts(host: str, port: str) -> str:
    """Join libpq's comma-separated host and port lists into a URL host part."""
    hosts = host.split(",") if host else [""]
    ports = port.split(",") if port else [""]
    if len(ports) == 1:
        ports = ports * len(hosts)
    if len(ports) != len(hosts):
        raise ValueError(
            f"invalid DSN: {len(hosts)} hosts but {len(ports)} ports; "
            "give one port, or one port per host"
        )

    parts = []
    for name, number in zip(hosts, ports, strict=True):
        bracketed = f"[{name}]" if ":" in name else name
        parts.append(f"{bracketed}:{number}" if number else bracketed)
    return ",".join(parts)


def redact_dsn(dsn: str) -> str:
    """Return ``dsn`` with every password replaced by ``***``.

    Passwords are found in a URL's userinfo (``user:password@``), in ``password`` and
    ``sslpassword`` query parameters, and in ``password=`` keywords of libpq strings. When
    a URL is malformed, more than the password may be hidden, but never less: the userinfo
    is taken to run up to the last ``@`` before the query. An empty password stays empty.
    """
    match = _URL_SCHEME.match(dsn)
    if match is not None:
        return _SECRET_QUERY.sub(rf"\g<key>{REDACTED}", _redact_userinfo(dsn, match.end()))

    if "=" not in dsn and "@" in dsn:
        # Looks like "user:password@host/db" without a scheme.
        return _redact_userinfo(dsn, 0)

    return _SECRET_KEYWORD.sub(rf"\g<key>{REDACTED}", dsn)


def _redact_userinfo(dsn: str, authority_start: int) -> str:
    query_start = dsn.find("?", authority_start)
    before_query = dsn[: query_start if query_start != -1 else len(dsn)]
    at = before_query.rfind("@")
    if at < authority_start:
        return dsn

    userinfo = dsn[authority_start:at]
    user, colon, password = userinfo.partition(":")
    if not colon or not password:
        return dsn
    return f"{dsn[:authority_start]}{user}:{REDACTED}{dsn[at:]}"


def describe_dsn(dsn: str) -> str:
    """Describe where ``dsn`` connects, in a short text that never contains the password.

    Examples: ``127.0.0.1:5432/mydb as root``; ``embedded server in /var/lib/pgskewer/pg18``
    for a socket directory that is a PostgreSQL data folder (it contains ``PG_VERSION``);
    ``socket /run/postgresql, database app as root`` for other socket directories. A DSN
    that cannot be parsed is described by its redacted text.
    """
    try:
        parts = urlsplit(normalize_dsn(dsn))
        query = _parse_query(parts.query)
    except ValueError:
        return redact_dsn(dsn.strip())

    userinfo, _, hosts = parts.netloc.rpartition("@")
    user = query.get("user") or unquote(userinfo.partition(":")[0])
    database = query.get("dbname") or query.get("database") or unquote(parts.path.lstrip("/"))
    host = query.get("host") or unquote(hosts)

    if host.startswith("/"):
        return _describe_socket(host, database, user)

    where = host or "default host"
    if ":" not in where.rpartition("]")[2] and "," not in where:
        where += ":" + query.get("port", "5432")
    text = f"{where}/{database}" if database else where
    return f"{text} as {user}" if user else text


def _describe_socket(directory: str, database: str, user: str) -> str:
    if _is_data_folder(directory):
        text = f"embedded server in {directory}"
        if database and database != "postgres":
            text += f", database {database}"
        if user and user != "postgres":
            text += f" as {user}"
        return text

    text = f"socket {directory}"
    if database:
        text += f", database {database}"
    return f"{text} as {user}" if user else text


def _is_data_folder(directory: str) -> bool:
    try:
        return (Path(directory) / "PG_VERSION").is_file()
    except OSError:  # for example a folder of another user that this user may not search
        return False


def _parse_query(query: str) -> dict[str, str]:
    values: dict[str, str] = {}
    for item in query.split("&"):
        if not item:
            continue
        key, _, value = item.partition("=")
        values[unquote(key)] = unquote(value)
    return values
