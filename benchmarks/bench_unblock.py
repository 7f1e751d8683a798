"""Measure the cost of ``unblock`` calls and the latency of captured output lines.

Run with ``python benchmarks/bench_unblock.py``. It prints, in milliseconds:

- a bare ``subprocess.run([sys.executable, "-c", "pass"])``, the floor for starting a process;
- a trivial call back to back on a reused child;
- a trivial call with ``fresh=True``, which needs a new process for each call;
- the time from a child writing a line to the caller's sink receiving it.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable

import anyio

from pgskewer import _context
from pgskewer.unblock import close_pool, unblock


def noop() -> None:
    return None


def write_timestamped_lines(count: int, pause: float) -> None:
    for _ in range(count):
        print(time.time_ns(), flush=True)
        time.sleep(pause)


def summarise(name: str, samples: list[float]) -> tuple[str, float, float, int]:
    ordered = sorted(samples)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return name, statistics.median(ordered), p95, len(ordered)


def time_bare_spawn(count: int) -> list[float]:
    samples = []
    for _ in range(count):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        samples.append((time.perf_counter() - start) * 1000)
    return samples


async def time_calls(call: Callable[[], Awaitable[object]], count: int) -> list[float]:
    samples = []
    for _ in range(count):
        start = time.perf_counter()
        await call()
        samples.append((time.perf_counter() - start) * 1000)
    return samples


async def time_line_latency(count: int) -> list[float]:
    samples: list[float] = []

    def sink(stream: _context.Stream, text: str) -> None:
        received = time.time_ns()
        if stream == "stdout" and text.isdigit():
            samples.append((received - int(text)) / 1e6)

    sink_token = _context.output_sink.set(sink)
    echo_token = _context.echo_output.set(False)
    try:
        await unblock(write_timestamped_lines, count, 0.005)
    finally:
        _context.echo_output.reset(echo_token)
        _context.output_sink.reset(sink_token)
    return samples


async def measure(count: int) -> list[tuple[str, float, float, int]]:
    rows = [summarise("bare spawn: python -c pass", time_bare_spawn(count))]

    await unblock(noop)  # start the pool and the spare
    rows.append(summarise("unblock, reused child", await time_calls(lambda: unblock(noop), count)))

    fresh = unblock.options(fresh=True)
    rows.append(summarise("unblock, fresh=True", await time_calls(lambda: fresh(noop), count)))

    rows.append(summarise("line latency, child write to sink", await time_line_latency(count)))
    await close_pool()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=200, help="samples per row (default 200)")
    arguments = parser.parse_args()

    rows = anyio.run(measure, arguments.count)
    print(f"Python {sys.version.split()[0]}, {arguments.count} samples per row, times in ms")
    print(f"{'measurement':<36} {'median':>8} {'p95':>8} {'n':>5}")
    for name, median, p95, count in rows:
        print(f"{name:<36} {median:>8.2f} {p95:>8.2f} {count:>5}")


if __name__ == "__main__":
    main()
