"""Latency and throughput of pgskewer pipelines next to bare pgqueuer on the same server.

Run from the repository root: ``python benchmarks/bench_pipelines.py [--quick] [--uvloop]``.
Each round uses two fresh databases (one with only pgqueuer's schema, one with pgskewer's)
and drops them. The worker, the producer and the result waiters share one process and one
event loop, like a notebook session that runs its own worker.

Definitions (all handlers are no-ops):

- bare dispatch: ``queries.enqueue`` called until the handler starts.
- run latency: ``pgq.enqueue`` called until ``await pgq.result`` returns.
- step handoff: ``(latency of a 3-step pipeline - latency of a 1-step pipeline) / 2``, so
  the shared costs (enqueue, first dispatch, final result and wake-up) cancel out. The
  direct handoff is the time from one step's handler starting to the next one starting.
- flatness: median of the last 100 of a series of sequential 3-step runs against the
  median of the first 100, in one worker.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import json
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import timedelta
from typing import Any

import asyncpg
from _common import (
    Stats,
    argument_parser,
    describe_environment,
    print_table,
    run_async,
    server_version,
    spread,
    throwaway_database,
)
from pgqueuer import AsyncpgPoolDriver, PgQueuer
from pgqueuer.models import Job

import pgskewer
from pgskewer import schema

#: Worker shape shared by both sides: ``ImprovedQueuer.run()`` defaults (concurrency 10,
#: so pgqueuer batch size 5 and at most 10 jobs in flight) and pgskewer's default pool.
CONCURRENCY = 10
BATCH_SIZE = CONCURRENCY // 2
POOL_SIZE = pgskewer.queuer.DEFAULT_POOL_SIZE
IN_FLIGHT = 50
FAN_OUT = 10
RESULT_TIMEOUT = 60.0


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Sample counts of one round."""

    warmup: int
    latency: int
    throughput: int
    fan_out: int
    flat: int
    flat_window: int
    census: int


FULL = Sizes(
    warmup=20, latency=200, throughput=600, fan_out=60, flat=1000, flat_window=100, census=20
)
QUICK = Sizes(warmup=10, latency=60, throughput=150, fan_out=15, flat=200, flat_window=50, census=5)


@dataclasses.dataclass
class RoundFigures:
    """Everything one round measured; durations in milliseconds unless a ``Stats``."""

    bare_dispatch: Stats
    bare_jobs_per_second: float
    task: Stats
    pipeline_1: Stats
    pipeline_3: Stats
    direct_handoff: Stats
    first_dispatch: Stats
    finish_to_result: Stats
    pipelines_per_second: float
    fan_out: Stats
    flat_first: float
    flat_last: float
    bare_flat_first: float
    bare_flat_last: float
    round_trips: dict[str, float]

    @property
    def handoff(self) -> float:
        return (self.pipeline_3.median - self.pipeline_1.median) / 2

    @property
    def flat_change(self) -> float:
        return (self.flat_last - self.flat_first) / self.flat_first * 100.0

    @property
    def bare_flat_change(self) -> float:
        return (self.bare_flat_last - self.bare_flat_first) / self.bare_flat_first * 100.0


# -- bare pgqueuer --------------------------------------------------------------------


class Arrivals:
    """Futures resolved with the time a job's handler started, keyed by job id.

    Either side may come first: the handler can start before ``enqueue`` has returned.
    """

    def __init__(self) -> None:
        self._futures: dict[int, asyncio.Future[float]] = {}

    def future(self, job_id: int) -> asyncio.Future[float]:
        found = self._futures.get(job_id)
        if found is None:
            found = asyncio.get_running_loop().create_future()
            self._futures[job_id] = found
        return found

    def arrived(self, job_id: int) -> None:
        future = self.future(job_id)
        if not future.done():
            future.set_result(time.perf_counter())

    async def wait(self, job_id: int) -> float:
        try:
            return await asyncio.wait_for(self.future(job_id), RESULT_TIMEOUT)
        finally:
            self._futures.pop(job_id, None)


class BareWorker:
    """A pgqueuer worker with one no-op entrypoint, shaped like ``ImprovedQueuer.run()``."""

    def __init__(self, pgq: PgQueuer) -> None:
        self.pgq = pgq
        self.arrivals = Arrivals()

    async def dispatch_once(self) -> float:
        """Enqueue one job; return the seconds until its handler started."""
        start = time.perf_counter()
        [job_id] = await self.pgq.qm.queries.enqueue("noop", None)
        return await self.arrivals.wait(int(job_id)) - start


@contextlib.asynccontextmanager
async def bare_worker(dsn: str) -> AsyncIterator[BareWorker]:
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=POOL_SIZE)
    async with pool.acquire() as connection:
        await schema.pgqueuer_queries(connection).apply_upgrade()
    pgq = PgQueuer(AsyncpgPoolDriver(pool))
    bare = BareWorker(pgq)

    @pgq.entrypoint("noop")
    async def record(job: Job) -> None:
        bare.arrivals.arrived(int(job.id))

    worker = asyncio.create_task(
        pgq.run(
            dequeue_timeout=timedelta(seconds=2),
            batch_size=BATCH_SIZE,
            max_concurrent_tasks=CONCURRENCY,
            heartbeat_timeout=timedelta(seconds=600),
        )
    )
    try:
        yield bare
    finally:
        pgq.shutdown.set()
        await asyncio.wait_for(worker, 30)
        await pool.close()


# -- pgskewer ---------------------------------------------------------------------------


class StepStarts:
    """Start time of every step handler that records itself, keyed by (run id, step path)."""

    def __init__(self) -> None:
        self.times: dict[tuple[int, str], float] = {}

    async def record(self, job: Job) -> None:
        now = time.perf_counter()
        assert job.payload is not None
        pipeline = json.loads(job.payload)["pipeline"]
        self.times[(int(pipeline["run_id"]), str(pipeline["step"]))] = now


async def noop(job: Job) -> None:
    return None


@dataclasses.dataclass(frozen=True)
class Timed:
    """One finished run with the times (``time.perf_counter``) around it."""

    run_id: int
    start: float
    end: float

    @property
    def elapsed(self) -> float:
        return self.end - self.start


class SkewerWorker:
    """A pgskewer queuer running its own worker, with no-op tasks and pipelines.

    ``noop``: a task. ``p1``/``p3``: pipelines of 1 and 3 steps whose handler records its
    start. ``fan``: ``noop``, then ``b0`` … ``b9`` in parallel, then ``noop``.
    """

    def __init__(self, queuer: pgskewer.ImprovedQueuer) -> None:
        self.queuer = queuer
        self.starts = StepStarts()
        queuer.entrypoint("noop")(noop)
        queuer.entrypoint("timed")(self.starts.record)
        members = [f"b{index}" for index in range(FAN_OUT)]
        for name in members:
            queuer.entrypoint(name)(noop)
        queuer.entrypoint_pipeline("p1", "timed")
        queuer.entrypoint_pipeline("p3", "timed", "timed", "timed")
        queuer.entrypoint_pipeline("fan", "noop", members, "noop")

    async def run_to_result(self, name: str) -> Timed:
        """Enqueue ``name``, wait for its result, and fail unless the run succeeded."""
        start = time.perf_counter()
        run_id = await self.queuer.enqueue(name)
        result = await self.queuer.result(run_id, timeout=RESULT_TIMEOUT)
        end = time.perf_counter()
        if result is None or not result["ok"]:
            raise RuntimeError(f"run {run_id} of {name} did not succeed: {result!r}")
        return Timed(run_id, start, end)

    def latency_of(self, name: str) -> Callable[[], Awaitable[float]]:
        async def once() -> float:
            return (await self.run_to_result(name)).elapsed

        return once


@contextlib.asynccontextmanager
async def skewer_worker(dsn: str) -> AsyncIterator[SkewerWorker]:
    queuer = await pgskewer.connect(dsn, embedded=False, pool_size=POOL_SIZE)
    await queuer.install()
    skewer = SkewerWorker(queuer)
    worker = asyncio.create_task(queuer.run(concurrency=CONCURRENCY))
    try:
        yield skewer
    finally:
        queuer.shutdown.set()
        await asyncio.wait_for(worker, 30)
        await queuer.close()


# -- one round --------------------------------------------------------------------------


async def measure_round(sizes: Sizes) -> RoundFigures:
    """Measure both sides in fresh databases, interleaving their samples.

    Sequential latencies take turns (bare, task, 1-step, 3-step, bare, ...), so load from
    other processes on the machine hits both sides alike.
    """
    async with (
        throwaway_database() as bare_dsn,
        throwaway_database() as skewer_dsn,
        bare_worker(bare_dsn) as bare,
        skewer_worker(skewer_dsn) as skewer,
    ):
        for _ in range(sizes.warmup):
            await bare.dispatch_once()
            for name in ("noop", "p1", "p3", "fan"):
                await skewer.run_to_result(name)

        dispatch: list[float] = []
        task: list[float] = []
        pipeline_1: list[float] = []
        p3_runs: list[Timed] = []
        for _ in range(sizes.latency):
            dispatch.append(await bare.dispatch_once())
            task.append((await skewer.run_to_result("noop")).elapsed)
            pipeline_1.append((await skewer.run_to_result("p1")).elapsed)
            p3_runs.append(await skewer.run_to_result("p3"))
        direct, first, last = split_p3(skewer.starts.times, p3_runs)

        flat: list[float] = []
        bare_flat: list[float] = []
        for _ in range(sizes.flat):
            flat.append((await skewer.run_to_result("p3")).elapsed)
            bare_flat.append(await bare.dispatch_once())

        fan = await sequential(skewer.latency_of("fan"), sizes.fan_out)
        bare_rate = await closed_loop(bare.dispatch_once, sizes.throughput, IN_FLIGHT)
        rate = await closed_loop(skewer.latency_of("p3"), sizes.throughput, IN_FLIGHT)
        census = await census_per_handoff(skewer, sizes.census)

    window = sizes.flat_window
    return RoundFigures(
        bare_dispatch=Stats.of(dispatch),
        bare_jobs_per_second=bare_rate,
        task=Stats.of(task),
        pipeline_1=Stats.of(pipeline_1),
        pipeline_3=Stats.of([run.elapsed for run in p3_runs]),
        direct_handoff=Stats.of(direct),
        first_dispatch=Stats.of(first),
        finish_to_result=Stats.of(last),
        pipelines_per_second=rate,
        fan_out=Stats.of(fan),
        flat_first=statistics.median(flat[:window]) * 1000.0,
        flat_last=statistics.median(flat[-window:]) * 1000.0,
        bare_flat_first=statistics.median(bare_flat[:window]) * 1000.0,
        bare_flat_last=statistics.median(bare_flat[-window:]) * 1000.0,
        round_trips=census,
    )


def split_p3(
    starts: dict[tuple[int, str], float], runs: list[Timed]
) -> tuple[list[float], list[float], list[float]]:
    """Split 3-step runs into the two handoffs, the first dispatch, and last step to result."""
    handoffs: list[float] = []
    first: list[float] = []
    last: list[float] = []
    for run in runs:
        step_1, step_2, step_3 = (starts[(run.run_id, path)] for path in ("1", "2", "3"))
        handoffs += [step_2 - step_1, step_3 - step_2]
        first.append(step_1 - run.start)
        last.append(run.end - step_3)
    return handoffs, first, last


# -- round trips ------------------------------------------------------------------------


class RoundTripCounter:
    """Counts statements sent by every asyncpg connection in this process, by kind.

    It wraps ``Connection.execute`` (the simple-query path, used without arguments) and
    ``Connection._execute``/``_executemany`` (the extended-query path, one round trip per
    call once the statement is prepared and cached on that connection).
    """

    def __init__(self) -> None:
        self.counts: collections.Counter[str] = collections.Counter()
        self._saved: dict[str, Any] = {}

    @staticmethod
    def kind_of(query: str) -> str:
        text = query.strip().upper()
        if text.startswith(("BEGIN", "COMMIT", "ROLLBACK")):
            return "BEGIN/COMMIT"
        if "UNLISTEN *" in text:
            return "pool reset on release"
        if "PGSKEWER_" in text:
            return "pgskewer tables"
        return "pgqueuer tables"

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        connection_class = asyncpg.connection.Connection
        simple = connection_class.execute
        extended = connection_class._execute
        many = connection_class._executemany
        counts = self.counts
        kind_of = self.kind_of

        async def execute(self: Any, query: str, *args: Any, **kwargs: Any) -> Any:
            if not args:
                counts[kind_of(query)] += 1
            return await simple(self, query, *args, **kwargs)

        async def _execute(self: Any, query: str, *args: Any, **kwargs: Any) -> Any:
            counts[kind_of(query)] += 1
            return await extended(self, query, *args, **kwargs)

        async def _executemany(self: Any, query: str, *args: Any, **kwargs: Any) -> Any:
            counts[kind_of(query)] += 1
            return await many(self, query, *args, **kwargs)

        connection_class.execute = execute  # type: ignore[method-assign]
        connection_class._execute = _execute  # type: ignore[method-assign]
        connection_class._executemany = _executemany  # type: ignore[method-assign]
        try:
            yield
        finally:
            connection_class.execute = simple  # type: ignore[method-assign]
            connection_class._execute = extended  # type: ignore[method-assign]
            connection_class._executemany = many  # type: ignore[method-assign]


async def census_per_handoff(skewer: SkewerWorker, runs: int) -> dict[str, float]:
    """Return statements per step handoff by kind: (3-step count - 1-step count) / 2 per run.

    Counted over the whole process, so it includes the worker's own pgqueuer queries
    (dequeue, completion log flushes) and the result waiter's reads.
    """
    per_run: dict[str, collections.Counter[str]] = {}
    for name in ("p1", "p3"):
        counter = RoundTripCounter()
        with counter.active():
            for _ in range(runs):
                await skewer.run_to_result(name)
            # pgqueuer writes completions to its log about every 100 ms; let them land.
            await asyncio.sleep(0.3)
        per_run[name] = counter.counts
    kinds = sorted(set(per_run["p1"]) | set(per_run["p3"]))
    census = {kind: (per_run["p3"][kind] - per_run["p1"][kind]) / (2 * runs) for kind in kinds}
    census["total"] = sum(census.values())
    return census


# -- driving the load -------------------------------------------------------------------


async def sequential(once: Callable[[], Awaitable[float]], count: int) -> list[float]:
    """Call ``once`` ``count`` times, one after another; return its durations."""
    return [await once() for _ in range(count)]


async def closed_loop(once: Callable[[], Awaitable[float]], total: int, in_flight: int) -> float:
    """Keep ``in_flight`` calls of ``once`` running until ``total`` finished; return calls/s."""
    remaining = total

    async def client() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await once()

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(in_flight)))
    return total / (time.perf_counter() - start)


# -- report -----------------------------------------------------------------------------


async def main_async(sizes: Sizes, rounds: int, use_uvloop: bool) -> None:
    print(describe_environment(use_uvloop) + f", PostgreSQL {await server_version()}")
    figures: list[RoundFigures] = []
    for index in range(rounds):
        began = time.perf_counter()
        figures.append(await measure_round(sizes))
        print(f"round {index + 1}/{rounds} took {time.perf_counter() - began:.1f} s", flush=True)
    report(figures, sizes)


def report(figures: list[RoundFigures], sizes: Sizes) -> None:
    rows: list[list[Any]] = []

    def add(label: str, stats: list[Stats]) -> None:
        for index, item in enumerate(stats, start=1):
            rows.append([label, index, item.count, item.median, item.p95])

    add("bare pgqueuer dispatch (enqueue → handler start)", [f.bare_dispatch for f in figures])
    add("pgskewer task run (enqueue → result)", [f.task for f in figures])
    add("pgskewer 1-step pipeline (enqueue → result)", [f.pipeline_1 for f in figures])
    add("pgskewer 3-step pipeline (enqueue → result)", [f.pipeline_3 for f in figures])
    add("  of which enqueue → step 1 starts", [f.first_dispatch for f in figures])
    add("  of which step start → next step start", [f.direct_handoff for f in figures])
    add("  of which step 3 starts → result returned", [f.finish_to_result for f in figures])
    add(f"1 → {FAN_OUT} → 1 fan-out pipeline (enqueue → result)", [f.fan_out for f in figures])
    print_table("Latency (ms)", ["measurement", "round", "n", "median", "p95"], rows)

    print_table(
        "Step handoff against bare dispatch (target: ratio ≤ 2)",
        [
            "round",
            "handoff (p3 − p1)/2 ms",
            "direct handoff ms",
            "bare dispatch ms",
            "ratio",
            "direct ratio",
        ],
        [
            [
                index,
                f.handoff,
                f.direct_handoff.median,
                f.bare_dispatch.median,
                f.handoff / f.bare_dispatch.median,
                f.direct_handoff.median / f.bare_dispatch.median,
            ]
            for index, f in enumerate(figures, start=1)
        ],
    )

    print_table(
        f"Throughput with {IN_FLIGHT} in flight (worker concurrency {CONCURRENCY})",
        ["round", "bare jobs/s", "3-step pipelines/s", "steps/s", "steps/s ÷ bare jobs/s"],
        [
            [
                index,
                f.bare_jobs_per_second,
                f.pipelines_per_second,
                3 * f.pipelines_per_second,
                3 * f.pipelines_per_second / f.bare_jobs_per_second,
            ]
            for index, f in enumerate(figures, start=1)
        ],
    )

    window = sizes.flat_window
    print_table(
        f"Flatness over {sizes.flat} sequential 3-step runs (target: within ±10 %), "
        "with interleaved bare dispatches as a control for background load",
        [
            "round",
            f"3-step: median of first {window} ms",
            f"median of last {window} ms",
            "change",
            "bare dispatch change",
        ],
        [
            [
                index,
                f.flat_first,
                f.flat_last,
                f"{f.flat_change:+.1f} %",
                f"{f.bare_flat_change:+.1f} %",
            ]
            for index, f in enumerate(figures, start=1)
        ],
    )

    kinds = [kind for kind in figures[0].round_trips if kind != "total"] + ["total"]
    print_table(
        "Statements per step handoff ((3-step − 1-step) / 2, whole process)",
        ["kind", *(f"round {index}" for index in range(1, len(figures) + 1))],
        [[kind, *(f.round_trips.get(kind, 0.0) for f in figures)] for kind in kinds],
    )

    ratios = [f.handoff / f.bare_dispatch.median for f in figures]
    changes = [f.flat_change for f in figures]
    print(
        f"\nhandoff ÷ bare dispatch over rounds: {spread(ratios)}; "
        f"flatness change over rounds: {spread(changes)} %"
    )


def main() -> None:
    parser = argument_parser(__doc__.splitlines()[0] if __doc__ else "")
    args = parser.parse_args()
    sizes, rounds = FULL, 2
    if args.quick:
        sizes, rounds = QUICK, 1
    if args.rounds is not None:
        rounds = args.rounds
    run_async(lambda: main_async(sizes, rounds, args.uvloop), args.uvloop)


if __name__ == "__main__":
    main()
