"""The ``%pgskewer`` magic on a plain IPython ``InteractiveShell``, with a real session."""

from __future__ import annotations

import asyncio
import datetime
import types
from collections.abc import Iterator
from typing import Any

import pytest
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell

import pgskewer
from pgskewer.model import Status
from pgskewer.notebook import PipelineRun, RunsTable, Session
from pgskewer.notebook.magics import expand_json, unload_ipython_extension


@pytest.fixture
def ip() -> Iterator[InteractiveShell]:
    shell = InteractiveShell.instance()
    shell.extension_manager.load_extension("pgskewer")
    try:
        yield shell
    finally:
        unload_ipython_extension(shell)
        shell.extension_manager.loaded.discard("pgskewer")
        shell.reset(new_session=False)


@pytest.fixture
def echo_session(session: Session) -> Session:
    """The session with an ``echo`` task that returns its payload."""

    @session.task
    async def echo(job: Any) -> Any:
        return pgskewer.parse_payload(job.payload)

    @session.task
    async def stuck(job: Any) -> None:
        await asyncio.sleep(60)

    return session


def run_magic(ip: InteractiveShell, source: str) -> Any:
    """Run ``source`` as a cell and return its result, raising the cell's exception."""
    result = ip.run_cell(source)
    result.raise_error()
    return result.result


def usage_error(ip: InteractiveShell, source: str) -> str:
    """Run ``source`` and return the message of the UsageError it must raise."""
    result = ip.run_cell(source)
    assert isinstance(result.error_in_exec, UsageError), result.error_in_exec
    return str(result.error_in_exec)


# -- payload parsing, no database ---------------------------------------------------


def test_json_taken_verbatim() -> None:
    text = (
        r'{"quote": "it\"s", "braces": "{not_a_var} {}", "dollar": "$HOME", "n": [1, {"a": null}]}'
    )
    assert expand_json(text, {}) == {
        "quote": 'it"s',
        "braces": "{not_a_var} {}",
        "dollar": "$HOME",
        "n": [1, {"a": None}],
    }


def test_placeholders_take_objects() -> None:
    day = datetime.date(2024, 1, 31)
    config = {"k": [1]}
    namespace = {"day": day, "cfg": config, "obj": types.SimpleNamespace(size=3)}
    payload = expand_json('{"day": {day}, "cfg": { cfg }, "size": {obj.size}}', namespace)
    assert payload == {"day": day, "cfg": {"k": [1]}, "size": 3}
    assert payload["cfg"] is config


def test_whole_payload_placeholder() -> None:
    config = {"k": 1}
    assert expand_json("{cfg}", {"cfg": config}) is config
    assert expand_json("  $cfg ", {"cfg": config}) is config
    assert expand_json("{}", {}) == {}
    assert expand_json("", {}) is None
    assert expand_json('"$cfg"', {"cfg": config}) == "$cfg"


def test_placeholder_as_key() -> None:
    assert expand_json("{{key}: 1}", {"key": "name"}) == {"name": 1}
    with pytest.raises(UsageError, match="object key must hold a str"):
        expand_json("{{key}: 1}", {"key": 5})


def test_placeholder_after_escaped_quote() -> None:
    assert expand_json(r'{"a": "x\"{n}", "b": {n}}', {"n": 2}) == {"a": 'x"{n}', "b": 2}


def test_undefined_name() -> None:
    with pytest.raises(UsageError, match="name 'missing' in the payload is not defined"):
        expand_json('{"a": {missing}}', {})
    with pytest.raises(UsageError, match="no attribute 'nope'"):
        expand_json("{obj.nope}", {"obj": object()})


def test_invalid_json_names_position() -> None:
    with pytest.raises(UsageError) as caught:
        expand_json('{"a": {value}, "b": }', {"value": 1})
    message = str(caught.value)
    assert message == "invalid JSON payload: Expecting value (line 1, column 21)"
    assert "\n" not in message


# -- the magic ----------------------------------------------------------------------


def test_enqueue_json_verbatim(ip: InteractiveShell, echo_session: Session) -> None:
    run = run_magic(ip, r'%pgskewer enqueue echo {"a": "it\"s $x {y}", "b": [1, {"c": 2}]}')
    assert isinstance(run, PipelineRun)
    assert echo_session.last_run == run
    assert run.result(timeout=30)["result"] == {"a": 'it"s $x {y}', "b": [1, {"c": 2}]}


def test_enqueue_placeholders(ip: InteractiveShell, echo_session: Session) -> None:
    ip.user_ns.update(day="2024-01-31", cfg={"k": [1]})
    run = run_magic(ip, '%pgskewer enqueue echo {"day": {day}, "cfg": {cfg}}')
    assert run.result(timeout=30)["result"] == {"day": "2024-01-31", "cfg": {"k": [1]}}
    run = run_magic(ip, "%pgskewer enqueue echo $cfg")
    assert run.result(timeout=30)["result"] == {"k": [1]}


def test_enqueue_output_variable(ip: InteractiveShell, echo_session: Session) -> None:
    run = run_magic(ip, '%pgskewer enqueue -o handle --priority 5 echo {"x": 1}')
    assert ip.user_ns["handle"] is run
    assert run.result(timeout=30)["result"] == {"x": 1}
    run_magic(ip, "assigned = %pgskewer enqueue echo [1, 2]")
    assert ip.user_ns["assigned"].result(timeout=30)["result"] == [1, 2]


def test_enqueue_without_payload(ip: InteractiveShell, echo_session: Session) -> None:
    run = run_magic(ip, "%pgskewer enqueue echo")
    assert run.result(timeout=30)["result"] is None


def test_cell_magic_payload(ip: InteractiveShell, echo_session: Session) -> None:
    ip.user_ns["n"] = 3
    run = run_magic(
        ip,
        '%%pgskewer enqueue -o cell_run echo\n{\n  "multi": "line",\n  "n": {n}\n}\n',
    )
    assert ip.user_ns["cell_run"] is run
    assert run.result(timeout=30)["result"] == {"multi": "line", "n": 3}


def test_status_runs_logs_result(ip: InteractiveShell, echo_session: Session) -> None:
    @echo_session.task
    async def talk(job: Any) -> str:
        print("said something")
        return "ok"

    run = run_magic(ip, "%pgskewer enqueue talk")
    assert run_magic(ip, f"%pgskewer result {run.id} --timeout 30")["result"] == "ok"

    status = run_magic(ip, f"%pgskewer status {run.id}")
    assert status.state.status is Status.SUCCESSFUL
    assert "said something" in repr(status)
    assert "pgs-st-successful" in status._repr_html_()
    assert run_magic(ip, "%pgskewer status").state.id == run.id

    runs = run_magic(ip, "%pgskewer runs -n 5 --status successful")
    assert isinstance(runs, RunsTable)
    assert [state.id for state in runs] == [run.id]
    assert run_magic(ip, "%pgskewer runs --name echo") == []

    ip.user_ns["run"] = run
    assert run_magic(ip, "%pgskewer status {run.id}").state.id == run.id
    ip.user_ns["run_id"] = run.id
    assert run_magic(ip, "%pgskewer status $run_id").state.id == run.id

    logs = run_magic(ip, f"%pgskewer logs {run.id}")
    assert [line.text for line in logs] == ["said something"]
    assert "said something" in logs._repr_html_()
    assert run_magic(ip, f"%pgskewer logs {run.id} --step 1")[0].step == "1"


def test_cancel_and_retry(ip: InteractiveShell, echo_session: Session) -> None:
    run = run_magic(ip, "%pgskewer enqueue stuck")
    canceled = run_magic(ip, f"%pgskewer cancel {run.id}")
    assert canceled.state.status in {Status.CANCELING, Status.CANCELED}
    assert run.result(timeout=30)["status"] == "canceled"

    @echo_session.task("stuck")
    async def quick(job: Any) -> str:
        return "now quick"

    retried = run_magic(ip, f"%pgskewer retry {run.id}")
    assert retried.id == run.id
    assert retried.result(timeout=30)["result"] == "now quick"


def test_result_timeout(ip: InteractiveShell, echo_session: Session) -> None:
    run = run_magic(ip, "%pgskewer enqueue stuck")
    result = ip.run_cell(f"%pgskewer result {run.id} --timeout 0.2")
    assert isinstance(result.error_in_exec, TimeoutError)
    run.cancel()


def test_workers(ip: InteractiveShell, echo_session: Session) -> None:
    echo_session.enqueue("echo").result(timeout=30)  # the worker is registered once it ran a job
    workers = run_magic(ip, "%pgskewer workers")
    assert len(workers) == 1
    assert "echo" in workers[0].entrypoints
    assert "echo" in repr(workers)
    assert "<table" in workers._repr_html_()


def test_usage_errors(ip: InteractiveShell, echo_session: Session) -> None:
    assert usage_error(ip, '%pgskewer enqueue echo {"a": }').startswith("invalid JSON payload")
    assert usage_error(ip, "%pgskewer launch echo") == (
        "unknown subcommand 'launch'; use one of: "
        "enqueue, status, runs, cancel, logs, result, retry, workers"
    )
    assert "NAME is missing" in usage_error(ip, "%pgskewer enqueue")
    assert "needs a value" in usage_error(ip, "%pgskewer enqueue -o")
    assert "unrecognized arguments" in usage_error(ip, "%pgskewer enqueue --colour red echo")
    assert usage_error(ip, "%pgskewer status 999999") == "run 999999 not found"
    assert "invalid int value" in usage_error(ip, "%pgskewer cancel abc")
    assert "takes no cell body" in usage_error(ip, "%%pgskewer runs\nbody")
    assert "from the cell body" in usage_error(ip, "%%pgskewer enqueue echo {}\n{}")
    assert "subcommands:" in usage_error(ip, "%pgskewer")
    assert "-o needs a Python variable name" in usage_error(ip, "%pgskewer enqueue -o 1x echo")
    for message in [usage_error(ip, "%pgskewer launch"), usage_error(ip, "%pgskewer status x")]:
        assert "\n" not in message


def test_without_session(ip: InteractiveShell) -> None:
    message = usage_error(ip, "%pgskewer runs")
    assert message.startswith("no pgskewer session is open")


def test_help(ip: InteractiveShell, capsys: pytest.CaptureFixture[str]) -> None:
    ip.run_cell("%pgskewer?")
    out = capsys.readouterr().out
    assert "%pgskewer enqueue [-o VAR]" in out
    assert "%%pgskewer enqueue" in out
