"""Test fixtures: every test run creates its own databases on a real PostgreSQL and drops them.

The server is the one named by ``PGSKEWER_TEST_DSN`` (default: the local server on
127.0.0.1:5432 as user ``postgres``). When it cannot be reached the embedded server is
started instead. With ``CI=true`` a missing system server fails the run instead.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

SYSTEM_DSN = os.environ.get("PGSKEWER_TEST_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}

# Tests choose their databases; DSN variables from the caller's shell must not leak in.
for _name in ("PGSKEWER_DSN", "DATABASE_URL"):
    os.environ.pop(_name, None)

_backends_used: set[str] = set()


def _server_reachable(dsn: str) -> bool:
    async def probe() -> bool:
        try:
            conn = await asyncpg.connect(dsn, timeout=3)
        except (TimeoutError, OSError, asyncpg.PostgresError):
            return False
        await conn.close()
        return True

    return asyncio.run(probe())


def database_of(dsn: str) -> str:
    """Return the database name of a URL DSN, also one with ``?host=/socket/folder``."""
    from urllib.parse import urlsplit

    return urlsplit(dsn).path.lstrip("/")


def socket_or_host(dsn: str) -> str:
    """Return the host of a URL DSN: its ``?host=`` socket folder, or its host name."""
    from urllib.parse import parse_qs, urlsplit

    parts = urlsplit(dsn)
    return parse_qs(parts.query).get("host", [parts.hostname or "127.0.0.1"])[0]


def with_database(dsn: str, database: str) -> str:
    """Return ``dsn`` pointing at ``database`` instead of its own database."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path="/" + database))


class DatabaseFactory:
    """Creates databases named ``pgskewer_test_*`` on one server and drops them at the end."""

    def __init__(self, admin_dsn: str, backend: str) -> None:
        self.admin_dsn = admin_dsn
        self.backend = backend
        self.created: list[str] = []

    def create(self) -> str:
        name = f"pgskewer_test_{uuid.uuid4().hex[:12]}"

        async def create() -> None:
            conn = await asyncpg.connect(self.admin_dsn)
            try:
                await conn.execute(f'CREATE DATABASE "{name}"')
            finally:
                await conn.close()

        asyncio.run(create())
        self.created.append(name)
        _backends_used.add(self.backend)
        return with_database(self.admin_dsn, name)

    def drop_all(self) -> None:
        async def drop() -> None:
            conn = await asyncpg.connect(self.admin_dsn)
            try:
                for name in self.created:
                    await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            finally:
                await conn.close()

        if self.created:
            asyncio.run(drop())
            self.created.clear()


@pytest.fixture(scope="session")
def system_databases() -> Iterator[DatabaseFactory]:
    """Databases on the system server, or on the embedded one when no system server runs."""
    if _server_reachable(SYSTEM_DSN):
        factory = DatabaseFactory(SYSTEM_DSN, "system PostgreSQL at " + _describe(SYSTEM_DSN))
    else:
        try:
            factory = _embedded_factory()
        except Exception as exc:
            # No backend at all: fail loudly, never skip the suite.
            pytest.fail(
                f"no PostgreSQL answers at {_describe(SYSTEM_DSN)} and the embedded server "
                f"failed to start ({exc!r}); start a server or set PGSKEWER_TEST_DSN",
                pytrace=False,
            )
    yield factory
    factory.drop_all()


_embedded: DatabaseFactory | None = None


def _embedded_factory() -> DatabaseFactory:
    global _embedded
    if _embedded is None:
        from pgskewer.embedded import EmbeddedServer

        data_dir = Path(os.environ.get("PGSKEWER_TEST_EMBEDDED_DIR", _default_embedded_dir()))
        server = EmbeddedServer(data_dir)
        dsn = server.start()
        _embedded = DatabaseFactory(dsn, f"embedded PostgreSQL in {data_dir}")
    return _embedded


def _default_embedded_dir() -> str:
    base = "/var/lib/pgskewer" if os.geteuid() == 0 else os.path.expanduser("~/.cache/pgskewer")
    return os.path.join(base, "test")


@pytest.fixture(scope="session")
def embedded_databases() -> Iterator[DatabaseFactory]:
    """Databases on the embedded server, started by the test run itself."""
    try:
        factory = _embedded_factory()
    except Exception as exc:  # the run must fail loudly when this backend is missing
        if IN_CI:
            pytest.fail(f"embedded PostgreSQL failed to start: {exc!r}", pytrace=False)
        pytest.skip(f"embedded PostgreSQL failed to start: {exc!r}")
    yield factory
    factory.drop_all()


@pytest.fixture
def dsn(system_databases: DatabaseFactory) -> str:
    """A fresh, empty database on the test server."""
    return system_databases.create()


@pytest.fixture
def embedded_dsn(embedded_databases: DatabaseFactory) -> str:
    """A fresh, empty database on the embedded server."""
    return embedded_databases.create()


@pytest.fixture
async def queuer(dsn: str) -> AsyncIterator[Any]:
    """An installed ``ImprovedQueuer`` on a fresh database, closed after the test."""
    from pgskewer import connect

    pgq = await connect(dsn)
    await pgq.install()
    try:
        yield pgq
    finally:
        await pgq.close()


def _describe(dsn: str) -> str:
    from urllib.parse import urlsplit

    parts = urlsplit(dsn)
    return f"{parts.hostname}:{parts.port or 5432}"


def pytest_report_header(config: pytest.Config) -> str:
    return (
        f"pgskewer test server: {_describe(SYSTEM_DSN)} (falls back to embedded when unreachable)"
    )


def pytest_terminal_summary(terminalreporter: Any) -> None:
    used = ", ".join(sorted(_backends_used)) or "none"
    terminalreporter.write_line(f"PostgreSQL backends used: {used}")


@pytest.fixture
def anyio_backend() -> str:
    """Run ``@pytest.mark.anyio`` tests on asyncio, the loop pgqueuer and Jupyter use."""
    return "asyncio"
