"""Waits for the edge-case tests: the moment pgqueuer has recorded a step's job as ended."""

from __future__ import annotations

from typing import Any

from pgskewer import ImprovedQueuer, RunState
from support.harness import wait_until

#: pgqueuer log statuses that mean the job's handler has returned (or never ran).
ENDED_JOB_STATUSES = ["successful", "exception", "canceled", "deleted", "failed"]


async def job_ended(pgq: ImprovedQueuer, job_id: int) -> bool:
    """Whether pgqueuer logged the job as ended, so its handler can change nothing more."""
    async with pgq.pool.acquire() as connection:
        found = await connection.fetchval(
            "SELECT EXISTS (SELECT 1 FROM pgqueuer_log WHERE job_id = $1 "
            "AND status::text = ANY($2::text[]))",
            job_id,
            ENDED_JOB_STATUSES,
        )
    return bool(found)


async def state_after_job_ends(pgq: ImprovedQueuer, run_id: int, path: str) -> RunState:
    """Wait until the job of step ``path`` has a job id and has ended; return the run state.

    A handler stores its step's outcome before it returns, and pgqueuer logs the job only
    after that. So a step that is still active at this point stays active until the
    worker's periodic orphan sweep, at least ten seconds later, settles it or not at all.
    """

    async def job_of_step() -> int | None:
        return (await pgq.run_status(run_id)).step(path).job_id

    job_id = await wait_until(job_of_step, f"step {path} of run {run_id} to get a job")

    async def ended() -> bool:
        return await job_ended(pgq, job_id)

    await wait_until(ended, f"job {job_id} of step {path} to end")
    return await pgq.run_status(run_id)


async def queued_job_priority(pgq: ImprovedQueuer, job_id: int) -> Any:
    """Return pgqueuer's priority of a job that is still in the queue table, or ``None``."""
    async with pgq.pool.acquire() as connection:
        return await connection.fetchval("SELECT priority FROM pgqueuer WHERE id = $1", job_id)
