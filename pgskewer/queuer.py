"""``ImprovedQueuer``: pgqueuer with stored results, durable pipelines, cancellation and logs."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from datetime import datetime, timedelta
from typing import Any, TypeVar

import anyio
import asyncpg
from pgqueuer import AsyncpgDriver, AsyncpgPoolDriver, PgQueuer
from pgqueuer.executors import EntrypointExecutorParameters
from pgqueuer.types import QueueExecutionMode

from pgskewer import advance, encoding, schema, store
from pgskewer.dsn import describe_dsn, discover_dsn, normalize_dsn
from pgskewer.events import EventHub, read_through_outage
from pgskewer.executor import StepExecutor, new_worker_id
from pgskewer.graph import Pipeline, resolve_graph
from pgskewer.logs import LogWriter, read_lines, tail_start
from pgskewer.model import LogLine, RunState, Status, TaskResult
from pgskewer.registry import (
    Registry,
    TaskFunction,
    TaskOptions,
    check_entrypoint_name,
)
from pgskewer.schema import DEFAULT_SETTINGS, Settings
from pgskewer.workers import WorkerPresence, list_workers, served_entrypoints

logger = logging.getLogger("pgskewer")

F = TypeVar("F", bound=TaskFunction)

#: Default pool size of a queuer that builds its own pool.
DEFAULT_POOL_SIZE = 10

#: The largest payload ``enqueue`` accepts, in bytes. A payload is stored twice (the
#: first job and the run's input), and every step of a pipeline reads it.
MAX_PAYLOAD_BYTES = 64 * 1024 * 1024


class RunNotFoundError(LookupError):
    """No run (and no pgqueuer job) has this id."""

    def __init__(self, run_id: int) -> None:
        self.run_id = run_id
        super().__init__(
            f"no run or job with id {run_id}; use the id that enqueue returned "
            "(pgskewer runs lists recent ones)"
        )


class ImprovedQueuer:
    """A pgqueuer ``PgQueuer`` with pgskewer's runs, results, pipelines and logs.

    ``driver`` is a pgqueuer ``AsyncpgDriver``/``AsyncpgPoolDriver``, an asyncpg
    ``Connection`` or ``Pool``, or ``None`` to bind later (``await queuer.bind(dsn)``, or
    the ``pgskewer worker`` command). pgskewer's own atomic writes always run on pooled
    connections it acquires itself, never interleaved with pgqueuer's statements on a
    shared single connection: with a single-connection driver pgskewer opens a small pool
    of its own to the same server.
    """

    def __init__(self, driver: Any = None, *, settings: Settings = DEFAULT_SETTINGS) -> None:
        self.settings = settings
        self.registry = Registry()
        self.worker_id = new_worker_id()
        #: Set by a stopping worker: steps it cancels go back to the queue instead of ending.
        self.releasing = False
        self.shutdown = asyncio.Event()
        self._pgq: PgQueuer | None = None
        self._pool: Any = None
        self._owned_pool = False
        self._driver: Any = None
        self._hub: EventHub | None = None
        self._log_writer: LogWriter | None = None
        self._server: Any = None
        self._schedules: list[tuple[str, str, bytes | None]] = []
        self._presence: WorkerPresence | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending_pool_from: Any = None
        self.registry.on_change(self._on_registry_change)
        advance.add_local_names(self.registry.names)
        if driver is not None:
            self._attach_driver(driver)

    # -- binding --------------------------------------------------------------------

    def _attach_driver(self, driver: Any) -> None:
        if isinstance(driver, AsyncpgPoolDriver):
            self._driver = driver
            self._pool = driver._pool
        elif isinstance(driver, AsyncpgDriver):
            self._driver = driver
            self._pending_pool_from = driver._connection
        elif isinstance(driver, asyncpg.Pool):
            self._driver = AsyncpgPoolDriver(driver)
            self._pool = driver
        elif isinstance(driver, asyncpg.Connection):
            self._driver = AsyncpgDriver(driver)
            self._pending_pool_from = driver
        else:
            raise TypeError(
                f"unsupported driver {type(driver).__name__}: pass an asyncpg Connection or "
                "Pool, or pgqueuer's AsyncpgDriver/AsyncpgPoolDriver"
            )
        self._pgq = PgQueuer(self._driver)
        self.shutdown = self._pgq.shutdown
        for name in self.registry.names():
            self._register_executor(name)

    async def bind(
        self,
        dsn: str | None = None,
        *,
        embedded: bool | None = None,
        pool_size: int = DEFAULT_POOL_SIZE,
    ) -> None:
        """Connect an unbound queuer to a database (see :func:`connect` for ``dsn``)."""
        if self._pgq is not None:
            return
        dsn, self._server = resolve_dsn(dsn, embedded)
        pool = await create_pool(dsn, pool_size)
        self._owned_pool = True
        self._attach_driver(pool)

    async def _ready(self) -> Any:
        """Return the pool once the queuer is bound, creating pgskewer's pool if needed."""
        if self._pgq is None:
            raise RuntimeError(
                "this queuer is not connected to a database yet; use "
                "'await pgskewer.connect(dsn)' or 'await queuer.bind(dsn)' first"
            )
        if self._pool is None and self._pending_pool_from is not None:
            self._pool = await _pool_like(self._pending_pool_from)
            self._owned_pool = True
        self._loop = asyncio.get_running_loop()
        return self._pool

    @property
    def is_bound(self) -> bool:
        """Whether this queuer has a database connection (a driver, pool or DSN)."""
        return self._pgq is not None

    @property
    def pgq(self) -> PgQueuer:
        """The underlying pgqueuer ``PgQueuer``."""
        if self._pgq is None:
            raise RuntimeError("this queuer is not connected to a database yet")
        return self._pgq

    @property
    def qm(self) -> Any:
        """pgqueuer's ``QueueManager``; ``qm.queries.enqueue`` works as in pgqueuer."""
        return self.pgq.qm

    @property
    def pool(self) -> Any:
        """The asyncpg pool pgskewer uses for its own statements."""
        if self._pool is None:
            raise RuntimeError("this queuer has no pool yet; call an async method first")
        return self._pool

    @property
    def log_writer(self) -> LogWriter:
        if self._log_writer is None:
            self._log_writer = LogWriter(self.pool, self.settings)
        return self._log_writer

    async def install(self) -> bool:
        """Create or upgrade pgqueuer's and pgskewer's schema; return whether anything changed."""
        pool = await self._ready()
        async with pool.acquire() as connection:
            return await schema.install(connection, self.settings)

    async def close(self) -> None:
        """Stop listening, flush logs, and close what this queuer opened; idempotent."""
        if self._hub is not None:
            await self._hub.close()
            self._hub = None
        if self._log_writer is not None:
            await self._log_writer.flush()
        if self._pool is not None and self._owned_pool:
            await self._pool.close()
            self._pool = None
        if self._server is not None:
            self._server.stop()
            self._server = None

    async def __aenter__(self) -> ImprovedQueuer:
        await self._ready()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    # -- registration ---------------------------------------------------------------

    def entrypoint(
        self,
        name: str,
        *,
        cancelable: bool = True,
        store_results: bool = True,
        crashable: bool = False,
        concurrency_limit: int = 0,
        retries: int = 0,
        retry_backoff: float = 1.0,
        timeout: float | None = None,
        capture_output: bool = False,
        accepts_context: bool | None = None,
    ) -> Callable[[F], F]:
        """Register ``async def task(job)`` (or ``(job, ctx)``) as entrypoint ``name``.

        Registering a name again replaces the function, also in a running worker. See
        :class:`~pgskewer.registry.TaskOptions` for the options.
        """
        options = TaskOptions(
            cancelable=cancelable,
            store_results=store_results,
            crashable=crashable,
            concurrency_limit=concurrency_limit,
            retries=retries,
            retry_backoff=retry_backoff,
            timeout=timeout,
            capture_output=capture_output,
        )

        def register(function: F) -> F:
            self.registry.add_task(name, function, options, accepts_context)
            return function

        return register

    def pipeline(self, *steps: Any) -> Pipeline:
        """Define an unnamed pipeline, to nest in others or pass to ``entrypoint_pipeline``.

        Among several arguments a list is a parallel group; a single list argument is the
        list of steps: ``pgq.pipeline(["a", ["b1", "b2"], "c"])``.
        """
        return self.registry.define_pipeline(None, steps)

    def entrypoint_pipeline(self, name: str, *steps: Any) -> Pipeline:
        """Register the pipeline ``name``; enqueue it like any entrypoint."""
        definition = self.registry.define_pipeline(name, steps)
        resolve_graph(name, "pipeline", definition, self._lookup_with(name, definition))
        return self.registry.add_pipeline(name, definition)

    def _lookup_with(self, name: str, definition: Pipeline) -> Callable[[str], Pipeline | None]:
        def lookup(candidate: str) -> Pipeline | None:
            return definition if candidate == name else self.registry.pipeline(candidate)

        return lookup

    def schedule_pipeline(self, name: str, cron: str, payload: Any = None) -> None:
        """Enqueue ``name`` on a cron schedule, through pgqueuer's scheduler.

        The schedule runs in every worker of this queuer; pgqueuer makes sure each tick
        fires once across workers.
        """
        data = _encode_payload(payload)
        self._schedules.append((name, cron, data))
        if self._pgq is not None:
            self._register_schedule(name, cron, data)

    def _register_schedule(self, name: str, cron: str, data: bytes | None) -> None:
        async def fire(_schedule: Any) -> None:
            run_id = await self.enqueue(name, data)
            logger.info("schedule %r fired: run %d of %s", cron, run_id, name)

        self.pgq.schedule(f"pgskewer.schedule.{name}", cron)(fire)

    def _on_registry_change(self, name: str) -> None:
        if self._pgq is None:
            return
        loop = self._loop
        if loop is not None and loop.is_running():
            try:
                running = asyncio.get_running_loop()
            except RuntimeError:
                running = None
            if running is not loop:
                loop.call_soon_threadsafe(self._register_executor, name)
                return
        self._register_executor(name)

    def _register_executor(self, name: str) -> None:
        spec = self.registry.task(name)
        limit = spec.options.concurrency_limit if spec is not None else 0
        registry = self.pgq.qm.entrypoint_registry
        existing = registry.get(name)  # type: ignore[call-overload]
        if isinstance(existing, StepExecutor):
            existing.parameters.concurrency_limit = limit
            return
        parameters = EntrypointExecutorParameters(
            concurrency_limit=limit, func=_never_called, accepts_context=True
        )
        registry[name] = StepExecutor(parameters=parameters, name=name, queuer=self)  # type: ignore[index]

    # -- runs -----------------------------------------------------------------------

    async def enqueue(
        self,
        name: str,
        payload: Any = None,
        *,
        priority: int = 0,
        execute_after: timedelta | float | datetime | None = None,
        dedupe_key: str | None = None,
    ) -> int:
        """Start a run of the task or pipeline ``name``; return its id.

        ``payload`` is encoded with :mod:`pgskewer.encoding`; ``bytes`` are passed as-is.
        ``dedupe_key`` rejects the enqueue while another run with the same key is in
        flight, for the whole run (not only while its first job is queued).
        """
        pool = await self._ready()
        check_entrypoint_name(name)
        data = _encode_payload(payload)
        if data is not None and len(data) > MAX_PAYLOAD_BYTES:
            raise ValueError(
                f"the payload of {name!r} is {len(data)} bytes, above the limit of "
                f"{MAX_PAYLOAD_BYTES}; store large data elsewhere (a table, a file) and "
                "pass a reference to it"
            )
        delay = _delay(execute_after)
        pipeline = self.registry.pipeline(name)
        kind = "pipeline" if pipeline is not None else "task"
        graph = resolve_graph(name, kind, pipeline, self.registry.pipeline)
        async with pool.acquire() as connection:
            if pipeline is None and self.registry.task(name) is None:
                await self._warn_if_unserved(connection, name)
            return await advance.start_run(
                connection,
                self.settings,
                name=name,
                kind=kind,
                graph=graph,
                payload=data,
                priority=priority,
                execute_after=delay,
                dedupe_key=dedupe_key,
            )

    async def _warn_if_unserved(self, connection: Any, name: str) -> None:
        served = await served_entrypoints(connection, self.settings)
        if served is not None and name not in served:
            logger.warning(
                "no live worker serves %r; the run stays queued until one does (registered: %s)",
                name,
                ", ".join(sorted(served)) or "none",
            )

    async def result(
        self, run_id: int | list[int], timeout: float | None = None
    ) -> TaskResult | None:
        """Wait for a run's ``TaskResult``; return ``None`` if ``timeout`` seconds pass first.

        Failures are returned (``ok=False``), not raised. Raises :class:`RunNotFoundError`
        for an id that was never enqueued. While waiting it issues no queries: it wakes on
        the run's NOTIFY events and reads the result once it is written. ``run_id`` may
        also be the pgqueuer job id of one of the run's steps.
        """
        run_id = await self._run_id_of(_single_id(run_id))
        pool = await self._ready()
        hub = await self._events()

        async def read() -> TaskResult | None:
            async with pool.acquire() as connection:
                return await self._result_now(connection, run_id)

        with hub.subscribe(run_id) as subscription:
            found = await read_through_outage(read)
            if found is not None:
                return found
            with anyio.move_on_after(timeout):
                while True:
                    await subscription.wait()
                    if not _may_be_finished(subscription):
                        continue
                    found = await read_through_outage(read)
                    if found is not None:
                        return found
        return None

    async def _run_id_of(self, job_id: int) -> int:
        """Return the run of a run id or of a step's job id (an unknown id is returned as is)."""
        pool = await self._ready()
        async with pool.acquire() as connection:
            if await store.run_exists(connection, self.settings, job_id):
                return job_id
            found = await store.step_of_job(connection, self.settings, job_id)
        return job_id if found is None else found[0]

    async def _result_now(self, connection: Any, run_id: int) -> TaskResult | None:
        found = await store.fetch_result(connection, self.settings, run_id)
        if found is not None or await store.run_exists(connection, self.settings, run_id):
            return found
        state = await store.job_state(connection, run_id)
        if state is None:
            raise RunNotFoundError(run_id)
        if state in ("canceled", "deleted"):
            message = (
                "the job was canceled"
                if state == "canceled"
                else "the job was deleted from the queue"
            )
            return {
                "status": "canceled",
                "ok": False,
                "result": None,
                "error": {"type": "CancelledError", "message": message, "traceback": ""},
            }
        return None

    async def run_status(self, run_id: int | list[int]) -> RunState:
        """Return the run with every step's status, attempts, timings and error.

        ``run_id`` may also be the pgqueuer job id of one of its steps.
        """
        run_id = _single_id(run_id)
        pool = await self._ready()
        async with pool.acquire() as connection:
            state = await store.fetch_run_state(connection, self.settings, run_id)
            if state is None:
                # The id may be the job of one step: show that step's run.
                found = await store.step_of_job(connection, self.settings, run_id)
                if found is not None:
                    state = await store.fetch_run_state(connection, self.settings, found[0])
        if state is None:
            raise RunNotFoundError(run_id)
        return state

    async def runs(
        self, limit: int = 50, status: str | None = None, name: str | None = None
    ) -> list[RunState]:
        """Return recent runs, newest first."""
        if status is not None:
            Status(status)  # raises ValueError naming the status when it is not one
        pool = await self._ready()
        async with pool.acquire() as connection:
            return await store.fetch_runs(
                connection, self.settings, limit=limit, status=status, name=name
            )

    async def cancel(self, run_id: int | list[int]) -> Status:
        """Cancel a run (or the run of a step's job id); return its status afterwards.

        Queued steps are removed at once and running cancelable steps are cancelled. The
        run ends ``canceled`` when every step is terminal, so a running
        ``cancelable=False`` step keeps it ``canceling`` until that step ends.
        """
        run_id = _single_id(run_id)
        pool = await self._ready()
        async with pool.acquire() as connection:
            status = await advance.request_cancel(connection, self.settings, run_id)
            if status is not None:
                return status
            found = await store.step_of_job(connection, self.settings, run_id)
            if found is not None:
                status = await advance.request_cancel(connection, self.settings, found[0])
                assert status is not None
                return status
            if await store.job_state(connection, run_id) is None:
                raise RunNotFoundError(run_id)
            await schema.pgqueuer_queries(connection).mark_job_as_cancelled([run_id])  # type: ignore[list-item]
            return Status.CANCELED

    async def retry(self, run_id: int | list[int]) -> None:
        """Run a failed or canceled run again under the same id.

        Only its failed, canceled and skipped steps run again, with the current task
        definitions; the stored results of successful steps are reused.
        """
        run_id = await self._run_id_of(_single_id(run_id))
        pool = await self._ready()
        async with pool.acquire() as connection:
            if not await advance.resume_run(connection, self.settings, run_id):
                raise RunNotFoundError(run_id)

    async def load_result(self, reference: dict[str, Any]) -> Any:
        """Load a result that a payload carried as ``result_ref`` because it was large."""
        pool = await self._ready()
        async with pool.acquire() as connection:
            found = await store.fetch_step_result(
                connection, self.settings, int(reference["run_id"]), str(reference["step"])
            )
        if found is None:
            raise LookupError(f"no stored result for {reference!r}")
        return found["result"]

    async def logs(
        self,
        run_id: int | list[int],
        step: str | None = None,
        follow: bool = False,
        tail: int | None = None,
    ) -> AsyncIterator[LogLine]:
        """Yield the stored output lines of a run (or of one step and its sub-steps).

        ``tail`` starts at the last ``tail`` stored lines instead of the first. With
        ``follow=True`` it keeps yielding new lines as they are stored and ends once the
        run has finished and every line was read.
        """
        run_id = _single_id(run_id)
        pool = await self._ready()
        last_id = 0
        if tail is not None:
            async with pool.acquire() as connection:
                last_id = await tail_start(connection, self.settings, run_id, step, tail)
        hub = await self._events() if follow else None

        async def read() -> tuple[bool, list[Any]]:
            async with pool.acquire() as connection:
                if last_id == 0 and not await store.run_exists(connection, self.settings, run_id):
                    raise RunNotFoundError(run_id)
                finished = (await store.fetch_result(connection, self.settings, run_id)) is not None
                rows = await read_lines(connection, self.settings, run_id, step, last_id)
            return finished, rows

        with hub.subscribe(run_id) if hub is not None else contextlib.nullcontext() as subscription:
            while True:
                finished, rows = await read_through_outage(read)
                for row in rows:
                    last_id = row["id"]
                    yield LogLine(
                        id=row["id"],
                        run_id=row["run_id"],
                        step=row["step"],
                        stream=row["stream"],
                        seq=row["seq"],
                        text=row["text"],
                        created_at=row["created"],
                    )
                if rows:
                    continue
                if subscription is None or finished:
                    return
                await subscription.wait()

    async def workers(self) -> list[dict[str, Any]]:
        """Return the registered workers: id, host, pid, entrypoints, started, last seen, alive."""
        pool = await self._ready()
        async with pool.acquire() as connection:
            return await list_workers(connection, self.settings)

    async def watch(self, run_id: int | list[int]) -> AsyncIterator[RunState]:
        """Yield the run's state now and after every change, ending once it is finished."""
        run_id = _single_id(run_id)
        hub = await self._events()
        with hub.subscribe(run_id) as subscription:
            while True:
                state = await read_through_outage(lambda: self.run_status(run_id))
                yield state
                if state.is_finished:
                    return
                await subscription.wait()

    async def _events(self) -> EventHub:
        pool = await self._ready()
        if self._hub is None:

            async def release(connection: Any) -> None:
                await pool.release(connection, timeout=5)

            self._hub = EventHub(self.settings.channel, pool.acquire, release)
            self._hub.add_callback(self._on_event)
        await self._hub.start()
        return self._hub

    def _on_event(self, event: dict[str, Any]) -> None:
        # The job-log trigger flags a run canceling when pgqueuer cancels one of its
        # steps. Every worker that receives the event winds the run down, which is
        # idempotent.
        if (
            event.get("step") == ""
            and event.get("status") == "canceling"
            and self._presence is not None
        ):
            asyncio.get_running_loop().create_task(self._settle_canceling(int(event["run"])))

    async def _settle_canceling(self, run_id: int) -> None:
        try:
            async with self.pool.acquire() as connection:
                await advance.settle_canceling(connection, self.settings, run_id)
        except Exception:
            logger.exception("winding down canceled run %d failed", run_id)

    # -- worker ---------------------------------------------------------------------

    async def run(
        self,
        *,
        concurrency: int = 10,
        dequeue_timeout: float = 2.0,
        heartbeat_timeout: float = 600.0,
        mode: QueueExecutionMode = QueueExecutionMode.continuous,
    ) -> None:
        """Run the worker until ``shutdown`` is set; see :func:`pgskewer.worker.run_worker`.

        Differences from pgqueuer's defaults: the worker claims at most ``concurrency``
        jobs at once (pgqueuer claims the whole backlog unless limited), so the batch size
        is ``concurrency // 2`` (at least 1, and at least 2 jobs may be claimed); an idle
        worker looks for due jobs every ``dequeue_timeout`` seconds (pgqueuer: 30) so
        retries and deferred jobs start promptly; and a dead worker's jobs are taken over
        as soon as its database session ends, so ``heartbeat_timeout`` (pgqueuer: 30 s) is
        only the last resort and defaults to 10 minutes. While a worker's session lives,
        the other workers keep its jobs' heartbeats fresh, so a worker whose loop is
        blocked for a while does not have its jobs run twice. Workers sharing a queue
        should use the same ``heartbeat_timeout``.
        """
        from pgskewer.worker import run_worker

        await run_worker(
            self,
            concurrency=concurrency,
            dequeue_timeout=dequeue_timeout,
            heartbeat_timeout=heartbeat_timeout,
            mode=mode,
        )

    async def _dedicated_connection(self) -> Any:
        # A connection outside the pool, for the worker's advisory lock that must live as
        # long as the worker.
        pool = self.pool
        args = getattr(pool, "_connect_args", None)
        kwargs = getattr(pool, "_connect_kwargs", None)
        if args is not None and kwargs is not None:
            return await asyncpg.connect(*args, **kwargs)
        async with pool.acquire() as connection:
            params = _connect_kwargs(connection)
        return await asyncpg.connect(**params)


async def _never_called(*_: Any) -> None:
    raise AssertionError("pgskewer's executor calls the registered function itself")


def resolve_dsn(dsn: str | None, embedded: bool | None) -> tuple[str, Any]:
    """Return the DSN to use and the embedded server started for it, if any.

    ``dsn`` wins; then ``PGSKEWER_DSN``, ``DATABASE_URL`` and libpq's ``PG*`` variables;
    then, unless ``embedded=False``, the embedded server. ``embedded=True`` always uses it.
    """
    if embedded is not True:
        found = normalize_dsn(dsn) if dsn else discover_dsn()
        if found is not None:
            logger.info("pgskewer uses the database %s", describe_dsn(found))
            return found, None
        if embedded is False:
            raise RuntimeError(
                "no database configured: pass a DSN, set PGSKEWER_DSN or DATABASE_URL, "
                "or use the embedded server"
            )
    from pgskewer.embedded import EmbeddedServer

    server = EmbeddedServer()
    found = server.start()
    logger.info("pgskewer uses the embedded server in %s", server.data_dir)
    return found, server


async def create_pool(dsn: str, size: int = DEFAULT_POOL_SIZE) -> Any:
    """Open an asyncpg pool, turning connection failures into one clear error."""
    try:
        return await asyncpg.create_pool(
            dsn, min_size=1, max_size=max(2, size), reset=_keep_session
        )
    except ValueError as exc:
        raise ValueError(
            f"invalid DSN {describe_dsn(dsn)}: {_redacted(str(exc), dsn)}; "
            "use postgresql://user:password@host:port/database"
        ) from None
    except (TimeoutError, OSError, asyncpg.PostgresError) as exc:
        if isinstance(exc, asyncpg.TooManyConnectionsError):
            fix = "the server has no free connection slots; close idle clients or raise "
            fix += "max_connections"
        else:
            fix = "check that the server runs and the DSN is right"
        raise ConnectionError(
            f"cannot connect to PostgreSQL at {describe_dsn(dsn)}: {type(exc).__name__}: "
            f"{_redacted(str(exc), dsn)}; {fix}"
        ) from None


def _redacted(message: str, dsn: str) -> str:
    from urllib.parse import urlsplit

    password = urlsplit(dsn).password
    return message.replace(password, "***") if password else message


async def connect(
    dsn: str | None = None, *, embedded: bool | None = None, pool_size: int = DEFAULT_POOL_SIZE
) -> ImprovedQueuer:
    """Return an ``ImprovedQueuer`` with its own pool.

    ``dsn`` defaults to ``PGSKEWER_DSN``, then ``DATABASE_URL``, then libpq's ``PG*``
    variables; with none set, the embedded server is started (``embedded=False`` raises
    instead, ``embedded=True`` always uses it).
    """
    queuer = ImprovedQueuer()
    await queuer.bind(dsn, embedded=embedded, pool_size=pool_size)
    return queuer


def _connect_kwargs(connection: Any) -> dict[str, Any]:
    # asyncpg keeps the resolved address and parameters of every connection.
    raw = connection._con if hasattr(connection, "_con") else connection
    address = raw._addr
    params = raw._params
    kwargs: dict[str, Any] = {
        "user": params.user,
        "password": params.password,
        "database": params.database,
    }
    if isinstance(address, str):
        kwargs["host"] = address.rsplit("/.s.PGSQL.", 1)[0]
        kwargs["port"] = int(address.rsplit(".", 1)[1]) if ".s.PGSQL." in address else None
    else:
        kwargs["host"], kwargs["port"] = address[0], address[1]
    # The negotiated SSL context is not reusable; asyncpg's default ("prefer") renegotiates.
    return {key: value for key, value in kwargs.items() if value is not None}


async def _keep_session(_connection: Any) -> None:
    # asyncpg resets session state (advisory locks, LISTEN, settings) on every release,
    # one round trip each time. pgskewer's statements leave no session state behind and
    # its listeners are removed before release, so its own pools skip that reset.
    return None


async def _pool_like(connection: Any) -> Any:
    return await asyncpg.create_pool(
        reset=_keep_session, min_size=1, max_size=DEFAULT_POOL_SIZE, **_connect_kwargs(connection)
    )


def _single_id(run_id: int | list[int]) -> int:
    if isinstance(run_id, list):
        if len(run_id) != 1:
            raise ValueError(f"expected one run id, got {len(run_id)}: {run_id!r}")
        run_id = run_id[0]
    if not isinstance(run_id, int) or isinstance(run_id, bool):
        raise TypeError(f"a run id is an int, got {type(run_id).__name__} {run_id!r}")
    return run_id


def _may_be_finished(subscription: Any) -> bool:
    # Only a terminal run event, or a reconnect that may have lost one, is worth a query.
    if subscription.resync:
        subscription.resync = False
        return True
    status = subscription.last_status.get("")
    return status is not None and Status(status).is_terminal


def _encode_payload(payload: Any) -> bytes | None:
    if payload is None or isinstance(payload, bytes):
        return payload
    if isinstance(payload, bytearray | memoryview):
        return bytes(payload)
    return encoding.encode(payload)


def _delay(execute_after: timedelta | float | datetime | None) -> timedelta | None:
    if execute_after is None or isinstance(execute_after, timedelta):
        return execute_after
    if isinstance(execute_after, datetime):
        if execute_after.tzinfo is None:
            raise ValueError("execute_after must be timezone-aware; use datetime.now(UTC) + ...")
        return max(timedelta(0), execute_after - datetime.now(execute_after.tzinfo))
    return timedelta(seconds=float(execute_after))
