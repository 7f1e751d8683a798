"""Schema install and upgrade on a real PostgreSQL, including a database made by pgqueuer 0.24."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import pytest
from support.harness import result_of, running_worker

import pgskewer
from pgskewer import ImprovedQueuer, schema
from tests.conftest import socket_or_host

pytestmark = pytest.mark.anyio

IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}

#: Where the virtual environment with pgqueuer 0.24 is kept between test runs.
LEGACY_VENV = Path(os.environ.get("PGSKEWER_TEST_PGQ024_VENV", "/tmp/pgq024-venv"))
LEGACY_REQUIREMENT = "pgqueuer[asyncpg]==0.24.*"


async def catalog_snapshot(connection: asyncpg.Connection) -> dict[str, Any]:
    """Return the definitions and row versions of every object in the public schema.

    Row versions (``xmin``) of catalog rows change whenever an object is altered or
    recreated, even with an identical definition, so equal snapshots mean no DDL ran.
    """
    queries = {
        "relations": "SELECT c.relname, c.relkind::text, c.xmin::text, c.relfilenode "
        "FROM pg_class AS c JOIN pg_namespace AS n ON n.oid = c.relnamespace "
        "WHERE n.nspname = 'public' ORDER BY c.relname",
        "columns": "SELECT table_name, column_name, data_type, column_default, is_nullable "
        "FROM information_schema.columns WHERE table_schema = 'public' "
        "ORDER BY table_name, ordinal_position",
        "indexes": "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = 'public' "
        "ORDER BY indexname",
        "triggers": "SELECT t.tgname, t.oid::bigint, t.xmin::text, pg_get_triggerdef(t.oid) "
        "FROM pg_trigger AS t WHERE NOT t.tgisinternal ORDER BY t.tgname",
        "functions": "SELECT p.proname, p.xmin::text, p.prosrc FROM pg_proc AS p "
        "JOIN pg_namespace AS n ON n.oid = p.pronamespace WHERE n.nspname = 'public' "
        "ORDER BY p.proname",
        "enum_labels": "SELECT t.typname, e.enumlabel FROM pg_enum AS e "
        "JOIN pg_type AS t ON t.oid = e.enumtypid ORDER BY t.typname, e.enumsortorder",
        "meta": "SELECT key, value FROM pgskewer_meta ORDER BY key",
    }
    snapshot: dict[str, Any] = {}
    for name, query in queries.items():
        snapshot[name] = [tuple(row) for row in await connection.fetch(query)]
    return snapshot


async def test_install_twice_changes_nothing(dsn: str) -> None:
    connection = await asyncpg.connect(dsn)
    try:
        first = await schema.install(connection)
        before = await catalog_snapshot(connection)
        second = await schema.install(connection)
        after = await catalog_snapshot(connection)
        plan = await schema.pgqueuer_queries(connection).plan_upgrade()
    finally:
        await connection.close()

    assert first is True
    assert second is False
    assert after == before
    assert list(plan.statements) == []


async def test_queuer_install_twice(queuer: ImprovedQueuer) -> None:
    # The fixture installed once already.
    assert await queuer.install() is False
    async with queuer.pool.acquire() as connection:
        assert await schema.is_installed(connection) is True


def legacy_python() -> Path:
    """Return the Python of the environment with pgqueuer 0.24, building it on first use.

    Skips the test when the environment cannot be built (no package index reachable),
    and fails it instead when ``CI=true``.
    """
    python = LEGACY_VENV / "bin" / "python"
    if (LEGACY_VENV / "ready").exists():
        return python

    # Build next to the final place and rename, so a failed build never leaves a
    # half-made environment that later runs would take for a finished one. The moved
    # environment is used through "python -m pgqueuer": the shebang lines of its
    # scripts still name the build folder.
    building = LEGACY_VENV.with_name(f"{LEGACY_VENV.name}-building-{uuid.uuid4().hex[:8]}")
    try:
        subprocess.run(
            [sys.executable, "-m", "venv", str(building)],
            check=True,
            capture_output=True,
            timeout=120,
        )
        subprocess.run(
            [str(building / "bin" / "python"), "-m", "pip", "install", "-q", LEGACY_REQUIREMENT],
            check=True,
            capture_output=True,
            text=True,
            timeout=300,
        )
        (building / "ready").write_text(LEGACY_REQUIREMENT + "\n")
        shutil.rmtree(LEGACY_VENV, ignore_errors=True)
        building.rename(LEGACY_VENV)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
        shutil.rmtree(building, ignore_errors=True)
        output = getattr(exc, "stderr", "") or ""
        reason = f"cannot build a venv with {LEGACY_REQUIREMENT}: {exc}; {output[-500:]}"
        if IN_CI:
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)
    return python


def run_legacy_pgq(dsn: str, *arguments: str) -> subprocess.CompletedProcess[str]:
    parts = urlsplit(dsn)
    environment = {
        **os.environ,
        "PGHOST": socket_or_host(dsn),
        "PGPORT": str(parts.port or 5432),
        "PGUSER": parts.username or "postgres",
        "PGDATABASE": parts.path.lstrip("/"),
    }
    if parts.password:
        environment["PGPASSWORD"] = parts.password
    # pgqueuer 0.24 joins host and port into a URL, which fails for a socket folder;
    # a DSN of its own reaches the embedded server too.
    environment["PGDSN"] = dsn
    completed = subprocess.run(
        [str(legacy_python()), "-m", "pgqueuer", *arguments],
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 0, (
        f"pgq {' '.join(arguments)} of pgqueuer 0.24 failed: {completed.stderr[-2000:]}"
    )
    return completed


async def build_legacy_database(dsn: str) -> list[tuple[Any, ...]]:
    """Create the schema of pgqueuer 0.24 and the result table of the older pgskewer.

    Returns the rows put in the result table.
    """
    run_legacy_pgq(dsn, "install")
    run_legacy_pgq(dsn, "queue", "legacy_task", '{"from": "0.24"}')

    connection = await asyncpg.connect(dsn)
    try:
        # The older pgskewer added a status of its own to pgqueuer's enum and kept
        # results in a table keyed by job id.
        await connection.execute("ALTER TYPE pgqueuer_status ADD VALUE 'spawned'")
        await connection.execute(
            """
            CREATE TABLE pgqueuer_result (
                job_id bigint PRIMARY KEY,
                status pgqueuer_status NOT NULL,
                created timestamptz NOT NULL DEFAULT now(),
                entrypoint text NOT NULL,
                result jsonb
            )
            """
        )
        await connection.execute(
            "INSERT INTO pgqueuer_result (job_id, status, entrypoint, result) VALUES "
            "(101, 'successful', 'old_task', '{\"answer\": 42}'), "
            "(102, 'exception', 'old_task', '{\"error\": \"boom\"}'), "
            "(103, 'spawned', 'old_pipeline', '[104, 105]')"
        )
        await connection.execute(
            "INSERT INTO pgqueuer_log (job_id, status, priority, entrypoint) "
            "VALUES (103, 'spawned', 0, 'old_pipeline')"
        )
        return [tuple(row) for row in await connection.fetch(LEGACY_ROWS)]
    finally:
        await connection.close()


LEGACY_ROWS = (
    "SELECT job_id, status::text, entrypoint, result::text FROM pgqueuer_result ORDER BY job_id"
)


async def test_upgrade_from_pgqueuer_024(dsn: str) -> None:
    legacy_rows = await build_legacy_database(dsn)
    pgq = await pgskewer.connect(dsn)
    try:
        changed = await pgq.install()
        changed_again = await pgq.install()

        @pgq.entrypoint("legacy_task")
        async def legacy_task(job: Any) -> Any:
            return pgskewer.parse_payload(job.payload)

        @pgq.entrypoint("fresh_task")
        async def fresh_task(job: Any) -> str:
            return "runs on the upgraded schema"

        async with pgq.pool.acquire() as connection:
            [legacy_job] = await connection.fetch("SELECT id FROM pgqueuer")
            id_type = await connection.fetchval(
                "SELECT data_type FROM information_schema.columns "
                "WHERE table_name = 'pgqueuer' AND column_name = 'id'"
            )
            labels = await connection.fetchval(
                "SELECT array_agg(enumlabel::text ORDER BY enumsortorder) FROM pg_enum "
                "WHERE enumtypid = 'pgqueuer_status'::regtype"
            )
            plan = await schema.pgqueuer_queries(connection).plan_upgrade()

        async with running_worker(pgq):
            fresh_run = await pgq.enqueue("fresh_task")
            fresh = await result_of(pgq, fresh_run)
            legacy = await result_of(pgq, legacy_job["id"])

        async with pgq.pool.acquire() as connection:
            rows_after = [tuple(row) for row in await connection.fetch(LEGACY_ROWS)]
    finally:
        await pgq.close()

    assert changed is True
    assert changed_again is False
    assert id_type == "bigint"
    assert "spawned" in labels
    assert "failed" in labels
    assert list(plan.statements) == []
    assert rows_after == legacy_rows
    assert fresh == {"status": "successful", "ok": True, "result": "runs on the upgraded schema"}
    assert legacy == {"status": "successful", "ok": True, "result": {"from": "0.24"}}
