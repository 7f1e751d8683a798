"""Hard cases of the core on a real PostgreSQL: graph shapes, cancel races, odd payloads.

Tests that probe a defect fail until it is fixed. Each of them states what it expects.
"""

from __future__ import annotations

import asyncio
import decimal
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import anyio.lowlevel
import numpy
import pytest
from support.edge_waits import queued_job_priority, state_after_job_ends
from support.harness import (
    result_of,
    running_worker,
    wait_event,
    wait_for_step,
)

import pgskewer
from pgskewer import DuplicateRunError, ImprovedQueuer, RunNotFoundError, Status, parse_payload

pytestmark = pytest.mark.anyio


def recorder(name: str, seen: dict[str, list[Any]]) -> Any:
    """Return a task that appends its decoded payload to ``seen[name]`` and returns its path."""

    async def record(job: Any) -> str:
        payload = parse_payload(job.payload)
        seen.setdefault(name, []).append(payload)
        return f"{name}@{payload['pipeline']['step']}"

    return record


def register_recorders(pgq: ImprovedQueuer, names: list[str]) -> dict[str, list[Any]]:
    seen: dict[str, list[Any]] = {}
    for name in names:
        pgq.entrypoint(name)(recorder(name, seen))
    return seen


def gate(started: asyncio.Event, release: asyncio.Event, value: Any = "gate done") -> Any:
    """Return a task that sets ``started`` and returns ``value`` once ``release`` is set."""

    async def wait_for_release(job: Any) -> Any:
        started.set()
        await release.wait()
        return value

    return wait_for_release


# -- graph shapes and payloads ------------------------------------------------------


async def test_nested_pipeline_in_group(queuer: ImprovedQueuer) -> None:
    seen = register_recorders(queuer, ["a", "p1", "p2", "b", "c"])
    queuer.entrypoint_pipeline("inner", "p1", "p2")
    queuer.entrypoint_pipeline("outer", "a", ["inner", "b"], "c")

    async with running_worker(queuer):
        run_id = await queuer.enqueue("outer", {"n": 1})
        result = await result_of(queuer, run_id)

    state = await queuer.run_status(run_id)
    tasks = result["result"]["tasks"]
    assert result["status"] == "successful"
    assert [step.path for step in state.steps] == ["1", "2.0.1", "2.0.2", "2.1", "3"]
    assert seen["p2"][0]["pipeline"]["step"] == "2.0.2"
    assert seen["p2"][0]["pipeline"]["steps"] == ["a", ["inner", "b"], "c"]
    assert list(seen["p1"][0]["tasks"]) == ["a"]
    assert list(seen["p2"][0]["tasks"]) == ["a", "p1"]
    assert list(seen["b"][0]["tasks"]) == ["a"]
    assert list(seen["c"][0]["tasks"]) == ["a", "inner", "b"]
    assert list(seen["c"][0]["tasks"]["inner"]["result"]["tasks"]) == ["p1", "p2"]
    assert list(tasks) == ["a", "inner", "b", "c"]
    assert tasks["inner"]["status"] == "successful"
    assert tasks["inner"]["result"]["tasks"]["p2"]["result"] == "p2@2.0.2"
    assert result["result"]["initial"] == {"n": 1}


async def test_group_inside_nested_pipeline(queuer: ImprovedQueuer) -> None:
    seen = register_recorders(queuer, ["a", "x", "y1", "y2", "z"])
    queuer.entrypoint_pipeline("inner", "x", ["y1", "y2"], "z")
    queuer.entrypoint_pipeline("outer", "a", "inner")

    async with running_worker(queuer):
        run_id = await queuer.enqueue("outer")
        result = await result_of(queuer, run_id)

    state = await queuer.run_status(run_id)
    inner = result["result"]["tasks"]["inner"]
    assert result["status"] == "successful"
    assert [step.path for step in state.steps] == ["1", "2.1", "2.2.0", "2.2.1", "2.3"]
    assert list(seen["y2"][0]["tasks"]) == ["a", "x"]
    assert list(seen["z"][0]["tasks"]) == ["a", "x", "y1", "y2"]
    assert seen["z"][0]["initial"] is None
    assert list(inner["result"]["tasks"]) == ["x", "y1", "y2", "z"]
    assert inner["result"]["tasks"]["y1"]["result"] == "y1@2.2.0"


async def test_pipeline_nests_one_twice(queuer: ImprovedQueuer) -> None:
    seen = register_recorders(queuer, ["p", "mid"])
    queuer.entrypoint_pipeline("inner", "p")
    queuer.entrypoint_pipeline("outer", "inner", "mid", "inner")

    async with running_worker(queuer):
        run_id = await queuer.enqueue("outer")
        result = await result_of(queuer, run_id)

    state = await queuer.run_status(run_id)
    tasks = result["result"]["tasks"]
    assert result["status"] == "successful"
    assert [step.path for step in state.steps] == ["1.1", "2", "3.1"]
    assert [payload["pipeline"]["step"] for payload in seen["p"]] == ["1.1", "3.1"]
    assert list(seen["p"][1]["tasks"]) == ["inner", "mid"]
    # A later result replaces an earlier one under the same name and moves to the end.
    assert list(tasks) == ["mid", "inner"]
    assert tasks["inner"]["result"]["tasks"]["p"]["result"] == "p@3.1"


async def test_same_task_twice(queuer: ImprovedQueuer) -> None:
    seen = register_recorders(queuer, ["a"])
    queuer.entrypoint_pipeline("twice", ["a", "a"])

    async with running_worker(queuer):
        run_id = await queuer.enqueue("twice")
        result = await result_of(queuer, run_id)

    state = await queuer.run_status(run_id)
    async with queuer.pool.acquire() as connection:
        stored = await connection.fetch(
            "SELECT path, result::text AS result FROM pgskewer_results "
            "WHERE run_id = $1 AND path <> '' ORDER BY path",
            run_id,
        )
    assert result["status"] == "successful"
    assert seen["a"][1]["tasks"] == {"a": {"status": "successful", "ok": True, "result": "a@1"}}
    assert result["result"]["tasks"] == {"a": {"status": "successful", "ok": True, "result": "a@2"}}
    assert [(step.path, step.task, step.status) for step in state.steps] == [
        ("1", "a", Status.SUCCESSFUL),
        ("2", "a", Status.SUCCESSFUL),
    ]
    assert [(row["path"], row["result"]) for row in stored] == [("1", '"a@1"'), ("2", '"a@2"')]


async def test_step_overrides_apply(queuer: ImprovedQueuer) -> None:
    calls = {"flaky": 0}
    never = asyncio.Event()
    seen = register_recorders(queuer, ["after"])

    @queuer.entrypoint("flaky")
    async def flaky(job: Any) -> str:
        calls["flaky"] += 1
        if calls["flaky"] == 1:
            raise OSError("first attempt fails")
        return "recovered"

    @queuer.entrypoint("slow")
    async def slow(job: Any) -> str:
        await never.wait()
        return "not reached"

    queuer.entrypoint_pipeline(
        "tuned",
        pgskewer.step("flaky", retries=1, retry_backoff=0.05),
        pgskewer.step("slow", timeout=0.3, crashable=True),
        "after",
    )

    async with running_worker(queuer):
        run_id = await queuer.enqueue("tuned")
        result = await result_of(queuer, run_id)

    state = await queuer.run_status(run_id)
    slow_seen = seen["after"][0]["tasks"]["slow"]
    assert result["status"] == "successful"
    assert state.step("1").attempts == 2
    assert state.step("2").status is Status.EXCEPTION
    assert slow_seen["error"]["type"] == "TimeoutError"
    assert "0.3s" in slow_seen["error"]["message"]
    assert queuer.registry.task("flaky").options.retries == 0  # type: ignore[union-attr]


async def test_pipeline_cycle_rejected(queuer: ImprovedQueuer) -> None:
    queuer.entrypoint_pipeline("p", "q")

    with pytest.raises(ValueError, match="contains itself") as raised:
        queuer.entrypoint_pipeline("q", "p")
    with pytest.raises(ValueError, match="contains itself"):
        queuer.entrypoint_pipeline("self_loop", "a", "self_loop")

    assert "q -> p -> q" in str(raised.value)
    assert queuer.registry.pipeline("q") is None
    assert queuer.registry.pipeline("self_loop") is None


async def test_invalid_step_override(queuer: ImprovedQueuer) -> None:
    # Expected: an invalid override is rejected when the pipeline is defined. Accepting it
    # is fine only if a run of the pipeline still ends.
    register_recorders(queuer, ["x"])
    try:
        queuer.entrypoint_pipeline("broken", pgskewer.step("x", retries=-1))
    except ValueError:
        return

    async with running_worker(queuer):
        run_id = await queuer.enqueue("broken")
        state = await state_after_job_ends(queuer, run_id, "1")

    assert state.step("1").status.is_terminal, (
        f"step 1 is still {state.step('1').status.value} after its job ended: the invalid "
        "override was accepted and the run can never finish"
    )


async def test_override_on_nested_pipeline(queuer: ImprovedQueuer) -> None:
    # Expected: options on a step that names a pipeline are applied or rejected, not
    # dropped silently.
    release = asyncio.Event()
    started = asyncio.Event()
    queuer.entrypoint("slow")(gate(started, release))
    queuer.entrypoint_pipeline("inner", "slow")
    try:
        queuer.entrypoint_pipeline("outer", pgskewer.step("inner", timeout=0.2))
    except (TypeError, ValueError):
        return

    async with running_worker(queuer):
        run_id = await queuer.enqueue("outer")
        await wait_event(started, "the nested step to start")
        with anyio.move_on_after(1.5):
            await queuer.result(run_id)
        release.set()
        result = await result_of(queuer, run_id)

    assert result["status"] == "exception", "timeout=0.2 on the nested pipeline was ignored"


# -- cancel races -------------------------------------------------------------------


async def test_cancel_right_after_enqueue(queuer: ImprovedQueuer) -> None:
    register_recorders(queuer, ["a", "b"])
    queuer.entrypoint_pipeline("quick", "a", "b")

    async with running_worker(queuer):
        run_ids = []
        for _ in range(10):
            run_id = await queuer.enqueue("quick")
            await queuer.cancel(run_id)
            run_ids.append(run_id)
        with anyio.fail_after(30):
            results = [await result_of(queuer, run_id) for run_id in run_ids]
        states = [await queuer.run_status(run_id) for run_id in run_ids]

    async with queuer.pool.acquire() as connection:
        left = await connection.fetchval("SELECT count(*) FROM pgqueuer")
    assert [result["status"] for result in results] == ["canceled"] * 10
    assert all(step.status.is_terminal for state in states for step in state.steps)
    assert [state.step("2").status for state in states] == [Status.SKIPPED] * 10
    assert left == 0


async def test_cancel_twice_and_finished(queuer: ImprovedQueuer) -> None:
    started, release = asyncio.Event(), asyncio.Event()
    register_recorders(queuer, ["a"])
    queuer.entrypoint("hold")(gate(started, release))
    queuer.entrypoint_pipeline("held", "a", "hold")
    queuer.entrypoint_pipeline("plain", "a")

    async with running_worker(queuer):
        run_id = await queuer.enqueue("held")
        await wait_event(started, "the held step to start")
        first = await queuer.cancel(run_id)
        second = await queuer.cancel(run_id)
        canceled = await result_of(queuer, run_id)
        third = await queuer.cancel(run_id)

        done_id = await queuer.enqueue("plain")
        done = await result_of(queuer, done_id)
        on_finished = await queuer.cancel(done_id)

    assert first in (Status.CANCELING, Status.CANCELED)
    assert second in (Status.CANCELING, Status.CANCELED)
    assert third is Status.CANCELED
    assert canceled["status"] == "canceled"
    assert on_finished is Status.SUCCESSFUL
    assert await queuer.result(done_id, timeout=1) == done
    assert (await queuer.run_status(done_id)).status is Status.SUCCESSFUL


async def test_cancel_during_retry_backoff(queuer: ImprovedQueuer) -> None:
    calls = {"failing": 0}

    @queuer.entrypoint("failing", retries=3, retry_backoff=5)
    async def failing(job: Any) -> None:
        calls["failing"] += 1
        raise RuntimeError("always fails")

    queuer.entrypoint_pipeline("backoff", "failing")

    async with running_worker(queuer):
        pipeline_id = await queuer.enqueue("backoff")
        task_id = await queuer.enqueue("failing")
        await wait_for_step(queuer, pipeline_id, "1", Status.RETRYING)
        await wait_for_step(queuer, task_id, "1", Status.RETRYING)
        with anyio.fail_after(3):  # well before the 5 s backoff ends
            pipeline_status = await queuer.cancel(pipeline_id)
            task_status = await queuer.cancel(task_id)
            pipeline_result = await queuer.result(pipeline_id)
            task_result = await queuer.result(task_id)

    async with queuer.pool.acquire() as connection:
        left = await connection.fetchval("SELECT count(*) FROM pgqueuer")
    assert pipeline_status is Status.CANCELED
    assert task_status is Status.CANCELED
    assert pipeline_result is not None
    assert pipeline_result["status"] == "canceled"
    assert task_result is not None
    assert task_result["status"] == "canceled"
    assert calls["failing"] == 2
    assert left == 0


async def test_cancel_mixed_group(queuer: ImprovedQueuer) -> None:
    started, never = asyncio.Event(), asyncio.Event()
    register_recorders(queuer, ["a", "fast", "after"])
    # concurrency_limit=1 keeps the second "slow" member queued while the first runs.
    queuer.entrypoint("slow", concurrency_limit=1)(gate(started, never))
    queuer.entrypoint_pipeline("mixed", "a", ["fast", "slow", "slow"], "after")

    async with running_worker(queuer):
        run_id = await queuer.enqueue("mixed")
        await wait_event(started, "one slow member to start")
        await wait_for_step(queuer, run_id, "2.0", Status.SUCCESSFUL)
        before = await queuer.run_status(run_id)
        await queuer.cancel(run_id)
        result = await result_of(queuer, run_id)

    state = await queuer.run_status(run_id)
    slow_statuses = sorted(before.step(path).status.value for path in ("2.1", "2.2"))
    assert slow_statuses == ["queued", "running"]
    assert result["status"] == "canceled"
    assert result["result"]["tasks"]["fast"]["status"] == "successful"
    assert result["result"]["tasks"]["slow"]["status"] == "canceled"
    assert state.step("2.1").status is Status.CANCELED
    assert state.step("2.2").status is Status.CANCELED
    assert sorted(state.step(path).attempts for path in ("2.1", "2.2")) == [0, 1]
    assert state.step("3").status is Status.SKIPPED


async def test_retry_rejects_other_runs(queuer: ImprovedQueuer) -> None:
    started, release = asyncio.Event(), asyncio.Event()
    queuer.entrypoint("hold")(gate(started, release))
    queuer.entrypoint_pipeline("held", "hold")

    async with running_worker(queuer):
        run_id = await queuer.enqueue("held")
        await wait_event(started, "the held step to start")
        with pytest.raises(ValueError, match="is running") as while_running:
            await queuer.retry(run_id)
        release.set()
        await result_of(queuer, run_id)
        with pytest.raises(ValueError, match="is successful"):
            await queuer.retry(run_id)
        with pytest.raises(RunNotFoundError):
            await queuer.retry(run_id + 10_000)

    assert "only a run that ended exception or canceled" in str(while_running.value)
    assert (await queuer.run_status(run_id)).status is Status.SUCCESSFUL


async def test_retry_with_taken_dedupe_key(queuer: ImprovedQueuer) -> None:
    # Expected: DuplicateRunError naming the key, as enqueue raises for a taken key.
    started, release = asyncio.Event(), asyncio.Event()

    @queuer.entrypoint("broken")
    async def broken(job: Any) -> None:
        raise ValueError("broken")

    queuer.entrypoint("hold")(gate(started, release))
    queuer.entrypoint_pipeline("fails", "broken")
    queuer.entrypoint_pipeline("held", "hold")

    async with running_worker(queuer):
        failed_id = await queuer.enqueue("fails", dedupe_key="nightly")
        await result_of(queuer, failed_id)
        holder_id = await queuer.enqueue("held", dedupe_key="nightly")
        await wait_event(started, "the second run with the key to start")
        try:
            await queuer.retry(failed_id)
        except DuplicateRunError as exc:
            raised: BaseException | None = exc
        except Exception as exc:  # the defect hides the unique violation
            raised = exc
        else:
            raised = None
        release.set()
        await result_of(queuer, holder_id)

    assert isinstance(raised, DuplicateRunError), (
        f"retry raised {type(raised).__name__}: {raised}, not DuplicateRunError"
    )
    assert raised.dedupe_key == "nightly"


async def test_dedupe_key_after_cancel(queuer: ImprovedQueuer) -> None:
    started, never = asyncio.Event(), asyncio.Event()
    queuer.entrypoint("hold")(gate(started, never))
    queuer.entrypoint_pipeline("held", "hold")

    async with running_worker(queuer):
        first = await queuer.enqueue("held", dedupe_key="only-one")
        await wait_event(started, "the first run to start")
        with pytest.raises(DuplicateRunError):
            await queuer.enqueue("held", dedupe_key="only-one")
        await queuer.cancel(first)
        await result_of(queuer, first)
        second = await queuer.enqueue("held", dedupe_key="only-one")
        await queuer.cancel(second)
        second_result = await result_of(queuer, second)

    assert second != first
    assert second_result["status"] == "canceled"


# -- waiting, ids, scheduling -------------------------------------------------------


async def test_many_waiters_one_run(queuer: ImprovedQueuer) -> None:
    started, release = asyncio.Event(), asyncio.Event()
    queuer.entrypoint("hold")(gate(started, release, value={"answer": 42}))
    queuer.entrypoint_pipeline("held", "hold")

    async with running_worker(queuer):
        run_id = await queuer.enqueue("held")
        await wait_event(started, "the held step to start")
        results: list[Any] = []

        async def wait_for_result() -> None:
            results.append(await queuer.result(run_id, timeout=40))

        with anyio.fail_after(45):
            async with anyio.create_task_group() as group:
                for _ in range(200):
                    group.start_soon(wait_for_result)
                await anyio.lowlevel.checkpoint()
                release.set()

    statuses = {result["status"] if result else None for result in results}
    assert len(results) == 200
    assert statuses == {"successful"}
    assert results[0]["result"]["tasks"]["hold"]["result"] == {"answer": 42}


async def test_result_by_step_job_id(queuer: ImprovedQueuer) -> None:
    # Expected: like run_status and cancel, result accepts the job id of a later step.
    register_recorders(queuer, ["a", "b"])
    queuer.entrypoint_pipeline("two", "a", "b")

    async with running_worker(queuer):
        run_id = await queuer.enqueue("two")
        finished = await result_of(queuer, run_id)

    job_id = (await queuer.run_status(run_id)).step("2").job_id
    assert job_id is not None
    assert (await queuer.run_status(job_id)).id == run_id
    with anyio.fail_after(10):
        by_job = await queuer.result(job_id, timeout=3)
    assert by_job == finished, f"result({job_id}) of a finished run's step job returned {by_job}"


async def test_execute_after_forms(queuer: ImprovedQueuer) -> None:
    register_recorders(queuer, ["a"])
    queuer.entrypoint_pipeline("later", "a")
    delays = {
        "seconds": 1.0,
        "timedelta": timedelta(seconds=1),
        "datetime": datetime.now(UTC) + timedelta(seconds=1),
    }

    with pytest.raises(ValueError, match="timezone-aware"):
        await queuer.enqueue("later", execute_after=datetime.now() + timedelta(seconds=1))

    async with running_worker(queuer):
        run_ids = {
            form: await queuer.enqueue("later", execute_after=delay)
            for form, delay in delays.items()
        }
        with anyio.fail_after(30):
            for run_id in run_ids.values():
                await result_of(queuer, run_id)

    for form, run_id in run_ids.items():
        state = await queuer.run_status(run_id)
        started_at = state.step("1").started_at
        assert started_at is not None
        waited = (started_at - state.created_at).total_seconds()
        assert waited >= 0.8, f"execute_after as {form} started after {waited:.2f}s"


async def test_priority_reaches_later_steps(queuer: ImprovedQueuer) -> None:
    # Expected: every job of a run carries the priority given to enqueue.
    started, release = asyncio.Event(), asyncio.Event()
    register_recorders(queuer, ["a"])
    queuer.entrypoint("hold")(gate(started, release))
    queuer.entrypoint_pipeline("urgent", "a", "hold")

    async with running_worker(queuer):
        run_id = await queuer.enqueue("urgent", priority=7)
        await wait_event(started, "the second step to start")
        state = await queuer.run_status(run_id)
        second_job = state.step("2").job_id
        assert second_job is not None
        second_priority = await queued_job_priority(queuer, second_job)
        release.set()
        await result_of(queuer, run_id)

    async with queuer.pool.acquire() as connection:
        first_priority = await connection.fetchval(
            "SELECT priority FROM pgqueuer_log WHERE job_id = $1 LIMIT 1", run_id
        )
    assert first_priority == 7
    assert second_priority == 7, f"step 2 of a priority 7 run was queued at {second_priority}"


async def test_redefined_pipeline_keeps_snapshot(queuer: ImprovedQueuer) -> None:
    started, release = asyncio.Event(), asyncio.Event()
    seen = register_recorders(queuer, ["a", "b", "c"])
    queuer.entrypoint("hold")(gate(started, release))
    queuer.entrypoint_pipeline("evolving", "a", "hold", "b")

    async with running_worker(queuer):
        old_id = await queuer.enqueue("evolving")
        await wait_event(started, "the old run to reach its held step")
        queuer.entrypoint_pipeline("evolving", "c")
        release.set()
        old = await result_of(queuer, old_id)
        new_id = await queuer.enqueue("evolving")
        new = await result_of(queuer, new_id)

    old_state = await queuer.run_status(old_id)
    assert old["status"] == "successful"
    assert list(old["result"]["tasks"]) == ["a", "hold", "b"]
    assert [step.task for step in old_state.steps] == ["a", "hold", "b"]
    assert seen["b"][0]["pipeline"]["steps"] == ["a", "hold", "b"]
    assert list(new["result"]["tasks"]) == ["c"]


# -- tasks that fight cancellation --------------------------------------------------


async def test_task_swallows_cancel(queuer: ImprovedQueuer) -> None:
    started = asyncio.Event()
    swallowed: list[str] = []

    @queuer.entrypoint("stubborn")
    async def stubborn(job: Any) -> str:
        started.set()
        try:
            await asyncio.Event().wait()
        except BaseException as exc:
            swallowed.append(type(exc).__name__)
        return "finished anyway"

    queuer.entrypoint_pipeline("obstinate", "stubborn", "stubborn")

    async with running_worker(queuer):
        run_id = await queuer.enqueue("obstinate")
        await wait_event(started, "the step to start")
        await queuer.cancel(run_id)
        result = await result_of(queuer, run_id)

    state = await queuer.run_status(run_id)
    assert swallowed == ["CancelledError"]
    assert result["status"] == "canceled"
    assert state.step("1").status.is_terminal
    assert state.step("2").status is Status.SKIPPED


async def test_task_catches_exception_on_cancel(queuer: ImprovedQueuer) -> None:
    started = asyncio.Event()
    cleanups: list[str] = []

    @queuer.entrypoint("careful")
    async def careful(job: Any) -> str:
        started.set()
        try:
            await asyncio.Event().wait()
        except Exception:
            cleanups.append("caught")
        finally:
            cleanups.append("finally")
        return "not reached"

    queuer.entrypoint_pipeline("careful_run", "careful")

    async with running_worker(queuer):
        run_id = await queuer.enqueue("careful_run")
        await wait_event(started, "the step to start")
        await queuer.cancel(run_id)
        result = await result_of(queuer, run_id)

    assert result["status"] == "canceled"
    assert cleanups == ["finally"]


async def test_awaiting_canceled_inner_task(queuer: ImprovedQueuer) -> None:
    # Expected: the run ends when the task itself raises CancelledError. Here it comes
    # from awaiting an inner task that was cancelled, not from a cancel of the step.
    @queuer.entrypoint("delegates")
    async def delegates(job: Any) -> str:
        inner = asyncio.create_task(asyncio.sleep(60))
        await asyncio.sleep(0)
        inner.cancel()
        await inner
        return "not reached"

    queuer.entrypoint_pipeline("delegating", "delegates")

    async with running_worker(queuer):
        run_id = await queuer.enqueue("delegating")
        state = await state_after_job_ends(queuer, run_id, "1")
        with anyio.move_on_after(2):
            await queuer.result(run_id)
        later = await queuer.run_status(run_id)

    # The first job of a run's first step has the run's id.
    requeued_as = state.step("1").job_id
    assert requeued_as == run_id, (
        f"step 1 was queued again as job {requeued_as} after the task raised CancelledError"
    )
    assert later.is_finished, (
        f"run is still {later.status.value} with step 1 {later.step('1').status.value} "
        "after the task raised CancelledError on its own"
    )


# -- payloads and results -----------------------------------------------------------


async def test_pipeline_initial_payloads(queuer: ImprovedQueuer) -> None:
    seen = register_recorders(queuer, ["a"])
    queuer.entrypoint_pipeline("first", "a")
    payloads: list[Any] = [
        None,
        b"\x00\xffnot json",
        b'{"k": [1, 2]}',
        b"",
        "ünïcødé \u0000 nul",
        {"nul": "\u0000", "emoji": "\U0001f600", "surrogate": "\ud800"},
    ]

    async with running_worker(queuer):
        results = []
        for payload in payloads:
            run_id = await queuer.enqueue("first", payload)
            results.append(await result_of(queuer, run_id))

    initials = [payload["initial"] for payload in seen["a"]]
    assert [result["status"] for result in results] == ["successful"] * len(payloads)
    assert initials[0] is None
    assert initials[1] == b"\x00\xffnot json"
    assert initials[2] == {"k": [1, 2]}
    assert initials[3] is None
    assert initials[4] == "ünïcødé \u0000 nul"
    assert initials[5] == {"nul": "\u0000", "emoji": "\U0001f600", "surrogate": "\ud800"}
    assert [result["result"]["initial"] for result in results] == initials


async def test_bytes_payload_nan_literal(queuer: ImprovedQueuer) -> None:
    # Expected: the run finishes. Python's json module reads NaN and Infinity, but
    # PostgreSQL's json type rejects them, so such bytes must be carried as raw bytes.
    seen = register_recorders(queuer, ["a"])
    queuer.entrypoint_pipeline("first", "a")

    async with running_worker(queuer):
        run_id = await queuer.enqueue("first", b"NaN")
        state = await state_after_job_ends(queuer, run_id, "1")

    assert "a" in seen
    assert state.step("1").status is Status.SUCCESSFUL, (
        f"step 1 is {state.step('1').status.value} after its job ended"
    )
    assert state.is_finished, f"the run is still {state.status.value} after its last step"


async def test_huge_payload(queuer: ImprovedQueuer) -> None:
    sizes: list[int] = []

    @queuer.entrypoint("measure")
    async def measure(job: Any) -> int:
        size = len(parse_payload(job.payload)["initial"]["blob"])
        sizes.append(size)
        return size

    queuer.entrypoint_pipeline("heavy", "measure", "measure")
    blob = "z" * (20 * 1024 * 1024)

    async with running_worker(queuer):
        run_id = await queuer.enqueue("heavy", {"blob": blob})
        with anyio.fail_after(40):
            result = await queuer.result(run_id, timeout=40)

    assert result is not None
    assert result["status"] == "successful"
    assert sizes == [len(blob)] * 2
    assert result["result"]["initial"]["blob"] == blob


async def test_result_above_inline_limit(queuer: ImprovedQueuer) -> None:
    big_value = "é" * (512 * 1024 + 1)  # two bytes each: just above 1 MiB of JSON
    references: list[Any] = []
    loaded: list[Any] = []

    @queuer.entrypoint("big")
    async def big(job: Any) -> str:
        return big_value

    @queuer.entrypoint("reader")
    async def reader(job: Any) -> int:
        entry = parse_payload(job.payload)["tasks"]["big"]
        references.append(entry)
        value = await queuer.load_result(entry["result_ref"])
        loaded.append(value)
        return len(value)

    queuer.entrypoint_pipeline("large", "big", "reader")

    async with running_worker(queuer):
        run_id = await queuer.enqueue("large")
        result = await result_of(queuer, run_id)

    entry = references[0]
    assert result["status"] == "successful"
    assert entry["result"] is None
    assert entry["result_ref"]["step"] == "1"
    assert entry["result_ref"]["bytes"] > 1024 * 1024
    assert loaded == [big_value]
    assert result["result"]["tasks"]["reader"]["result"] == len(big_value)
    assert await queuer.load_result(result["result"]["tasks"]["big"]["result_ref"]) == big_value


async def test_odd_strings_and_arrays(queuer: ImprovedQueuer) -> None:
    text = "nul \u0000 bell \x07 del \x7f emoji \U0001f600 lone \udc80 end"
    array = numpy.arange(12, dtype=numpy.float32).reshape(3, 4)
    received: list[Any] = []

    @queuer.entrypoint("produce")
    async def produce(job: Any) -> dict[str, Any]:
        return {"text": text, "array": array, "scalar": numpy.int16(-3)}

    @queuer.entrypoint("consume")
    async def consume(job: Any) -> str:
        received.append(parse_payload(job.payload)["tasks"]["produce"]["result"])
        return "ok"

    queuer.entrypoint_pipeline("odd", "produce", "consume")

    async with running_worker(queuer):
        run_id = await queuer.enqueue("odd")
        result = await result_of(queuer, run_id)

    final = result["result"]["tasks"]["produce"]["result"]
    assert result["status"] == "successful"
    assert received[0]["text"] == text
    assert numpy.array_equal(received[0]["array"], array)
    assert received[0]["array"].dtype == numpy.float32
    assert received[0]["scalar"] == numpy.int16(-3)
    assert final["text"] == text
    assert numpy.array_equal(final["array"], array)


async def test_unencodable_nested_result(queuer: ImprovedQueuer) -> None:
    @queuer.entrypoint("opaque")
    async def opaque(job: Any) -> Any:
        return {"rows": [1, {"handle": object()}]}

    queuer.entrypoint_pipeline("opaque_run", "opaque")

    async with running_worker(queuer):
        run_id = await queuer.enqueue("opaque_run")
        result = await result_of(queuer, run_id)

    assert result["status"] == "exception"
    assert result["failed_step"]["type"] == "TypeError"
    assert "object" in result["failed_step"]["message"]
    assert "$.rows[1].handle" in result["failed_step"]["message"]


async def test_set_with_decimal_nan(queuer: ImprovedQueuer) -> None:
    # Expected: the step ends. Decimal NaN is a supported value, so a set that contains
    # one should be stored, and at worst the step fails with an error.
    @queuer.entrypoint("sets")
    async def sets(job: Any) -> Any:
        return {decimal.Decimal("NaN"), decimal.Decimal("1.5")}

    queuer.entrypoint_pipeline("set_run", "sets")

    async with running_worker(queuer):
        run_id = await queuer.enqueue("set_run")
        state = await state_after_job_ends(queuer, run_id, "1")

    assert state.step("1").status.is_terminal, (
        f"step 1 is still {state.step('1').status.value} after its job ended"
    )


async def test_exception_str_raises(queuer: ImprovedQueuer) -> None:
    class Unprintable(Exception):
        def __str__(self) -> str:
            raise RuntimeError("__str__ is broken")

    @queuer.entrypoint("unprintable")
    async def unprintable(job: Any) -> None:
        raise Unprintable()

    queuer.entrypoint_pipeline("unprintable_run", "unprintable")

    async with running_worker(queuer):
        run_id = await queuer.enqueue("unprintable_run")
        state = await state_after_job_ends(queuer, run_id, "1")

    step = state.step("1")
    assert step.status is Status.EXCEPTION, f"step 1 is {step.status.value} after its job ended"
    assert step.error is not None
    assert step.error["type"] == "Unprintable"


async def test_huge_exception_message(queuer: ImprovedQueuer) -> None:
    message = "m" * (2 * 1024 * 1024)

    @queuer.entrypoint("loud")
    async def loud(job: Any) -> None:
        raise ValueError(message)

    queuer.entrypoint_pipeline("loud_run", "loud")

    async with running_worker(queuer):
        run_id = await queuer.enqueue("loud_run")
        result = await result_of(queuer, run_id)

    assert result["status"] == "exception"
    assert result["failed_step"]["type"] == "ValueError"
    assert len(result["failed_step"]["message"]) >= 1024
