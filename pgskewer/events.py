"""One LISTEN connection per queuer that wakes result waiters, watchers and log followers.

Triggers on the runs and steps tables send ``{"run": id, "step": path, "status": s}`` for
every status change, and the log writer sends ``{"run": id, "log": true}`` per batch.
Subscribers get an ``asyncio.Event`` that is set on every event of their run, and also
after a reconnect, because events sent while the connection was down are lost: on
waking, a subscriber re-reads the state it cares about.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from pgskewer.workers import connection_lost_reason, is_connection_lost

logger = logging.getLogger("pgskewer")

T = TypeVar("T")

#: How long a read of a waiter keeps retrying while the database is unreachable.
READ_RETRY_SECONDS = 120.0

ConnectionFactory = Callable[[], Awaitable[Any]]
EventCallback = Callable[[dict[str, Any]], None]

_RECONNECT_DELAYS = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


class Subscription:
    """Wake-ups for one run (or for every run when ``run_id`` is ``None``)."""

    def __init__(self, run_id: int | None) -> None:
        self.run_id = run_id
        self.changed = asyncio.Event()
        self.last_status: dict[str, str] = {}
        #: Set when the hub reconnected: events may have been missed, so re-read state.
        self.resync = False

    def _deliver(self, event: dict[str, Any]) -> None:
        if "status" in event:
            self.last_status[str(event.get("step", ""))] = str(event["status"])
        self.changed.set()

    async def wait(self) -> None:
        """Wait for the next event or reconnect, then reset."""
        await self.changed.wait()
        self.changed.clear()


class EventHub:
    """Listens on the events channel and fans events out to subscriptions.

    ``start`` and ``close`` are idempotent. The connection comes from ``connect`` and is
    given back with ``release``; when it drops, the hub reconnects with backoff and wakes
    every subscriber so they re-read what they may have missed.
    """

    def __init__(
        self,
        channel: str,
        connect: ConnectionFactory,
        release: Callable[[Any], Awaitable[None]],
    ) -> None:
        self.channel = channel
        self._connect = connect
        self._release = release
        self._connection: Any = None
        self._subscriptions: dict[int | None, set[Subscription]] = {}
        self._callbacks: list[EventCallback] = []
        self._ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._lost = asyncio.Event()
        self._closed = False

    async def start(self) -> None:
        """Connect and LISTEN; returns once events are being received."""
        if self._task is None:
            self._task = asyncio.create_task(self._maintain(), name="pgskewer-events")
        await self._ready.wait()

    async def close(self) -> None:
        """Stop listening and release the connection."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self._drop_connection()

    def add_callback(self, callback: EventCallback) -> None:
        """Call ``callback(event)`` for every event, on the hub's loop."""
        self._callbacks.append(callback)

    @contextlib.contextmanager
    def subscribe(self, run_id: int | None) -> Any:
        """Subscribe to the events of ``run_id`` (``None``: every run) for a ``with`` block."""
        subscription = Subscription(run_id)
        self._subscriptions.setdefault(run_id, set()).add(subscription)
        try:
            yield subscription
        finally:
            subscribers = self._subscriptions.get(run_id)
            if subscribers is not None:
                subscribers.discard(subscription)
                if not subscribers:
                    del self._subscriptions[run_id]

    async def _maintain(self) -> None:
        attempt = 0
        while not self._closed:
            try:
                await self._listen()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                delay = _RECONNECT_DELAYS[min(attempt, len(_RECONNECT_DELAYS) - 1)]
                logger.warning("events connection failed (%s); reconnecting in %.1fs", exc, delay)
                attempt += 1
                await asyncio.sleep(delay)
                continue
            attempt = 0
            await self._lost.wait()
            self._lost.clear()
            await self._drop_connection()
            logger.warning("events connection lost; reconnecting")

    async def _listen(self) -> None:
        connection = await self._connect()
        self._connection = connection
        self._lost.clear()
        connection.add_termination_listener(self._on_terminated)
        try:
            await connection.add_listener(self.channel, self._on_notify)
        except BaseException:
            await self._drop_connection()
            raise
        was_ready = self._ready.is_set()
        self._ready.set()
        if was_ready:
            self._wake_all()

    def _on_terminated(self, _connection: Any) -> None:
        self._lost.set()

    async def _drop_connection(self) -> None:
        connection, self._connection = self._connection, None
        if connection is None:
            return
        with contextlib.suppress(Exception):
            await connection.remove_listener(self.channel, self._on_notify)
        with contextlib.suppress(Exception):
            await self._release(connection)

    def _on_notify(self, _connection: Any, _pid: int, _channel: str, payload: str) -> None:
        try:
            event = json.loads(payload)
            run_id = int(event["run"])
        except (ValueError, KeyError, TypeError):
            logger.debug("ignored malformed event %r", payload[:200])
            return
        for key in (run_id, None):
            for subscription in list(self._subscriptions.get(key, ())):
                subscription._deliver(event)
        for callback in list(self._callbacks):
            try:
                callback(event)
            except Exception:
                logger.exception("event callback failed for %r", event)

    def _wake_all(self) -> None:
        for subscribers in list(self._subscriptions.values()):
            for subscription in list(subscribers):
                subscription.resync = True
                subscription.changed.set()
        for callback in list(self._callbacks):
            with contextlib.suppress(Exception):
                callback({"run": 0, "reconnected": True})


async def read_through_outage(read: Callable[[], Awaitable[T]]) -> T:
    """Return ``read()``, running it again while it fails because the connection was lost.

    Waiters use it so that a PostgreSQL restart or a terminated connection delays them
    instead of failing them. Gives up after :data:`READ_RETRY_SECONDS` by raising the
    last connection error.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + READ_RETRY_SECONDS
    attempt = 0
    while True:
        try:
            return await read()
        except Exception as exc:
            if not is_connection_lost(exc) or loop.time() > deadline:
                raise
            delay = _RECONNECT_DELAYS[min(attempt, len(_RECONNECT_DELAYS) - 1)]
            attempt += 1
            logger.info("read failed (%s); retrying in %.1fs", connection_lost_reason(exc), delay)
        await asyncio.sleep(delay)
