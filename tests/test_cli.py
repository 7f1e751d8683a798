"""The ``pgskewer`` command, run as a real subprocess against real PostgreSQL servers.

Tests that touch a database run twice: on the system server and on the embedded one.
Every DSN carries the password ``s3cr3t-SENTINEL`` (both servers use trust
authentication, so any password is accepted), and no output may contain it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest

SENTINEL = "s3cr3t-SENTINEL"
UNREACHABLE_DSN = f"postgresql://someone:{SENTINEL}@127.0.0.1:1/nowhere"
COMMAND_TIMEOUT = 30.0

WORKER_MODULE = """
import sys
from pathlib import Path

import anyio

from pgskewer import ImprovedQueuer, parse_payload

MARKERS = Path(__file__).parent / "markers"
MARKERS.mkdir(exist_ok=True)

pgq = ImprovedQueuer()
not_a_queuer = 42


def needs_arguments(value):
    return pgq


async def build():
    return pgq


def _input(job):
    data = parse_payload(job.payload)
    if isinstance(data, dict) and "initial" in data:
        return data["initial"]
    return data


@pgq.entrypoint("double", capture_output=True)
async def double(job):
    value = _input(job)["x"]
    print("doubling", value)
    print("warning on stderr", file=sys.stderr)
    return value * 2


@pgq.entrypoint("add_one")
async def add_one(job):
    return parse_payload(job.payload)["tasks"]["double"]["result"] + 1


@pgq.entrypoint("fail")
async def fail(job):
    raise ValueError("boom")


@pgq.entrypoint("slow")
async def slow(job):
    # A task run's id is the id of its job, so the test can find the marker of a run.
    (MARKERS / str(job.id)).touch()
    await anyio.sleep(float(parse_payload(job.payload)))
    return "done"


pgq.entrypoint_pipeline("pipe", "double", "add_one")
"""


# -- helpers -----------------------------------------------------------------------


def clean_env(**extra: str) -> dict[str, str]:
    """Return this environment without any database variables, plus ``extra``."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("PGSKEWER_DSN", "DATABASE_URL") and not key.startswith("PG")
    }
    env.update(extra)
    return env


def pgskewer(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m pgskewer ARGS`` to completion and return its output."""
    return subprocess.run(
        [sys.executable, "-m", "pgskewer", *args],
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
        cwd=cwd,
        env=env if env is not None else clean_env(),
    )


def assert_clean_error(done: subprocess.CompletedProcess[str], code: int) -> str:
    """Check an expected error: the exit code, one line on stderr, no traceback or secret."""
    assert done.returncode == code, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("pgskewer: error:")]
    assert len(errors) == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert SENTINEL not in done.stdout + done.stderr
    return errors[0]


def wait_until(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll ``condition`` until it returns a true value, failing after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def with_sentinel_password(dsn: str) -> str:
    """Return ``dsn`` with the sentinel password for its user."""
    parts = urlsplit(dsn)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username}:{SENTINEL}@{host}"))


def stop_process(process: subprocess.Popen[Any]) -> None:
    """End ``process`` by its pid: SIGTERM, then SIGKILL if it is still running."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


class Worker:
    """A ``pgskewer worker`` subprocess with its output in files."""

    def __init__(self, folder: Path, dsn: str, *options: str) -> None:
        self.folder = folder
        self.stderr_path = folder / f"worker-{time.monotonic_ns()}.err"
        with self.stderr_path.open("w") as stderr:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "pgskewer", "worker", *options, "--dsn", dsn],
                cwd=folder,
                env=clean_env(),
                stdout=subprocess.DEVNULL,
                stderr=stderr,
            )

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def wait_started(self, count: int = 1) -> None:
        wait_until(
            lambda: self.stderr.count(" started: ") >= count or self.process.poll() is not None,
            COMMAND_TIMEOUT,
            "the worker to start",
        )
        assert self.process.poll() is None, self.stderr

    def marker(self, run_id: int) -> Path:
        return self.folder / "markers" / str(run_id)


# -- fixtures ----------------------------------------------------------------------


@pytest.fixture(params=["system", "embedded"])
def database(request: pytest.FixtureRequest) -> str:
    """A fresh database's DSN with the sentinel password, on each of the two servers."""
    dsn: str = request.getfixturevalue("dsn" if request.param == "system" else "embedded_dsn")
    return with_sentinel_password(dsn)


@pytest.fixture
def installed(database: str) -> str:
    """A DSN whose database has the schema installed."""
    done = pgskewer("install", "--dsn", database)
    assert done.returncode == 0, done.stderr
    return database


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A folder containing ``mod.py``, the module the worker tests run."""
    (tmp_path / "mod.py").write_text(textwrap.dedent(WORKER_MODULE))
    return tmp_path


@pytest.fixture
def worker(project: Path, database: str) -> Iterator[Worker]:
    """A running ``pgskewer worker mod:pgq --install``, stopped at the end of the test."""
    started = Worker(project, database, "mod:pgq", "--install", "--grace", "1.5")
    try:
        started.wait_started()
        yield started
    finally:
        stop_process(started.process)


# -- install and schema ------------------------------------------------------------


def test_install_reports_change(database: str) -> None:
    first = pgskewer("install", "--dsn", database)
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == "schema installed or upgraded"
    assert "pgskewer uses the" in first.stderr
    assert SENTINEL not in first.stdout + first.stderr

    again = pgskewer("install", env=clean_env(PGSKEWER_DSN=database))
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == "schema already up to date"
    assert SENTINEL not in again.stdout + again.stderr


def test_schema_missing_exit_code(database: str) -> None:
    done = pgskewer("status", "--dsn", database)
    line = assert_clean_error(done, 5)
    assert "pgskewer install" in line


def test_unknown_run_id(installed: str) -> None:
    for command in ("status", "result", "retry"):
        done = pgskewer(command, "987654321", "--dsn", installed)
        line = assert_clean_error(done, 6)
        assert "987654321" in line, command


# -- connection errors -------------------------------------------------------------


def test_unreachable_host() -> None:
    done = pgskewer("status", "--dsn", UNREACHABLE_DSN)
    line = assert_clean_error(done, 4)
    assert "127.0.0.1:1" in line


@pytest.mark.parametrize(
    "bad_dsn",
    [
        f"mysql://someone:{SENTINEL}@127.0.0.1/app",
        "not a dsn",
        f"postgresql://someone:{SENTINEL}@127.0.0.1:notaport/app",
        f"host=127.0.0.1 password='{SENTINEL}",
    ],
)
def test_invalid_dsn(bad_dsn: str) -> None:
    done = pgskewer("runs", "--dsn", bad_dsn)
    assert_clean_error(done, 3)


def test_invalid_dsn_in_environment() -> None:
    done = pgskewer("runs", env=clean_env(DATABASE_URL=f"mysql://a:{SENTINEL}@h/x"))
    line = assert_clean_error(done, 3)
    assert "DATABASE_URL" in line


# -- command line ------------------------------------------------------------------


def test_help_lists_exit_codes() -> None:
    done = pgskewer("--help")
    assert done.returncode == 0
    assert "exit codes:" in done.stdout
    for command in ("install", "worker", "enqueue", "result", "status", "logs", "watch"):
        assert command in done.stdout


def test_usage_error_exit_code() -> None:
    done = pgskewer("result", "not-a-number")
    assert done.returncode == 64
    assert "Traceback" not in done.stderr


def test_enqueue_bad_json() -> None:
    done = pgskewer("enqueue", "double", '{"x": }', "--dsn", UNREACHABLE_DSN)
    line = assert_clean_error(done, 64)
    assert "invalid JSON payload" in line
    assert "column 7 (character 6)" in line


# -- worker target -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("nosuchmodule:pgq", "module 'nosuchmodule' not found"),
        ("mod:missing", "ImprovedQueuer objects in it: pgq"),
        ("mod:not_a_queuer", "is a int, not an ImprovedQueuer"),
        ("mod:needs_arguments", "needs arguments"),
        ("mod", "expected MODULE:ATTR"),
    ],
)
def test_worker_target_errors(project: Path, target: str, expected: str) -> None:
    done = pgskewer("worker", target, "--dsn", UNREACHABLE_DSN, cwd=project)
    line = assert_clean_error(done, 7)
    assert expected in line


def test_worker_requires_database(project: Path) -> None:
    done = pgskewer("worker", "mod:pgq", cwd=project)
    line = assert_clean_error(done, 3)
    assert "--embedded" in line


def test_worker_schema_missing(project: Path, database: str) -> None:
    done = pgskewer("worker", "mod:pgq", "--dsn", database, cwd=project)
    line = assert_clean_error(done, 5)
    assert "pgskewer install" in line


# -- runs --------------------------------------------------------------------------


def test_enqueue_wait_logs_watch(worker: Worker, database: str) -> None:
    done = pgskewer(
        "enqueue", "double", '{"x": 21}', "--wait", "--timeout", "20", "--dsn", database
    )
    assert done.returncode == 0, done.stderr
    run_id = _run_id_line(done.stderr)
    assert int(run_id) > 0
    assert json.loads(done.stdout) == {"status": "successful", "ok": True, "result": 42}

    done = pgskewer("enqueue", "pipe", '{"x": 1}', "--wait", "--timeout", "20", "--dsn", database)
    assert done.returncode == 0, done.stderr
    pipeline = json.loads(done.stdout)
    assert pipeline["ok"] is True
    assert pipeline["result"]["tasks"]["add_one"]["result"] == 3

    done = pgskewer("result", run_id, "--indent", "2", "--dsn", database)
    assert done.returncode == 0, done.stderr
    assert '\n  "ok": true' in done.stdout

    done = pgskewer("logs", run_id, "--dsn", database)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["[1] doubling 21"]
    assert "[1] warning on stderr" in done.stderr.splitlines()

    done = pgskewer("logs", run_id, "--follow", "--step", "1", "--dsn", database)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["[1] doubling 21"]

    done = pgskewer("watch", run_id, "--dsn", database)
    assert done.returncode == 0, done.stderr
    assert "successful" in done.stdout
    assert "doubling 21" in done.stdout

    done = pgskewer("runs", "--name", "double", "--json", "--dsn", database)
    assert done.returncode == 0, done.stderr
    runs = json.loads(done.stdout)
    assert [run["id"] for run in runs] == [int(run_id)]
    assert runs[0]["steps"][0]["status"] == "successful"

    done = pgskewer("status", "--dsn", database)
    assert done.returncode == 0, done.stderr
    assert "runs per entrypoint" in done.stdout
    assert "double" in done.stdout
    assert "pipe" in done.stdout

    done = pgskewer("retry", run_id, "--dsn", database)
    line = assert_clean_error(done, 8)
    assert "only a run that ended exception or canceled" in line
    assert SENTINEL not in worker.stderr


def test_failed_run_status_and_retry(worker: Worker, database: str) -> None:
    run_id = pgskewer("enqueue", "fail", "--dsn", database).stdout.strip()

    done = pgskewer("result", run_id, "--timeout", "20", "--dsn", database)
    assert done.returncode == 1, done.stderr
    result = json.loads(done.stdout)
    assert result["ok"] is False
    assert result["error"]["message"] == "boom"

    done = pgskewer("status", run_id, "--dsn", database)
    assert done.returncode == 0, done.stderr
    assert "exception" in done.stdout
    assert "ValueError: boom" in done.stdout

    done = pgskewer("runs", "--status", "exception", "--dsn", database)
    assert run_id in done.stdout.split()

    done = pgskewer("watch", run_id, "--dsn", database)
    assert done.returncode == 1, done.stderr

    done = pgskewer("retry", run_id, "--dsn", database)
    assert done.returncode == 0, done.stderr
    done = pgskewer("result", run_id, "--timeout", "20", "--dsn", database)
    assert done.returncode == 1, done.stderr

    state = json.loads(pgskewer("status", run_id, "--json", "--dsn", database).stdout)
    assert state["steps"][0]["attempts"] == 2

    done = pgskewer("enqueue", "double", '{"x": 1}', "--wait", "--dsn", database)
    assert done.returncode == 0, done.stderr
    done = pgskewer("retry", _run_id_line(done.stderr), "--dsn", database)
    line = assert_clean_error(done, 8)
    assert "only a run that ended exception or canceled" in line


def test_cancel_and_result_timeout(worker: Worker, database: str) -> None:
    run_id = pgskewer("enqueue", "slow", "60", "--dsn", database).stdout.strip()
    wait_until(worker.marker(int(run_id)).exists, COMMAND_TIMEOUT, "the step to start")

    done = pgskewer("cancel", run_id, "--dsn", database)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-1] in ("canceling", "canceled")
    done = pgskewer("result", run_id, "--timeout", "20", "--dsn", database)
    assert done.returncode == 1, done.stderr
    assert json.loads(done.stdout)["status"] == "canceled"

    queued = pgskewer("enqueue", "nobody_serves_this", "--dsn", database).stdout.strip()
    done = pgskewer("result", queued, "--timeout", "0.3", "--dsn", database)
    line = assert_clean_error(done, 2)
    assert "timed out after 0.3 s" in line

    done = pgskewer("enqueue", "slow", "60", "--dedupe-key", "k", "--dsn", database)
    assert done.returncode == 0, done.stderr
    again = pgskewer("enqueue", "slow", "60", "--dedupe-key", "k", "--dsn", database)
    assert_clean_error(again, 8)


# -- worker processes --------------------------------------------------------------


def test_sigterm_finishes_then_releases(worker: Worker, database: str) -> None:
    # The fixture's grace period is 1.5 s: the 0.3 s step finishes, the 60 s one goes back
    # to the queue for another worker.
    short = pgskewer("enqueue", "slow", "0.3", "--dsn", database).stdout.strip()
    long = pgskewer("enqueue", "slow", "60", "--dsn", database).stdout.strip()
    for run_id in (short, long):
        wait_until(worker.marker(int(run_id)).exists, COMMAND_TIMEOUT, f"run {run_id} to start")

    worker.process.send_signal(signal.SIGTERM)
    assert worker.process.wait(timeout=COMMAND_TIMEOUT) == 0, worker.stderr
    assert "received SIGTERM" in worker.stderr
    assert "1 steps still running after the 1.5s grace period" in worker.stderr

    done = pgskewer("result", short, "--timeout", "5", "--dsn", database)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["result"] == "done"

    pending = pgskewer("result", long, "--timeout", "1", "--dsn", database)
    assert pending.returncode == 2, pending.stderr

    status = pgskewer("status", long, "--json", "--dsn", database)
    assert status.returncode == 0, status.stderr
    [step] = json.loads(status.stdout)["steps"]
    assert step["status"] == "queued"
    assert step["attempts"] == 1


def test_second_signal_exits_at_once(worker: Worker, database: str) -> None:
    run_id = pgskewer("enqueue", "slow", "60", "--dsn", database).stdout.strip()
    wait_until(worker.marker(int(run_id)).exists, COMMAND_TIMEOUT, "the step to start")

    worker.process.send_signal(signal.SIGTERM)
    wait_until(lambda: "received SIGTERM" in worker.stderr, COMMAND_TIMEOUT, "the first signal")
    worker.process.send_signal(signal.SIGINT)
    assert worker.process.wait(timeout=COMMAND_TIMEOUT) == 130, worker.stderr
    assert "second SIGINT" in worker.stderr


def test_processes_start_two_workers(project: Path, database: str) -> None:
    supervisor = Worker(project, database, "mod:build", "--processes", "2", "--install")

    def alive_workers() -> list[dict[str, Any]]:
        done = pgskewer("workers", "--json", "--dsn", database)
        assert done.returncode == 0, done.stderr
        return [row for row in json.loads(done.stdout) if row["alive"]]

    try:
        supervisor.wait_started(count=2)
        workers = wait_until(
            lambda: rows if len(rows := alive_workers()) == 2 else None, 30, "two live workers"
        )
        pids = {row["pid"] for row in workers}
        assert len(pids) == 2
        assert supervisor.process.pid not in pids

        table = pgskewer("workers", "--dsn", database).stdout
        for pid in pids:
            assert str(pid) in table

        done = pgskewer("enqueue", "double", '{"x": 2}', "--wait", "--dsn", database)
        assert done.returncode == 0, done.stderr

        supervisor.process.send_signal(signal.SIGTERM)
        assert supervisor.process.wait(timeout=COMMAND_TIMEOUT) == 0, supervisor.stderr
        assert alive_workers() == []
    finally:
        stop_process(supervisor.process)


def _run_id_line(stderr: str) -> str:
    """Return the run id that ``enqueue --wait`` prints to stderr as ``run N``."""
    [line] = [line for line in stderr.splitlines() if line.startswith("run ")]
    return line.split()[1]


def test_prune_keeps_recent_runs(database: str) -> None:
    assert pgskewer("install", "--dsn", database).returncode == 0

    done = pgskewer("prune", "--older-than", "7d", "--json", "--dsn", database)
    assert done.returncode == 0, done.stderr
    counts = json.loads(done.stdout)
    assert counts["runs"] == 0

    bad = pgskewer("prune", "--older-than", "soon", "--dsn", database)
    assert bad.returncode == 64
    assert "invalid age 'soon'" in bad.stderr
