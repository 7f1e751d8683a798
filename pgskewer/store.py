"""Reads of runs, steps and results, and the claim a worker makes before running a step."""

from __future__ import annotations

import dataclasses
import json
import uuid
from typing import Any, cast

from pgskewer import encoding
from pgskewer.advance import RunRow
from pgskewer.model import ErrorInfo, RunState, Status, StepState, TaskResult
from pgskewer.schema import Settings


@dataclasses.dataclass
class Claim:
    """A step that this worker may run now, with what it needs to build the payload."""

    run: RunRow
    path: str
    task: str
    attempts: int
    payload: bytes | None = None


async def claim_step(
    connection: Any, settings: Settings, job_id: int, worker_id: uuid.UUID
) -> Claim | None:
    """Mark the step of ``job_id`` running and count the attempt, in one statement.

    Returns ``None`` when the job belongs to no step, or its step is terminal or
    canceling, or its run is winding down: the caller decides what that means.
    """
    steps, runs = settings.table("steps"), settings.table("runs")
    row = await connection.fetchrow(
        f"""
        WITH claimed AS (
            UPDATE {steps} AS s
            SET status = 'running', attempts = s.attempts + 1, started = now(),
                finished = NULL, worker_id = $2, updated = now()
            FROM {runs} AS r
            WHERE s.job_id = $1 AND r.id = s.run_id
              AND s.status IN ('queued', 'running', 'retrying')
              AND r.status IN ('queued', 'running')
            RETURNING s.run_id, s.path, s.task, s.attempts
        ), started AS (
            UPDATE {runs} AS r SET status = 'running', started = COALESCE(r.started, now()),
                updated = now()
            FROM claimed WHERE r.id = claimed.run_id AND r.status = 'queued'
            RETURNING r.id
        )
        SELECT c.run_id, c.path, c.task, c.attempts, r.name, r.kind, r.graph, r.input,
               r.failed_step, (SELECT count(*) FROM started) AS started
        FROM claimed AS c JOIN {runs} AS r ON r.id = c.run_id
        """,
        job_id,
        worker_id,
    )
    if row is None:
        return None
    run = RunRow(
        id=row["run_id"],
        name=row["name"],
        kind=row["kind"],
        status=Status.RUNNING,
        graph=json.loads(row["graph"]),
        input=row["input"],
        failed_step=row["failed_step"],
    )
    return Claim(run=run, path=row["path"], task=row["task"], attempts=row["attempts"])


async def step_of_job(
    connection: Any, settings: Settings, job_id: int
) -> tuple[int, str, Status, Status] | None:
    """Return ``(run_id, path, step status, run status)`` of a job, or ``None``."""
    row = await connection.fetchrow(
        f"SELECT s.run_id, s.path, s.status, r.status AS run_status "
        f"FROM {settings.table('steps')} AS s JOIN {settings.table('runs')} AS r "
        "ON r.id = s.run_id WHERE s.job_id = $1",
        job_id,
    )
    if row is None:
        return None
    return row["run_id"], row["path"], Status(row["status"]), Status(row["run_status"])


async def fetch_result(connection: Any, settings: Settings, run_id: int) -> TaskResult | None:
    """Return the stored result of a finished run, or ``None`` while it runs."""
    row = await connection.fetchrow(
        f"SELECT r.status, r.ok, r.result, r.error, runs.kind "
        f"FROM {settings.table('results')} AS r JOIN {settings.table('runs')} AS runs "
        "ON runs.id = r.run_id WHERE r.run_id = $1 AND r.path = ''",
        run_id,
    )
    return None if row is None else result_from_row(row, row["kind"])


async def fetch_step_result(
    connection: Any, settings: Settings, run_id: int, path: str
) -> TaskResult | None:
    """Return the stored result of one step, or ``None`` while it runs."""
    row = await connection.fetchrow(
        f"SELECT status, ok, result, error FROM {settings.table('results')} "
        "WHERE run_id = $1 AND path = $2",
        run_id,
        path,
    )
    return None if row is None else result_from_row(row, "task")


def result_from_row(row: Any, kind: str) -> TaskResult:
    """Decode one results row into a ``TaskResult``."""
    result: dict[str, Any] = {
        "status": row["status"],
        "ok": row["ok"],
        "result": encoding.decode(row["result"]) if row["result"] is not None else None,
    }
    if row["error"] is not None:
        error = json.loads(row["error"])
        if kind == "pipeline" and "step" in error:
            result["failed_step"] = error
            result["error"] = {key: error[key] for key in ("type", "message", "traceback")}
        else:
            result["error"] = error
    return cast(TaskResult, result)


async def run_exists(connection: Any, settings: Settings, run_id: int) -> bool:
    """Whether pgskewer has a run with this id."""
    return bool(
        await connection.fetchval(
            f"SELECT EXISTS (SELECT 1 FROM {settings.table('runs')} WHERE id = $1)", run_id
        )
    )


async def job_state(connection: Any, job_id: int) -> str | None:
    """Return pgqueuer's latest status of a job that pgskewer has no run for, or ``None``."""
    queued = await connection.fetchval("SELECT status::text FROM pgqueuer WHERE id = $1", job_id)
    if queued is not None:
        return str(queued)
    logged = await connection.fetchval(
        "SELECT status::text FROM pgqueuer_log WHERE job_id = $1 ORDER BY id DESC LIMIT 1", job_id
    )
    return None if logged is None else str(logged)


_RUN_COLUMNS = "id, name, kind, status, graph, dedupe_key, failed_step, created, started, finished"


async def fetch_run_state(connection: Any, settings: Settings, run_id: int) -> RunState | None:
    """Return a run with the state of every step, or ``None`` for an unknown id."""
    run = await connection.fetchrow(
        f"SELECT {_RUN_COLUMNS} FROM {settings.table('runs')} WHERE id = $1", run_id
    )
    if run is None:
        return None
    steps = await connection.fetch(
        f"SELECT path, task, status, attempts, job_id, queued, started, finished, error "
        f"FROM {settings.table('steps')} WHERE run_id = $1",
        run_id,
    )
    return _run_state(run, steps)


async def fetch_runs(
    connection: Any,
    settings: Settings,
    *,
    limit: int,
    status: str | None,
    name: str | None,
) -> list[RunState]:
    """Return recent runs, newest first, optionally filtered by status and name."""
    runs = await connection.fetch(
        f"SELECT {_RUN_COLUMNS} FROM {settings.table('runs')} "
        "WHERE ($2::text IS NULL OR status = $2) AND ($3::text IS NULL OR name = $3) "
        "ORDER BY id DESC LIMIT $1",
        limit,
        status,
        name,
    )
    if not runs:
        return []
    steps = await connection.fetch(
        f"SELECT run_id, path, task, status, attempts, job_id, queued, started, finished, error "
        f"FROM {settings.table('steps')} WHERE run_id = ANY($1::bigint[])",
        [run["id"] for run in runs],
    )
    by_run: dict[int, list[Any]] = {}
    for step in steps:
        by_run.setdefault(step["run_id"], []).append(step)
    return [_run_state(run, by_run.get(run["id"], [])) for run in runs]


def _run_state(run: Any, steps: list[Any]) -> RunState:
    graph = json.loads(run["graph"])
    order = {node_path: index for index, node_path in enumerate(_task_paths(graph))}
    states = sorted(
        (
            StepState(
                path=step["path"],
                task=step["task"],
                status=Status(step["status"]),
                attempts=step["attempts"],
                job_id=step["job_id"],
                queued_at=step["queued"],
                started_at=step["started"],
                finished_at=step["finished"],
                error=cast(ErrorInfo, json.loads(step["error"])) if step["error"] else None,
            )
            for step in steps
        ),
        key=lambda state: order.get(state.path, len(order)),
    )
    return RunState(
        id=run["id"],
        name=run["name"],
        kind=run["kind"],
        status=Status(run["status"]),
        graph=graph,
        steps=tuple(states),
        created_at=run["created"],
        started_at=run["started"],
        finished_at=run["finished"],
        dedupe_key=run["dedupe_key"],
        failed_step=run["failed_step"],
    )


def _task_paths(node: dict[str, Any]) -> list[str]:
    if node["kind"] == "task":
        return [node["path"]]
    return [path for child in node["steps"] for path in _task_paths(child)]
