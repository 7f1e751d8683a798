"""pgskewer: durable pipelines, stored results and live views on the pgqueuer job queue."""

from __future__ import annotations

from typing import Any

from pgskewer.advance import DuplicateRunError
from pgskewer.encoding import EncodingError, parse_payload
from pgskewer.graph import parallel, step
from pgskewer.model import LogLine, RunState, Status, StepState, TaskResult
from pgskewer.queuer import ImprovedQueuer, RunNotFoundError, connect

# Bound after the submodule import, so ``pgskewer.unblock`` is the function, not the module.
from pgskewer.unblock import (
    RemoteError,
    Unblocker,
    UnblockError,
    UnblockProcessDied,
    UnblockTimeout,
    unblock,
)

__all__ = [
    "DuplicateRunError",
    "EncodingError",
    "ImprovedQueuer",
    "LogLine",
    "RemoteError",
    "RunNotFoundError",
    "RunState",
    "Status",
    "StepState",
    "TaskResult",
    "UnblockError",
    "UnblockProcessDied",
    "UnblockTimeout",
    "Unblocker",
    "connect",
    "load_ipython_extension",
    "parallel",
    "parse_payload",
    "session",
    "step",
    "unblock",
    "unload_ipython_extension",
]


def session(*args: Any, **kwargs: Any) -> Any:
    """Start a notebook session; see :class:`pgskewer.notebook.Session`."""
    from pgskewer.notebook import Session

    return Session(*args, **kwargs)


def load_ipython_extension(ipython: Any) -> None:
    """Register the ``%pgskewer`` magic: ``%load_ext pgskewer``."""
    from pgskewer.notebook.magics import load_ipython_extension as load

    load(ipython)


def unload_ipython_extension(ipython: Any) -> None:
    """Remove the ``%pgskewer`` magic: ``%unload_ext pgskewer``."""
    from pgskewer.notebook.magics import unload_ipython_extension as unload

    unload(ipython)
