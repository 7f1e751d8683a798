"""One ``unblock`` call: serialise, run in a pooled child, translate the reply."""

from __future__ import annotations

import os
import secrets
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import anyio
import cloudpickle

from pgskewer import _context
from pgskewer._unblock.errors import RemoteError, UnblockProcessDied, UnblockTimeout
from pgskewer._unblock.output import OutputTarget
from pgskewer._unblock.pool import ChildPool, current_pool
from pgskewer._unblock.process import ChildExited, ChildProcess


async def run_in_child(
    function: Callable[..., Any],
    args: Sequence[Any],
    kwargs: Mapping[str, Any],
    *,
    fresh: bool,
    timeout: float | None,
) -> Any:
    """Run ``function(*args, **kwargs)`` in a child process of the running loop's pool."""
    token = secrets.token_hex(8)
    request = _encode_request(token, function, args, kwargs)
    target = OutputTarget(
        sink=_context.output_sink.get(),
        echo=_context.echo_output.get(),
        stdout=_context.passthrough(sys.stdout),
        stderr=_context.passthrough(sys.stderr),
    )

    call = _Call(_name(function), token, request, target)

    pool = current_pool()
    child = await pool.acquire(fresh=fresh)
    reply = await _call_and_release(pool, child, call, fresh=fresh, timeout=timeout)

    return _decode_reply(child, reply)


@dataclass(frozen=True)
class _Call:
    name: str
    token: str
    request: bytes
    target: OutputTarget


async def _call_and_release(
    pool: ChildPool,
    child: ChildProcess,
    call: _Call,
    *,
    fresh: bool,
    timeout: float | None,
) -> tuple[Any, ...]:
    """Run the call and hand the child back to ``pool``, killing its tree unless the call ended."""
    reply: tuple[Any, ...] | None = None
    try:
        with anyio.move_on_after(timeout):
            reply = await child.run_call(call.request, call.token, call.target)
    except ChildExited as exc:
        # Lines written before the crash are still in the pipes: terminate() drains them.
        with anyio.CancelScope(shield=True):
            await child.terminate()
        pool.release(child, reusable=False)
        raise UnblockProcessDied(call.name, child.pid, exc.returncode) from None
    finally:
        if reply is None and child.alive:
            # Cancelled or timed out: the caller no longer wants the output.
            child.stdout_pump.detach()
            child.stderr_pump.detach()
            with anyio.CancelScope(shield=True):
                await child.terminate()
            pool.release(child, reusable=False, reason="its call was cancelled or timed out")

    if reply is None:
        assert timeout is not None
        raise UnblockTimeout(call.name, timeout)

    leftovers: str | None = reply[2]
    if fresh:
        pool.release(child, reusable=False, reason="it ran a call with fresh=True")
    else:
        pool.release(child, reusable=leftovers is None, reason=leftovers or "")
    return reply


def _encode_request(
    token: str, function: Callable[..., Any], args: Sequence[Any], kwargs: Mapping[str, Any]
) -> bytes:
    try:
        payload = cloudpickle.dumps((function, tuple(args), dict(kwargs)), protocol=5)
    except Exception as exc:
        raise _describe_unsendable(function, args, kwargs, exc) from exc

    message = ("call", token, os.getcwd(), dict(os.environ), list(sys.path), payload)
    data: bytes = cloudpickle.dumps(message, protocol=5)
    return data


def _describe_unsendable(
    function: Callable[..., Any],
    args: Sequence[Any],
    kwargs: Mapping[str, Any],
    error: Exception,
) -> TypeError:
    """Find the value that cannot be pickled and name its type."""
    candidates: list[tuple[str, Any]] = [("function", function)]
    candidates += [(f"argument {index}", value) for index, value in enumerate(args)]
    candidates += [(f"keyword argument {name!r}", value) for name, value in kwargs.items()]

    for label, value in candidates:
        try:
            cloudpickle.dumps(value, protocol=5)
        except Exception as value_error:
            return TypeError(
                f"cannot send {label} of type {type(value).__qualname__!r} to the child "
                f"process: {value_error}"
            )
    return TypeError(f"cannot send the call to the child process: {error}")


def _decode_reply(child: ChildProcess, reply: tuple[Any, ...]) -> Any:
    kind = reply[3]
    if kind == "return":
        try:
            return cloudpickle.loads(reply[4])
        except Exception as exc:
            raise TypeError(
                f"cannot receive the return value from the child process: {exc}"
            ) from exc

    if kind == "unsendable":
        raise TypeError(reply[4])

    pickled, type_name, message, remote_traceback = reply[4:8]
    raise _rebuild_exception(child.pid, pickled, type_name, message, remote_traceback)


def _rebuild_exception(
    pid: int, pickled: bytes | None, type_name: str, message: str, remote_traceback: str
) -> BaseException:
    exc: BaseException | None = None
    if pickled is not None:
        try:
            exc = cloudpickle.loads(pickled)
        except Exception:
            exc = None
    if not isinstance(exc, BaseException):
        exc = RemoteError(type_name, message, remote_traceback)

    exc.add_note(f"Traceback in the unblock child process {pid}:\n{remote_traceback.rstrip()}")
    return exc


def _name(function: Callable[..., Any]) -> str:
    return getattr(function, "__qualname__", None) or repr(function)
