"""The live ipywidgets view of a run, and the output bundle of a :class:`PipelineRun`.

The view is a header with the run's status, a Cancel button, the step table and a
``<pre>`` of the last log lines. It is created in the cell (main thread); the session's
pump (:mod:`pgskewer.notebook._live`) updates it from the session loop's thread.

The Cancel button's comm is routed to a subshell that this module creates in the
kernel, so a click is handled while another cell blocks the main shell. That uses
private hooks of ipykernel 7.4 (``BaseComm._reply_subshell_for`` and
``SubshellManager._create_subshell``), detected at run time. Where they are missing
(older ipykernel, other kernels), the click is handled when the busy cell ends, or at
once while a cell awaits (``await run``).

The output bundle contains the widget view, a ``text/html`` snapshot and ``text/plain``.
Frontends without widget support (nbconvert without widget state, GitHub, terminals)
show the snapshot; when the run was displayed with a display id, the snapshot is
replaced by the final state when the run ends.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from pgskewer import views
from pgskewer.model import LogLine, RunState

if TYPE_CHECKING:
    from pgskewer.notebook.run import PipelineRun

__all__ = ["RunWidget", "display_run", "route_to_subshell", "run_bundle"]

logger = logging.getLogger("pgskewer")

WIDGET_VIEW_MIME = "application/vnd.jupyter.widget-view+json"

#: Lines in the HTML snapshot of a bundle; the live view shows the whole ring buffer.
SNAPSHOT_LOG_TAIL = 20

NO_WIDGETS_HINT = "Install ipywidgets for a live view of this run: pip install 'pgskewer[notebook]'"

#: Seconds to wait for the kernel's shell-channel thread to create the Cancel subshell.
SUBSHELL_CREATE_TIMEOUT = 5.0


class RunWidget:
    """The live view of one run: header, Cancel button, step table and log tail.

    ``cancel_clicks`` records the ``time.monotonic()`` of every click and
    ``cancel_routed`` whether clicks go to a kernel subshell.
    """

    def __init__(
        self,
        run: PipelineRun,
        state: RunState,
        lines: Sequence[LogLine],
        *,
        display_id: str | None = None,
    ) -> None:
        import ipywidgets

        from pgskewer.notebook._live import LOG_RING_SIZE

        self.run = run
        self.display_id = display_id
        self.state = state
        self.lines: Sequence[LogLine] = tuple(lines)
        self.cancel_clicks: list[float] = []
        self._log_tail = LOG_RING_SIZE
        self._lock = threading.Lock()

        self.header = ipywidgets.HTML(views.run_header_html(state))
        self.steps = ipywidgets.HTML(views.run_steps_html(state))
        self.log = ipywidgets.HTML(views.run_log_html(self.lines, tail=self._log_tail))
        self.cancel_button = ipywidgets.Button(
            description="Cancel",
            icon="stop",
            button_style="warning",
            tooltip=f"Cancel run {run.id}",
            disabled=state.is_finished,
            layout=ipywidgets.Layout(width="auto", margin="0 0 0 12px"),
        )
        self.cancel_button.add_class("pgs-cancel")
        self.cancel_button.on_click(self._on_cancel)
        top = ipywidgets.HBox(
            [self.header, self.cancel_button], layout=ipywidgets.Layout(align_items="center")
        )
        self.box = ipywidgets.VBox([top, self.steps, self.log])
        self.box.add_class("pgskewer-widget")
        self.cancel_routed = route_to_subshell(self.cancel_button)

    @property
    def model_id(self) -> str:
        """The comm id of the outer box, as sent in the widget-view output."""
        return str(self.box.model_id)

    def view_data(self) -> dict[str, Any]:
        """Return the ``application/vnd.jupyter.widget-view+json`` value for this view."""
        return {"version_major": 2, "version_minor": 0, "model_id": self.model_id}

    def bundle(self) -> dict[str, Any]:
        """Return the output bundle of the current state: widget view, HTML and text."""
        bundle = snapshot_bundle(self.state, self.lines)
        bundle[WIDGET_VIEW_MIME] = self.view_data()
        return bundle

    def render(self, state: RunState, lines: Sequence[LogLine]) -> None:
        """Show ``state`` and ``lines``; sends only the parts whose HTML changed."""
        with self._lock:
            self.state, self.lines = state, lines
            _set_if_changed(self.header, views.run_header_html(state))
            _set_if_changed(self.steps, views.run_steps_html(state))
            _set_if_changed(self.log, views.run_log_html(lines, tail=self._log_tail))
            if state.is_finished and not self.cancel_button.disabled:
                self.cancel_button.disabled = True
                self.cancel_button.button_style = ""

    def finish(self, state: RunState, lines: Sequence[LogLine]) -> None:
        """Show the final state and replace the output's snapshot when it has a display id.

        Both the pump and :meth:`Session.finish_views` call it; a second call sends only
        the snapshot again.
        """
        self.render(state, lines)
        if self.display_id is None:
            return
        from IPython.display import update_display

        update_display(self.bundle(), raw=True, display_id=self.display_id)  # type: ignore[no-untyped-call]

    def start(self) -> None:
        """Have the session's pump keep this view current until the run ends."""
        if self.state.is_finished:
            return
        self.run.session._track_view(self)
        self.run.session._live_pump().add_soon(self, self.state)

    def _on_cancel(self, _button: Any) -> None:
        # May run on a kernel subshell thread while a cell blocks the main thread, so
        # it only records the click and hands the request to the session loop.
        self.cancel_clicks.append(time.monotonic())
        self.run.session.cancel_soon(self.run.id)


def _set_if_changed(widget: Any, value: str) -> None:
    if widget.value != value:
        widget.value = value


def snapshot_bundle(state: RunState, lines: Sequence[LogLine]) -> dict[str, Any]:
    """Return ``text/html`` and ``text/plain`` renderings of a run for static frontends."""
    return {
        "text/html": views.run_html(state, lines, tail=SNAPSHOT_LOG_TAIL),
        "text/plain": views.run_text(state, lines, tail=SNAPSHOT_LOG_TAIL),
    }


def _make_widget(
    run: PipelineRun, state: RunState, lines: Sequence[LogLine], display_id: str | None
) -> RunWidget | None:
    if not _in_kernel():
        return None
    try:
        import ipywidgets  # noqa: F401
    except ImportError:
        return None
    return RunWidget(run, state, lines, display_id=display_id)


def _bundle_and_widget(
    run: PipelineRun, display_id: str | None
) -> tuple[dict[str, Any], RunWidget | None]:
    if run.session.closed:
        text = f"{run!r}: its session is closed; attach the run to an open session to show it"
        return {"text/plain": text}, None
    state = run.status()
    # NOTE: reads every stored line to show the last few; the queuer has no tail query.
    lines = run.logs()[-SNAPSHOT_LOG_TAIL:]
    widget = _make_widget(run, state, lines, display_id)
    if widget is not None:
        return widget.bundle(), widget
    bundle = snapshot_bundle(state, lines)
    if _in_kernel():
        bundle["text/html"] += f"<p><i>{NO_WIDGETS_HINT}</i></p>"
        bundle["text/plain"] += "\n" + NO_WIDGETS_HINT
    return bundle, None


def run_bundle(run: PipelineRun) -> dict[str, Any]:
    """Return the output bundle of ``run``, starting its live view when in a kernel."""
    bundle, widget = _bundle_and_widget(run, None)
    if widget is not None:
        widget.start()
    return bundle


def display_run(run: PipelineRun) -> RunWidget | None:
    """Display ``run`` with a display id, so that its snapshot is replaced when it ends.

    Returns the live view, or ``None`` outside a kernel or without ipywidgets.
    """
    from IPython.display import display

    display_id = uuid.uuid4().hex
    bundle, widget = _bundle_and_widget(run, display_id)
    display(bundle, raw=True, display_id=display_id)  # type: ignore[no-untyped-call]
    if widget is not None:
        widget.start()  # after display: the final update must find the output
    return widget


def _in_kernel() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None


# -- routing the Cancel button to a kernel subshell ----------------------------------

_subshell_lock = threading.Lock()
_subshell_id: str | None = None
_subshell_failed = False


def route_to_subshell(widget: Any) -> bool:
    """Route the comm messages of ``widget`` to a subshell owned by this module.

    Returns whether the route is set. The widget's handlers then run on the subshell's
    thread, concurrently with the cell on the main thread, so they must only call
    thread-safe code.
    """
    comm = getattr(widget, "comm", None)
    if comm is None or not hasattr(comm, "_reply_subshell_for"):
        return False
    subshell_id = _owned_subshell()
    if subshell_id is None:
        return False

    def reply_subshell_for(_data: Any, _default: Any) -> str:
        return subshell_id

    comm._reply_subshell_for = reply_subshell_for
    return True


def _owned_subshell() -> str | None:
    """Return the id of the subshell this module created, creating it on first use."""
    global _subshell_id, _subshell_failed
    with _subshell_lock:
        if _subshell_id is None and not _subshell_failed:
            try:
                _subshell_id = _create_subshell()
            except Exception as exc:
                _subshell_failed = True
                logger.info(
                    "kernel subshells unavailable (%s); the Cancel button works when the "
                    "running cell ends or while a cell awaits",
                    exc,
                )
        return _subshell_id


def _create_subshell() -> str:
    from IPython import get_ipython

    kernel = get_ipython().kernel
    if not getattr(kernel, "_supports_kernel_subshells", False):
        raise RuntimeError("this kernel does not support subshells")
    manager = kernel.shell_channel_thread.manager
    created: dict[str, Any] = {}
    done = threading.Event()

    def create() -> None:
        # SubshellManager._create_subshell asserts that it runs on the shell-channel thread.
        try:
            created["id"] = manager._create_subshell()
        except BaseException as exc:
            created["error"] = exc
        finally:
            done.set()

    manager._shell_channel_io_loop.add_callback(create)
    if not done.wait(SUBSHELL_CREATE_TIMEOUT):
        raise TimeoutError(f"no subshell created within {SUBSHELL_CREATE_TIMEOUT} s")
    if "error" in created:
        raise RuntimeError(f"creating a subshell failed: {created['error']!r}")
    return str(created["id"])
