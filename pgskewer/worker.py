"""The worker loop: runs the registered tasks of one queuer until it is stopped.

pgqueuer's ``QueueManager.run`` ends (after its running jobs finish) when a query fails,
and keeps going deaf when its LISTEN connection dies. The worker here survives both: it
runs the queue manager in *generations*. A generation that loses its connection stops
claiming, lets its running jobs finish in the background, and a fresh generation on a
fresh pgqueuer driver takes over claiming at once, after a backoff delay when the database
cannot be reached. All generations of one worker share the worker id (which is also their
pgqueuer ``queue_manager_id``) and one job-context mapping, so cancellation NOTIFYs reach
every running job and no job is dispatched twice in one process.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import weakref
from collections.abc import Awaitable, Coroutine
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import anyio
import asyncpg
from pgqueuer import AsyncpgPoolDriver, PgQueuer
from pgqueuer.core import listeners
from pgqueuer.core.qm import QueueManager
from pgqueuer.models import Context, Job
from pgqueuer.types import JobId, QueueExecutionMode, QueueManagerId

from pgskewer import advance, schema
from pgskewer.graph import find_node
from pgskewer.model import ErrorInfo, Status
from pgskewer.prune import prune
from pgskewer.registry import TaskOptions
from pgskewer.workers import WorkerPresence, connection_lost_reason, is_connection_lost

if TYPE_CHECKING:
    from collections.abc import AsyncGenerator

    from pgqueuer.core.tm import TaskManager

    from pgskewer.queuer import ImprovedQueuer

logger = logging.getLogger("pgskewer")

#: Delays in seconds before a new generation when the previous one could not reach
#: the database; the last one repeats.
RECONNECT_DELAYS = (0.2, 0.5, 1.0, 2.0, 5.0)
#: A generation that ran this many seconds resets the backoff to its first delay.
STABLE_AFTER = 30.0
#: Picked jobs of this worker that no generation runs are released after this many
#: seconds, which leaves pgqueuer's status buffer time to record finished jobs first.
ORPHAN_GRACE = 2.0
#: Wake-ups pgqueuer keeps pending at most; a worker's batch size must stay below it.
MAX_PENDING_WAKEUPS = 1024
#: Seconds between two checks of a generation's LISTEN connection.
LISTENER_CHECK_INTERVAL = 0.5
#: Seconds between two searches for running steps whose job is gone.
ORPHAN_SWEEP_INTERVAL = 5.0
#: A running step whose job is gone counts as orphaned once it was not updated for this
#: many seconds.
ORPHAN_MIN_AGE = 10.0
#: Seconds between two periodic prunes of a worker started with ``prune_after``.
PRUNE_INTERVAL = 3600.0
#: Minimum pool size of a worker: pgqueuer's LISTEN, pgskewer's events LISTEN,
#: and one for statements.
MIN_POOL_SIZE = 3


class _ResilientQueueManager(QueueManager):
    """A ``QueueManager`` that stops claiming, instead of raising, when its connection fails.

    ``lost`` is the error. Jobs already running are unaffected: ``run`` returns once
    they finish, as after ``shutdown.set()``.
    """

    lost: BaseException | None = None

    def _stop_claiming(self, exc: BaseException) -> None:
        if self.lost is None:
            self.lost = exc
            logger.warning(
                "worker %s: queue manager lost its database connection: %s",
                self.queue_manager_id,
                connection_lost_reason(exc),
            )
        self.shutdown.set()

    async def fetch_jobs(
        self,
        batch_size: int,
        global_concurrency_limit: int | None,
        heartbeat_timeout: timedelta,
    ) -> AsyncGenerator[Job, None]:
        try:
            async for job in super().fetch_jobs(
                batch_size, global_concurrency_limit, heartbeat_timeout
            ):
                yield job
        except Exception as exc:
            if not is_connection_lost(exc):
                raise
            self._stop_claiming(exc)

    async def _effective_dequeue_timeout(self, dequeue_timeout: timedelta) -> timedelta:
        try:
            return await super()._effective_dequeue_timeout(dequeue_timeout)
        except Exception as exc:
            if not is_connection_lost(exc):
                raise
            self._stop_claiming(exc)
            return self.min_dequeue_poll_interval

    async def _maybe_drain_shutdown(
        self, mode: QueueExecutionMode, task_manager: TaskManager
    ) -> None:
        try:
            await super()._maybe_drain_shutdown(mode, task_manager)
        except Exception as exc:
            if not is_connection_lost(exc):
                raise
            self._stop_claiming(exc)


class _BoundedWakeups(listeners.PGNoticeEventListener):
    """pgqueuer's queue of table-change wake-ups, bounded at :data:`MAX_PENDING_WAKEUPS`.

    pgqueuer 1.6 puts every table-change NOTIFY of its channel into this queue and takes
    at most one out per dispatched job or idle wait, so under load it grows by thousands
    of events a minute. The events only wake the dequeue loop, which waits only while the
    queue is empty. A wake-up dropped while the queue is full is therefore never missed:
    at least ``MAX_PENDING_WAKEUPS - batch_size`` others remain, and each leads to one
    more dequeue. Unlike merging events in time windows, this adds no latency.
    """

    def put_nowait(self, item: Any) -> None:
        if self.qsize() < MAX_PENDING_WAKEUPS:
            super().put_nowait(item)


def _bound_pgqueuer_wakeups() -> None:
    # pgqueuer's queue manager builds this queue through the module attribute when it
    # starts, so the bound applies to every queue manager of this process.
    listeners.PGNoticeEventListener = _BoundedWakeups  # type: ignore[misc]


class _Supervisor:
    """The generations of one running worker and the jobs they run."""

    def __init__(self, queuer: ImprovedQueuer) -> None:
        self.queuer = queuer
        self.job_context: dict[JobId, Context] = {}
        self.generations: list[tuple[_ResilientQueueManager, asyncio.Task[None]]] = []
        self.stopped = asyncio.Event()
        self._helpers: set[asyncio.Task[None]] = set()

    def spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coroutine)
        self._helpers.add(task)
        task.add_done_callback(self._helpers.discard)

    def running_jobs(self) -> list[JobId]:
        return list(self.job_context)

    def cancel_running(self) -> int:
        contexts = list(self.job_context.values())
        for context in contexts:
            context.cancellation.cancel()
        return len(contexts)

    def stop_claiming(self) -> None:
        for qm, _task in self.generations:
            qm.shutdown.set()

    def prune_finished(self) -> None:
        for qm, task in list(self.generations):
            if task.done():
                self.generations.remove((qm, task))
                _log_generation_end(task)

    async def wait_all(self) -> None:
        tasks = [task for _qm, task in self.generations]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self.prune_finished()


_supervisors: weakref.WeakKeyDictionary[Any, _Supervisor] = weakref.WeakKeyDictionary()


async def run_worker(
    queuer: ImprovedQueuer,
    *,
    concurrency: int = 10,
    dequeue_timeout: float = 2.0,
    heartbeat_timeout: float = 600.0,
    mode: QueueExecutionMode = QueueExecutionMode.continuous,
    prune_after: timedelta | None = None,
) -> None:
    """Run ``queuer``'s worker until ``queuer.shutdown`` is set (see ``ImprovedQueuer.run``).

    The worker reconnects by itself when PostgreSQL restarts or its connections are
    terminated: it claims no job while the database is unreachable, and its running steps
    store their outcomes once it is back. With ``prune_after`` the worker deletes runs
    that finished longer ago than that every hour (see :func:`pgskewer.prune.prune`).

    Cancelling the task that runs this coroutine cancels the running steps at once, which
    go back to the queue for another worker, and waits for them to end. Use :func:`drain`
    to give running steps time to finish first.
    """
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    if concurrency // 2 >= MAX_PENDING_WAKEUPS:
        raise ValueError(
            f"concurrency must be below {2 * MAX_PENDING_WAKEUPS}, got {concurrency}; "
            "run more worker processes instead"
        )
    if heartbeat_timeout <= 0:
        raise ValueError(f"heartbeat_timeout must be > 0 seconds, got {heartbeat_timeout}")

    pool = await queuer._ready()
    _check_pool_size(pool)
    await _check_installed(queuer, pool)
    await queuer._events()

    presence = WorkerPresence(
        queuer.settings,
        queuer.worker_id,
        queuer._dedicated_connection,
        pool,
        queuer.registry.names,
        "pgqueuer",
        queuer.pgq.channel,
        heartbeat_timeout=heartbeat_timeout,
    )
    supervisor = _Supervisor(queuer)
    _supervisors[queuer] = supervisor
    # A previous stop of this queuer's worker may have left it set.
    queuer.releasing = False
    queuer._presence = presence
    await presence.start()
    logger.info(
        "worker %s started: %d entrypoints, concurrency %d",
        queuer.worker_id,
        len(queuer.registry.names()),
        concurrency,
    )
    if not queuer.registry.names():
        logger.warning(
            "worker %s serves no entrypoints: register tasks with @pgq.entrypoint before "
            "the worker starts, or later from the same process",
            queuer.worker_id,
        )

    settings = _RunSettings(concurrency, dequeue_timeout, heartbeat_timeout, mode)
    try:
        async with anyio.create_task_group() as group:
            if prune_after is not None:
                group.start_soon(_prune_periodically, queuer, prune_after)
            if queuer._schedules:
                group.start_soon(_run_scheduler, queuer)
            group.start_soon(_sweep_orphans_periodically, queuer)
            await _supervise(supervisor, settings)
            group.cancel_scope.cancel()
    except asyncio.CancelledError:
        with anyio.CancelScope(shield=True):
            # The steps go back to the queue for another worker rather than end canceled.
            queuer.releasing = True
            canceled = supervisor.cancel_running()
            logger.info(
                "worker %s canceled: releasing %d running steps", queuer.worker_id, canceled
            )
            supervisor.stop_claiming()
            await supervisor.wait_all()
        raise
    finally:
        with anyio.CancelScope(shield=True):
            supervisor.stopped.set()
            await queuer.log_writer.flush()
            await presence.stop()
            queuer._presence = None
            _supervisors.pop(queuer, None)
        logger.info("worker %s stopped", queuer.worker_id)


async def drain(queuer: ImprovedQueuer, grace: float) -> None:
    """Stop a running worker gracefully; return once its running steps ended or left.

    The worker stops claiming jobs at once. Its running steps get ``grace`` seconds to
    finish. After that they are cancelled with ``queuer.releasing`` set, so each goes
    back to the queue for another worker instead of ending the run. The attempt stays
    counted. A ``cancelable=False`` step cannot be cancelled: ``drain`` waits for
    it. Call it from the loop that runs the worker; the worker's ``run`` then returns.
    A queuer whose worker does not run only gets ``shutdown`` set.
    """
    if grace < 0:
        raise ValueError(f"grace must be >= 0 seconds, got {grace}")
    queuer.shutdown.set()
    supervisor = _supervisors.get(queuer)
    if supervisor is None:
        return

    with anyio.move_on_after(grace):
        await supervisor.stopped.wait()
    if not supervisor.stopped.is_set() and supervisor.running_jobs():
        queuer.releasing = True
        canceled = supervisor.cancel_running()
        logger.info(
            "worker %s: %d steps still running after the %.1fs grace period; "
            "releasing them to other workers",
            queuer.worker_id,
            canceled,
            grace,
        )
    await supervisor.stopped.wait()


class _RunSettings:
    def __init__(
        self,
        concurrency: int,
        dequeue_timeout: float,
        heartbeat_timeout: float,
        mode: QueueExecutionMode,
    ) -> None:
        self.batch_size = max(1, concurrency // 2)
        self.max_concurrent_tasks = max(concurrency, 2 * self.batch_size)
        self.dequeue_timeout = timedelta(seconds=dequeue_timeout)
        self.heartbeat_timeout = timedelta(seconds=heartbeat_timeout)
        self.mode = mode


async def _supervise(supervisor: _Supervisor, settings: _RunSettings) -> None:
    """Start generations until the worker is stopped; return once all of them ended."""
    queuer = supervisor.queuer
    loop = asyncio.get_running_loop()
    failures = 0
    started_any = False

    while not queuer.shutdown.is_set():
        qm = _new_generation(supervisor)
        started = loop.time()
        task = asyncio.create_task(_run_generation(qm, settings), name="pgskewer-queue-manager")
        supervisor.generations.append((qm, task))
        if started_any:
            supervisor.spawn(_release_orphans(supervisor))
        started_any = True

        await _first_of(queuer.shutdown.wait(), qm.shutdown.wait(), asyncio.shield(task))
        if settings.mode is QueueExecutionMode.drain and not queuer.shutdown.is_set():
            # In drain mode the generation stops claiming once the queue is empty. Its
            # result distinguishes an empty queue from a lost connection.
            await _first_of(queuer.shutdown.wait(), asyncio.shield(task))
        if queuer.shutdown.is_set():
            break
        if task.done():
            exc = None if task.cancelled() else task.exception()
            if exc is not None and not is_connection_lost(exc):
                supervisor.stop_claiming()
                await supervisor.wait_all()
                raise exc
            if exc is None and qm.lost is None and settings.mode is QueueExecutionMode.drain:
                break
        supervisor.prune_finished()

        failures = 0 if loop.time() - started > STABLE_AFTER else failures + 1
        delay = RECONNECT_DELAYS[min(failures, len(RECONNECT_DELAYS)) - 1] if failures else 0.0
        logger.warning(
            "worker %s: starting a new queue manager in %.1fs (%d running steps continue)",
            queuer.worker_id,
            delay,
            len(supervisor.job_context),
        )
        with anyio.move_on_after(delay):
            await queuer.shutdown.wait()

    supervisor.stop_claiming()
    await supervisor.wait_all()


def _new_generation(supervisor: _Supervisor) -> _ResilientQueueManager:
    """Build a fresh pgqueuer on the queuer's pool and make it the queuer's current one."""
    queuer = supervisor.queuer
    _bound_pgqueuer_wakeups()
    pgq = PgQueuer(AsyncpgPoolDriver(queuer.pool), channel=queuer.pgq.channel)
    assert pgq.queries is not None
    qm = _ResilientQueueManager(pgq.queries, pgq.channel, resources=pgq.resources)
    qm.queue_manager_id = QueueManagerId(queuer.worker_id)
    qm.job_context = supervisor.job_context
    # A private stop event: pgqueuer sets it when the generation fails, and the worker's
    # own ``queuer.shutdown`` stays the caller's.
    qm.shutdown = asyncio.Event()
    pgq.qm = qm
    pgq.sm.shutdown = qm.shutdown
    pgq.shutdown = qm.shutdown
    queuer._pgq = pgq
    for name in queuer.registry.names():
        queuer._register_executor(name)
    return qm


async def _run_generation(qm: _ResilientQueueManager, settings: _RunSettings) -> None:
    watcher = asyncio.create_task(_watch_listener(qm), name="pgskewer-listener-watch")
    try:
        await _run_queue_manager(qm, settings)
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher


async def _watch_listener(qm: _ResilientQueueManager) -> None:
    """End the generation soon after its LISTEN connection closes.

    pgqueuer's own probe notices it only after 10 to 20 seconds. The closed connection
    is given back to the pool here, because pgqueuer's driver would fail to reset it and
    keep it checked out.
    """
    driver = qm.queries.driver
    if not isinstance(driver, AsyncpgPoolDriver):
        return
    while not qm.shutdown.is_set():
        await asyncio.sleep(LISTENER_CHECK_INTERVAL)
        # NOTE: reads pgqueuer 1.6's private attributes; a later pgqueuer may rename them.
        connection = driver._listener_connection
        if connection is None or not _is_closed(connection):
            continue
        driver._listener_connection = None
        with contextlib.suppress(Exception):
            await driver._pool.release(connection)
        qm._stop_claiming(ConnectionError("the LISTEN connection of pgqueuer was closed"))


def _is_closed(connection: Any) -> bool:
    try:
        return bool(connection.is_closed())
    except asyncpg.InterfaceError:
        return True  # asyncpg already detached the dead connection from its proxy


async def _run_queue_manager(qm: _ResilientQueueManager, settings: _RunSettings) -> None:
    await qm.run(
        dequeue_timeout=settings.dequeue_timeout,
        batch_size=settings.batch_size,
        max_concurrent_tasks=settings.max_concurrent_tasks,
        heartbeat_timeout=settings.heartbeat_timeout,
        mode=settings.mode,
        # The health probe makes a dead LISTEN connection end the generation instead of
        # leaving it deaf to new jobs and cancellations.
        shutdown_on_listener_failure=True,
    )


async def _release_orphans(supervisor: _Supervisor) -> None:
    """Release jobs this worker picked in an earlier generation that nothing runs now.

    Such a job is left ``picked`` when its generation failed before it recorded the job's
    end (pgqueuer buffers that write). Another claim of it finds its step finished and
    does not run it again, or runs it again if it never started.
    """
    await asyncio.sleep(ORPHAN_GRACE)
    queuer = supervisor.queuer
    try:
        async with queuer.pool.acquire() as connection:
            released = await connection.fetch(
                "UPDATE pgqueuer SET heartbeat = now() - interval '1 day' "
                "WHERE queue_manager_id = $1 AND status = 'picked' "
                "AND NOT (id = ANY($2::bigint[])) RETURNING id",
                queuer.worker_id,
                supervisor.running_jobs(),
            )
    except Exception as exc:
        logger.warning(
            "worker %s: releasing jobs of an earlier queue manager failed: %s",
            queuer.worker_id,
            connection_lost_reason(exc),
        )
        return
    if released:
        logger.warning(
            "worker %s released %d jobs that an earlier queue manager left picked: %s",
            queuer.worker_id,
            len(released),
            [row["id"] for row in released],
        )


async def _run_scheduler(queuer: ImprovedQueuer) -> None:
    """Run pgqueuer's cron scheduler, starting it again after a lost connection."""
    failures = 0
    while not queuer.shutdown.is_set():
        pgq = PgQueuer(AsyncpgPoolDriver(queuer.pool), channel=queuer.pgq.channel)
        pgq.shutdown = pgq.sm.shutdown = queuer.shutdown
        for name, cron, data in queuer._schedules:
            _register_schedule(queuer, pgq, name, cron, data)
        try:
            await pgq.sm.run()
        except Exception as exc:
            if not is_connection_lost(exc):
                raise
            delay = RECONNECT_DELAYS[min(failures, len(RECONNECT_DELAYS) - 1)]
            failures += 1
            logger.warning(
                "worker %s: scheduler lost its database connection (%s); retrying in %.1fs",
                queuer.worker_id,
                connection_lost_reason(exc),
                delay,
            )
            with anyio.move_on_after(delay):
                await queuer.shutdown.wait()


def _register_schedule(
    queuer: ImprovedQueuer, pgq: PgQueuer, name: str, cron: str, data: bytes | None
) -> None:
    async def fire(_schedule: Any) -> None:
        run_id = await queuer.enqueue(name, data)
        logger.info("schedule %r fired: run %d of %s", cron, run_id, name)

    pgq.schedule(f"pgskewer.schedule.{name}", cron)(fire)


async def _prune_periodically(queuer: ImprovedQueuer, older_than: timedelta) -> None:
    while True:
        try:
            async with queuer.pool.acquire() as connection:
                counts = await prune(connection, queuer.settings, older_than)
            if any(counts.values()):
                logger.info("worker %s pruned %s", queuer.worker_id, counts)
        except Exception as exc:
            logger.warning("worker %s: pruning failed: %s", queuer.worker_id, exc)
        await asyncio.sleep(PRUNE_INTERVAL)


async def _sweep_orphans_periodically(queuer: ImprovedQueuer) -> None:
    while True:
        await asyncio.sleep(ORPHAN_SWEEP_INTERVAL)
        try:
            await settle_orphaned_steps(queuer)
        except Exception as exc:
            logger.warning(
                "worker %s: searching for orphaned steps failed: %s",
                queuer.worker_id,
                connection_lost_reason(exc),
            )


async def settle_orphaned_steps(queuer: ImprovedQueuer) -> int:
    """Fail the running steps whose pgqueuer job ended without storing their outcome.

    That happens when the worker lost its database connection for longer than it keeps
    retrying, or its handler failed in an unexpected way. Each such step fails with a
    ``WorkerLostError`` and is retried per its ``retries`` option, as seen by this
    worker's registry (no retry for a task this worker does not know). Returns how many
    steps it settled.
    """
    steps = queuer.settings.table("steps")
    async with queuer.pool.acquire() as connection:
        rows = await connection.fetch(
            f"SELECT s.run_id, s.path FROM {steps} AS s WHERE s.status = 'running' "
            "AND s.updated < now() - make_interval(secs => $1) "
            "AND NOT EXISTS (SELECT 1 FROM pgqueuer AS q WHERE q.id = s.job_id)",
            ORPHAN_MIN_AGE,
        )
        settled = 0
        for row in rows:
            settled += await _settle_orphan(queuer, connection, row["run_id"], row["path"])
    return settled


async def _settle_orphan(queuer: ImprovedQueuer, connection: Any, run_id: int, path: str) -> int:
    settings = queuer.settings
    async with connection.transaction():
        # The run row lock first, as in every other writer, and then a fresh look.
        graph = await connection.fetchval(
            f"SELECT graph FROM {settings.table('runs')} WHERE id = $1 FOR UPDATE", run_id
        )
        step = await connection.fetchrow(
            f"SELECT s.task, s.attempts, s.worker_id FROM {settings.table('steps')} AS s "
            "WHERE s.run_id = $1 AND s.path = $2 AND s.status = 'running' "
            "AND NOT EXISTS (SELECT 1 FROM pgqueuer AS q WHERE q.id = s.job_id)",
            run_id,
            path,
        )
        if graph is None or step is None:
            return 0
        options = _step_options(queuer, json.loads(graph), path, step["task"])
        message = (
            f"worker {step['worker_id']} lost its database connection before it stored the "
            f"outcome of attempt {step['attempts']}"
        )
        error: ErrorInfo = {"type": "WorkerLostError", "message": message, "traceback": ""}
        if step["attempts"] <= options.retries:
            delay = options.retry_backoff * 2 ** (step["attempts"] - 1)
            if await advance.schedule_retry(
                connection, settings, run_id, path, step["task"], delay, error
            ):
                logger.warning(
                    "run %d step %s: %s; retrying in %.1fs", run_id, path, message, delay
                )
                return 1
        outcome = advance.Outcome(Status.EXCEPTION, error=error, crashable=options.crashable)
        await advance.finish_step(connection, settings, run_id, path, outcome)
    logger.warning("run %d step %s: %s; the step failed", run_id, path, message)
    return 1


def _step_options(queuer: ImprovedQueuer, graph: Any, path: str, task: str) -> TaskOptions:
    spec = queuer.registry.task(task)
    if spec is None:
        return TaskOptions()
    try:
        node = find_node(graph, path)
    except KeyError:
        return spec.options
    return spec.options.merged(node.get("options"))


def _check_pool_size(pool: Any) -> None:
    size = pool.get_max_size()
    if size < MIN_POOL_SIZE:
        raise ValueError(
            f"the connection pool allows {size} connections; a worker needs at least "
            f"{MIN_POOL_SIZE} (two LISTEN connections and one for statements): "
            "raise pool_size"
        )


async def _check_installed(queuer: ImprovedQueuer, pool: Any) -> None:
    async with pool.acquire() as connection:
        if not await schema.is_installed(connection, queuer.settings):
            raise RuntimeError(
                "pgskewer's schema is not installed in this database; run "
                "'pgskewer install' or 'await queuer.install()' first"
            )


async def _first_of(*awaitables: Awaitable[Any]) -> None:
    tasks = [asyncio.ensure_future(awaitable) for awaitable in awaitables]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _log_generation_end(task: asyncio.Task[None]) -> None:
    if task.cancelled():
        return
    exc = task.exception()
    if exc is not None and is_connection_lost(exc):
        logger.info("a queue manager ended after losing its connection: %s", exc)
    elif exc is not None:
        logger.error("a queue manager failed", exc_info=exc)
