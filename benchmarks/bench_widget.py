"""Widget updates, log lines shown and frontend lag of the notebook widget under a chatty step.

Run from the repository root: ``python benchmarks/bench_widget.py [--seconds S] [--rate N]``.
It takes about 45 s on 2 CPUs. The script creates the database ``pgskewer_bench_widget_<hex>``
on the server named by ``PGSKEWER_BENCH_DSN`` (default 127.0.0.1), starts ``jupyter lab``
on 127.0.0.1 with its config, runtime, settings and workspace directories in a temporary
folder, and opens a notebook in Debian's Chromium (``/usr/bin/chromium``) through
Playwright. Everything it started is stopped by PID, and the database is dropped.

The notebook registers two one-step pipelines. Each step calls ``unblock`` on a function
that prints ``seq=N t=STAMP`` lines, where STAMP is ``time.time()`` when the line was
written: the quiet step prints 10 lines a second and the chatty step 10,000, both for
10 seconds. A cell displays each run's widget and the next cell blocks in
``run.result()``, as a user's notebook would.

Inside the page, a MutationObserver records every change of a widget's HTML parts with
``Date.now()``, and for each change of the log view it reads the newest and oldest line
shown. A slot on the kernel connection's ``iopubMessage`` signal records every iopub
message the page receives. From these the script computes, per step:

- widget messages (``comm_msg``) and log view updates received per second;
- lines per second by which the newest line shown advances, and distinct lines shown;
- lag: the page time when a line becomes the newest line shown minus its stamp. The page
  and the step run on the same machine, so both clocks are the same clock;
- CPU use of the Jupyter server, the kernel, the ``unblock`` child and Chromium.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import itertools
import json
import os
import re
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import asyncpg
from _common import ADMIN_DSN, LOCAL_HOSTS, database_dsn, percentile, print_table

if TYPE_CHECKING:
    from playwright.sync_api import Page

CHROMIUM = Path("/usr/bin/chromium")
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

#: Seconds to wait for ``jupyter lab`` to respond and for the notebook's kernel to be idle.
STARTUP_TIMEOUT = 60.0

#: Seconds between CPU samples and page polls while the notebook runs.
SAMPLE_INTERVAL = 0.5

#: Seconds at the start and at the end of a step whose lag medians are compared.
EDGE_SECONDS = 2.0

#: Prefix of the line that a notebook cell prints with a step's outcome.
REPORT_MARKER = "pgskewer-bench "

QUIET_RATE = 10

SETUP_CELL = """
import json, os, time
from pgskewer.notebook import Session
from pgskewer.unblock import unblock

session = Session()

def write_stamped_lines(rate, seconds):
    # Runs in the unblock child. Writes in batches of rate/100 lines, 100 times a second.
    import sys, time
    total = round(rate * seconds)
    batch = max(1, rate // 100)
    start = time.monotonic()
    first = last = None
    written = 0
    while written < total:
        delay = start + written / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        lines = []
        for offset in range(min(batch, total - written)):
            last = time.time()
            lines.append(f"seq={{written + offset}} t={{last:.6f}}")
        first = last if first is None else first
        sys.stdout.write("\\n".join(lines) + "\\n")
        written += len(lines)
    return {{"lines": written, "first": first, "last": last}}

@session.task
async def quiet_lines(job):
    return await unblock(write_stamped_lines, {quiet_rate}, {seconds})

@session.task
async def chatty_lines(job):
    return await unblock(write_stamped_lines, {chatty_rate}, {seconds})

session.pipeline("quiet", quiet_lines)
session.pipeline("chatty", chatty_lines)

def report(run, label):
    wall, cpu = time.monotonic(), os.times()
    result = run.result(timeout=300)
    after = os.times()
    # A pipeline's result maps each step's task name to that step's TaskResult.
    (step,) = result["result"]["tasks"].values()
    figures = {{
        "label": label,
        "status": result["status"],
        "result": step["result"],
        "kernel_pid": os.getpid(),
        "kernel_cpu_s": (after.user + after.system) - (cpu.user + cpu.system),
        "wall_s": time.monotonic() - wall,
    }}
    print({marker!r} + json.dumps(figures, default=str))
"""

PHASE_CELLS = [
    'quiet_run = session.enqueue("quiet")\nquiet_run',
    'report(quiet_run, "quiet")',
    'chatty_run = session.enqueue("chatty")\nchatty_run',
    'report(chatty_run, "chatty")',
    "session.close()",
]

KERNEL_IDLE = """() => {
    const widget = window.jupyterapp && window.jupyterapp.shell.currentWidget;
    const context = widget && widget.sessionContext;
    const kernel = context && context.session && context.session.kernel;
    return !!(kernel && kernel.status === 'idle' && document.querySelector('.jp-Notebook'));
}"""

# Records into window.__pgsBench:
#   parts: [Date.now(), widget title, 'header' | 'steps' | 'log'] per changed HTML part,
#   log:   [Date.now(), widget title, newest line, oldest line, lines shown] per log change,
#   iopub: [Date.now(), msg_type, characters of the widget value or stream text],
#   longFrames: [Date.now(), milliseconds] for animation frames more than 50 ms apart.
INSTRUMENT_PAGE = """() => {
    const bench = { parts: [], log: [], iopub: [], longFrames: [] };
    window.__pgsBench = bench;

    const partOf = (content) => {
        if (content.querySelector('.pgs-log')) return 'log';
        if (content.querySelector('.pgs-steps')) return 'steps';
        if (content.querySelector('.pgs-title')) return 'header';
        return null;
    };
    const observer = new MutationObserver((records) => {
        const now = Date.now();
        const seen = new Set();
        for (const record of records) {
            let node = record.target;
            if (node.nodeType !== Node.ELEMENT_NODE) node = node.parentElement;
            const widget = node && node.closest('.pgskewer-widget');
            const content = node && node.closest('.widget-html-content');
            if (!widget || !content || seen.has(content)) continue;
            seen.add(content);
            const part = partOf(content);
            if (part === null) continue;
            const heading = widget.querySelector('.pgs-title b');
            const title = heading ? heading.textContent : '';
            bench.parts.push([now, title, part]);
            if (part === 'log') {
                const pre = content.querySelector('.pgs-log');
                const newest = pre.lastElementChild;
                const oldest = pre.firstElementChild;
                bench.log.push([
                    now, title, newest ? newest.textContent : '',
                    oldest ? oldest.textContent : '', pre.childElementCount,
                ]);
            }
        }
    });
    observer.observe(document.querySelector('.jp-Notebook'),
                     { childList: true, subtree: true, characterData: true });

    const kernel = window.jupyterapp.shell.currentWidget.sessionContext.session.kernel;
    kernel.iopubMessage.connect((_sender, message) => {
        const type = message.header.msg_type;
        let size = 0;
        if (type === 'comm_msg') {
            const state = message.content.data && message.content.data.state;
            if (state && typeof state.value === 'string') size = state.value.length;
        } else if (type === 'stream') {
            size = message.content.text.length;
        }
        bench.iopub.push([Date.now(), type, size]);
    });

    let previous = performance.now();
    const onFrame = (stamp) => {
        if (stamp - previous > 50) bench.longFrames.push([Date.now(), stamp - previous]);
        previous = stamp;
        requestAnimationFrame(onFrame);
    };
    requestAnimationFrame(onFrame);
}"""

CELL_OUTPUTS = """() => {
    const texts = Array.from(document.querySelectorAll('.jp-OutputArea-output'))
        .map((node) => node.textContent);
    const errors = Array.from(document.querySelectorAll(
        '.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.error"]'))
        .map((node) => node.textContent);
    return { texts, errors };
}"""

LINE_PATTERN = re.compile(r"seq=(\d+) t=(\d+\.\d+)")


class BenchmarkError(RuntimeError):
    """A step of the benchmark's set-up failed; the message names the step and the cause."""


# -- database, server and browser ---------------------------------------------------------


async def _admin_execute(statement: str) -> None:
    connection = await asyncpg.connect(ADMIN_DSN)
    try:
        await connection.execute(statement)
    finally:
        await connection.close()


@contextmanager
def bench_database() -> Iterator[str]:
    """Create an empty ``pgskewer_bench_widget_*`` database, yield its DSN, then drop it."""
    host = urlsplit(ADMIN_DSN).hostname
    if host not in LOCAL_HOSTS:
        raise BenchmarkError(
            f"the benchmark runs only against a server on this host, got host {host!r}; "
            "set PGSKEWER_BENCH_DSN to a postgresql://...@127.0.0.1 DSN"
        )
    name = f"pgskewer_bench_widget_{uuid.uuid4().hex[:12]}"
    asyncio.run(_admin_execute(f'CREATE DATABASE "{name}"'))
    try:
        yield database_dsn(ADMIN_DSN, name)
    finally:
        asyncio.run(_admin_execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def write_notebook(path: Path, seconds: float, chatty_rate: int) -> None:
    import nbformat
    from nbformat.v4 import new_code_cell, new_notebook

    setup = SETUP_CELL.format(
        quiet_rate=QUIET_RATE, chatty_rate=chatty_rate, seconds=seconds, marker=REPORT_MARKER
    )
    cells = [textwrap.dedent(setup).strip(), *PHASE_CELLS]
    notebook = new_notebook(
        cells=[new_code_cell(source) for source in cells],
        metadata={"kernelspec": {"name": "python3", "display_name": "Python 3"}},
    )
    nbformat.write(notebook, path)


def write_lab_settings(settings: Path) -> None:
    """Turn off news and update checks, and render every cell (no windowing)."""
    notification = settings / "@jupyterlab" / "apputils-extension"
    notification.mkdir(parents=True)
    (notification / "notification.jupyterlab-settings").write_text(
        json.dumps({"fetchNews": "false", "checkForUpdates": False})
    )
    tracker = settings / "@jupyterlab" / "notebook-extension"
    tracker.mkdir(parents=True)
    (tracker / "tracker.jupyterlab-settings").write_text(json.dumps({"windowingMode": "none"}))


@dataclasses.dataclass
class LabServer:
    """A ``jupyter lab`` process started by this script."""

    url: str
    token: str
    process: subprocess.Popen[bytes]


@contextmanager
def lab_server(folder: Path, dsn: str) -> Iterator[LabServer]:
    """Start ``jupyter lab`` on 127.0.0.1 with isolated directories; stop it on exit."""
    root = folder / "notebooks"
    settings = folder / "settings"
    write_lab_settings(settings)
    token = secrets.token_hex(16)
    env = dict(
        os.environ,
        PGSKEWER_DSN=dsn,
        JUPYTER_CONFIG_DIR=str(folder / "config"),
        JUPYTER_DATA_DIR=str(folder / "data"),
        JUPYTER_RUNTIME_DIR=str(folder / "runtime"),
        JUPYTERLAB_SETTINGS_DIR=str(settings),
        JUPYTERLAB_WORKSPACES_DIR=str(folder / "workspaces"),
        JUPYTER_PLATFORM_DIRS="1",
        IPYTHONDIR=str(folder / "ipython"),
    )
    command = [
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
    ]
    log_path = folder / "server.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=root)
    url: str | None = None
    try:
        url = wait_for_server(log_path, token, process)
        yield LabServer(url, token, process)
    finally:
        stop_server(process, url, token)


def wait_for_server(log_path: Path, token: str, process: subprocess.Popen[bytes]) -> str:
    """Return the server's base URL once ``/api/status`` responds."""
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise BenchmarkError(f"jupyter lab exited: {log_path.read_text()[-2000:]}")
        found = re.search(r"http://127\.0\.0\.1:(\d+)/", log_path.read_text())
        if found:
            url = f"http://127.0.0.1:{found.group(1)}"
            request = urllib.request.Request(
                f"{url}/api/status", headers={"Authorization": f"token {token}"}
            )
            try:
                with urllib.request.urlopen(request, timeout=2):
                    return url
            except OSError:
                pass
        time.sleep(0.2)
    raise BenchmarkError(
        f"jupyter lab did not respond within {STARTUP_TIMEOUT:.0f} s: "
        + log_path.read_text()[-2000:]
    )


def stop_server(process: subprocess.Popen[bytes], url: str | None, token: str) -> None:
    """Shut the server and its kernels down through the API, then kill it by PID if needed."""
    if url is not None and process.poll() is None:
        request = urllib.request.Request(
            f"{url}/api/shutdown", method="POST", headers={"Authorization": f"token {token}"}
        )
        try:
            urllib.request.urlopen(request, timeout=5).close()
        except OSError as exc:
            print(f"shutting jupyter lab down through its API failed: {exc}", file=sys.stderr)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        print(f"jupyter lab (PID {process.pid}) did not stop in 20 s; killing it", file=sys.stderr)
        process.kill()
        process.wait(timeout=10)


# -- CPU sampling -------------------------------------------------------------------------


class CpuSampler:
    """Samples cumulative CPU seconds of the server, kernel, unblock child and Chromium.

    Processes are grouped by ancestry: the server is the process this script started, the
    kernel is the server's child, the ``unblock`` children are the kernel's descendants,
    and Chromium is every ``chrom*`` descendant of this script. A process that exits keeps
    the CPU time it had at its last sample, so a group's total never decreases.
    """

    GROUPS = ("jupyter server", "kernel", "unblock child", "chromium")

    def __init__(self, server_pid: int) -> None:
        import psutil

        self._psutil = psutil
        self._server = psutil.Process(server_pid)
        self._me = psutil.Process()
        self._last_seen: dict[int, tuple[str, float]] = {}
        self.samples: list[tuple[float, dict[str, float]]] = []

    def sample(self) -> None:
        self._record(self._server, "jupyter server")
        server_tree = {self._server.pid}
        for kernel in self._children(self._server, recursive=False):
            server_tree.add(kernel.pid)
            self._record(kernel, "kernel")
            for child in self._children(kernel, recursive=True):
                server_tree.add(child.pid)
                self._record(child, "unblock child")
        for process in self._children(self._me, recursive=True):
            if process.pid in server_tree:
                continue
            try:
                if process.name().startswith("chrom"):
                    self._record(process, "chromium")
            except self._psutil.Error:
                continue
        totals = dict.fromkeys(self.GROUPS, 0.0)
        for group, seconds in self._last_seen.values():
            totals[group] += seconds
        self.samples.append((time.time(), totals))

    def percent(self, group: str, start: float, end: float) -> float | None:
        """Return the group's CPU use between two ``time.time()`` values, in % of one core."""
        before = [s for s in self.samples if s[0] <= start]
        after = [s for s in self.samples if s[0] >= end]
        if not before or not after:
            return None
        first, last = before[-1], after[0]
        return 100.0 * (last[1][group] - first[1][group]) / (last[0] - first[0])

    def _children(self, process: Any, recursive: bool) -> list[Any]:
        try:
            return list(process.children(recursive=recursive))
        except self._psutil.Error:
            return []

    def _record(self, process: Any, group: str) -> None:
        try:
            times = process.cpu_times()
        except self._psutil.Error:
            return
        self._last_seen[process.pid] = (group, float(times.user + times.system))


# -- driving the notebook -----------------------------------------------------------------


def run_notebook(
    server: LabServer, profile: Path, sampler: CpuSampler, deadline: float
) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Run every cell in Chromium; return the page's records and the cells' reports."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(profile),
            executable_path=str(CHROMIUM),
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1280, "height": 1400},
        )
        try:
            # Only the local server: any other request is aborted before it leaves.
            context.route(re.compile(r"^(?!http://127\.0\.0\.1[:/]).*"), lambda r: r.abort())
            page = context.new_page()
            page.goto(f"{server.url}/lab/tree/bench.ipynb?reset&token={server.token}")
            page.wait_for_function(KERNEL_IDLE, timeout=STARTUP_TIMEOUT * 1000)
            page.evaluate(INSTRUMENT_PAGE)
            # The command's promise resolves only after every cell ran, so do not return it.
            page.evaluate("() => { window.jupyterapp.commands.execute('notebook:run-all-cells'); }")
            reports = wait_for_reports(page, sampler, deadline)
            # The pump may render a finished run again up to 2 s later (FINAL_LOG_GRACE).
            settle = time.monotonic() + 3.0
            while time.monotonic() < settle:
                sampler.sample()
                time.sleep(SAMPLE_INTERVAL)
            records: dict[str, Any] = page.evaluate("() => window.__pgsBench")
        finally:
            context.close()
    return records, reports


def wait_for_reports(page: Page, sampler: CpuSampler, deadline: float) -> dict[str, dict[str, Any]]:
    """Poll the cells' outputs until both steps reported; raise on a cell error or timeout."""
    while True:
        sampler.sample()
        outputs = page.evaluate(CELL_OUTPUTS)
        if outputs["errors"]:
            raise BenchmarkError("a notebook cell failed:\n" + "\n".join(outputs["errors"]))
        reports: dict[str, dict[str, Any]] = {}
        for text in outputs["texts"]:
            for line in text.splitlines():
                if line.startswith(REPORT_MARKER):
                    report = json.loads(line[len(REPORT_MARKER) :])
                    reports[report["label"]] = report
        if {"quiet", "chatty"} <= reports.keys():
            return reports
        if time.monotonic() > deadline:
            raise BenchmarkError(f"the notebook did not finish in time; reports so far: {reports}")
        time.sleep(SAMPLE_INTERVAL)


# -- figures ------------------------------------------------------------------------------


@dataclasses.dataclass
class LogSample:
    """One change of a widget's log view as the page saw it."""

    page_ms: float
    newest_seq: int
    newest_stamp: float
    lines_shown: int

    @property
    def lag_ms(self) -> float:
        return self.page_ms - self.newest_stamp * 1000.0


def log_samples(records: dict[str, Any], name: str) -> list[LogSample]:
    """Return the log view changes of the widget whose title names ``name``."""
    samples = []
    for page_ms, title, newest, _oldest, shown in records["log"]:
        if f" · {name} (" not in title:
            continue
        found = LINE_PATTERN.search(newest)
        if found is None:
            continue
        samples.append(LogSample(page_ms, int(found[1]), float(found[2]), int(shown)))
    return samples


def median_of(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def phase_figures(
    name: str, records: dict[str, Any], report: dict[str, Any], sampler: CpuSampler
) -> dict[str, Any]:
    """Compute the figures of one step from the page records and the cell's report."""
    samples = log_samples(records, name)
    written = report["result"] or {}
    total = int(written.get("lines", 0))
    figures: dict[str, Any] = {
        "status": report["status"],
        "lines written": total,
    }
    if written.get("first") is not None and total > 1:
        emitted = float(written["last"]) - float(written["first"])
        figures["lines written/s"] = (total - 1) / emitted if emitted > 0 else None
    if len(samples) < 2:
        figures["log view updates"] = len(samples)
        return figures

    start, end = samples[0].page_ms, samples[-1].page_ms
    seconds = (end - start) / 1000.0
    in_window = [m for m in records["iopub"] if start <= m[0] <= end]
    comm = [m for m in in_window if m[1] == "comm_msg"]
    parts = [p for p in records["parts"] if start <= p[0] <= end and f" · {name} (" in p[1]]
    distinct = samples[0].lines_shown + sum(
        min(b.newest_seq - a.newest_seq, b.lines_shown) for a, b in itertools.pairwise(samples)
    )
    lags = sorted(s.lag_ms for s in samples)
    early = [s.lag_ms for s in samples if s.page_ms <= start + EDGE_SECONDS * 1000]
    late = [s.lag_ms for s in samples if s.page_ms >= end - EDGE_SECONDS * 1000]
    last = samples[-1]
    frames = [f for f in records["longFrames"] if start <= f[0] <= end]

    figures.update(
        {
            "seconds with lines shown": seconds,
            "comm messages/s (page)": len(comm) / seconds,
            "widget value KB/s (page)": sum(m[2] for m in comm) / 1024 / seconds,
            "log view updates/s": sum(1 for p in parts if p[2] == "log") / seconds,
            "all widget part updates/s": len(parts) / seconds,
            "stream messages/s (page)": sum(1 for m in in_window if m[1] == "stream") / seconds,
            "newest line advance, lines/s": (last.newest_seq - samples[0].newest_seq) / seconds,
            "distinct lines shown/s": distinct / seconds,
            "lines in view (last update)": last.lines_shown,
            "lag median ms": statistics.median(lags),
            "lag p95 ms": percentile(lags, 95.0),
            "lag max ms": lags[-1],
            f"lag median, first {EDGE_SECONDS:g} s, ms": median_of(early),
            f"lag median, last {EDGE_SECONDS:g} s, ms": median_of(late),
            "last line shown": "yes" if last.newest_seq == total - 1 else f"no ({last.newest_seq})",
            "animation frames > 100 ms": sum(1 for f in frames if f[1] > 100),
        }
    )
    for group in CpuSampler.GROUPS:
        figures[f"CPU % {group}"] = sampler.percent(group, start / 1000.0, end / 1000.0)
    return figures


def print_figures(phases: dict[str, dict[str, Any]]) -> None:
    names = list(phases)
    keys: list[str] = []
    for figures in phases.values():
        keys.extend(key for key in figures if key not in keys)
    rows = [[key, *(_format(phases[name].get(key)) for name in names)] for key in keys]
    print_table("Notebook widget under a chatty step", ["figure", *names], rows)


def _format(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.1f}" if abs(value) >= 10 else f"{value:.2f}"
    return str(value)


# -- main ---------------------------------------------------------------------------------


def check_tools() -> None:
    """Raise when Chromium, Playwright, JupyterLab or psutil is missing."""
    missing = []
    if not CHROMIUM.exists():
        missing.append(f"Chromium at {CHROMIUM} (apt-get install chromium)")
    for module in ("playwright", "jupyterlab", "ipywidgets", "psutil", "nbformat"):
        try:
            __import__(module)
        except ImportError:
            missing.append(f"the {module} package")
    if missing:
        raise BenchmarkError("the widget benchmark needs " + " and ".join(missing))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--seconds",
        type=float,
        default=10.0,
        help="seconds each step prints (default: 10); a step stores at most 100,000 lines",
    )
    parser.add_argument(
        "--rate",
        type=int,
        default=10_000,
        help="lines per second of the chatty step (default: 10000)",
    )
    args = parser.parse_args()
    if not 1 <= args.seconds <= 60 or not QUIET_RATE <= args.rate <= 100_000:
        parser.error("use --seconds between 1 and 60 and --rate between 10 and 100000")

    check_tools()
    load = os.getloadavg()
    print(
        f"Python {sys.version.split()[0]}, {os.cpu_count()} CPUs, load average "
        f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f} at start; quiet step {QUIET_RATE} "
        f"lines/s, chatty step {args.rate} lines/s, {args.seconds:g} s each",
        flush=True,
    )
    folder = Path(tempfile.mkdtemp(prefix="pgskewer-bench-widget-"))
    try:
        (folder / "notebooks").mkdir()
        write_notebook(folder / "notebooks" / "bench.ipynb", args.seconds, args.rate)
        with bench_database() as dsn, lab_server(folder, dsn) as server:
            sampler = CpuSampler(server.process.pid)
            deadline = time.monotonic() + 2 * args.seconds + 150
            records, reports = run_notebook(server, folder / "chromium-profile", sampler, deadline)
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    phases = {
        name: phase_figures(name, records, reports[name], sampler) for name in ("quiet", "chatty")
    }
    for name in phases:
        cpu = reports[name]["kernel_cpu_s"] / reports[name]["wall_s"] * 100
        phases[name]["kernel CPU % while the cell waited"] = cpu
    print_figures(phases)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchmarkError as exc:
        print(f"bench_widget: {exc}", file=sys.stderr)
        sys.exit(1)
