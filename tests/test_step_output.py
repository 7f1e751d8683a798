"""Output of running steps: unblock lines and captured prints stored as the run's log."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import anyio
import psutil
import pytest

from pgskewer import ImprovedQueuer, Status, unblock

pytestmark = pytest.mark.anyio


def chatty(lines: int, gate: str) -> int:
    """Print lines, then wait until the gate file exists, then print one more."""
    for index in range(lines):
        print(f"line {index}", flush=True)
    deadline = time.monotonic() + 30
    while not os.path.exists(gate) and time.monotonic() < deadline:
        time.sleep(0.01)
    print("after gate", flush=True)
    return lines


def sleeper_with_grandchild(pid_file: str) -> None:
    """Start a grandchild ``sleep 60``, record both pids, then sleep."""
    import subprocess

    grandchild = subprocess.Popen(["sleep", "60"])
    with open(pid_file, "w") as handle:
        handle.write(f"{os.getpid()} {grandchild.pid}")
    time.sleep(60)


async def _worker(pgq: ImprovedQueuer) -> Any:
    task = asyncio.create_task(pgq.run(concurrency=4))
    await asyncio.sleep(0)
    return task


async def _stop(pgq: ImprovedQueuer, worker: Any) -> None:
    pgq.shutdown.set()
    with anyio.fail_after(30):
        await worker


async def test_unblock_lines_stream_live(queuer: ImprovedQueuer, tmp_path: Path) -> None:
    gate = tmp_path / "gate"

    @queuer.entrypoint("fetch")
    async def fetch(job: Any) -> int:
        return await unblock(chatty, 5, str(gate))

    @queuer.entrypoint("done")
    async def done(job: Any) -> str:
        return "ok"

    queuer.entrypoint_pipeline("talk", "fetch", "done")
    worker = await _worker(queuer)
    try:
        run_id = await queuer.enqueue("talk")
        seen: list[str] = []
        with anyio.fail_after(30):
            async for line in queuer.logs(run_id, follow=True):
                seen.append(line.text)
                if line.text == "line 4":
                    state = await queuer.run_status(run_id)
                    assert state.step("1").status is Status.RUNNING
                    gate.touch()
                if line.text == "after gate":
                    break
        result = await queuer.result(run_id, timeout=30)
    finally:
        await _stop(queuer, worker)

    assert seen == [f"line {index}" for index in range(5)] + ["after gate"]
    assert result is not None
    assert result["ok"]


async def test_unblock_lines_stored_with_step(queuer: ImprovedQueuer, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    gate.touch()

    @queuer.entrypoint("fetch")
    async def fetch(job: Any) -> int:
        return await unblock(chatty, 3, str(gate))

    worker = await _worker(queuer)
    try:
        run_id = await queuer.enqueue("fetch")
        result = await queuer.result(run_id, timeout=30)
        lines = [line async for line in queuer.logs(run_id)]
    finally:
        await _stop(queuer, worker)

    assert result is not None
    assert result["result"] == 3
    assert [line.text for line in lines] == ["line 0", "line 1", "line 2", "after gate"]
    assert {line.step for line in lines} == {"1"}
    assert {line.stream for line in lines} == {"stdout"}


async def test_cancel_pipeline_kills_unblock_child(queuer: ImprovedQueuer, tmp_path: Path) -> None:
    pid_file = tmp_path / "pids"

    @queuer.entrypoint("slow")
    async def slow(job: Any) -> None:
        await unblock(sleeper_with_grandchild, str(pid_file))

    @queuer.entrypoint("after")
    async def after(job: Any) -> None:
        return None

    queuer.entrypoint_pipeline("blocked", "slow", "after")
    worker = await _worker(queuer)
    try:
        run_id = await queuer.enqueue("blocked")
        with anyio.fail_after(30):
            while not pid_file.exists() or not pid_file.read_text():
                await anyio.sleep(0.05)
        child, grandchild = (int(pid) for pid in pid_file.read_text().split())

        await queuer.cancel(run_id)
        result = await queuer.result(run_id, timeout=30)

        with anyio.fail_after(10):
            while any(_alive(pid) for pid in (child, grandchild)):
                await anyio.sleep(0.05)
    finally:
        await _stop(queuer, worker)

    assert result is not None
    assert result["status"] == "canceled"
    assert not _alive(child)
    assert not _alive(grandchild)


async def test_capture_output_stores_prints(queuer: ImprovedQueuer) -> None:
    import logging

    @queuer.entrypoint("noisy", capture_output=True)
    async def noisy(job: Any) -> int:
        print("hello from the task")
        logging.getLogger("user.code").warning("a warning")
        return 1

    worker = await _worker(queuer)
    try:
        run_id = await queuer.enqueue("noisy")
        result = await queuer.result(run_id, timeout=30)
        lines = [line async for line in queuer.logs(run_id)]
    finally:
        await _stop(queuer, worker)

    assert result is not None
    assert result["ok"]
    texts = [(line.stream, line.text) for line in lines]
    assert ("stdout", "hello from the task") in texts
    assert ("log", "WARNING user.code: a warning") in texts


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def print_two_lines() -> None:
    """Print two lines from the child process."""
    print("first")
    print("second")


async def test_capture_output_with_unblock_no_duplicates(queuer: ImprovedQueuer) -> None:
    @queuer.entrypoint("mixed", capture_output=True)
    async def mixed(job: Any) -> None:
        print("from the task")
        await unblock(print_two_lines)

    worker = await _worker(queuer)
    try:
        run_id = await queuer.enqueue("mixed")
        result = await queuer.result(run_id, timeout=30)
        lines = [line.text async for line in queuer.logs(run_id)]
    finally:
        await _stop(queuer, worker)

    assert result is not None
    assert result["ok"]
    assert sorted(lines) == ["first", "from the task", "second"]


async def test_logs_tail_returns_last_lines(queuer: ImprovedQueuer, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    gate.touch()

    @queuer.entrypoint("fetch")
    async def fetch(job: Any) -> int:
        return await unblock(chatty, 5, str(gate))

    worker = await _worker(queuer)
    try:
        run_id = await queuer.enqueue("fetch")
        await queuer.result(run_id, timeout=30)
        last_two = [line.text async for line in queuer.logs(run_id, tail=2)]
        everything = [line.text async for line in queuer.logs(run_id, tail=100)]
        workers = await queuer.workers()
    finally:
        await _stop(queuer, worker)

    assert last_two == ["line 4", "after gate"]
    assert len(everything) == 6
    assert [row["alive"] for row in workers] == [True]


async def test_failed_step_traceback_in_logs(queuer: ImprovedQueuer) -> None:
    @queuer.entrypoint("broken")
    async def broken(job: Any) -> None:
        raise ValueError("bad input 42")

    worker = await _worker(queuer)
    try:
        run_id = await queuer.enqueue("broken")
        result = await queuer.result(run_id, timeout=30)
        lines = [line async for line in queuer.logs(run_id)]
    finally:
        await _stop(queuer, worker)

    assert result is not None
    assert not result["ok"]
    assert lines[0].stream == "system"
    assert lines[0].text == "[pgskewer] attempt 1 failed: ValueError: bad input 42"
    assert any("raise ValueError" in line.text for line in lines)
