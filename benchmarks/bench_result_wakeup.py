"""Latency of ``await pgq.result(...)`` once a worker has written the result.

Run from the repository root: ``python benchmarks/bench_result_wakeup.py [--quick] [--uvloop]``.
Each round uses a fresh database and drops it. The worker and the waiter share one process
and one event loop.

One sample: a task run is enqueued, its handler starts and blocks, a waiter calls
``pgq.result(run_id)`` and is left waiting, then the handler is released. Measured:

- commit acknowledged → result: from ``advance.finish_step`` returning in the worker (the
  transaction that stores the result and the run's status has committed) until ``result``
  returns. It can be negative: the waiter may run before the worker's coroutine resumes.
- handler return → result: the same, but from the handler's return, so it also covers the
  worker's transaction that stores the result.

The baseline, measured in the same round with samples taken in turns: a bare NOTIFY round
trip, ``LISTEN`` on one connection and ``SELECT pg_notify(...)`` on another, from sending
the notify until the listener's callback runs.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
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
from pgqueuer.models import Job

import pgskewer
from pgskewer import advance

CHANNEL = "pgskewer_bench_notify"
#: How long the waiter is left alone before the handler is released, so that it has made
#: its first read and is waiting for an event.
SETTLE_SECONDS = 0.01
TIMEOUT = 30.0


@dataclasses.dataclass(frozen=True)
class RoundFigures:
    commit_to_result: Stats
    return_to_result: Stats
    notify: Stats
    notify_after_ack: Stats


class CommitTimes:
    """Records when ``advance.finish_step`` returns in this process, keyed by run id.

    The executor calls ``advance.finish_step`` through the module, so replacing the module
    attribute for the duration of the benchmark reaches every call.
    """

    def __init__(self) -> None:
        self.times: dict[int, float] = {}

    @asynccontextmanager
    async def installed(self) -> AsyncIterator[None]:
        original = advance.finish_step
        times = self.times

        async def finish_step(
            connection: Any, settings: Any, run_id: int, path: str, outcome: Any
        ) -> bool:
            stored = await original(connection, settings, run_id, path, outcome)
            times[run_id] = time.perf_counter()
            return stored

        advance.finish_step = finish_step  # type: ignore[assignment]
        try:
            yield
        finally:
            advance.finish_step = original


class GatedTask:
    """A task that signals its start and returns only when released."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        self.returned_at = 0.0

    async def __call__(self, job: Job) -> None:
        self.started.set()
        await self.release.wait()
        self.returned_at = time.perf_counter()

    def reset(self) -> None:
        self.started.clear()
        self.release.clear()


async def until_started(task: GatedTask, worker: asyncio.Task[None]) -> None:
    """Wait for the handler to start; raise the worker's error if the worker ends first."""
    started = asyncio.ensure_future(task.started.wait())
    done, _ = await asyncio.wait({started, worker}, timeout=TIMEOUT, return_when="FIRST_COMPLETED")
    if worker in done:
        started.cancel()
        worker.result()
        raise RuntimeError("the worker stopped before running the task")
    if started not in done:
        started.cancel()
        raise TimeoutError(f"the task did not start within {TIMEOUT:g} s")


async def result_sample(
    queuer: pgskewer.ImprovedQueuer,
    task: GatedTask,
    commits: CommitTimes,
    worker: asyncio.Task[None],
) -> tuple[float, float]:
    """Return (commit → result, handler return → result) in seconds for one run."""
    task.reset()
    run_id = await queuer.enqueue("gated")
    await until_started(task, worker)

    async def wait_for_result() -> float:
        result = await queuer.result(run_id, timeout=TIMEOUT)
        returned = time.perf_counter()
        if result is None or not result["ok"]:
            raise RuntimeError(f"run {run_id} did not succeed: {result!r}")
        return returned

    waiter = asyncio.create_task(wait_for_result())
    await asyncio.sleep(SETTLE_SECONDS)
    if waiter.done():
        raise RuntimeError(f"the result of run {run_id} was available before the handler ended")
    task.release.set()
    returned = await waiter
    # The waiter can return before the worker's coroutine has resumed after its COMMIT,
    # so the commit time may be recorded after the result came back (a negative sample).
    while run_id not in commits.times:
        await asyncio.sleep(0.001)
    return returned - commits.times[run_id], returned - task.returned_at


class NotifyProbe:
    """A LISTEN connection and a sending connection on the same database."""

    def __init__(self, listener: asyncpg.Connection, sender: asyncpg.Connection) -> None:
        self.listener = listener
        self.sender = sender
        self._pending: asyncio.Future[float] | None = None

    def _on_notify(self, _connection: Any, _pid: int, _channel: str, _payload: str) -> None:
        if self._pending is not None and not self._pending.done():
            self._pending.set_result(time.perf_counter())

    async def start(self) -> None:
        await self.listener.add_listener(CHANNEL, self._on_notify)

    async def sample(self, index: int) -> tuple[float, float]:
        """Return (send → callback, send acknowledged → callback) in seconds."""
        self._pending = asyncio.get_running_loop().create_future()
        sent = time.perf_counter()
        await self.sender.execute("SELECT pg_notify($1, $2)", CHANNEL, str(index))
        acknowledged = time.perf_counter()
        received = await asyncio.wait_for(self._pending, TIMEOUT)
        return received - sent, received - acknowledged


async def measure_round(samples: int, warmup: int) -> RoundFigures:
    async with throwaway_database() as dsn:
        queuer = await pgskewer.connect(dsn, embedded=False)
        await queuer.install()
        task = GatedTask()
        queuer.entrypoint("gated")(task)
        worker = asyncio.create_task(queuer.run())
        listener = await asyncpg.connect(dsn)
        sender = await asyncpg.connect(dsn)
        probe = NotifyProbe(listener, sender)
        commits = CommitTimes()
        try:
            await probe.start()
            async with commits.installed():
                for index in range(warmup):
                    await result_sample(queuer, task, commits, worker)
                    await probe.sample(index)
                commit_to_result: list[float] = []
                return_to_result: list[float] = []
                notify: list[float] = []
                after_ack: list[float] = []
                for index in range(samples):
                    from_commit, from_return = await result_sample(queuer, task, commits, worker)
                    commit_to_result.append(from_commit)
                    return_to_result.append(from_return)
                    from_send, from_ack = await probe.sample(index)
                    notify.append(from_send)
                    after_ack.append(from_ack)
        finally:
            await listener.close()
            await sender.close()
            queuer.shutdown.set()
            if not worker.done():
                await asyncio.wait_for(worker, 30)
            await queuer.close()
    return RoundFigures(
        commit_to_result=Stats.of(commit_to_result),
        return_to_result=Stats.of(return_to_result),
        notify=Stats.of(notify),
        notify_after_ack=Stats.of(after_ack),
    )


async def main_async(samples: int, warmup: int, rounds: int, use_uvloop: bool) -> None:
    print(describe_environment(use_uvloop) + f", PostgreSQL {await server_version()}")
    figures: list[RoundFigures] = []
    for index in range(rounds):
        began = time.perf_counter()
        figures.append(await measure_round(samples, warmup))
        print(f"round {index + 1}/{rounds} took {time.perf_counter() - began:.1f} s", flush=True)

    rows: list[list[Any]] = []
    for label, pick in (
        ("bare NOTIFY: send → listener callback", lambda f: f.notify),
        ("bare NOTIFY: send acknowledged → listener callback", lambda f: f.notify_after_ack),
        ("pgskewer: commit acknowledged → result() returns", lambda f: f.commit_to_result),
        ("pgskewer: handler returns → result() returns", lambda f: f.return_to_result),
    ):
        for index, f in enumerate(figures, start=1):
            stats: Stats = pick(f)
            rows.append([label, index, stats.count, stats.median, stats.p95])
    print_table("Result wake-up (ms)", ["measurement", "round", "n", "median", "p95"], rows)

    ratios = [f.commit_to_result.median / f.notify.median for f in figures]
    print_table(
        "Ratio to the bare NOTIFY round trip (medians)",
        ["round", "commit → result ÷ NOTIFY", "handler return → result ÷ NOTIFY"],
        [
            [index, f.commit_to_result.median / f.notify.median, ratio_return]
            for index, f in enumerate(figures, start=1)
            for ratio_return in [f.return_to_result.median / f.notify.median]
        ],
    )
    print(f"\ncommit → result ÷ NOTIFY over rounds: {spread(ratios)}")


def main() -> None:
    parser = argument_parser(__doc__.splitlines()[0] if __doc__ else "")
    args = parser.parse_args()
    samples, warmup, rounds = 300, 20, 2
    if args.quick:
        samples, warmup, rounds = 100, 10, 1
    if args.rounds is not None:
        rounds = args.rounds
    run_async(lambda: main_async(samples, warmup, rounds, args.uvloop), args.uvloop)


if __name__ == "__main__":
    main()
