"""The session inside a real ipykernel: blocking cells, interrupts, re-run cells, redefinitions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from typing import Any

import pytest
from kernel_harness import ROOT, Kernel

from pgskewer.model import Status
from pgskewer.notebook import Session

pytestmark = pytest.mark.kernel

SETUP = textwrap.dedent(
    """
    import asyncio, threading, time
    from pgskewer.notebook import Session

    session = Session()

    @session.task
    async def step(job):
        await asyncio.sleep(0.3)
        return "ok"

    @session.task
    async def slow(job):
        await asyncio.sleep(3)
        return "slow done"

    session.pipeline("flow", step, [step, step], step)
    """
)


def client(dsn: str) -> Session:
    return Session(dsn, start_worker=False, replace=False)


def wait_for_status(session: Session, run_id: int, statuses: set[Status], timeout: float) -> Status:
    """Poll the run's status every 50 ms until it is one of ``statuses``."""
    deadline = time.monotonic() + timeout
    while True:
        status = session.status(run_id).status
        if status in statuses:
            return status
        if time.monotonic() > deadline:
            expected = sorted(statuses)
            pytest.fail(f"run {run_id} is {status}, not one of {expected}, after {timeout} s")
        time.sleep(0.05)


def test_worker_finishes_during_blocking_cell(kernel: Kernel, dsn: str) -> None:
    kernel.run(SETUP)
    run_id = kernel.value("(run := session.enqueue('flow')).id")
    sleeping = kernel.send("time.sleep(5)")

    with client(dsn) as observer:
        wait_for_status(observer, run_id, {Status.SUCCESSFUL}, timeout=4.5)

    with pytest.raises(TimeoutError):
        kernel.wait(sleeping, timeout=0)  # the blocking cell is still running
    kernel.wait(sleeping, timeout=10)
    assert kernel.value("run.result(timeout=10)['status']") == "successful"


def test_interrupt_during_result(kernel: Kernel, dsn: str) -> None:
    kernel.run(SETUP)
    run_id = kernel.value("(run := session.enqueue('slow')).id")
    waiting = kernel.send("run.result()")
    with client(dsn) as observer:
        wait_for_status(observer, run_id, {Status.RUNNING}, timeout=10)
        start = kernel.mark()
        interrupted_at = time.monotonic()
        kernel.interrupt()
        arrived, error = kernel.wait_for(
            lambda m: m["msg_type"] == "error" and m["parent_header"].get("msg_id") == waiting,
            timeout=5,
            start=start,
        )
        assert arrived - interrupted_at < 1.0
        assert error["content"]["ename"] == "KeyboardInterrupt"
        assert observer.status(run_id).status is Status.RUNNING

    kernel.wait(waiting)
    assert kernel.value("run.result(timeout=20)['result']") == "slow done"


def test_interrupt_during_await(kernel: Kernel, dsn: str) -> None:
    kernel.run(SETUP)
    run_id = kernel.value("(run := session.enqueue('slow')).id")
    waiting = kernel.send("await run")
    with client(dsn) as observer:
        wait_for_status(observer, run_id, {Status.RUNNING}, timeout=10)
        start = kernel.mark()
        interrupted_at = time.monotonic()
        kernel.interrupt()
        arrived, error = kernel.wait_for(
            lambda m: m["msg_type"] == "error" and m["parent_header"].get("msg_id") == waiting,
            timeout=5,
            start=start,
        )
        assert arrived - interrupted_at < 1.0
        assert error["content"]["ename"] in {"KeyboardInterrupt", "CancelledError"}
        assert observer.status(run_id).status is Status.RUNNING

    kernel.wait(waiting)
    assert kernel.value("(await run)['result']") == "slow done"


def test_rerun_setup_leaves_one_worker(kernel: Kernel) -> None:
    kernel.run(SETUP)
    kernel.run("first = session")
    kernel.run(SETUP)
    kernel.run(SETUP)

    threads = kernel.value(
        "[t.name for t in threading.enumerate() if t.name.startswith('pgskewer-session')]"
    )
    assert len(threads) == 1
    assert kernel.value("first.closed") is True
    assert kernel.value("len(session.workers())") == 1
    assert kernel.value("session.enqueue('flow').result(timeout=30)['status']") == "successful"


def test_redefined_task_runs(kernel: Kernel) -> None:
    kernel.run(SETUP)
    kernel.run("@session.task\nasync def compute(job):\n    return 'first'")
    assert kernel.value("session.enqueue('compute').result(timeout=30)['result']") == "first"
    kernel.run("@session.task\nasync def compute(job):\n    return 'second'")
    assert kernel.value("session.enqueue('compute').result(timeout=30)['result']") == "second"


def test_unblock_output_not_echoed(kernel: Kernel) -> None:
    kernel.run(SETUP)
    kernel.run(
        textwrap.dedent(
            """
            import pgskewer

            def noisy():
                print("line from the child")
                return 3

            @session.task
            async def uses_child(job):
                return await pgskewer.unblock(noisy)
            """
        )
    )
    execution = kernel.run(
        "run = session.enqueue('uses_child')\nprint(run.result(timeout=60)['result'])",
        timeout=90,
    )
    assert execution.stdout.strip() == "3"
    every_stream = [m["content"]["text"] for _, m in kernel.messages if m["msg_type"] == "stream"]
    assert not any("line from the child" in text for text in every_stream)
    assert kernel.value("[line.text for line in run.logs()]") == ["line from the child"]


def test_works_with_nest_asyncio_applied(kernel: Kernel) -> None:
    pytest.importorskip("nest_asyncio")
    kernel.run("import nest_asyncio\nnest_asyncio.apply()")
    kernel.run(SETUP)
    kernel.run("run = session.enqueue('flow')")
    assert kernel.value("run.result(timeout=30)['status']") == "successful"
    assert kernel.value("(await run)['status']") == "successful"
    assert kernel.value("asyncio.run(run.wait(timeout=30))['status']") == "successful"
    assert (
        kernel.value(
            "asyncio.get_event_loop().run_until_complete("
            "session.enqueue('flow').wait(timeout=30))['status']"
        )
        == "successful"
    )


def test_script_client_with_kernel_worker(kernel: Kernel, dsn: str) -> None:
    kernel.run(SETUP)
    kernel.run(
        "import pgskewer\n"
        "@session.task\n"
        "async def greet(job):\n"
        "    return 'hello ' + pgskewer.parse_payload(job.payload)['name']"
    )
    script = textwrap.dedent(
        """
        import json
        from pgskewer.notebook import Session

        with Session(start_worker=False) as client:
            run = client.enqueue("greet", {"name": "script"})
            print(json.dumps(run.result(timeout=30)))
        """
    )
    env = dict(os.environ, PGSKEWER_DSN=dsn)
    completed = subprocess.run(
        [sys.executable, "-c", script],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    result: dict[str, Any] = json.loads(completed.stdout.strip().splitlines()[-1])
    assert result["status"] == "successful"
    assert result["result"] == "hello script"
