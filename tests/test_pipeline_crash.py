"""Worker processes killed with SIGKILL at chosen points of a pipeline, then replaced.

Each step of ``support/crash_worker.py`` records ``start`` and ``end`` in ``crash_marks``
and waits for a gate row in ``crash_gates``, so the test kills a worker at an exact point.
A second worker then finishes the run. The tests check that no step that reached a
terminal status runs again and that only the step that was cut short runs twice. They also
check that the survivor takes the dead worker's job over within seconds, because pgskewer
releases it once the dead worker's advisory lock is free instead of waiting for
pgqueuer's heartbeat timeout.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from support.harness import WAIT, result_of, wait_until

from pgskewer import ImprovedQueuer, Status
from tests.conftest import database_of

pytestmark = pytest.mark.anyio

WORKER_SCRIPT = Path(__file__).parent / "support" / "crash_worker.py"
ALL_TASKS = ["s1", "s2", "s3", "g1", "g2"]

#: Seconds a survivor may take to re-pick a dead worker's job. It checks for dead workers
#: every 2 s, so a later re-pick is a failure.
TAKEOVER_BOUND = 20.0


def report_takeover(point: str, seconds: float) -> None:
    """Print the time from SIGKILL to the survivor's start of the step (shown with -s or -rP)."""
    print(f"take-over after SIGKILL {point}: {seconds:.2f}s from kill to re-pick")


class WorkerProcess:
    """One ``crash_worker.py`` process, with its output in a file under ``tmp_path``."""

    def __init__(self, dsn: str, tasks: list[str], log_path: Path) -> None:
        self.log_path = log_path
        self._log = log_path.open("w")
        environment = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}
        self.process = subprocess.Popen(
            [sys.executable, str(WORKER_SCRIPT), dsn, *tasks],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=environment,
        )
        self.pid = self.process.pid

    def kill(self) -> None:
        """Send SIGKILL and reap the process. Does nothing more when it already ended."""
        if self.process.poll() is None:
            os.kill(self.pid, signal.SIGKILL)
        self.process.wait(timeout=WAIT)
        self._log.close()

    def output(self) -> str:
        return self.log_path.read_text()


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[list[WorkerProcess]]:
    """Worker processes started by a test, each killed by pid at the end."""
    started: list[WorkerProcess] = []
    yield started
    for worker in started:
        worker.kill()


class Crash:
    """The database side of a crash test: side tables, gates, marks and worker start-up."""

    def __init__(self, pgq: ImprovedQueuer, dsn: str, workers: list[WorkerProcess], tmp: Path):
        self.pgq = pgq
        self.dsn = dsn
        self.workers = workers
        self.tmp = tmp

    async def create_tables(self) -> None:
        async with self.pgq.pool.acquire() as connection:
            await connection.execute(
                """
                CREATE TABLE crash_marks (
                    id bigserial PRIMARY KEY,
                    run_id bigint NOT NULL,
                    task text NOT NULL,
                    point text NOT NULL,
                    pid integer NOT NULL,
                    at timestamptz NOT NULL DEFAULT clock_timestamp()
                );
                CREATE TABLE crash_gates (
                    run_id bigint NOT NULL,
                    task text NOT NULL,
                    PRIMARY KEY (run_id, task)
                );
                """
            )

    async def start_worker(self, tasks: list[str] = ALL_TASKS) -> WorkerProcess:
        """Start a worker process and wait until it has registered itself."""
        worker = WorkerProcess(self.dsn, tasks, self.tmp / f"worker-{len(self.workers)}.log")
        self.workers.append(worker)

        async def registered() -> bool:
            assert worker.process.poll() is None, f"worker exited early:\n{worker.output()}"
            async with self.pgq.pool.acquire() as connection:
                return bool(
                    await connection.fetchval(
                        "SELECT count(*) FROM pgskewer_workers WHERE pid = $1", worker.pid
                    )
                )

        await wait_until(registered, f"worker process {worker.pid} to register")
        return worker

    async def open_gates(self, run_id: int, *tasks: str) -> None:
        async with self.pgq.pool.acquire() as connection:
            await connection.executemany(
                "INSERT INTO crash_gates (run_id, task) VALUES ($1, $2)",
                [(run_id, task) for task in tasks],
            )

    async def marks(self, run_id: int) -> list[dict[str, Any]]:
        async with self.pgq.pool.acquire() as connection:
            rows = await connection.fetch(
                "SELECT task, point, pid, at FROM crash_marks WHERE run_id = $1 ORDER BY id",
                run_id,
            )
        return [dict(row) for row in rows]

    async def counts(self, run_id: int, point: str) -> Counter[str]:
        return Counter(mark["task"] for mark in await self.marks(run_id) if mark["point"] == point)

    async def wait_for_mark(
        self, run_id: int, task: str, point: str, *, pid: int | None = None, timeout: float = WAIT
    ) -> dict[str, Any]:
        """Wait for a mark of ``task`` at ``point`` (from process ``pid``, if given)."""

        async def found() -> dict[str, Any] | None:
            for mark in await self.marks(run_id):
                if (mark["task"], mark["point"]) == (task, point) and pid in (None, mark["pid"]):
                    return mark
            return None

        process_note = f" in process {pid}" if pid is not None else ""
        mark: dict[str, Any] = await wait_until(
            found, f"{task} to reach {point}{process_note}", timeout=timeout
        )
        return mark

    async def kill(self, worker: WorkerProcess) -> datetime:
        """SIGKILL ``worker`` and return the database clock right after the kill."""
        worker.kill()
        async with self.pgq.pool.acquire() as connection:
            killed_at: datetime = await connection.fetchval("SELECT clock_timestamp()")
        return killed_at


@pytest.fixture
async def crash(
    queuer: ImprovedQueuer, dsn: str, workers: list[WorkerProcess], tmp_path: Path
) -> Crash:
    """Tables and pipelines for a crash test. The test process itself runs no worker."""
    queuer.entrypoint_pipeline("seq", "s1", "s2", "s3")
    queuer.entrypoint_pipeline("grp", "s1", ["g1", "g2"], "s3")
    crash = Crash(queuer, dsn, workers, tmp_path)
    await crash.create_tables()
    return crash


async def test_kill_inside_step(crash: Crash) -> None:
    first = await crash.start_worker()
    run_id = await crash.pgq.enqueue("seq")
    await crash.open_gates(run_id, "s1")
    await crash.wait_for_mark(run_id, "s2", "start", pid=first.pid)

    second = await crash.start_worker()
    killed_at = await crash.kill(first)
    restart = await crash.wait_for_mark(
        run_id, "s2", "start", pid=second.pid, timeout=TAKEOVER_BOUND
    )
    takeover = (restart["at"] - killed_at).total_seconds()
    report_takeover("inside a step", takeover)
    await crash.open_gates(run_id, "s2", "s3")
    result = await result_of(crash.pgq, run_id)

    state = await crash.pgq.run_status(run_id)
    assert result["status"] == "successful"
    assert await crash.counts(run_id, "start") == {"s1": 1, "s2": 2, "s3": 1}
    assert await crash.counts(run_id, "end") == {"s1": 1, "s2": 1, "s3": 1}
    assert state.step("2").attempts == 2
    assert takeover < 10


async def test_kill_inside_parallel_group(crash: Crash) -> None:
    first = await crash.start_worker()
    run_id = await crash.pgq.enqueue("grp")
    await crash.open_gates(run_id, "s1", "g1")
    await crash.wait_for_mark(run_id, "g2", "start", pid=first.pid)
    await crash.wait_for_mark(run_id, "g1", "end", pid=first.pid)

    async def g1_finished() -> bool:
        return (await crash.pgq.run_status(run_id)).step("2.0").status is Status.SUCCESSFUL

    await wait_until(g1_finished, "g1 to be stored as successful")

    second = await crash.start_worker()
    killed_at = await crash.kill(first)
    restart = await crash.wait_for_mark(
        run_id, "g2", "start", pid=second.pid, timeout=TAKEOVER_BOUND
    )
    takeover = (restart["at"] - killed_at).total_seconds()
    report_takeover("inside a parallel group", takeover)
    await crash.open_gates(run_id, "g2", "s3")
    result = await result_of(crash.pgq, run_id)

    tasks = result["result"]["tasks"]
    assert result["status"] == "successful"
    assert await crash.counts(run_id, "start") == {"s1": 1, "g1": 1, "g2": 2, "s3": 1}
    assert await crash.counts(run_id, "end") == {"s1": 1, "g1": 1, "g2": 1, "s3": 1}
    assert tasks["g1"]["result"] == "g1 done"
    assert tasks["g2"]["result"] == "g2 done"
    assert takeover < 10


async def kill_after_commit(crash: Crash) -> tuple[int, int, dict[str, Any]]:
    """Kill a worker the moment step 2's result is committed, before pgqueuer logs the job.

    A first worker serves only s3 and a second one only s1 and s2, so the killed worker
    never picks s3 and the run can go on without it. Returns the run id, the job id of
    step 2 and that job's row in pgqueuer's queue table right after the kill.
    """
    await crash.start_worker(["s3"])
    doomed = await crash.start_worker(["s1", "s2"])
    listener = await asyncpg.connect(crash.dsn)
    target: dict[str, int] = {}

    def on_event(_connection: Any, _pid: int, _channel: str, payload: str) -> None:
        event = json.loads(payload)
        if (
            event.get("run") == target.get("run")
            and event.get("step") == "2"
            and event.get("status") == "successful"
        ):
            doomed.kill()

    try:
        await listener.add_listener("pgskewer_events", on_event)
        run_id = await crash.pgq.enqueue("seq")
        target["run"] = run_id
        await crash.open_gates(run_id, "s1", "s2")

        async def doomed_gone() -> bool:
            return doomed.process.poll() is not None

        await wait_until(doomed_gone, "the worker to be killed after step 2 finished")
    finally:
        await listener.close()

    state = await crash.pgq.run_status(run_id)
    job_id = state.step("2").job_id
    assert job_id is not None
    async with crash.pgq.pool.acquire() as connection:
        row = await connection.fetchrow(
            "SELECT id, status::text AS status FROM pgqueuer WHERE id = $1", job_id
        )
    return run_id, job_id, dict(row) if row is not None else {}


async def test_kill_after_result_commit(crash: Crash) -> None:
    run_id, job_id, job_row = await kill_after_commit(crash)
    assert job_row == {"id": job_id, "status": "picked"}

    await crash.open_gates(run_id, "s3")
    result = await result_of(crash.pgq, run_id)

    state = await crash.pgq.run_status(run_id)
    assert result["status"] == "successful"
    assert await crash.counts(run_id, "start") == {"s1": 1, "s2": 1, "s3": 1}
    assert state.step("2").attempts == 1


async def test_dead_workers_finished_job_released(crash: Crash) -> None:
    # The job of a step whose result was committed is still picked by the dead worker.
    # The survivors release it, a worker that serves s2 picks it again, and the executor
    # acknowledges it without running the step a second time.
    run_id, job_id, job_row = await kill_after_commit(crash)
    assert job_row == {"id": job_id, "status": "picked"}

    await crash.start_worker()
    await crash.open_gates(run_id, "s3")
    await result_of(crash.pgq, run_id)

    async def job_acknowledged() -> bool:
        async with crash.pgq.pool.acquire() as connection:
            return not await connection.fetchval(
                "SELECT EXISTS (SELECT 1 FROM pgqueuer WHERE id = $1)", job_id
            )

    await wait_until(
        job_acknowledged,
        f"job {job_id} of the dead worker to leave the queue",
        timeout=TAKEOVER_BOUND,
    )
    assert await crash.counts(run_id, "start") == {"s1": 1, "s2": 1, "s3": 1}


async def test_kill_before_first_step(crash: Crash, dsn: str) -> None:
    # The worker picks the first job, but its claim of the step waits on a row lock the
    # test holds, so it dies after pgqueuer's pick and before any step code ran. The
    # server setting makes the dead worker's backend abort that waiting statement
    # within 100 ms instead of finishing it once the lock is released.
    database = database_of(dsn)
    async with crash.pgq.pool.acquire() as connection:
        await connection.execute(
            f"ALTER DATABASE \"{database}\" SET client_connection_check_interval = '100ms'"
        )
    run_id = await crash.pgq.enqueue("seq")
    first_job = (await crash.pgq.run_status(run_id)).step("1").job_id

    locker = await asyncpg.connect(dsn)
    try:
        lock = locker.transaction()
        await lock.start()
        await locker.execute(
            "SELECT 1 FROM pgskewer_steps WHERE run_id = $1 AND path = '1' FOR UPDATE", run_id
        )
        first = await crash.start_worker()

        async def claim_blocked() -> bool:
            async with crash.pgq.pool.acquire() as connection:
                picked = await connection.fetchval(
                    "SELECT status::text FROM pgqueuer WHERE id = $1", first_job
                )
                waiting = await connection.fetchval(
                    "SELECT count(*) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND wait_event_type = 'Lock'"
                )
            return bool(picked == "picked" and waiting == 1)

        await wait_until(claim_blocked, "the first worker to pick the job and wait on the lock")
        second = await crash.start_worker()
        killed_at = await crash.kill(first)

        async def claim_aborted() -> bool:
            async with crash.pgq.pool.acquire() as connection:
                return not await connection.fetchval(
                    "SELECT count(*) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND wait_event_type = 'Lock'"
                )

        await wait_until(claim_aborted, "the dead worker's blocked claim to be aborted")
        await lock.rollback()
    finally:
        await locker.close()

    restart = await crash.wait_for_mark(
        run_id, "s1", "start", pid=second.pid, timeout=TAKEOVER_BOUND
    )
    takeover = (restart["at"] - killed_at).total_seconds()
    report_takeover("before the first step", takeover)
    await crash.open_gates(run_id, "s1", "s2", "s3")
    result = await result_of(crash.pgq, run_id)

    state = await crash.pgq.run_status(run_id)
    assert result["status"] == "successful"
    assert await crash.counts(run_id, "start") == {"s1": 1, "s2": 1, "s3": 1}
    assert state.step("1").attempts == 1
    assert takeover < 10
