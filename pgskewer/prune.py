"""Retention: deleting finished runs and old pgqueuer log rows.

Neither pgskewer nor pgqueuer deletes anything by itself: runs, steps, results, output
lines and ``pgqueuer_log`` rows grow without bound until :func:`prune` runs (by hand,
from ``pgskewer prune``, or periodically in a worker started with ``prune_after``).
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

from pgskewer.schema import Settings, pgqueuer_queries

logger = logging.getLogger("pgskewer")

#: Runs deleted per transaction, so a large backlog never holds locks for long.
BATCH_SIZE = 1000

_FINISHED = "('successful', 'exception', 'canceled')"
_ACTIVE = "('pending', 'queued', 'running', 'retrying', 'canceling')"


async def prune(
    connection: Any,
    settings: Settings,
    older_than: timedelta,
    *,
    batch_size: int = BATCH_SIZE,
) -> dict[str, int]:
    """Delete runs that finished before ``now() - older_than``, and old pgqueuer log rows.

    A run goes with its steps, results and output lines. ``pgqueuer_log`` rows created
    before the cutoff go too, except those of jobs still in the queue and of runs still in
    flight. Runs that have not finished are never deleted, however old. Returns the number
    of deleted rows per table: ``runs``, ``steps``, ``results``, ``log_lines`` and
    ``pgqueuer_log``.

    Deleted pgqueuer log rows that pgqueuer had not yet folded into its statistics table
    are missing from those statistics. Work happens in transactions of at most
    ``batch_size`` runs, so a concurrent prune skips the rows this one is deleting.
    """
    if older_than < timedelta(0):
        raise ValueError(f"older_than must not be negative, got {older_than}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")

    counts = {"runs": 0, "steps": 0, "results": 0, "log_lines": 0, "pgqueuer_log": 0}
    while True:
        batch = await _prune_runs(connection, settings, older_than, batch_size)
        for table, count in batch.items():
            counts[table] += count
        if batch["runs"] < batch_size:
            break
    counts["pgqueuer_log"] = await _prune_job_log(connection, settings, older_than, batch_size)
    logger.info("pruned rows older than %s: %s", older_than, counts)
    return counts


async def _prune_runs(
    connection: Any, settings: Settings, older_than: timedelta, batch_size: int
) -> dict[str, int]:
    runs = settings.table("runs")
    async with connection.transaction():
        ids = [
            row["id"]
            for row in await connection.fetch(
                f"SELECT id FROM {runs} WHERE status IN {_FINISHED} AND finished IS NOT NULL "
                "AND finished < now() - $1::interval ORDER BY id LIMIT $2 "
                "FOR UPDATE SKIP LOCKED",
                older_than,
                batch_size,
            )
        ]
        counts = {"runs": len(ids)}
        if not ids:
            return {"runs": 0, "steps": 0, "results": 0, "log_lines": 0}
        # The foreign keys cascade, but deleting each table explicitly counts its rows.
        for table in ("log_lines", "results", "steps"):
            status = await connection.execute(
                f"DELETE FROM {settings.table(table)} WHERE run_id = ANY($1::bigint[])", ids
            )
            counts[table] = _row_count(status)
        await connection.execute(f"DELETE FROM {runs} WHERE id = ANY($1::bigint[])", ids)
    return counts


async def _prune_job_log(
    connection: Any, settings: Settings, older_than: timedelta, batch_size: int
) -> int:
    queue_settings = pgqueuer_queries(connection).qbe.settings
    log_table, queue_table = queue_settings.queue_table_log, queue_settings.queue_table
    runs, steps = settings.table("runs"), settings.table("steps")
    total = 0
    while True:
        # A run's id is the id of its first job; later jobs are the steps' current jobs.
        status = await connection.execute(
            f"DELETE FROM {log_table} WHERE id IN ("
            f"SELECT l.id FROM {log_table} AS l WHERE l.created < now() - $1::interval "
            f"AND NOT EXISTS (SELECT 1 FROM {queue_table} AS q WHERE q.id = l.job_id) "
            f"AND NOT EXISTS (SELECT 1 FROM {runs} AS r WHERE r.id = l.job_id "
            f"AND r.status IN {_ACTIVE}) "
            f"AND NOT EXISTS (SELECT 1 FROM {steps} AS s JOIN {runs} AS r ON r.id = s.run_id "
            f"WHERE s.job_id = l.job_id AND r.status IN {_ACTIVE}) "
            "ORDER BY l.id LIMIT $2)",
            older_than,
            batch_size,
        )
        deleted = _row_count(status)
        total += deleted
        if deleted < batch_size:
            return total


def _row_count(status: str) -> int:
    # asyncpg returns the command tag, e.g. "DELETE 12".
    return int(status.split()[-1])
