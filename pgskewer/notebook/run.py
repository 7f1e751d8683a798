"""Handles of runs for notebooks and scripts: :class:`PipelineRun` and :class:`RunsTable`.

A handle is a run id bound to a :class:`~pgskewer.notebook.Session`. Its synchronous
methods submit the work to the session's loop thread and wait for it there, so they work
in a cell that blocks, in a plain script and in a web request handler alike.
"""

from __future__ import annotations

import asyncio
from collections.abc import Generator, Sequence
from typing import TYPE_CHECKING, Any

from pgskewer import views
from pgskewer.model import LogLine, RunState, TaskResult

if TYPE_CHECKING:
    from pgskewer.notebook.session import Session

__all__ = ["PipelineRun", "RunsTable"]

#: Seconds between wake-ups of the kernel loop while a cell awaits a run.
_AWAIT_SLICE = 0.1


class PipelineRun:
    """One run of a task or pipeline, as returned by :meth:`Session.enqueue`.

    Shown as a cell's output, it renders a live widget when ipywidgets is installed, and
    otherwise a step table. ``await run`` and :meth:`result` wait for the stored
    :class:`~pgskewer.model.TaskResult`; interrupting the wait (the kernel's stop button,
    Ctrl-C) stops waiting and leaves the run going. Use :meth:`cancel` to stop the run.
    """

    def __init__(self, session: Session, run_id: int, name: str | None = None) -> None:
        self.session = session
        self.id = run_id
        self.name = name

    def __repr__(self) -> str:
        label = f" {self.name!r}" if self.name else ""
        return f"<PipelineRun {self.id}{label}>"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PipelineRun):
            return NotImplemented
        return other.session is self.session and other.id == self.id

    def __hash__(self) -> int:
        return hash((id(self.session), self.id))

    def status(self) -> RunState:
        """Read the run's current state: its status and the state of every step."""
        return self.session.status(self.id)

    def result(self, timeout: float | None = None) -> TaskResult:
        """Wait for the run to finish and return its stored result.

        Raises ``TimeoutError`` after ``timeout`` seconds. KeyboardInterrupt stops the
        wait within about 0.1 s; neither one cancels the run.
        """
        return self.session.result(self.id, timeout=timeout)

    def __await__(self) -> Generator[Any, None, TaskResult]:
        return self.wait().__await__()

    async def wait(self, timeout: float | None = None) -> TaskResult:
        """Wait for the result from any event loop, for example the kernel's.

        Cancelling the awaiting task (which is what interrupting a cell does) stops the
        wait and leaves the run going. The loop wakes every 0.1 s while it waits:
        ipykernel applies an interrupt of an awaiting cell only when its loop wakes up.
        Raises ``TimeoutError`` after ``timeout`` seconds.
        """
        future = asyncio.wrap_future(self.session._submit(self.session._result_async(self.id)))
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        try:
            while True:
                slice_ = _AWAIT_SLICE
                if deadline is not None:
                    slice_ = min(slice_, deadline - loop.time())
                    if slice_ <= 0:
                        raise TimeoutError(f"run {self.id} did not finish within {timeout} s")
                # asyncio.wait never cancels the future it waits on, so an interrupt
                # cancels only this coroutine; the finally clause then drops the waiter.
                done, _ = await asyncio.wait({future}, timeout=slice_)
                if done:
                    break
        finally:
            if not future.done():
                future.cancel()
        result = future.result()
        self.session.finish_views(self.id)
        return result

    def cancel(self) -> None:
        """Request cancellation of the run; returns without waiting for it to stop."""
        self.session.cancel(self.id)

    def retry(self) -> PipelineRun:
        """Run the failed or canceled steps again (see ``ImprovedQueuer.retry``)."""
        return self.session.retry(self.id)

    def logs(self, step: str | None = None) -> list[LogLine]:
        """Return the stored output lines of the run, or of one step by its path."""
        return self.session.logs(self.id, step=step)

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, Any]:
        from pgskewer.notebook.widget import run_bundle

        return run_bundle(self)

    def _ipython_display_(self) -> None:
        from pgskewer.notebook.widget import display_run

        display_run(self)


class RunsTable(list[RunState]):
    """A list of runs that shows as a table in notebooks and terminals."""

    def __init__(self, runs: Sequence[RunState] = ()) -> None:
        super().__init__(runs)

    def _repr_html_(self) -> str:
        return views.runs_html(self)

    def __repr__(self) -> str:
        return views.runs_text(self)

    def __rich__(self) -> Any:
        return views.runs_rich(self)
