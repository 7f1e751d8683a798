"""PostgreSQL restarts and terminated connections while pipelines run."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import pytest

from tests.conftest import database_of
from tests.faults.conftest import TemporaryCluster, WorkerProcesses, prepared_client
from tests.faults.outage import check_outcome, run_through_outage

pytestmark = pytest.mark.anyio


@pytest.mark.timeout(240)
async def test_postgres_restart_mid_run(
    temporary_cluster: TemporaryCluster, tmp_path: Path
) -> None:
    admin = await asyncpg.connect(temporary_cluster.admin_dsn)
    try:
        await admin.execute("CREATE DATABASE faults")
    finally:
        await admin.close()
    dsn = temporary_cluster.admin_dsn.rsplit("/", 1)[0] + "/faults"
    client = await prepared_client(dsn)
    workers = WorkerProcesses(dsn, tmp_path)

    async def restart() -> None:
        await anyio.to_thread.run_sync(temporary_cluster.restart)

    try:
        outcome = await run_through_outage(client, workers, restart)
    finally:
        workers.stop_all()
        await client.close()
    check_outcome(outcome, workers.logs())


@pytest.mark.timeout(240)
async def test_terminated_connections_mid_run(
    dsn: str, client: Any, workers: WorkerProcesses, system_databases: Any
) -> None:
    database = database_of(dsn)
    admin = await asyncpg.connect(system_databases.admin_dsn)

    async def terminate_all() -> None:
        for _ in range(2):
            terminated = await admin.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = $1 AND pid <> pg_backend_pid()",
                database,
            )
            assert terminated > 0
            await asyncio.sleep(1.0)

    try:
        outcome = await run_through_outage(client, workers, terminate_all)
    finally:
        await admin.close()
    check_outcome(outcome, workers.logs())
