"""Starting runs and moving them forward, each in one transaction.

A run advances when a step reaches a terminal state, in the same transaction that stores
the step's result and with the run row locked, so each group is advanced exactly once
and no job ever waits on another. Every function here takes an asyncpg connection that
pgskewer owns and opens its own transaction on it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import weakref
from collections.abc import Callable, Iterable, Mapping
from datetime import timedelta
from typing import Any

from pgskewer import encoding
from pgskewer.graph import (
    Node,
    find_node,
    is_complete,
    iter_tasks,
    predecessors,
    ready_tasks,
    top_level_nodes,
)
from pgskewer.model import ACTIVE_STATUSES, ErrorInfo, Status
from pgskewer.schema import Settings, pgqueuer_queries

logger = logging.getLogger("pgskewer")

#: Results larger than this many bytes of encoded JSON are not copied into the payload of
#: later steps; the payload carries ``result: None`` and a ``result_ref`` instead.
INLINE_RESULT_LIMIT = 1024 * 1024


# Sources of the entrypoint names registered in this process. A due step whose name is
# registered neither here nor by any live worker fails instead of waiting forever.
_local_name_sources: list[weakref.WeakMethod[Callable[[], Iterable[str]]]] = []


def add_local_names(source: Callable[[], Iterable[str]]) -> None:
    """Count the names the bound method ``source()`` returns as served when checking steps.

    Only a weak reference is kept, so a discarded queuer does not stay alive.
    """
    _local_name_sources[:] = [ref for ref in _local_name_sources if ref() is not None]
    _local_name_sources.append(weakref.WeakMethod(source))


def _local_names() -> set[str]:
    names: set[str] = set()
    for ref in list(_local_name_sources):
        source = ref()
        if source is not None:
            names.update(source())
    return names


class DuplicateRunError(ValueError):
    """A run with the same dedupe key is still in flight."""

    def __init__(self, dedupe_key: str, run_id: int | None) -> None:
        self.dedupe_key = dedupe_key
        self.run_id = run_id
        where = f" (run {run_id})" if run_id is not None else ""
        super().__init__(
            f"a run with dedupe key {dedupe_key!r} is still in flight{where}; wait for it "
            "to finish, cancel it, or use another dedupe key"
        )


@dataclasses.dataclass(frozen=True)
class Outcome:
    """The end of one attempt of a step: its status, stored result text and error."""

    status: Status
    result_text: str | None = None
    error: ErrorInfo | None = None
    crashable: bool = False

    @property
    def ok(self) -> bool:
        return self.status is Status.SUCCESSFUL


@dataclasses.dataclass(frozen=True)
class RunRow:
    id: int
    name: str
    kind: str
    status: Status
    graph: Node
    input: bytes | None
    failed_step: str | None
    priority: int = 0
    dedupe_key: str | None = None


async def start_run(
    connection: Any,
    settings: Settings,
    *,
    name: str,
    kind: str,
    graph: Node,
    payload: bytes | None,
    priority: int = 0,
    execute_after: timedelta | None = None,
    dedupe_key: str | None = None,
) -> int:
    """Create a run and enqueue its first steps; return the run id (the first job's id)."""
    async with connection.transaction():
        first = ready_tasks(graph, lambda _path: Status.PENDING)
        job_payloads = [payload if kind == "task" else None for _ in first]
        job_ids = await _enqueue(connection, first, job_payloads, priority, execute_after)
        run_id = min(job_ids)
        try:
            await connection.execute(
                f"INSERT INTO {settings.table('runs')} "
                "(id, name, kind, status, input, graph, dedupe_key, priority) "
                "VALUES ($1, $2, $3, 'queued', $4, $5, $6, $7)",
                run_id,
                name,
                kind,
                payload,
                json.dumps(graph),
                dedupe_key,
                priority,
            )
        except Exception as exc:
            if dedupe_key is not None and _is_unique_violation(exc):
                raise DuplicateRunError(dedupe_key, None) from None
            raise
        await _insert_steps(
            connection,
            settings,
            run_id,
            graph,
            dict(zip([n["path"] for n in first], job_ids, strict=True)),
        )
    return run_id


async def adopt_job(
    connection: Any,
    settings: Settings,
    *,
    job_id: int,
    name: str,
    kind: str,
    graph: Node,
    payload: bytes | None,
    priority: int,
) -> bool:
    """Create the run of a job that was enqueued with pgqueuer's own API.

    The job becomes step ``1`` of a task run, or the starter of a pipeline run whose
    steps are enqueued by :func:`settle`. Returns ``False`` when the run already exists.
    """
    async with connection.transaction():
        inserted = await connection.fetchval(
            f"INSERT INTO {settings.table('runs')} "
            "(id, name, kind, status, input, graph, priority) "
            "VALUES ($1, $2, $3, 'queued', $4, $5, $6) ON CONFLICT (id) DO NOTHING RETURNING id",
            job_id,
            name,
            kind,
            payload,
            json.dumps(graph),
            priority,
        )
        if inserted is None:
            return False
        jobs = {"1": job_id} if kind == "task" else {}
        await _insert_steps(connection, settings, job_id, graph, jobs)
        if kind != "task":
            run = await _lock_run(connection, settings, job_id)
            assert run is not None
            await settle(connection, settings, run)
    return True


async def convert_to_pipeline(
    connection: Any, settings: Settings, run_id: int, graph: Node
) -> None:
    """Turn a one-step run into a pipeline run with ``graph`` and enqueue its first steps.

    A process without the pipeline's definition (the CLI, a web app) enqueues its name as a
    task. The worker that registered the pipeline converts the run when it picks the job.
    """
    async with connection.transaction():
        run = await _lock_run(connection, settings, run_id)
        if run is None or run.kind != "task" or run.status.is_terminal:
            return
        await connection.execute(f"DELETE FROM {settings.table('steps')} WHERE run_id = $1", run_id)
        await connection.execute(
            f"UPDATE {settings.table('runs')} SET kind = 'pipeline', graph = $2, "
            "status = 'running', started = COALESCE(started, now()), updated = now() "
            "WHERE id = $1",
            run_id,
            json.dumps(graph),
        )
        await _insert_steps(connection, settings, run_id, graph, {})
        run = dataclasses.replace(run, kind="pipeline", graph=graph, status=Status.RUNNING)
        await settle(connection, settings, run)


async def _insert_steps(
    connection: Any, settings: Settings, run_id: int, graph: Node, jobs: Mapping[str, int]
) -> None:
    tasks = list(iter_tasks(graph))
    await connection.execute(
        f"INSERT INTO {settings.table('steps')} (run_id, path, task, status, job_id, queued) "
        "SELECT $1, path, task, CASE WHEN job_id IS NULL THEN 'pending' ELSE 'queued' END, "
        "job_id, CASE WHEN job_id IS NULL THEN NULL ELSE now() END "
        "FROM unnest($2::text[], $3::text[], $4::bigint[]) AS s(path, task, job_id)",
        run_id,
        [node["path"] for node in tasks],
        [node["name"] for node in tasks],
        [jobs.get(node["path"]) for node in tasks],
    )


async def _enqueue(
    connection: Any,
    nodes: list[Node],
    payloads: list[bytes | None],
    priority: int,
    execute_after: timedelta | None,
) -> list[int]:
    if not nodes:
        return []
    queries = pgqueuer_queries(connection)
    ids = await queries.enqueue(
        [node["name"] for node in nodes],
        payloads,
        [priority] * len(nodes),
        [execute_after] * len(nodes),
        headers=[dict(PGSKEWER_JOB_HEADER)] * len(nodes),
    )
    return [int(job_id) for job_id in ids if job_id is not None]


#: The header on every job pgskewer enqueues. A job without it was enqueued with
#: pgqueuer's own API and gets its run when a worker picks it.
PGSKEWER_JOB_HEADER: dict[str, str] = {"pgskewer": "step"}


async def _lock_run(connection: Any, settings: Settings, run_id: int) -> RunRow | None:
    row = await connection.fetchrow(
        f"SELECT id, name, kind, status, graph, input, failed_step, priority, dedupe_key "
        f"FROM {settings.table('runs')} WHERE id = $1 FOR UPDATE",
        run_id,
    )
    return None if row is None else _run_row(row)


def _run_row(row: Any) -> RunRow:
    return RunRow(
        id=row["id"],
        name=row["name"],
        kind=row["kind"],
        status=Status(row["status"]),
        graph=json.loads(row["graph"]),
        input=row["input"],
        failed_step=row["failed_step"],
        priority=row["priority"],
        dedupe_key=row["dedupe_key"],
    )


async def finish_step(
    connection: Any, settings: Settings, run_id: int, path: str, outcome: Outcome
) -> bool:
    """Store a step's terminal outcome and advance its run, atomically.

    Returns ``False`` (and changes nothing) when the step was already terminal, which
    happens when pgqueuer re-delivers a job that had in fact finished.
    """
    async with connection.transaction():
        row = await connection.fetchrow(
            "SELECT r.id, r.name, r.kind, r.status, r.graph, r.input, r.failed_step, "
            f"r.priority, r.dedupe_key, s.status AS step_status FROM {settings.table('runs')} AS r "
            f"LEFT JOIN {settings.table('steps')} AS s ON s.run_id = r.id AND s.path = $2 "
            "WHERE r.id = $1 FOR UPDATE OF r",
            run_id,
            path,
        )
        if row is None or row["step_status"] is None or Status(row["step_status"]).is_terminal:
            return False
        run = _run_row(row)

        await _store_step_outcome(connection, settings, run_id, path, outcome)
        run = await _react_to_outcome(connection, settings, run, path, outcome)
        await settle(connection, settings, run)
    return True


async def _store_step_outcome(
    connection: Any, settings: Settings, run_id: int, path: str, outcome: Outcome
) -> None:
    error_text = None if outcome.error is None else json.dumps(outcome.error)
    # One statement: a data-modifying WITH clause runs even though nothing reads it.
    await connection.execute(
        f"WITH finished AS (UPDATE {settings.table('steps')} SET status = $3, "
        "finished = now(), updated = now(), error = COALESCE($6::json, error) "
        "WHERE run_id = $1 AND path = $2) "
        f"INSERT INTO {settings.table('results')} (run_id, path, status, ok, result, error) "
        "VALUES ($1, $2, $3, $4, $5::json, $6::json) ON CONFLICT (run_id, path) DO NOTHING",
        run_id,
        path,
        outcome.status.value,
        outcome.ok,
        outcome.result_text,
        error_text,
    )


async def _react_to_outcome(
    connection: Any, settings: Settings, run: RunRow, path: str, outcome: Outcome
) -> RunRow:
    # A non-crashable failure fails the run; a canceled step cancels it. Either way the
    # run winds down: no new step starts and cancelable siblings are canceled.
    failed = outcome.status is Status.EXCEPTION and not outcome.crashable
    canceled = outcome.status is Status.CANCELED
    if run.status.is_terminal or not (failed or canceled):
        return run

    failed_step = run.failed_step
    if failed and failed_step is None and run.status is not Status.CANCELING:
        failed_step = path
    await connection.execute(
        f"UPDATE {settings.table('runs')} SET status = 'canceling', failed_step = $2, "
        "updated = now() WHERE id = $1",
        run.id,
        failed_step,
    )
    return dataclasses.replace(run, status=Status.CANCELING, failed_step=failed_step)


async def request_cancel(connection: Any, settings: Settings, run_id: int) -> Status | None:
    """Flag a run ``canceling`` and cancel its queued and cancelable running steps.

    Returns the run's status afterwards, or ``None`` for an unknown run. A run with no
    ``cancelable=False`` step running ends ``canceled`` before this returns.
    """
    async with connection.transaction():
        run = await _lock_run(connection, settings, run_id)
        if run is None:
            return None
        if run.status.is_terminal:
            return run.status
        if run.status is not Status.CANCELING:
            await connection.execute(
                f"UPDATE {settings.table('runs')} SET status = 'canceling', updated = now() "
                "WHERE id = $1",
                run_id,
            )
            run = dataclasses.replace(run, status=Status.CANCELING)
        return await settle(connection, settings, run)


async def settle_canceling(connection: Any, settings: Settings, run_id: int) -> None:
    """Wind down a run that is ``canceling``; do nothing to a run in any other state.

    Workers call this when they hear a run turn ``canceling``. The event may arrive late,
    after the run finished and was retried, so it must never cancel a run by itself.
    """
    async with connection.transaction():
        run = await _lock_run(connection, settings, run_id)
        if run is not None and run.status is Status.CANCELING:
            await settle(connection, settings, run)


async def settle(connection: Any, settings: Settings, run: RunRow) -> Status:
    """Enqueue the steps that may start, wind down a canceling run, or finish the run.

    Must run inside a transaction that holds the run row lock. Returns the run status.
    """
    if run.status.is_terminal:
        return run.status
    steps = await _step_rows(connection, settings, run.id)

    if run.status is Status.CANCELING:
        await _wind_down(connection, settings, run, steps)
        steps = await _step_rows(connection, settings, run.id)
        if any(Status(row["status"]) in ACTIVE_STATUSES for row in steps.values()):
            return Status.CANCELING
        final = Status.EXCEPTION if run.failed_step else Status.CANCELED
        await _finish_run(connection, settings, run, final, steps)
        return final

    def status_of(path: str) -> Status:
        return Status(steps[path]["status"])

    ready = ready_tasks(run.graph, status_of)
    unknown = await _unserved(connection, settings, ready)
    if unknown:
        for node in unknown:
            message = (
                f"no worker serves the entrypoint {node['name']!r} of step {node['path']}; "
                "register it in a worker (or fix the pipeline definition) and retry the run"
            )
            outcome = Outcome(
                Status.EXCEPTION, error={"type": "LookupError", "message": message, "traceback": ""}
            )
            await _store_step_outcome(connection, settings, run.id, node["path"], outcome)
            run = await _react_to_outcome(connection, settings, run, node["path"], outcome)
            logger.error("run %d: %s", run.id, message)
        return await settle(connection, settings, run)
    if ready:
        await _enqueue_steps(connection, settings, run, ready)
        return run.status
    if is_complete(run.graph, status_of):
        await _finish_run(connection, settings, run, Status.SUCCESSFUL, steps)
        return Status.SUCCESSFUL
    return run.status


async def _unserved(connection: Any, settings: Settings, nodes: list[Node]) -> list[Node]:
    if not nodes:
        return []
    local = _local_names()
    missing = [node for node in nodes if node["name"] not in local]
    if not missing:
        return []
    rows = await connection.fetch(
        f"SELECT DISTINCT unnest(entrypoints) AS name FROM {settings.table('workers')} "
        "WHERE last_seen > now() - interval '30 seconds'"
    )
    if not rows:
        # No live worker is registered yet: the steps wait for one.
        return []
    served = {row["name"] for row in rows}
    return [node for node in missing if node["name"] not in served]


async def _step_rows(connection: Any, settings: Settings, run_id: int) -> dict[str, Any]:
    rows = await connection.fetch(
        f"SELECT path, task, status, job_id, cancelable FROM {settings.table('steps')} "
        "WHERE run_id = $1",
        run_id,
    )
    return {row["path"]: row for row in rows}


async def _wind_down(
    connection: Any, settings: Settings, run: RunRow, steps: dict[str, Any]
) -> None:
    to_cancel = [
        row["job_id"]
        for row in steps.values()
        if row["job_id"] is not None
        and (
            row["status"] in ("queued", "retrying")
            or (row["status"] == "running" and row["cancelable"])
        )
    ]
    if to_cancel:
        # pgqueuer deletes the queued rows and notifies the workers running the others;
        # the job-log trigger marks the steps canceled or canceling in this transaction.
        await pgqueuer_queries(connection).mark_job_as_cancelled(to_cancel)
        # A job that already left the queue (its handler is finishing) gets no log row;
        # its step stays as it is until that handler stores its outcome.
    await connection.execute(
        f"UPDATE {settings.table('steps')} SET status = 'skipped', finished = now(), "
        "updated = now() WHERE run_id = $1 AND status = 'pending'",
        run.id,
    )


async def _enqueue_steps(
    connection: Any, settings: Settings, run: RunRow, nodes: list[Node]
) -> None:
    # A task run's job carries the run input as its payload; pipeline steps build theirs.
    payload = run.input if run.kind == "task" else None
    job_ids = await _enqueue(connection, nodes, [payload] * len(nodes), run.priority, None)
    await connection.execute(
        f"UPDATE {settings.table('steps')} AS s SET status = 'queued', job_id = j.job_id, "
        "queued = now(), updated = now() "
        "FROM unnest($2::text[], $3::bigint[]) AS j(path, job_id) "
        "WHERE s.run_id = $1 AND s.path = j.path",
        run.id,
        [node["path"] for node in nodes],
        job_ids,
    )


async def schedule_retry(
    connection: Any,
    settings: Settings,
    run_id: int,
    path: str,
    task: str,
    delay: float,
    error: ErrorInfo,
) -> bool:
    """Enqueue the next attempt of a failed step after ``delay`` seconds.

    Returns ``False`` when the run is winding down, in which case the caller stores the
    failure instead. A failed attempt that is retried writes no result and wakes no waiter.
    """
    async with connection.transaction():
        run = await _lock_run(connection, settings, run_id)
        if run is None or run.status is Status.CANCELING or run.status.is_terminal:
            return False
        # A task run's job carries the run input as its payload, like its first attempt.
        payload = run.input if run.kind == "task" else None
        [job_id] = await _enqueue(
            connection, [{"name": task}], [payload], run.priority, timedelta(seconds=delay)
        )
        await connection.execute(
            f"UPDATE {settings.table('steps')} SET status = 'retrying', job_id = $3, "
            "error = $4::json, queued = now(), updated = now() WHERE run_id = $1 AND path = $2",
            run_id,
            path,
            job_id,
            json.dumps(error),
        )
    return True


async def _finish_run(
    connection: Any, settings: Settings, run: RunRow, final: Status, steps: dict[str, Any]
) -> None:
    results = await _result_rows(connection, settings, run.id, None)
    if run.kind == "task":
        row = results.get("1")
        result_text = row["result"] if row else None
        error_text = row["error"] if row else None
        ok = bool(row["ok"]) if row else False
        status = Status(row["status"]) if row else final
    else:
        status = final
        ok = final is Status.SUCCESSFUL
        tasks = tasks_json(run, top_level_nodes(run.graph), results)
        result_text = '{"initial":' + initial_json(run.input) + ',"tasks":' + tasks + "}"
        error_text = _failed_step_error(run, steps, results)

    await connection.execute(
        f"INSERT INTO {settings.table('results')} (run_id, path, status, ok, result, error) "
        "VALUES ($1, '', $2, $3, $4::json, $5::json) ON CONFLICT (run_id, path) DO NOTHING",
        run.id,
        status.value,
        ok,
        result_text,
        error_text,
    )
    await connection.execute(
        f"UPDATE {settings.table('runs')} SET status = $2, finished = now(), updated = now() "
        "WHERE id = $1",
        run.id,
        status.value,
    )
    logger.info("run %d (%s) finished %s", run.id, run.name, status.value)


def _failed_step_error(run: RunRow, steps: dict[str, Any], results: dict[str, Any]) -> str | None:
    if run.failed_step is None:
        return None
    row = results.get(run.failed_step)
    error = json.loads(row["error"]) if row and row["error"] else {}
    error = {
        "type": error.get("type", "Exception"),
        "message": error.get("message", ""),
        "traceback": error.get("traceback", ""),
        "step": run.failed_step,
        "task": steps[run.failed_step]["task"] if run.failed_step in steps else "",
    }
    return json.dumps(error)


async def _result_rows(
    connection: Any, settings: Settings, run_id: int, paths: list[str] | None
) -> dict[str, Any]:
    if paths is None:
        rows = await connection.fetch(
            f"SELECT path, status, ok, result, error, octet_length(result::text) AS size "
            f"FROM {settings.table('results')} WHERE run_id = $1 AND path <> ''",
            run_id,
        )
    else:
        rows = await connection.fetch(
            f"SELECT path, status, ok, result, error, octet_length(result::text) AS size "
            f"FROM {settings.table('results')} WHERE run_id = $1 AND path = ANY($2::text[])",
            run_id,
            paths,
        )
    return {row["path"]: row for row in rows}


def initial_json(payload: bytes | None) -> str:
    """Return the run input as JSON text to splice into a payload."""
    if payload is None or payload == b"":
        return "null"
    try:
        text = payload.decode("utf-8")
        json.loads(text, parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError):
        return encoding.encode_text(payload)
    return text


def _reject_constant(name: str) -> Any:
    # NaN and Infinity parse in Python but are not JSON, and PostgreSQL rejects them.
    raise ValueError(f"{name} is not valid JSON")


def tasks_json(run: RunRow, nodes: Iterable[Node], results: Mapping[str, Any]) -> str:
    """Return ``{name: TaskResult}`` JSON for ``nodes``, later names replacing earlier ones.

    The stored JSON texts are spliced, not decoded and encoded again.
    """
    entries: dict[str, str] = {}
    for node in nodes:
        text = _node_result_json(run, node, results)
        if text is not None:
            entries.pop(node["name"], None)
            entries[node["name"]] = text
    body = ",".join(f"{json.dumps(name)}:{text}" for name, text in entries.items())
    return "{" + body + "}"


def _node_result_json(run: RunRow, node: Node, results: Mapping[str, Any]) -> str | None:
    if node["kind"] == "task":
        row = results.get(node["path"])
        return None if row is None else task_result_json(row, run.id, node["path"])

    # A nested pipeline's result collects the results of its own steps.
    inner = [child for top in node["steps"] for child in _flatten_groups(top)]
    leaves = list(iter_tasks(node))
    rows = [results.get(leaf["path"]) for leaf in leaves]
    if any(row is None for row in rows):
        return None
    # Inside a run that goes on, an exception can only come from a crashable step.
    failed = any(leaf["path"] == run.failed_step for leaf in leaves)
    canceled = any(row["status"] == "canceled" for row in rows if row)
    if failed:
        status = "exception"
    elif canceled:
        status = "canceled"
    else:
        status = "successful"
    ok = status == "successful"
    tasks = tasks_json(run, inner, results)
    return (
        '{"status":'
        + json.dumps(status)
        + ',"ok":'
        + ("true" if ok else "false")
        + ',"result":{"tasks":'
        + tasks
        + "}}"
    )


def _flatten_groups(node: Node) -> list[Node]:
    if node["kind"] == "group":
        return [leaf for child in node["steps"] for leaf in _flatten_groups(child)]
    return [node]


def task_result_json(row: Any, run_id: int, path: str) -> str:
    """Return one stored result row as ``TaskResult`` JSON text."""
    parts = ['{"status":', json.dumps(row["status"]), ',"ok":', "true" if row["ok"] else "false"]
    result = row["result"]
    if result is not None and row["size"] is not None and row["size"] > INLINE_RESULT_LIMIT:
        ref = {"run_id": run_id, "step": path, "bytes": row["size"]}
        parts += [',"result":null,"result_ref":', json.dumps(ref)]
    else:
        parts += [',"result":', result if result is not None else "null"]
    if row["error"] is not None:
        parts += [',"error":', row["error"]]
    parts.append("}")
    return "".join(parts)


async def step_payload(connection: Any, settings: Settings, run: RunRow, path: str) -> bytes:
    """Assemble the payload a pipeline step receives from the stored results.

    ``{"initial": <run input>, "pipeline": {"name", "steps", "run_id", "step"},
    "tasks": {name: TaskResult}}`` with the results of every earlier step.
    """
    earlier = predecessors(run.graph, path)
    paths = [leaf["path"] for node in earlier for leaf in iter_tasks(node)]
    results = await _result_rows(connection, settings, run.id, paths) if paths else {}
    pipeline = {
        "name": run.name,
        "steps": _step_names(run.graph),
        "run_id": run.id,
        "step": path,
        "task": find_node(run.graph, path)["name"],
    }
    text = (
        '{"initial":'
        + initial_json(run.input)
        + ',"pipeline":'
        + json.dumps(pipeline)
        + ',"tasks":'
        + tasks_json(run, earlier, results)
        + "}"
    )
    return text.encode("utf-8")


def _step_names(node: Node) -> list[Any]:
    names: list[Any] = []
    for child in node["steps"]:
        names.append(
            [_name_or_group(member) for member in child["steps"]]
            if child["kind"] == "group"
            else child["name"]
        )
    return names


def _name_or_group(node: Node) -> Any:
    if node["kind"] == "group":
        return [_name_or_group(child) for child in node["steps"]]
    return node["name"]


def _is_unique_violation(exc: Exception) -> bool:
    return getattr(exc, "sqlstate", None) == "23505"


async def resume_run(connection: Any, settings: Settings, run_id: int) -> bool:
    """Run a failed or canceled run again from its failed, canceled and skipped steps.

    Successful steps keep their stored results. Returns ``False`` for an unknown run and
    raises ``ValueError`` naming the status when the run is still active or succeeded.
    """
    async with connection.transaction():
        run = await _lock_run(connection, settings, run_id)
        if run is None:
            return False
        if run.status not in (Status.EXCEPTION, Status.CANCELED):
            raise ValueError(
                f"run {run_id} is {run.status.value}; only a run that ended exception or "
                "canceled can be retried"
            )
        again = await connection.fetch(
            f"UPDATE {settings.table('steps')} SET status = 'pending', job_id = NULL, "
            "started = NULL, finished = NULL, queued = NULL, worker_id = NULL, error = NULL, "
            "updated = now() WHERE run_id = $1 "
            "AND status IN ('exception', 'canceled', 'skipped') RETURNING path",
            run_id,
        )
        paths = [row["path"] for row in again]
        await connection.execute(
            f"DELETE FROM {settings.table('results')} WHERE run_id = $1 "
            "AND (path = '' OR path = ANY($2::text[]))",
            run_id,
            paths,
        )
        try:
            await connection.execute(
                f"UPDATE {settings.table('runs')} SET status = 'running', failed_step = NULL, "
                "finished = NULL, updated = now() WHERE id = $1",
                run_id,
            )
        except Exception as exc:
            if _is_unique_violation(exc):
                raise DuplicateRunError(str(run.dedupe_key), None) from None
            raise
        run = dataclasses.replace(run, status=Status.RUNNING, failed_step=None)
        await settle(connection, settings, run)
    ordered = sorted(paths, key=lambda path: [int(part) for part in path.split(".")])
    logger.info("run %d retried from steps %s", run_id, ", ".join(ordered) or "none")
    return True


async def release_step(
    connection: Any, settings: Settings, run_id: int, path: str, task: str
) -> bool:
    """Give a running step back to the queue so another worker runs it from the start.

    Used when a worker stops and cancels the steps still running after its grace period.
    The step gets a new job; the attempt already counted stays counted. Returns ``False``
    when the run is winding down, in which case the caller stores the step as canceled.
    """
    async with connection.transaction():
        run = await _lock_run(connection, settings, run_id)
        if run is None or run.status is Status.CANCELING or run.status.is_terminal:
            return False
        payload = run.input if run.kind == "task" else None
        [job_id] = await _enqueue(connection, [{"name": task}], [payload], run.priority, None)
        await connection.execute(
            f"UPDATE {settings.table('steps')} SET status = 'queued', job_id = $3, "
            "worker_id = NULL, queued = now(), updated = now() WHERE run_id = $1 AND path = $2",
            run_id,
            path,
            job_id,
        )
    logger.info("run %d step %s released for another worker (job %d)", run_id, path, job_id)
    return True
