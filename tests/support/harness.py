"""In-process workers, bounded polling and statement counting for tests on a real database."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
import asyncpg

from pgskewer import ImprovedQueuer, Status

#: Bound of every wait in these tests, in seconds.
WAIT = 30.0

#: An idle in-process worker looks for due jobs this often, in seconds, so retries with a
#: short backoff and deferred jobs start quickly.
DEQUEUE_TIMEOUT = 0.2


@contextlib.asynccontextmanager
async def running_worker(
    pgq: ImprovedQueuer, *, concurrency: int = 10, dequeue_timeout: float = DEQUEUE_TIMEOUT
) -> AsyncIterator[asyncio.Task[None]]:
    """Run ``pgq``'s worker as a task on this loop for the ``async with`` block.

    On exit the running jobs' cancel scopes are cancelled and the shutdown event is set.
    A step that ignores cancellation (``cancelable=False``) must be released by the test
    before the block ends, because pgqueuer waits for running jobs when it stops.
    """
    task = asyncio.create_task(pgq.run(concurrency=concurrency, dequeue_timeout=dequeue_timeout))
    try:
        yield task
    finally:
        for context in list(pgq.qm.job_context.values()):
            context.cancellation.cancel()
        pgq.shutdown.set()
        with anyio.fail_after(WAIT):
            await task


async def wait_until(
    condition: Callable[[], Awaitable[Any]],
    description: str,
    *,
    timeout: float = WAIT,
    interval: float = 0.05,
) -> Any:
    """Poll ``condition`` until it returns a truthy value and return that value.

    Raises ``TimeoutError`` naming ``description`` after ``timeout`` seconds.
    """
    try:
        with anyio.fail_after(timeout):
            while True:
                value = await condition()
                if value:
                    return value
                await anyio.sleep(interval)
    except TimeoutError:
        raise TimeoutError(f"timed out after {timeout:g}s waiting for {description}") from None


async def wait_event(event: asyncio.Event, description: str, timeout: float = WAIT) -> None:
    """Wait for ``event``, raising ``TimeoutError`` naming ``description`` after ``timeout``."""
    try:
        with anyio.fail_after(timeout):
            await event.wait()
    except TimeoutError:
        raise TimeoutError(f"timed out after {timeout:g}s waiting for {description}") from None


async def step_status(pgq: ImprovedQueuer, run_id: int, path: str) -> Status:
    """Return the stored status of one step of a run."""
    state = await pgq.run_status(run_id)
    return state.step(path).status


async def wait_for_step(pgq: ImprovedQueuer, run_id: int, path: str, status: Status | str) -> None:
    """Wait until step ``path`` of ``run_id`` has ``status``."""
    expected = Status(status)

    async def reached() -> bool:
        return await step_status(pgq, run_id, path) is expected

    await wait_until(reached, f"step {path} of run {run_id} to be {expected.value}")


async def result_of(pgq: ImprovedQueuer, run_id: int | list[int]) -> Any:
    """Return the run's result, failing the test when it takes longer than ``WAIT``."""
    # The outer bound also covers a result() that hangs outside its own wait.
    with anyio.fail_after(WAIT + 5):
        result = await pgq.result(run_id, timeout=WAIT)
    assert result is not None, f"run {run_id} did not finish within {WAIT:g}s"
    return result


class StatementLog:
    """The statements run on the connections of one asyncpg pool, in order."""

    def __init__(self) -> None:
        self.statements: list[str] = []
        self.last_at = time.monotonic()

    async def attach(self, connection: asyncpg.Connection) -> None:
        """Start recording a connection (the ``init`` callback of ``asyncpg.create_pool``)."""
        connection.add_query_logger(self._record)

    def _record(self, record: Any) -> None:
        self.statements.append(record.query)
        self.last_at = time.monotonic()

    def quiet_after(self, fragment: str, seconds: float) -> Callable[[], Awaitable[bool]]:
        """Return a condition for ``wait_until``: a statement containing ``fragment`` ran
        and no statement at all ran for the last ``seconds``."""

        async def condition() -> bool:
            idle = time.monotonic() - self.last_at
            return self.count(fragment) > 0 and idle >= seconds

        return condition

    def count(self, fragment: str = "") -> int:
        """Return how many recorded statements contain ``fragment``."""
        return sum(1 for statement in self.statements if fragment in statement)


class EventLog:
    """pgskewer's NOTIFY events, collected on a dedicated LISTEN connection."""

    def __init__(self, channel: str = "pgskewer_events") -> None:
        self.channel = channel
        self.events: list[dict[str, Any]] = []
        self._connection: asyncpg.Connection | None = None

    async def start(self, dsn: str) -> None:
        self._connection = await asyncpg.connect(dsn)
        await self._connection.add_listener(self.channel, self._on_notify)

    async def stop(self) -> None:
        if self._connection is not None:
            await self._connection.close()
            self._connection = None

    def _on_notify(self, _connection: Any, _pid: int, _channel: str, payload: str) -> None:
        self.events.append(json.loads(payload))

    def statuses(self, run_id: int, step: str) -> list[str]:
        """Return the statuses announced for one step (``""``: the run) in order."""
        return [
            event["status"]
            for event in self.events
            if event.get("run") == run_id and event.get("step") == step and "status" in event
        ]
