"""Input that PostgreSQL or pgqueuer cannot store, oversized values, and secrets in logs.

Each test checks the error a caller sees and that the queue still runs the next job.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from pgskewer import connect, executor
from pgskewer.advance import DuplicateRunError

pytestmark = pytest.mark.anyio

SENTINEL = "s3cr3t-SENTINEL"


def register_tasks(queuer: Any) -> None:
    @queuer.entrypoint("echo")
    async def echo(job: Any) -> Any:
        return json.loads(job.payload) if job.payload else None

    @queuer.entrypoint("fail_with_nul")
    async def fail_with_nul(_job: Any) -> None:
        raise ValueError("bad \x00 byte")

    @queuer.entrypoint("huge")
    async def huge(job: Any) -> str:
        return "x" * int(json.loads(job.payload)["size"])

    @queuer.entrypoint("slow")
    async def slow(_job: Any) -> str:
        await asyncio.sleep(0.5)
        return "done"


@pytest.fixture
async def running(queuer: Any) -> AsyncIterator[Any]:
    """The ``queuer`` fixture with the tasks above registered and its worker running."""
    register_tasks(queuer)
    task = asyncio.create_task(queuer.run(concurrency=4))
    try:
        yield queuer
    finally:
        queuer.shutdown.set()
        await asyncio.wait_for(task, 30)


async def assert_queue_works(queuer: Any) -> None:
    run_id = await queuer.enqueue("echo", {"still": "working"})
    result = await queuer.result(run_id, timeout=30)
    assert result is not None
    assert result["status"] == "successful"
    assert result["result"] == {"still": "working"}


async def test_nul_in_payload_roundtrips(running: Any) -> None:
    # The payload is JSON text with a \u0000 escape: stored as bytea, and the result in a
    # json column, which (unlike jsonb) accepts the escape.
    run_id = await running.enqueue("echo", {"text": "a\u0000b"})
    result = await running.result(run_id, timeout=30)
    assert result is not None
    assert result["result"] == {"text": "a\u0000b"}
    await assert_queue_works(running)


async def test_nul_in_error_message_is_kept(running: Any) -> None:
    run_id = await running.enqueue("fail_with_nul")
    result = await running.result(run_id, timeout=30)
    assert result is not None
    assert result["status"] == "exception"
    assert result["error"]["type"] == "ValueError"
    assert result["error"]["message"] == "bad \x00 byte"
    await assert_queue_works(running)


async def test_nul_in_dedupe_key_rejected(running: Any) -> None:
    # Dedupe keys go into a text column, which cannot hold NUL.
    with pytest.raises(asyncpg.exceptions.CharacterNotInRepertoireError) as raised:
        await running.enqueue("echo", {"x": 1}, dedupe_key="a\x00b")
    assert "0x00" in str(raised.value)
    async with running.pool.acquire() as connection:
        assert await connection.fetchval("SELECT count(*) FROM pgskewer_runs") == 0
    await assert_queue_works(running)


async def test_nul_in_name_rejected(running: Any) -> None:
    with pytest.raises(ValueError, match="contains a NUL character"):
        await running.enqueue("ec\x00ho", {"x": 1})
    async with running.pool.acquire() as connection:
        assert await connection.fetchval("SELECT count(*) FROM pgskewer_runs") == 0
    await assert_queue_works(running)


async def test_result_above_limit_fails_step(running: Any, monkeypatch: Any) -> None:
    limit = 4096
    monkeypatch.setattr(executor, "MAX_RESULT_BYTES", limit)
    run_id = await running.enqueue("huge", {"size": limit + 1})
    result = await running.result(run_id, timeout=30)
    assert result is not None
    assert result["status"] == "exception"
    assert result["error"]["type"] == "ValueError"
    assert f"above the limit of {limit}" in result["error"]["message"]
    assert "return a reference" in result["error"]["message"]
    await assert_queue_works(running)


@pytest.mark.timeout(120)
async def test_result_above_real_limit(running: Any) -> None:
    size = executor.MAX_RESULT_BYTES  # two quotes make the JSON text one limit plus 2 bytes
    run_id = await running.enqueue("huge", {"size": size})
    result = await running.result(run_id, timeout=90)
    assert result is not None
    assert result["status"] == "exception"
    assert f"the result is {size + 2} bytes of JSON" in result["error"]["message"]
    await assert_queue_works(running)


@pytest.mark.timeout(120)
async def test_notify_payloads_stay_small(running: Any) -> None:
    # Events carry ids, paths and statuses only: a 10 MB result and a 1,000-byte task
    # name (the longest allowed) never reach NOTIFY's 8000-byte payload limit.
    long_name = "t" * 1000
    running.entrypoint(long_name)(_return_large)
    sizes: list[int] = []
    listener = await asyncpg.connect(_dsn_of(running))
    try:
        await listener.add_listener(
            "pgskewer_events", lambda *args: sizes.append(len(args[3].encode()))
        )
        run_id = await running.enqueue(long_name)
        result = await running.result(run_id, timeout=60)
        await asyncio.sleep(0.2)
    finally:
        await listener.close()
    assert result is not None
    assert result["status"] == "successful"
    assert len(result["result"]) == 10 * 1024 * 1024
    assert sizes
    assert max(sizes) < 200
    await assert_queue_works(running)


async def _return_large(_job: Any) -> str:
    return "y" * (10 * 1024 * 1024)


async def test_long_name_rejected(running: Any) -> None:
    # pgqueuer indexes the entrypoint name, so enqueue checks its length first.
    name = "".join(hashlib.sha256(str(i).encode()).hexdigest() for i in range(160))[:10_000]
    with pytest.raises(ValueError, match="above the limit of 1000; use a shorter name"):
        await running.enqueue(name)
    async with running.pool.acquire() as connection:
        assert await connection.fetchval("SELECT count(*) FROM pgskewer_runs") == 0
        assert await connection.fetchval("SELECT count(*) FROM pgqueuer") == 0
    await assert_queue_works(running)


async def test_unknown_entrypoint_stays_queued(running: Any, caplog: Any) -> None:
    # A name that no live worker serves is accepted with a warning and waits; it can be
    # canceled, and the other entrypoints keep running.
    await asyncio.sleep(0.1)
    with caplog.at_level(logging.WARNING, logger="pgskewer"):
        run_id = await running.enqueue("nobody_serves_this")
    assert any("no live worker serves 'nobody_serves_this'" in r.message for r in caplog.records)
    assert await running.result(run_id, timeout=1.0) is None
    state = await running.run_status(run_id)
    assert state.status.value == "queued"
    await assert_queue_works(running)
    assert (await running.cancel(run_id)).value == "canceled"
    result = await running.result(run_id, timeout=10)
    assert result is not None
    assert result["status"] == "canceled"


async def test_reused_dedupe_key(running: Any) -> None:
    first = await running.enqueue("slow", dedupe_key="nightly")
    with pytest.raises(DuplicateRunError) as raised:
        await running.enqueue("slow", dedupe_key="nightly")
    assert "'nightly' is still in flight" in str(raised.value)
    assert raised.value.dedupe_key == "nightly"
    result = await running.result(first, timeout=30)
    assert result is not None
    assert result["status"] == "successful"
    # Once the first run finished, the key is free again.
    second = await running.enqueue("slow", dedupe_key="nightly")
    assert second != first
    result = await running.result(second, timeout=30)
    assert result is not None
    assert result["status"] == "successful"
    await assert_queue_works(running)


def _dsn_of(queuer: Any) -> str:
    params = queuer.pool._connect_kwargs
    return str(params.get("dsn") or queuer.pool._connect_args[0])


def _with_password(dsn: str, password: str) -> str:
    parts = urlsplit(dsn)
    netloc = f"{parts.username or 'postgres'}:{password}@{parts.hostname}:{parts.port or 5432}"
    return urlunsplit(parts._replace(netloc=netloc))


@pytest.mark.timeout(120)
async def test_password_never_shown(dsn: str, caplog: Any) -> None:
    if urlsplit(dsn).hostname is None:
        pytest.skip("the test server is reached over a unix socket, which takes no password")
    secret_dsn = _with_password(dsn, SENTINEL)
    texts: list[str] = []
    caplog.set_level(logging.DEBUG)

    queuer = await connect(secret_dsn)
    try:
        await queuer.install()
        register_tasks(queuer)
        worker = asyncio.create_task(queuer.run(concurrency=2))
        ok = await queuer.enqueue("echo", {"a": 1})
        failed = await queuer.enqueue("fail_with_nul")
        for run_id in (ok, failed):
            result = await queuer.result(run_id, timeout=30)
            texts.append(repr(result))
        texts.append(repr(queuer))
        texts.append(repr(await queuer.run_status(ok)))
        queuer.shutdown.set()
        await asyncio.wait_for(worker, 30)
    finally:
        await queuer.close()

    unreachable = _with_password(dsn, SENTINEL).replace(f":{urlsplit(dsn).port or 5432}/", ":1/")
    with pytest.raises(ConnectionError) as raised:
        await connect(unreachable)
    texts.append(str(raised.value))
    texts.append(repr(raised.value))
    with pytest.raises(Exception) as wrong_database:
        await connect(secret_dsn.rsplit("/", 1)[0] + "/no_such_database_here")
    texts.append(str(wrong_database.value))

    for record in caplog.records:
        texts.append(record.getMessage())
        if record.exc_info:
            texts.append(logging.Formatter().formatException(record.exc_info))
    assert len(caplog.records) > 10
    leaks = [text for text in texts if SENTINEL in text]
    assert leaks == []


async def test_too_many_connections_error(temporary_cluster: Any) -> None:
    # A role limited to one connection, on a server of this test alone (roles are
    # server-wide objects).
    admin = await asyncpg.connect(temporary_cluster.admin_dsn)
    try:
        await admin.execute("CREATE ROLE limited LOGIN CONNECTION LIMIT 1")
    finally:
        await admin.close()
    limited = temporary_cluster.admin_dsn.replace("postgres@", "limited@", 1)
    holder = await asyncpg.connect(limited)
    try:
        with pytest.raises(ConnectionError) as raised:
            await connect(limited)
    finally:
        await holder.close()
    message = str(raised.value)
    assert "cannot connect to PostgreSQL" in message
    assert "TooManyConnectionsError" in message
    queuer = await connect(limited, pool_size=1)
    await queuer.close()


async def test_pool_too_small_for_worker(dsn: str) -> None:
    queuer = await connect(dsn, pool_size=2)
    try:
        await queuer.install()
        with pytest.raises(ValueError, match="needs at least 3"):
            await queuer.run()
    finally:
        await queuer.close()


async def test_payload_above_limit_rejected(running: Any, monkeypatch: Any) -> None:
    import pgskewer.queuer

    monkeypatch.setattr(pgskewer.queuer, "MAX_PAYLOAD_BYTES", 1024)
    with pytest.raises(ValueError, match="above the limit of 1024"):
        await running.enqueue("echo", b"x" * 2048)
    async with running.pool.acquire() as connection:
        assert await connection.fetchval("SELECT count(*) FROM pgskewer_runs") == 0
    await assert_queue_works(running)
