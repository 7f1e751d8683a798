"""The pgqueuer executor that runs one step of a run.

Before any user code runs, the executor claims the step in the database: a step that is
already terminal is never run again, even when pgqueuer re-delivers its job (it records a
job's completion up to about 100 ms after the handler returns, so a worker killed in that
window leaves a finished job to be picked again). Every claim counts an attempt.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import traceback
import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
from pgqueuer.executors import AbstractEntrypointExecutor
from pgqueuer.models import Context, Job

from pgskewer import advance, encoding, store
from pgskewer._context import output_sink
from pgskewer.graph import Pipeline, find_node, resolve_graph
from pgskewer.logs import capturing
from pgskewer.model import ErrorInfo, Status
from pgskewer.registry import TaskOptions, TaskSpec
from pgskewer.workers import connection_lost_reason, is_connection_lost

if TYPE_CHECKING:
    from pgskewer.queuer import ImprovedQueuer

logger = logging.getLogger("pgskewer")

#: The largest encoded result a step may return, in bytes.
MAX_RESULT_BYTES = 64 * 1024 * 1024
#: How long a step keeps trying to claim itself or store its outcome while the database
#: is unreachable; after that the error propagates and the step stays running until a
#: worker takes it over.
DISCONNECTED_RETRY_SECONDS = 300.0

T = TypeVar("T")


@dataclasses.dataclass
class StepExecutor(AbstractEntrypointExecutor):
    """Runs the current function registered under ``name`` for each job."""

    name: str = ""
    queuer: ImprovedQueuer | None = None

    async def execute(self, job: Job, context: Context) -> None:
        assert self.queuer is not None
        await Runner(self.queuer, self.name, job, context).run()


class Runner:
    """One job of one entrypoint, from claim to stored outcome."""

    def __init__(self, queuer: ImprovedQueuer, name: str, job: Job, context: Context) -> None:
        self.queuer = queuer
        self.settings = queuer.settings
        self.name = name
        self.job = job
        self.context = context

    async def run(self) -> None:
        claim = await self._claim()
        if claim is None:
            return
        spec = self.queuer.registry.task(claim.task)
        pipeline = self.queuer.registry.pipeline(claim.task)
        if spec is None and pipeline is not None and claim.run.kind == "task":
            await self._start_pipeline(claim, pipeline)
            return
        if spec is None:
            await self._fail_unknown(claim)
            return
        node = find_node(claim.run.graph, claim.path)
        try:
            options = spec.options.merged(node.get("options"))
        except (TypeError, ValueError) as exc:
            message = f"invalid options for step {claim.path} ({claim.task}): {exc}"
            logger.error("run %d: %s", claim.run.id, message)
            error: ErrorInfo = {"type": type(exc).__name__, "message": message, "traceback": ""}
            await self._store(claim, advance.Outcome(Status.EXCEPTION, error=error))
            return
        if not options.cancelable:
            await self._mark_not_cancelable(claim)
        outcome = await self._attempt(claim, spec, options)
        if outcome is None:
            return
        await self._store(claim, outcome)
        if outcome.status is Status.EXCEPTION and outcome.error is not None:
            # pgqueuer records the job as failed, with the task's own error.
            raise StepFailed(outcome.error)

    async def _claim(self) -> store.Claim | None:
        # A repeated claim of a step this worker already claimed counts one more attempt.
        return await _retry_while_disconnected(f"job {self.job.id}: claiming", self._claim_once)

    async def _claim_once(self) -> store.Claim | None:
        pool = self.queuer.pool
        async with pool.acquire() as connection:
            claim = await store.claim_step(
                connection, self.settings, self.job.id, self.queuer.worker_id
            )
            if claim is not None:
                if claim.run.kind == "pipeline":
                    # Built on the same connection, so the step costs one acquire less.
                    claim.payload = await advance.step_payload(
                        connection, self.settings, claim.run, claim.path
                    )
                return claim

            found = await store.step_of_job(connection, self.settings, self.job.id)
            if found is None:
                return await self._adopt(connection)

            run_id, path, step_status, run_status = found
            if step_status.is_terminal:
                logger.info(
                    "job %d: step %s of run %d is already %s; not running it again",
                    self.job.id,
                    path,
                    run_id,
                    step_status.value,
                )
                return None
            if run_status is Status.CANCELING or run_status.is_terminal:
                await advance.finish_step(
                    connection,
                    self.settings,
                    run_id,
                    path,
                    advance.Outcome(Status.CANCELED, error=_cancel_error("the run was canceled")),
                )
            return None

    async def _adopt(self, connection: Any) -> store.Claim | None:
        # A job enqueued with pgqueuer's own API has no run yet: this entrypoint's run
        # starts here, as a one-step task run or as a pipeline whose steps get enqueued.
        if (self.job.headers or {}).get("pgskewer") is not None:
            # pgskewer enqueued this job, but its step has moved on to another job (a
            # retry or a release), so this delivery is stale.
            logger.info("job %d belongs to no step any more; not running it", self.job.id)
            return None
        pipeline = self.queuer.registry.pipeline(self.name)
        kind = "pipeline" if pipeline is not None else "task"
        graph = resolve_graph(self.name, kind, pipeline, self.queuer.registry.pipeline)
        adopted = await advance.adopt_job(
            connection,
            self.settings,
            job_id=self.job.id,
            name=self.name,
            kind=kind,
            graph=graph,
            payload=self.job.payload,
            priority=self.job.priority,
        )
        if not adopted or kind == "pipeline":
            return None
        return await store.claim_step(connection, self.settings, self.job.id, self.queuer.worker_id)

    async def _start_pipeline(self, claim: store.Claim, pipeline: Pipeline) -> None:
        registry = self.queuer.registry
        graph = resolve_graph(claim.task, "pipeline", pipeline, registry.pipeline)
        async with self.queuer.pool.acquire() as connection:
            await advance.convert_to_pipeline(connection, self.settings, claim.run.id, graph)

    async def _mark_not_cancelable(self, claim: store.Claim) -> None:
        async with self.queuer.pool.acquire() as connection:
            await connection.execute(
                f"UPDATE {self.settings.table('steps')} SET cancelable = false "
                "WHERE run_id = $1 AND path = $2",
                claim.run.id,
                claim.path,
            )

    async def _fail_unknown(self, claim: store.Claim) -> None:
        message = f"no task named {claim.task!r} is registered in this worker"
        if self.queuer.registry.pipeline(claim.task) is not None:
            message = f"{claim.task!r} is a pipeline here, but the run's graph has it as a task"
        logger.error("run %d step %s: %s", claim.run.id, claim.path, message)
        await self._store(
            claim,
            advance.Outcome(
                Status.EXCEPTION, error={"type": "LookupError", "message": message, "traceback": ""}
            ),
        )

    async def _attempt(
        self, claim: store.Claim, spec: TaskSpec, options: TaskOptions
    ) -> advance.Outcome | None:
        job = self.job
        if claim.run.kind == "pipeline":
            payload = claim.payload
            if payload is None:
                async with self.queuer.pool.acquire() as connection:
                    payload = await advance.step_payload(
                        connection, self.settings, claim.run, claim.path
                    )
            job = job.model_copy(update={"payload": payload})

        sink = self.queuer.log_writer.sink_for(claim.run.id, claim.path)
        token = output_sink.set(sink)
        outcome: advance.Outcome | None
        try:
            value = await self._call(spec, options, job)
        except StepCanceled:
            outcome = await self._canceled(claim)
        except TimeoutError as exc:
            outcome = await self._failure(claim, options, exc, timed_out=True)
        except Exception as exc:
            outcome = await self._failure(claim, options, exc, timed_out=False)
        except BaseException as exc:
            if not self._worker_stopping(exc):
                # A CancelledError that the task raised itself, e.g. from awaiting a task
                # that was cancelled: an ordinary failure of this step.
                outcome = await self._failure(claim, options, exc, timed_out=False)
            else:
                # The worker itself is being stopped: hand the step to another worker
                # instead of leaving it running with no worker to finish it.
                await self._interrupted(claim)
                raise
        else:
            outcome = _success(value, options)
        finally:
            output_sink.reset(token)
            await self.queuer.log_writer.finish_step(claim.run.id, claim.path)
        return outcome

    async def _call(self, spec: TaskSpec, options: TaskOptions, job: Job) -> Any:
        arguments: tuple[Any, ...] = (job, self.context) if spec.accepts_context else (job,)
        scope = self.context.cancellation if options.cancelable else anyio.CancelScope()
        with scope:
            with capturing(options.capture_output):
                if options.timeout is None:
                    return await spec.function(*arguments)
                with anyio.fail_after(options.timeout):
                    return await spec.function(*arguments)
        # Reached only when the scope swallowed its own cancellation.
        raise StepCanceled()

    def _worker_stopping(self, exc: BaseException) -> bool:
        if not isinstance(exc, asyncio.CancelledError):
            return True  # KeyboardInterrupt, SystemExit
        task = asyncio.current_task()
        return (task is not None and task.cancelling() > 0) or self.queuer.shutdown.is_set()

    async def _interrupted(self, claim: store.Claim) -> None:
        with anyio.CancelScope(shield=True):
            try:
                async with self.queuer.pool.acquire() as connection:
                    released = await advance.release_step(
                        connection, self.settings, claim.run.id, claim.path, claim.task
                    )
                    if not released:
                        await advance.finish_step(
                            connection,
                            self.settings,
                            claim.run.id,
                            claim.path,
                            advance.Outcome(
                                Status.CANCELED, error=_cancel_error("the worker stopped")
                            ),
                        )
            except Exception:
                logger.exception(
                    "run %d step %s: releasing the step of a stopping worker failed",
                    claim.run.id,
                    claim.path,
                )

    async def _canceled(self, claim: store.Claim) -> advance.Outcome | None:
        # A worker that stops after its grace period cancels its running steps; they go
        # back to the queue instead of ending the run.
        if self.queuer.releasing:
            with anyio.CancelScope(shield=True):
                async with self.queuer.pool.acquire() as connection:
                    released = await advance.release_step(
                        connection, self.settings, claim.run.id, claim.path, claim.task
                    )
            if released:
                return None
        return advance.Outcome(Status.CANCELED, error=_cancel_error("the step was canceled"))

    async def _failure(
        self, claim: store.Claim, options: TaskOptions, exc: BaseException, *, timed_out: bool
    ) -> advance.Outcome | None:
        error = _error_info(exc, claim, options, timed_out)
        _log_to_step(error, claim.attempts)
        if claim.attempts <= options.retries:
            delay = options.retry_backoff * 2 ** (claim.attempts - 1)
            async with self.queuer.pool.acquire() as connection:
                retried = await advance.schedule_retry(
                    connection, self.settings, claim.run.id, claim.path, claim.task, delay, error
                )
            if retried:
                logger.warning(
                    "run %d step %s (%s) failed on attempt %d (%s); retrying in %.1fs",
                    claim.run.id,
                    claim.path,
                    claim.task,
                    claim.attempts,
                    error["type"],
                    delay,
                )
                return None
        # A crashable step's failure does not fail its run, so it is only a warning.
        logger.log(
            logging.WARNING if options.crashable else logging.ERROR,
            "run %d step %s (%s) failed: %s: %s\n%s",
            claim.run.id,
            claim.path,
            claim.task,
            error["type"],
            error["message"],
            error["traceback"].rstrip(),
        )
        return advance.Outcome(Status.EXCEPTION, error=error, crashable=options.crashable)

    async def _store(self, claim: store.Claim, outcome: advance.Outcome) -> None:
        async def store_outcome() -> None:
            async with self.queuer.pool.acquire() as connection:
                await advance.finish_step(
                    connection, self.settings, claim.run.id, claim.path, outcome
                )

        with anyio.CancelScope(shield=True):
            # A lost connection rolls the transaction back, so finish_step can run again.
            await _retry_while_disconnected(
                f"run {claim.run.id} step {claim.path}: storing the outcome", store_outcome
            )


async def _retry_while_disconnected(description: str, operation: Callable[[], Awaitable[T]]) -> T:
    """Run ``operation`` again while it fails because the database connection was lost.

    Gives up after :data:`DISCONNECTED_RETRY_SECONDS` with ``TimeoutError``.
    """
    delay = 0.1
    with anyio.fail_after(DISCONNECTED_RETRY_SECONDS):
        while True:
            try:
                return await operation()
            except Exception as exc:
                if not is_connection_lost(exc):
                    raise
                logger.warning(
                    "%s failed (%s); retrying in %.1fs",
                    description,
                    connection_lost_reason(exc),
                    delay,
                )
            await anyio.sleep(delay)
            delay = min(2 * delay, 5.0)


class StepCanceled(Exception):
    """The step's cancel scope was cancelled: a run cancel or a failing sibling."""


class StepFailed(Exception):
    """Raised to pgqueuer after a failed step is stored, so its log shows ``exception``."""

    def __init__(self, error: ErrorInfo) -> None:
        super().__init__(f"{error['type']}: {error['message']}")
        self.error = error


class _DropStepFailed(logging.Filter):
    """Drops pgqueuer's traceback of a ``StepFailed``: pgskewer already logged the failure."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], StepFailed))


logging.getLogger("pgqueuer").addFilter(_DropStepFailed())


def _success(value: Any, options: TaskOptions) -> advance.Outcome:
    if not options.store_results:
        return advance.Outcome(Status.SUCCESSFUL)
    try:
        text = encoding.encode_text(value)
    except encoding.EncodingError as exc:
        error: ErrorInfo = {"type": "TypeError", "message": str(exc), "traceback": ""}
        return advance.Outcome(Status.EXCEPTION, error=error, crashable=options.crashable)
    except Exception as exc:
        message = f"encoding the result failed: {_message(exc)}"
        error = {"type": type(exc).__name__, "message": message, "traceback": _format(exc)}
        return advance.Outcome(Status.EXCEPTION, error=error, crashable=options.crashable)
    if len(text) > MAX_RESULT_BYTES // 4 and len(text.encode("utf-8")) > MAX_RESULT_BYTES:
        message = (
            f"the result is {len(text)} bytes of JSON, above the limit of {MAX_RESULT_BYTES}; "
            "store large data elsewhere (a table, a file) and return a reference to it"
        )
        error = {"type": "ValueError", "message": message, "traceback": ""}
        return advance.Outcome(Status.EXCEPTION, error=error, crashable=options.crashable)
    return advance.Outcome(Status.SUCCESSFUL, result_text=text)


def _error_info(
    exc: BaseException, claim: store.Claim, options: TaskOptions, timed_out: bool
) -> ErrorInfo:
    if timed_out:
        seconds = options.timeout if options.timeout is not None else math.nan
        message = f"step {claim.path} ({claim.task}) timed out after {seconds:g}s"
        return {"type": "TimeoutError", "message": message, "traceback": _format(exc)}
    return {"type": type(exc).__name__, "message": _message(exc), "traceback": _format(exc)}


def _log_to_step(error: ErrorInfo, attempt: int) -> None:
    """Add a failed attempt's error and traceback to the step's stored output."""
    sink = output_sink.get()
    if sink is None:
        return
    sink("system", f"[pgskewer] attempt {attempt} failed: {error['type']}: {error['message']}")
    for line in error["traceback"].rstrip().splitlines():
        sink("system", line)


def _message(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:
        return f"<unprintable {type(exc).__name__}>"


def _format(exc: BaseException) -> str:
    try:
        return "".join(traceback.format_exception(exc))
    except Exception:
        return f"<traceback of {type(exc).__name__} could not be formatted>"


def _cancel_error(message: str) -> ErrorInfo:
    return {"type": "CancelledError", "message": message, "traceback": ""}


def new_worker_id() -> uuid.UUID:
    """Return a fresh worker id."""
    return uuid.uuid4()
