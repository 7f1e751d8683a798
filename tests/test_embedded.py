"""The embedded server against real PostgreSQL processes, with nothing mocked.

All tests share one short data folder, removed at the end after its postmaster is gone.
Each test stops the servers it starts, so the next test starts warm.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import psutil
import pytest

from pgskewer.dsn import describe_dsn
from pgskewer.embedded import EmbeddedServer, default_data_dir

pytestmark = pytest.mark.embedded

IS_ROOT = os.geteuid() == 0

# Run in a child process: attach to the server and print a JSON report. With the "hold"
# argument the child then waits until its stdin closes or it is killed.
CHILD_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    from pgskewer.embedded import EmbeddedServer

    server = EmbeddedServer(sys.argv[1])
    server.start()
    handles = json.loads((server.pgdata / ".handle_pids.json").read_text())
    postmaster_pid = int((server.pgdata / "postmaster.pid").read_text().split()[0])
    print(json.dumps({"pid": os.getpid(), "postmaster": postmaster_pid, "handles": handles}))
    sys.stdout.flush()
    if sys.argv[2] == "hold":
        sys.stdin.read()
    """
)


@pytest.fixture(scope="module")
def data_dir() -> Iterator[Path]:
    """A short, new data folder, removed at the end after its postmaster is ended by PID."""
    if IS_ROOT:
        base = Path("/var/lib/pgskewer")
        base.mkdir(parents=True, exist_ok=True)
        path = base / f"t-{uuid.uuid4().hex[:8]}"
    else:
        path = Path(tempfile.mkdtemp(prefix="pgsk-")) / "d"

    yield path

    pgdata = path / "pg18"
    for process in postmasters_of(pgdata):
        process.terminate()
        process.wait(10)
    shutil.rmtree(path, ignore_errors=True)


def postmasters_of(pgdata: Path) -> list[psutil.Process]:
    """Every live postmaster started with ``-D pgdata``. Backends have another command line."""
    found = []
    for process in psutil.process_iter(["name", "cmdline", "status"]):
        cmdline = process.info["cmdline"] or []
        if process.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        if process.info["name"] == "postgres" and str(pgdata) in cmdline:
            found.append(process)
    return found


def postmaster_pid(pgdata: Path) -> int:
    return int((pgdata / "postmaster.pid").read_text().split()[0])


def handle_pids(pgdata: Path) -> list[int]:
    text = (pgdata / ".handle_pids.json").read_text().strip()
    return json.loads(text) if text else []


def run_child(data_dir: Path, mode: str) -> tuple[subprocess.Popen[str], dict[str, object]]:
    """Start a Python child that attaches to ``data_dir`` and return it with its report."""
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD_SCRIPT, str(data_dir), mode],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    line = child.stdout.readline()
    assert line, f"child exited with code {child.wait(10)} before reporting"
    return child, json.loads(line)


async def select_and_notify(dsn: str) -> tuple[int, str]:
    listener = await asyncpg.connect(dsn, timeout=10)
    sender = await asyncpg.connect(dsn, timeout=10)
    try:
        value = await listener.fetchval("SELECT 1")
        received: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        await listener.add_listener("pgskewer_test", lambda *args: received.set_result(args[3]))
        await sender.execute("NOTIFY pgskewer_test, 'hello'")
        payload = await asyncio.wait_for(received, 5)
        return value, payload
    finally:
        await listener.close()
        await sender.close()


def test_start_connect_listen_notify(data_dir: Path) -> None:
    with EmbeddedServer(data_dir) as server:
        value, payload = asyncio.run(select_and_notify(server.dsn))

        assert value == 1
        assert payload == "hello"
        assert server.dsn.startswith("postgresql://postgres:@/postgres?host=")
        assert describe_dsn(server.dsn) == f"embedded server in {server.pgdata}"


def test_server_listens_on_socket_only(data_dir: Path) -> None:
    with EmbeddedServer(data_dir) as server:
        process = psutil.Process(postmaster_pid(server.pgdata))
        tcp = [c for c in process.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]

        assert tcp == []
        assert (server.pgdata / ".s.PGSQL.5432").is_socket()


def test_start_twice_is_idempotent(data_dir: Path) -> None:
    server = EmbeddedServer(data_dir)
    try:
        first = server.start()
        pid = postmaster_pid(server.pgdata)
        second = server.start()

        assert second == first
        assert postmaster_pid(server.pgdata) == pid
        assert handle_pids(server.pgdata).count(os.getpid()) == 1
    finally:
        server.stop()
        server.stop()

    assert postmasters_of(server.pgdata) == []
    with pytest.raises(RuntimeError, match="not started"):
        _ = server.dsn


def test_two_objects_share_one_attachment(data_dir: Path) -> None:
    first = EmbeddedServer(data_dir)
    second = EmbeddedServer(data_dir)
    first.start()
    second.start()
    pid = postmaster_pid(first.pgdata)

    first.stop()
    assert psutil.pid_exists(pid)
    assert os.getpid() in handle_pids(first.pgdata)

    second.stop()
    assert postmasters_of(first.pgdata) == []


def test_second_process_attaches(data_dir: Path) -> None:
    with EmbeddedServer(data_dir) as server:
        pid = postmaster_pid(server.pgdata)

        child, report = run_child(data_dir, "exit")
        child.wait(30)

        assert report["postmaster"] == pid
        assert report["handles"] == [os.getpid(), report["pid"]]
        assert child.returncode == 0
        # The child left first, so the server must still run for this process.
        assert postmaster_pid(server.pgdata) == pid
        assert psutil.Process(pid).is_running()
        assert handle_pids(server.pgdata) == [os.getpid()]


def test_sigkilled_owner_is_pruned(data_dir: Path) -> None:
    pgdata = data_dir / "pg18"
    assert postmasters_of(pgdata) == [], "a previous test left the server running"

    owner, owner_report = run_child(data_dir, "hold")
    owner.send_signal(signal.SIGKILL)
    owner.wait(10)
    orphan_pid = owner_report["postmaster"]

    # The killed owner could not detach: its PID is still listed and the server runs on.
    assert handle_pids(pgdata) == [owner_report["pid"]]
    assert psutil.pid_exists(orphan_pid)

    successor, report = run_child(data_dir, "exit")
    successor.wait(30)

    assert successor.returncode == 0
    assert report["postmaster"] == orphan_pid
    assert report["handles"] == [report["pid"]]
    assert owner_report["pid"] not in handle_pids(pgdata)
    # The successor was the only live holder, so its exit stopped the server.
    assert postmasters_of(pgdata) == []


def test_sigkilled_owner_then_start_here(data_dir: Path) -> None:
    pgdata = data_dir / "pg18"
    owner, owner_report = run_child(data_dir, "hold")
    owner.send_signal(signal.SIGKILL)
    owner.wait(10)

    with EmbeddedServer(data_dir) as server:
        running = postmasters_of(pgdata)
        value, _ = asyncio.run(select_and_notify(server.dsn))

        assert [process.pid for process in running] == [owner_report["postmaster"]]
        assert postmaster_pid(pgdata) == owner_report["postmaster"]
        assert handle_pids(pgdata) == [os.getpid()]
        assert value == 1

    assert postmasters_of(pgdata) == []


def test_stale_postmaster_pid_spares_process(
    data_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("WARNING", logger="pgskewer")
    pgdata = data_dir / "pg18"
    creator = EmbeddedServer(data_dir)
    creator.start()  # creates the cluster if an earlier test did not
    creator.stop()
    assert postmasters_of(pgdata) == []

    unrelated = subprocess.Popen(["sleep", "60"])
    try:
        # A complete postmaster.pid for this folder, but naming an unrelated live process.
        lines = [str(unrelated.pid), str(pgdata), "1700000000", "5432", str(pgdata), "", "0 0"]
        lines.append("ready")
        (pgdata / "postmaster.pid").write_text("\n".join(lines) + "\n")

        with EmbeddedServer(data_dir) as server:
            value, _ = asyncio.run(select_and_notify(server.dsn))
            new_pid = postmaster_pid(pgdata)

            assert value == 1
            assert new_pid != unrelated.pid
            assert f"pid {unrelated.pid} is another live process" in caplog.text

        assert unrelated.poll() is None, "the unrelated process was killed"
    finally:
        unrelated.kill()
        unrelated.wait()

    for process in postmasters_of(pgdata):
        pytest.fail(f"postmaster {process.pid} still runs after the last stop")


def test_too_long_path_rejected(tmp_path: Path) -> None:
    data_dir = tmp_path / ("x" * 100)

    with pytest.raises(ValueError, match="too long") as raised:
        EmbeddedServer(data_dir).start()

    assert str(data_dir) in str(raised.value)
    assert "shorter data folder" in str(raised.value)
    assert not data_dir.exists()


@pytest.mark.skipif(not IS_ROOT, reason="the /root check applies to root only")
def test_root_home_rejected_as_root() -> None:
    data_dir = Path("/root") / f"pgskewer-t-{uuid.uuid4().hex[:8]}"

    with pytest.raises(ValueError, match="/var/lib/pgskewer") as raised:
        EmbeddedServer(data_dir).start()

    assert str(data_dir) in str(raised.value)
    assert not data_dir.exists()


def test_default_data_dir_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGSKEWER_DATA_DIR", "/srv/pgskewer-data")

    assert default_data_dir() == Path("/srv/pgskewer-data")


def test_default_data_dir_without_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PGSKEWER_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", "/srv/xdg")

    expected = Path("/var/lib/pgskewer") if IS_ROOT else Path("/srv/xdg/pgskewer")
    assert default_data_dir() == expected


def test_start_logs_kind_and_folder(data_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="pgskewer")

    with EmbeddedServer(data_dir) as server:
        pass

    messages = [record.getMessage() for record in caplog.records if record.name == "pgskewer"]
    assert any(f"{server.pgdata}: warm start in" in message for message in messages)
    assert any(f"stopped embedded PostgreSQL in {server.pgdata}" in m for m in messages)
