"""The scenario shared by the restart and connection-termination tests."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio

from pgskewer.workers import list_workers
from tests.faults.conftest import WorkerProcesses, wait_no_picked_jobs

RUNS = 40
CHATTY_LINES = 80


async def run_through_outage(
    client: Any, workers: WorkerProcesses, outage: Callable[[], Awaitable[None]]
) -> dict[str, Any]:
    """Run pipelines and a chatty task on two workers, cause ``outage`` mid-run, collect.

    Returns the results, the lines ``logs(follow=True)`` yielded with their arrival time,
    and the time the outage ended.
    """
    for _ in range(2):
        workers.start()
    async with client.pool.acquire() as connection:
        with anyio.fail_after(30):
            while await connection.fetchval("SELECT count(*) FROM pgskewer_workers") < 2:
                await asyncio.sleep(0.1)

    run_ids = [await client.enqueue("three", {"index": index}) for index in range(RUNS)]
    chatty = await client.enqueue("chatty", {"lines": CHATTY_LINES})
    waiters = [asyncio.create_task(client.result(run_id)) for run_id in [*run_ids, chatty]]
    lines: list[tuple[str, float]] = []

    async def follow() -> None:
        async for line in client.logs(chatty, follow=True):
            lines.append((line.text, time.monotonic()))

    follower = asyncio.create_task(follow())
    await asyncio.sleep(2.0)
    await outage()
    outage_ended = time.monotonic()

    await asyncio.wait(waiters, timeout=90)
    if not all(waiter.done() for waiter in waiters):
        raise AssertionError(f"runs still waited for: {await _describe_state(client)}")
    results = [waiter.result() for waiter in waiters]
    with anyio.fail_after(30):
        await follower
    async with client.pool.acquire() as connection:
        picked = await wait_no_picked_jobs(connection)
        registered = await list_workers(connection, client.settings)
        active = await connection.fetchval(
            "SELECT count(*) FROM pgskewer_steps WHERE status NOT IN "
            "('successful', 'exception', 'canceled', 'skipped')"
        )
    return {
        "results": results,
        "chatty": chatty,
        "lines": lines,
        "outage_ended": outage_ended,
        "picked": picked,
        "active_steps": active,
        "workers": registered,
    }


def check_outcome(outcome: dict[str, Any], logs: str) -> None:
    """Assert what every outage test expects: definite ends and resumed waiters."""
    results = outcome["results"]
    statuses = [result["status"] for result in results]
    assert all(status in ("successful", "exception", "canceled") for status in statuses)
    failures = [result.get("error") for result in results if result["status"] != "successful"]
    assert statuses.count("successful") == len(results), (failures, logs)
    assert outcome["picked"] == 0
    assert outcome["active_steps"] == 0
    arrival = [at for _text, at in outcome["lines"]]
    assert any(at < outcome["outage_ended"] for at in arrival), "no line before the outage"
    assert any(at > outcome["outage_ended"] for at in arrival), "no line after the outage"
    # Both workers re-established their presence: registered, and holding their lock.
    assert len(outcome["workers"]) == 2
    assert all(worker["alive"] for worker in outcome["workers"])
    assert outcome["lines"][-1][0].startswith(f"line {CHATTY_LINES - 1} ")


async def _describe_state(client: Any) -> str:
    async with client.pool.acquire() as connection:
        runs = await connection.fetch(
            "SELECT status, count(*) AS n FROM pgskewer_runs GROUP BY status"
        )
        steps = await connection.fetch(
            "SELECT s.run_id, s.path, s.status, s.job_id, s.attempts, s.worker_id, "
            "q.status AS job_status, q.queue_manager_id FROM pgskewer_steps AS s "
            "LEFT JOIN pgqueuer AS q ON q.id = s.job_id "
            "WHERE s.status NOT IN ('successful', 'exception', 'canceled', 'skipped', 'pending')"
        )
        workers = await connection.fetch("SELECT id, pid, last_seen FROM pgskewer_workers")
    return (
        f"runs {[dict(row) for row in runs]}; unfinished steps {[dict(row) for row in steps]}; "
        f"workers {[dict(row) for row in workers]}"
    )
