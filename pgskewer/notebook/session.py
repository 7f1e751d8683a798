"""The notebook session: a queuer and its worker on a background thread, with a sync API.

A :class:`Session` owns one :class:`~pgskewer.notebook._loop.LoopThread`. The queuer, its
connection pool, its LISTEN connection and the worker are all created on that thread's
loop and never touched from another loop. Cells call the synchronous methods, which
submit coroutines to the loop and wait for them in short, interruptible slices.

One session is current per process. Creating a session closes the current one first, so
re-running a notebook's setup cell leaves exactly one worker. ``close()``, the context
manager and an ``atexit`` hook stop the worker and release the database.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import dataclasses
import itertools
import json
import logging
import threading
from collections.abc import AsyncIterator, Callable, Coroutine
from datetime import datetime
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar, overload

from pgskewer import _context
from pgskewer.model import LogLine, RunState, Status, TaskResult
from pgskewer.notebook._loop import LoopThread
from pgskewer.notebook.run import PipelineRun, RunsTable

if TYPE_CHECKING:
    from pgskewer.notebook._live import LivePump
    from pgskewer.notebook.widget import RunWidget
    from pgskewer.queuer import ImprovedQueuer

__all__ = ["Session", "current_session", "require_session"]

logger = logging.getLogger("pgskewer")

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")

#: Seconds that :meth:`Session.close` waits for running jobs before cancelling them.
DEFAULT_STOP_TIMEOUT = 10.0

#: Seconds that opening a session may take, including starting the embedded server.
DEFAULT_CONNECT_TIMEOUT = 120.0

_current: Session | None = None
_current_lock = threading.Lock()
_numbers = itertools.count(1)


def current_session() -> Session | None:
    """Return the open session of this process, or ``None``."""
    with _current_lock:
        session = _current
    return session if session is not None and not session.closed else None


def require_session() -> Session:
    """Return the open session of this process, raising ``RuntimeError`` when there is none."""
    session = current_session()
    if session is None:
        raise RuntimeError(
            "no open pgskewer session: create one with "
            "'session = pgskewer.notebook.Session()' first"
        )
    return session


@dataclasses.dataclass(frozen=True, slots=True)
class WorkerInfo:
    """A live worker as listed by :meth:`Session.workers`."""

    id: str
    host: str
    pid: int
    entrypoints: tuple[str, ...]
    started_at: datetime | None
    last_seen: datetime | None


class Session:
    """A connection to pgskewer for notebooks and scripts, with an optional worker.

    ``dsn`` is found as ``pgskewer.connect`` finds it when omitted (``PGSKEWER_DSN``,
    ``DATABASE_URL``, libpq variables, then the embedded server). With
    ``start_worker=True`` the session runs a worker for the tasks and pipelines
    registered through :meth:`task` and :meth:`pipeline`; with ``False`` it is a plain
    synchronous client, for example in a script or a web application.

    ``namespace`` prefixes every entrypoint name the session registers or enqueues
    (``nb1.fetch`` for ``fetch``), so notebooks that share a database do not run each
    other's jobs. With a namespace, short names always mean names inside it.

    ``concurrency`` is passed to the worker (``ImprovedQueuer.run``); ``None`` keeps
    the worker's default. ``replace=False`` leaves the current session open and does not
    make this one current, for programs that need several sessions at once.

    Task output is not echoed into cells: the session sets ``echo_output`` to ``False``
    for everything that runs on its loop, and the widget shows the captured lines.
    """

    def __init__(
        self,
        dsn: str | None = None,
        *,
        start_worker: bool = True,
        namespace: str | None = None,
        concurrency: int | None = None,
        embedded: bool | None = None,
        replace: bool = True,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    ) -> None:
        self.namespace = _check_namespace(namespace)
        self._concurrency = concurrency
        self._closed = False
        self._close_lock = threading.Lock()
        self._registered: dict[str, str] = {}
        #: The run most recently enqueued through this session.
        self.last_run: PipelineRun | None = None
        self._worker_task: asyncio.Task[None] | None = None
        self._pump: LivePump | None = None
        self._views_lock = threading.Lock()
        self._views: dict[int, list[RunWidget]] = {}
        self._loop = LoopThread(
            f"pgskewer-session-{next(_numbers)}",
            context_values={_context.echo_output: False},
        )
        if replace:
            _replace_current(self)
        self._loop.start()
        try:
            self._pgq: ImprovedQueuer = self._loop.run(
                _open_queuer(dsn, embedded), timeout=connect_timeout
            )
        except BaseException:
            self._closed = True
            self._loop.stop()
            _forget(self)
            raise
        atexit.register(self.close)
        if start_worker:
            self.start_worker()

    # -- lifecycle -----------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    @property
    def queuer(self) -> ImprovedQueuer:
        """The underlying queuer. Use it only from coroutines submitted to :meth:`run_async`."""
        return self._pgq

    @property
    def loop_thread(self) -> threading.Thread | None:
        """The daemon thread whose event loop runs the queuer and the worker."""
        return self._loop.thread

    @property
    def worker_running(self) -> bool:
        """Whether this session's worker is running."""
        task = self._worker_task
        return task is not None and not task.done()

    def start_worker(self) -> None:
        """Start this session's worker on the session loop; does nothing when it runs."""
        self._check_open()
        self._loop.run(self._start_worker())

    def stop_worker(self, timeout: float = DEFAULT_STOP_TIMEOUT) -> None:
        """Stop the worker, waiting up to ``timeout`` seconds for running jobs to finish.

        Jobs still running after that are cancelled. Does nothing when no worker runs.
        """
        if self._closed:
            return
        self._loop.run(self._stop_worker(timeout))

    def close(self, timeout: float = DEFAULT_STOP_TIMEOUT) -> None:
        """Stop the worker and the live views, close the queuer and stop the loop thread.

        Idempotent. Running jobs get ``timeout`` seconds to finish before they are
        cancelled.
        """
        # NOTE: with the core as of this writing, a step cancelled this way stays
        # ``canceling`` and no other worker takes it over, so its run never finishes.
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        atexit.unregister(self.close)
        try:
            self._loop.run(self._shutdown(timeout), timeout=timeout + 10)
        except Exception:
            logger.exception("closing the pgskewer session failed")
        finally:
            self._loop.stop()
            _forget(self)
            logger.info("pgskewer session closed")

    def __enter__(self) -> Session:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        if self._closed:
            state = "closed"
        elif self.worker_running:
            state = "worker running"
        else:
            state = "client"
        namespace = f" namespace={self.namespace!r}" if self.namespace else ""
        return f"<pgskewer Session {state}{namespace}>"

    def _repr_html_(self) -> str:
        import html

        names = ", ".join(
            f"<code>{html.escape(n)}</code>" for n in sorted(self._registered.values())
        )
        return (
            f"<div class='pgskewer-session'><b>{html.escape(repr(self))}</b>"
            + (f"<br>entrypoints: {names}" if names else "")
            + "</div>"
        )

    async def _start_worker(self) -> None:
        if self.worker_running:
            return
        self._pgq.shutdown.clear()
        self._worker_task = asyncio.create_task(self._run_worker(), name="pgskewer-worker")
        logger.info("pgskewer worker started on thread %s", self._loop.name)

    async def _run_worker(self) -> None:
        try:
            if self._concurrency is None:
                await self._pgq.run()
            else:
                await self._pgq.run(concurrency=self._concurrency)
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("the pgskewer worker of the notebook session failed")
            raise

    async def _stop_worker(self, timeout: float) -> None:
        task = self._worker_task
        if task is None or task.done():
            return
        self._pgq.shutdown.set()
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout)
        except TimeoutError:
            logger.warning("worker did not stop within %.1f s; cancelling its jobs", timeout)
            task.cancel()
        except Exception:
            pass  # _run_worker logged it
        await asyncio.gather(task, return_exceptions=True)
        logger.info("pgskewer worker stopped")

    async def _shutdown(self, timeout: float) -> None:
        if self._pump is not None:
            await self._pump.close()
        await self._stop_worker(timeout)
        await self._pgq.close()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this pgskewer session is closed; create a new Session")

    # -- running coroutines on the session loop --------------------------------------

    def run_async(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run a coroutine on the session loop and wait for its result.

        Use it for queuer methods that have no synchronous wrapper here:
        ``session.run_async(session.queuer.load_result(ref))``. KeyboardInterrupt and
        ``timeout`` cancel the coroutine.
        """
        if self._closed:
            coro.close()
        self._check_open()
        return self._loop.run(coro, timeout=timeout)

    def _submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        if self._closed:
            coro.close()
        self._check_open()
        return self._loop.submit(coro)

    def _call_soon(self, callback: Callable[..., object], *args: Any) -> None:
        self._loop.call_soon(callback, *args)

    def _live_pump(self) -> LivePump:
        """Return the pump of this session's live views, creating it on first use."""
        from pgskewer.notebook._live import LivePump

        if self._pump is None:
            self._pump = LivePump(self._pgq, self._loop)
        return self._pump

    def _track_view(self, view: RunWidget) -> None:
        with self._views_lock:
            self._views.setdefault(view.run.id, []).append(view)

    def finish_views(self, run_id: int) -> None:
        """Show the final state in every live view of a finished run, from the calling thread.

        :meth:`result` and ``await run`` call this once the result is stored. The pump
        also finishes views on its own, but its messages carry no cell's parent header;
        nbclient drops them when no cell runs at that moment. Sent from the cell that
        waited, the final widget values and output snapshots are recorded.
        """
        with self._views_lock:
            views = self._views.pop(run_id, [])
        if not views:
            return
        from pgskewer.notebook._live import LOG_RING_SIZE

        try:
            state = self.status(run_id)
            lines = self.run_async(_collect(self._pgq.logs(run_id, tail=LOG_RING_SIZE)))
            for view in views:
                view.finish(state, lines)
        except Exception:
            logger.warning("showing the final state of run %s failed", run_id, exc_info=True)

    # -- registration ---------------------------------------------------------------

    @overload
    def task(self, name: F, /) -> F: ...

    @overload
    def task(self, name: str | None = None, /, **options: Any) -> Callable[[F], F]: ...

    def task(self, name: str | F | None = None, /, **options: Any) -> F | Callable[[F], F]:
        """Register an ``async def`` task: ``@session.task`` or ``@session.task(name)``.

        ``options`` are those of ``ImprovedQueuer.entrypoint``; ``capture_output``
        defaults to ``True`` here so that ``print`` and ``logging`` output of the task
        shows in the run's widget. Defining the same name again, for example by
        re-running the cell, replaces the function in the running worker: the next job
        runs the new code. The decorated function is returned unchanged.
        """
        if callable(name):
            return self.task()(name)
        options.setdefault("capture_output", True)

        def register(function: F) -> F:
            short = name or function.__name__
            full = self.entrypoint_name(short)
            self._check_open()
            self._pgq.entrypoint(full, **options)(function)
            self._registered[short] = full
            return function

        return register

    def pipeline(self, name: str, *steps: Any) -> str:
        """Register the pipeline ``name`` from ``steps`` and return its entrypoint name.

        Steps are written as for ``ImprovedQueuer.entrypoint_pipeline``: task names,
        registered functions, lists for parallel groups, ``pgskewer.graph.step(...)`` and
        nested pipelines. Names are taken inside this session's namespace. Defining
        the pipeline again replaces it for runs enqueued afterwards.
        """
        self._check_open()
        full = self.entrypoint_name(name)
        self._pgq.entrypoint_pipeline(full, *(self._qualify_step(step) for step in steps))
        self._registered[name] = full
        return full

    def entrypoint_name(self, name: str) -> str:
        """Return the entrypoint name that ``name`` means in this session's namespace."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"invalid entrypoint name {name!r}: use a non-empty string")
        if self.namespace is None or name.startswith(self.namespace + "."):
            return name
        return f"{self.namespace}.{name}"

    def _qualify_step(self, step: Any) -> Any:
        if self.namespace is None:
            return step
        from pgskewer.graph import Parallel, Pipeline, Step

        if isinstance(step, str):
            return self.entrypoint_name(step)
        if isinstance(step, Step):
            return dataclasses.replace(step, name=self.entrypoint_name(step.name))
        if isinstance(step, Parallel):
            return Parallel(tuple(self._qualify_step(member) for member in step.members))
        if isinstance(step, Pipeline):
            return dataclasses.replace(
                step, steps=tuple(self._qualify_step(member) for member in step.steps)
            )
        if isinstance(step, list | tuple):
            return [self._qualify_step(member) for member in step]
        return step  # a registered function: the queuer has its full name

    # -- runs -----------------------------------------------------------------------

    def enqueue(
        self,
        name: str,
        payload: Any = None,
        *,
        priority: int = 0,
        execute_after: Any = None,
        dedupe_key: str | None = None,
    ) -> PipelineRun:
        """Enqueue a run of the task or pipeline ``name`` and return its handle."""
        full = self.entrypoint_name(name)
        run_id = self.run_async(
            self._pgq.enqueue(
                full,
                payload,
                priority=priority,
                execute_after=execute_after,
                dedupe_key=dedupe_key,
            )
        )
        self.last_run = PipelineRun(self, run_id, full)
        return self.last_run

    def attach(self, run_id: int) -> PipelineRun:
        """Return a handle of an existing run; raises ``LookupError`` when it does not exist."""
        state = self.status(run_id)
        return PipelineRun(self, state.id, state.name)

    def status(self, run_id: int) -> RunState:
        """Read the current state of a run; raises ``LookupError`` when it does not exist."""
        return self.run_async(self._pgq.run_status(run_id))

    def result(self, run_id: int, timeout: float | None = None) -> TaskResult:
        """Wait for a run to finish and return its result; see :meth:`PipelineRun.result`."""
        from pgskewer.notebook._loop import wait_future

        future = self._submit(self._result_async(run_id))
        try:
            result = wait_future(future, timeout)
        except TimeoutError:
            if future.done():
                raise
            raise TimeoutError(f"run {run_id} did not finish within {timeout} s") from None
        finally:
            if not future.done():
                future.cancel()  # the waiter, not the run
        self.finish_views(run_id)
        return result

    async def _result_async(self, run_id: int) -> TaskResult:
        result = await self._pgq.result(run_id)
        if result is None:
            raise LookupError(f"run {run_id} not found")
        return result

    def cancel(self, run_id: int) -> None:
        """Request cancellation of a run; returns without waiting for it to stop."""
        self.run_async(self._pgq.cancel(run_id))

    def cancel_soon(self, run_id: int) -> None:
        """Request cancellation of a run without waiting at all; safe from any thread.

        The request runs on the session loop; a failure is logged. The widget's Cancel
        button uses this, because its handler may run on a kernel subshell thread.
        """
        if self._closed:
            return
        future = self._loop.submit(self._pgq.cancel(run_id))
        future.add_done_callback(_log_failure(f"cancelling run {run_id}"))

    def retry(self, run_id: int) -> PipelineRun:
        """Retry a run's failed or canceled steps; see ``ImprovedQueuer.retry``."""
        new_id = self.run_async(self._pgq.retry(run_id))
        target = new_id if isinstance(new_id, int) else run_id
        return PipelineRun(self, target)

    def logs(self, run_id: int, step: str | None = None) -> list[LogLine]:
        """Return the stored output lines of a run, or of one of its steps."""
        return self.run_async(_collect(self._pgq.logs(run_id, step=step)))

    def runs(
        self, limit: int = 50, status: Status | str | None = None, name: str | None = None
    ) -> RunsTable:
        """List recent runs of the database, newest first, as a table.

        The list includes runs of other namespaces; ``name`` is taken in this one.
        """
        full = None if name is None else self.entrypoint_name(name)
        states = self.run_async(self._pgq.runs(limit=limit, status=status, name=full))
        return RunsTable(states)

    def workers(self) -> list[WorkerInfo]:
        """List the live workers registered in the database."""
        rows = self.run_async(self._pgq.workers())
        return [_worker_info(row) for row in rows if row.get("alive", True)]


# -- helpers ---------------------------------------------------------------------------


async def _open_queuer(dsn: str | None, embedded: bool | None) -> ImprovedQueuer:
    from pgskewer.queuer import connect

    pgq = await connect(dsn, embedded=embedded)
    try:
        await pgq.install()
    except BaseException:
        await pgq.close()
        raise
    return pgq


async def _collect(lines: AsyncIterator[LogLine]) -> list[LogLine]:
    return [line async for line in lines]


def _log_failure(what: str) -> Callable[[concurrent.futures.Future[Any]], None]:
    def callback(future: concurrent.futures.Future[Any]) -> None:
        if not future.cancelled() and future.exception() is not None:
            logger.error("%s failed", what, exc_info=future.exception())

    return callback


def _worker_info(row: dict[str, Any]) -> WorkerInfo:
    entrypoints = row.get("entrypoints") or ()
    if isinstance(entrypoints, str):
        entrypoints = json.loads(entrypoints)
    return WorkerInfo(
        id=str(row.get("id")),
        host=str(row.get("host") or ""),
        pid=int(row.get("pid") or 0),
        entrypoints=tuple(str(name) for name in entrypoints),
        started_at=row.get("started"),
        last_seen=row.get("last_seen"),
    )


def _check_namespace(namespace: str | None) -> str | None:
    if namespace is None:
        return None
    if not isinstance(namespace, str) or not namespace or any(c.isspace() for c in namespace):
        raise ValueError(f"invalid namespace {namespace!r}: use a non-empty name without spaces")
    return namespace.rstrip(".")


def _replace_current(session: Session) -> None:
    global _current
    with _current_lock:
        previous, _current = _current, session
    if previous is not None and not previous.closed:
        logger.info("closing the previous pgskewer session before starting a new one")
        previous.close()


def _forget(session: Session) -> None:
    global _current
    with _current_lock:
        if _current is session:
            _current = None
