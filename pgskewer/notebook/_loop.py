"""An asyncio event loop on a daemon thread, and interruptible waits on it from other threads.

A notebook session runs its worker here rather than on the kernel's loop. The kernel's
loop stops while a cell blocks (``time.sleep``, pandas, a synchronous driver), and a
worker on it would then stop claiming jobs and sending heartbeats, and freeze every widget.

Every coroutine and callback is submitted from a fresh :class:`contextvars.Context`.
ipykernel keeps the current request in a context variable, and a task that inherited
a cell's context would publish all its messages (widget updates, prints) with that
cell's parent header forever; nbclient drops such messages once the cell is done.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import logging
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, TypeVar

logger = logging.getLogger("pgskewer")

T = TypeVar("T")

#: Seconds between checks for KeyboardInterrupt while a thread waits on a future.
WAIT_SLICE = 0.1


class LoopClosedError(RuntimeError):
    """The background loop was stopped, so nothing more can be submitted to it."""


class LoopThread:
    """An event loop that runs forever on its own daemon thread.

    ``context_values`` are set in the context of every coroutine and callback submitted,
    on top of an otherwise empty context. :meth:`start` and :meth:`stop` are idempotent;
    a stopped loop cannot be started again.
    """

    def __init__(
        self,
        name: str = "pgskewer-loop",
        *,
        context_values: Mapping[contextvars.ContextVar[Any], Any] | None = None,
    ) -> None:
        self.name = name
        self._context_values = dict(context_values or {})
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._lock = threading.Lock()
        self._stopped = False

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The running loop; raises :class:`LoopClosedError` before start and after stop."""
        if self._loop is None or self._stopped:
            raise LoopClosedError(f"the event loop thread {self.name!r} is not running")
        return self._loop

    @property
    def thread(self) -> threading.Thread | None:
        """The loop's thread, or ``None`` before :meth:`start`."""
        return self._thread

    @property
    def running(self) -> bool:
        """Whether the loop has started and not been stopped."""
        return self._loop is not None and not self._stopped

    def in_loop_thread(self) -> bool:
        """Return whether the caller runs on the loop's own thread."""
        return self._thread is not None and threading.current_thread() is self._thread

    def start(self) -> None:
        """Start the thread and wait until its loop runs."""
        with self._lock:
            if self._stopped:
                raise LoopClosedError(f"the event loop thread {self.name!r} was stopped")
            if self._thread is not None:
                return
            self._thread = threading.Thread(target=self._main, name=self.name, daemon=True)
            self._thread.start()
        self._ready.wait()

    def _main(self) -> None:
        loop = _new_event_loop()
        asyncio.set_event_loop(loop)
        self._loop = loop
        loop.call_soon(self._ready.set)
        try:
            loop.run_forever()
        finally:
            try:
                _cancel_remaining_tasks(loop)
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.run_until_complete(loop.shutdown_default_executor())
            finally:
                asyncio.set_event_loop(None)
                loop.close()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Schedule ``coro`` as a task on the loop and return a future of its result.

        Cancelling the returned future cancels the task.
        """
        try:
            loop = self.loop
        except LoopClosedError:
            coro.close()
            raise
        return self._in_fresh_context(asyncio.run_coroutine_threadsafe, coro, loop)

    def call_soon(self, callback: Callable[..., object], *args: Any) -> None:
        """Schedule ``callback(*args)`` on the loop from any thread."""
        loop = self.loop
        self._in_fresh_context(loop.call_soon_threadsafe, callback, *args)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coro`` on the loop and wait for its result from another thread.

        The wait is interruptible by KeyboardInterrupt (see :func:`wait_future`); an
        interrupt or a timeout cancels the task. Raises ``RuntimeError`` when called from
        the loop's own thread, which would deadlock.
        """
        if self.in_loop_thread():
            coro.close()
            raise RuntimeError("a blocking call on the session loop's own thread would deadlock")
        future = self.submit(coro)
        try:
            return wait_future(future, timeout)
        except BaseException:
            future.cancel()
            raise

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the loop, cancel its remaining tasks and join the thread."""
        with self._lock:
            if self._stopped or self._thread is None:
                self._stopped = True
                return
            self._stopped = True
            loop, thread = self._loop, self._thread
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(loop.stop)
        if thread is not threading.current_thread():
            thread.join(timeout)
            if thread.is_alive():
                logger.warning(
                    "event loop thread %r did not stop within %.1f s", self.name, timeout
                )

    def _in_fresh_context(self, function: Callable[..., T], *args: Any) -> T:
        def call() -> T:
            for variable, value in self._context_values.items():
                variable.set(value)
            return function(*args)

        return contextvars.Context().run(call)


def wait_future(future: concurrent.futures.Future[T], timeout: float | None = None) -> T:
    """Wait for ``future`` in short slices, so that KeyboardInterrupt is raised promptly.

    Slicing bounds the reaction time by :data:`WAIT_SLICE` even where a long lock wait
    does not wake up for signals. Raises ``TimeoutError`` after ``timeout`` seconds and
    leaves the future itself alone.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        remaining = WAIT_SLICE if deadline is None else min(WAIT_SLICE, deadline - time.monotonic())
        if remaining <= 0:
            raise TimeoutError(f"no result within {timeout} s")
        try:
            return future.result(remaining)
        except concurrent.futures.TimeoutError:
            # The coroutine itself may have raised TimeoutError: that one is the result.
            if future.done():
                return future.result()


def _new_event_loop() -> asyncio.AbstractEventLoop:
    # psycopg's async driver rejects the Proactor loop that Windows uses by default.
    if sys.platform == "win32":
        return asyncio.SelectorEventLoop()
    return asyncio.new_event_loop()


def _cancel_remaining_tasks(loop: asyncio.AbstractEventLoop) -> None:
    tasks = [task for task in asyncio.all_tasks(loop) if not task.done()]
    if not tasks:
        return
    for task in tasks:
        task.cancel()
    loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
    for task in tasks:
        if not task.cancelled() and task.exception() is not None:
            logger.error(
                "task %r failed while the session loop stopped",
                task.get_name(),
                exc_info=task.exception(),
            )
