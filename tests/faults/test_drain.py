"""Graceful stop of a worker with ``pgskewer.worker.drain``."""

from __future__ import annotations

import asyncio
from typing import Any

import anyio
import pytest

from pgskewer import connect
from pgskewer.worker import drain

pytestmark = pytest.mark.anyio


def register(queuer: Any, started: asyncio.Event, seconds: float) -> None:
    @queuer.entrypoint("sleepy")
    async def sleepy(_job: Any) -> str:
        started.set()
        await asyncio.sleep(seconds)
        return "slept"


async def wait_status(queuer: Any, run_id: int, status: str) -> None:
    with anyio.fail_after(20):
        while (await queuer.run_status(run_id)).steps[0].status.value != status:
            await asyncio.sleep(0.05)


@pytest.mark.timeout(60)
async def test_drain_lets_short_step_finish(queuer: Any) -> None:
    started = asyncio.Event()
    register(queuer, started, 0.5)
    worker = asyncio.create_task(queuer.run(concurrency=2))
    run_id = await queuer.enqueue("sleepy")
    await asyncio.wait_for(started.wait(), 20)

    await drain(queuer, grace=10.0)
    await asyncio.wait_for(worker, 10)

    result = await queuer.result(run_id, timeout=5)
    assert result is not None
    assert result["status"] == "successful"
    assert queuer.releasing is False
    state = await queuer.run_status(run_id)
    assert state.steps[0].attempts == 1


@pytest.mark.timeout(60)
async def test_drain_releases_long_step(dsn: str, queuer: Any) -> None:
    started = asyncio.Event()
    register(queuer, started, 30.0)
    worker = asyncio.create_task(queuer.run(concurrency=2))
    run_id = await queuer.enqueue("sleepy")
    await asyncio.wait_for(started.wait(), 20)

    loop = asyncio.get_running_loop()
    begin = loop.time()
    await drain(queuer, grace=0.5)
    await asyncio.wait_for(worker, 10)
    assert loop.time() - begin < 5.0
    assert queuer.releasing is True

    # The step went back to the queue under a new job, not canceled.
    state = await queuer.run_status(run_id)
    assert state.status.value in ("queued", "running")
    assert state.steps[0].status.value == "queued"
    assert state.steps[0].attempts == 1

    second = await connect(dsn)
    try:
        again = asyncio.Event()
        register(second, again, 0.1)
        other = asyncio.create_task(second.run(concurrency=2))
        result = await second.result(run_id, timeout=20)
        second.shutdown.set()
        await asyncio.wait_for(other, 10)
    finally:
        await second.close()
    assert result is not None
    assert result["status"] == "successful"
    assert (await queuer.run_status(run_id)).steps[0].attempts == 2


async def test_drain_without_worker_sets_shutdown(queuer: Any) -> None:
    await drain(queuer, grace=1.0)
    assert queuer.shutdown.is_set()
