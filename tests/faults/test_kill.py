"""SIGKILL of worker processes while 200 three-step pipelines run."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
from typing import Any

import anyio
import pytest

from tests.faults.conftest import WorkerProcesses, wait_no_picked_jobs

pytestmark = pytest.mark.anyio

RUNS = 200
WORKERS = 3
KILLS = 10


async def _running_steps_of(connection: Any, pid: int) -> tuple[Any, set[tuple[int, str]]]:
    worker_id = await connection.fetchval(
        "SELECT id FROM pgskewer_workers WHERE pid = $1 ORDER BY started DESC LIMIT 1", pid
    )
    rows = await connection.fetch(
        "SELECT run_id, path FROM pgskewer_steps WHERE worker_id = $1 "
        "AND status IN ('running', 'canceling')",
        worker_id,
    )
    return worker_id, {(row["run_id"], row["path"]) for row in rows}


async def _wait_registered(connection: Any, count: int, timeout: float) -> None:
    with anyio.fail_after(timeout):
        while await connection.fetchval("SELECT count(*) FROM pgskewer_workers") < count:
            await asyncio.sleep(0.1)


async def _measure_takeover(connection_pool: Any, worker_id: Any, killed_at: float) -> float:
    """Return seconds from the kill until another worker removed the dead worker's row."""
    while True:
        async with connection_pool.acquire() as connection:
            gone = not await connection.fetchval(
                "SELECT EXISTS (SELECT 1 FROM pgskewer_workers WHERE id = $1)", worker_id
            )
        if gone:
            return time.monotonic() - killed_at
        await asyncio.sleep(0.05)


async def _describe_picked(client: Any) -> str:
    async with client.pool.acquire() as connection:
        rows = await connection.fetch(
            "SELECT q.id, q.entrypoint, q.queue_manager_id, q.heartbeat, now() AS now, "
            "w.pid, s.run_id, s.path, s.status AS step_status, s.job_id AS step_job "
            "FROM pgqueuer AS q LEFT JOIN pgskewer_workers AS w ON w.id = q.queue_manager_id "
            "LEFT JOIN pgskewer_steps AS s ON s.job_id = q.id WHERE q.status = 'picked'"
        )
        log = await connection.fetch(
            "SELECT job_id, status, created FROM pgqueuer_log WHERE job_id = ANY($1::bigint[]) "
            "ORDER BY id",
            [row["id"] for row in rows],
        )
    return f"picked: {[dict(row) for row in rows]}; log: {[dict(row) for row in log]}"


@pytest.mark.timeout(240)
async def test_killed_workers_lose_no_run(client: Any, workers: WorkerProcesses) -> None:
    rng = random.Random(20261204)
    run_ids = [await client.enqueue("three", {"index": index}) for index in range(RUNS)]
    for _ in range(WORKERS):
        workers.start()

    running_at_kill: set[tuple[int, str]] = set()
    takeover_tasks: list[asyncio.Task[float]] = []
    async with client.pool.acquire() as connection:
        await _wait_registered(connection, WORKERS, timeout=30)
        for _ in range(KILLS):
            await asyncio.sleep(1.0)
            victim = rng.choice(workers.alive())
            # Freeze the victim first, so the steps read below are exactly those it runs.
            os.kill(victim.pid, signal.SIGSTOP)
            await asyncio.sleep(0.1)
            worker_id, running = await _running_steps_of(connection, victim.pid)
            running_at_kill |= running
            workers.kill(victim)
            killed_at = time.monotonic()
            if worker_id is not None:
                takeover_tasks.append(
                    asyncio.create_task(_measure_takeover(client.pool, worker_id, killed_at))
                )
            workers.start()

    results = []
    with anyio.fail_after(150):
        for run_id in run_ids:
            results.append(await client.result(run_id))
    with anyio.fail_after(30):
        takeover_seconds = await asyncio.gather(*takeover_tasks)

    statuses = [result["status"] if result else None for result in results]
    assert statuses.count("successful") == RUNS, workers.logs()

    async with client.pool.acquire() as connection:
        twice = await connection.fetch(
            "SELECT run_id, path, count(*) AS n FROM fault_executions "
            "GROUP BY run_id, path HAVING count(*) > 1"
        )
        executed = await connection.fetchval(
            "SELECT count(DISTINCT (run_id, path)) FROM fault_executions"
        )
        picked = await wait_no_picked_jobs(connection)
    repeated = {(row["run_id"], row["path"]) for row in twice}
    assert executed == RUNS * 3
    assert repeated <= running_at_kill, repeated - running_at_kill
    assert picked == 0, await _describe_picked(client)
    assert max(takeover_seconds) < 5.0, takeover_seconds
    print(
        f"\nkills: {KILLS}, steps running at a kill: {len(running_at_kill)}, "
        f"steps run twice: {len(repeated)}, take-over seconds: "
        f"min {min(takeover_seconds):.2f} / max {max(takeover_seconds):.2f} / "
        f"mean {sum(takeover_seconds) / len(takeover_seconds):.2f}"
    )


@pytest.mark.timeout(120)
async def test_canceling_step_of_dead_worker(client: Any, workers: WorkerProcesses) -> None:
    # A step is 'canceling' from the cancel request until its handler returns. When its
    # worker dies in between, a survivor finishes it canceled, so the run settles.
    for _ in range(2):
        workers.start("--step-seconds", "30", "30")
    run_id = await client.enqueue("three", {"cancel": True})
    async with client.pool.acquire() as connection:
        with anyio.fail_after(30):
            while True:
                pid = await connection.fetchval(
                    "SELECT w.pid FROM pgskewer_steps AS s JOIN pgskewer_workers AS w "
                    "ON w.id = s.worker_id WHERE s.run_id = $1 AND s.status = 'running'",
                    run_id,
                )
                if pid is not None:
                    break
                await asyncio.sleep(0.05)
    victim = next(process for process in workers.alive() if process.pid == pid)
    os.kill(victim.pid, signal.SIGSTOP)

    status = await client.cancel(run_id)
    assert status.value == "canceling"
    state = await client.run_status(run_id)
    assert state.steps[0].status.value == "canceling"
    workers.kill(victim)

    result = await client.result(run_id, timeout=30)
    assert result is not None, workers.logs()
    assert result["status"] == "canceled"
    state = await client.run_status(run_id)
    assert [step.status.value for step in state.steps] == ["canceled", "skipped", "skipped"]
    assert state.steps[0].error is not None
    assert "died while this step was being canceled" in state.steps[0].error["message"]
