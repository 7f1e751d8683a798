"""Splitting a child's stdout and stderr pipes into lines and handing them to the caller."""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass
from typing import Literal, TextIO

import anyio
from anyio.abc import ByteReceiveStream

from pgskewer._context import OutputSink

logger = logging.getLogger("pgskewer")

ChildStream = Literal["stdout", "stderr"]

#: A partial line longer than this is handed on without waiting for its newline.
MAX_LINE_BYTES = 64 * 1024

#: Lines received outside a call that are kept for error messages about a failed start.
RECENT_LINES = 20


@dataclass(frozen=True)
class OutputTarget:
    """Destination of one call's lines: the sink, and the caller's streams when ``echo`` is set."""

    sink: OutputSink | None
    echo: bool
    stdout: TextIO
    stderr: TextIO

    def write(self, stream: ChildStream, text: str) -> None:
        if self.sink is not None:
            try:
                self.sink(stream, text)
            except Exception:
                logger.exception("output sink %r raised for a %s line", self.sink, stream)
        if self.echo:
            (self.stdout if stream == "stdout" else self.stderr).write(text + "\n")

    def flush(self, stream: ChildStream) -> None:
        if self.echo:
            try:
                (self.stdout if stream == "stdout" else self.stderr).flush()
            except (OSError, ValueError):
                pass


class OutputPump:
    """Reads one pipe of a child for its whole life and sends each line to the current call.

    A call's output on this stream ends at its end marker. Lines that arrive while no call
    is listening (startup noise, or a leftover process writing after its call ended) are
    logged at DEBUG level and kept in :attr:`recent` for error messages.
    """

    def __init__(self, stream: ChildStream, pid: int) -> None:
        self.stream = stream
        self.pid = pid
        self.recent: deque[str] = deque(maxlen=RECENT_LINES)
        self.closed = anyio.Event()
        self._buffer = bytearray()
        self._target: OutputTarget | None = None
        self._marker = b""
        self._marker_seen = anyio.Event()

    def expect_call(self, target: OutputTarget, marker: bytes) -> None:
        """Send lines to ``target`` until ``marker`` (without its newline) ends them."""
        self._target = target
        self._marker = marker.rstrip(b"\n")
        self._marker_seen = anyio.Event()

    def detach(self) -> None:
        """Stop sending lines to the current call, whose caller no longer listens."""
        self._target = None
        self._marker = b""

    async def wait_for_marker(self) -> None:
        await self._marker_seen.wait()

    async def run(self, pipe: ByteReceiveStream) -> None:
        """Read ``pipe`` until EOF, then hand on the partial line that is left."""
        try:
            while True:
                try:
                    data = await pipe.receive()
                except (anyio.EndOfStream, anyio.ClosedResourceError, anyio.BrokenResourceError):
                    break
                self._feed(data)
        finally:
            if self._buffer:
                self._emit(bytes(self._buffer))
                self._buffer.clear()
            self.closed.set()

    def _feed(self, data: bytes) -> None:
        target = self._target
        buffer = self._buffer
        buffer += data

        start = 0
        while True:
            end = buffer.find(b"\n", start)
            if end < 0:
                break
            self._take_line(bytes(buffer[start:end]))
            start = end + 1
        del buffer[:start]

        if len(buffer) > MAX_LINE_BYTES:
            self._emit(bytes(buffer))
            buffer.clear()

        # The marker may have detached the call above: its last lines still need a flush.
        if target is not None:
            target.flush(self.stream)

    def _take_line(self, line: bytes) -> None:
        marker = self._marker
        if marker and line.endswith(marker):
            # Text before the marker is the call's last line, written without a newline.
            if len(line) > len(marker):
                self._emit(line[: -len(marker)])
            self.detach()
            self._marker_seen.set()
            return
        self._emit(line)

    def _emit(self, line: bytes) -> None:
        text = line.decode("utf-8", "replace").removesuffix("\r")
        target = self._target
        if target is not None:
            target.write(self.stream, text)
            return
        self.recent.append(text)
        logger.debug("unblock child %d wrote to %s outside a call: %s", self.pid, self.stream, text)
