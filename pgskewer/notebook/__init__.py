"""pgskewer in Jupyter: a session with a background worker, live run widgets and ``%pgskewer``.

::

    from pgskewer.notebook import Session

    session = Session()              # re-running this cell replaces the previous session

    @session.task
    async def fetch(job): ...

    run = session.enqueue("fetch", {"url": "..."})
    run                              # a live view with a Cancel button
    run.result()                     # or: await run

The worker runs on its own thread and event loop, so it keeps going while a cell blocks.
ipywidgets is optional: without it, runs show as static HTML tables.
"""

from __future__ import annotations

from pgskewer.notebook.run import PipelineRun, RunsTable
from pgskewer.notebook.session import Session, WorkerInfo, current_session, require_session

__all__ = [
    "PipelineRun",
    "RunsTable",
    "Session",
    "WorkerInfo",
    "current_session",
    "load_ipython_extension",
    "require_session",
    "unload_ipython_extension",
]


def load_ipython_extension(ipython: object) -> None:
    """Register the ``%pgskewer`` magic (``%load_ext pgskewer.notebook``)."""
    from pgskewer.notebook.magics import load_ipython_extension as load

    load(ipython)


def unload_ipython_extension(ipython: object) -> None:
    """Remove the ``%pgskewer`` magic."""
    from pgskewer.notebook.magics import unload_ipython_extension as unload

    unload(ipython)
