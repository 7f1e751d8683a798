"""Registering and enqueueing check entrypoint names with the same rules and messages."""

from __future__ import annotations

from typing import Any

import pytest

from pgskewer import ImprovedQueuer


async def _task(job: Any) -> None:
    return None


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("t" * 1001, "above the limit of 1000; use a shorter name"),
        ("ec\x00ho", "it contains a NUL character"),
        ("   ", "use a non-empty string"),
    ],
)
def test_registration_rejects_bad_name(name: str, message: str) -> None:
    queuer = ImprovedQueuer()

    with pytest.raises(ValueError, match=message):
        queuer.entrypoint(name)(_task)

    assert queuer.registry.names() == []
