"""A worker process for the fault tests: ``python worker_app.py DSN [options]``.

It serves the three-step pipeline ``three`` (steps ``s1``, ``s2``, ``s3``), the task
``blocker`` that blocks its event loop with ``time.sleep``, and the task ``chatty`` that
prints lines. Every step execution inserts a row into ``fault_executions`` before doing
its work, so a test can count how often each step ran.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import sys
import time
from typing import Any

import asyncpg

from pgskewer import connect
from pgskewer.worker import run_worker
from pgskewer.workers import is_connection_lost

EXECUTIONS_DDL = """
CREATE TABLE IF NOT EXISTS fault_executions (
    id bigserial PRIMARY KEY,
    run_id bigint NOT NULL,
    path text NOT NULL,
    pid integer NOT NULL,
    started timestamptz NOT NULL DEFAULT now()
)
"""


def step_identity(payload: bytes | None, job_id: int) -> tuple[int, str]:
    """Return ``(run id, step path)`` of a pipeline step or a one-step task run."""
    data: Any = json.loads(payload) if payload else None
    if isinstance(data, dict) and isinstance(data.get("pipeline"), dict):
        return int(data["pipeline"]["run_id"]), str(data["pipeline"]["step"])
    return job_id, "1"


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("dsn")
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--heartbeat-timeout", type=float, default=600.0)
    parser.add_argument("--step-seconds", type=float, nargs=2, default=(0.2, 0.8))
    parser.add_argument("--block-seconds", type=float, default=8.0)
    options = parser.parse_args()
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format=f"%(asctime)s {os.getpid()} %(name)s %(levelname)s %(message)s",
    )

    side = await asyncpg.create_pool(options.dsn, min_size=1, max_size=4)
    queuer = await connect(options.dsn, pool_size=options.concurrency + 4)

    async def record(job: Any) -> tuple[int, str]:
        # Retried through database outages, so that the steps themselves never fail.
        run_id, path = step_identity(job.payload, job.id)
        deadline = time.monotonic() + 60
        while True:
            try:
                await side.execute(
                    "INSERT INTO fault_executions (run_id, path, pid) VALUES ($1, $2, $3)",
                    run_id,
                    path,
                    os.getpid(),
                )
                return run_id, path
            except Exception as exc:
                if not is_connection_lost(exc) or time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.5)

    def make_step(name: str) -> Any:
        async def step(job: Any) -> dict[str, Any]:
            run_id, path = await record(job)
            await asyncio.sleep(random.uniform(*options.step_seconds))
            return {"step": name, "run": run_id, "path": path}

        return step

    for name in ("s1", "s2", "s3"):
        queuer.entrypoint(name)(make_step(name))
    queuer.entrypoint_pipeline("three", "s1", "s2", "s3")

    @queuer.entrypoint("blocker")
    async def blocker(job: Any) -> str:
        await record(job)
        time.sleep(options.block_seconds)  # blocks the event loop on purpose
        return "unblocked"

    @queuer.entrypoint("chatty", capture_output=True)
    async def chatty(job: Any) -> int:
        run_id, _path = await record(job)
        count = int(json.loads(job.payload)["lines"]) if job.payload else 10
        for index in range(count):
            print(f"line {index} of run {run_id}")
            await asyncio.sleep(0.1)
        return count

    try:
        await run_worker(
            queuer,
            concurrency=options.concurrency,
            dequeue_timeout=1.0,
            heartbeat_timeout=options.heartbeat_timeout,
        )
    finally:
        await queuer.close()
        await side.close()


if __name__ == "__main__":
    asyncio.run(main())
