"""Captured output lines: batched storage while a step runs, and reading them back.

Lines reach a :class:`LogWriter` through the output sink of the running step. They are
inserted in batches (one statement and one NOTIFY per batch, at most every
:data:`FLUSH_INTERVAL` seconds), so a chatty step costs a few statements per second.
A step keeps at most :data:`MAX_LINES_PER_STEP` lines per attempt. After that, marker lines
record that lines were dropped and how many.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import io
import json
import logging
import sys
import threading
from collections.abc import Callable
from typing import Any, TextIO

from pgskewer._context import OutputSink, Stream, output_sink
from pgskewer.schema import Settings

logger = logging.getLogger("pgskewer")

FLUSH_INTERVAL = 0.05
MAX_LINES_PER_STEP = 100_000
MAX_LINE_CHARS = 16_384

AcquireConnection = Callable[[], Any]


class LogWriter:
    """Buffers captured lines of running steps and inserts them in batches."""

    def __init__(self, pool: Any, settings: Settings) -> None:
        self._pool = pool
        self._settings = settings
        self._pending: list[tuple[int, str, str, int, str]] = []
        self._counts: dict[tuple[int, str], int] = {}
        self._dropped: dict[tuple[int, str], int] = {}
        self._flush_task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._flush_lock: asyncio.Lock | None = None

    def sink_for(self, run_id: int, step: str) -> OutputSink:
        """Return the sink that stores lines of one step attempt."""
        self._loop = asyncio.get_running_loop()
        key = (run_id, step)
        self._counts[key] = 0
        self._dropped.pop(key, None)

        def sink(stream: Stream, text: str) -> None:
            self._add(key, stream, text)

        return sink

    def _add(self, key: tuple[int, str], stream: Stream, text: str) -> None:
        count = self._counts.get(key, 0)
        if count >= MAX_LINES_PER_STEP:
            dropped = self._dropped.get(key, 0)
            if dropped == 0:
                # Said when it happens, so a live view does not look stuck.
                self._pending.append(
                    (
                        key[0],
                        key[1],
                        "system",
                        count,
                        f"[pgskewer] this step reached {MAX_LINES_PER_STEP} stored lines; "
                        "later lines are dropped",
                    )
                )
                self._schedule_flush()
            self._dropped[key] = dropped + 1
            return
        self._counts[key] = count + 1
        if len(text) > MAX_LINE_CHARS:
            text = text[:MAX_LINE_CHARS] + f"... [{len(text) - MAX_LINE_CHARS} characters cut]"
        self._pending.append((key[0], key[1], stream, count, text.replace("\x00", "\\x00")))
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        loop = self._loop
        if loop is None:
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is not loop:
            loop.call_soon_threadsafe(self._schedule_flush)
            return
        if self._flush_task is None or self._flush_task.done():
            self._flush_task = loop.create_task(self._flush_soon(), name="pgskewer-log-flush")

    async def _flush_soon(self) -> None:
        await asyncio.sleep(FLUSH_INTERVAL)
        await self.flush()

    async def finish_step(self, run_id: int, step: str) -> None:
        """Write the dropped-lines marker of a step, if any, and flush its lines."""
        key = (run_id, step)
        dropped = self._dropped.pop(key, 0)
        if dropped:
            count = self._counts.get(key, 0)
            self._pending.append(
                (
                    run_id,
                    step,
                    "system",
                    count,
                    f"[pgskewer] {dropped} more lines were dropped: "
                    f"a step keeps at most {MAX_LINES_PER_STEP} lines",
                )
            )
        self._counts.pop(key, None)
        await self.flush()

    async def flush(self) -> None:
        """Insert every buffered line now, in the order the lines arrived."""
        if self._flush_lock is None:
            self._flush_lock = asyncio.Lock()
        # One flush at a time, so a later batch never gets lower ids than an earlier one.
        async with self._flush_lock:
            while self._pending:
                batch, self._pending = self._pending, []
                await self._insert_with_retries(batch)

    async def _insert_with_retries(self, batch: list[tuple[int, str, str, int, str]]) -> None:
        # A dropped connection is replaced by the pool, so a short retry usually succeeds.
        for attempt, delay in enumerate((0.1, 0.5, 2.0, None)):
            try:
                await self._insert(batch)
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if delay is None:
                    logger.error(
                        "storing %d log lines of run %d failed %d times (%s); they are lost",
                        len(batch),
                        batch[0][0],
                        attempt + 1,
                        exc,
                    )
                    return
                await asyncio.sleep(delay)

    async def _insert(self, batch: list[tuple[int, str, str, int, str]]) -> None:
        table = self._settings.table("log_lines")
        async with self._pool.acquire() as connection, connection.transaction():
            await connection.execute(
                f"INSERT INTO {table} (run_id, step, stream, seq, text) "
                "SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[], $4::int[], $5::text[])",
                [line[0] for line in batch],
                [line[1] for line in batch],
                [line[2] for line in batch],
                [line[3] for line in batch],
                [line[4] for line in batch],
            )
            for run_id in sorted({line[0] for line in batch}):
                await connection.execute(
                    "SELECT pg_notify($1, $2)",
                    self._settings.channel,
                    json.dumps({"run": run_id, "log": True}),
                )


async def read_lines(
    connection: Any,
    settings: Settings,
    run_id: int,
    step: str | None,
    after_id: int,
    limit: int = 5000,
) -> list[Any]:
    """Return stored lines of a run (or one step) with ids above ``after_id``, in order."""
    return list(
        await connection.fetch(
            "SELECT id, run_id, step, stream, seq, text, created "
            f"FROM {settings.table('log_lines')} WHERE run_id = $1 AND id > $2 "
            "AND ($3::text IS NULL OR step = $3 OR step LIKE $3 || '.%') ORDER BY id LIMIT $4",
            run_id,
            after_id,
            step,
            limit,
        )
    )


async def tail_start(
    connection: Any, settings: Settings, run_id: int, step: str | None, tail: int
) -> int:
    """Return the id after which the last ``tail`` lines of a run (or step) begin."""
    if tail <= 0:
        value = await connection.fetchval(
            f"SELECT max(id) FROM {settings.table('log_lines')} WHERE run_id = $1", run_id
        )
        return int(value or 0)
    value = await connection.fetchval(
        f"SELECT id FROM {settings.table('log_lines')} WHERE run_id = $1 "
        "AND ($2::text IS NULL OR step = $2 OR step LIKE $2 || '.%') "
        "ORDER BY id DESC OFFSET $3 LIMIT 1",
        run_id,
        step,
        tail,
    )
    return int(value or 0)


class _SinkStream(io.TextIOBase):
    """A text stream that sends whole lines to the running step's sink, else to ``target``."""

    def __init__(self, stream: Stream, target: TextIO) -> None:
        self._stream: Stream = stream
        self.target = target
        self._partial: dict[int, str] = {}

    def write(self, text: str) -> int:
        sink = output_sink.get()
        if sink is None or not _capture_enabled.get():
            return self.target.write(text)
        key = id(sink)
        buffered = self._partial.pop(key, "") + text
        *lines, rest = buffered.split("\n")
        for line in lines:
            sink(self._stream, line)
        if rest:
            self._partial[key] = rest
        return len(text)

    def __getattr__(self, name: str) -> Any:
        # Everything else is the real stream's: ipykernel's set_parent, buffer, and so on.
        return getattr(self.target, name)

    def fileno(self) -> int:
        return self.target.fileno()

    @property
    def pgskewer_passthrough(self) -> TextIO:
        """The stream this proxy writes to outside capturing steps."""
        return self.target

    def flush_sink(self, sink: OutputSink) -> None:
        rest = self._partial.pop(id(sink), "")
        if rest:
            sink(self._stream, rest)

    def flush(self) -> None:
        # The real stream may be closed already at interpreter exit (pytest closes its own).
        with contextlib.suppress(ValueError, OSError):
            self.target.flush()

    def isatty(self) -> bool:
        return False

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self.target, "encoding", "utf-8")


class _SinkHandler(logging.Handler):
    """Stores log records emitted while a step with ``capture_output`` runs."""

    def emit(self, record: logging.LogRecord) -> None:
        sink = output_sink.get()
        if sink is None or not _capture_enabled.get() or record.name.startswith("pgskewer"):
            return
        try:
            for line in self.format(record).splitlines() or [""]:
                sink("log", line)
        except Exception:
            self.handleError(record)


_capture_enabled: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "pgskewer_capture_enabled", default=False
)
_install_lock = threading.Lock()
_streams: tuple[_SinkStream, _SinkStream] | None = None


def install_capture() -> None:
    """Route ``print`` and ``logging`` output of capturing steps to their sinks.

    Replaces ``sys.stdout`` and ``sys.stderr`` with proxies once per process; output
    outside a capturing step goes to the original streams unchanged. Raw writes to file
    descriptors 1 and 2 in the worker process cannot be attributed to a step and are not
    captured: run such code through ``unblock``.
    """
    global _streams
    with _install_lock:
        if _streams is not None and sys.stdout is _streams[0] and sys.stderr is _streams[1]:
            return
        _streams = (_SinkStream("stdout", sys.stdout), _SinkStream("stderr", sys.stderr))
        sys.stdout, sys.stderr = _streams
        handler = _SinkHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        logging.getLogger().addHandler(handler)


@contextlib.contextmanager
def capturing(enabled: bool) -> Any:
    """Enable ``capture_output`` for the current context while the block runs."""
    if not enabled:
        yield
        return
    install_capture()
    token = _capture_enabled.set(True)
    try:
        yield
    finally:
        _capture_enabled.reset(token)
        sink = output_sink.get()
        if sink is not None and _streams is not None:
            for stream in _streams:
                stream.flush_sink(sink)
