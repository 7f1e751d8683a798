"""Worker registration and take-over of the jobs of dead workers.

Each worker inserts a row in the workers table and holds a session-level advisory lock on
its own connection for as long as it lives. A worker is dead when its lock can be taken:
PostgreSQL releases the lock when the worker's backend goes away, whether the process
was killed or its connection dropped. A busy event loop does not release it, so a worker
blocked by slow code is never mistaken for a dead one. Survivors then release the dead
worker's picked jobs at once instead of waiting for pgqueuer's heartbeat timeout.
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

from pgskewer.schema import Settings

logger = logging.getLogger("pgskewer")

#: Seconds between a worker's ``last_seen`` updates and its checks for dead workers.
CHECK_INTERVAL = 2.0
#: A worker not seen for this many seconds is shown as stale by ``pgskewer workers``.
STALE_AFTER = 30.0


class WorkerPresence:
    """Registers this worker, keeps its lock, and takes over the jobs of dead workers."""

    def __init__(
        self,
        settings: Settings,
        worker_id: uuid.UUID,
        connect: Callable[[], Any],
        pool: Any,
        entrypoints: Callable[[], list[str]],
        queue_table: str,
        pgqueuer_channel: str,
        on_takeover: Callable[[list[int]], Any] | None = None,
    ) -> None:
        self.settings = settings
        self.worker_id = worker_id
        self.lock_key = secrets.randbits(62)
        self._connect = connect
        self._pool = pool
        self._entrypoints = entrypoints
        self._queue_table = queue_table
        self._pgqueuer_channel = pgqueuer_channel
        self._on_takeover = on_takeover
        self._connection: Any = None
        self._task: asyncio.Task[None] | None = None
        self.takeovers: list[tuple[uuid.UUID, float]] = []

    async def start(self) -> None:
        """Take the lock and register; idempotent."""
        if self._task is not None:
            return
        self._connection = await self._connect()
        await self._connection.execute("SELECT pg_advisory_lock($1)", self.lock_key)
        await self._connection.execute(
            f"INSERT INTO {self.settings.table('workers')} (id, host, pid, entrypoints, lock_key) "
            "VALUES ($1, $2, $3, $4, $5)",
            self.worker_id,
            socket.gethostname(),
            os.getpid(),
            self._entrypoints(),
            self.lock_key,
        )
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
        with contextlib.suppress(Exception):
            await connection.execute(
                f"DELETE FROM {self.settings.table('workers')} WHERE id = $1", self.worker_id
            )
        with contextlib.suppress(Exception):
            await connection.close()

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(CHECK_INTERVAL)
            try:
                await self._connection.execute(
                    f"UPDATE {self.settings.table('workers')} SET last_seen = now(), "
                    "entrypoints = $2 WHERE id = $1",
                    self.worker_id,
                    self._entrypoints(),
                )
                await self.take_over_dead()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                logger.warning("worker %s presence update failed: %s", self.worker_id, exc)

    async def take_over_dead(self) -> list[int]:
        """Release the picked jobs of every dead worker; return the released job ids."""
        released: list[int] = []
        async with self._pool.acquire() as connection:
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
                    released += await self._release_jobs_of(connection, other["id"])
                finally:
                    await connection.execute("SELECT pg_advisory_unlock($1)", other["lock_key"])
        if released and self._on_takeover is not None:
            await self._on_takeover(released)
        return released

    async def _release_jobs_of(self, connection: Any, dead: uuid.UUID) -> list[int]:
        steps = self.settings.table("steps")
        async with connection.transaction():
            job_ids = [
                row["job_id"]
                for row in await connection.fetch(
                    f"SELECT job_id FROM {steps} WHERE worker_id = $1 "
                    "AND status IN ('running', 'canceling') AND job_id IS NOT NULL",
                    dead,
                )
            ]
            # Make the picked jobs stale so the next dequeue of any worker picks them up.
            await connection.execute(
                f"UPDATE {self._queue_table} SET heartbeat = now() - interval '1 day' "
                "WHERE id = ANY($1::bigint[]) AND status = 'picked'",
                job_ids,
            )
            await connection.execute(
                f"DELETE FROM {self.settings.table('workers')} WHERE id = $1", dead
            )
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


async def list_workers(connection: Any, settings: Settings) -> list[dict[str, Any]]:
    """Return registered workers with whether each one still holds its lock."""
    rows = await connection.fetch(
        f"SELECT w.id, w.host, w.pid, w.entrypoints, w.started, w.last_seen, "
        "EXISTS (SELECT 1 FROM pg_locks l WHERE l.locktype = 'advisory' AND l.granted "
        "AND ((l.classid::bigint << 32) | l.objid::bigint) = w.lock_key) AS alive "
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
