"""The quick-start demo on the embedded server: a clean run, a rerun, and a run after a kill."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "examples" / "quickstart.py"

pytestmark = pytest.mark.embedded


@pytest.fixture
def data_dir() -> Iterator[Path]:
    base = Path("/var/lib/pgskewer") if os.geteuid() == 0 else Path.home() / ".cache" / "pgskewer"
    path = base / f"demo-{uuid.uuid4().hex[:8]}"
    yield path
    _stop_postmasters(path)
    shutil.rmtree(path, ignore_errors=True)


def _environment(data_dir: Path) -> dict[str, str]:
    environment = {
        key: value
        for key, value in os.environ.items()
        if key not in ("PGSKEWER_DSN", "DATABASE_URL") and not key.startswith("PG")
    }
    environment["PGSKEWER_DATA_DIR"] = str(data_dir)
    return environment


def _run_demo(data_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(DEMO)],
        env=_environment(data_dir),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _postmasters(data_dir: Path) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["name", "cmdline"]):
        cmdline = process.info["cmdline"] or []
        if process.info["name"] == "postgres" and str(data_dir) in " ".join(cmdline):
            if process.ppid() == 1 or "-D" in cmdline:
                found.append(process)
    return [process for process in found if _is_postmaster(process)]


def _is_postmaster(process: psutil.Process) -> bool:
    try:
        parent = process.parent()
    except psutil.Error:
        return False
    return parent is None or parent.name() != "postgres"


def _stop_postmasters(data_dir: Path) -> None:
    for process in _postmasters(data_dir):
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=10)
        except psutil.TimeoutExpired:
            process.kill()


def test_demo_prints_results(data_dir: Path) -> None:
    completed = _run_demo(data_dir)

    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert "step 3 store_results  successful" in completed.stdout
    assert '"stored": 3' in completed.stdout
    assert "embedded" in completed.stderr
    assert "127.0.0.1:5432" not in completed.stderr


def test_demo_rerun_reuses_data_folder(data_dir: Path) -> None:
    first = _run_demo(data_dir)
    second = _run_demo(data_dir)

    assert first.returncode == 0, first.stderr
    assert second.returncode == 0, second.stderr
    assert "warm start" in second.stderr or "attached" in second.stderr
    assert "enqueued my_pipeline as run 1\n" in first.stdout
    assert "enqueued my_pipeline as run 1\n" not in second.stdout


def test_demo_after_sigkill_leaves_one_postmaster(data_dir: Path) -> None:
    process = subprocess.Popen(
        [sys.executable, str(DEMO)],
        env=_environment(data_dir),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert process.stdout is not None
        deadline = time.monotonic() + 60
        for line in process.stdout:
            if "running" in line or time.monotonic() > deadline:
                break
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)

    rerun = _run_demo(data_dir)

    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert len(_postmasters(data_dir)) <= 1
