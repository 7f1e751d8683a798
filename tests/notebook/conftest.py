"""Fixtures of the notebook tests: in-process sessions and real ipykernel kernels."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from kernel_harness import Kernel


@pytest.fixture
def session(dsn: str) -> Iterator[Any]:
    """A notebook session with a worker on a fresh database, closed after the test."""
    from pgskewer.notebook import Session

    opened = Session(dsn)
    try:
        yield opened
    finally:
        opened.close()


@pytest.fixture
def start_kernel(dsn: str) -> Iterator[Callable[..., Kernel]]:
    """Start kernels on the test database; all of them are shut down after the test."""
    started: list[Kernel] = []

    def start(env: dict[str, str] | None = None) -> Kernel:
        kernel = Kernel(dsn, env)
        started.append(kernel)
        return kernel

    yield start
    for kernel in started:
        kernel.shutdown()


@pytest.fixture
def kernel(start_kernel: Callable[..., Kernel]) -> Kernel:
    """A started kernel on the test database."""
    return start_kernel()
