"""The caller's handle on one child process: start, one call at a time, and termination."""

from __future__ import annotations

import logging
import math
import os
import pickle
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import psutil
from anyio.abc import ByteReceiveStream, Process, TaskGroup, UNIXSocketStream
from anyio.streams.buffered import BufferedByteReceiveStream
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from pgskewer._unblock import child as child_module
from pgskewer._unblock.errors import UnblockError, describe_exit
from pgskewer._unblock.output import OutputPump, OutputTarget

logger = logging.getLogger("pgskewer")

#: Seconds between SIGTERM and SIGKILL when a running call's process tree is killed.
TERMINATE_GRACE = 0.5

#: Seconds a new child may take to import cloudpickle and report that it is ready.
START_TIMEOUT = 60.0

#: Seconds to wait for the end markers after the reply. The child writes them before it
#: replies, so only a stuck reader makes this wait run out.
MARKER_TIMEOUT = 5.0

#: Seconds to wait for the output pipes to reach EOF after the process tree was killed.
DRAIN_TIMEOUT = 1.0

_CHILD_PATH = str(Path(child_module.__file__).resolve())


class ChildExited(Exception):
    """The child process ended before it replied."""

    def __init__(self, returncode: int | None) -> None:
        super().__init__(describe_exit(returncode))
        self.returncode = returncode


class ChildProcess:
    """One Python process that runs calls one at a time, in its own session and process group.

    Four tasks serve it in the pool's task group: one reader per output pipe, the reader
    of the control socket, and a task that waits for the process to exit.
    """

    def __init__(self, process: Process, control: UNIXSocketStream) -> None:
        self.process = process
        self.pid = process.pid
        self.used = False
        self.stdout_pump = OutputPump("stdout", self.pid)
        self.stderr_pump = OutputPump("stderr", self.pid)
        self._control = control
        self._messages_in: MemoryObjectSendStream[tuple[Any, ...]]
        self._messages: MemoryObjectReceiveStream[tuple[Any, ...]]
        self._messages_in, self._messages = anyio.create_memory_object_stream[tuple[Any, ...]](
            math.inf
        )
        self._closed = False

    @property
    def alive(self) -> bool:
        return self.process.returncode is None and not self._closed

    @classmethod
    async def spawn(cls, task_group: TaskGroup) -> ChildProcess:
        """Start a child and wait until it is ready for its first call."""
        parent_socket, child_socket = socket.socketpair()
        try:
            process = await anyio.open_process(
                [
                    sys.executable,
                    "-u",
                    "-c",
                    child_module.BOOTSTRAP,
                    _CHILD_PATH,
                    str(child_socket.fileno()),
                    str(os.getpid()),
                ],
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                pass_fds=(child_socket.fileno(),),
            )
        except BaseException:
            parent_socket.close()
            raise
        finally:
            child_socket.close()

        child = cls(process, await UNIXSocketStream.from_socket(parent_socket))
        child._start_tasks(task_group)
        try:
            await child._wait_until_ready()
        except BaseException:
            with anyio.CancelScope(shield=True):
                await child.terminate()
            raise

        logger.debug("unblock child %d started", child.pid)
        return child

    def _start_tasks(self, task_group: TaskGroup) -> None:
        assert self.process.stdout is not None and self.process.stderr is not None
        task_group.start_soon(self._pump, self.stdout_pump, self.process.stdout)
        task_group.start_soon(self._pump, self.stderr_pump, self.process.stderr)
        task_group.start_soon(self._read_control)
        task_group.start_soon(self._watch_exit)

    async def _wait_until_ready(self) -> None:
        with anyio.fail_after(START_TIMEOUT):
            message = await self._receive()
        if message[0] == "ready":
            return

        stderr = "\n".join(self.stderr_pump.recent) or "(nothing)"
        raise UnblockError(
            f"the unblock child process {self.pid} failed to start: it "
            f"{describe_exit(message[1])}. Its last stderr lines:\n{stderr}"
        )

    async def _pump(self, pump: OutputPump, pipe: ByteReceiveStream) -> None:
        await pump.run(pipe)

    async def _read_control(self) -> None:
        reader = BufferedByteReceiveStream(self._control)
        header_size = child_module.FRAME_HEADER.size
        try:
            while True:
                header = await reader.receive_exactly(header_size)
                (size,) = child_module.FRAME_HEADER.unpack(header)
                message = pickle.loads(await reader.receive_exactly(size))
                await self._messages_in.send(message)
        except (
            anyio.EndOfStream,
            anyio.IncompleteRead,
            anyio.ClosedResourceError,
            anyio.BrokenResourceError,
            ConnectionError,
        ):
            pass

    async def _watch_exit(self) -> None:
        returncode = await self.process.wait()
        logger.debug("unblock child %d %s", self.pid, describe_exit(returncode))
        try:
            await self._messages_in.send(("exited", returncode))
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            pass  # the child was retired, so no call waits for this message

    async def run_call(self, request: bytes, token: str, target: OutputTarget) -> tuple[Any, ...]:
        """Send one call and return the child's reply once the call's output has ended.

        Raises :class:`ChildExited` when the process ends before it replies.
        """
        self.used = True
        marker = child_module.end_marker(token)
        self.stdout_pump.expect_call(target, marker)
        self.stderr_pump.expect_call(target, marker)

        try:
            await self._control.send(child_module.FRAME_HEADER.pack(len(request)) + request)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, ConnectionError):
            pass  # the exit watcher reports how the process ended

        message = await self._receive()
        if message[0] == "exited":
            raise ChildExited(message[1])

        with anyio.move_on_after(MARKER_TIMEOUT) as scope:
            await self.stdout_pump.wait_for_marker()
            await self.stderr_pump.wait_for_marker()
        if scope.cancelled_caught:
            logger.warning(
                "unblock child %d: the end of the call's output did not arrive within %g s",
                self.pid,
                MARKER_TIMEOUT,
            )
            return (*message[:2], "its output did not end", *message[3:])
        return message

    async def _receive(self) -> tuple[Any, ...]:
        try:
            return await self._messages.receive()
        except anyio.EndOfStream:
            # The pool closed and stopped the task that would report the exit.
            with anyio.move_on_after(DRAIN_TIMEOUT):
                await self.process.wait()
            return ("exited", self.process.returncode)

    async def shutdown(self) -> None:
        """Ask an idle child to exit, and release its resources when it has."""
        self._closed = True
        try:
            await self._control.send(_frame(("shutdown",)))
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, ConnectionError):
            pass

        with anyio.move_on_after(TERMINATE_GRACE) as scope:
            await self.process.wait()
        if scope.cancelled_caught:
            await self.terminate()
            return
        await self.release_resources()

    async def terminate(self) -> None:
        """Kill the child and everything it started: SIGTERM, then SIGKILL after the grace period.

        The child's process group contains every process it started unless one of them moved
        to another group or session. Those are found through parent links (the child is a
        subreaper) while the child lives, and get the same signals.
        """
        self._closed = True
        others = self._descendants_outside_group()
        if self.process.returncode is None:
            self._signal(signal.SIGTERM, others)
            # No event signals that a process group became empty, so poll every 10 ms.
            with anyio.move_on_after(TERMINATE_GRACE):
                while self._tree_alive(others):  # noqa: ASYNC110
                    await anyio.sleep(0.01)
        self._signal(signal.SIGKILL, others)

        with anyio.move_on_after(DRAIN_TIMEOUT):
            await self.stdout_pump.closed.wait()
            await self.stderr_pump.closed.wait()
        await self.release_resources()

    def kill_now(self) -> None:
        """Send SIGKILL to the child's process group without waiting: for interpreter exit."""
        self._closed = True
        if self.process.returncode is None:
            self._signal(signal.SIGKILL, [])
        self._messages_in.close()

    async def release_resources(self) -> None:
        """Close the control socket, the message streams and the pipes once the child exited."""
        self._messages_in.close()
        self._messages.close()
        with anyio.move_on_after(DRAIN_TIMEOUT):
            await self._control.aclose()
            await self.process.aclose()

    def _descendants_outside_group(self) -> list[int]:
        try:
            descendants = psutil.Process(self.pid).children(recursive=True)
        except psutil.Error:
            return []

        others = []
        for process in descendants:
            try:
                if os.getpgid(process.pid) != self.pid:
                    others.append(process.pid)
            except ProcessLookupError:
                pass
        return others

    def _signal(self, signum: signal.Signals, others: list[int]) -> None:
        # The group id is the child's pid because the child leads its own session. The
        # group lives on after the child while any member is left, and so does the id.
        try:
            os.killpg(self.pid, signum)
        except (ProcessLookupError, PermissionError):
            pass
        for pid in others:
            try:
                os.kill(pid, signum)
            except (ProcessLookupError, PermissionError):
                pass

    def _tree_alive(self, others: list[int]) -> bool:
        for kill, pid in [(os.killpg, self.pid), *((os.kill, pid) for pid in others)]:
            try:
                kill(pid, 0)
            except ProcessLookupError:
                continue
            except PermissionError:
                pass
            return True
        return False


def _frame(message: tuple[Any, ...]) -> bytes:
    data = pickle.dumps(message, protocol=5)
    return child_module.FRAME_HEADER.pack(len(data)) + data
