"""The run widget in a real JupyterLab and Chromium: live updates and Cancel during a blocking cell.

Needs the ``jupyterlab`` and ``playwright`` packages and Chromium at ``/usr/bin/chromium``
(Debian's ``chromium`` package; ``playwright install`` is not used). Without them the
test is skipped, and with ``CI=true`` it fails instead. The screenshot is written to
``test-artifacts/notebook-cancel-during-blocking-cell.png``.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import nbformat
import pytest
from kernel_harness import ROOT
from nbformat.v4 import new_code_cell, new_notebook

pytestmark = [pytest.mark.browser, pytest.mark.kernel]

CHROMIUM = Path("/usr/bin/chromium")
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

CELLS = [
    """
    import asyncio, time
    from pgskewer.notebook import Session

    session = Session()

    @session.task
    async def fetch(job):
        await asyncio.sleep(1)
        print("fetched rows")
        return [3, 1, 2]

    @session.task
    async def clean(job):
        await asyncio.sleep(2.5)
        return "clean"

    @session.task
    async def score(job):
        await asyncio.sleep(1.5)
        return "score"

    @session.task
    async def stuck(job):
        print("stuck starts waiting")
        await asyncio.sleep(3600)

    session.pipeline("daily", fetch, [clean, score], fetch)
    """,
    "session.enqueue('daily')",
    "session.enqueue('stuck')",
    """
    print("blocking now", flush=True)
    time.sleep(12)
    print("blocking done")
    """,
]


def require_browser() -> None:
    """Skip, or fail under CI, when JupyterLab, Playwright or Chromium is missing."""
    missing = []
    if not CHROMIUM.exists():
        missing.append(f"Chromium at {CHROMIUM} (apt-get install chromium)")
    for module in ("playwright", "jupyterlab"):
        try:
            __import__(module)
        except ImportError:
            missing.append(f"the {module} package")
    if missing:
        message = "browser test needs " + " and ".join(missing)
        if IN_CI:
            pytest.fail(message, pytrace=False)
        pytest.skip(message)


@dataclass
class LabServer:
    url: str
    token: str
    process: subprocess.Popen[bytes]


def write_notebook(path: Path) -> None:
    import textwrap

    notebook = new_notebook(
        cells=[new_code_cell(textwrap.dedent(source).strip()) for source in CELLS],
        metadata={"kernelspec": {"name": "python3", "display_name": "Python 3"}},
    )
    nbformat.write(notebook, path)


@pytest.fixture
def lab_server(dsn: str, tmp_path: Path) -> Iterator[LabServer]:
    """Start ``jupyter lab`` on 127.0.0.1 with isolated config, settings and workspaces."""
    require_browser()
    root = tmp_path / "notebooks"
    root.mkdir()
    write_notebook(root / "cancel.ipynb")
    settings = tmp_path / "settings"
    notification = settings / "@jupyterlab" / "apputils-extension"
    notification.mkdir(parents=True)
    (notification / "notification.jupyterlab-settings").write_text(
        json.dumps({"fetchNews": "false", "checkForUpdates": False})
    )
    tracker = settings / "@jupyterlab" / "notebook-extension"
    tracker.mkdir(parents=True)
    (tracker / "tracker.jupyterlab-settings").write_text(json.dumps({"windowingMode": "none"}))

    token = secrets.token_hex(16)
    env = dict(
        os.environ,
        PGSKEWER_DSN=dsn,
        JUPYTER_CONFIG_DIR=str(tmp_path / "config"),
        JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime"),
        JUPYTERLAB_SETTINGS_DIR=str(settings),
        JUPYTERLAB_WORKSPACES_DIR=str(tmp_path / "workspaces"),
        JUPYTER_PLATFORM_DIRS="1",
    )
    log_path = tmp_path / "server.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "jupyterlab",
                "--no-browser",
                "--allow-root",
                "--ServerApp.ip=127.0.0.1",
                "--ServerApp.port=0",
                f"--IdentityProvider.token={token}",
                f"--ServerApp.root_dir={root}",
                "--LabApp.expose_app_in_browser=True",
                "--LabApp.news_url=None",
                "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
                "--LabApp.extension_manager=readonly",
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=root,
        )
    try:
        url = wait_for_server(log_path, token, process)
        yield LabServer(url, token, process)
    finally:
        stop_server(process, locals().get("url"), token)


def wait_for_server(log_path: Path, token: str, process: subprocess.Popen[bytes]) -> str:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"jupyter lab exited: {log_path.read_text()[-2000:]}")
        found = re.search(r"http://127\.0\.0\.1:(\d+)/", log_path.read_text())
        if found:
            url = f"http://127.0.0.1:{found.group(1)}"
            try:
                request = urllib.request.Request(
                    f"{url}/api/status", headers={"Authorization": f"token {token}"}
                )
                with urllib.request.urlopen(request, timeout=2):
                    return url
            except OSError:
                pass
        time.sleep(0.2)
    pytest.fail(f"jupyter lab did not start within 60 s: {log_path.read_text()[-2000:]}")


def stop_server(process: subprocess.Popen[bytes], url: str | None, token: str) -> None:
    if url is not None and process.poll() is None:
        request = urllib.request.Request(
            f"{url}/api/shutdown", method="POST", headers={"Authorization": f"token {token}"}
        )
        try:
            urllib.request.urlopen(request, timeout=5).close()
        except OSError:
            pass
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


KERNEL_IDLE = """() => {
    const widget = window.jupyterapp && window.jupyterapp.shell.currentWidget;
    const context = widget && widget.sessionContext;
    const kernel = context && context.session && context.session.kernel;
    return !!(kernel && kernel.status === 'idle' && document.querySelector('.jp-Notebook'));
}"""


SNAPSHOT_CANCELED = """() => {
    const cells = window.jupyterapp.shell.currentWidget.content.model.cells;
    const outputs = cells.get(2).outputs;
    const html = outputs.length ? outputs.get(0).data['text/html'] || '' : '';
    return html.includes('pgskewer-run pgs-st-canceled');
}"""


def test_cancel_button_during_blocking_cell(lab_server: LabServer, tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    screenshot = ARTIFACTS / "notebook-cancel-during-blocking-cell.png"
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),
            executable_path=str(CHROMIUM),
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1280, "height": 1400},
        )
        try:
            context.route(re.compile(r"^(?!http://127\.0\.0\.1[:/]).*"), lambda r: r.abort())
            page = context.new_page()
            page.goto(f"{lab_server.url}/lab/tree/cancel.ipynb?reset&token={lab_server.token}")
            page.wait_for_function(KERNEL_IDLE, timeout=60_000)
            # The command's promise resolves only after every cell ran, so do not return it.
            page.evaluate("() => { window.jupyterapp.commands.execute('notebook:run-all-cells'); }")

            pipeline = page.locator(".pgskewer-widget").filter(has_text="daily (pipeline)")
            pipeline.locator(".pgs-title .pgs-st-running").wait_for(timeout=30_000)
            pipeline.locator(".pgs-title .pgs-st-successful").wait_for(timeout=30_000)
            assert pipeline.locator('tr[data-path="2.1"] .pgs-st-successful').count() == 1

            stuck = page.locator(".pgskewer-widget").filter(has_text="stuck (task)")
            stuck.locator(".pgs-title .pgs-st-running").wait_for(timeout=30_000)
            printed = page.locator(".jp-OutputArea-output.jp-RenderedText")
            printed.filter(has_text="blocking now").wait_for(timeout=30_000)

            clicked = time.monotonic()
            stuck.locator(".pgs-cancel").click()
            stuck.locator(".pgs-title .pgs-st-canceled").wait_for(timeout=2_000)
            latency = time.monotonic() - clicked
            assert printed.filter(has_text="blocking done").count() == 0, "the blocking cell ended"
            assert stuck.locator("button.pgs-cancel").is_disabled()
            page.screenshot(path=str(screenshot), full_page=True)
            assert latency < 2.0
            # The output's HTML snapshot, which a saved notebook keeps, shows the end state.
            page.wait_for_function(SNAPSHOT_CANCELED, timeout=5_000)
        finally:
            context.close()
    shutil.rmtree(tmp_path / "chromium-profile", ignore_errors=True)
