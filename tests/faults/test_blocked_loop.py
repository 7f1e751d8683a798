"""A worker whose event loop is blocked is not taken for dead."""

from __future__ import annotations

import asyncio
from typing import Any

import anyio
import pytest

from tests.faults.conftest import WorkerProcesses

pytestmark = pytest.mark.anyio

HEARTBEAT_TIMEOUT = 2.0
BLOCK_SECONDS = 2 * HEARTBEAT_TIMEOUT * 2


@pytest.mark.timeout(120)
async def test_blocked_worker_keeps_its_step(client: Any, workers: WorkerProcesses) -> None:
    arguments = (
        "--heartbeat-timeout",
        str(HEARTBEAT_TIMEOUT),
        "--block-seconds",
        str(BLOCK_SECONDS),
    )
    for _ in range(2):
        workers.start(*arguments)
    async with client.pool.acquire() as connection:
        with anyio.fail_after(30):
            while await connection.fetchval("SELECT count(*) FROM pgskewer_workers") < 2:
                await asyncio.sleep(0.1)
        worker_ids = {
            row["id"] for row in await connection.fetch("SELECT id FROM pgskewer_workers")
        }

    run_id = await client.enqueue("blocker")
    with anyio.fail_after(60):
        result = await client.result(run_id)

    async with client.pool.acquire() as connection:
        executions = await connection.fetchval(
            "SELECT count(*) FROM fault_executions WHERE run_id = $1", run_id
        )
        still_registered = {
            row["id"] for row in await connection.fetch("SELECT id FROM pgskewer_workers")
        }
        picks = await connection.fetchval(
            "SELECT count(*) FROM pgqueuer_log WHERE job_id = $1 AND status = 'picked'", run_id
        )
    assert result is not None
    assert result["status"] == "successful", workers.logs()
    assert result["result"] == "unblocked"
    assert executions == 1, workers.logs()
    assert picks == 1
    assert still_registered == worker_ids
    assert "is gone" not in workers.logs()
