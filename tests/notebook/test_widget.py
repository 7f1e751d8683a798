"""The live run widget in a real kernel, observed through the comm messages on iopub."""

from __future__ import annotations

import re
import textwrap
import time
from typing import Any

import pytest
from kernel_harness import Kernel

pytestmark = pytest.mark.kernel

SETUP = textwrap.dedent(
    """
    import asyncio, time
    import pgskewer
    from pgskewer.notebook import Session
    from pgskewer.notebook.widget import display_run

    session = Session(start_worker=False)

    @session.task
    async def first(job):
        await asyncio.sleep(0.5)
        return 1

    @session.task
    async def left(job):
        await asyncio.sleep(0.8)
        return 2

    @session.task
    async def right(job):
        await asyncio.sleep(0.4)
        return 3

    @session.task
    async def last(job):
        await asyncio.sleep(0.5)
        return 4

    def chatty():
        import time
        for number in range(3):
            print(f"tick {number}", flush=True)
            time.sleep(0.5)
        return "done"

    @session.task
    async def talk(job):
        return await pgskewer.unblock(chatty)

    @session.task
    async def stuck(job):
        await asyncio.sleep(60)

    @session.task
    async def burst(job):
        for number in range(3000):
            print(f"line {number}")
            if number % 300 == 0:
                await asyncio.sleep(0.1)

    session.pipeline("three", first, [left, right], last)
    """
)

SHOW = textwrap.dedent(
    """
    run = session.enqueue({name!r})
    view = display_run(run)
    ids = {{
        "box": view.model_id,
        "header": view.header.model_id,
        "steps": view.steps.model_id,
        "log": view.log.model_id,
        "button": view.cancel_button.model_id,
    }}
    """
)

ORDER = ["pending", "queued", "running", "successful"]


def show(kernel: Kernel, name: str) -> dict[str, str]:
    kernel.run(SHOW.format(name=name))
    ids: dict[str, str] = kernel.value("ids")
    return ids


def widget_values(kernel: Kernel, model_id: str) -> list[tuple[float, str]]:
    """Return every ``value`` the model had, from its comm_open on, with arrival times."""
    values = []
    for arrived, message in list(kernel.messages):
        if message["msg_type"] not in {"comm_open", "comm_msg"}:
            continue
        content = message["content"]
        if content.get("comm_id") != model_id:
            continue
        state = content.get("data", {}).get("state", {})
        if "value" in state:
            values.append((arrived, state["value"]))
    return values


def step_statuses(html: str) -> dict[str, str]:
    return dict(re.findall(r'data-path="([^"]*)".*?pgs-st-(\w+)', html))


def run_status(header_html: str) -> str:
    found = re.search(r"pgs-st-(\w+)", header_html)
    assert found is not None, header_html
    return found.group(1)


def distinct(values: list[Any]) -> list[Any]:
    out: list[Any] = []
    for value in values:
        if not out or out[-1] != value:
            out.append(value)
    return out


def test_widget_shows_every_transition(kernel: Kernel) -> None:
    kernel.run(SETUP)
    ids = show(kernel, "three")
    kernel.run("session.start_worker()")
    assert kernel.value("run.result(timeout=30)['status']") == "successful"
    kernel.wait_for(
        lambda m: (
            m["msg_type"] == "update_display_data"
            and "pgs-st-successful" in m["content"]["data"].get("text/html", "")
        ),
        timeout=10,
    )

    snapshots = distinct([step_statuses(html) for _, html in widget_values(kernel, ids["steps"])])
    assert snapshots[0] == {
        "1": "queued",
        "2": "pending",
        "2.0": "pending",
        "2.1": "pending",
        "3": "pending",
    }
    assert set(snapshots[-1].values()) == {"successful"}

    for path in ["1", "2.0", "2.1", "3"]:
        seen = distinct([snapshot[path] for snapshot in snapshots])
        assert seen == sorted(seen, key=ORDER.index), (path, seen)
        assert "running" in seen, (path, seen)
        assert seen[-1] == "successful", (path, seen)

    for snapshot in snapshots:
        if snapshot["2.0"] != "pending" or snapshot["2.1"] != "pending":
            assert snapshot["1"] == "successful", snapshot
        if snapshot["3"] not in {"pending", "queued"}:
            assert snapshot["2.0"] == snapshot["2.1"] == "successful", snapshot
    assert any(s["2.0"] == s["2.1"] == "running" for s in snapshots), snapshots
    assert any(s["2"] == "running" and s["2.1"] == "successful" for s in snapshots), snapshots

    headers = distinct([run_status(html) for _, html in widget_values(kernel, ids["header"])])
    assert headers == ["queued", "running", "successful"]


def test_log_lines_arrive_before_step_ends(kernel: Kernel) -> None:
    kernel.run(SETUP)
    kernel.run("session.start_worker()")
    ids = show(kernel, "talk")
    assert kernel.value("run.result(timeout=60)['result']") == "done"
    kernel.wait_for(lambda m: m["msg_type"] == "update_display_data", timeout=10)

    logs = widget_values(kernel, ids["log"])
    first_tick = next(arrived for arrived, html in logs if "tick 0" in html)
    steps = widget_values(kernel, ids["steps"])
    step_done = next(arrived for arrived, html in steps if step_statuses(html)["1"] == "successful")
    assert first_tick < step_done
    final_log = logs[-1][1]
    assert [line for line in ["tick 0", "tick 1", "tick 2"] if line in final_log] == [
        "tick 0",
        "tick 1",
        "tick 2",
    ]
    assert 'class="pgs-stdout"' in final_log


def test_cancel_click_during_blocking_cell(kernel: Kernel) -> None:
    kernel.run(SETUP)
    kernel.run("session.start_worker()")
    ids = show(kernel, "stuck")
    assert kernel.value("view.cancel_routed") is True
    kernel.wait_for(
        lambda m: (
            m["msg_type"] == "comm_msg"
            and m["content"]["comm_id"] == ids["header"]
            and "pgs-st-running" in m["content"]["data"].get("state", {}).get("value", "")
        ),
        timeout=20,
    )

    sleeping = kernel.send("time.sleep(10)")
    kernel.wait_for(
        lambda m: (
            m["msg_type"] == "status"
            and m["parent_header"].get("msg_id") == sleeping
            and m["content"]["execution_state"] == "busy"
        ),
        timeout=10,
    )
    start = kernel.mark()
    clicked = kernel.send_comm_message(
        ids["button"], {"method": "custom", "content": {"event": "click"}}
    )
    arrived, _ = kernel.wait_for(
        lambda m: (
            m["msg_type"] == "comm_msg"
            and m["content"]["comm_id"] == ids["header"]
            and "pgs-st-canceled" in m["content"]["data"].get("state", {}).get("value", "")
        ),
        timeout=5,
        start=start,
    )
    assert arrived - clicked < 2.0
    with pytest.raises(TimeoutError):
        kernel.wait(sleeping, timeout=0)  # the blocking cell still runs

    kernel.interrupt()
    kernel.wait(sleeping, timeout=10)
    assert kernel.value("len(view.cancel_clicks)") == 1
    assert kernel.value("run.status().status") == "canceled"
    assert kernel.value("view.cancel_button.disabled") is True


def test_widget_bundle_has_static_fallbacks(kernel: Kernel) -> None:
    kernel.run(SETUP)
    kernel.run("session.start_worker()")
    kernel.run("done = session.enqueue('first')\ndone.result(timeout=30)")
    execution = kernel.run("done")
    bundles = execution.data()
    assert len(bundles) == 1
    bundle = bundles[0]
    assert set(bundle) == {
        "application/vnd.jupyter.widget-view+json",
        "text/html",
        "text/plain",
    }
    assert "pgs-st-successful" in bundle["text/html"]
    assert bundle["text/plain"].startswith("run ")
    started = time.monotonic()
    assert kernel.value("type(done._repr_mimebundle_()).__name__") == "dict"
    assert time.monotonic() - started < 10


def test_without_ipywidgets_shows_html_and_hint(kernel: Kernel) -> None:
    kernel.run("import sys\nsys.modules['ipywidgets'] = None  # makes 'import ipywidgets' fail")
    kernel.run(SETUP)
    kernel.run("session.start_worker()")
    kernel.run("done = session.enqueue('first')\ndone.result(timeout=30)")
    (bundle,) = kernel.run("done").data()
    assert set(bundle) == {"text/html", "text/plain"}
    assert "pgs-st-successful" in bundle["text/html"]
    assert "Install ipywidgets for a live view" in bundle["text/html"]
    assert bundle["text/plain"].splitlines()[-1].startswith("Install ipywidgets for a live view")


def test_closed_session_run_shows_text(kernel: Kernel) -> None:
    kernel.run(SETUP)
    kernel.run("done = session.enqueue('first')\nsession.close()")
    (bundle,) = kernel.run("done").data()
    assert set(bundle) == {"text/plain"}
    assert "its session is closed" in bundle["text/plain"]


def test_output_burst_batches_log_updates(kernel: Kernel) -> None:
    kernel.run(SETUP)
    kernel.run("session.start_worker()")
    ids = show(kernel, "burst")
    assert kernel.value("run.result(timeout=60)['status']") == "successful"
    assert kernel.value("len(run.logs())") == 3000

    updates = widget_values(kernel, ids["log"])
    assert "line 2999" in updates[-1][1]
    assert "line 2799" not in updates[-1][1]  # the view keeps the last 200 lines
    span = updates[-1][0] - updates[0][0]
    # One message per pump interval of 0.1 s at most, plus the final render.
    assert len(updates) <= span / 0.1 + 3, (len(updates), span)


def test_cancel_without_subshell_waits_for_cell(kernel: Kernel) -> None:
    kernel.run(SETUP)
    kernel.run("session.start_worker()")
    kernel.run(
        "import pgskewer.notebook.widget as widget_module\nwidget_module._subshell_failed = True"
    )
    ids = show(kernel, "stuck")
    assert kernel.value("view.cancel_routed") is False
    kernel.wait_for(
        lambda m: (
            m["msg_type"] == "comm_msg"
            and m["content"]["comm_id"] == ids["header"]
            and "pgs-st-running" in m["content"]["data"].get("state", {}).get("value", "")
        ),
        timeout=20,
    )

    sleeping = kernel.send("time.sleep(2)")
    kernel.wait_for(
        lambda m: (
            m["msg_type"] == "status"
            and m["parent_header"].get("msg_id") == sleeping
            and m["content"]["execution_state"] == "busy"
        ),
        timeout=10,
    )
    kernel.send_comm_message(ids["button"], {"method": "custom", "content": {"event": "click"}})
    kernel.wait(sleeping, timeout=10)
    assert kernel.value("run.result(timeout=20)['status']") == "canceled"

    # The main shell handles the click only after the blocking cell went idle.
    idle_at, _ = kernel.wait_for(
        lambda m: (
            m["msg_type"] == "status"
            and m["parent_header"].get("msg_id") == sleeping
            and m["content"]["execution_state"] == "idle"
        ),
        timeout=1,
    )
    canceled_at = next(
        arrived
        for arrived, html in widget_values(kernel, ids["header"])
        if "pgs-st-canceled" in html
    )
    assert canceled_at > idle_at
    assert kernel.value("len(view.cancel_clicks)") == 1


def test_route_to_subshell_outside_kernel() -> None:
    import ipywidgets

    from pgskewer.notebook.widget import route_to_subshell

    assert route_to_subshell(ipywidgets.Button()) is False
    assert route_to_subshell(object()) is False
