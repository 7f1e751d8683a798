"""HTML, plain-text and rich renderings of a run, its steps and its recent output.

One step table serves the notebook widget, ``PipelineRun._repr_mimebundle_``, the CLI
``status``/``watch`` commands and the rich terminal view. Rows follow the run's graph:
top-level steps in order, and the members of a parallel group or nested pipeline
indented under a header row for the group. Status words are the values of
:class:`pgskewer.model.Status`, unchanged.

The HTML uses inline styles, so it survives nbconvert and notebook viewers that drop
``<style>`` elements. It also carries ``pgs-*`` class names for tests and custom CSS:
every status cell has ``pgs-st-<status>``, and log lines have ``pgs-stdout``,
``pgs-stderr``, ``pgs-log`` or ``pgs-system``.

rich is imported only by the ``*_rich`` functions.
"""

from __future__ import annotations

import dataclasses
import html
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal

from pgskewer.model import ErrorInfo, LogLine, RunState, Status, StepState

if TYPE_CHECKING:
    from rich.console import RenderableType

__all__ = [
    "STATUS_COLORS",
    "StepRow",
    "aggregate_status",
    "format_duration",
    "run_html",
    "run_rich",
    "run_text",
    "runs_html",
    "runs_rich",
    "runs_text",
    "step_rows",
]

#: CSS colours of the status words; the rich view uses the same colours.
STATUS_COLORS: Mapping[Status, str] = {
    Status.PENDING: "#8a8a8a",
    Status.QUEUED: "#5f7a99",
    Status.RUNNING: "#1f6feb",
    Status.RETRYING: "#c77700",
    Status.CANCELING: "#c77700",
    Status.SUCCESSFUL: "#1a7f37",
    Status.EXCEPTION: "#cf222e",
    Status.CANCELED: "#6e5494",
    Status.SKIPPED: "#8a8a8a",
}

_STREAM_COLORS: Mapping[str, str] = {
    "stdout": "inherit",
    "stderr": "#cf222e",
    "log": "#5f7a99",
    "system": "#8a8a8a",
}

_STREAM_TAGS: Mapping[str, str] = {"stdout": "out", "stderr": "err", "log": "log", "system": "sys"}

#: How many log lines the renderings show by default.
DEFAULT_LOG_TAIL = 20

RowKind = Literal["task", "group", "pipeline", "sequence"]


@dataclasses.dataclass(frozen=True, slots=True)
class StepRow:
    """One row of the step table: a task step, or the header of a group of steps.

    ``depth`` is 0 for top-level steps and grows by one for each enclosing group or
    nested pipeline. Header rows carry the aggregate status of their members (see
    :func:`aggregate_status`) and ``attempts`` of ``None``.
    """

    path: str
    label: str
    kind: RowKind
    depth: int
    status: Status
    attempts: int | None
    duration: float | None
    error: ErrorInfo | None = None


# -- building rows -----------------------------------------------------------------


def step_rows(run: RunState, *, now: datetime | None = None) -> list[StepRow]:
    """List the table rows of ``run`` in graph order.

    Steps that the graph does not mention (an older or malformed snapshot) follow at
    the end in path order, so no stored step is ever hidden. ``now`` is the reference
    time for the durations of unfinished steps; it defaults to the current time.
    """
    by_path = {step.path: step for step in run.steps}
    rows: list[StepRow] = []
    placed: set[str] = set()
    root = run.graph if isinstance(run.graph, dict) else {}
    children = root.get("steps")
    if root.get("kind") == "task" or not isinstance(children, list):
        children = [root] if root.get("kind") == "task" else []
    for node in children:
        rows.extend(_node_rows(node, 0, by_path, placed, now))
    for step in sorted(run.steps, key=lambda s: _path_key(s.path)):
        if step.path not in placed:
            rows.append(_task_row(step, step.task, 0, now))
    return rows


def _node_rows(
    node: Any,
    depth: int,
    by_path: Mapping[str, StepState],
    placed: set[str],
    now: datetime | None,
) -> Iterator[StepRow]:
    if not isinstance(node, dict):
        return
    path = str(node.get("path", ""))
    kind = node.get("kind")
    if kind == "task" or not isinstance(node.get("steps"), list):
        placed.add(path)
        step = by_path.get(path)
        if step is None:
            step = StepState(path=path, task=str(node.get("name", "?")), status=Status.PENDING)
        yield _task_row(step, str(node.get("name") or step.task), depth, now)
        return

    members: list[StepRow] = []
    for child in node["steps"]:
        members.extend(_node_rows(child, depth + 1, by_path, placed, now))
    leaves = [by_path[row.path] for row in members if row.kind == "task" and row.path in by_path]
    header_kind: RowKind = kind if kind in ("group", "pipeline", "sequence") else "sequence"
    yield StepRow(
        path=path,
        label=_header_label(header_kind, node.get("name")),
        kind=header_kind,
        depth=depth,
        status=aggregate_status(step.status for step in leaves),
        attempts=None,
        duration=_span_seconds(leaves, now),
    )
    yield from members


def _task_row(step: StepState, label: str, depth: int, now: datetime | None) -> StepRow:
    return StepRow(
        path=step.path,
        label=label,
        kind="task",
        depth=depth,
        status=step.status,
        attempts=step.attempts,
        duration=_step_seconds(step, now),
        error=step.error if step.status is Status.EXCEPTION else None,
    )


def _header_label(kind: RowKind, name: Any) -> str:
    if kind == "group":
        return "parallel"
    if name:
        return str(name)
    return kind


def _path_key(path: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in path.split(".") if part)
    except ValueError:
        return (1 << 30,)


def aggregate_status(statuses: Iterable[Status]) -> Status:
    """Combine the statuses of a group's members into one status for its header row.

    While any member is active, the most advanced activity wins (``canceling``, then
    ``running``, ``retrying``, ``queued``); a mix of finished and pending members counts
    as ``running``. Once every member is terminal, ``exception`` wins over
    ``canceled``, which wins over ``successful``; only an all-``skipped`` group is
    ``skipped``. A group without members is ``pending``.
    """
    seen = set(statuses)
    if not seen:
        return Status.PENDING
    for active in (Status.CANCELING, Status.RUNNING, Status.RETRYING, Status.QUEUED):
        if active in seen:
            return active
    if Status.PENDING in seen:
        return Status.PENDING if seen == {Status.PENDING} else Status.RUNNING
    for final in (Status.EXCEPTION, Status.CANCELED, Status.SUCCESSFUL):
        if final in seen:
            return final
    return Status.SKIPPED


def _step_seconds(step: StepState, now: datetime | None) -> float | None:
    return _seconds(step.started_at, step.finished_at, now)


def _span_seconds(steps: Sequence[StepState], now: datetime | None) -> float | None:
    starts = [s.started_at for s in steps if s.started_at is not None]
    if not starts:
        return None
    unfinished = any(s.finished_at is None and not s.status.is_terminal for s in steps)
    ends = [s.finished_at for s in steps if s.finished_at is not None]
    end = None if unfinished or not ends else max(ends)
    return _seconds(min(starts), end, now)


def _seconds(start: datetime | None, end: datetime | None, now: datetime | None) -> float | None:
    if start is None:
        return None
    if end is None:
        end = now if now is not None else datetime.now(start.tzinfo)
    return max(0.0, (end - start).total_seconds())


def format_duration(seconds: float | None) -> str:
    """Format a duration for a table cell: ``0.42 s``, ``12.3 s``, ``2 min 05 s``, ``1 h 02 min``.

    ``None`` (never started) formats as an empty string.
    """
    if seconds is None:
        return ""
    if seconds < 10:
        return f"{seconds:.2f} s"
    if seconds < 60:
        return f"{seconds:.1f} s"
    whole = int(seconds)
    if whole < 3600:
        return f"{whole // 60} min {whole % 60:02d} s"
    return f"{whole // 3600} h {whole % 3600 // 60:02d} min"


def _run_seconds(run: RunState, now: datetime | None) -> float | None:
    return _seconds(run.started_at, run.finished_at, now)


def _error_line(error: ErrorInfo) -> str:
    message = str(error.get("message", ""))
    kind = str(error.get("type", "Error"))
    return f"{kind}: {message}" if message else kind


def _log_tail(lines: Sequence[LogLine], tail: int) -> Sequence[LogLine]:
    return lines[-tail:] if tail > 0 else ()


def _title(run: RunState) -> str:
    return f"run {run.id} · {run.name} ({run.kind})"


# -- plain text --------------------------------------------------------------------


def run_text(
    run: RunState,
    lines: Sequence[LogLine] = (),
    *,
    tail: int = DEFAULT_LOG_TAIL,
    now: datetime | None = None,
) -> str:
    """Render ``run`` as plain text: a title line, the step table and the last log lines.

    Members of a group are indented under the group's header row with ``├─``/``└─``.
    A failed step's error follows its row on a line that starts with ``!``. Log lines
    show the step path and a stream tag (``out``, ``err``, ``log``, ``sys``).
    """
    rows = step_rows(run, now=now)
    duration = format_duration(_run_seconds(run, now))
    out = [f"{_title(run)} · {run.status}" + (f" · {duration}" if duration else "")]
    if run.failed_step:
        out.append(f"failed step: {run.failed_step}")
    out.extend(_text_table(rows))
    tail_lines = _log_tail(lines, tail)
    if tail_lines:
        out.append(f"last {len(tail_lines)} output lines:")
        out.extend(
            f"  [{line.step}] {_STREAM_TAGS.get(line.stream, line.stream)} | {line.text}"
            for line in tail_lines
        )
    return "\n".join(out)


def _text_table(rows: Sequence[StepRow]) -> list[str]:
    labels = [_tree_prefix(rows, index) + row.label for index, row in enumerate(rows)]
    header = ("step", "name", "status", "attempts", "duration")
    cells = [
        (
            row.path,
            label,
            str(row.status),
            "" if row.attempts is None else str(row.attempts),
            format_duration(row.duration),
        )
        for row, label in zip(rows, labels, strict=True)
    ]
    lines = _align_columns(header, cells)
    out = [lines[0]]
    indent = " " * (max([len(header[0]), *(len(c[0]) for c in cells)]) + 2)
    for row, line in zip(rows, lines[1:], strict=True):
        out.append(line)
        if row.error is not None:
            out.append(indent + "! " + _error_line(row.error))
    return out


def _align_columns(header: Sequence[str], cells: Sequence[Sequence[str]]) -> list[str]:
    """Left-align ``header`` and ``cells`` in columns separated by two spaces."""
    widths = [max([len(header[i]), *(len(c[i]) for c in cells)]) for i in range(len(header))]
    return [
        "  ".join(c.ljust(w) for c, w in zip(cell, widths, strict=True)).rstrip()
        for cell in (header, *cells)
    ]


def _tree_prefix(rows: Sequence[StepRow], index: int) -> str:
    """Return the ``│ ├─ └─`` prefix that places ``rows[index]`` under its group."""
    depth = rows[index].depth
    if depth == 0:
        return ""
    parts = []
    for level in range(1, depth + 1):
        continues = _has_sibling_below(rows, index, level)
        if level == depth:
            parts.append("├─ " if continues else "└─ ")
        else:
            parts.append("│  " if continues else "   ")
    return "".join(parts)


def _has_sibling_below(rows: Sequence[StepRow], index: int, level: int) -> bool:
    for row in rows[index + 1 :]:
        if row.depth < level:
            return False
        if row.depth == level:
            return True
    return False


def runs_text(runs: Sequence[RunState], *, now: datetime | None = None) -> str:
    """Render a list of runs as a plain-text table, newest first as given."""
    header = ("id", "name", "kind", "status", "created", "duration", "failed step")
    cells = [
        (
            str(run.id),
            run.name,
            run.kind,
            str(run.status),
            _format_time(run.created_at),
            format_duration(_run_seconds(run, now)),
            run.failed_step or "",
        )
        for run in runs
    ]
    out = _align_columns(header, cells)
    if not runs:
        out.append("(no runs)")
    return "\n".join(out)


def _format_time(value: datetime | None) -> str:
    if value is None:
        return ""
    return value.astimezone().strftime("%Y-%m-%d %H:%M:%S")


# -- HTML --------------------------------------------------------------------------

_TABLE_STYLE = (
    "border-collapse:collapse;font-family:var(--jp-code-font-family,monospace);font-size:12px"
)
_CELL_STYLE = "padding:2px 10px 2px 4px;text-align:left;border-bottom:1px solid #e0e0e0"
_PRE_STYLE = (
    "margin:4px 0 0 0;padding:4px 6px;max-height:16em;overflow:auto;"
    "background:rgba(127,127,127,0.08);font-size:12px;line-height:1.35;white-space:pre-wrap"
)


def run_html(
    run: RunState,
    lines: Sequence[LogLine] = (),
    *,
    tail: int = DEFAULT_LOG_TAIL,
    now: datetime | None = None,
) -> str:
    """Render ``run`` as one HTML fragment: title, step table and a ``<pre>`` of the last log lines.

    The fragment's root ``div`` has the classes ``pgskewer-run`` and ``pgs-st-<run status>``.
    """
    return (
        f'<div class="pgskewer-run pgs-st-{run.status}" data-run-id="{run.id}">'
        + run_header_html(run, now=now)
        + run_steps_html(run, now=now)
        + run_log_html(lines, tail=tail)
        + "</div>"
    )


def run_header_html(run: RunState, *, now: datetime | None = None) -> str:
    """Render the title line of ``run``: id, name, kind, status and duration."""
    duration = format_duration(_run_seconds(run, now))
    parts = [
        f"<b>{_esc(_title(run))}</b>",
        _status_html(run.status),
    ]
    if duration:
        parts.append(f'<span class="pgs-duration">{_esc(duration)}</span>')
    if run.failed_step:
        parts.append(f'failed step <code class="pgs-failed-step">{_esc(run.failed_step)}</code>')
    return '<div class="pgs-title" style="margin-bottom:4px">' + " · ".join(parts) + "</div>"


def run_steps_html(run: RunState, *, now: datetime | None = None) -> str:
    """Render the step table of ``run`` as an HTML ``<table>``."""
    rows = step_rows(run, now=now)
    head = "".join(
        f'<th style="{_CELL_STYLE}">{name}</th>'
        for name in ("step", "name", "status", "attempts", "duration")
    )
    body = "".join(_row_html(row) for row in rows)
    return (
        f'<table class="pgs-steps" style="{_TABLE_STYLE}">'
        f"<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
    )


def _row_html(row: StepRow) -> str:
    indent = 4 + 18 * row.depth
    member = row.depth > 0
    name_style = f"padding-left:{indent}px;" + ("border-left:2px solid #c0c0c0;" if member else "")
    label = _esc(row.label)
    if row.kind != "task":
        label = f"<i>{label}</i>"
    classes = f"pgs-row pgs-kind-{row.kind}" + (" pgs-member" if member else "")
    cells = [
        f'<td style="{_CELL_STYLE}"><code>{_esc(row.path)}</code></td>',
        f'<td style="{_CELL_STYLE};{name_style}">{label}</td>',
        f'<td style="{_CELL_STYLE}">{_status_html(row.status)}</td>',
        f'<td style="{_CELL_STYLE}">{"" if row.attempts is None else row.attempts}</td>',
        f'<td style="{_CELL_STYLE}">{_esc(format_duration(row.duration))}</td>',
    ]
    out = f'<tr class="{classes}" data-path="{_esc(row.path)}">' + "".join(cells) + "</tr>"
    if row.error is not None:
        out += (
            f'<tr class="pgs-error"><td style="{_CELL_STYLE}"></td>'
            f'<td colspan="4" style="{_CELL_STYLE};color:{STATUS_COLORS[Status.EXCEPTION]};'
            f'padding-left:{indent}px;white-space:pre-wrap">{_esc(_error_line(row.error))}</td></tr>'
        )
    return out


def run_log_html(lines: Sequence[LogLine], *, tail: int = DEFAULT_LOG_TAIL) -> str:
    """Render the last ``tail`` log lines as a ``<pre>``, or an empty string without lines."""
    tail_lines = _log_tail(lines, tail)
    if not tail_lines:
        return ""
    body = "\n".join(_log_line_html(line) for line in tail_lines)
    return f'<pre class="pgs-log" style="{_PRE_STYLE}">{body}</pre>'


def _log_line_html(line: LogLine) -> str:
    color = _STREAM_COLORS.get(line.stream, "inherit")
    tag = _STREAM_TAGS.get(line.stream, line.stream)
    return (
        f'<span class="pgs-{_esc(line.stream)}" style="color:{color}">'
        f'<span style="opacity:0.6">[{_esc(line.step)}] {tag}</span> {_esc(line.text)}</span>'
    )


def _status_html(status: Status) -> str:
    return (
        f'<span class="pgs-status pgs-st-{status}" '
        f'style="color:{STATUS_COLORS[status]};font-weight:600">{status}</span>'
    )


def runs_html(runs: Sequence[RunState], *, now: datetime | None = None) -> str:
    """Render a list of runs as an HTML table."""
    names = ("id", "name", "kind", "status", "created", "duration", "failed step")
    head = "".join(f'<th style="{_CELL_STYLE}">{name}</th>' for name in names)
    body = "".join(
        f'<tr class="pgs-run-row" data-run-id="{run.id}">'
        f'<td style="{_CELL_STYLE}">{run.id}</td>'
        f'<td style="{_CELL_STYLE}">{_esc(run.name)}</td>'
        f'<td style="{_CELL_STYLE}">{run.kind}</td>'
        f'<td style="{_CELL_STYLE}">{_status_html(run.status)}</td>'
        f'<td style="{_CELL_STYLE}">{_esc(_format_time(run.created_at))}</td>'
        f'<td style="{_CELL_STYLE}">{_esc(format_duration(_run_seconds(run, now)))}</td>'
        f'<td style="{_CELL_STYLE}">{_esc(run.failed_step or "")}</td></tr>'
        for run in runs
    )
    if not runs:
        body = f'<tr><td colspan="7" style="{_CELL_STYLE}"><i>no runs</i></td></tr>'
    return (
        f'<table class="pgs-runs" style="{_TABLE_STYLE}">'
        f"<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
    )


def _esc(text: str) -> str:
    return html.escape(text, quote=True)


# -- rich --------------------------------------------------------------------------


def run_rich(
    run: RunState,
    lines: Sequence[LogLine] = (),
    *,
    tail: int = DEFAULT_LOG_TAIL,
    now: datetime | None = None,
) -> RenderableType:
    """Build a rich renderable of ``run``: the step table with the title, then the log tail."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    duration = format_duration(_run_seconds(run, now))
    title = Text(_title(run) + " · ")
    title.append(str(run.status), style=_rich_style(run.status))
    if duration:
        title.append(f" · {duration}")
    if run.failed_step:
        title.append(f" · failed step {run.failed_step}")

    # The title is its own line: as a table title, rich wraps it to the table's width.
    title.no_wrap = True
    title.overflow = "ellipsis"
    table = Table(box=None, pad_edge=False, show_edge=False)
    for name in ("step", "name", "status", "attempts", "duration"):
        table.add_column(
            name, no_wrap=name != "name", justify="right" if name == "attempts" else "left"
        )
    rows = step_rows(run, now=now)
    for index, row in enumerate(rows):
        label = Text(_tree_prefix(rows, index), style="dim")
        label.append(row.label, style="italic" if row.kind != "task" else "")
        table.add_row(
            row.path,
            label,
            Text(str(row.status), style=_rich_style(row.status)),
            "" if row.attempts is None else str(row.attempts),
            format_duration(row.duration),
        )
        if row.error is not None:
            table.add_row(
                "", Text("! " + _error_line(row.error), style=STATUS_COLORS[Status.EXCEPTION])
            )

    tail_lines = _log_tail(lines, tail)
    if not tail_lines:
        return Group(title, table)
    log = Text()
    for line in tail_lines:
        tag = _STREAM_TAGS.get(line.stream, line.stream)
        log.append(f"[{line.step}] {tag} ", style="dim")
        color = _STREAM_COLORS.get(line.stream, "inherit")
        log.append(line.text + "\n", style="" if color == "inherit" else color)
    log.rstrip()
    return Group(title, table, Text(""), log)


def runs_rich(runs: Sequence[RunState], *, now: datetime | None = None) -> RenderableType:
    """Build a rich table of a list of runs."""
    from rich.table import Table
    from rich.text import Text

    table = Table(box=None, pad_edge=False, show_edge=False)
    for name in ("id", "name", "kind", "status", "created", "duration", "failed step"):
        table.add_column(name, justify="right" if name == "id" else "left")
    for run in runs:
        table.add_row(
            str(run.id),
            run.name,
            run.kind,
            Text(str(run.status), style=_rich_style(run.status)),
            _format_time(run.created_at),
            format_duration(_run_seconds(run, now)),
            run.failed_step or "",
        )
    return table


def _rich_style(status: Status) -> str:
    return f"bold {STATUS_COLORS[status]}"
