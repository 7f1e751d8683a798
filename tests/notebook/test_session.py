"""The notebook session in-process, as a script or web application uses it, on a real database."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from pgskewer import _context
from pgskewer.model import Status
from pgskewer.notebook import PipelineRun, RunsTable, Session, current_session


def wait_until(
    check: Callable[[], bool], timeout: float = 20.0, description: str = "condition"
) -> None:
    """Poll ``check`` every 50 ms until it is true, failing after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {description}")
        time.sleep(0.05)


def wait_for_status(run: PipelineRun, status: Status, timeout: float = 20.0) -> None:
    wait_until(lambda: run.status().status is status, timeout, f"run {run.id} to be {status}")


def session_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("pgskewer-session")]


def test_pipeline_runs_to_success(session: Session) -> None:
    @session.task
    async def fetch(job: Any) -> int:
        print("fetching")
        return 1

    @session.task
    async def double(job: Any) -> int:
        return 2

    session.pipeline("etl", fetch, [double, double], "fetch")
    run = session.enqueue("etl", {"day": "2026-01-01"})

    result = run.result(timeout=30)

    assert result["status"] == "successful"
    assert result["ok"] is True
    state = run.status()
    assert state.status is Status.SUCCESSFUL
    assert [step.path for step in state.steps] == ["1", "2.0", "2.1", "3"]
    assert [line.text for line in run.logs()] == ["fetching", "fetching"]
    assert [line.step for line in run.logs(step="3")] == ["3"]


def test_result_timeout_leaves_run_going(session: Session) -> None:
    @session.task
    async def slow(job: Any) -> str:
        await asyncio.sleep(1.0)
        return "done"

    run = session.enqueue("slow")
    started = time.monotonic()
    with pytest.raises(TimeoutError, match=f"run {run.id} did not finish within 0.2 s"):
        run.result(timeout=0.2)
    assert time.monotonic() - started < 1.0

    result = run.result(timeout=30)
    assert result["status"] == "successful"
    assert result["result"] == "done"


def test_interrupt_stops_sync_wait(session: Session) -> None:
    @session.task
    async def slow(job: Any) -> str:
        await asyncio.sleep(2.0)
        return "done"

    run = session.enqueue("slow")
    wait_for_status(run, Status.RUNNING)
    sent: list[float] = []

    def interrupt() -> None:
        sent.append(time.monotonic())
        os.kill(os.getpid(), signal.SIGINT)

    timer = threading.Timer(0.3, interrupt)
    timer.start()
    with pytest.raises(KeyboardInterrupt):
        run.result()
    latency = time.monotonic() - sent[0]
    timer.join()

    assert latency < 0.3
    assert run.status().status is Status.RUNNING
    assert run.result(timeout=30)["status"] == "successful"


def test_cancelled_await_leaves_run_going(session: Session) -> None:
    @session.task
    async def slow(job: Any) -> str:
        await asyncio.sleep(1.5)
        return "done"

    run = session.enqueue("slow")

    async def await_then_cancel() -> float:
        waiter = asyncio.create_task(run.wait())
        await asyncio.sleep(0.3)
        cancelled_at = time.monotonic()
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        return time.monotonic() - cancelled_at

    assert asyncio.run(await_then_cancel()) < 0.3
    assert run.status().status in {Status.QUEUED, Status.RUNNING}
    result = asyncio.run(run.wait(timeout=30))
    assert result["status"] == "successful"


def test_await_timeout(session: Session) -> None:
    @session.task
    async def slow(job: Any) -> None:
        await asyncio.sleep(1.0)

    run = session.enqueue("slow")
    with pytest.raises(TimeoutError):
        asyncio.run(run.wait(timeout=0.2))
    assert asyncio.run(run.wait(timeout=30))["status"] == "successful"


def test_cancel_then_retry(session: Session) -> None:
    @session.task
    async def stuck(job: Any) -> str:
        await asyncio.sleep(60)
        return "slow"

    run = session.enqueue("stuck")
    wait_for_status(run, Status.RUNNING)
    run.cancel()
    result = run.result(timeout=30)
    assert result["status"] == "canceled"
    assert run.status().status is Status.CANCELED

    @session.task("stuck")
    async def quick(job: Any) -> str:
        return "fast"

    again = run.retry()
    assert again.id == run.id
    result = again.result(timeout=30)
    assert result["status"] == "successful"
    assert result["result"] == "fast"


def test_cancel_soon_from_another_thread(session: Session) -> None:
    @session.task
    async def stuck(job: Any) -> None:
        await asyncio.sleep(60)

    run = session.enqueue("stuck")
    wait_for_status(run, Status.RUNNING)
    thread = threading.Thread(target=session.cancel_soon, args=(run.id,))
    thread.start()
    thread.join(5)
    assert run.result(timeout=30)["status"] == "canceled"


def test_redefined_task_runs_new_code(session: Session) -> None:
    @session.task("version")
    async def first(job: Any) -> int:
        return 1

    assert session.enqueue("version").result(timeout=30)["result"] == 1

    @session.task("version")
    async def second(job: Any) -> int:
        return 2

    assert session.enqueue("version").result(timeout=30)["result"] == 2


def test_failed_step_is_reported(session: Session) -> None:
    @session.task
    async def boom(job: Any) -> None:
        raise ValueError("bad input")

    @session.task
    async def never(job: Any) -> None:
        return None

    session.pipeline("fails", boom, never)
    run = session.enqueue("fails")
    result = run.result(timeout=30)
    assert result["status"] == "exception"
    state = run.status()
    assert state.failed_step == "1"
    assert state.step("1").error is not None
    assert state.step("2").status is Status.SKIPPED


def test_namespaces_keep_jobs_apart(dsn: str) -> None:
    with (
        Session(dsn, namespace="nb1", replace=False) as one,
        Session(dsn, namespace="nb2", replace=False) as two,
    ):

        @one.task("who")
        async def who_one(job: Any) -> str:
            return "nb1"

        @two.task("who")
        async def who_two(job: Any) -> str:
            return "nb2"

        one.pipeline("flow", "who")
        runs = [one.enqueue("who") for _ in range(3)] + [two.enqueue("who") for _ in range(3)]

        assert [run.name for run in runs] == ["nb1.who"] * 3 + ["nb2.who"] * 3
        assert [run.result(timeout=30)["result"] for run in runs] == ["nb1"] * 3 + ["nb2"] * 3
        assert one.entrypoint_name("who") == "nb1.who"
        assert one.entrypoint_name("nb1.who") == "nb1.who"
        flow = one.enqueue("flow")
        assert flow.status().graph["steps"][0]["name"] == "nb1.who"
        assert flow.result(timeout=30)["ok"] is True

        with Session(dsn, namespace="nb2", start_worker=False, replace=False) as client:
            run = client.enqueue("who")
            assert run.name == "nb2.who"
            assert run.result(timeout=30)["result"] == "nb2"


def test_client_session_with_separate_worker(dsn: str) -> None:
    with Session(dsn, replace=False) as worker:

        @worker.task
        async def hello(job: Any) -> str:
            return "hi"

        with Session(dsn, start_worker=False, replace=False) as client:
            assert not client.worker_running
            run = client.enqueue("hello")
            assert run.result(timeout=30)["result"] == "hi"
            assert client.attach(run.id) == run


def test_new_session_replaces_current(dsn: str) -> None:
    first = Session(dsn)
    try:
        assert current_session() is first
        second = Session(dsn)
        try:
            assert first.closed
            assert current_session() is second
            assert len(session_threads()) == 1
            assert second.worker_running
        finally:
            second.close()
    finally:
        first.close()
    assert current_session() is None
    assert session_threads() == []


def test_close_is_idempotent(dsn: str) -> None:
    with Session(dsn) as opened:
        assert opened.worker_running
        opened.start_worker()
        opened.stop_worker()
        opened.stop_worker()
        assert not opened.worker_running
        opened.start_worker()
        assert opened.worker_running
    assert opened.closed
    opened.close()
    opened.stop_worker()
    with pytest.raises(RuntimeError, match="session is closed"):
        opened.enqueue("anything")
    assert session_threads() == []


def test_attach_runs_and_workers(session: Session) -> None:
    @session.task
    async def noop(job: Any) -> None:
        return None

    run = session.enqueue("noop")
    run.result(timeout=30)

    attached = session.attach(run.id)
    assert attached == run
    assert attached.name == "noop"
    with pytest.raises(LookupError):
        session.attach(999_999)

    table = session.runs()
    assert isinstance(table, RunsTable)
    assert [state.id for state in table] == [run.id]
    assert f'data-run-id="{run.id}"' in table._repr_html_()
    assert "successful" in repr(table)
    assert session.runs(status="canceled") == []
    with pytest.raises(ValueError):
        session.runs(status="finished")

    workers = session.workers()
    assert len(workers) == 1
    assert "noop" in workers[0].entrypoints
    assert workers[0].pid == os.getpid()


def test_echo_output_off_on_session_loop(session: Session) -> None:
    async def read() -> bool:
        return _context.echo_output.get()

    assert session.run_async(read()) is False
    assert _context.echo_output.get() is True


def test_run_bundle_outside_kernel(session: Session) -> None:
    @session.task
    async def noop(job: Any) -> None:
        print("output line")

    run = session.enqueue("noop")
    run.result(timeout=30)
    bundle = run._repr_mimebundle_()
    assert set(bundle) == {"text/html", "text/plain"}
    assert "pgs-st-successful" in bundle["text/html"]
    assert "output line" in bundle["text/html"]
    assert bundle["text/plain"].startswith(f"run {run.id} · noop (task) · successful")


def test_invalid_arguments(dsn: str) -> None:
    with pytest.raises(ValueError, match="invalid namespace"):
        Session(dsn, namespace="two words")
    assert current_session() is None
