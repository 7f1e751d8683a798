"""The process side of ``pgskewer worker``: loading the queuer, signals, child processes.

A worker stops in two stages. The first SIGTERM or SIGINT sets ``queuer.shutdown``, so
no new jobs are claimed while running steps go on. When they have not finished after the
grace period, the cancelable ones are cancelled and end ``canceled``. A second signal
ends the process at once with ``128 + signal number``. PostgreSQL then drops the
worker's session and advisory lock, and another worker takes its jobs over.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import os
import signal
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import anyio
from anyio.abc import Process, TaskStatus

from pgskewer.queuer import ImprovedQueuer

logger = logging.getLogger("pgskewer")

#: Environment variable that passes the supervisor's pid to a worker started by ``--processes``.
SUPERVISOR_PID_VARIABLE = "PGSKEWER_SUPERVISOR_PID"
#: Seconds between a child worker's checks that its supervisor still runs.
PARENT_CHECK_INTERVAL = 1.0

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class TargetError(LookupError):
    """``MODULE:ATTR`` names no module, no attribute, or no ``ImprovedQueuer``."""


# -- the queuer --------------------------------------------------------------------


def load_target(spec: str) -> object:
    """Import the module of ``MODULE:ATTR`` and return the attribute.

    The current directory goes first on ``sys.path``. ``ATTR`` may be dotted
    (``app:tasks.pgq``). An exception raised by the module's own code, including a
    ``ModuleNotFoundError`` for a module that it imports, propagates unchanged.
    """
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise TargetError(
            f"invalid worker target {spec!r}: expected MODULE:ATTR, for example 'app.tasks:pgq'"
        )

    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is None or not _names_module(module_name, exc.name):
            raise
        raise TargetError(
            f"module {module_name!r} not found (searched {cwd} and sys.path); check the "
            "name, or run the command from the folder that contains the module"
        ) from None

    value: object = module
    for part in attribute.split("."):
        try:
            value = getattr(value, part)
        except AttributeError:
            found = _queuer_names(module)
            raise TargetError(
                f"module {module_name!r} has no attribute {attribute!r}; "
                f"ImprovedQueuer objects in it: {', '.join(found) or 'none'}"
            ) from None

    if not isinstance(value, ImprovedQueuer) and not callable(value):
        raise TargetError(
            f"{spec} is a {type(value).__name__}, not an ImprovedQueuer or a function "
            "that returns one; define it at module level as 'pgq = ImprovedQueuer()' "
            "and register tasks with @pgq.entrypoint (the worker connects it)"
        )
    return value


def _names_module(module_name: str, missing: str) -> bool:
    return module_name == missing or module_name.startswith(missing + ".")


def _queuer_names(module: Any) -> list[str]:
    return sorted(name for name, value in vars(module).items() if isinstance(value, ImprovedQueuer))


async def make_queuer(target: object, spec: str) -> ImprovedQueuer:
    """Return ``target`` if it is a queuer, or call it (and await the result) to get one."""
    if isinstance(target, ImprovedQueuer):
        return target
    assert callable(target)

    try:
        inspect.signature(target).bind()
    except TypeError:
        raise TargetError(
            f"{spec} needs arguments; point the worker at a function that takes none"
        ) from None
    except ValueError:  # no signature available, for example a builtin; just call it
        pass

    value = target()
    if inspect.isawaitable(value):
        value = await value
    if not isinstance(value, ImprovedQueuer):
        raise TargetError(f"{spec}() returned a {type(value).__name__}, not an ImprovedQueuer")
    return value


# -- one worker process ------------------------------------------------------------


class GracefulStop:
    """The two-stage stop of one worker: a graceful first request, an immediate second."""

    def __init__(self, queuer: ImprovedQueuer, grace: float) -> None:
        self.queuer = queuer
        self.grace = grace
        self.requested = False

    def request(self, reason: str, task_group: anyio.abc.TaskGroup) -> None:
        """Stop claiming jobs and cancel running steps after the grace period."""
        self.requested = True
        running = len(self.queuer.qm.job_context)
        logger.info(
            "%s: stopping; running steps: %d, each gets %g s to finish (a second signal "
            "exits now)",
            reason,
            running,
            self.grace,
        )
        self.queuer.shutdown.set()
        task_group.start_soon(self._cancel_after_grace)

    async def _cancel_after_grace(self) -> None:
        # drain gives running steps the grace period, then releases the rest to other
        # workers; a cancelable=False step runs to its end.
        from pgskewer.worker import drain

        await drain(self.queuer, self.grace)


def exit_now(signum: int) -> None:
    """End the process at once with ``128 + signum``, without any cleanup."""
    name = signal.Signals(signum).name
    logger.warning("second %s: exiting now without waiting for running steps", name)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(128 + signum)


async def serve(
    queuer: ImprovedQueuer, *, concurrency: int, grace: float, supervisor_pid: int | None
) -> None:
    """Run ``queuer``'s worker until a signal (or the supervisor's exit) stops it.

    ``supervisor_pid`` is the process that started this worker with ``--processes``.
    When this process's parent changes (the supervisor was killed), the worker stops as
    on SIGTERM.
    """
    stop = GracefulStop(queuer, grace)
    async with anyio.create_task_group() as tasks:
        await tasks.start(_handle_signals, stop, tasks)
        if supervisor_pid is not None:
            tasks.start_soon(_follow_supervisor, stop, supervisor_pid, tasks)
        await queuer.run(concurrency=concurrency)
        tasks.cancel_scope.cancel()


async def _handle_signals(
    stop: GracefulStop,
    tasks: anyio.abc.TaskGroup,
    *,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    with anyio.open_signal_receiver(*_SIGNALS) as signals:
        task_status.started()
        async for signum in signals:
            if stop.requested:
                exit_now(signum)
            stop.request(f"received {signal.Signals(signum).name}", tasks)


async def _follow_supervisor(stop: GracefulStop, pid: int, tasks: anyio.abc.TaskGroup) -> None:
    # Polled because Linux's parent-death signal needs preexec_fn, which is unsafe with
    # threads, and other systems have no such signal.
    while os.getppid() == pid:  # noqa: ASYNC110 (no event exists for a parent's exit)
        await anyio.sleep(PARENT_CHECK_INTERVAL)
    if not stop.requested:
        stop.request(f"supervisor process {pid} exited", tasks)


def supervisor_pid_from_environment() -> int | None:
    """Return the pid in ``PGSKEWER_SUPERVISOR_PID``, or ``None`` when unset or invalid."""
    value = os.environ.get(SUPERVISOR_PID_VARIABLE, "")
    return int(value) if value.isdecimal() else None


# -- several worker processes ------------------------------------------------------


async def supervise(argv: Sequence[str], env: Mapping[str, str], count: int) -> int:
    """Start ``count`` processes running ``argv`` and wait until all have exited.

    SIGTERM and SIGINT are forwarded to every child that still runs, so a second signal
    reaches them as a second signal too. The children get their own session, so a
    Ctrl-C in a terminal reaches them only through this forwarding. Returns 0 when every
    child exited 0, else the first non-zero exit status (``128 + n`` for a child killed
    by signal ``n``).
    """
    children: list[Process] = []
    codes: list[int] = []
    try:
        with anyio.open_signal_receiver(*_SIGNALS) as signals:
            for _ in range(count):
                child = await anyio.open_process(
                    list(argv),
                    env={**env, SUPERVISOR_PID_VARIABLE: str(os.getpid())},
                    stdin=None,
                    stdout=None,
                    stderr=None,
                    start_new_session=True,
                )
                children.append(child)
                logger.info("started worker process %d", child.pid)

            async with anyio.create_task_group() as tasks:
                tasks.start_soon(_forward_signals, signals, children)
                async with anyio.create_task_group() as waiters:
                    for child in children:
                        waiters.start_soon(_reap, child, codes)
                tasks.cancel_scope.cancel()
    finally:
        for child in children:
            if child.returncode is None:
                logger.warning("killing worker process %d", child.pid)
                child.kill()
    failed = [code for code in codes if code != 0]
    return failed[0] if failed else 0


async def _forward_signals(signals: Any, children: Sequence[Process]) -> None:
    async for signum in signals:
        running = [child for child in children if child.returncode is None]
        logger.warning(
            "received %s: forwarding it to %d worker processes",
            signal.Signals(signum).name,
            len(running),
        )
        for child in running:
            child.send_signal(signum)


async def _reap(child: Process, codes: list[int]) -> None:
    code = await child.wait()
    code = 128 - code if code < 0 else code
    codes.append(code)
    log = logger.info if code == 0 else logger.warning
    log("worker process %d exited with status %d", child.pid, code)
