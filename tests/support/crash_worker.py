"""A pgskewer worker process for the crash tests, meant to be killed with SIGKILL.

Usage: ``python crash_worker.py DSN TASK...`` serves the named tasks until it is killed.

Every task inserts a ``start`` row into ``crash_marks``, waits until the test inserts a
row for its run and task into ``crash_gates``, inserts an ``end`` row and returns
``"<task> done"``. From these rows the test reads how often each step started and finished and in
which process, and with the gates it decides when each step may finish. The test creates
both tables before it starts a worker.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from typing import Any

import pgskewer

#: Seconds between two checks of a step's gate.
GATE_POLL_INTERVAL = 0.02


def make_task(pgq: pgskewer.ImprovedQueuer, name: str) -> Any:
    async def task(job: Any) -> str:
        run_id = pgskewer.parse_payload(job.payload)["pipeline"]["run_id"]
        await mark(pgq, run_id, name, "start")
        while not await gate_open(pgq, run_id, name):
            await asyncio.sleep(GATE_POLL_INTERVAL)
        await mark(pgq, run_id, name, "end")
        return f"{name} done"

    return task


async def mark(pgq: pgskewer.ImprovedQueuer, run_id: int, task: str, point: str) -> None:
    async with pgq.pool.acquire() as connection:
        await connection.execute(
            "INSERT INTO crash_marks (run_id, task, point, pid) VALUES ($1, $2, $3, $4)",
            run_id,
            task,
            point,
            os.getpid(),
        )


async def gate_open(pgq: pgskewer.ImprovedQueuer, run_id: int, task: str) -> bool:
    async with pgq.pool.acquire() as connection:
        return bool(
            await connection.fetchval(
                "SELECT EXISTS (SELECT 1 FROM crash_gates WHERE run_id = $1 AND task = $2)",
                run_id,
                task,
            )
        )


async def main(dsn: str, tasks: list[str]) -> None:
    pgq = await pgskewer.connect(dsn, embedded=False)
    for name in tasks:
        pgq.entrypoint(name)(make_task(pgq, name))
    await pgq.run(concurrency=4, dequeue_timeout=0.5)


if __name__ == "__main__":
    logging.basicConfig(
        level=logging.INFO, format=f"%(asctime)s pid {os.getpid()} %(name)s: %(message)s"
    )
    asyncio.run(main(sys.argv[1], sys.argv[2:]))
