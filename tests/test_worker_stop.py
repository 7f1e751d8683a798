"""A worker task that is cancelled hands its running step to another worker."""

from __future__ import annotations

import asyncio
from typing import Any

import anyio
import pytest

import pgskewer
from pgskewer import ImprovedQueuer, Status

pytestmark = pytest.mark.anyio


def _register(pgq: ImprovedQueuer, started: list[int], gate: asyncio.Event) -> None:
    @pgq.entrypoint("slow")
    async def slow(job: Any) -> str:
        started.append(1)
        await gate.wait()
        return "done"


async def test_cancelled_worker_releases_step(dsn: str) -> None:
    first = await pgskewer.connect(dsn)
    second = await pgskewer.connect(dsn)
    await first.install()
    first_started: list[int] = []
    second_started: list[int] = []
    never = asyncio.Event()
    released = asyncio.Event()
    released.set()
    _register(first, first_started, never)
    _register(second, second_started, released)

    try:
        worker = asyncio.create_task(first.run())
        run_id = await first.enqueue("slow")
        with anyio.fail_after(30):
            while not first_started:
                await anyio.sleep(0.02)

        worker.cancel()
        with anyio.fail_after(30), pytest.raises(asyncio.CancelledError):
            await worker

        state = await second.run_status(run_id)
        assert state.step("1").status is Status.QUEUED

        other = asyncio.create_task(second.run())
        try:
            result = await second.result(run_id, timeout=30)
        finally:
            second.shutdown.set()
            with anyio.fail_after(30):
                await other
    finally:
        await first.close()
        await second.close()

    assert result is not None
    assert result["result"] == "done"
    assert (await _attempts(dsn, run_id)) == 2


async def _attempts(dsn: str, run_id: int) -> int:
    import asyncpg

    connection = await asyncpg.connect(dsn)
    try:
        value = await connection.fetchval(
            "SELECT attempts FROM pgskewer_steps WHERE run_id = $1 AND path = '1'", run_id
        )
    finally:
        await connection.close()
    return int(value)
