"""Run blocking functions in reusable, killable child processes, with live output.

``await unblock(fn, *args, **kwargs)`` runs ``fn`` in a separate Python process of the
same interpreter and returns its result. Options go through :meth:`Unblocker.options`,
because every keyword argument of the call belongs to ``fn``::

    result = await unblock(load_table, "data.csv", sep=";")
    result = await unblock.options(timeout=60, fresh=True)(train, model)

**Transfer.** ``fn``, its arguments and its result travel with cloudpickle. Functions,
lambdas and closures defined in ``__main__`` or a notebook cell travel by value. Other
functions travel by reference and are imported in the child. For each call the child
takes the caller's ``sys.path``, working directory and environment variables. A value
that cannot be pickled raises :class:`TypeError` naming its type.

**Errors.** An exception from ``fn`` is raised again with its original type and message,
and the child's traceback is attached as a note. When the exception cannot be recreated,
:class:`RemoteError` names its type and message instead. A child that dies during a call
(a signal, ``os._exit``, the OOM killer) raises :class:`UnblockProcessDied`.

**Output.** In the child, fd 1 and fd 2 are pipes that the caller's event loop reads, so
``print``, ``logging``, ``os.write(1, ...)``, C extensions and subprocesses are all
captured. Each line goes to ``pgskewer._context.output_sink`` when one is set, and to the
caller's ``sys.stdout``/``sys.stderr`` (the objects current at the call) while
``pgskewer._context.echo_output`` is true. Lines keep their order within each stream, not
across the two. Python's ``sys.stdout`` in the child is unbuffered (``python -u``), and C
``stdio`` buffers are flushed when the call ends. A partial line is handed on when its
newline arrives, when the call ends, or when it grows past 64 KiB, so a progress bar that
redraws with ``\\r`` shows up line by line only where it writes newlines.

**Reuse.** A child runs one call at a time and is reused for later calls, which is what
makes a call cheap. Module state, globals, imported modules, signal handlers and logging
configuration carry over from one call to the next on the same child. File descriptors 1
and 2, ``sys.stdout`` and ``sys.stderr`` are reset after each call. A child is not reused
after a call that was cancelled, timed out, crashed, ran with ``fresh=True``, or left a
process or thread running. In the last case the child and what was left are killed, so
their output cannot be mistaken for output of a later call.

**Cancellation.** Cancelling the awaiting task, or the timeout running out, kills the
child's whole process tree: SIGTERM to its process group and to descendants that left
the group, SIGKILL 0.5 s later. The cancellation then propagates unchanged.

**Lifetime.** Each asyncio event loop has its own pool. The pool keeps up to two used
children idle plus one never-used spare, and grows to as many children as there are
concurrent calls. The children exit when their loop shuts down through ``asyncio.run`` or
``anyio.run``, and otherwise at interpreter exit. If the calling process dies, even by
SIGKILL, each child notices the end of its control socket and kills its process group.
Children lead their own session, so a SIGINT for the caller's terminal (a kernel
interrupt) does not reach them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, ParamSpec, TypeVar

from pgskewer._unblock.errors import (
    RemoteError,
    UnblockError,
    UnblockProcessDied,
    UnblockTimeout,
)
from pgskewer._unblock.pool import close_current_pool
from pgskewer._unblock.runner import run_in_child

__all__ = [
    "RemoteError",
    "UnblockError",
    "UnblockProcessDied",
    "UnblockTimeout",
    "Unblocker",
    "close_pool",
    "unblock",
]

P = ParamSpec("P")
R = TypeVar("R")


class _Unset:
    def __repr__(self) -> str:
        return "UNSET"


_UNSET = _Unset()


@dataclass(frozen=True)
class Unblocker:
    """Runs a function in a child process with fixed options. :data:`unblock` has the defaults.

    Attributes:
        fresh: run each call in a process that never ran a call before and retire it
            afterwards, so no state carries over. Starting a process costs about as much
            as ``python -c pass`` when no spare is ready.
        timeout: seconds from sending the call to its reply. When it runs out, the child's
            process tree is killed and :class:`UnblockTimeout` is raised. ``None`` waits
            without limit.
    """

    fresh: bool = False
    timeout: float | None = None

    def options(
        self, *, fresh: bool | None = None, timeout: float | _Unset | None = _UNSET
    ) -> Unblocker:
        """Return a copy with the given options changed and the others kept."""
        changes: dict[str, Any] = {}
        if fresh is not None:
            changes["fresh"] = fresh
        if not isinstance(timeout, _Unset):
            if timeout is not None and timeout <= 0:
                raise ValueError(f"timeout must be positive or None, not {timeout!r}")
            changes["timeout"] = timeout
        return replace(self, **changes)

    async def __call__(self, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R:
        """Run ``fn(*args, **kwargs)`` in a child process and return its result.

        Raises the exception ``fn`` raised, :class:`RemoteError`, :class:`TypeError` for
        a value that cannot be pickled, :class:`UnblockProcessDied` or
        :class:`UnblockTimeout`. Needs a running asyncio event loop.
        """
        result: R = await run_in_child(
            fn, args, kwargs, fresh=self.fresh, timeout=self.timeout
        )
        return result


#: Runs a function in a reusable child process with no timeout.
unblock = Unblocker()


async def close_pool() -> None:
    """Kill every child process of the running event loop's pool.

    Calls that are running get :class:`UnblockProcessDied`. The next call starts a new pool.
    """
    await close_current_pool()
