"""Helpers shared by the benchmark scripts: throwaway databases, timing statistics, tables.

Every benchmark talks to the PostgreSQL server named by ``PGSKEWER_BENCH_DSN`` (default
``postgresql://postgres@127.0.0.1:5432/postgres``), which must be on this host. Each
database it creates is named ``pgskewer_bench_<random hex>`` and dropped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import importlib.util
import os
import platform
import statistics
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import asyncpg

# The scripts run as `python benchmarks/NAME.py`, so the package next to this folder is
# importable without installing it. A pgskewer found through PYTHONPATH (for example a
# `git archive` snapshot of one commit) takes precedence.
if importlib.util.find_spec("pgskewer") is None or "PYTHONPATH" not in os.environ:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

ADMIN_DSN = os.environ.get("PGSKEWER_BENCH_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")
LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})

T = TypeVar("T")


def database_dsn(dsn: str, database: str) -> str:
    """Return ``dsn`` with its database replaced by ``database``."""
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path="/" + database))


@contextlib.asynccontextmanager
async def throwaway_database(admin_dsn: str = ADMIN_DSN) -> AsyncIterator[str]:
    """Create an empty ``pgskewer_bench_*`` database, yield its DSN, and drop it afterwards."""
    host = urlsplit(admin_dsn).hostname
    if host not in LOCAL_HOSTS:
        raise ValueError(
            f"benchmarks run only against a server on this host, got host {host!r}; "
            "set PGSKEWER_BENCH_DSN to a postgresql://...@127.0.0.1 DSN"
        )
    name = f"pgskewer_bench_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(admin_dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    try:
        yield database_dsn(admin_dsn, name)
    finally:
        admin = await asyncpg.connect(admin_dsn)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


@dataclasses.dataclass(frozen=True)
class Stats:
    """Summary of a list of durations, in milliseconds."""

    count: int
    median: float
    p95: float
    minimum: float
    maximum: float

    @classmethod
    def of(cls, seconds: Sequence[float]) -> Stats:
        if not seconds:
            raise ValueError("cannot summarize an empty list of samples")
        ms = sorted(value * 1000.0 for value in seconds)
        return cls(
            count=len(ms),
            median=statistics.median(ms),
            p95=percentile(ms, 95.0),
            minimum=ms[0],
            maximum=ms[-1],
        )


def percentile(sorted_values: Sequence[float], pct: float) -> float:
    """Return the ``pct`` percentile of sorted values, interpolating between neighbours."""
    if len(sorted_values) == 1:
        return sorted_values[0]
    position = (len(sorted_values) - 1) * pct / 100.0
    lower = int(position)
    upper = min(lower + 1, len(sorted_values) - 1)
    fraction = position - lower
    return sorted_values[lower] + (sorted_values[upper] - sorted_values[lower]) * fraction


def spread(values: Sequence[float]) -> str:
    """Return ``min–max`` of per-round values, for reporting the noise between rounds."""
    return f"{min(values):.2f}–{max(values):.2f}"


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Print a Markdown table, so the output can be pasted into docs/benchmarks.md."""
    cells = [[_cell(value) for value in row] for row in rows]
    widths = [
        max(len(header), *(len(row[index]) for row in cells)) if cells else len(header)
        for index, header in enumerate(headers)
    ]
    print(f"\n### {title}\n")
    print("| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |")
    sys.stdout.flush()


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def argument_parser(description: str) -> argparse.ArgumentParser:
    """Return a parser with the options every benchmark script accepts."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--quick", action="store_true", help="run fewer samples (under a minute in total)"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="number of rounds, each in a fresh database (default: 2, or 1 with --quick)",
    )
    parser.add_argument(
        "--uvloop",
        action="store_true",
        help="run on uvloop instead of the default asyncio event loop",
    )
    return parser


def run_async(main: Callable[[], Coroutine[Any, Any, T]], use_uvloop: bool) -> T:
    """Run ``main()`` on uvloop or on the default asyncio loop."""
    if use_uvloop:
        import uvloop

        return uvloop.run(main())
    return asyncio.run(main())


def describe_environment(use_uvloop: bool) -> str:
    """Return one line naming the interpreter, event loop and CPU count."""
    loop = "uvloop" if use_uvloop else "asyncio (default loop)"
    return (
        f"Python {platform.python_version()}, event loop {loop}, {os.cpu_count()} CPUs, "
        f"server {urlsplit(ADMIN_DSN).hostname}:{urlsplit(ADMIN_DSN).port or 5432}"
    )


async def server_version(dsn: str = ADMIN_DSN) -> str:
    """Return the PostgreSQL server version string."""
    connection = await asyncpg.connect(dsn)
    try:
        return str(await connection.fetchval("SHOW server_version"))
    finally:
        await connection.close()
