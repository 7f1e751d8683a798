"""Pipelines on a real PostgreSQL: payloads, parallel groups, failures, cancel, resume, events."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import anyio
import pytest
from support.harness import (
    EventLog,
    result_of,
    running_worker,
    wait_event,
    wait_for_step,
    wait_until,
)

from pgskewer import DuplicateRunError, ImprovedQueuer, Status, parse_payload

pytestmark = pytest.mark.anyio


def register_recorders(pgq: ImprovedQueuer, names: list[str], seen: dict[str, Any]) -> None:
    """Register tasks that store their decoded payload in ``seen`` and return ``"<name> done"``."""
    for name in names:
        pgq.entrypoint(name)(recorder(name, seen))


def recorder(name: str, seen: dict[str, Any]) -> Any:
    # A factory instead of a default argument, because pgskewer passes the context to a
    # function with a second parameter.
    async def record(job: Any) -> str:
        seen[name] = parse_payload(job.payload)
        return f"{name} done"

    return record


async def create_marks_table(pgq: ImprovedQueuer) -> None:
    async with pgq.pool.acquire() as connection:
        await connection.execute(
            "CREATE TABLE test_marks (id bigserial PRIMARY KEY, task text NOT NULL)"
        )


async def add_mark(pgq: ImprovedQueuer, task: str) -> None:
    async with pgq.pool.acquire() as connection:
        await connection.execute("INSERT INTO test_marks (task) VALUES ($1)", task)


async def mark_counts(pgq: ImprovedQueuer) -> dict[str, int]:
    async with pgq.pool.acquire() as connection:
        rows = await connection.fetch("SELECT task, count(*) AS n FROM test_marks GROUP BY task")
    return {row["task"]: row["n"] for row in rows}


# -- payloads -----------------------------------------------------------------------


async def test_quickstart_pipeline(queuer: ImprovedQueuer) -> None:
    seen: dict[str, Any] = {}

    @queuer.entrypoint("fetch_data")
    async def fetch_data(job: Any) -> list[int]:
        seen["fetch_data"] = parse_payload(job.payload)
        return [1, 2, 3]

    @queuer.entrypoint("process_data")
    async def process_data(job: Any) -> int:
        payload = parse_payload(job.payload)
        seen["process_data"] = payload
        return sum(payload["tasks"]["fetch_data"]["result"])

    @queuer.entrypoint("store_results")
    async def store_results(job: Any) -> str:
        payload = parse_payload(job.payload)
        seen["store_results"] = payload
        return f"stored {payload['tasks']['process_data']['result']}"

    queuer.entrypoint_pipeline("quickstart", "fetch_data", "process_data", "store_results")

    async with running_worker(queuer):
        run_id = await queuer.enqueue("quickstart", {"source": "example"})
        result = await result_of(queuer, run_id)

    last = seen["store_results"]
    assert result["status"] == "successful"
    assert result["result"]["tasks"]["store_results"]["result"] == "stored 6"
    assert set(last) == {"initial", "pipeline", "tasks"}
    assert last["initial"] == {"source": "example"}
    assert {"name", "steps", "run_id", "step"} <= set(last["pipeline"])
    assert last["pipeline"]["name"] == "quickstart"
    assert last["pipeline"]["steps"] == ["fetch_data", "process_data", "store_results"]
    assert last["pipeline"]["run_id"] == run_id
    assert last["pipeline"]["step"] == "3"
    assert list(last["tasks"]) == ["fetch_data", "process_data"]
    assert last["tasks"]["process_data"] == {"status": "successful", "ok": True, "result": 6}
    assert seen["fetch_data"]["tasks"] == {}


async def test_parallel_group_payloads(queuer: ImprovedQueuer) -> None:
    seen: dict[str, Any] = {}
    spans: dict[str, tuple[float, float]] = {}
    started = {"b1": asyncio.Event(), "b2": asyncio.Event()}

    register_recorders(queuer, ["a", "c"], seen)

    def member(name: str, sibling: str) -> Any:
        async def run(job: Any) -> str:
            begin = time.monotonic()
            seen[name] = parse_payload(job.payload)
            started[name].set()
            # Each member waits (bounded) for its sibling, so they overlap when run together.
            with anyio.move_on_after(10):
                await started[sibling].wait()
            spans[name] = (begin, time.monotonic())
            return f"{name} done"

        return run

    queuer.entrypoint("b1")(member("b1", "b2"))
    queuer.entrypoint("b2")(member("b2", "b1"))

    queuer.entrypoint_pipeline("fan", queuer.pipeline(["a", ["b1", "b2"], "c"]))

    async with running_worker(queuer):
        run_id = await queuer.enqueue("fan", {"seed": 7})
        result = await result_of(queuer, run_id)

    assert result["status"] == "successful"
    assert seen["b1"]["pipeline"]["steps"] == ["a", ["b1", "b2"], "c"]
    assert seen["b1"]["pipeline"]["step"] == "2.0"
    assert seen["b2"]["pipeline"]["step"] == "2.1"
    assert list(seen["b1"]["tasks"]) == ["a"]
    assert max(spans["b1"][0], spans["b2"][0]) < min(spans["b1"][1], spans["b2"][1])
    assert set(seen["c"]) == {"initial", "pipeline", "tasks"}
    assert seen["c"]["initial"] == {"seed": 7}
    assert list(seen["c"]["tasks"]) == ["a", "b1", "b2"]
    assert seen["c"]["tasks"]["b2"]["result"] == "b2 done"
    assert list(result["result"]["tasks"]) == ["a", "b1", "b2", "c"]


async def test_fan_out_payload_not_copied(queuer: ImprovedQueuer) -> None:
    release = asyncio.Event()
    members = [f"w{index}" for index in range(10)]

    @queuer.entrypoint("seed")
    async def seed(job: Any) -> str:
        return "x" * 10_000

    async def member(job: Any) -> int:
        await release.wait()
        return len(parse_payload(job.payload)["tasks"]["seed"]["result"])

    for name in members:
        queuer.entrypoint(name)(member)

    queuer.entrypoint_pipeline("wide", "seed", members)

    async def queued_payloads() -> list[Any]:
        async with queuer.pool.acquire() as connection:
            rows = await connection.fetch(
                "SELECT payload FROM pgqueuer WHERE entrypoint = ANY($1::text[])", members
            )
        return [row["payload"] for row in rows] if len(rows) == len(members) else []

    async with running_worker(queuer, concurrency=4):
        run_id = await queuer.enqueue("wide", {"big": "y" * 1000})
        payloads = await wait_until(queued_payloads, "the ten member jobs to be enqueued")
        release.set()
        result = await result_of(queuer, run_id)

    assert payloads == [None] * len(members)
    assert result["status"] == "successful"
    assert [result["result"]["tasks"][name]["result"] for name in members] == [10_000] * 10


async def test_nested_pipeline(queuer: ImprovedQueuer) -> None:
    seen: dict[str, Any] = {}
    register_recorders(queuer, ["download", "parse", "index"], seen)
    queuer.entrypoint_pipeline("inner", "parse", "index")
    queuer.entrypoint_pipeline("outer", "download", "inner")

    async with running_worker(queuer):
        run_id = await queuer.enqueue("outer", {"url": "http://127.0.0.1/data"})
        result = await result_of(queuer, run_id)

    inner = result["result"]["tasks"]["inner"]
    assert result["status"] == "successful"
    assert seen["parse"]["initial"] == {"url": "http://127.0.0.1/data"}
    assert seen["index"]["initial"] == {"url": "http://127.0.0.1/data"}
    assert seen["parse"]["pipeline"]["step"] == "2.1"
    assert list(seen["parse"]["tasks"]) == ["download"]
    assert list(seen["index"]["tasks"]) == ["download", "parse"]
    assert inner["status"] == "successful"
    assert inner["ok"] is True
    assert inner["result"]["tasks"]["parse"]["result"] == "parse done"
    assert inner["result"]["tasks"]["index"]["result"] == "index done"


async def test_hundred_pipelines_one_worker(queuer: ImprovedQueuer) -> None:
    seen: dict[str, Any] = {}
    register_recorders(queuer, ["n1", "n2", "n3"], seen)
    queuer.entrypoint_pipeline("many", "n1", ["n2", "n3"])

    async with running_worker(queuer, concurrency=4):
        run_ids = [await queuer.enqueue("many", {"index": index}) for index in range(100)]
        with anyio.fail_after(90):
            results = [await queuer.result(run_id, timeout=90) for run_id in run_ids]

    statuses = [result["status"] if result else None for result in results]
    assert statuses == ["successful"] * 100


# -- failures -----------------------------------------------------------------------


async def test_sequential_failure_stops(queuer: ImprovedQueuer) -> None:
    seen: dict[str, Any] = {}
    register_recorders(queuer, ["a", "c"], seen)

    @queuer.entrypoint("b")
    async def b(job: Any) -> None:
        raise KeyError("missing column")

    queuer.entrypoint_pipeline("seq", "a", "b", "c")

    async with running_worker(queuer):
        run_id = await queuer.enqueue("seq")
        result = await result_of(queuer, run_id)

    state = await queuer.run_status(run_id)
    assert result["status"] == "exception"
    assert result["ok"] is False
    assert result["failed_step"]["step"] == "2"
    assert result["failed_step"]["task"] == "b"
    assert result["failed_step"]["type"] == "KeyError"
    assert "missing column" in result["failed_step"]["message"]
    assert result["error"]["type"] == "KeyError"
    assert "c" not in seen
    assert state.step("3").status is Status.SKIPPED
    assert state.failed_step == "2"


async def test_parallel_failure_cancels_siblings(queuer: ImprovedQueuer) -> None:
    started = {"doomed": asyncio.Event(), "keeper": asyncio.Event()}
    release_keeper = asyncio.Event()
    never = asyncio.Event()
    seen: dict[str, Any] = {}
    register_recorders(queuer, ["a", "c"], seen)

    @queuer.entrypoint("bad")
    async def bad(job: Any) -> None:
        await wait_event(started["doomed"], "the cancelable sibling to start")
        await wait_event(started["keeper"], "the cancelable=False sibling to start")
        raise RuntimeError("bad member")

    @queuer.entrypoint("doomed")
    async def doomed(job: Any) -> str:
        started["doomed"].set()
        await never.wait()
        return "not reached"

    @queuer.entrypoint("keeper", cancelable=False)
    async def keeper(job: Any) -> str:
        started["keeper"].set()
        await release_keeper.wait()
        return "kept"

    queuer.entrypoint_pipeline("grp", "a", ["bad", "doomed", "keeper"], "c")

    async with running_worker(queuer):
        run_id = await queuer.enqueue("grp")
        await wait_for_step(queuer, run_id, "2.1", Status.CANCELED)
        canceling = await queuer.run_status(run_id)
        release_keeper.set()
        result = await result_of(queuer, run_id)

    state = await queuer.run_status(run_id)
    tasks = result["result"]["tasks"]
    assert canceling.status is Status.CANCELING
    assert canceling.step("2.2").status is Status.RUNNING
    assert result["status"] == "exception"
    assert result["failed_step"]["step"] == "2.0"
    assert result["failed_step"]["message"] == "bad member"
    assert tasks["doomed"]["status"] == "canceled"
    assert tasks["keeper"] == {"status": "successful", "ok": True, "result": "kept"}
    assert state.step("2.2").status is Status.SUCCESSFUL
    assert state.step("3").status is Status.SKIPPED
    assert "c" not in seen


async def test_crashable_step_continues(queuer: ImprovedQueuer) -> None:
    seen: dict[str, Any] = {}
    register_recorders(queuer, ["a", "c"], seen)

    @queuer.entrypoint("shaky", crashable=True)
    async def shaky(job: Any) -> None:
        raise OSError("disk hiccup")

    queuer.entrypoint_pipeline("tolerant", "a", "shaky", "c")

    async with running_worker(queuer):
        run_id = await queuer.enqueue("tolerant")
        result = await result_of(queuer, run_id)

    shaky_seen_by_c = seen["c"]["tasks"]["shaky"]
    assert result["status"] == "successful"
    assert "failed_step" not in result
    assert shaky_seen_by_c["status"] == "exception"
    assert shaky_seen_by_c["ok"] is False
    assert shaky_seen_by_c["error"]["message"] == "disk hiccup"


async def test_flaky_step_in_group(queuer: ImprovedQueuer) -> None:
    calls = {"flaky": 0, "join": 0}
    joined: list[Any] = []
    register_recorders(queuer, ["a", "steady"], {})

    @queuer.entrypoint("flaky", retries=2, retry_backoff=0.05)
    async def flaky(job: Any) -> str:
        calls["flaky"] += 1
        if calls["flaky"] < 3:
            raise TimeoutError(f"attempt {calls['flaky']} timed out")
        return "flaky recovered"

    @queuer.entrypoint("join")
    async def join(job: Any) -> str:
        calls["join"] += 1
        joined.append(parse_payload(job.payload)["tasks"])
        return "joined"

    queuer.entrypoint_pipeline("retrying", "a", ["flaky", "steady"], "join")

    async with running_worker(queuer):
        run_id = await queuer.enqueue("retrying")
        result = await result_of(queuer, run_id)

    state = await queuer.run_status(run_id)
    async with queuer.pool.acquire() as connection:
        flaky_rows = await connection.fetchval(
            "SELECT count(*) FROM pgskewer_results WHERE run_id = $1 AND path = '2.0'", run_id
        )
    assert result["status"] == "successful"
    assert calls == {"flaky": 3, "join": 1}
    assert joined[0]["flaky"] == {"status": "successful", "ok": True, "result": "flaky recovered"}
    assert state.step("2.0").attempts == 3
    assert flaky_rows == 1


async def test_step_timeout(queuer: ImprovedQueuer) -> None:
    never = asyncio.Event()
    register_recorders(queuer, ["a"], {})

    @queuer.entrypoint("sluggish", timeout=0.5)
    async def sluggish(job: Any) -> str:
        await never.wait()
        return "not reached"

    queuer.entrypoint_pipeline("timed", "a", "sluggish")

    async with running_worker(queuer):
        run_id = await queuer.enqueue("timed")
        result = await result_of(queuer, run_id)

    state = await queuer.run_status(run_id)
    assert result["status"] == "exception"
    assert result["failed_step"]["type"] == "TimeoutError"
    assert result["failed_step"]["step"] == "2"
    assert "0.5s" in result["failed_step"]["message"]
    assert state.step("2").status is Status.EXCEPTION


# -- cancel -------------------------------------------------------------------------


def register_gated_pipeline(
    pgq: ImprovedQueuer, started: asyncio.Event, release: asyncio.Event, **options: Any
) -> dict[str, Any]:
    """Register the pipeline ``gated`` (a, b, c) whose step b waits for ``release``.

    Returns ``seen``, the decoded payloads of the steps that finished.
    """
    seen: dict[str, Any] = {}
    register_recorders(pgq, ["a", "c"], seen)

    @pgq.entrypoint("b", **options)
    async def b(job: Any) -> str:
        started.set()
        await release.wait()
        seen["b"] = parse_payload(job.payload)
        return "b done"

    pgq.entrypoint_pipeline("gated", "a", "b", "c")
    return seen


async def test_cancel_running_step(queuer: ImprovedQueuer) -> None:
    started, never = asyncio.Event(), asyncio.Event()
    seen = register_gated_pipeline(queuer, started, never)

    async with running_worker(queuer):
        run_id = await queuer.enqueue("gated")
        await wait_event(started, "step b to start")
        await wait_for_step(queuer, run_id, "2", Status.RUNNING)
        status = await queuer.cancel(run_id)
        result = await result_of(queuer, run_id)

    state = await queuer.run_status(run_id)
    assert status in (Status.CANCELING, Status.CANCELED)
    assert result["status"] == "canceled"
    assert result["ok"] is False
    assert state.status is Status.CANCELED
    assert state.step("2").status is Status.CANCELED
    assert state.step("3").status is Status.SKIPPED
    assert "c" not in seen


async def test_cancel_by_step_job_id(queuer: ImprovedQueuer) -> None:
    started, never = asyncio.Event(), asyncio.Event()
    register_gated_pipeline(queuer, started, never)

    async with running_worker(queuer):
        run_id = await queuer.enqueue("gated")
        await wait_event(started, "step b to start")
        await wait_for_step(queuer, run_id, "2", Status.RUNNING)
        job_id = (await queuer.run_status(run_id)).step("2").job_id
        assert job_id is not None
        assert job_id != run_id
        await queuer.cancel(job_id)
        result = await result_of(queuer, run_id)

    assert result["status"] == "canceled"
    assert (await queuer.run_status(run_id)).status is Status.CANCELED


async def test_cancel_queued_deferred_run(queuer: ImprovedQueuer) -> None:
    seen: dict[str, Any] = {}
    register_recorders(queuer, ["a", "c"], seen)
    queuer.entrypoint_pipeline("later", "a", "c")

    async with running_worker(queuer):
        run_id = await queuer.enqueue("later", execute_after=600)
        status = await queuer.cancel(run_id)
        result = await result_of(queuer, run_id)

    state = await queuer.run_status(run_id)
    async with queuer.pool.acquire() as connection:
        queued_jobs = await connection.fetchval("SELECT count(*) FROM pgqueuer")
    assert status is Status.CANCELED
    assert result["status"] == "canceled"
    assert state.step("1").status is Status.CANCELED
    assert state.step("2").status is Status.SKIPPED
    assert queued_jobs == 0
    assert seen == {}


async def test_cancel_waits_for_uncancelable(queuer: ImprovedQueuer) -> None:
    started, release = asyncio.Event(), asyncio.Event()
    seen = register_gated_pipeline(queuer, started, release, cancelable=False)

    async with running_worker(queuer):
        run_id = await queuer.enqueue("gated")
        await wait_event(started, "step b to start")
        await wait_for_step(queuer, run_id, "2", Status.RUNNING)
        status = await queuer.cancel(run_id)
        while_running = await queuer.run_status(run_id)
        early = await queuer.result(run_id, timeout=0.5)
        release.set()
        result = await result_of(queuer, run_id)

    state = await queuer.run_status(run_id)
    assert status is Status.CANCELING
    assert while_running.status is Status.CANCELING
    assert early is None
    assert result["status"] == "canceled"
    assert state.step("2").status is Status.SUCCESSFUL
    assert state.step("3").status is Status.SKIPPED
    assert "b" in seen
    assert "c" not in seen


async def test_cancel_not_swallowed(queuer: ImprovedQueuer) -> None:
    started = asyncio.Event()
    swallowed: list[BaseException] = []

    @queuer.entrypoint("stubborn")
    async def stubborn(job: Any) -> str:
        started.set()
        while True:
            try:
                await anyio.sleep(0.05)
            except Exception as exc:  # user code that swallows every ordinary error
                swallowed.append(exc)

    queuer.entrypoint_pipeline("obstinate", "stubborn")

    async with running_worker(queuer):
        run_id = await queuer.enqueue("obstinate")
        await wait_event(started, "the step to start")
        await queuer.cancel(run_id)
        result = await result_of(queuer, run_id)

    assert result["status"] == "canceled"
    assert swallowed == []


# -- resume, dedupe, schedule -------------------------------------------------------


async def test_retry_resumes_failed_run(queuer: ImprovedQueuer) -> None:
    await create_marks_table(queuer)

    def counted(name: str) -> Any:
        async def run(job: Any) -> str:
            await add_mark(queuer, name)
            return f"{name} done"

        return run

    queuer.entrypoint("s1")(counted("s1"))
    queuer.entrypoint("s3")(counted("s3"))

    @queuer.entrypoint("s2")
    async def broken(job: Any) -> str:
        await add_mark(queuer, "s2")
        raise ValueError("s2 has a bug")

    queuer.entrypoint_pipeline("resumable", "s1", "s2", "s3")

    async with running_worker(queuer):
        run_id = await queuer.enqueue("resumable", {"batch": 1})
        failed = await result_of(queuer, run_id)

        @queuer.entrypoint("s2")
        async def fixed(job: Any) -> str:
            await add_mark(queuer, "s2")
            first_result: str = parse_payload(job.payload)["tasks"]["s1"]["result"]
            return "s2 " + first_result

        await queuer.retry(run_id)
        result = await result_of(queuer, run_id)

    assert failed["status"] == "exception"
    assert result["status"] == "successful"
    assert result["result"]["tasks"]["s2"]["result"] == "s2 s1 done"
    assert result["result"]["initial"] == {"batch": 1}
    assert await mark_counts(queuer) == {"s1": 1, "s2": 2, "s3": 1}


async def test_late_canceling_event_after_retry(queuer: ImprovedQueuer) -> None:
    # A failing step sends a "canceling" event for its run (the run winds down before it
    # ends "exception"). Workers handle that event asynchronously, so one may handle it
    # only after the run was retried; the retried run must not be canceled by it.
    started, release = asyncio.Event(), asyncio.Event()
    fixed = {"done": False}

    @queuer.entrypoint("first")
    async def first(job: Any) -> str:
        return "first done"

    @queuer.entrypoint("second")
    async def second(job: Any) -> str:
        if not fixed["done"]:
            raise ValueError("second has a bug")
        started.set()
        await release.wait()
        return "second done"

    queuer.entrypoint_pipeline("resumable", "first", "second")

    async with running_worker(queuer):
        run_id = await queuer.enqueue("resumable")
        failed = await result_of(queuer, run_id)
        fixed["done"] = True
        await queuer.retry(run_id)

        async def started_or_finished() -> bool:
            # The event handler of the first failure may already have canceled the retry.
            return started.is_set() or (await queuer.run_status(run_id)).is_finished

        await wait_until(started_or_finished, "the retried step to start")
        async with queuer.pool.acquire() as connection:
            await connection.execute(
                "SELECT pg_notify('pgskewer_events', $1)",
                json.dumps({"run": run_id, "step": "", "status": "canceling"}),
            )
        release.set()
        result = await result_of(queuer, run_id)

    assert failed["status"] == "exception"
    assert result["status"] == "successful"


async def test_dedupe_key_while_in_flight(queuer: ImprovedQueuer) -> None:
    started, release = asyncio.Event(), asyncio.Event()
    register_gated_pipeline(queuer, started, release)

    async with running_worker(queuer):
        run_id = await queuer.enqueue("gated", dedupe_key="nightly")
        await wait_event(started, "step b to start")
        await wait_for_step(queuer, run_id, "1", Status.SUCCESSFUL)
        with pytest.raises(DuplicateRunError) as raised:
            await queuer.enqueue("gated", dedupe_key="nightly")
        release.set()
        await result_of(queuer, run_id)
        second = await queuer.enqueue("gated", dedupe_key="nightly")
        second_result = await result_of(queuer, second)

    assert raised.value.dedupe_key == "nightly"
    assert second != run_id
    assert second_result["status"] == "successful"


async def test_schedule_every_second(queuer: ImprovedQueuer) -> None:
    # pgqueuer validates and expands cron expressions with croniter, whose optional
    # sixth field is seconds, so "* * * * * *" fires every second.
    seen: dict[str, Any] = {}
    register_recorders(queuer, ["tick"], seen)
    queuer.entrypoint_pipeline("ticker", "tick")
    queuer.schedule_pipeline("ticker", "* * * * * *", {"from": "cron"})

    async def finished_run() -> bool:
        runs = await queuer.runs(name="ticker", status="successful")
        return bool(runs)

    async with running_worker(queuer):
        await wait_until(finished_run, "a scheduled run of ticker to finish", timeout=15)

    assert seen["tick"]["initial"] == {"from": "cron"}


# -- state and events ---------------------------------------------------------------


async def test_run_status_and_runs(queuer: ImprovedQueuer) -> None:
    started, release = asyncio.Event(), asyncio.Event()
    register_gated_pipeline(queuer, started, release)

    async with running_worker(queuer):
        run_id = await queuer.enqueue("gated", dedupe_key="state")
        await wait_event(started, "step b to start")
        await wait_for_step(queuer, run_id, "2", Status.RUNNING)
        during = await queuer.run_status(run_id)
        running = await queuer.runs(status="running")
        release.set()
        await result_of(queuer, run_id)

    after = await queuer.run_status([run_id])
    listed = await queuer.runs(name="gated")
    assert during.status is Status.RUNNING
    assert [step.status for step in during.steps] == [
        Status.SUCCESSFUL,
        Status.RUNNING,
        Status.PENDING,
    ]
    assert [step.path for step in during.steps] == ["1", "2", "3"]
    assert during.step("2").attempts == 1
    assert during.step("2").started_at is not None
    assert during.dedupe_key == "state"
    assert [run.id for run in running] == [run_id]
    assert after.status is Status.SUCCESSFUL
    assert all(step.status is Status.SUCCESSFUL for step in after.steps)
    assert after.finished_at is not None
    assert [run.id for run in listed] == [run_id]
    assert listed[0].steps == after.steps
    assert await queuer.runs(status="exception") == []


async def test_events_for_every_change(queuer: ImprovedQueuer, dsn: str) -> None:
    register_recorders(queuer, ["e1", "e2", "e3"], {})
    queuer.entrypoint_pipeline("evented", "e1", "e2", "e3")
    events = EventLog()
    await events.start(dsn)
    try:
        async with running_worker(queuer):
            run_id = await queuer.enqueue("evented")
            await result_of(queuer, run_id)

        async def run_event_arrived() -> bool:
            return "successful" in events.statuses(run_id, "")

        await wait_until(run_event_arrived, "the run's successful event")
    finally:
        await events.stop()

    assert events.statuses(run_id, "") == ["queued", "running", "successful"]
    assert events.statuses(run_id, "1") == ["queued", "running", "successful"]
    assert events.statuses(run_id, "2") == ["pending", "queued", "running", "successful"]
    assert events.statuses(run_id, "3") == ["pending", "queued", "running", "successful"]


async def test_events_for_cancel(queuer: ImprovedQueuer, dsn: str) -> None:
    started, never = asyncio.Event(), asyncio.Event()
    register_gated_pipeline(queuer, started, never)
    events = EventLog()
    await events.start(dsn)
    try:
        async with running_worker(queuer):
            run_id = await queuer.enqueue("gated")
            await wait_event(started, "step b to start")
            await wait_for_step(queuer, run_id, "2", Status.RUNNING)
            await queuer.cancel(run_id)
            await result_of(queuer, run_id)

        async def run_event_arrived() -> bool:
            return "canceled" in events.statuses(run_id, "")

        await wait_until(run_event_arrived, "the run's canceled event")
    finally:
        await events.stop()

    assert events.statuses(run_id, "") == ["queued", "running", "canceling", "canceled"]
    assert events.statuses(run_id, "2")[:3] == ["pending", "queued", "running"]
    assert events.statuses(run_id, "2")[-1] == "canceled"
    assert events.statuses(run_id, "3") == ["pending", "skipped"]
