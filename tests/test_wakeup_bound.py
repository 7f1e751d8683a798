"""pgqueuer's wake-up queue stays bounded in a pgskewer worker."""

from __future__ import annotations

import asyncio

import pytest

from pgskewer import ImprovedQueuer, worker


def test_wakeups_bounded_at_limit() -> None:
    queue = worker._BoundedWakeups()
    for number in range(worker.MAX_PENDING_WAKEUPS + 10):
        queue.put_nowait(number)

    assert queue.qsize() == worker.MAX_PENDING_WAKEUPS
    assert queue.get_nowait() == 0


def test_concurrency_above_bound_rejected() -> None:
    too_many = 4 * worker.MAX_PENDING_WAKEUPS

    with pytest.raises(ValueError, match="run more worker processes instead"):
        asyncio.run(worker.run_worker(ImprovedQueuer(), concurrency=too_many))
