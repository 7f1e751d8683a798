"""Registration of tasks and pipelines, kept apart from any database connection.

Decorators only record functions and options here. The worker binds the registry to the
database when it starts, so a module can be imported with no event loop running, and a
notebook can register on one thread and run the worker on another. Registering a name
again replaces its function: the worker keeps one stable executor per name that looks
the current function up on every job.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import threading
from collections.abc import Awaitable, Callable
from typing import Any

from pgqueuer.models import Context

from pgskewer.graph import Pipeline, names_in, normalize

logger = logging.getLogger("pgskewer")

TaskFunction = Callable[..., Awaitable[Any]]


@dataclasses.dataclass(frozen=True)
class TaskOptions:
    """Options of one entrypoint, which control how pgskewer runs it.

    ``cancelable``: a pipeline cancel or a sibling's failure cancels the running step;
    ``False`` lets it finish and keeps its result. ``store_results``: store the returned
    value (``False`` still records status and error). ``crashable``: an exception ends
    the step ``exception`` without failing its pipeline. ``concurrency_limit``: pgqueuer's
    global limit of running jobs of this entrypoint across all workers (0 means none).
    ``retries``: further attempts after a failure, waiting ``retry_backoff * 2**n``
    seconds before attempt ``n + 2``. ``timeout``: seconds before the step is cancelled
    and ends ``exception`` with ``TimeoutError``. ``capture_output``: store the task's
    own ``print`` and ``logging`` output as log lines of the step.
    """

    cancelable: bool = True
    store_results: bool = True
    crashable: bool = False
    concurrency_limit: int = 0
    retries: int = 0
    retry_backoff: float = 1.0
    timeout: float | None = None
    capture_output: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.concurrency_limit, int) or self.concurrency_limit < 0:
            raise ValueError(
                f"concurrency_limit must be an int >= 0, got {self.concurrency_limit!r}"
            )
        if not isinstance(self.retries, int) or self.retries < 0:
            raise ValueError(f"retries must be an int >= 0, got {self.retries!r}")
        if self.retry_backoff < 0:
            raise ValueError(f"retry_backoff must be >= 0 seconds, got {self.retry_backoff!r}")
        if self.timeout is not None and self.timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds or None, got {self.timeout!r}")

    def merged(self, overrides: dict[str, Any] | None) -> TaskOptions:
        """Return these options with a pipeline's per-step overrides applied."""
        return dataclasses.replace(self, **overrides) if overrides else self


@dataclasses.dataclass
class TaskSpec:
    """A registered task: its current function and options."""

    name: str
    function: TaskFunction
    options: TaskOptions
    accepts_context: bool


@dataclasses.dataclass
class Registry:
    """Tasks and pipelines by entrypoint name. Safe to change from any thread."""

    tasks: dict[str, TaskSpec] = dataclasses.field(default_factory=dict)
    pipelines: dict[str, Pipeline] = dataclasses.field(default_factory=dict)
    _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False)
    _listeners: list[Callable[[str], None]] = dataclasses.field(default_factory=list, repr=False)

    def add_task(
        self,
        name: str,
        function: TaskFunction,
        options: TaskOptions,
        accepts_context: bool | None = None,
    ) -> TaskSpec:
        """Register or replace the task ``name``."""
        _check_task_function(name, function)
        if accepts_context is None:
            accepts_context = _wants_context(function)
        spec = TaskSpec(name, function, options, accepts_context)
        with self._lock:
            replaced = name in self.tasks or name in self.pipelines
            self.pipelines.pop(name, None)
            self.tasks[name] = spec
        if replaced:
            logger.info("task %r redefined; the next job of it runs the new function", name)
        self._changed(name)
        return spec

    def add_pipeline(self, name: str, pipeline: Pipeline) -> Pipeline:
        """Register or replace the pipeline ``name``."""
        check_entrypoint_name(name)
        named = dataclasses.replace(pipeline, name=name)
        with self._lock:
            self.tasks.pop(name, None)
            self.pipelines[name] = named
        self._changed(name)
        return named

    def names(self) -> list[str]:
        """Return every registered entrypoint name."""
        with self._lock:
            return sorted({*self.tasks, *self.pipelines})

    def task(self, name: str) -> TaskSpec | None:
        """Return the current spec of task ``name``, or ``None``."""
        with self._lock:
            return self.tasks.get(name)

    def pipeline(self, name: str) -> Pipeline | None:
        """Return the current definition of pipeline ``name``, or ``None``."""
        with self._lock:
            return self.pipelines.get(name)

    def name_of(self, function: Any) -> str:
        """Return the entrypoint name a function object was registered under.

        Raises ``ValueError`` naming the function when it was never registered.
        """
        with self._lock:
            for spec in self.tasks.values():
                if (
                    spec.function is function
                    or getattr(function, "__wrapped__", None) is spec.function
                ):
                    return spec.name
        label = getattr(function, "__qualname__", repr(function))
        raise ValueError(
            f"function {label} is not a registered task; decorate it with "
            "@pgq.entrypoint(...) before using it in a pipeline, or pass its name as a string"
        )

    def define_pipeline(self, name: str | None, steps: tuple[Any, ...]) -> Pipeline:
        """Build a pipeline from user step arguments, warning about unknown names."""
        definition = Pipeline(normalize(steps, self.name_of), name)

        known = set(self.names())
        used = list(names_in(definition.steps))
        for repeated in sorted({step for step in used if used.count(step) > 1}):
            logger.info(
                "pipeline %r runs %r more than once; tasks[%r] in later payloads contains its "
                "latest result, and every result stays in the run's steps",
                name or "<anonymous>",
                repeated,
                repeated,
            )
        for step_name in dict.fromkeys(used):
            if step_name not in known and step_name != name:
                logger.warning(
                    "pipeline %r uses %r, which is not registered here yet; a run fails at "
                    "that step if no worker serves it by then",
                    name or "<anonymous>",
                    step_name,
                )
        return definition

    def on_change(self, listener: Callable[[str], None]) -> None:
        """Call ``listener(name)`` after every registration."""
        self._listeners.append(listener)

    def _changed(self, name: str) -> None:
        for listener in list(self._listeners):
            listener(name)


#: The longest entrypoint name, in UTF-8 bytes. pgqueuer indexes the name, and this stays
#: well below the index's row limit.
MAX_NAME_BYTES = 1000


def check_entrypoint_name(name: str) -> None:
    """Raise ``ValueError`` naming ``name`` when it cannot be an entrypoint name."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"invalid entrypoint name {name!r}: use a non-empty string")
    size = len(name.encode("utf-8", "surrogatepass"))
    if size > MAX_NAME_BYTES:
        raise ValueError(
            f"entrypoint name {name[:40]!r}... is {size} bytes long, above the limit of "
            f"{MAX_NAME_BYTES}; use a shorter name"
        )
    if "\x00" in name:
        raise ValueError(f"invalid entrypoint name {name!r}: it contains a NUL character")


def _check_task_function(name: str, function: Any) -> None:
    check_entrypoint_name(name)
    if not inspect.iscoroutinefunction(function) and not inspect.iscoroutinefunction(
        getattr(function, "__call__", None)  # noqa: B004
    ):
        raise TypeError(
            f"task {name!r} must be defined with 'async def'; to run blocking code, "
            "call it through pgskewer.unblock: "
            "'async def task(job): return await unblock(blocking_function, job.payload)'"
        )


def _wants_context(function: Any) -> bool:
    try:
        parameters = list(inspect.signature(function).parameters.values())
    except (TypeError, ValueError):
        return False
    if any(parameter.annotation in (Context, "Context") for parameter in parameters):
        return True
    # A second parameter without a default receives the context; one with a default
    # (``async def task(job, name=name)`` built in a loop) keeps its default.
    positional = [
        parameter
        for parameter in parameters
        if parameter.kind in (parameter.POSITIONAL_ONLY, parameter.POSITIONAL_OR_KEYWORD)
        and parameter.default is parameter.empty
    ]
    return len(positional) >= 2
