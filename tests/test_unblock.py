"""Tests of ``pgskewer.unblock``: results, errors, output capture, reuse, cancellation, crashes.

These tests start real child processes and need no database. Functions defined here
travel to the child by reference, so the child imports this module through the
``sys.path`` it receives from the test process.
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import anyio
import psutil
import pytest

from pgskewer import _context
from pgskewer.unblock import (
    RemoteError,
    UnblockProcessDied,
    UnblockTimeout,
    close_pool,
    unblock,
)

# Generous bounds: a child start costs about 50 ms on an idle machine, but CI may be busy.
CALL_LIMIT = 30
GONE_LIMIT = 15


class Sink:
    """An output sink that records lines and can wait for one that starts with a prefix."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str]] = []
        self._waiters: list[tuple[str, anyio.Event]] = []

    def __call__(self, stream: _context.Stream, text: str) -> None:
        self.lines.append((stream, text))
        for prefix, event in self._waiters:
            if text.startswith(prefix):
                event.set()

    def stream(self, name: str) -> list[str]:
        return [text for stream, text in self.lines if stream == name]

    async def wait_for(self, prefix: str) -> str:
        event = anyio.Event()
        self._waiters.append((prefix, event))
        if not any(text.startswith(prefix) for _, text in self.lines):
            await event.wait()
        return next(text for _, text in self.lines if text.startswith(prefix))


@pytest.fixture
def sink() -> Iterator[Sink]:
    recorder = Sink()
    token = _context.output_sink.set(recorder)
    try:
        yield recorder
    finally:
        _context.output_sink.reset(token)


@pytest.fixture
def no_echo() -> Iterator[None]:
    token = _context.echo_output.set(False)
    try:
        yield
    finally:
        _context.echo_output.reset(token)


def process_gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


async def wait_until_gone(*pids: int) -> None:
    with anyio.fail_after(GONE_LIMIT):
        # No event signals that an unrelated process ended, so poll.
        while not all(process_gone(pid) for pid in pids):
            await anyio.sleep(0.05)


# Functions run in the child.


def add(a: int, b: int, *, scale: int = 1) -> int:
    return (a + b) * scale


def fail_with_value_error(text: str) -> None:
    raise ValueError(f"bad value: {text}")


class LockedError(Exception):
    """An exception that cannot be pickled because it contains a lock."""

    def __init__(self) -> None:
        super().__init__("holds a lock")
        self.lock = threading.Lock()


def fail_with_locked_error() -> None:
    raise LockedError()


def call_sys_exit() -> None:
    sys.exit(4)


def return_generator() -> Iterator[int]:
    return (i for i in range(3))


def write_everywhere() -> None:
    print("print line")
    print("stderr line", file=sys.stderr)
    logging.getLogger("unblock-test").warning("logging line")
    os.write(1, b"os.write line\n")
    subprocess.run(["sh", "-c", "echo shell line; echo shell error >&2"], check=True)
    print("after shell")


def write_lines(count: int, per_pause: int, pause: float) -> None:
    for index in range(count):
        print(f"line {index}")
        if index % per_pause == per_pause - 1:
            time.sleep(pause)


def write_without_newline() -> None:
    print("first")
    sys.stdout.write("last without newline")


def write_tagged(tag: str, count: int) -> int:
    for index in range(count):
        print(f"{tag} out {index}")
        print(f"{tag} err {index}", file=sys.stderr)
    sys.stdout.write(f"{tag} partial")
    return os.getpid()


def start_grandchild_and_sleep() -> None:
    grandchild = subprocess.Popen(["sleep", "60"])
    print(f"pids {os.getpid()} {grandchild.pid}", flush=True)
    time.sleep(60)


def leave_grandchild_running() -> tuple[int, int]:
    grandchild = subprocess.Popen(["sleep", "60"])
    return os.getpid(), grandchild.pid


def exit_with_code(code: int) -> None:
    os._exit(code)


def kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def child_ids() -> tuple[int, int, int]:
    return os.getpid(), os.getpgid(0), os.getsid(0)


# Results and errors.


@pytest.mark.anyio
async def test_returns_value_with_kwargs() -> None:
    with anyio.fail_after(CALL_LIMIT):
        assert await unblock(add, 2, 3, scale=10) == 50


@pytest.mark.anyio
async def test_exception_keeps_type_and_note() -> None:
    with anyio.fail_after(CALL_LIMIT), pytest.raises(ValueError) as info:
        await unblock(fail_with_value_error, "x")

    assert str(info.value) == "bad value: x"
    notes = "\n".join(getattr(info.value, "__notes__", []))
    assert "Traceback in the unblock child process" in notes
    assert "fail_with_value_error" in notes


@pytest.mark.anyio
async def test_unpicklable_exception_is_remote_error() -> None:
    with anyio.fail_after(CALL_LIMIT), pytest.raises(RemoteError) as info:
        await unblock(fail_with_locked_error)

    assert info.value.type_name.endswith("LockedError")
    assert info.value.message == "holds a lock"
    assert "fail_with_locked_error" in info.value.remote_traceback


@pytest.mark.anyio
async def test_system_exit_is_remote_error() -> None:
    with anyio.fail_after(CALL_LIMIT), pytest.raises(RemoteError) as info:
        await unblock(call_sys_exit)

    assert info.value.type_name == "builtins.SystemExit"
    assert info.value.message == "4"


@pytest.mark.anyio
async def test_unpicklable_argument_names_type() -> None:
    generator = (i for i in range(3))
    with pytest.raises(TypeError, match="cannot send argument 0 of type 'generator'"):
        await unblock(list, generator)


@pytest.mark.anyio
async def test_unpicklable_result_names_type() -> None:
    with anyio.fail_after(CALL_LIMIT), pytest.raises(
        TypeError, match="cannot send the return value of type 'generator'"
    ):
        await unblock(return_generator)


def test_main_module_lambda_and_closure(tmp_path: Path) -> None:
    script = tmp_path / "main_functions.py"
    script.write_text(
        textwrap.dedent(
            """
            import anyio
            from pgskewer.unblock import unblock

            factor = 3

            def make_adder(offset):
                def add_offset(x):
                    return x + offset * factor
                return add_offset

            async def main():
                print("lambda", await unblock(lambda x: x * factor, 2))
                print("closure", await unblock(make_adder(10), 1))

            anyio.run(main)
            """
        )
    )

    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=CALL_LIMIT * 2
    )

    assert result.returncode == 0, result.stderr
    assert "lambda 6" in result.stdout.splitlines()
    assert "closure 31" in result.stdout.splitlines()


# Output capture.


@pytest.mark.anyio
async def test_output_reaches_sink_and_echo(sink: Sink, monkeypatch: pytest.MonkeyPatch) -> None:
    stdout, stderr = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stdout", stdout)
    monkeypatch.setattr(sys, "stderr", stderr)

    with anyio.fail_after(CALL_LIMIT):
        await unblock(write_everywhere)

    expected_stdout = ["print line", "os.write line", "shell line", "after shell"]
    expected_stderr = ["stderr line", "logging line", "shell error"]
    assert sink.stream("stdout") == expected_stdout
    assert sink.stream("stderr") == expected_stderr
    assert stdout.getvalue().splitlines() == expected_stdout
    assert stderr.getvalue().splitlines() == expected_stderr


@pytest.mark.anyio
async def test_echo_off_writes_nothing(
    sink: Sink, no_echo: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    stdout = io.StringIO()
    monkeypatch.setattr(sys, "stdout", stdout)

    with anyio.fail_after(CALL_LIMIT):
        await unblock(write_everywhere)

    assert "print line" in sink.stream("stdout")
    assert stdout.getvalue() == ""


@pytest.mark.anyio
async def test_ten_thousand_lines_arrive(sink: Sink, no_echo: None) -> None:
    with anyio.fail_after(CALL_LIMIT):
        await unblock(write_lines, 10_000, 100, 0.01)

    assert sink.stream("stdout") == [f"line {index}" for index in range(10_000)]


@pytest.mark.anyio
async def test_last_line_without_newline(sink: Sink, no_echo: None) -> None:
    with anyio.fail_after(CALL_LIMIT):
        await unblock(write_without_newline)

    assert sink.stream("stdout") == ["first", "last without newline"]


@pytest.mark.anyio
async def test_no_output_bleeds_into_next_call(no_echo: None) -> None:
    first, second = Sink(), Sink()

    with anyio.fail_after(CALL_LIMIT):
        token = _context.output_sink.set(first)
        try:
            first_pid = await unblock(write_tagged, "a", 500)
        finally:
            _context.output_sink.reset(token)

        token = _context.output_sink.set(second)
        try:
            second_pid = await unblock(write_tagged, "b", 3)
        finally:
            _context.output_sink.reset(token)

    assert first_pid == second_pid
    assert first.stream("stdout") == [f"a out {i}" for i in range(500)] + ["a partial"]
    assert first.stream("stderr") == [f"a err {i}" for i in range(500)]
    assert second.stream("stdout") == [f"b out {i}" for i in range(3)] + ["b partial"]
    assert second.stream("stderr") == [f"b err {i}" for i in range(3)]


# Reuse.


@pytest.mark.anyio
async def test_reuses_child_unless_fresh() -> None:
    with anyio.fail_after(CALL_LIMIT):
        first = await unblock(os.getpid)
        second = await unblock(os.getpid)
        fresh = await unblock.options(fresh=True)(os.getpid)
        after_fresh = await unblock(os.getpid)

    assert first == second
    assert fresh != first
    assert after_fresh != fresh


@pytest.mark.anyio
async def test_child_leads_own_session() -> None:
    with anyio.fail_after(CALL_LIMIT):
        pid, group, session = await unblock(child_ids)

    assert group == pid
    assert session == pid
    assert session != os.getsid(0)


@pytest.mark.anyio
async def test_leftover_process_retires_child() -> None:
    with anyio.fail_after(CALL_LIMIT):
        child_pid, grandchild_pid = await unblock(leave_grandchild_running)
        next_pid = await unblock(os.getpid)

    assert next_pid != child_pid
    await wait_until_gone(child_pid, grandchild_pid)


# Cancellation, timeouts and crashes.


@pytest.mark.anyio
async def test_cancel_kills_process_tree(sink: Sink, no_echo: None) -> None:
    cancelled = False

    async def call_and_record_cancel() -> None:
        nonlocal cancelled
        try:
            await unblock(start_grandchild_and_sleep)
        except anyio.get_cancelled_exc_class():
            cancelled = True
            raise

    with anyio.fail_after(CALL_LIMIT):
        async with anyio.create_task_group() as task_group:
            task_group.start_soon(call_and_record_cancel)
            line = await sink.wait_for("pids ")
            task_group.cancel_scope.cancel()

    child_pid, grandchild_pid = (int(pid) for pid in line.split()[1:])
    assert cancelled
    await wait_until_gone(child_pid, grandchild_pid)


@pytest.mark.anyio
async def test_asyncio_cancel_propagates_unchanged(sink: Sink, no_echo: None) -> None:
    task = asyncio.ensure_future(unblock(start_grandchild_and_sleep))
    with anyio.fail_after(CALL_LIMIT):
        line = await sink.wait_for("pids ")
    task.cancel()

    with anyio.fail_after(CALL_LIMIT), pytest.raises(asyncio.CancelledError):
        await task

    child_pid, grandchild_pid = (int(pid) for pid in line.split()[1:])
    await wait_until_gone(child_pid, grandchild_pid)


@pytest.mark.anyio
async def test_timeout_kills_and_raises(sink: Sink, no_echo: None) -> None:
    with anyio.fail_after(CALL_LIMIT), pytest.raises(UnblockTimeout) as info:
        await unblock.options(timeout=2)(start_grandchild_and_sleep)

    assert isinstance(info.value, TimeoutError)
    line = await sink.wait_for("pids ")
    await wait_until_gone(*(int(pid) for pid in line.split()[1:]))


def test_options_reject_bad_timeout() -> None:
    with pytest.raises(ValueError, match="timeout must be positive"):
        unblock.options(timeout=0)
    assert unblock.options(fresh=True).options(timeout=3).fresh is True


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("function", "args", "returncode", "text"),
    [
        (exit_with_code, (3,), 3, "exited with code 3"),
        (kill_self, (), -signal.SIGKILL, "killed by SIGKILL"),
    ],
)
async def test_child_death_raises_and_recovers(
    function: Callable[..., None], args: tuple[int, ...], returncode: int, text: str
) -> None:
    with anyio.fail_after(CALL_LIMIT), pytest.raises(UnblockProcessDied) as info:
        await unblock(function, *args)

    assert info.value.returncode == returncode
    assert text in str(info.value)
    assert isinstance(info.value, ChildProcessError)
    with anyio.fail_after(CALL_LIMIT):
        assert await unblock(add, 1, 1) == 2


@pytest.mark.anyio
async def test_close_pool_then_call_again() -> None:
    with anyio.fail_after(CALL_LIMIT):
        pid = await unblock(os.getpid)
        await close_pool()
        await wait_until_gone(pid)
        assert await unblock(os.getpid) != pid


@pytest.mark.anyio
async def test_close_pool_ends_running_call(sink: Sink, no_echo: None) -> None:
    async def close_when_started() -> None:
        await sink.wait_for("pids ")
        await close_pool()

    with anyio.fail_after(CALL_LIMIT), pytest.raises(ExceptionGroup) as info:
        async with anyio.create_task_group() as task_group:
            task_group.start_soon(close_when_started)
            await unblock(start_grandchild_and_sleep)

    assert info.group_contains(UnblockProcessDied, match="killed by SIGKILL")
    line = await sink.wait_for("pids ")
    await wait_until_gone(*(int(pid) for pid in line.split()[1:]))


WORKER_SCRIPT = """
import os, subprocess, time
import anyio
from pgskewer.unblock import unblock

def start_grandchild_and_sleep():
    grandchild = subprocess.Popen(["sleep", "60"])
    print(f"pids {os.getpid()} {grandchild.pid}", flush=True)
    time.sleep(60)

anyio.run(unblock, start_grandchild_and_sleep)
"""


def test_worker_death_kills_children(tmp_path: Path) -> None:
    script = tmp_path / "worker.py"
    script.write_text(WORKER_SCRIPT)
    worker = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert worker.stdout is not None
        line = worker.stdout.readline()  # bounded by the pytest timeout
        assert line.startswith("pids "), line
        child_pid, grandchild_pid = (int(pid) for pid in line.split()[1:])

        worker.kill()
        worker.wait(timeout=GONE_LIMIT)
    finally:
        if worker.poll() is None:
            worker.kill()

    deadline = time.monotonic() + GONE_LIMIT
    while not (process_gone(child_pid) and process_gone(grandchild_pid)):
        assert time.monotonic() < deadline, "child or grandchild outlived the worker"
        time.sleep(0.05)


def test_loop_on_background_thread() -> None:
    results: list[object] = []

    def run_loop() -> None:
        async def main() -> None:
            with anyio.fail_after(CALL_LIMIT):
                results.append(await unblock(add, 20, 22))
                results.append(await unblock(os.getpid))

        try:
            asyncio.run(main())
        except BaseException as exc:
            results.append(exc)

    thread = threading.Thread(target=run_loop)
    thread.start()
    thread.join(CALL_LIMIT * 2)

    assert not thread.is_alive()
    assert results[0] == 42
    assert isinstance(results[1], int)
    assert results[1] != os.getpid()
