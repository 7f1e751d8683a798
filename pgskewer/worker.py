"""The worker loop: runs the registered tasks of one queuer until it is told to stop."""

from __future__ import annotations

import contextlib
import logging
from datetime import timedelta
from typing import TYPE_CHECKING

import anyio
from pgqueuer.types import QueueExecutionMode

from pgskewer import schema
from pgskewer.workers import WorkerPresence

if TYPE_CHECKING:
    from pgskewer.queuer import ImprovedQueuer

logger = logging.getLogger("pgskewer")


async def run_worker(
    queuer: ImprovedQueuer,
    *,
    concurrency: int = 10,
    dequeue_timeout: float = 2.0,
    heartbeat_timeout: float = 600.0,
    mode: QueueExecutionMode = QueueExecutionMode.continuous,
) -> None:
    """Run ``queuer``'s worker until ``queuer.shutdown`` is set (see ``ImprovedQueuer.run``)."""
    pool = await queuer._ready()
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    batch_size = max(1, concurrency // 2)
    async with pool.acquire() as connection:
        if not await schema.is_installed(connection, queuer.settings):
            raise RuntimeError(
                "pgskewer's schema is not installed in this database; run "
                "'pgskewer install' or 'await queuer.install()' first"
            )
    for name in queuer.registry.names():
        queuer._register_executor(name)
    for name, cron, data in queuer._schedules:
        with contextlib.suppress(RuntimeError):
            queuer._register_schedule(name, cron, data)
    await queuer._events()
    presence = WorkerPresence(
        queuer.settings,
        queuer.worker_id,
        queuer._dedicated_connection,
        pool,
        queuer.registry.names,
        "pgqueuer",
        queuer.pgq.channel,
    )
    queuer._presence = presence
    await presence.start()
    logger.info(
        "worker %s started: %d entrypoints, concurrency %d",
        queuer.worker_id,
        len(queuer.registry.names()),
        concurrency,
    )
    try:
        await queuer.pgq.run(
            dequeue_timeout=timedelta(seconds=dequeue_timeout),
            batch_size=batch_size,
            max_concurrent_tasks=max(concurrency, 2 * batch_size),
            heartbeat_timeout=timedelta(seconds=heartbeat_timeout),
            mode=mode,
        )
    finally:
        with anyio.CancelScope(shield=True):
            await queuer.log_writer.flush()
            await presence.stop()
            queuer._presence = None
        logger.info("worker %s stopped", queuer.worker_id)
