"""Stored results of task runs, read with ``ImprovedQueuer.result`` on a real PostgreSQL."""

from __future__ import annotations

import asyncio
from typing import Any

import anyio
import asyncpg
import pytest
from support.harness import (
    WAIT,
    StatementLog,
    result_of,
    running_worker,
    wait_event,
    wait_for_step,
    wait_until,
)

import pgskewer
from pgskewer import ImprovedQueuer, RunNotFoundError, Status, parse_payload

pytestmark = pytest.mark.anyio


async def result_rows(pgq: ImprovedQueuer, run_id: int) -> list[dict[str, Any]]:
    async with pgq.pool.acquire() as connection:
        rows = await connection.fetch(
            "SELECT path, status, ok, result::text AS result FROM pgskewer_results "
            "WHERE run_id = $1 ORDER BY path",
            run_id,
        )
    return [dict(row) for row in rows]


async def test_success_result(queuer: ImprovedQueuer) -> None:
    @queuer.entrypoint("double")
    async def double(job: Any) -> dict[str, int]:
        return {"value": parse_payload(job.payload)["n"] * 2}

    async with running_worker(queuer):
        run_id = await queuer.enqueue("double", {"n": 21})
        result = await result_of(queuer, run_id)

    assert result == {"status": "successful", "ok": True, "result": {"value": 42}}


async def test_failure_result(queuer: ImprovedQueuer) -> None:
    @queuer.entrypoint("broken")
    async def broken(job: Any) -> None:
        raise ValueError("the input is broken")

    async with running_worker(queuer):
        run_id = await queuer.enqueue("broken")
        result = await result_of(queuer, run_id)

    assert result["status"] == "exception"
    assert result["ok"] is False
    assert result["result"] is None
    assert result["error"]["type"] == "ValueError"
    assert result["error"]["message"] == "the input is broken"
    assert "in broken" in result["error"]["traceback"]
    assert "ValueError: the input is broken" in result["error"]["traceback"]


async def test_crashable_step_keeps_pipeline(queuer: ImprovedQueuer) -> None:
    @queuer.entrypoint("fragile", crashable=True)
    async def fragile(job: Any) -> None:
        raise RuntimeError("fragile step failed")

    @queuer.entrypoint("after")
    async def after(job: Any) -> str:
        return "after ran"

    queuer.entrypoint_pipeline("tolerant", "fragile", "after")

    async with running_worker(queuer):
        run_id = await queuer.enqueue("tolerant")
        result = await result_of(queuer, run_id)

    fragile_result = result["result"]["tasks"]["fragile"]
    assert result["status"] == "successful"
    assert result["ok"] is True
    assert fragile_result["status"] == "exception"
    assert fragile_result["ok"] is False
    assert fragile_result["error"]["type"] == "RuntimeError"
    assert fragile_result["error"]["message"] == "fragile step failed"
    assert result["result"]["tasks"]["after"]["result"] == "after ran"


async def test_cancel_running_task(queuer: ImprovedQueuer) -> None:
    started = asyncio.Event()
    never = asyncio.Event()

    @queuer.entrypoint("endless")
    async def endless(job: Any) -> str:
        started.set()
        await never.wait()
        return "not reached"

    async with running_worker(queuer):
        run_id = await queuer.enqueue("endless")
        await wait_event(started, "the task to start")
        await queuer.cancel(run_id)
        result = await result_of(queuer, run_id)

    assert result["status"] == "canceled"
    assert result["ok"] is False
    assert result["error"]["type"] == "CancelledError"


async def test_store_results_false(queuer: ImprovedQueuer) -> None:
    @queuer.entrypoint("quiet", store_results=False)
    async def quiet(job: Any) -> str:
        return "not stored"

    async with running_worker(queuer):
        run_id = await queuer.enqueue("quiet")
        result = await result_of(queuer, run_id)

    rows = await result_rows(queuer, run_id)
    assert result == {"status": "successful", "ok": True, "result": None}
    assert [row["path"] for row in rows] == ["", "1"]
    assert all(row["result"] is None for row in rows)


async def test_retried_task_one_result(queuer: ImprovedQueuer, dsn: str) -> None:
    attempts: list[int] = []

    @queuer.entrypoint("flaky", retries=2, retry_backoff=0.05)
    async def flaky(job: Any) -> str:
        attempts.append(len(attempts) + 1)
        if len(attempts) < 3:
            raise ConnectionError(f"attempt {len(attempts)} failed")
        return "third time lucky"

    statements = StatementLog()
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=3, init=statements.attach)
    waiter = ImprovedQueuer(pool)
    try:
        run_id = await queuer.enqueue("flaky")
        # The waiter starts before any worker, so every event of the run reaches it.
        waiting = asyncio.create_task(waiter.result(run_id, timeout=WAIT))
        await wait_until(
            statements.quiet_after("pgskewer_results", 0.3), "the waiter's first check"
        )
        async with running_worker(queuer):
            result = await waiting
    finally:
        await waiter.close()
        await pool.close()

    rows = await result_rows(queuer, run_id)
    state = await queuer.run_status(run_id)
    assert result == {"status": "successful", "ok": True, "result": "third time lucky"}
    assert attempts == [1, 2, 3]
    assert state.step("1").attempts == 3
    assert [row["path"] for row in rows] == ["", "1"]
    # One read before the worker started and one after the final result was written.
    assert statements.count("pgskewer_results") == 2


async def test_unknown_run_raises(queuer: ImprovedQueuer) -> None:
    with pytest.raises(RunNotFoundError) as raised:
        await queuer.result(987654, timeout=1)

    assert isinstance(raised.value, LookupError)
    assert raised.value.run_id == 987654


@pytest.mark.parametrize("enqueued_by", ["pgskewer", "pgqueuer"])
async def test_pgqueuer_cancel_of_queued(queuer: ImprovedQueuer, enqueued_by: str) -> None:
    # No worker runs, so the job stays queued until pgqueuer's own API cancels it.
    if enqueued_by == "pgskewer":
        run_id = await queuer.enqueue("idle")
    else:
        [run_id] = await queuer.qm.queries.enqueue("idle", b"{}")

    await queuer.qm.queries.mark_job_as_cancelled([run_id])
    result = await result_of(queuer, run_id)

    assert result["status"] == "canceled"
    assert result["ok"] is False


@pytest.mark.parametrize("enqueued_by", ["pgskewer", "pgqueuer"])
async def test_clear_queue_of_queued(queuer: ImprovedQueuer, enqueued_by: str) -> None:
    if enqueued_by == "pgskewer":
        run_id = await queuer.enqueue("idle")
    else:
        [run_id] = await queuer.qm.queries.enqueue("idle", b"{}")

    await queuer.qm.queries.clear_queue("idle")
    result = await result_of(queuer, run_id)

    assert result["status"] == "canceled"
    assert result["error"]["message"] == "the job was deleted from the queue"


async def test_result_waits_without_queries(queuer: ImprovedQueuer, dsn: str) -> None:
    started = asyncio.Event()
    release = asyncio.Event()

    @queuer.entrypoint("gated")
    async def gated(job: Any) -> str:
        started.set()
        await release.wait()
        return "released"

    statements = StatementLog()
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=3, init=statements.attach)
    waiter = ImprovedQueuer(pool)
    try:
        async with running_worker(queuer):
            run_id = await queuer.enqueue("gated")
            await wait_event(started, "the task to start")
            await wait_for_step(queuer, run_id, "1", Status.RUNNING)
            waiting = asyncio.create_task(waiter.result(run_id, timeout=WAIT))
            await wait_until(
                statements.quiet_after("pgskewer_results", 0.3), "the waiter's first check"
            )

            before = len(statements.statements)
            await anyio.sleep(3)  # the measured interval, in which nothing finishes
            during_wait = len(statements.statements) - before

            release.set()
            with anyio.fail_after(5):
                result = await waiting
    finally:
        await waiter.close()
        await pool.close()

    assert during_wait == 0
    assert result == {"status": "successful", "ok": True, "result": "released"}


async def test_result_timeout_returns_none(queuer: ImprovedQueuer) -> None:
    release = asyncio.Event()

    @queuer.entrypoint("slow")
    async def slow(job: Any) -> str:
        await release.wait()
        return "done"

    async with running_worker(queuer):
        run_id = await queuer.enqueue("slow")
        with anyio.fail_after(WAIT):
            result = await queuer.result(run_id, timeout=0.3)
        release.set()
        final = await result_of(queuer, run_id)

    assert result is None
    assert final["result"] == "done"


async def test_dict_payload_round_trip(queuer: ImprovedQueuer) -> None:
    @queuer.entrypoint("echo")
    async def echo(job: Any) -> Any:
        return parse_payload(job.payload)

    payload = {"name": "ada", "sizes": [1, 2.5, None], "nested": {"ok": True}}
    async with running_worker(queuer):
        run_id = await queuer.enqueue("echo", payload)
        result = await result_of(queuer, run_id)

    assert result["result"] == payload


async def test_bytes_payload_round_trip(queuer: ImprovedQueuer) -> None:
    @queuer.entrypoint("raw")
    async def raw(job: Any) -> bytes:
        return bytes(job.payload)

    payload = b"\x00\xffbinary\x80 payload"
    async with running_worker(queuer):
        run_id = await queuer.enqueue("raw", payload)
        result = await result_of(queuer, run_id)

    assert result["result"] == payload


async def test_plain_pgqueuer_enqueue(queuer: ImprovedQueuer) -> None:
    @queuer.entrypoint("plain")
    async def plain(job: Any) -> dict[str, Any]:
        return {"payload": bytes(job.payload), "id": job.id}

    async with running_worker(queuer):
        ids = await queuer.qm.queries.enqueue("plain", b"from pgqueuer")
        result = await result_of(queuer, ids)

    assert result["status"] == "successful"
    assert result["result"] == {"payload": b"from pgqueuer", "id": ids[0]}


async def test_reregistered_task_runs_new(queuer: ImprovedQueuer) -> None:
    @queuer.entrypoint("versioned")
    async def first(job: Any) -> str:
        return "first"

    async with running_worker(queuer):
        first_run = await queuer.enqueue("versioned")
        first_result = await result_of(queuer, first_run)

        @queuer.entrypoint("versioned")
        async def second(job: Any) -> str:
            return "second"

        second_run = await queuer.enqueue("versioned")
        second_result = await result_of(queuer, second_run)

    assert first_result["result"] == "first"
    assert second_result["result"] == "second"


async def test_unencodable_result_fails(queuer: ImprovedQueuer) -> None:
    @queuer.entrypoint("opaque")
    async def opaque(job: Any) -> object:
        return object()

    async with running_worker(queuer):
        run_id = await queuer.enqueue("opaque")
        result = await result_of(queuer, run_id)

    assert result["status"] == "exception"
    assert result["ok"] is False
    assert result["error"]["type"] == "TypeError"
    assert "object" in result["error"]["message"]


@pytest.mark.parametrize(
    ("payload", "reason"),
    [(b'{"unclosed": ', "not valid JSON"), (b"\xff\xfe\x00", "not valid UTF-8")],
    ids=["invalid-json", "non-utf8"],
)
async def test_invalid_payload_in_task(queuer: ImprovedQueuer, payload: bytes, reason: str) -> None:
    @queuer.entrypoint("parser")
    async def parser(job: Any) -> Any:
        return parse_payload(job.payload)

    async with running_worker(queuer):
        run_id = await queuer.enqueue("parser", payload)
        result = await result_of(queuer, run_id)

    assert result["status"] == "exception"
    assert result["error"]["type"] == "ValueError"
    assert reason in result["error"]["message"]


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"{not json}", "not valid JSON"),
        (b"\xc3\x28", "not valid UTF-8"),
        (b'{"a": 1} trailing', "not valid JSON"),
    ],
    ids=["invalid-json", "non-utf8", "trailing-data"],
)
def test_parse_payload_rejects(payload: bytes, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        pgskewer.parse_payload(payload)


def test_parse_payload_empty_is_none() -> None:
    assert pgskewer.parse_payload(None) is None
    assert pgskewer.parse_payload(b"") is None
