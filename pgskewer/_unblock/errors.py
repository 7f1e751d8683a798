"""Exceptions that ``unblock`` raises in the caller."""

from __future__ import annotations

import signal


class UnblockError(Exception):
    """Base class of the errors that come from the child process machinery, not from ``fn``."""


class RemoteError(UnblockError):
    """An exception from ``fn`` that could not be recreated in the caller.

    ``unblock`` raises this instead of the original exception when that exception cannot
    be pickled in the child or unpickled in the caller. It also replaces
    ``BaseException`` subclasses that are not ``Exception`` (``SystemExit``,
    ``KeyboardInterrupt``), because those must not end the caller's process or task.
    """

    def __init__(self, type_name: str, message: str, remote_traceback: str) -> None:
        super().__init__(f"{type_name}: {message}" if message else type_name)
        self.type_name = type_name
        self.message = message
        self.remote_traceback = remote_traceback


class UnblockProcessDied(UnblockError, ChildProcessError):
    """The child process ended while it ran a call: a signal, ``os._exit`` or the OOM killer."""

    def __init__(self, function_name: str, pid: int, returncode: int | None) -> None:
        super().__init__(
            f"the child process {pid} running {function_name} {describe_exit(returncode)}"
        )
        self.pid = pid
        self.returncode = returncode


class UnblockTimeout(UnblockError, TimeoutError):
    """The call did not finish within its ``timeout``. Its child process tree was killed."""

    def __init__(self, function_name: str, timeout: float) -> None:
        super().__init__(
            f"{function_name} did not finish within {timeout:g} s; "
            "its child process and everything it started were killed"
        )
        self.timeout = timeout


def describe_exit(returncode: int | None) -> str:
    """Describe a ``returncode`` of ``subprocess``: negative numbers are signals."""
    if returncode is None:
        return "ended with an unknown status"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"was killed by {name}"
    return f"exited with code {returncode}"
