"""The ``%pgskewer`` line and cell magic.

Load it with ``%load_ext pgskewer``. It works on the current session
(:func:`pgskewer.notebook.current_session`), so create one first.

Payloads are JSON, passed verbatim: the magic turns off IPython's ``$name``/``{name}``
expansion and parses the line itself, because that expansion either leaves a JSON line
untouched or turns a dict into its Python repr, and because shell-style splitting
breaks unquoted JSON apart. The magic then expands placeholders itself, JSON-aware:

* ``{name}`` or ``{name.attr}`` outside a JSON string is replaced by that value from the
  notebook namespace: ``%pgskewer enqueue etl {"day": {day}, "cfg": {cfg}}``. The value
  goes into the payload as the Python object, so anything the payload encoding supports
  (datetimes, numpy arrays) works.
* A payload that is only ``{name}`` or ``$name`` is that object itself.
* Inside JSON strings, braces and ``$`` are literal text.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, magics_class, no_var_expand
from IPython.core.magic_arguments import MagicArgumentParser

from pgskewer import views
from pgskewer.model import LogLine, RunState

__all__ = [
    "PgskewerMagics",
    "expand_json",
    "expand_words",
    "load_ipython_extension",
    "unload_ipython_extension",
]

_NAME = r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*"
_PLACEHOLDER = re.compile(r"\{\s*(" + _NAME + r")\s*\}")
_WHOLE_DOLLAR = re.compile(r"\$(" + _NAME + r")")
_WORD = re.compile(r"\s*(\S+)(.*)", re.DOTALL)
_WORD_PLACEHOLDER = re.compile(r"\{\s*(" + _NAME + r")\s*\}|\$(" + _NAME + r")")

# Placeholders become one-character JSON strings padded to the placeholder's length, so
# json.loads reports error columns of the text the user typed. The characters come from
# Unicode plane 15 (private use), skipping any that occur in the text.
_SENTINEL_FIRST = 0xF0000


# -- payload parsing -------------------------------------------------------------------


def expand_json(text: str, namespace: Mapping[str, Any]) -> Any:
    """Parse a magic's JSON payload, expanding ``{name}`` placeholders from ``namespace``.

    An empty text is ``None``. Raises ``UsageError`` with one line for invalid JSON or
    an undefined name.
    """
    stripped = text.strip()
    if not stripped:
        return None
    whole = _PLACEHOLDER.fullmatch(stripped) or _WHOLE_DOLLAR.fullmatch(stripped)
    if whole is not None:
        return _lookup(whole.group(1), namespace)

    source, values = _replace_placeholders(text, namespace)
    try:
        data = json.loads(source)
    except json.JSONDecodeError as exc:
        raise UsageError(
            f"invalid JSON payload: {exc.msg} (line {exc.lineno}, column {exc.colno})"
        ) from None
    return _put_values(data, values)


def _replace_placeholders(text: str, namespace: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """Replace placeholders outside JSON strings by sentinel strings of the same length."""
    pieces: list[str] = []
    values: dict[str, Any] = {}
    taken = {ord(c) for c in text}
    next_code = _SENTINEL_FIRST
    index, in_string = 0, False
    while index < len(text):
        char = text[index]
        if in_string:
            step = 2 if char == "\\" else 1
            in_string = char != '"'
            pieces.append(text[index : index + step])
            index += step
            continue
        match = _PLACEHOLDER.match(text, index) if char == "{" else None
        if match is None:
            in_string = char == '"'
            pieces.append(char)
            index += 1
            continue
        while next_code in taken:
            next_code += 1
        sentinel = chr(next_code)
        next_code += 1
        values[sentinel] = _lookup(match.group(1), namespace)
        pieces.append(f'"{sentinel}"'.ljust(match.end() - match.start()))
        index = match.end()
    return "".join(pieces), values


def _put_values(data: Any, values: Mapping[str, Any]) -> Any:
    if not values:
        return data
    if isinstance(data, str):
        return values.get(data, data)
    if isinstance(data, list):
        return [_put_values(item, values) for item in data]
    if isinstance(data, dict):
        result: dict[Any, Any] = {}
        for key, value in data.items():
            new_key = values.get(key, key)
            if not isinstance(new_key, str):
                kind = type(new_key).__name__
                raise UsageError(f"a placeholder used as an object key must hold a str, got {kind}")
            result[new_key] = _put_values(value, values)
        return result
    return data


def _lookup(dotted: str, namespace: Mapping[str, Any]) -> Any:
    first, *attributes = dotted.split(".")
    if first not in namespace:
        raise UsageError(f"name {first!r} in the payload is not defined in the notebook")
    value = namespace[first]
    for attribute in attributes:
        try:
            value = getattr(value, attribute)
        except AttributeError:
            raise UsageError(f"{dotted!r} in the payload: no attribute {attribute!r}") from None
    return value


def expand_words(text: str, namespace: Mapping[str, Any]) -> str:
    """Replace ``{name}`` and ``$name`` in a line of plain arguments by ``str`` of the value.

    Used for the subcommands without a JSON payload: ``%pgskewer logs {run.id}``.
    """

    def replace(match: re.Match[str]) -> str:
        return str(_lookup(match.group(1) or match.group(2), namespace))

    return _WORD_PLACEHOLDER.sub(replace, text)


def _next_word(text: str) -> tuple[str, str]:
    match = _WORD.match(text)
    if match is None:
        return "", ""
    return match.group(1), match.group(2)


# -- argument parsers ------------------------------------------------------------------


def _parser(prog: str) -> MagicArgumentParser:
    return MagicArgumentParser(prog=f"%pgskewer {prog}", add_help=False)  # type: ignore[no-untyped-call]


def _parse(parser: MagicArgumentParser, text: str) -> argparse.Namespace:
    """Parse ``text`` as shell-style words; errors raise ``UsageError``."""
    options: argparse.Namespace = parser.parse_argstring(text)  # type: ignore[no-untyped-call]
    return options


def _enqueue_parser() -> MagicArgumentParser:
    parser = _parser("enqueue")
    parser.add_argument("-o", "--output", metavar="VAR", help="bind the run handle to VAR")
    parser.add_argument("-p", "--priority", type=int, default=0, help="job priority (higher first)")
    parser.add_argument("--dedupe-key", metavar="KEY", help="skip when a run with KEY is active")
    return parser


_ENQUEUE_VALUE_FLAGS = frozenset({"-o", "--output", "-p", "--priority", "--dedupe-key"})


def _id_parser(prog: str, *, optional: bool = False) -> MagicArgumentParser:
    parser = _parser(prog)
    parser.add_argument("run_id", type=int, nargs="?" if optional else None, metavar="ID")
    return parser


def _runs_parser() -> MagicArgumentParser:
    parser = _parser("runs")
    parser.add_argument("-n", "--limit", type=int, default=20, help="how many runs (default 20)")
    parser.add_argument("--status", help="only runs with this status")
    parser.add_argument("--name", help="only runs of this entrypoint")
    return parser


def _logs_parser() -> MagicArgumentParser:
    parser = _id_parser("logs")
    parser.add_argument("--step", metavar="PATH", help="only this step, for example 2.1")
    return parser


def _result_parser() -> MagicArgumentParser:
    parser = _id_parser("result")
    parser.add_argument("--timeout", type=float, metavar="SECONDS", help="give up after SECONDS")
    return parser


# -- displayed values ------------------------------------------------------------------


class RunSnapshot:
    """A run's state and recent output as shown by ``%pgskewer status``."""

    def __init__(self, state: RunState, lines: Sequence[LogLine]) -> None:
        self.state = state
        self.lines = tuple(lines)

    def _repr_html_(self) -> str:
        return views.run_html(self.state, self.lines)

    def __repr__(self) -> str:
        return views.run_text(self.state, self.lines)


class LogListing(list[LogLine]):
    """Output lines as shown by ``%pgskewer logs``."""

    def _repr_html_(self) -> str:
        return views.run_log_html(self, tail=len(self)) or "<i>no output</i>"

    def __repr__(self) -> str:
        return (
            "\n".join(f"[{line.step}] {line.stream}: {line.text}" for line in self) or "(no output)"
        )


class WorkersTable(list[Any]):
    """Live workers as shown by ``%pgskewer workers``."""

    _COLUMNS = ("id", "host", "pid", "entrypoints", "last_seen")

    def _cells(self) -> list[tuple[str, ...]]:
        return [
            (w.id, w.host, str(w.pid), ", ".join(w.entrypoints), str(w.last_seen or ""))
            for w in self
        ]

    def _repr_html_(self) -> str:
        import html

        head = "".join(f"<th>{name}</th>" for name in self._COLUMNS)
        rows = "".join(
            "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>"
            for cells in self._cells()
        )
        return f"<table class='pgs-workers'><tr>{head}</tr>{rows}</table>"

    def __repr__(self) -> str:
        lines = ["  ".join(self._COLUMNS)]
        lines.extend("  ".join(cells) for cells in self._cells())
        return "\n".join(lines) if self else "(no live workers)"


# -- the magic -------------------------------------------------------------------------

_SUBCOMMANDS = ("enqueue", "status", "runs", "cancel", "logs", "result", "retry", "workers")


@magics_class
class PgskewerMagics(Magics):
    """The ``%pgskewer`` magic; see :meth:`pgskewer` for its usage."""

    @no_var_expand
    @line_cell_magic
    def pgskewer(self, line: str, cell: str | None = None) -> Any:
        """Enqueue and inspect pgskewer runs of the current session.

        Usage::

          %pgskewer enqueue [-o VAR] [-p PRIORITY] [--dedupe-key KEY] NAME [JSON]
          %%pgskewer enqueue [-o VAR] NAME        (the cell body is the JSON payload)
          %pgskewer status [ID]                   state of a run (default: the last enqueued)
          %pgskewer runs [-n LIMIT] [--status STATUS] [--name NAME]
          %pgskewer cancel ID
          %pgskewer logs ID [--step PATH]
          %pgskewer result ID [--timeout SECONDS] waits; interrupt to stop waiting
          %pgskewer retry ID
          %pgskewer workers

        In the other subcommands, ``{name}`` and ``$name`` are replaced by the value of
        ``name`` (``%pgskewer logs {run.id}``).

        The payload is JSON taken verbatim. ``{name}`` outside JSON strings inserts the
        value of ``name`` from the notebook (``{"day": {day}}``); a payload that is only
        ``{name}`` or ``$name`` is that object. ``enqueue`` returns the run handle, which
        shows a live view; ``-o VAR`` also binds it to ``VAR``.

        A session must be open: ``session = pgskewer.notebook.Session()``.
        """
        subcommand, rest = _next_word(line)
        if not subcommand or subcommand in {"help", "-h", "--help"}:
            raise UsageError(
                "usage: %pgskewer SUBCOMMAND ...; subcommands: "
                + ", ".join(_SUBCOMMANDS)
                + "; see %pgskewer? for details"
            )
        handler: Callable[[str, str | None], Any] | None = getattr(self, f"_do_{subcommand}", None)
        if subcommand not in _SUBCOMMANDS or handler is None:
            raise UsageError(
                f"unknown subcommand {subcommand!r}; use one of: {', '.join(_SUBCOMMANDS)}"
            )
        if cell is not None and subcommand != "enqueue":
            raise UsageError(f"%%pgskewer {subcommand} takes no cell body; use %pgskewer")
        if subcommand != "enqueue":
            rest = expand_words(rest, self._namespace())
        return handler(rest, cell)

    # -- subcommands ---------------------------------------------------------------

    def _do_enqueue(self, rest: str, cell: str | None) -> Any:
        flag_words, remainder = _split_flags(rest, _ENQUEUE_VALUE_FLAGS)
        options = _enqueue_parser().parse_args(flag_words)
        name, payload_text = _next_word(remainder)
        if not name:
            raise UsageError("usage: %pgskewer enqueue [-o VAR] NAME [JSON]: NAME is missing")
        if cell is not None:
            if payload_text.strip():
                raise UsageError(
                    "%%pgskewer enqueue takes the payload from the cell body; "
                    "put nothing after NAME"
                )
            payload_text = cell
        payload = expand_json(payload_text, self._namespace())
        run = self._session().enqueue(
            name, payload, priority=options.priority, dedupe_key=options.dedupe_key
        )
        if options.output:
            if not options.output.isidentifier():
                raise UsageError(f"-o needs a Python variable name, got {options.output!r}")
            self._namespace()[options.output] = run
        return run

    def _do_status(self, rest: str, cell: str | None) -> RunSnapshot:
        options = _parse(_id_parser("status", optional=True), rest)
        session = self._session()
        run_id = options.run_id
        if run_id is None:
            if session.last_run is None:
                raise UsageError("no run enqueued in this session yet; give a run ID")
            run_id = session.last_run.id
        state = self._state(run_id)
        return RunSnapshot(state, session.logs(run_id)[-views.DEFAULT_LOG_TAIL :])

    def _do_runs(self, rest: str, cell: str | None) -> Any:
        options = _parse(_runs_parser(), rest)
        try:
            return self._session().runs(
                limit=options.limit, status=options.status, name=options.name
            )
        except ValueError as exc:
            raise UsageError(str(exc)) from None

    def _do_cancel(self, rest: str, cell: str | None) -> RunSnapshot:
        run_id = _parse(_id_parser("cancel"), rest).run_id
        self._state(run_id)
        self._session().cancel(run_id)
        return RunSnapshot(self._state(run_id), ())

    def _do_logs(self, rest: str, cell: str | None) -> LogListing:
        options = _parse(_logs_parser(), rest)
        self._state(options.run_id)
        return LogListing(self._session().logs(options.run_id, step=options.step))

    def _do_result(self, rest: str, cell: str | None) -> Any:
        options = _parse(_result_parser(), rest)
        self._state(options.run_id)
        return self._session().result(options.run_id, timeout=options.timeout)

    def _do_retry(self, rest: str, cell: str | None) -> Any:
        run_id = _parse(_id_parser("retry"), rest).run_id
        self._state(run_id)
        return self._session().retry(run_id)

    def _do_workers(self, rest: str, cell: str | None) -> WorkersTable:
        _parse(_parser("workers"), rest)
        return WorkersTable(self._session().workers())

    # -- helpers -------------------------------------------------------------------

    def _namespace(self) -> dict[str, Any]:
        shell = self.shell
        if shell is None:
            raise UsageError("the %pgskewer magic is not attached to an IPython shell")
        namespace: dict[str, Any] = shell.user_ns
        return namespace

    def _session(self) -> Any:
        from pgskewer.notebook.session import current_session

        session = current_session()
        if session is None:
            raise UsageError(
                "no pgskewer session is open; run 'session = pgskewer.notebook.Session()' first"
            )
        return session

    def _state(self, run_id: int) -> RunState:
        try:
            state: RunState = self._session().status(run_id)
        except LookupError:
            raise UsageError(f"run {run_id} not found") from None
        return state


def _split_flags(text: str, value_flags: frozenset[str]) -> tuple[list[str], str]:
    """Split leading ``-x VALUE`` words off ``text``; the rest is returned untouched."""
    words: list[str] = []
    rest = text
    while True:
        word, after = _next_word(rest)
        if not word.startswith("-") or word == "-":
            return words, rest
        words.append(word)
        rest = after
        if word in value_flags:
            value, rest = _next_word(rest)
            if not value:
                raise UsageError(f"option {word} needs a value")
            words.append(value)


def load_ipython_extension(ipython: Any) -> None:
    """Register ``%pgskewer``; IPython calls this for ``%load_ext pgskewer``."""
    ipython.register_magics(PgskewerMagics(ipython))


def unload_ipython_extension(ipython: Any) -> None:
    """Remove ``%pgskewer``; IPython calls this for ``%unload_ext pgskewer``."""
    magics = ipython.magics_manager.magics
    magics["line"].pop("pgskewer", None)
    magics["cell"].pop("pgskewer", None)
