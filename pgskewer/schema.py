"""pgskewer's tables and triggers, installed next to pgqueuer's own schema.

``install`` converges pgqueuer's schema through pgqueuer's upgrade API and then creates or
upgrades pgskewer's tables. Both steps are idempotent: a second install changes nothing.
Statuses are kept as text in pgskewer's tables; pgqueuer's enum and log are never given
values of pgskewer's.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from typing import Any

from pgqueuer import AsyncpgDriver, Queries

logger = logging.getLogger("pgskewer")

#: Bumped whenever the DDL below changes; stored in the ``meta`` table.
SCHEMA_VERSION = 1

_IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_]{0,40}$")


@dataclasses.dataclass(frozen=True)
class Settings:
    """Names of pgskewer's database objects.

    ``prefix`` starts every table, function and trigger name; ``channel`` is the NOTIFY
    channel for run and step events. Both must be lowercase SQL identifiers because they
    are placed into DDL; they are validated on construction.
    """

    prefix: str = "pgskewer_"
    channel: str = "pgskewer_events"

    def __post_init__(self) -> None:
        for field, value in (("prefix", self.prefix), ("channel", self.channel)):
            if not _IDENTIFIER.match(value):
                raise ValueError(
                    f"invalid {field} {value!r}: use lowercase letters, digits and "
                    "underscores, starting with a letter or underscore (at most 41 characters)"
                )

    def table(self, name: str) -> str:
        """Return the full name of one of pgskewer's tables, e.g. ``pgskewer_runs``."""
        return f"{self.prefix}{name}"


DEFAULT_SETTINGS = Settings()

_TERMINAL = "('successful', 'exception', 'canceled', 'skipped')"


def ddl(settings: Settings, log_table: str) -> str:
    """Return the idempotent DDL of pgskewer's tables, functions and triggers."""
    p = settings.prefix
    return f"""
CREATE TABLE IF NOT EXISTS {p}meta (
    key text PRIMARY KEY,
    value text NOT NULL
);

CREATE TABLE IF NOT EXISTS {p}runs (
    id bigint PRIMARY KEY,
    name text NOT NULL,
    kind text NOT NULL CHECK (kind IN ('task', 'pipeline')),
    status text NOT NULL,
    input bytea,
    graph json NOT NULL,
    dedupe_key text,
    failed_step text,
    priority integer NOT NULL DEFAULT 0,
    created timestamptz NOT NULL DEFAULT now(),
    started timestamptz,
    finished timestamptz,
    updated timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX IF NOT EXISTS {p}runs_active_dedupe_key
    ON {p}runs (dedupe_key)
    WHERE dedupe_key IS NOT NULL AND status NOT IN {_TERMINAL};
CREATE INDEX IF NOT EXISTS {p}runs_created ON {p}runs (created DESC);
CREATE INDEX IF NOT EXISTS {p}runs_active ON {p}runs (status) WHERE status NOT IN {_TERMINAL};

CREATE TABLE IF NOT EXISTS {p}steps (
    run_id bigint NOT NULL REFERENCES {p}runs (id) ON DELETE CASCADE,
    path text NOT NULL,
    task text NOT NULL,
    status text NOT NULL,
    attempts integer NOT NULL DEFAULT 0,
    job_id bigint,
    worker_id uuid,
    cancelable boolean NOT NULL DEFAULT true,
    queued timestamptz,
    started timestamptz,
    finished timestamptz,
    updated timestamptz NOT NULL DEFAULT now(),
    error json,
    PRIMARY KEY (run_id, path)
);
CREATE UNIQUE INDEX IF NOT EXISTS {p}steps_job_id ON {p}steps (job_id);
CREATE INDEX IF NOT EXISTS {p}steps_active_worker
    ON {p}steps (worker_id) WHERE status NOT IN {_TERMINAL};

CREATE TABLE IF NOT EXISTS {p}results (
    run_id bigint NOT NULL REFERENCES {p}runs (id) ON DELETE CASCADE,
    path text NOT NULL,
    status text NOT NULL,
    ok boolean NOT NULL,
    result json,
    error json,
    created timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (run_id, path)
);

CREATE TABLE IF NOT EXISTS {p}log_lines (
    id bigserial PRIMARY KEY,
    run_id bigint NOT NULL REFERENCES {p}runs (id) ON DELETE CASCADE,
    step text NOT NULL,
    stream text NOT NULL,
    seq integer NOT NULL,
    text text NOT NULL,
    created timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS {p}log_lines_run ON {p}log_lines (run_id, id);

CREATE TABLE IF NOT EXISTS {p}workers (
    id uuid PRIMARY KEY,
    host text NOT NULL,
    pid integer NOT NULL,
    entrypoints text[] NOT NULL,
    lock_key bigint NOT NULL,
    started timestamptz NOT NULL DEFAULT now(),
    last_seen timestamptz NOT NULL DEFAULT now()
);

CREATE OR REPLACE FUNCTION {p}notify_run_change() RETURNS trigger
LANGUAGE plpgsql AS $fn$
BEGIN
    IF TG_OP = 'INSERT' OR OLD.status IS DISTINCT FROM NEW.status THEN
        PERFORM pg_notify('{settings.channel}',
            json_build_object('run', NEW.id, 'step', '', 'status', NEW.status)::text);
    END IF;
    RETURN NULL;
END
$fn$;

CREATE OR REPLACE FUNCTION {p}notify_step_change() RETURNS trigger
LANGUAGE plpgsql AS $fn$
BEGIN
    IF TG_OP = 'INSERT' OR OLD.status IS DISTINCT FROM NEW.status THEN
        PERFORM pg_notify('{settings.channel}',
            json_build_object('run', NEW.run_id, 'step', NEW.path, 'status', NEW.status)::text);
    END IF;
    RETURN NULL;
END
$fn$;

DROP TRIGGER IF EXISTS {p}runs_notify ON {p}runs;
CREATE TRIGGER {p}runs_notify AFTER INSERT OR UPDATE OF status ON {p}runs
    FOR EACH ROW EXECUTE FUNCTION {p}notify_run_change();

DROP TRIGGER IF EXISTS {p}steps_notify ON {p}steps;
CREATE TRIGGER {p}steps_notify AFTER INSERT OR UPDATE OF status ON {p}steps
    FOR EACH ROW EXECUTE FUNCTION {p}notify_step_change();

-- pgqueuer cancels a queued job by deleting its row and logging 'canceled', and
-- clear_queue logs 'deleted'; no handler runs in either case, so this trigger
-- finishes the step. A running step becomes 'canceling' until its handler returns.
CREATE OR REPLACE FUNCTION {p}on_job_log() RETURNS trigger
LANGUAGE plpgsql AS $fn$
DECLARE
    step_row record;
    run_row record;
    reason text;
BEGIN
    reason := CASE NEW.status::text
        WHEN 'deleted' THEN 'the job was deleted from the queue'
        ELSE 'the job was canceled' END;

    UPDATE {p}steps
    SET status = CASE WHEN status = 'running' THEN 'canceling' ELSE 'canceled' END,
        finished = CASE WHEN status = 'running' THEN finished ELSE now() END,
        updated = now()
    WHERE job_id = NEW.job_id AND status NOT IN {_TERMINAL} AND status <> 'canceling'
    RETURNING run_id, path, status INTO step_row;

    IF NOT FOUND THEN
        RETURN NULL;
    END IF;

    IF step_row.status = 'canceled' THEN
        INSERT INTO {p}results (run_id, path, status, ok, result, error)
        VALUES (step_row.run_id, step_row.path, 'canceled', false, NULL,
                json_build_object('type', 'CancelledError', 'message', reason, 'traceback', ''))
        ON CONFLICT DO NOTHING;
    END IF;

    SELECT id, kind, status INTO run_row FROM {p}runs WHERE id = step_row.run_id FOR UPDATE;
    IF run_row.status IN {_TERMINAL} THEN
        RETURN NULL;
    END IF;

    IF run_row.kind = 'task' AND step_row.status = 'canceled' THEN
        UPDATE {p}runs SET status = 'canceled', finished = now(), updated = now()
        WHERE id = run_row.id;
        INSERT INTO {p}results (run_id, path, status, ok, result, error)
        VALUES (run_row.id, '', 'canceled', false, NULL,
                json_build_object('type', 'CancelledError', 'message', reason, 'traceback', ''))
        ON CONFLICT DO NOTHING;
    ELSIF run_row.status <> 'canceling' THEN
        UPDATE {p}runs SET status = 'canceling', updated = now() WHERE id = run_row.id;
    END IF;
    RETURN NULL;
END
$fn$;

DROP TRIGGER IF EXISTS {p}job_log_finish ON {log_table};
CREATE TRIGGER {p}job_log_finish AFTER INSERT ON {log_table}
    FOR EACH ROW WHEN (NEW.status::text IN ('canceled', 'deleted'))
    EXECUTE FUNCTION {p}on_job_log();
"""


def pgqueuer_queries(connection: Any) -> Queries:
    """Return pgqueuer's ``Queries`` bound to one asyncpg connection."""
    return Queries(AsyncpgDriver(connection))


async def install(connection: Any, settings: Settings = DEFAULT_SETTINGS) -> bool:
    """Create or upgrade pgqueuer's schema and pgskewer's tables on ``connection``.

    Returns ``True`` when anything changed. Safe to run concurrently from several
    processes: both steps hold an advisory lock, and every statement is idempotent.
    """
    queries = pgqueuer_queries(connection)
    plan = await queries.apply_upgrade()
    changed = bool(plan.statements)
    if changed:
        logger.info("pgqueuer schema: applied %d statements", len(plan.statements))

    log_table = queries.qbe.settings.queue_table_log
    lock_key = _advisory_key(settings.prefix)
    async with connection.transaction():
        await connection.execute("SELECT pg_advisory_xact_lock($1)", lock_key)
        installed = await _installed_version(connection, settings)
        if installed == SCHEMA_VERSION:
            return changed
        if installed is not None and installed > SCHEMA_VERSION:
            raise RuntimeError(
                f"database schema version {installed} is newer than this pgskewer "
                f"({SCHEMA_VERSION}); upgrade the pgskewer package"
            )
        await connection.execute(ddl(settings, log_table))
        await connection.execute(
            f"INSERT INTO {settings.table('meta')} (key, value) VALUES ('schema_version', $1) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            str(SCHEMA_VERSION),
        )
    logger.info("pgskewer schema version %d installed", SCHEMA_VERSION)
    return True


async def _installed_version(connection: Any, settings: Settings) -> int | None:
    exists = await connection.fetchval("SELECT to_regclass($1) IS NOT NULL", settings.table("meta"))
    if not exists:
        return None
    value = await connection.fetchval(
        f"SELECT value FROM {settings.table('meta')} WHERE key = 'schema_version'"
    )
    return None if value is None else int(value)


async def is_installed(connection: Any, settings: Settings = DEFAULT_SETTINGS) -> bool:
    """Whether pgskewer's schema of this version is present."""
    return await _installed_version(connection, settings) == SCHEMA_VERSION


def _advisory_key(prefix: str) -> int:
    # A stable 63-bit key derived from the prefix, so installs with different prefixes
    # do not wait on each other.
    value = 0
    for char in "pgskewer-install:" + prefix:
        value = (value * 131 + ord(char)) % (2**61 - 1)
    return value
