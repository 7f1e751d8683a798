"""A real ipykernel driven through jupyter_client for the notebook tests.

Kernels get the test database through ``PGSKEWER_DSN`` and run from the repository root.
A reader thread records every iopub message with the monotonic time it arrived, so tests
can check widget updates that carry no cell's parent header, and their timing.
"""

from __future__ import annotations

import json
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Execution:
    """The iopub messages of one executed cell, up to its ``idle`` status."""

    msg_id: str
    messages: list[dict[str, Any]] = field(default_factory=list)

    @property
    def stdout(self) -> str:
        return "".join(
            m["content"]["text"]
            for m in self.messages
            if m["msg_type"] == "stream" and m["content"]["name"] == "stdout"
        )

    @property
    def error(self) -> dict[str, Any] | None:
        for message in self.messages:
            if message["msg_type"] == "error":
                content: dict[str, Any] = message["content"]
                return content
        return None

    def data(self) -> list[dict[str, Any]]:
        """Return the mime bundles of ``execute_result`` and ``display_data`` outputs."""
        return [
            m["content"]["data"]
            for m in self.messages
            if m["msg_type"] in {"execute_result", "display_data"}
        ]


class Kernel:
    """A real ipykernel driven through jupyter_client, with every iopub message recorded."""

    def __init__(self, dsn: str, env: dict[str, str] | None = None) -> None:
        from jupyter_client import KernelManager

        kernel_env = dict(os.environ)
        kernel_env["PGSKEWER_DSN"] = dsn
        kernel_env.update(env or {})
        self.manager = KernelManager(kernel_name="python3")
        self.manager.start_kernel(env=kernel_env, cwd=str(ROOT))
        self.client = self.manager.client()
        self.client.start_channels()
        self.client.wait_for_ready(timeout=60)
        self.messages: list[tuple[float, dict[str, Any]]] = []
        self._condition = threading.Condition()
        self._stopping = threading.Event()
        self._reader = threading.Thread(target=self._read_iopub, daemon=True)
        self._reader.start()

    def _read_iopub(self) -> None:
        while not self._stopping.is_set():
            try:
                message = self.client.get_iopub_msg(timeout=0.1)
            except queue.Empty:
                continue
            except Exception:
                if self._stopping.is_set():
                    return
                raise
            with self._condition:
                self.messages.append((time.monotonic(), message))
                self._condition.notify_all()

    def send(self, code: str) -> str:
        """Send ``code`` for execution and return the request's msg_id without waiting."""
        msg_id: str = self.client.execute(code, store_history=True, allow_stdin=False)
        return msg_id

    def wait(self, msg_id: str, timeout: float = 60.0) -> Execution:
        """Wait for the ``idle`` status of request ``msg_id`` and return its messages."""
        deadline = time.monotonic() + timeout
        with self._condition:
            while True:
                mine = [m for _, m in self.messages if m["parent_header"].get("msg_id") == msg_id]
                if any(
                    m["msg_type"] == "status" and m["content"]["execution_state"] == "idle"
                    for m in mine
                ):
                    return Execution(msg_id, mine)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"cell {msg_id} did not finish within {timeout} s")
                self._condition.wait(remaining)

    def wait_for(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float, start: int = 0
    ) -> tuple[float, dict[str, Any]]:
        """Wait for the first iopub message from index ``start`` on that matches ``predicate``."""
        deadline = time.monotonic() + timeout
        with self._condition:
            while True:
                for arrived, message in self.messages[start:]:
                    if predicate(message):
                        return arrived, message
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"no matching iopub message within {timeout} s")
                self._condition.wait(remaining)

    def run(self, code: str, timeout: float = 60.0) -> Execution:
        """Execute ``code`` and fail the test with the kernel's traceback on an error."""
        execution = self.wait(self.send(code), timeout)
        error = execution.error
        if error is not None:
            traceback = "\n".join(error.get("traceback", []))
            pytest.fail(f"cell failed: {error['ename']}: {error['evalue']}\n{traceback}")
        return execution

    def value(self, expression: str, timeout: float = 60.0) -> Any:
        """Evaluate ``expression`` in the kernel and return it decoded from JSON."""
        marker = "@@pgskewer-value@@"
        code = f"import json as _json\nprint({marker!r} + _json.dumps({expression}, default=str))"
        stdout = self.run(code, timeout).stdout
        for line in stdout.splitlines():
            if line.startswith(marker):
                return json.loads(line[len(marker) :])
        raise AssertionError(f"no value printed for {expression!r}; stdout: {stdout!r}")

    def interrupt(self) -> None:
        self.manager.interrupt_kernel()

    def send_comm_message(self, comm_id: str, data: dict[str, Any]) -> float:
        """Send a ``comm_msg`` on the shell channel as a frontend does; return the send time."""
        message = self.client.session.msg("comm_msg", {"comm_id": comm_id, "data": data})
        self.client.shell_channel.send(message)
        return time.monotonic()

    def mark(self) -> int:
        """Return the index of the next iopub message, for ``wait_for(start=...)``."""
        with self._condition:
            return len(self.messages)

    def shutdown(self) -> None:
        self._stopping.set()
        try:
            self.client.stop_channels()
        finally:
            self.manager.shutdown_kernel(now=True)
        self._reader.join(5)
