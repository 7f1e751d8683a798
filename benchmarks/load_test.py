"""Load test: many three-step pipelines across several worker processes, next to bare pgqueuer.

    .venv/bin/python benchmarks/load_test.py --runs 10000 --workers 4

It creates its own database on the server named by ``PGSKEWER_BENCH_DSN`` (default
``postgresql://postgres@127.0.0.1:5432/postgres``, which must be on this host) and drops
it at the end. Two phases run in that database, one after the other:

1. bare pgqueuer: ``3 × runs`` no-op jobs enqueued up front and drained by ``--workers``
   processes. Each runs a ``PgQueuer`` shaped like pgskewer's worker: batch 5, at most 10
   jobs in flight, an asyncpg pool. Then 200 jobs run one at a time, each waited for with
   pgqueuer's ``CompletionWatcher``.
2. pgskewer: ``runs`` pipelines of three no-op steps enqueued up front, run by
   ``--workers`` processes of ``run_worker(concurrency=10)``; then 100 pipelines one at a
   time, each waited for with ``result()``.

Reported: throughput (jobs or steps per second, from the first enqueue to the last
completion), latency per step, results stored and lost, steps that ran more than once
(``attempts > 1``), and each worker process's RSS, which the workers write to a side
table every second. Every phase has a deadline (``--timeout``), and every process this
script starts is killed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import asyncpg
from _common import ADMIN_DSN, Stats, print_table, throwaway_database

SEQUENTIAL_BARE = 200
SEQUENTIAL_PGSKEWER = 100
ENQUEUE_CONCURRENCY = 16
RSS_DDL = """
CREATE TABLE IF NOT EXISTS load_rss (
    pid integer NOT NULL,
    kind text NOT NULL,
    rss bigint NOT NULL,
    at timestamptz NOT NULL DEFAULT now()
)
"""


def _rss_bytes() -> int:
    with open(f"/proc/{os.getpid()}/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def _report_rss(dsn: str, kind: str) -> None:
    connection = await asyncpg.connect(dsn)
    try:
        while True:
            await connection.execute(
                "INSERT INTO load_rss (pid, kind, rss) VALUES ($1, $2, $3)",
                os.getpid(),
                kind,
                _rss_bytes(),
            )
            await asyncio.sleep(1.0)
    finally:
        await connection.close()


# -- worker processes -------------------------------------------------------------


async def bare_worker(dsn: str) -> None:
    """Drain no-op jobs with pgqueuer alone until SIGTERM."""
    from pgqueuer import AsyncpgPoolDriver, PgQueuer

    pool = await asyncpg.create_pool(dsn, min_size=2, max_size=10)
    pgq = PgQueuer(AsyncpgPoolDriver(pool))

    @pgq.entrypoint("noop")
    async def noop(_job: Any) -> None:
        return None

    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, pgq.shutdown.set)
    reporter = asyncio.create_task(_report_rss(dsn, "pgqueuer"))
    try:
        await pgq.qm.run(
            dequeue_timeout=timedelta(seconds=2),
            batch_size=5,
            max_concurrent_tasks=10,
        )
    finally:
        reporter.cancel()
        await pool.close()


async def pgskewer_worker(dsn: str) -> None:
    """Run no-op pipeline steps with pgskewer's worker until SIGTERM."""
    from pgskewer import connect
    from pgskewer.worker import drain, run_worker

    queuer = await connect(dsn, pool_size=12)
    define_pipeline(queuer)
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, lambda: loop.create_task(drain(queuer, 5.0)))
    reporter = asyncio.create_task(_report_rss(dsn, "pgskewer"))
    try:
        await run_worker(queuer, concurrency=10)
    finally:
        reporter.cancel()
        await queuer.close()


def define_pipeline(queuer: Any) -> None:
    """Register the no-op steps ``a``, ``b``, ``c`` and the pipeline ``abc``."""
    for name in ("a", "b", "c"):

        async def step(_job: Any) -> int:
            return 1

        queuer.entrypoint(name)(step)
    queuer.entrypoint_pipeline("abc", "a", "b", "c")


# -- phases ----------------------------------------------------------------------------


class Workers:
    """Worker subprocesses of one kind; all are killed by ``stop``."""

    def __init__(self, dsn: str, kind: str, count: int) -> None:
        self.processes = [
            subprocess.Popen(
                [sys.executable, __file__, "--worker", kind, "--dsn", dsn],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for _ in range(count)
        ]

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)


async def _wait_for(connection: Any, query: str, target: int, deadline: float, what: str) -> None:
    while await connection.fetchval(query) < target:
        if time.monotonic() > deadline:
            done = await connection.fetchval(query)
            raise TimeoutError(f"{what}: {done} of {target} done before the deadline")
        await asyncio.sleep(0.2)


async def bare_phase(dsn: str, jobs: int, workers: int, timeout: float) -> dict[str, Any]:
    from pgqueuer import AsyncpgDriver, Queries
    from pgqueuer.core.completion import CompletionWatcher

    connection = await asyncpg.connect(dsn)
    try:
        queries = Queries(AsyncpgDriver(connection))
        started = time.monotonic()
        for offset in range(0, jobs, 1000):
            size = min(1000, jobs - offset)
            await queries.enqueue(["noop"] * size, [None] * size, [0] * size)
        processes = Workers(dsn, "pgqueuer", workers)
        try:
            await _wait_for(
                connection,
                "SELECT count(*) FROM pgqueuer_log WHERE status = 'successful'",
                jobs,
                time.monotonic() + timeout,
                "bare pgqueuer jobs",
            )
            elapsed = time.monotonic() - started
            durations = await _bare_durations(connection)

            latencies = []
            waiter_connection = await asyncpg.connect(dsn)
            try:
                driver = AsyncpgDriver(waiter_connection)
                async with CompletionWatcher(driver, queries=Queries(driver)) as watcher:
                    for _ in range(SEQUENTIAL_BARE):
                        begin = time.perf_counter()
                        [job_id] = await queries.enqueue("noop", None)
                        await asyncio.wait_for(watcher.wait_for(job_id), 30)
                        latencies.append(time.perf_counter() - begin)
            finally:
                await waiter_connection.close()
        finally:
            processes.stop()
        return {"elapsed": elapsed, "durations": durations, "sequential": latencies}
    finally:
        await connection.close()


async def _bare_durations(connection: Any) -> list[float]:
    rows = await connection.fetch(
        "SELECT extract(epoch FROM d.created - p.created) AS seconds "
        "FROM pgqueuer_log AS p JOIN pgqueuer_log AS d ON d.job_id = p.job_id "
        "WHERE p.status = 'picked' AND d.status = 'successful'"
    )
    return [float(row["seconds"]) for row in rows]


async def pgskewer_phase(dsn: str, runs: int, workers: int, timeout: float) -> dict[str, Any]:
    from pgskewer import connect

    queuer = await connect(dsn, pool_size=ENQUEUE_CONCURRENCY + 2)
    try:
        define_pipeline(queuer)
        semaphore = asyncio.Semaphore(ENQUEUE_CONCURRENCY)

        async def enqueue_one(index: int) -> int:
            async with semaphore:
                return int(await queuer.enqueue("abc", {"index": index}))

        started = time.monotonic()
        processes = Workers(dsn, "pgskewer", workers)
        try:
            await asyncio.gather(*(enqueue_one(index) for index in range(runs)))
            async with queuer.pool.acquire() as connection:
                await _wait_for(
                    connection,
                    "SELECT count(*) FROM pgskewer_runs "
                    "WHERE status IN ('successful', 'exception', 'canceled')",
                    runs,
                    time.monotonic() + timeout,
                    "pgskewer runs",
                )
            elapsed = time.monotonic() - started
            async with queuer.pool.acquire() as connection:
                summary = await _pgskewer_summary(connection)

            latencies = []
            for index in range(SEQUENTIAL_PGSKEWER):
                begin = time.perf_counter()
                run_id = await queuer.enqueue("abc", {"sequential": index})
                result = await queuer.result(run_id, timeout=30)
                if result is None or result["status"] != "successful":
                    raise RuntimeError(f"sequential run {run_id} ended {result!r}")
                latencies.append(time.perf_counter() - begin)
        finally:
            processes.stop()
        return {"elapsed": elapsed, "sequential": latencies, **summary}
    finally:
        await queuer.close()


async def _pgskewer_summary(connection: Any) -> dict[str, Any]:
    statuses = {
        row["status"]: row["n"]
        for row in await connection.fetch(
            "SELECT status, count(*) AS n FROM pgskewer_runs GROUP BY status"
        )
    }
    results = await connection.fetchval(
        "SELECT count(*) FROM pgskewer_results WHERE path = '' AND ok"
    )
    repeated = await connection.fetchval(
        "SELECT coalesce(sum(attempts - 1), 0) FROM pgskewer_steps WHERE attempts > 1"
    )
    execution = await connection.fetch(
        "SELECT extract(epoch FROM finished - started) AS seconds FROM pgskewer_steps"
    )
    handoff = await connection.fetch(
        "SELECT extract(epoch FROM n.started - s.finished) AS seconds "
        "FROM pgskewer_steps AS s JOIN pgskewer_steps AS n "
        "ON n.run_id = s.run_id AND n.path = (s.path::int + 1)::text WHERE s.path <> '3'"
    )
    return {
        "statuses": statuses,
        "results": results,
        "repeated": repeated,
        "execution": [float(row["seconds"]) for row in execution],
        "handoff": [float(row["seconds"]) for row in handoff],
    }


async def rss_report(dsn: str, kind: str, first_at: Any, last_at: Any) -> list[list[Any]]:
    """Return per-worker RSS near the two instants, and the change between them."""
    connection = await asyncpg.connect(dsn)
    try:
        rows = []
        pids = await connection.fetch(
            "SELECT DISTINCT pid FROM load_rss WHERE kind = $1 ORDER BY pid", kind
        )
        for row in pids:
            early, late = [
                await connection.fetchval(
                    "SELECT rss FROM load_rss WHERE pid = $1 "
                    "ORDER BY abs(extract(epoch FROM at - $2::timestamptz)) LIMIT 1",
                    row["pid"],
                    instant,
                )
                for instant in (first_at, last_at)
            ]
            change = 100.0 * (late - early) / early
            rows.append([row["pid"], early / 2**20, late / 2**20, change])
        return rows
    finally:
        await connection.close()


async def rss_curve(dsn: str, kind: str) -> list[list[Any]]:
    """Return each worker's RSS (MiB) when 10 %, 20 %, ..., 100 % of the runs had finished."""
    connection = await asyncpg.connect(dsn)
    try:
        finished = [
            row["finished"]
            for row in await connection.fetch(
                "SELECT finished FROM pgskewer_runs WHERE finished IS NOT NULL ORDER BY finished"
            )
        ]
        marks = [finished[max(0, len(finished) * tenth // 10 - 1)] for tenth in range(1, 11)]
        rows = []
        for row in await connection.fetch(
            "SELECT DISTINCT pid FROM load_rss WHERE kind = $1 ORDER BY pid", kind
        ):
            values = [
                await connection.fetchval(
                    "SELECT rss FROM load_rss WHERE pid = $1 "
                    "ORDER BY abs(extract(epoch FROM at - $2::timestamptz)) LIMIT 1",
                    row["pid"],
                    mark,
                )
                / 2**20
                for mark in marks
            ]
            rows.append([row["pid"], *values])
        return rows
    finally:
        await connection.close()


async def instants(dsn: str, runs: int) -> tuple[Any, Any]:
    """Return when the first 1,000 and when all but the last 1,000 runs had finished."""
    connection = await asyncpg.connect(dsn)
    try:
        finished = await connection.fetch(
            "SELECT finished FROM pgskewer_runs WHERE finished IS NOT NULL ORDER BY finished"
        )
        first = finished[min(999, len(finished) - 1)]["finished"]
        last = finished[max(0, min(runs, len(finished)) - 1000)]["finished"]
        return first, last
    finally:
        await connection.close()


async def main(options: argparse.Namespace) -> int:
    from pgskewer import connect

    async with throwaway_database(ADMIN_DSN) as dsn:
        setup = await connect(dsn)
        try:
            await setup.install()
            async with setup.pool.acquire() as connection:
                await connection.execute(RSS_DDL)
        finally:
            await setup.close()

        print(f"{options.runs} runs of 3 steps, {options.workers} worker processes, {dsn}")
        bare = await bare_phase(dsn, 3 * options.runs, options.workers, options.timeout)
        skewer = await pgskewer_phase(dsn, options.runs, options.workers, options.timeout)
        first_at, last_at = await instants(dsn, options.runs)
        rss = await rss_report(dsn, "pgskewer", first_at, last_at)
        curve = await rss_curve(dsn, "pgskewer")

    steps = 3 * options.runs
    print_table(
        "Throughput (all work enqueued up front)",
        ["system", "jobs or steps", "seconds", "per second"],
        [
            ["bare pgqueuer", steps, bare["elapsed"], steps / bare["elapsed"]],
            ["pgskewer", steps, skewer["elapsed"], steps / skewer["elapsed"]],
        ],
    )
    rows = []
    for name, samples in (
        ("bare pgqueuer: picked → done, under load", bare["durations"]),
        ("pgskewer: step started → finished, under load", skewer["execution"]),
        ("pgskewer: step finished → next step started, under load", skewer["handoff"]),
        ("bare pgqueuer: enqueue → completion seen, one at a time", bare["sequential"]),
        (
            "pgskewer: run latency / 3, one at a time",
            [value / 3 for value in skewer["sequential"]],
        ),
    ):
        stats = Stats.of(samples)
        rows.append([name, stats.count, stats.median, stats.p95, stats.maximum])
    print_table("Latency per step (ms)", ["measure", "samples", "median", "p95", "max"], rows)
    print_table(
        "pgskewer outcome",
        ["runs", "statuses", "successful results", "lost", "extra step executions"],
        [
            [
                options.runs,
                json.dumps(skewer["statuses"]),
                skewer["results"],
                options.runs - skewer["results"],
                skewer["repeated"],
            ]
        ],
    )
    print_table(
        "pgskewer worker RSS (MiB): after the first 1,000 runs and before the last 1,000",
        ["pid", "first", "last", "change %"],
        rss,
    )
    print_table(
        "pgskewer worker RSS (MiB) when 10 %, 20 %, ... of the runs had finished",
        ["pid", *(f"{tenth}0 %" for tenth in range(1, 11))],
        curve,
    )
    flat = all(abs(row[3]) <= 10.0 for row in rss)
    lost = options.runs - skewer["results"]
    print(f"\nRSS within ±10 %: {flat}; results lost: {lost}")
    return 0 if flat and lost == 0 else 1


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10_000, help="pipelines to run")
    parser.add_argument("--workers", type=int, default=4, help="worker processes")
    parser.add_argument(
        "--timeout", type=float, default=900.0, help="seconds each phase may take at most"
    )
    parser.add_argument("--worker", choices=("pgqueuer", "pgskewer"), help=argparse.SUPPRESS)
    parser.add_argument("--dsn", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.runs < 1000:
        parser.error("--runs must be at least 1000, so the first and last thousand exist")
    return options


if __name__ == "__main__":
    arguments = parse_arguments()
    if arguments.worker == "pgqueuer":
        asyncio.run(bare_worker(arguments.dsn))
    elif arguments.worker == "pgskewer":
        asyncio.run(pgskewer_worker(arguments.dsn))
    else:
        sys.exit(asyncio.run(main(arguments)))
