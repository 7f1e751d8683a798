"""Worker registration and take-over of the jobs of dead workers.

Each worker inserts a row in the workers table and holds a session-level advisory lock on
its own connection for as long as it lives. A worker is dead when its lock can be taken:
PostgreSQL releases the lock when the worker's backend goes away, whether the process
was killed or its connection dropped. A busy event loop does not release it, so a worker
blocked by slow code is never mistaken for a dead one. While its lock is held, the other
workers also keep the pgqueuer heartbeat of its picked jobs fresh, so pgqueuer does not
hand them to another worker either. Survivors release the picked jobs of a dead worker at once
instead of waiting for pgqueuer's heartbeat timeout.

Liveness is the worker's database session, not its progress: a worker process that hangs
with its connection open keeps its steps until it is killed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import socket
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import asyncpg
from pgqueuer.errors import FailingListenerError

from pgskewer import advance
from pgskewer.model import Status
from pgskewer.schema import Settings

logger = logging.getLogger("pgskewer")

#: Seconds between a worker's ``last_seen`` updates and its checks for dead workers
#: (shorter when a quarter of the pgqueuer heartbeat timeout is shorter).
CHECK_INTERVAL = 2.0
#: A worker not seen for this many seconds is shown as stale by ``pgskewer workers``.
STALE_AFTER = 30.0
#: For this many seconds after PostgreSQL starts, no worker is taken over: every lock was
#: lost with the restart, and live workers need a moment to reconnect and take theirs again.
RESTART_GRACE = 10.0

#: TCP keepalive settings of the presence connection, so the server notices a worker
#: host that vanished without closing its connections (not used on Unix sockets).
_KEEPALIVE_SETTINGS = (
    ("tcp_keepalives_idle", "10"),
    ("tcp_keepalives_interval", "5"),
    ("tcp_keepalives_count", "3"),
)

_LOST_CONNECTION_TYPES: tuple[type[BaseException], ...] = (
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.TooManyConnectionsError,
    FailingListenerError,
    OSError,
)

_HELD_LOCK_SQL = (
    "EXISTS (SELECT 1 FROM pg_locks AS l WHERE l.locktype = 'advisory' AND l.granted "
    "AND l.objsubid = 1 "
    "AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) "
    "AND ((l.classid::bigint << 32) | l.objid::bigint) = w.lock_key)"
)


def is_connection_lost(exc: BaseException) -> bool:
    """Return whether ``exc`` means the database connection was lost or could not be made.

    True for dropped and terminated connections, a server that shuts down, restarts or
    has no free connection slot, network errors, pgqueuer's failed LISTEN probe, and
    exception groups made only of those. It looks at asyncpg's message text for the two
    client-side errors that a terminated pooled connection causes (asyncpg 0.32).
    """
    if isinstance(exc, BaseExceptionGroup):
        return all(is_connection_lost(inner) for inner in exc.exceptions)
    if isinstance(exc, _LOST_CONNECTION_TYPES):
        return True
    if isinstance(exc, asyncpg.exceptions.InternalClientError):
        # asyncpg raises it for a pooled connection left mid-operation by a terminated
        # backend; releasing that connection closes it, so a retry gets a new one.
        return "another operation" in str(exc)
    # asyncpg detaches a pooled connection whose backend went away from its proxy, which
    # then reports having been released.
    return isinstance(exc, asyncpg.InterfaceError) and (
        "connection is closed" in str(exc) or "released back to the pool" in str(exc)
    )


def connection_lost_reason(exc: BaseException) -> str:
    """Describe a connection error in one line for a log message."""
    message = str(exc) or "no message"
    return f"{type(exc).__name__}: {message}"


class WorkerPresence:
    """Registers this worker, keeps its lock, and takes over the jobs of dead workers.

    The presence connection is re-established after it drops. The worker then takes its
    own lock again and keeps its row, unless another worker took it over meanwhile. In
    that case the steps it still runs may run a second time elsewhere (the first outcome
    stored wins), and the worker registers a new row.
    """

    def __init__(
        self,
        settings: Settings,
        worker_id: uuid.UUID,
        connect: Callable[[], Any],
        pool: Any,
        entrypoints: Callable[[], list[str]],
        queue_table: str,
        pgqueuer_channel: str,
        *,
        heartbeat_timeout: float = 600.0,
    ) -> None:
        self.settings = settings
        self.worker_id = worker_id
        self.lock_key = secrets.randbits(62)
        self.check_interval = min(CHECK_INTERVAL, heartbeat_timeout / 4)
        self.heartbeat_timeout = heartbeat_timeout
        self._connect = connect
        self._pool = pool
        self._entrypoints = entrypoints
        self._queue_table = queue_table
        self._pgqueuer_channel = pgqueuer_channel
        self._connection: Any = None
        self._task: asyncio.Task[None] | None = None
        self._failing = False
        #: ``(dead worker id, loop time)`` of every take-over this worker made.
        self.takeovers: list[tuple[uuid.UUID, float]] = []
        #: How often the presence connection was re-established.
        self.reconnects = 0

    async def start(self) -> None:
        """Take the lock and register; idempotent."""
        if self._task is not None:
            return
        await self._register()
        logger.info("worker %s registered (pid %d)", self.worker_id, os.getpid())
        await self.take_over_dead()
        self._task = asyncio.create_task(self._beat(), name="pgskewer-worker-presence")

    async def stop(self) -> None:
        """Unregister and release the lock; idempotent."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        connection, self._connection = self._connection, None
        if connection is None:
            return
        try:
            await connection.execute(
                f"DELETE FROM {self.settings.table('workers')} WHERE id = $1", self.worker_id
            )
        except Exception as exc:
            # The row stays; another worker removes it once it finds the lock free.
            logger.warning(
                "worker %s could not unregister: %s", self.worker_id, connection_lost_reason(exc)
            )
        with contextlib.suppress(Exception):
            await connection.close()

    async def _register(self) -> bool:
        """Open the presence connection, take the lock, and insert or refresh the row.

        Returns whether the row still existed, meaning no other worker took this one over.
        """
        connection = await self._connect()
        try:
            for name, value in _KEEPALIVE_SETTINGS:
                await connection.execute("SELECT set_config($1, $2, false)", name, value)
            await connection.execute("SELECT pg_advisory_lock($1)", self.lock_key)
            still_registered = await self._touch(connection)
            if not still_registered:
                await connection.execute(
                    f"INSERT INTO {self.settings.table('workers')} "
                    "(id, host, pid, entrypoints, lock_key) VALUES ($1, $2, $3, $4, $5)",
                    self.worker_id,
                    socket.gethostname(),
                    os.getpid(),
                    self._entrypoints(),
                    self.lock_key,
                )
        except BaseException:
            with contextlib.suppress(Exception):
                await connection.close()
            raise
        self._connection = connection
        return still_registered

    async def _touch(self, connection: Any) -> bool:
        row = await connection.fetchval(
            f"UPDATE {self.settings.table('workers')} SET last_seen = now(), "
            "entrypoints = $2 WHERE id = $1 RETURNING id",
            self.worker_id,
            self._entrypoints(),
        )
        return row is not None

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(self.check_interval)
            try:
                await self._beat_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._report_failure(exc)
            else:
                if self._failing:
                    logger.info("worker %s: presence checks work again", self.worker_id)
                self._failing = False

    async def _beat_once(self) -> None:
        connection = self._connection
        if connection is None or connection.is_closed():
            await self._reconnect()
        else:
            try:
                still_registered = await self._touch(connection)
            except Exception as exc:
                if not is_connection_lost(exc):
                    raise
                await self._reconnect()
                still_registered = True
            if not still_registered:
                logger.warning("worker %s: its row was deleted; registering again", self.worker_id)
                await self._reconnect()
        await self.take_over_dead()
        await self.keep_live_jobs_fresh()

    async def _reconnect(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            with contextlib.suppress(Exception):
                await connection.close()
        still_registered = await self._register()
        self.reconnects += 1
        if still_registered:
            logger.info("worker %s re-established its presence connection", self.worker_id)
        else:
            logger.warning(
                "worker %s was taken over while its presence connection was down; steps it "
                "still runs may also run on another worker (the first stored outcome wins)",
                self.worker_id,
            )

    def _report_failure(self, exc: Exception) -> None:
        if self._failing:
            logger.debug("worker %s presence check failed again: %s", self.worker_id, exc)
            return
        self._failing = True
        logger.warning(
            "worker %s presence check failed (retrying every %.1fs): %s",
            self.worker_id,
            self.check_interval,
            connection_lost_reason(exc),
        )

    async def keep_live_jobs_fresh(self) -> int:
        """Refresh the pgqueuer heartbeat of picked jobs of every worker that holds its lock.

        A worker whose event loop is blocked cannot send its own heartbeats; this keeps
        pgqueuer from handing its jobs to another worker. Returns how many jobs it touched.

        NOTE: it refreshes jobs older than a quarter of this worker's own heartbeat
        timeout, so workers sharing a queue should use the same ``heartbeat_timeout``.
        """
        async with self._pool.acquire() as connection:
            status = await connection.execute(
                f"UPDATE {self._queue_table} AS q SET heartbeat = now() "
                f"FROM {self.settings.table('workers')} AS w "
                "WHERE q.status = 'picked' AND q.queue_manager_id = w.id "
                "AND q.heartbeat < now() - make_interval(secs => $1) "
                f"AND {_HELD_LOCK_SQL}",
                self.heartbeat_timeout / 4,
            )
        return int(status.split()[-1])

    async def take_over_dead(self) -> list[int]:
        """Release the picked jobs of every dead worker; return the released job ids."""
        released: list[int] = []
        async with self._pool.acquire() as connection:
            if await _server_started_recently(connection):
                return released
            others = await connection.fetch(
                f"SELECT id, lock_key FROM {self.settings.table('workers')} WHERE id <> $1",
                self.worker_id,
            )
            for other in others:
                if not await connection.fetchval(
                    "SELECT pg_try_advisory_lock($1)", other["lock_key"]
                ):
                    continue
                try:
                    released += await self._take_over(connection, other["id"])
                finally:
                    await connection.execute("SELECT pg_advisory_unlock($1)", other["lock_key"])
        return released

    async def _take_over(self, connection: Any, dead: uuid.UUID) -> list[int]:
        workers = self.settings.table("workers")
        if not await connection.fetchval(
            f"SELECT EXISTS (SELECT 1 FROM {workers} WHERE id = $1)", dead
        ):
            return []  # another worker took it over between our listing and our lock
        await self._settle_abandoned_steps(connection, dead)

        async with connection.transaction():
            job_ids = await self._release_picked_jobs(connection, dead)
            await connection.execute(f"DELETE FROM {workers} WHERE id = $1", dead)
            await connection.execute(
                "SELECT pg_notify($1, $2)",
                self._pgqueuer_channel,
                json.dumps(
                    {
                        "type": "table_changed_event",
                        "operation": "update",
                        "table": self._queue_table,
                        "sent_at": datetime.now(UTC).isoformat(),
                    }
                ),
            )
        self.takeovers.append((dead, asyncio.get_running_loop().time()))
        logger.warning(
            "worker %s is gone (its lock was free); released %d of its jobs: %s",
            dead,
            len(job_ids),
            job_ids,
        )
        return job_ids

    async def _release_picked_jobs(self, connection: Any, dead: uuid.UUID) -> list[int]:
        # A backdated heartbeat makes the next dequeue of any worker claim the job again;
        # the UPDATE itself sends no NOTIFY, so the caller sends one.
        rows = await connection.fetch(
            f"UPDATE {self._queue_table} SET heartbeat = now() - interval '1 day' "
            "WHERE status = 'picked' AND (queue_manager_id = $1 OR id IN ("
            f"SELECT job_id FROM {self.settings.table('steps')} "
            "WHERE worker_id = $1 AND status = 'running' AND job_id IS NOT NULL)) RETURNING id",
            dead,
        )
        return sorted(row["id"] for row in rows)

    async def _settle_abandoned_steps(self, connection: Any, dead: uuid.UUID) -> None:
        """Finish the dead worker's steps that no pgqueuer job would run again.

        A ``canceling`` step's job was already removed by the cancel, so it ends
        ``canceled`` here and its run settles. A ``running`` step whose job is gone (its
        handler failed before storing an outcome) goes back to the queue.
        """
        steps = self.settings.table("steps")
        rows = await connection.fetch(
            f"SELECT s.run_id, s.path, s.task, s.status FROM {steps} AS s "
            "WHERE s.worker_id = $1 AND (s.status = 'canceling' OR (s.status = 'running' "
            f"AND NOT EXISTS (SELECT 1 FROM {self._queue_table} AS q WHERE q.id = s.job_id)))",
            dead,
        )
        for row in rows:
            run_id, path = row["run_id"], row["path"]
            if row["status"] == "running" and await advance.release_step(
                connection, self.settings, run_id, path, row["task"]
            ):
                logger.warning(
                    "run %d step %s: worker %s died and its job is gone; queued it again",
                    run_id,
                    path,
                    dead,
                )
                continue
            message = f"worker {dead} died while this step was being canceled"
            outcome = advance.Outcome(
                Status.CANCELED,
                error={"type": "CancelledError", "message": message, "traceback": ""},
            )
            await advance.finish_step(connection, self.settings, run_id, path, outcome)
            logger.warning("run %d step %s: %s; finished it canceled", run_id, path, message)


async def _server_started_recently(connection: Any) -> bool:
    return bool(
        await connection.fetchval(
            "SELECT now() - pg_postmaster_start_time() < make_interval(secs => $1)",
            RESTART_GRACE,
        )
    )


async def list_workers(connection: Any, settings: Settings) -> list[dict[str, Any]]:
    """Return registered workers with whether each one still holds its lock."""
    rows = await connection.fetch(
        f"SELECT w.id, w.host, w.pid, w.entrypoints, w.started, w.last_seen, "
        f"{_HELD_LOCK_SQL} AS alive "
        f"FROM {settings.table('workers')} AS w ORDER BY w.started"
    )
    return [dict(row) for row in rows]


async def served_entrypoints(connection: Any, settings: Settings) -> set[str] | None:
    """Return the entrypoints of live workers, or ``None`` when no worker is registered."""
    rows = await connection.fetch(
        f"SELECT entrypoints FROM {settings.table('workers')} "
        "WHERE last_seen > now() - make_interval(secs => $1)",
        STALE_AFTER,
    )
    if not rows:
        return None
    return {name for row in rows for name in row["entrypoints"]}
