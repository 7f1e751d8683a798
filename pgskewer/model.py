"""The one data model that every frontend reads: statuses, results, runs and steps.

The widget, the rich terminal view, the CLI and plain SQL all show these words and
fields verbatim, so a status seen in one place means the same in every other.
"""

from __future__ import annotations

import dataclasses
import enum
from datetime import datetime
from typing import Any, Literal, NotRequired, TypedDict

__all__ = [
    "ACTIVE_STATUSES",
    "RESULT_STATUSES",
    "TERMINAL_STATUSES",
    "ErrorInfo",
    "FailedStep",
    "LogLine",
    "RunState",
    "Status",
    "StepState",
    "TaskResult",
]


class Status(enum.StrEnum):
    """The status of a run or of one of its steps.

    Runs and steps move through ``pending``, ``queued``, ``running``, ``retrying`` and
    ``canceling``, and end in ``successful``, ``exception``, ``canceled`` or ``skipped``.
    """

    PENDING = "pending"
    QUEUED = "queued"
    RUNNING = "running"
    RETRYING = "retrying"
    CANCELING = "canceling"
    SUCCESSFUL = "successful"
    EXCEPTION = "exception"
    CANCELED = "canceled"
    SKIPPED = "skipped"

    @property
    def is_terminal(self) -> bool:
        """Whether no further change of this status can happen."""
        return self in TERMINAL_STATUSES


TERMINAL_STATUSES: frozenset[Status] = frozenset(
    {Status.SUCCESSFUL, Status.EXCEPTION, Status.CANCELED, Status.SKIPPED}
)
ACTIVE_STATUSES: frozenset[Status] = frozenset(set(Status) - TERMINAL_STATUSES)

#: The three pgqueuer words a :class:`TaskResult` can carry.
RESULT_STATUSES: frozenset[str] = frozenset({"successful", "exception", "canceled"})

ResultStatus = Literal["successful", "exception", "canceled"]


class ErrorInfo(TypedDict):
    """An exception as stored in a result: its type name, message and formatted traceback."""

    type: str
    message: str
    traceback: str


class FailedStep(ErrorInfo):
    """The step that failed a pipeline, with its error."""

    step: str
    task: str


class TaskResult(TypedDict):
    """The stored outcome of a run or a step.

    ``status`` is ``successful``, ``exception`` or ``canceled``. Failures are returned as
    values with ``ok=False`` and an ``error``; a pipeline that failed also names the step in
    ``failed_step``. ``result`` is ``None`` when the entrypoint has ``store_results=False``
    or when the value was larger than the inline limit, in which case ``result_ref`` names
    where to load it from with ``ImprovedQueuer.load_result``.
    """

    status: ResultStatus
    ok: bool
    result: Any
    error: NotRequired[ErrorInfo]
    failed_step: NotRequired[FailedStep]
    result_ref: NotRequired[dict[str, Any]]


@dataclasses.dataclass(frozen=True, slots=True)
class StepState:
    """One step of a run as stored in the steps table."""

    path: str
    task: str
    status: Status
    attempts: int = 0
    job_id: int | None = None
    queued_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    error: ErrorInfo | None = None

    @property
    def duration(self) -> float | None:
        """Seconds between start and finish, or until now while the step runs."""
        if self.started_at is None:
            return None
        end = self.finished_at or datetime.now(self.started_at.tzinfo)
        return max(0.0, (end - self.started_at).total_seconds())


@dataclasses.dataclass(frozen=True, slots=True)
class RunState:
    """A run with its step graph and the state of every step.

    ``graph`` is the snapshot taken when the run started: nested dicts with ``kind``
    (``sequence``, ``group``, ``task`` or ``pipeline``), ``path``, ``name`` and ``steps``.
    """

    id: int
    name: str
    kind: Literal["task", "pipeline"]
    status: Status
    graph: dict[str, Any]
    steps: tuple[StepState, ...]
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    dedupe_key: str | None = None
    failed_step: str | None = None

    @property
    def is_finished(self) -> bool:
        """Whether the run reached a terminal status."""
        return self.status.is_terminal

    def step(self, path: str) -> StepState:
        """Return the step at ``path``, raising ``KeyError`` naming it when absent."""
        for step in self.steps:
            if step.path == path:
                return step
        raise KeyError(f"run {self.id} has no step {path!r}")


@dataclasses.dataclass(frozen=True, slots=True)
class LogLine:
    """One line of captured output of a step."""

    id: int
    run_id: int
    step: str
    stream: Literal["stdout", "stderr", "log", "system"]
    seq: int
    text: str
    created_at: datetime
