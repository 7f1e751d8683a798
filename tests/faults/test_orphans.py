"""Running steps whose pgqueuer job ended without their outcome being stored."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from pgskewer.worker import settle_orphaned_steps

pytestmark = pytest.mark.anyio


async def orphan(queuer: Any, name: str) -> int:
    """Enqueue ``name`` and make its step look like a worker lost it mid-run."""
    run_id = await queuer.enqueue(name)
    async with queuer.pool.acquire() as connection:
        await connection.execute(
            "UPDATE pgskewer_steps SET status = 'running', attempts = 1, "
            "worker_id = gen_random_uuid(), updated = now() - interval '1 minute' "
            "WHERE run_id = $1",
            run_id,
        )
        await connection.execute("DELETE FROM pgqueuer WHERE id = $1", run_id)
    return run_id


async def test_orphan_fails_without_retries(queuer: Any) -> None:
    @queuer.entrypoint("once")
    async def once(_job: Any) -> str:
        return "ran"

    run_id = await orphan(queuer, "once")
    assert await settle_orphaned_steps(queuer) == 1

    result = await queuer.result(run_id, timeout=5)
    assert result is not None
    assert result["status"] == "exception"
    assert result["error"]["type"] == "WorkerLostError"
    assert "lost its database connection" in result["error"]["message"]
    assert "attempt 1" in result["error"]["message"]
    assert await settle_orphaned_steps(queuer) == 0


async def test_orphan_retried_per_policy(queuer: Any) -> None:
    @queuer.entrypoint("twice", retries=1, retry_backoff=0.1)
    async def twice(_job: Any) -> str:
        return "ran"

    run_id = await orphan(queuer, "twice")
    assert await settle_orphaned_steps(queuer) == 1
    state = await queuer.run_status(run_id)
    assert state.steps[0].status.value == "retrying"
    assert state.steps[0].error is not None
    assert state.steps[0].error["type"] == "WorkerLostError"

    worker = asyncio.create_task(queuer.run(concurrency=2))
    try:
        result = await queuer.result(run_id, timeout=20)
    finally:
        queuer.shutdown.set()
        await asyncio.wait_for(worker, 30)
    assert result is not None
    assert result["status"] == "successful"
    assert result["result"] == "ran"
    assert (await queuer.run_status(run_id)).steps[0].attempts == 2


async def test_recent_running_step_left_alone(queuer: Any) -> None:
    @queuer.entrypoint("fresh")
    async def fresh(_job: Any) -> None:
        return None

    run_id = await queuer.enqueue("fresh")
    async with queuer.pool.acquire() as connection:
        await connection.execute(
            "UPDATE pgskewer_steps SET status = 'running', attempts = 1 WHERE run_id = $1",
            run_id,
        )
        await connection.execute("DELETE FROM pgqueuer WHERE id = $1", run_id)
    assert await settle_orphaned_steps(queuer) == 0
    assert (await queuer.run_status(run_id)).steps[0].status.value == "running"
