"""The README's quick start: a three-step pipeline with results stored in PostgreSQL.

Run it with ``python examples/quickstart.py``. Without ``PGSKEWER_DSN``, ``DATABASE_URL``
or ``PG*`` variables it starts the embedded PostgreSQL server. It prints each step's
status as it changes, then the final payload read back from the database.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys

import pgskewer
from pgskewer import parse_payload


async def main() -> int:
    pgq = await pgskewer.connect()
    await pgq.install()

    @pgq.entrypoint("fetch_data")
    async def fetch_data(job):
        request = parse_payload(job.payload)["initial"] or {}
        await asyncio.sleep(0.3)  # stands for a download
        return {"source": request.get("source", "demo"), "rows": [3, 1, 2]}

    @pgq.entrypoint("process_data")
    async def process_data(job):
        rows = parse_payload(job.payload)["tasks"]["fetch_data"]["result"]["rows"]
        await asyncio.sleep(0.3)
        return {"sorted": sorted(rows), "total": sum(rows)}

    @pgq.entrypoint("store_results")
    async def store_results(job):
        processed = parse_payload(job.payload)["tasks"]["process_data"]["result"]
        await asyncio.sleep(0.3)
        return {"stored": len(processed["sorted"])}

    pgq.entrypoint_pipeline("my_pipeline", fetch_data, "process_data", store_results)

    worker = asyncio.create_task(pgq.run())
    job_id = await pgq.enqueue("my_pipeline", {"source": "demo"})
    print(f"enqueued my_pipeline as run {job_id}")

    shown: dict[str, str] = {}
    async for state in pgq.watch(job_id):
        for step in state.steps:
            if shown.get(step.path) != step.status:
                shown[step.path] = step.status
                print(f"  step {step.path} {step.task:<14} {step.status}")

    result = await pgq.result(job_id, timeout=30)
    print(f"run {job_id} finished: {state.status}")
    for name, task_result in (result or {}).get("result", {}).get("tasks", {}).items():
        print(f"  {name}: {json.dumps(task_result['result'])}")
    print("final payload:")
    print(json.dumps(result, indent=2))

    pgq.shutdown.set()
    await worker
    await pgq.close()
    return 0 if result and result["ok"] else 1


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(name)s %(levelname)s %(message)s")
    sys.exit(asyncio.run(main()))
