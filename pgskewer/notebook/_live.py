"""The pump that keeps live run views current, running on the session loop.

For every displayed run, two tasks follow the database: one iterates
``ImprovedQueuer.watch`` for state changes, the other ``ImprovedQueuer.logs(follow=True)``
into a ring buffer of recent lines. A single pump task renders every view at most every
:data:`PUMP_INTERVAL` seconds, and only when something changed, so a task printing
thousands of lines a second costs one widget message per view per interval.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

from pgskewer.model import LogLine, RunState

if TYPE_CHECKING:
    from pgskewer.notebook._loop import LoopThread
    from pgskewer.queuer import ImprovedQueuer

logger = logging.getLogger("pgskewer")

#: Seconds between renders of the live views.
PUMP_INTERVAL = 0.1

#: Log lines kept per run for its view.
LOG_RING_SIZE = 200

#: Seconds a finished run's view waits for the last log lines before its final render.
FINAL_LOG_GRACE = 2.0

#: Seconds between full re-renders while nothing changes, so running durations advance.
TICK_INTERVAL = 1.0

#: Seconds between state reads when ``watch`` fails and the feed falls back to polling.
POLL_INTERVAL = 0.5


class LiveView(Protocol):
    """The interface of a view that the pump updates; ``RunWidget`` implements it."""

    def render(self, state: RunState, lines: Sequence[LogLine]) -> None:
        """Show ``state`` and the recent ``lines``; called on the session loop's thread."""

    def finish(self, state: RunState, lines: Sequence[LogLine]) -> None:
        """Show the final state once the run is terminal."""


class _Feed:
    """The latest state and recent log lines of one run, as read by its two follower tasks."""

    def __init__(self, view: LiveView, state: RunState) -> None:
        self.view = view
        self.state = state
        self.lines: collections.deque[LogLine] = collections.deque(maxlen=LOG_RING_SIZE)
        self.version = 0
        self.rendered_version = -1
        self.rendered_at = 0.0
        self.terminal_since: float | None = None
        self.logs_done = False
        self.tasks: list[asyncio.Task[None]] = []


class LivePump:
    """Feeds and renders the live views of one session. Methods run on the session loop."""

    def __init__(self, pgq: ImprovedQueuer, loop: LoopThread) -> None:
        self._pgq = pgq
        self._loop = loop
        self._feeds: list[_Feed] = []
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    def add_soon(self, view: LiveView, state: RunState) -> None:
        """Start following ``state.id`` for ``view``; callable from any thread."""
        self._loop.call_soon(self._add, view, state)

    def _add(self, view: LiveView, state: RunState) -> None:
        if self._closed:
            return
        feed = _Feed(view, state)
        feed.tasks.append(asyncio.create_task(self._watch(feed), name=f"pgskewer-watch-{state.id}"))
        feed.tasks.append(
            asyncio.create_task(self._follow_logs(feed), name=f"pgskewer-logs-{state.id}")
        )
        self._feeds.append(feed)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._pump(), name="pgskewer-pump")

    async def close(self) -> None:
        """Stop every follower and the pump; views keep what they show."""
        self._closed = True
        tasks = [task for feed in self._feeds for task in feed.tasks]
        if self._task is not None:
            tasks.append(self._task)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._feeds.clear()

    async def _watch(self, feed: _Feed) -> None:
        run_id = feed.state.id
        try:
            async for state in self._pgq.watch(run_id):
                feed.state = state
                feed.version += 1
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.warning(
                "watching run %s failed; polling its state instead", run_id, exc_info=True
            )
            await self._poll(feed)

    async def _poll(self, feed: _Feed) -> None:
        while not feed.state.is_finished:
            await asyncio.sleep(POLL_INTERVAL)
            with contextlib.suppress(Exception):
                state = await self._pgq.run_status(feed.state.id)
                if state is not None and state != feed.state:
                    feed.state = state
                    feed.version += 1

    async def _follow_logs(self, feed: _Feed) -> None:
        try:
            async for line in self._pgq.logs(feed.state.id, follow=True, tail=LOG_RING_SIZE):
                feed.lines.append(line)
                feed.version += 1
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.warning("following the output of run %s failed", feed.state.id, exc_info=True)
        finally:
            feed.logs_done = True

    async def _pump(self) -> None:
        while self._feeds:
            now = time.monotonic()
            for feed in list(self._feeds):
                self._render(feed, now)
            await asyncio.sleep(PUMP_INTERVAL)

    def _render(self, feed: _Feed, now: float) -> None:
        changed = feed.version != feed.rendered_version
        if changed or now - feed.rendered_at >= TICK_INTERVAL:
            self._call_view(feed, feed.view.render)
            feed.rendered_version = feed.version
            feed.rendered_at = now
        if not feed.state.is_finished:
            return
        if feed.terminal_since is None:
            feed.terminal_since = now
        if feed.logs_done or now - feed.terminal_since >= FINAL_LOG_GRACE:
            self._call_view(feed, feed.view.finish)
            self._feeds.remove(feed)
            for task in feed.tasks:
                task.cancel()

    def _call_view(self, feed: _Feed, method: Any) -> None:
        try:
            method(feed.state, tuple(feed.lines))
        except Exception:
            logger.exception("updating the view of run %s failed", feed.state.id)
