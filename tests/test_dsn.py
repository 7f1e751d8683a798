"""DSN discovery, normalisation, redaction and descriptions, as pure string handling."""

from __future__ import annotations

from pathlib import Path

import pytest

from pgskewer.dsn import SecretDsn, describe_dsn, discover_dsn, normalize_dsn, redact_dsn

SENTINEL = "s3cr3t-SENTINEL"

# Every form of DSN that carries the sentinel password somewhere.
SECRET_DSNS = [
    f"postgresql://app:{SENTINEL}@db.internal:5432/app",
    f"postgres://app:{SENTINEL}@db.internal/app",
    f"postgresql+asyncpg://app:{SENTINEL}@127.0.0.1/app",
    f"postgresql+psycopg://app:{SENTINEL}@127.0.0.1/app",
    f"postgresql://app@127.0.0.1/app?password={SENTINEL}",
    f"postgresql://app@127.0.0.1/app?sslmode=require&password={SENTINEL}&application_name=x",
    f"postgresql://app:{SENTINEL}@/app?host=/run/postgresql",
    f"host=127.0.0.1 dbname=app user=app password={SENTINEL}",
    f"host=127.0.0.1 dbname=app user=app password = '{SENTINEL}'",
    f"host=127.0.0.1 password='{SENTINEL} with space' dbname=app",
    f"host=127.0.0.1 dbname=app sslpassword={SENTINEL}",
    f"mysql://app:{SENTINEL}@127.0.0.1/app",
    f"app:{SENTINEL}@127.0.0.1:5432/app",
]


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, None),
        ({"PGSKEWER_DSN": "postgresql://a@h1/x"}, "postgresql://a@h1/x"),
        (
            {"PGSKEWER_DSN": "postgresql://a@h1/x", "DATABASE_URL": "postgresql://b@h2/y"},
            "postgresql://a@h1/x",
        ),
        ({"DATABASE_URL": "postgres://b@h2/y", "PGHOST": "h3"}, "postgresql://b@h2/y"),
        ({"PGSKEWER_DSN": "  ", "DATABASE_URL": "postgresql://b@h2/y"}, "postgresql://b@h2/y"),
        ({"PGHOST": "h3", "PGPORT": "5433", "PGDATABASE": "z"}, "postgresql://h3:5433/z"),
        ({"PGUSER": "me", "PGPASSWORD": "pw"}, "postgresql://me:pw@/"),
        ({"PGDATABASE": "z", "PGSSLMODE": "require"}, "postgresql:///z?sslmode=require"),
        ({"PGHOST": "/run/postgresql", "PGUSER": "me"}, "postgresql://me@/?host=/run/postgresql"),
        ({"PGPASSWORD": "pw", "PGPORT": "5433"}, None),
        ({"PGSERVICE": "main"}, None),
    ],
)
def test_discover_dsn_order(environ: dict[str, str], expected: str | None) -> None:
    assert discover_dsn(environ) == expected


def test_discover_dsn_names_bad_variable() -> None:
    environ = {"DATABASE_URL": f"mysql://app:{SENTINEL}@127.0.0.1/app"}

    with pytest.raises(ValueError, match="DATABASE_URL") as raised:
        discover_dsn(environ)

    assert "PGSKEWER_DSN" in str(raised.value)
    assert SENTINEL not in str(raised.value)


def test_discover_dsn_reads_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGSKEWER_DSN", "postgres://env@h/db")

    assert discover_dsn() == "postgresql://env@h/db"


@pytest.mark.parametrize(
    ("dsn", "expected"),
    [
        ("postgresql://u:p@h:5432/db", "postgresql://u:p@h:5432/db"),
        ("  postgresql://u@h/db  ", "postgresql://u@h/db"),
        ("postgres://u:p@h/db", "postgresql://u:p@h/db"),
        ("postgresql+asyncpg://u:p@h/db", "postgresql://u:p@h/db"),
        ("postgresql+psycopg://u:p@h/db?sslmode=require", "postgresql://u:p@h/db?sslmode=require"),
        ("postgresql+psycopg2://u@h/db", "postgresql://u@h/db"),
        ("POSTGRESQL://u@h/db", "postgresql://u@h/db"),
        ("host=127.0.0.1 port=5433 dbname=app user=me", "postgresql://me@127.0.0.1:5433/app"),
        ("host=/run/postgresql dbname=app", "postgresql:///app?host=/run/postgresql"),
        (
            "host=/run/postgresql port=5433 dbname=app",
            "postgresql:///app?host=/run/postgresql&port=5433",
        ),
        ("host = h   dbname = 'my db'", "postgresql://h/my%20db"),
        ("user=me password='it\\'s a@b' host=h", "postgresql://me:it%27s%20a%40b@h/"),
        ("host=h dbname=app sslmode=require", "postgresql://h/app?sslmode=require"),
        ("host=a,b port=5432,5433 dbname=app", "postgresql://a:5432,b:5433/app"),
        ("host=::1 dbname=app", "postgresql://[::1]/app"),
    ],
)
def test_normalize_dsn_forms(dsn: str, expected: str) -> None:
    assert normalize_dsn(dsn) == expected


@pytest.mark.parametrize(
    ("dsn", "message"),
    [
        (f"mysql://app:{SENTINEL}@h/db", "unsupported DSN scheme 'mysql'"),
        (f"http://app:{SENTINEL}@h/db", "unsupported DSN scheme 'http'"),
        ("just-a-hostname", "expected a postgresql:// URL"),
        (f"host=h password='{SENTINEL}", "no closing quote"),
        (f"host=h password={SENTINEL} =oops", "expected keyword=value"),
        (f"host=a,b,c port=1,2 password={SENTINEL}", "3 hosts but 2 ports"),
    ],
)
def test_normalize_dsn_rejects(dsn: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as raised:
        normalize_dsn(dsn)

    assert SENTINEL not in str(raised.value)


def test_normalize_dsn_error_shows_fix() -> None:
    with pytest.raises(ValueError, match=r"use a postgresql://user:password@host") as raised:
        normalize_dsn(f"mysql://app:{SENTINEL}@h/db")

    assert "mysql://app:***@h/db" in str(raised.value)


@pytest.mark.parametrize("dsn", SECRET_DSNS)
def test_redact_dsn_hides_password(dsn: str) -> None:
    redacted = redact_dsn(dsn)

    assert SENTINEL not in redacted
    assert "***" in redacted


@pytest.mark.parametrize(
    ("dsn", "expected"),
    [
        (f"postgresql://app:{SENTINEL}@h:5432/app", "postgresql://app:***@h:5432/app"),
        (
            f"postgresql://app@h/app?password={SENTINEL}&x=1",
            "postgresql://app@h/app?password=***&x=1",
        ),
        (f"host=h password={SENTINEL} dbname=app", "host=h password=*** dbname=app"),
        (f"postgresql://:{SENTINEL}@h/app", "postgresql://:***@h/app"),
        ("postgresql://postgres:@/postgres?host=/x", "postgresql://postgres:@/postgres?host=/x"),
        ("postgresql://app@h/app", "postgresql://app@h/app"),
        ("host=h dbname=app", "host=h dbname=app"),
    ],
)
def test_redact_dsn_keeps_the_rest(dsn: str, expected: str) -> None:
    assert redact_dsn(dsn) == expected


def test_redact_dsn_unencoded_specials() -> None:
    # A password with raw "@" or "/" is invalid in a URL, but must still not leak.
    for password in (f"a@{SENTINEL}", f"{SENTINEL}/x", f"{SENTINEL}@b/c"):
        redacted = redact_dsn(f"postgresql://app:{password}@h/app")

        assert SENTINEL not in redacted
        assert redacted.endswith("@h/app")


@pytest.mark.parametrize("dsn", SECRET_DSNS)
def test_describe_dsn_hides_password(dsn: str) -> None:
    assert SENTINEL not in describe_dsn(dsn)


@pytest.mark.parametrize(
    ("dsn", "expected"),
    [
        (f"postgresql://root:{SENTINEL}@127.0.0.1:5432/mydb", "127.0.0.1:5432/mydb as root"),
        (f"postgres://root:{SENTINEL}@127.0.0.1/mydb", "127.0.0.1:5432/mydb as root"),
        ("postgresql://127.0.0.1:5433/mydb", "127.0.0.1:5433/mydb"),
        ("postgresql:///mydb", "default host:5432/mydb"),
        ("postgresql://[::1]:5432/db?user=me", "[::1]:5432/db as me"),
        (
            f"host=/run/postgresql dbname=app user=me password={SENTINEL}",
            "socket /run/postgresql, database app as me",
        ),
    ],
)
def test_describe_dsn_text(dsn: str, expected: str) -> None:
    assert describe_dsn(dsn) == expected


def test_describe_dsn_embedded_folder(tmp_path: Path) -> None:
    pgdata = tmp_path / "pg18"
    pgdata.mkdir()
    (pgdata / "PG_VERSION").write_text("18\n")

    default = describe_dsn(f"postgresql://postgres:@/postgres?host={pgdata}")
    other = describe_dsn(f"postgresql://postgres:{SENTINEL}@/jobs?host={pgdata}")

    assert default == f"embedded server in {pgdata}"
    assert other == f"embedded server in {pgdata}, database jobs"


def test_describe_dsn_unparsable_is_redacted() -> None:
    described = describe_dsn(f"mysql://app:{SENTINEL}@h/db")

    assert described == "mysql://app:***@h/db"


def test_secret_dsn_repr_and_str() -> None:
    secret = SecretDsn(f"postgresql://app:{SENTINEL}@h/app")

    assert SENTINEL not in repr(secret)
    assert SENTINEL not in str(secret)
    assert SENTINEL not in f"{secret}"
    assert SENTINEL not in repr([secret])
    assert secret.get_secret_value() == f"postgresql://app:{SENTINEL}@h/app"
    assert secret == SecretDsn(f"postgresql://app:{SENTINEL}@h/app")
