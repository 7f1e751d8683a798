"""Retention: ``pgskewer.prune.prune`` and the worker's periodic prune."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import anyio
import pytest

from pgskewer.prune import prune

pytestmark = pytest.mark.anyio


def register(queuer: Any) -> None:
    @queuer.entrypoint("say")
    async def say(_job: Any) -> str:
        print("hello")
        return "said"

    queuer.entrypoint("say_captured", capture_output=True)(say)
    queuer.entrypoint_pipeline("twice", "say_captured", "say_captured")


async def finished_runs(queuer: Any, count: int) -> list[int]:
    worker = asyncio.create_task(queuer.run(concurrency=4))
    try:
        run_ids = [await queuer.enqueue("twice") for _ in range(count)]
        for run_id in run_ids:
            result = await queuer.result(run_id, timeout=30)
            assert result is not None
            assert result["status"] == "successful"
    finally:
        queuer.shutdown.set()
        await asyncio.wait_for(worker, 30)
        queuer.shutdown.clear()
    return run_ids


async def age(connection: Any, run_ids: list[int], days: int) -> None:
    await connection.execute(
        "UPDATE pgskewer_runs SET created = created - make_interval(days => $2), "
        "finished = finished - make_interval(days => $2) WHERE id = ANY($1::bigint[])",
        run_ids,
        days,
    )
    await connection.execute(
        "UPDATE pgqueuer_log SET created = created - make_interval(days => $1)", days
    )


async def count(connection: Any, table: str, run_ids: list[int]) -> int:
    column = "id" if table == "pgskewer_runs" else "run_id"
    return int(
        await connection.fetchval(
            f"SELECT count(*) FROM {table} WHERE {column} = ANY($1::bigint[])", run_ids
        )
    )


@pytest.mark.timeout(120)
async def test_prune_deletes_only_old_finished(queuer: Any) -> None:
    register(queuer)
    old = await finished_runs(queuer, 3)
    recent = await finished_runs(queuer, 2)
    in_flight = await queuer.enqueue("twice")  # no worker runs: it stays queued

    async with queuer.pool.acquire() as connection:
        await age(connection, [*old, in_flight], days=10)
        await connection.execute(
            "UPDATE pgskewer_runs SET created = created - interval '10 days' WHERE id = $1",
            in_flight,
        )
        lines_before = await count(connection, "pgskewer_log_lines", old)
        counts = await prune(connection, queuer.settings, timedelta(days=7), batch_size=2)

        assert counts["runs"] == 3
        assert counts["steps"] == 6
        assert counts["results"] == 9  # two steps and the run itself, per run
        assert counts["log_lines"] == lines_before
        assert lines_before == 6
        assert counts["pgqueuer_log"] > 0
        for table in ("pgskewer_runs", "pgskewer_steps", "pgskewer_results"):
            assert await count(connection, table, old) == 0
            assert await count(connection, table, recent) > 0
        assert await count(connection, "pgskewer_runs", [in_flight]) == 1
        # The in-flight run's job and its log rows stay, however old.
        assert (
            await connection.fetchval(
                "SELECT count(*) FROM pgqueuer_log WHERE job_id = $1", in_flight
            )
            > 0
        )
        again = await prune(connection, queuer.settings, timedelta(days=7))
    assert again == {"runs": 0, "steps": 0, "results": 0, "log_lines": 0, "pgqueuer_log": 0}
    state = await queuer.run_status(in_flight)
    assert state.status.value == "queued"


async def test_prune_rejects_negative_age(queuer: Any) -> None:
    async with queuer.pool.acquire() as connection:
        with pytest.raises(ValueError, match="must not be negative"):
            await prune(connection, queuer.settings, timedelta(days=-1))


@pytest.mark.timeout(120)
async def test_worker_prunes_periodically(queuer: Any) -> None:
    register(queuer)
    old = await finished_runs(queuer, 2)
    async with queuer.pool.acquire() as connection:
        await age(connection, old, days=3)

    from pgskewer.worker import run_worker

    worker = asyncio.create_task(run_worker(queuer, prune_after=timedelta(days=1)))
    try:
        with anyio.fail_after(20):
            while True:
                async with queuer.pool.acquire() as connection:
                    if await count(connection, "pgskewer_runs", old) == 0:
                        break
                await asyncio.sleep(0.1)
    finally:
        queuer.shutdown.set()
        await asyncio.wait_for(worker, 30)
