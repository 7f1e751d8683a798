"""A password in the DSN never shows in the session's reprs, the widget HTML or its logs."""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest

from pgskewer.notebook import Session

SENTINEL = "s3cr3t-SENTINEL"


def _with_password(dsn: str) -> str:
    parts = urlsplit(dsn)
    netloc = f"{parts.username or 'postgres'}:{SENTINEL}@{parts.hostname}"
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


def test_password_absent_from_session_output(
    dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    if urlsplit(dsn).hostname is None:
        pytest.skip("the test server is reached over a unix socket, which takes no password")
    caplog.set_level(logging.DEBUG)
    session = Session(_with_password(dsn))
    try:

        @session.task
        async def hello(job: Any) -> str:
            print("hello")
            return "hi"

        run = session.enqueue("hello")
        result = run.result(timeout=30)
        shown: list[str] = [repr(session), repr(run), str(session.runs()._repr_html_())]
        for value in run._repr_mimebundle_().values():
            shown.append(str(value))
    finally:
        session.close()

    assert result["ok"]
    for text in shown:
        assert SENTINEL not in text
    assert SENTINEL not in caplog.text
