"""One pool of child processes per running event loop, with a warm spare.

A pool belongs to one asyncio event loop in one process. Its child processes are served
by tasks in a task group that a keeper task keeps open. When the loop shuts down
(``asyncio.run`` and ``anyio.run`` cancel the remaining tasks), the keeper kills the
children. Children of loops that never shut down are killed at interpreter exit.
"""

from __future__ import annotations

import asyncio
import atexit
import contextvars
import logging
import os
import threading

import anyio
from anyio.abc import TaskGroup

from pgskewer._unblock.process import ChildProcess

logger = logging.getLogger("pgskewer")

#: Used children kept for later calls. A child released when this many are idle exits.
MAX_IDLE = 2

#: Never-used children kept ready, so a call that finds no idle child does not wait for a start.
SPARES = 1


class ChildPool:
    """Children of one event loop: idle used ones, never-used spares, and busy ones."""

    def __init__(self) -> None:
        self._idle: list[ChildProcess] = []
        self._spares: list[ChildProcess] = []
        self._busy: set[ChildProcess] = set()
        self._refilling = False
        self._refill_done = anyio.Event()
        self._task_group: TaskGroup | None = None
        self._ready = anyio.Event()
        self.closed = False

    @property
    def children(self) -> list[ChildProcess]:
        return [*self._idle, *self._spares, *self._busy]

    async def keep(self) -> None:
        """Hold the task group that serves the children until cancelled, then kill them."""
        try:
            async with anyio.create_task_group() as task_group:
                self._task_group = task_group
                self._ready.set()
                try:
                    await anyio.sleep_forever()
                finally:
                    # From here on no task may be started in the closing task group.
                    self.closed = True
        finally:
            self.closed = True
            with anyio.CancelScope(shield=True):
                await self._kill_all()

    async def acquire(self, *, fresh: bool) -> ChildProcess:
        """Return a child for one call: a used idle one unless ``fresh``, else a never-used one."""
        await self._ready.wait()
        if not fresh:
            while self._idle:
                child = self._idle.pop()
                if child.alive:
                    return self._mark_busy(child)

        # A spare on its way is worth waiting for: starting another one in parallel would
        # compete with it for the CPU.
        if not self._spares and self._refilling:
            await self._refill_done.wait()

        while self._spares:
            child = self._spares.pop()
            if child.alive:
                self._refill()
                return self._mark_busy(child)

        assert self._task_group is not None
        child = await ChildProcess.spawn(self._task_group)
        self._refill()
        return self._mark_busy(child)

    def release(self, child: ChildProcess, *, reusable: bool, reason: str = "") -> None:
        """Take a child back after a call. A child that is not ``reusable`` is retired."""
        self._busy.discard(child)
        if reusable and child.alive and not self.closed and len(self._idle) < MAX_IDLE:
            self._idle.append(child)
            return

        if reason:
            logger.debug("unblock child %d retired: %s", child.pid, reason)
        if self._task_group is None or self.closed:
            child.kill_now()
        else:
            self._task_group.start_soon(self._retire, child, reusable)

    def _mark_busy(self, child: ChildProcess) -> ChildProcess:
        self._busy.add(child)
        return child

    def _refill(self) -> None:
        if self._refilling or len(self._spares) >= SPARES or self.closed:
            return
        assert self._task_group is not None
        self._refilling = True
        self._refill_done = anyio.Event()
        self._task_group.start_soon(self._start_spare)

    async def _start_spare(self) -> None:
        assert self._task_group is not None
        try:
            child = await ChildProcess.spawn(self._task_group)
        except Exception:
            # A caller that finds no spare starts its own child and gets this error itself.
            logger.exception("unblock: starting a spare child process failed")
        else:
            self._spares.append(child)
        finally:
            self._refilling = False
            self._refill_done.set()

    async def _retire(self, child: ChildProcess, clean: bool) -> None:
        if clean:
            await child.shutdown()
        else:
            await child.terminate()

    async def _kill_all(self) -> None:
        children = self.children
        self._idle.clear()
        self._spares.clear()
        for child in children:
            child.kill_now()
        for child in children:
            await child.release_resources()


_pools: dict[tuple[int, asyncio.AbstractEventLoop], ChildPool] = {}
_pools_lock = threading.Lock()


def current_pool() -> ChildPool:
    """Return the pool of the running asyncio event loop, creating it on first use."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        raise RuntimeError(
            "unblock needs a running asyncio event loop (anyio on the asyncio backend works)"
        ) from None

    key = (os.getpid(), loop)
    with _pools_lock:
        pool = _pools.get(key)
        if pool is not None and not pool.closed:
            return pool

        pool = ChildPool()
        _pools[key] = pool

    # A fresh context keeps the caller's context variables (the output sink) out of the
    # keeper and the tasks it serves.
    keeper = loop.create_task(_keep_pool(key, pool), context=contextvars.Context())
    _keepers.add(keeper)
    keeper.add_done_callback(_keepers.discard)
    return pool


_keepers: set[asyncio.Task[None]] = set()


async def _keep_pool(key: tuple[int, asyncio.AbstractEventLoop], pool: ChildPool) -> None:
    try:
        await pool.keep()
    finally:
        with _pools_lock:
            if _pools.get(key) is pool:
                del _pools[key]


async def close_current_pool() -> None:
    """Kill every child of the running loop's pool. The next call starts a new pool."""
    loop = asyncio.get_running_loop()
    for keeper in list(_keepers):
        if keeper.get_loop() is loop:
            keeper.cancel()
            await asyncio.wait({keeper})


@atexit.register
def _kill_children_at_exit() -> None:
    with _pools_lock:
        pools = [pool for (pid, _), pool in _pools.items() if pid == os.getpid()]
    for pool in pools:
        for child in pool.children:
            child.kill_now()
