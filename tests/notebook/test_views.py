"""Renderings of runs built directly from model values (pure functions, no database)."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from pgskewer import views
from pgskewer.model import LogLine, RunState, Status, StepState

T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
NOW = T0 + timedelta(seconds=75)

GRAPH: dict[str, Any] = {
    "kind": "sequence",
    "path": "",
    "name": "etl",
    "steps": [
        {"kind": "task", "path": "1", "name": "fetch"},
        {
            "kind": "group",
            "path": "2",
            "name": "parallel",
            "steps": [
                {"kind": "task", "path": "2.0", "name": "clean"},
                {"kind": "task", "path": "2.1", "name": "score"},
            ],
        },
        {
            "kind": "pipeline",
            "path": "3",
            "name": "publish",
            "steps": [
                {"kind": "task", "path": "3.1", "name": "render"},
                {"kind": "task", "path": "3.2", "name": "upload"},
            ],
        },
    ],
}


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def make_run(**changes: Any) -> RunState:
    steps = (
        StepState("1", "fetch", Status.SUCCESSFUL, 1, started_at=at(0), finished_at=at(1.5)),
        StepState("2.0", "clean", Status.RUNNING, 1, started_at=at(2)),
        StepState(
            "2.1",
            "score",
            Status.EXCEPTION,
            2,
            started_at=at(2),
            finished_at=at(3),
            error={"type": "ValueError", "message": "bad <row> & 'quote'", "traceback": "tb"},
        ),
        StepState("3.1", "render", Status.PENDING),
        StepState("3.2", "upload", Status.PENDING),
    )
    fields: dict[str, Any] = {
        "id": 7,
        "name": "etl",
        "kind": "pipeline",
        "status": Status.RUNNING,
        "graph": GRAPH,
        "steps": steps,
        "created_at": T0,
        "started_at": T0,
    }
    fields.update(changes)
    return RunState(**fields)


LINES = (
    LogLine(1, 7, "2.0", "stdout", 0, "reading <input>", T0),
    LogLine(2, 7, "2.0", "stderr", 1, "warning: slow", T0),
    LogLine(3, 7, "2.1", "system", 0, "retrying", T0),
)


def test_rows_follow_graph_order() -> None:
    rows = views.step_rows(make_run(), now=NOW)
    assert [row.path for row in rows] == ["1", "2", "2.0", "2.1", "3", "3.1", "3.2"]
    assert [row.depth for row in rows] == [0, 0, 1, 1, 0, 1, 1]
    kinds = ["task", "group", "task", "task", "pipeline", "task", "task"]
    assert [row.kind for row in rows] == kinds
    assert rows[1].label == "parallel"
    assert rows[4].label == "publish"


def test_group_header_aggregates_members() -> None:
    rows = {row.path: row for row in views.step_rows(make_run(), now=NOW)}
    assert rows["2"].status is Status.RUNNING
    assert rows["2"].attempts is None
    assert rows["2"].duration == pytest.approx(73.0)
    assert rows["3"].status is Status.PENDING
    assert rows["3"].duration is None


@pytest.mark.parametrize(
    ("statuses", "expected"),
    [
        ((), Status.PENDING),
        ((Status.PENDING, Status.PENDING), Status.PENDING),
        ((Status.SUCCESSFUL, Status.PENDING), Status.RUNNING),
        ((Status.QUEUED, Status.PENDING), Status.QUEUED),
        ((Status.RUNNING, Status.CANCELING), Status.CANCELING),
        ((Status.RETRYING, Status.SUCCESSFUL), Status.RETRYING),
        ((Status.SUCCESSFUL, Status.EXCEPTION, Status.CANCELED), Status.EXCEPTION),
        ((Status.SUCCESSFUL, Status.CANCELED), Status.CANCELED),
        ((Status.SUCCESSFUL, Status.SKIPPED), Status.SUCCESSFUL),
        ((Status.SKIPPED, Status.SKIPPED), Status.SKIPPED),
    ],
)
def test_aggregate_status(statuses: tuple[Status, ...], expected: Status) -> None:
    assert views.aggregate_status(statuses) is expected


def test_steps_missing_from_graph_are_appended() -> None:
    extra = StepState("9", "orphan", Status.SKIPPED)
    run = make_run(steps=(*make_run().steps, extra))
    rows = views.step_rows(run, now=NOW)
    assert rows[-1].path == "9"
    assert rows[-1].label == "orphan"


def test_step_missing_from_steps_shows_pending() -> None:
    run = make_run(steps=make_run().steps[:1])
    rows = {row.path: row for row in views.step_rows(run, now=NOW)}
    assert rows["2.0"].status is Status.PENDING
    assert rows["2.0"].label == "clean"


def test_task_run_graph() -> None:
    graph = {
        "kind": "sequence",
        "path": "",
        "name": "fetch",
        "steps": [{"kind": "task", "path": "1", "name": "fetch"}],
    }
    run = make_run(
        name="fetch",
        kind="task",
        graph=graph,
        steps=(StepState("1", "fetch", Status.QUEUED),),
    )
    rows = views.step_rows(run, now=NOW)
    assert [(row.path, row.label, row.status) for row in rows] == [("1", "fetch", Status.QUEUED)]


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (None, ""),
        (0.0, "0.00 s"),
        (0.4249, "0.42 s"),
        (12.34, "12.3 s"),
        (125, "2 min 05 s"),
        (3720, "1 h 02 min"),
    ],
)
def test_format_duration(seconds: float | None, text: str) -> None:
    assert views.format_duration(seconds) == text


def test_text_table() -> None:
    text = views.run_text(make_run(), LINES, now=NOW)
    lines = text.splitlines()
    assert lines[0] == "run 7 · etl (pipeline) · running · 1 min 15 s"
    assert lines[1].split() == ["step", "name", "status", "attempts", "duration"]
    assert lines[2].split() == ["1", "fetch", "successful", "1", "1.50", "s"]
    assert lines[3].split()[:3] == ["2", "parallel", "running"]
    assert lines[4].split()[:4] == ["2.0", "├─", "clean", "running"]
    assert lines[5].split()[:4] == ["2.1", "└─", "score", "exception"]
    assert lines[6].strip() == "! ValueError: bad <row> & 'quote'"
    assert lines[7].split()[:3] == ["3", "publish", "pending"]
    assert lines[8].split()[:4] == ["3.1", "├─", "render", "pending"]
    assert lines[9].split()[:4] == ["3.2", "└─", "upload", "pending"]


def test_text_log_tail_marks_streams() -> None:
    text = views.run_text(make_run(), LINES, now=NOW)
    assert "[2.0] out | reading <input>" in text
    assert "[2.0] err | warning: slow" in text
    assert "[2.1] sys | retrying" in text
    tail = views.run_text(make_run(), LINES, tail=1, now=NOW)
    assert "reading <input>" not in tail
    assert "retrying" in tail


def test_text_shows_failed_step() -> None:
    run = make_run(status=Status.EXCEPTION, failed_step="2.1", finished_at=at(3))
    text = views.run_text(run, now=NOW)
    assert text.splitlines()[0] == "run 7 · etl (pipeline) · exception · 3.00 s"
    assert "failed step: 2.1" in text


def _status_of_path(html: str) -> dict[str, str]:
    found = re.findall(r'data-path="([^"]*)".*?pgs-st-(\w+)', html)
    return dict(found)


def test_html_statuses_and_classes() -> None:
    html = views.run_html(make_run(), LINES, now=NOW)
    assert html.startswith('<div class="pgskewer-run pgs-st-running" data-run-id="7">')
    assert _status_of_path(html) == {
        "1": "successful",
        "2": "running",
        "2.0": "running",
        "2.1": "exception",
        "3": "pending",
        "3.1": "pending",
        "3.2": "pending",
    }
    for status in Status:
        assert f">{status}<" in views.run_html(make_run(status=status), now=NOW)


def test_html_indents_group_members() -> None:
    html = views.run_steps_html(make_run(), now=NOW)
    member_rows = re.findall(r'<tr class="([^"]*)" data-path="([^"]*)"', html)
    members = {path for classes, path in member_rows if "pgs-member" in classes}
    assert members == {"2.0", "2.1", "3.1", "3.2"}
    assert "padding-left:22px" in html


def test_html_escapes_text() -> None:
    html = views.run_html(make_run(), LINES, now=NOW)
    assert "bad &lt;row&gt; &amp; &#x27;quote&#x27;" in html
    assert "reading &lt;input&gt;" in html
    assert "<row>" not in html
    assert "<input>" not in html


def test_html_log_streams() -> None:
    html = views.run_log_html(LINES)
    assert html.count('class="pgs-stdout"') == 1
    assert html.count('class="pgs-stderr"') == 1
    assert html.count('class="pgs-system"') == 1
    assert views.run_log_html(()) == ""


def test_runs_table_renderings() -> None:
    runs = [make_run(), make_run(id=8, status=Status.CANCELED, finished_at=at(4))]
    text = views.runs_text(runs, now=NOW)
    assert text.splitlines()[0].split()[:4] == ["id", "name", "kind", "status"]
    assert text.splitlines()[2].split()[:4] == ["8", "etl", "pipeline", "canceled"]
    html = views.runs_html(runs, now=NOW)
    assert html.count('class="pgs-run-row"') == 2
    assert "pgs-st-canceled" in html
    assert "(no runs)" in views.runs_text([])
    assert "no runs" in views.runs_html([])


def test_rich_rendering() -> None:
    from rich.console import Console

    console = Console(width=100, record=True, color_system=None)
    console.print(views.run_rich(make_run(), LINES, now=NOW))
    console.print(views.runs_rich([make_run()], now=NOW))
    text = console.export_text()
    assert "run 7 · etl (pipeline) · running" in text
    assert "├─ clean" in text
    assert "└─ score" in text
    assert "! ValueError: bad <row>" in text
    assert "[2.0] err warning: slow" in text
    assert re.search(r"7\s+etl\s+pipeline\s+running", text)


def test_ipython_formats_tables() -> None:
    from IPython.core.interactiveshell import InteractiveShell

    from pgskewer.notebook import RunsTable
    from pgskewer.notebook.magics import RunSnapshot

    formatter = InteractiveShell.instance().display_formatter
    runs_data, _ = formatter.format(RunsTable([make_run()]))
    assert set(runs_data) == {"text/plain", "text/html"}
    assert 'class="pgs-runs"' in runs_data["text/html"]
    assert runs_data["text/plain"].splitlines()[0].split()[:2] == ["id", "name"]

    snapshot_data, _ = formatter.format(RunSnapshot(make_run(), LINES))
    assert 'class="pgskewer-run pgs-st-running"' in snapshot_data["text/html"]
    assert snapshot_data["text/plain"].startswith("run 7 · etl (pipeline) · running")
