"""Helpers of the fault tests: worker subprocesses and a database prepared for them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.faults.worker_app import EXECUTIONS_DDL

WORKER_APP = Path(__file__).with_name("worker_app.py")
REPO_ROOT = Path(__file__).parents[2]


class WorkerProcesses:
    """Worker subprocesses running ``worker_app.py``; every one is killed at the end."""

    def __init__(self, dsn: str, log_dir: Path) -> None:
        self.dsn = dsn
        self.log_dir = log_dir
        self.processes: list[subprocess.Popen[bytes]] = []
        self._count = 0

    def start(self, *arguments: str) -> subprocess.Popen[bytes]:
        self._count += 1
        log = open(self.log_dir / f"worker-{self._count}.log", "wb")
        environment = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
        process = subprocess.Popen(
            [sys.executable, str(WORKER_APP), self.dsn, *arguments],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=environment,
        )
        log.close()
        self.processes.append(process)
        return process

    def alive(self) -> list[subprocess.Popen[bytes]]:
        return [process for process in self.processes if process.poll() is None]

    def kill(self, process: subprocess.Popen[bytes]) -> None:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)

    def stop_all(self) -> None:
        for process in self.alive():
            process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)

    def logs(self) -> str:
        parts = []
        for path in sorted(self.log_dir.glob("worker-*.log")):
            parts.append(f"--- {path.name}\n{path.read_text(errors='replace')[-4000:]}")
        return "\n".join(parts)


@pytest.fixture
def workers(dsn: str, tmp_path: Path) -> Iterator[WorkerProcesses]:
    """Worker subprocesses on the test database; all are stopped after the test."""
    processes = WorkerProcesses(dsn, tmp_path)
    try:
        yield processes
    finally:
        processes.stop_all()


@pytest.fixture
async def client(dsn: str) -> AsyncIterator[Any]:
    """An installed queuer that enqueues and waits, with the pipeline ``three`` defined."""
    queuer = await prepared_client(dsn)
    try:
        yield queuer
    finally:
        await queuer.close()


async def prepared_client(dsn: str) -> Any:
    """Return a connected queuer with the schema, the side table and ``three`` defined."""
    from pgskewer import connect

    queuer = await connect(dsn)
    await queuer.install()
    async with queuer.pool.acquire() as connection:
        await connection.execute(EXECUTIONS_DDL)

    async def unused(_job: Any) -> None:
        raise AssertionError("the client queuer runs no step")

    for name in ("s1", "s2", "s3", "blocker", "chatty"):
        queuer.entrypoint(name)(unused)
    queuer.entrypoint_pipeline("three", "s1", "s2", "s3")
    return queuer


async def wait_no_picked_jobs(connection: Any, timeout: float = 15.0) -> int:
    """Return how many jobs are still ``picked`` once none is, or after ``timeout``.

    A finished run's last job stays ``picked`` until pgqueuer's status buffer is flushed,
    about 0.1 s after the step stored its outcome.
    """
    import asyncio
    import time

    deadline = time.monotonic() + timeout
    while True:
        picked = int(
            await connection.fetchval("SELECT count(*) FROM pgqueuer WHERE status = 'picked'")
        )
        if picked == 0 or time.monotonic() > deadline:
            return picked
        await asyncio.sleep(0.1)


class TemporaryCluster:
    """A PostgreSQL cluster made with ``initdb`` in a temporary folder, run by ``pg_ctl``.

    As root, the cluster runs as the ``postgres`` system user because PostgreSQL refuses
    to run as root. It listens on 127.0.0.1 only, with trust authentication.
    """

    def __init__(self, bin_dir: Path, base: Path, user: str | None) -> None:
        self.bin_dir = bin_dir
        self.base = base
        self.data = base / "data"
        self.user = user
        self.port = _free_port()

    @property
    def admin_dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *command: str) -> None:
        options: dict[str, Any] = {}
        if self.user:
            # subprocess switches the user itself, so no runuser or sudo has to be on PATH.
            import pwd

            entry = pwd.getpwnam(self.user)
            options = {
                "user": entry.pw_uid,
                "group": entry.pw_gid,
                "extra_groups": [],
                "cwd": self.base,
            }
        subprocess.run(list(command), check=True, capture_output=True, timeout=120, **options)

    def init(self) -> None:
        self._run(
            str(self.bin_dir / "initdb"),
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "--auth=trust",
            "--no-sync",
        )

    def start(self) -> None:
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.base} -c fsync=off "
            "-c max_connections=100"
        )
        self._run(
            str(self.bin_dir / "pg_ctl"),
            "-D",
            str(self.data),
            "-l",
            str(self.base / "log"),
            "-o",
            options,
            "-w",
            "start",
        )

    def restart(self) -> None:
        self._run(
            str(self.bin_dir / "pg_ctl"),
            "-D",
            str(self.data),
            "-l",
            str(self.base / "log"),
            "-m",
            "fast",
            "-w",
            "restart",
        )

    def stop(self) -> None:
        self._run(
            str(self.bin_dir / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop"
        )


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _postgres_bin_dir() -> Path | None:
    import shutil

    found = shutil.which("pg_ctl")
    if found is not None:
        return Path(found).resolve().parent
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
    return candidates[-1].parent if candidates else None


@pytest.fixture
def temporary_cluster() -> Iterator[TemporaryCluster]:
    """A PostgreSQL cluster of this test alone, which the test may restart."""
    import pwd
    import shutil
    import tempfile

    bin_dir = _postgres_bin_dir()
    if bin_dir is None or not (bin_dir / "initdb").exists():
        pytest.skip("initdb and pg_ctl are not installed")
    user = None
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and no 'postgres' user exists to own a cluster")
        user = "postgres"

    base = Path(tempfile.mkdtemp(prefix="pgskewer-cluster-"))
    if user is not None:
        shutil.chown(base, user=user)
    cluster = TemporaryCluster(bin_dir, base, user)
    try:
        cluster.init()
        cluster.start()
        yield cluster
    finally:
        try:
            cluster.stop()
        except subprocess.CalledProcessError:
            pass  # it never started
        shutil.rmtree(base, ignore_errors=True)
