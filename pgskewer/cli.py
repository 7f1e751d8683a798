"""The ``pgskewer`` command: install the schema, run workers, enqueue and inspect runs.

Every subcommand takes ``--dsn``. Without it the database is found like
:func:`pgskewer.connect` finds it (``PGSKEWER_DSN``, ``DATABASE_URL``, libpq ``PG*``
variables) and, when none is set, the embedded server is used. ``worker`` is the exception:
it never falls back to the embedded server on its own and needs a DSN or ``--embedded``.

Expected errors print one line on stderr and exit with one of the codes of
:class:`ExitCode`; a DSN's password never appears in output, logs or error messages.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import enum
import json
import logging
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, NoReturn
from urllib.parse import unquote, urlsplit

import anyio

from pgskewer.dsn import describe_dsn, discover_dsn, normalize_dsn, redact_dsn
from pgskewer.model import LogLine, RunState, Status, TaskResult

if TYPE_CHECKING:
    from rich.console import Console, RenderableType

    from pgskewer.queuer import ImprovedQueuer

logger = logging.getLogger("pgskewer")

#: Rows of the recent-runs table that ``pgskewer status`` shows without a run id.
RECENT_RUNS = 10
#: Log lines that ``pgskewer watch`` shows under the step table.
WATCH_LOG_TAIL = 15
#: Width of rich output written to a pipe or file, where no terminal width exists.
PIPE_WIDTH = 200


class ExitCode(enum.IntEnum):
    """Exit statuses of the ``pgskewer`` command."""

    OK = 0
    RUN_FAILED = 1
    TIMED_OUT = 2
    CONFIG = 3
    UNREACHABLE = 4
    SCHEMA_MISSING = 5
    RUN_NOT_FOUND = 6
    ENTRYPOINT_NOT_FOUND = 7
    REJECTED = 8
    USAGE = 64
    INTERRUPTED = 130
    TERMINATED = 143


EXIT_CODES_HELP = """\
exit codes:
  0    success (for result, watch and enqueue --wait: the run ended successful)
  1    the run ended exception or canceled
  2    timed out waiting for the run
  3    invalid or missing database configuration (DSN, embedded server)
  4    the database server cannot be reached or rejected the connection
  5    pgskewer's tables are not installed; run 'pgskewer install'
  6    no run with this id
  7    worker: MODULE:ATTR not found or not an ImprovedQueuer
  8    request rejected (dedupe key in flight, run that cannot be retried)
  64   invalid command line or JSON payload
  130  interrupted by SIGINT (for worker: a second signal)
  143  terminated by SIGTERM (for worker: a second signal)
"""


class CliError(Exception):
    """An expected error: printed as one line on stderr, the process exits with ``code``."""

    def __init__(self, message: str, code: ExitCode) -> None:
        super().__init__(message)
        self.code = code


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors exit with ``ExitCode.USAGE``, not 2.

    Exit code 2 means a timeout for ``result`` and ``watch``.
    """

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(ExitCode.USAGE, f"{self.prog}: error: {message}\n")


# -- secrets -----------------------------------------------------------------------

_secrets: set[str] = set()


def _remember_password(dsn: str) -> None:
    """Record the password of ``dsn`` so that no printed text can contain it."""
    with contextlib.suppress(ValueError):
        password = urlsplit(dsn).password
        if password:
            _secrets.update({password, unquote(password)})


def scrub(text: str) -> str:
    """Replace every password seen in a DSN by this process with ``***``."""
    for secret in _secrets:
        text = text.replace(secret, "***")
    return text


class _ScrubbingFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return scrub(super().format(record))


def _configure_logging(verbosity: int, worker: bool) -> None:
    levels = {-1: logging.WARNING, 0: logging.INFO}
    level = levels.get(verbosity, logging.DEBUG)
    if worker:
        pattern = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
    else:
        pattern = "%(levelname)s: %(message)s"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_ScrubbingFormatter(pattern))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logger.setLevel(level)
    pgqueuer_logger = logging.getLogger("pgqueuer")
    pgqueuer_logger.setLevel(logging.DEBUG if verbosity > 0 else logging.WARNING)


# -- database ----------------------------------------------------------------------


def find_dsn(option: str | None) -> str | None:
    """Return the normalised DSN from ``--dsn`` or the environment, or ``None`` for none.

    Raises :class:`CliError` (``CONFIG``) when the DSN cannot be parsed.
    """
    if option is not None:
        _remember_password(option)
    try:
        dsn = normalize_dsn(option) if option else discover_dsn()
    except ValueError as exc:
        raise CliError(f"{exc}", ExitCode.CONFIG) from None
    if dsn is not None:
        _remember_password(dsn)
    return dsn


async def bind_queuer(queuer: ImprovedQueuer, dsn: str | None, *, embedded: bool) -> None:
    """Connect ``queuer`` to ``dsn``, or to the embedded server when ``embedded`` is set.

    Connection failures become :class:`CliError` with the password removed.
    """
    where = describe_dsn(dsn) if dsn is not None else "the embedded server"
    try:
        await queuer.bind(dsn, embedded=embedded)
    except ConnectionError as exc:
        raise CliError(scrub(str(exc)), ExitCode.UNREACHABLE) from None
    except (ValueError, ImportError) as exc:
        message = scrub(redact_dsn(str(exc)))
        raise CliError(
            f"cannot use {where}: {message}; check the DSN (postgresql://user:password@host:port"
            "/database) or the embedded server's data folder",
            ExitCode.CONFIG,
        ) from None


async def require_schema(queuer: ImprovedQueuer, dsn: str | None) -> None:
    """Raise :class:`CliError` (``SCHEMA_MISSING``) unless pgskewer's tables exist."""
    from pgskewer import schema

    async with queuer.pool.acquire() as connection:
        installed = await schema.is_installed(connection, queuer.settings)
    if not installed:
        where = describe_dsn(dsn) if dsn is not None else "the embedded server"
        raise CliError(
            f"pgskewer's tables are not installed in {where}; run 'pgskewer install' "
            "with the same database options first",
            ExitCode.SCHEMA_MISSING,
        )


@contextlib.asynccontextmanager
async def open_queuer(
    option: str | None, *, schema_required: bool = True
) -> AsyncIterator[ImprovedQueuer]:
    """Yield a connected queuer for a client command and close it afterwards.

    Without a DSN in ``option`` or the environment this starts (or attaches to) the
    embedded server in its default data folder, and detaches from it at the end.
    """
    from pgskewer.queuer import ImprovedQueuer

    dsn = find_dsn(option)
    queuer = ImprovedQueuer()
    try:
        await bind_queuer(queuer, dsn, embedded=dsn is None)
        if schema_required:
            await require_schema(queuer, dsn)
        yield queuer
    finally:
        with anyio.CancelScope(shield=True):
            await queuer.close()


# -- output ------------------------------------------------------------------------


def _console(stderr: bool = False) -> Console:
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    width = None if stream.isatty() or os.environ.get("COLUMNS") else PIPE_WIDTH
    return Console(file=stream, width=width, highlight=False)


def _print(renderable: RenderableType) -> None:
    _console().print(renderable)


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)


def _print_json(value: Any) -> None:
    print(json.dumps(value, default=_json_default, ensure_ascii=False, indent=2))


def run_json(state: RunState) -> dict[str, Any]:
    """Return ``state`` as a JSON-ready dict (statuses as words, times as ISO 8601)."""
    data = dataclasses.asdict(state)
    data["steps"] = [
        {**dataclasses.asdict(step), "duration": step.duration} for step in state.steps
    ]
    return data


def _result_text(result: TaskResult, indent: int | None) -> str:
    from pgskewer.encoding import encode_text

    text = encode_text(result)
    if indent is None:
        return text
    return json.dumps(json.loads(text), ensure_ascii=False, indent=indent)


def _exit_code_of(result: TaskResult) -> ExitCode:
    return ExitCode.OK if result["ok"] else ExitCode.RUN_FAILED


# -- client commands ---------------------------------------------------------------


async def cmd_install(args: argparse.Namespace) -> int:
    """Create or upgrade the schema and print whether anything changed."""
    async with open_queuer(args.dsn, schema_required=False) as queuer:
        changed = await queuer.install()
    print("schema installed or upgraded" if changed else "schema already up to date")
    return ExitCode.OK


def parse_json_argument(text: str) -> bytes:
    """Check that ``text`` is JSON and return it unchanged as UTF-8 bytes.

    The payload is stored verbatim, so key order and number formatting are kept.
    """
    try:
        json.loads(text)
    except json.JSONDecodeError as exc:
        raise CliError(
            f"invalid JSON payload: {exc.msg} at line {exc.lineno} column {exc.colno} "
            f"(character {exc.pos}); pass one JSON value, for example '{{\"x\": 1}}'",
            ExitCode.USAGE,
        ) from None
    return text.encode("utf-8")


async def cmd_enqueue(args: argparse.Namespace) -> int:
    """Enqueue a run; print its id, and with ``--wait`` its result."""
    from pgskewer.advance import DuplicateRunError

    payload = parse_json_argument(args.payload) if args.payload is not None else None
    async with open_queuer(args.dsn) as queuer:
        try:
            run_id = await queuer.enqueue(
                args.name, payload, priority=args.priority, dedupe_key=args.dedupe_key
            )
        except DuplicateRunError as exc:
            raise CliError(str(exc), ExitCode.REJECTED) from None
        if not args.wait:
            print(run_id, flush=True)
            return ExitCode.OK
        # With --wait, stdout is one JSON document: the result. The id goes to stderr.
        print(f"run {run_id}", file=sys.stderr, flush=True)
        return await _wait_and_print(queuer, run_id, args.timeout, args.indent)


async def _wait_and_print(
    queuer: ImprovedQueuer, run_id: int, timeout: float | None, indent: int | None
) -> int:
    result = await queuer.result(run_id, timeout=timeout)
    if result is None:
        state = await queuer.run_status(run_id)
        raise CliError(
            f"timed out after {timeout:g} s waiting for run {run_id}, which is still "
            f"{state.status.value}; wait longer with 'pgskewer result {run_id}'",
            ExitCode.TIMED_OUT,
        )
    print(_result_text(result, indent))
    return _exit_code_of(result)


async def cmd_result(args: argparse.Namespace) -> int:
    """Wait for a run's result and print it as JSON."""
    async with open_queuer(args.dsn) as queuer:
        return await _wait_and_print(queuer, args.run_id, args.timeout, args.indent)


async def cmd_status(args: argparse.Namespace) -> int:
    """Print one run's step table, or run counts and recent runs."""
    from pgskewer import views

    async with open_queuer(args.dsn) as queuer:
        if args.run_id is None:
            counts = await _count_runs(queuer)
            recent = await queuer.runs(limit=RECENT_RUNS)
            if args.json:
                _print_json({"counts": counts, "recent": [run_json(run) for run in recent]})
            else:
                _print(_counts_table(counts))
                print()
                _print(views.runs_rich(recent))
            return ExitCode.OK

        state = await queuer.run_status(args.run_id)
        if args.json:
            _print_json(run_json(state))
        else:
            _print(views.run_rich(state))
        return ExitCode.OK


async def _count_runs(queuer: ImprovedQueuer) -> dict[str, dict[str, int]]:
    async with queuer.pool.acquire() as connection:
        rows = await connection.fetch(
            f"SELECT name, status, count(*) AS runs FROM {queuer.settings.table('runs')} "
            "GROUP BY name, status ORDER BY name"
        )
    counts: dict[str, dict[str, int]] = {}
    for row in rows:
        counts.setdefault(row["name"], {})[row["status"]] = row["runs"]
    return counts


def _counts_table(counts: dict[str, dict[str, int]]) -> RenderableType:
    from rich.table import Table

    from pgskewer.views import STATUS_COLORS

    seen = {status for by_status in counts.values() for status in by_status}
    columns = [status for status in Status if status.value in seen]
    table = Table(title="runs per entrypoint", title_justify="left", box=None, pad_edge=False)
    table.add_column("entrypoint")
    for status in columns:
        table.add_column(status.value, justify="right", style=STATUS_COLORS[status])
    table.add_column("total", justify="right")
    for name, by_status in counts.items():
        cells = [str(by_status.get(status.value, "")) for status in columns]
        table.add_row(name, *cells, str(sum(by_status.values())))
    if not counts:
        table.add_row("(no runs)")
    return table


async def cmd_cancel(args: argparse.Namespace) -> int:
    """Cancel a run and print its status afterwards."""
    async with open_queuer(args.dsn) as queuer:
        status = await queuer.cancel(args.run_id)
    print(f"run {args.run_id}: {status.value}")
    return ExitCode.OK


async def cmd_retry(args: argparse.Namespace) -> int:
    """Run a failed or canceled run again from its failed steps."""
    async with open_queuer(args.dsn) as queuer:
        try:
            await queuer.retry(args.run_id)
        except ValueError as exc:
            raise CliError(str(exc), ExitCode.REJECTED) from None
    print(f"run {args.run_id}: retrying its failed, canceled and skipped steps")
    return ExitCode.OK


async def cmd_logs(args: argparse.Namespace) -> int:
    """Print a run's output lines: stdout lines on stdout, all others on stderr.

    Every line starts with ``[step]``; lines of the ``log`` and ``system`` streams also
    name their stream.
    """
    async with open_queuer(args.dsn) as queuer:
        async for line in queuer.logs(args.run_id, step=args.step, follow=args.follow):
            if line.stream == "stdout":
                print(f"[{line.step}] {line.text}", flush=True)
            elif line.stream == "stderr":
                print(f"[{line.step}] {line.text}", file=sys.stderr, flush=True)
            else:
                print(f"[{line.step}] {line.stream}: {line.text}", file=sys.stderr, flush=True)
    return ExitCode.OK


async def cmd_watch(args: argparse.Namespace) -> int:
    """Show a live step table with the tail of the output until the run ends."""
    async with open_queuer(args.dsn) as queuer:
        with anyio.move_on_after(args.timeout) as scope:
            state = await watch_run(queuer, args.run_id, _console(), WATCH_LOG_TAIL)
        if scope.cancelled_caught:
            raise CliError(
                f"timed out after {args.timeout:g} s watching run {args.run_id}; it is "
                "still running",
                ExitCode.TIMED_OUT,
            )
        result = await queuer.result(args.run_id, timeout=0)
    if result is not None:
        return _exit_code_of(result)
    return ExitCode.OK if state.status is Status.SUCCESSFUL else ExitCode.RUN_FAILED


async def cmd_workers(args: argparse.Namespace) -> int:
    """Print the registered workers and whether each one is alive."""
    from pgskewer.workers import list_workers

    async with open_queuer(args.dsn) as queuer:
        async with queuer.pool.acquire() as connection:
            workers = await list_workers(connection, queuer.settings)
    if args.json:
        _print_json(workers)
    else:
        _print(_workers_table(workers))
    return ExitCode.OK


async def cmd_prune(args: argparse.Namespace) -> int:
    """Delete finished runs and pgqueuer log rows older than ``--older-than``."""
    from pgskewer.prune import prune

    async with open_queuer(args.dsn) as queuer:
        async with queuer.pool.acquire() as connection:
            counts = await prune(connection, queuer.settings, args.older_than)
    if args.json:
        _print_json(counts)
    else:
        deleted = ", ".join(f"{table}: {count}" for table, count in counts.items())
        print(f"deleted rows older than {args.older_than}: {deleted}")
    return ExitCode.OK


def _age(text: str) -> timedelta:
    """Parse an age such as ``7d``, ``12h``, ``30m`` or ``90s``."""
    units = {"d": "days", "h": "hours", "m": "minutes", "s": "seconds"}
    number, unit = text[:-1], text[-1:].lower()
    try:
        value = float(number)
    except ValueError:
        value = -1.0
    if unit not in units or value <= 0:
        raise argparse.ArgumentTypeError(
            f"invalid age {text!r}: use a positive number with d, h, m or s, such as 7d"
        )
    return timedelta(**{units[unit]: value})


def _workers_table(workers: Sequence[dict[str, Any]]) -> RenderableType:
    from rich.table import Table
    from rich.text import Text

    table = Table(box=None, pad_edge=False)
    for name in ("id", "host", "pid", "entrypoints", "started", "last seen", "alive"):
        table.add_column(name, justify="right" if name == "pid" else "left")
    for worker in workers:
        alive = Text("yes", style="green") if worker["alive"] else Text("no", style="red")
        table.add_row(
            str(worker["id"])[:8],
            worker["host"],
            str(worker["pid"]),
            ", ".join(worker["entrypoints"]),
            _local_time(worker["started"]),
            _local_time(worker["last_seen"]),
            alive,
        )
    if not workers:
        table.add_row("(no workers)")
    return table


def _local_time(value: datetime | None) -> str:
    return "" if value is None else value.astimezone().strftime("%Y-%m-%d %H:%M:%S")


async def cmd_runs(args: argparse.Namespace) -> int:
    """Print recent runs, newest first."""
    from pgskewer import views

    async with open_queuer(args.dsn) as queuer:
        runs = await queuer.runs(limit=args.limit, status=args.status, name=args.name)
    if args.json:
        _print_json([run_json(run) for run in runs])
    else:
        _print(views.runs_rich(runs))
    return ExitCode.OK


async def cmd_worker(args: argparse.Namespace) -> int:
    """Run one worker process, or start ``--processes`` of them and supervise them."""
    from pgskewer import _supervisor

    target = _load_target(args.target)
    dsn = None if args.embedded else find_dsn(args.dsn)
    if dsn is None and not args.embedded:
        raise CliError(
            "the worker needs a database: pass --dsn, set PGSKEWER_DSN, DATABASE_URL or "
            "libpq's PG* variables, or pass --embedded to use the embedded server",
            ExitCode.CONFIG,
        )

    if args.processes is not None:
        # The DSN goes to the children in the environment, so no password shows in ps.
        env = dict(os.environ)
        if dsn is not None:
            env["PGSKEWER_DSN"] = dsn
        return await _supervisor.supervise(_child_argv(args), env, args.processes)

    try:
        queuer = await _supervisor.make_queuer(target, args.target)
    except _supervisor.TargetError as exc:
        raise CliError(str(exc), ExitCode.ENTRYPOINT_NOT_FOUND) from None
    try:
        await _prepare_worker(queuer, dsn, args)
        await _supervisor.serve(
            queuer,
            concurrency=args.concurrency,
            grace=args.grace,
            supervisor_pid=_supervisor.supervisor_pid_from_environment(),
        )
    finally:
        with anyio.CancelScope(shield=True):
            await queuer.close()
    return ExitCode.OK


def _load_target(spec: str) -> object:
    from pgskewer import _supervisor

    try:
        return _supervisor.load_target(spec)
    except _supervisor.TargetError as exc:
        raise CliError(str(exc), ExitCode.ENTRYPOINT_NOT_FOUND) from None


async def _prepare_worker(
    queuer: ImprovedQueuer, dsn: str | None, args: argparse.Namespace
) -> None:
    if not queuer.is_bound:
        await bind_queuer(queuer, dsn, embedded=args.embedded)
    elif args.dsn is not None or args.embedded:
        logger.warning(
            "%s returned a queuer that is already connected; its own database is used and "
            "--dsn/--embedded are ignored",
            args.target,
        )
    if args.install:
        changed = await queuer.install()
        logger.info("schema %s", "installed or upgraded" if changed else "already up to date")
    else:
        await require_schema(queuer, dsn)


def _child_argv(args: argparse.Namespace) -> list[str]:
    argv = [sys.executable, "-m", "pgskewer", "worker", args.target]
    argv += ["--concurrency", str(args.concurrency), "--grace", repr(args.grace)]
    if args.embedded:
        argv.append("--embedded")
    if args.install:
        argv.append("--install")
    if args.verbose:
        argv.append("--verbose")
    if args.quiet:
        argv.append("--quiet")
    return argv


async def watch_run(queuer: ImprovedQueuer, run_id: int, console: Console, tail: int) -> RunState:
    """Show ``run_id`` in a rich ``Live`` view until it ends; return its final state.

    On a console that is not a terminal nothing is redrawn: the final view is printed
    once when the run has ended.
    """
    from rich.live import Live

    from pgskewer import views

    state = await queuer.run_status(run_id)
    lines: collections.deque[LogLine] = collections.deque(maxlen=tail)

    def render() -> RenderableType:
        return views.run_rich(state, list(lines), tail=tail)

    live = Live(console=console, get_renderable=render, refresh_per_second=4)
    redraw = live.refresh if console.is_terminal else _do_nothing

    async def follow_logs() -> None:
        async for line in queuer.logs(run_id, follow=True):
            lines.append(line)
            redraw()

    with live if console.is_terminal else contextlib.nullcontext():
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(follow_logs)
            async for update in queuer.watch(run_id):
                state = update
                redraw()
    if not console.is_terminal:
        console.print(render())
    return state


def _do_nothing() -> None:
    pass


# -- parser ------------------------------------------------------------------------

Command = Callable[[argparse.Namespace], Awaitable[int]]


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected seconds >= 0, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {text!r}")
    return value


def _common_options() -> _Parser:
    common = _Parser(add_help=False)
    common.add_argument(
        "--dsn",
        help="PostgreSQL DSN (postgresql:// URL or libpq key=value string); default: "
        "PGSKEWER_DSN, DATABASE_URL, libpq PG* variables, then the embedded server",
    )
    group = common.add_mutually_exclusive_group()
    group.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    group.add_argument("-q", "--quiet", action="store_true", help="log only warnings and errors")
    return common


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser of the ``pgskewer`` command."""
    parser = _Parser(
        prog="pgskewer",
        description="Durable pipelines on the pgqueuer PostgreSQL job queue.",
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = _common_options()

    def add(name: str, command: Command, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(
            name,
            parents=[common],
            help=help_text,
            description=help_text,
            epilog=EXIT_CODES_HELP,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        sub.set_defaults(handler=command)
        return sub

    add(
        "install",
        cmd_install,
        "create or upgrade pgqueuer's and pgskewer's tables (safe to run again)",
    )
    _add_worker(add("worker", cmd_worker, "run a worker for the tasks of MODULE:ATTR"))
    _add_enqueue(add("enqueue", cmd_enqueue, "start a run of a task or pipeline"))

    result = add("result", cmd_result, "wait for a run's result and print it as JSON")
    result.add_argument("run_id", metavar="ID", type=int, help="run id that enqueue printed")
    _add_wait_options(result)

    status = add("status", cmd_status, "show a run's steps, or run counts and recent runs")
    status.add_argument("run_id", metavar="ID", type=int, nargs="?", help="run id")
    status.add_argument("--json", action="store_true", help="print JSON instead of tables")

    cancel = add("cancel", cmd_cancel, "cancel a run")
    cancel.add_argument("run_id", metavar="ID", type=int, help="run id")
    retry = add("retry", cmd_retry, "run a failed or canceled run again from its failed steps")
    retry.add_argument("run_id", metavar="ID", type=int, help="run id")

    logs = add("logs", cmd_logs, "print a run's captured output (stdout lines on stdout)")
    logs.add_argument("run_id", metavar="ID", type=int, help="run id")
    logs.add_argument("-f", "--follow", action="store_true", help="wait for new lines")
    logs.add_argument("--step", metavar="PATH", help="only this step and its sub-steps")

    watch = add("watch", cmd_watch, "show a live step table until the run ends")
    watch.add_argument("run_id", metavar="ID", type=int, help="run id")
    watch.add_argument(
        "--timeout", type=_positive_float, metavar="S", help="give up after S seconds"
    )

    workers = add("workers", cmd_workers, "list registered workers")
    workers.add_argument("--json", action="store_true", help="print JSON instead of a table")

    prune = add("prune", cmd_prune, "delete finished runs and pgqueuer log rows older than an age")
    prune.add_argument(
        "--older-than",
        type=_age,
        required=True,
        metavar="AGE",
        help="age such as 7d, 12h, 30m or 90s; runs still in flight are never deleted",
    )
    prune.add_argument("--json", action="store_true", help="print the counts as JSON")

    runs = add("runs", cmd_runs, "list recent runs, newest first")
    runs.add_argument("--status", choices=[status.value for status in Status])
    runs.add_argument("--name", help="only runs of this task or pipeline")
    runs.add_argument("--limit", type=_positive_int, default=50, help="rows (default 50)")
    runs.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return parser


def _add_wait_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--timeout", type=_positive_float, metavar="S", help="give up after S seconds (exit 2)"
    )
    parser.add_argument(
        "--indent", type=int, metavar="N", help="indent the JSON by N spaces (default: compact)"
    )


def _add_enqueue(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", metavar="NAME", help="task or pipeline name")
    parser.add_argument("payload", metavar="JSON", nargs="?", help="payload, stored verbatim")
    parser.add_argument("--priority", type=int, default=0, help="higher runs first (default 0)")
    parser.add_argument(
        "--dedupe-key", metavar="K", help="reject the run while another with key K is in flight"
    )
    parser.add_argument("--wait", action="store_true", help="wait for the result and print it")
    _add_wait_options(parser)


def _add_worker(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "target",
        metavar="MODULE:ATTR",
        help="an ImprovedQueuer, or a function returning one, in an importable module "
        "(the current directory is on the import path)",
    )
    parser.add_argument(
        "--concurrency", type=_positive_int, default=10, help="steps run at once (default 10)"
    )
    parser.add_argument(
        "--processes",
        type=_positive_int,
        metavar="P",
        help="start P worker processes and supervise them",
    )
    parser.add_argument(
        "--embedded", action="store_true", help="use the embedded server instead of a DSN"
    )
    parser.add_argument("--install", action="store_true", help="install the schema first")
    parser.add_argument(
        "--grace",
        type=_positive_float,
        default=30.0,
        metavar="SECONDS",
        help="after SIGTERM/SIGINT, seconds running steps may take before they are "
        "cancelled (default 30); a second signal exits at once",
    )


# -- entry point -------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``pgskewer`` command and return its exit code."""
    args = build_parser().parse_args(argv)
    if args.command == "worker" and args.dsn is not None and args.embedded:
        print("pgskewer: error: pass either --dsn or --embedded, not both", file=sys.stderr)
        return ExitCode.USAGE

    verbosity = 0
    if args.quiet:
        verbosity = -1
    elif args.verbose:
        verbosity = 1
    _configure_logging(verbosity, worker=args.command == "worker")
    handler: Command = args.handler
    try:
        return anyio.run(handler, args)
    except KeyboardInterrupt:
        print("pgskewer: interrupted", file=sys.stderr)
        return ExitCode.INTERRUPTED
    except Exception as exc:
        expected = _expected_error(exc)
        if expected is None:
            raise
        print(f"pgskewer: error: {scrub(str(expected))}", file=sys.stderr)
        return expected.code


def _expected_error(exc: BaseException) -> CliError | None:
    """Return the :class:`CliError` that ``exc`` is or wraps, or ``None`` for a bug."""
    from pgskewer.queuer import RunNotFoundError

    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    if isinstance(exc, CliError):
        return exc
    if isinstance(exc, RunNotFoundError):
        return CliError(str(exc), ExitCode.RUN_NOT_FOUND)
    return None


def run() -> NoReturn:
    """Run the command and exit with its code."""
    sys.exit(main())
