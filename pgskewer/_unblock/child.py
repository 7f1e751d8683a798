"""Entry point of an ``unblock`` child process, and the wire format both sides share.

The parent starts this file by path (see :data:`BOOTSTRAP`), not as
``pgskewer._unblock.child``, so the child never runs ``pgskewer/__init__.py``. This module
therefore imports only the standard library, and cloudpickle once the child is running.
Nothing defined here may be pickled across the boundary, because the child imports this
module under another name: every message is a tuple of builtins.

File descriptors in the child:

- fd 0 is ``/dev/null``, so a function that reads standard input cannot consume requests.
- fd 1 and fd 2 are the pipes the parent reads as stdout and stderr. Everything written
  to them, by Python or C code or a grandchild process, becomes output of the current call.
- the control socket carries requests from the parent and replies to it. A watchdog
  thread reads it, and when the parent goes away it kills the child's process group.
"""

from __future__ import annotations

import ctypes
import os
import pickle
import queue
import select
import signal
import socket
import struct
import sys
import threading
import traceback
from typing import Any

#: Every frame on the control socket is an unsigned 64-bit big-endian length, then a pickle.
FRAME_HEADER = struct.Struct("!Q")

#: Written to fd 1 and fd 2 after each call, followed by the call's token and a newline.
#: The parent ends a call's output on each stream when it reads this marker.
END_MARKER_PREFIX = b"\x00pgskewer-unblock-end:"

#: Command line that starts a child: ``python -u -c BOOTSTRAP <path> <fd> <parent pid>``.
BOOTSTRAP = (
    "import importlib.util, sys\n"
    "spec = importlib.util.spec_from_file_location('pgskewer_unblock_child', sys.argv[1])\n"
    "module = importlib.util.module_from_spec(spec)\n"
    "spec.loader.exec_module(module)\n"
    "module.main(int(sys.argv[2]), int(sys.argv[3]))\n"
)

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36


def end_marker(token: str) -> bytes:
    """Return the bytes that end the output of the call with ``token`` on one stream."""
    return END_MARKER_PREFIX + token.encode("ascii") + b"\n"


def main(control_fd: int, parent_pid: int) -> None:
    """Serve calls from the parent until it sends ``shutdown`` or goes away."""
    parent_fd = _watch_parent(parent_pid)
    os.set_inheritable(control_fd, False)
    control = socket.socket(fileno=control_fd)
    _replace_stdin_with_devnull()

    # Private copies of the output pipes: the markers go here even when the function
    # redirected fd 1 or fd 2, and the next call gets the pipes back from them.
    output_fds = (os.dup(1), os.dup(2))

    requests: queue.SimpleQueue[tuple[Any, ...] | None] = queue.SimpleQueue()
    watchdog = threading.Thread(
        target=_watch_control,
        args=(control, parent_fd, requests),
        name="pgskewer-unblock-watchdog",
        daemon=True,
    )
    watchdog.start()

    _send(control, ("ready", os.getpid()))

    # Importing cloudpickle takes about half of the start-up time. Doing it after "ready"
    # overlaps it with the caller's work, and a request that arrives meanwhile waits in
    # the queue.
    import cloudpickle  # noqa: F401
    while True:
        request = requests.get()
        if request is None or request[0] == "shutdown":
            break
        _send(control, _serve_call(request, output_fds))

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _watch_parent(parent_pid: int) -> int | None:
    """Return a pidfd that becomes readable when the parent process exits, and become a subreaper.

    A pidfd refers to the parent *process*. PR_SET_PDEATHSIG is used only where
    ``pidfd_open`` is missing (Linux before 5.3), because it fires when the parent's
    spawning *thread* exits, and because its SIGKILL ends this process before the
    watchdog can kill the rest of the process group. As a subreaper, this process
    adopts orphaned descendants, so the leftover check after a call finds them.
    """
    libc: Any = None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: only the control socket shows that the parent is gone

    parent_fd: int | None
    try:
        parent_fd = os.pidfd_open(parent_pid)
    except (AttributeError, OSError):
        parent_fd = None
        if libc is not None:
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)

    # The parent may have died before this point, and its pid may belong to another process.
    if os.getppid() != parent_pid:
        os._exit(1)
    return parent_fd


def _replace_stdin_with_devnull() -> None:
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)


def _watch_control(
    control: socket.socket, parent_fd: int | None, requests: queue.SimpleQueue[Any]
) -> None:
    """Pass requests to the main thread, and kill the process group when the parent is gone.

    The parent is gone when the control socket reaches EOF or, where a pidfd is
    available, when the parent process exits. The pidfd matters when a process forked
    from the parent still has the parent's end of the socket open.
    """
    poller = select.poll()
    poller.register(control, select.POLLIN)
    if parent_fd is not None:
        poller.register(parent_fd, select.POLLIN)

    while True:
        ready = {fd for fd, _ in poller.poll()}
        request = None
        if parent_fd not in ready:
            try:
                request = _receive(control)
            except OSError:
                request = None

        if request is None:
            os.killpg(os.getpgid(0), signal.SIGKILL)
            return

        requests.put(request)
        if request[0] == "shutdown":
            return


def _serve_call(request: tuple[Any, ...], output_fds: tuple[int, int]) -> tuple[Any, ...]:
    """Run one call and return the reply, after its output has been flushed and ended."""
    import cloudpickle

    _, token, cwd, environ, path, payload = request
    threads_before = set(threading.enumerate())
    try:
        _adopt_caller_environment(cwd, environ, path)
        function, args, kwargs = cloudpickle.loads(payload)
        value = function(*args, **kwargs)
    except BaseException as exc:
        outcome = _describe_exception(exc)
    else:
        outcome = _describe_value(value)
    finally:
        _end_output(token, output_fds)

    return ("reply", token, _describe_leftovers(threads_before), *outcome)


def _adopt_caller_environment(cwd: str, environ: dict[str, str], path: list[str]) -> None:
    """Take the caller's working directory, environment variables and ``sys.path``."""
    if os.getcwd() != cwd:
        os.chdir(cwd)

    for name in [name for name in os.environ if name not in environ]:
        del os.environ[name]
    for name, value in environ.items():
        if os.environ.get(name) != value:
            os.environ[name] = value

    if sys.path != path:
        sys.path[:] = path


def _describe_value(value: object) -> tuple[Any, ...]:
    import cloudpickle

    try:
        return ("return", cloudpickle.dumps(value, protocol=5))
    except Exception as exc:
        message = (
            f"cannot send the return value of type {type(value).__qualname__!r} back from "
            f"the child process: {_safe_str(exc)}"
        )
        return ("unsendable", message)


def _describe_exception(exc: BaseException) -> tuple[Any, ...]:
    """Return the exception pickled when possible, and always its type, message and traceback."""
    import cloudpickle

    # Skip the frame of _serve_call: the traceback starts in the caller's function.
    tb = exc.__traceback__.tb_next if exc.__traceback__ is not None else None
    remote_traceback = "".join(traceback.format_exception(type(exc), exc, tb))
    type_name = f"{type(exc).__module__}.{type(exc).__qualname__}"

    pickled: bytes | None = None
    if isinstance(exc, Exception):
        try:
            pickled = cloudpickle.dumps(exc, protocol=5)
        except Exception:
            pickled = None
    return ("raise", pickled, type_name, _safe_str(exc), remote_traceback)


def _safe_str(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:
        return f"<str() of {type(exc).__qualname__} failed>"


def _end_output(token: str, output_fds: tuple[int, int]) -> None:
    """Flush every buffer, give fd 1 and fd 2 back their pipes, and write the end markers."""
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            pass
    _flush_c_stdio()

    sys.stdout = sys.__stdout__
    sys.stderr = sys.__stderr__
    os.dup2(output_fds[0], 1)
    os.dup2(output_fds[1], 2)

    marker = end_marker(token)
    for fd in output_fds:
        os.write(fd, marker)


def _flush_c_stdio() -> None:
    """Flush C ``stdio`` buffers, which are block-buffered when stdout is a pipe."""
    try:
        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError):
        pass


def _describe_leftovers(threads_before: set[threading.Thread]) -> str | None:
    """Return why this child must not run another call, or ``None`` when nothing is left over.

    Processes and threads the call started and left running could still write output,
    which would then be taken for output of the next call.
    """
    threads = [t for t in threading.enumerate() if t.is_alive() and t not in threads_before]
    processes = _live_child_processes()
    if not threads and not processes:
        return None

    parts = []
    if processes:
        parts.append(f"{len(processes)} process(es) ({', '.join(map(str, processes))})")
    if threads:
        parts.append(f"{len(threads)} thread(s) ({', '.join(t.name for t in threads)})")
    return "the call left " + " and ".join(parts) + " running"


def _live_child_processes() -> list[int]:
    """Reap exited children and return the PIDs of the live ones.

    ``waitid`` reports "no children at all" without scanning ``/proc``, which keeps the
    common case cheap. Reaping may take the exit status from a ``subprocess.Popen`` that
    the caller never waited for, which then reports return code 0.
    """
    while True:
        try:
            status = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG)
        except ChildProcessError:
            return []
        if status is None:
            break

    own_pid = os.getpid()
    children = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as stat_file:
                stat = stat_file.read()
        except OSError:
            continue
        # The command name may contain spaces and brackets, so split after its last ")".
        fields = stat[stat.rindex(b")") + 2 :].split()
        if int(fields[1]) == own_pid and fields[0] != b"Z":
            children.append(int(entry))
    return children


def _send(control: socket.socket, message: tuple[Any, ...]) -> None:
    data = pickle.dumps(message, protocol=5)
    control.sendall(FRAME_HEADER.pack(len(data)) + data)


def _receive(control: socket.socket) -> tuple[Any, ...] | None:
    header = _receive_exactly(control, FRAME_HEADER.size)
    if header is None:
        return None
    (size,) = FRAME_HEADER.unpack(header)
    data = _receive_exactly(control, size)
    if data is None:
        return None
    message: tuple[Any, ...] = pickle.loads(data)
    return message


def _receive_exactly(control: socket.socket, size: int) -> bytes | None:
    buffer = bytearray(size)
    view = memoryview(buffer)
    received = 0
    while received < size:
        count = control.recv_into(view[received:])
        if count == 0:
            return None
        received += count
    return bytes(buffer)
