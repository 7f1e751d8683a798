"""Context variables that tie captured output to the step that produced it.

The executor sets :data:`output_sink` while a step runs; ``unblock`` and the
``capture_output`` redirection hand every captured line to it. The notebook session sets
:data:`echo_output` to ``False`` because its widget shows the lines instead.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable
from typing import Literal, TextIO

Stream = Literal["stdout", "stderr", "log", "system"]

#: A callable that takes one captured line. It must not block and must not raise.
OutputSink = Callable[[Stream, str], None]

output_sink: contextvars.ContextVar[OutputSink | None] = contextvars.ContextVar(
    "pgskewer_output_sink", default=None
)

echo_output: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "pgskewer_echo_output", default=True
)


def passthrough(stream: TextIO) -> TextIO:
    """Return the real stream behind pgskewer's ``capture_output`` proxy, or ``stream``.

    Lines that are already sent to a sink are echoed here, so the proxy does not store
    them a second time.
    """
    inner = getattr(stream, "pgskewer_passthrough", None)
    return inner if inner is not None else stream
