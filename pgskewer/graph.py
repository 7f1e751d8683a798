"""Pipeline definitions and the step graph a run stores when it starts.

A definition is what users write: ``pipeline("a", ["b1", "b2"], "c")``. When a run starts,
its definition is resolved into a graph of plain dicts with stable step paths and stored
in the run row. Advancing, retrying and every frontend read that snapshot, never the
current in-process definition.

Paths: top-level steps are numbered from 1 (``1``, ``2``); members of a parallel group are
numbered from 0 under the group (``2.0``, ``2.1``); steps of a nested pipeline from 1 under
it (``3.1``, ``3.2``). A plain task run has one step, ``1``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeAlias

from pgskewer.model import Status

#: Options a pipeline may override per step.
STEP_OPTIONS = frozenset({"retries", "retry_backoff", "timeout", "crashable", "cancelable"})

Node: TypeAlias = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Step:
    """A task in a pipeline, by entrypoint name, with per-step option overrides."""

    name: str
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = set(self.options) - STEP_OPTIONS
        if unknown:
            raise TypeError(
                f"unknown step option(s) {sorted(unknown)} for step {self.name!r}; "
                f"allowed: {sorted(STEP_OPTIONS)}"
            )
        if self.options:
            # Checked now, with the same rules as entrypoint options, so a bad value
            # fails the definition instead of a run.
            from pgskewer.registry import TaskOptions

            try:
                TaskOptions(**self.options)
            except ValueError as exc:
                raise ValueError(f"step {self.name!r}: {exc}") from None


@dataclasses.dataclass(frozen=True)
class Parallel:
    """A parallel group: its members run at the same time, and the next step waits for all."""

    members: tuple[StepDefinition, ...]


@dataclasses.dataclass(frozen=True)
class Pipeline:
    """A sequence of steps, optionally named when registered as an entrypoint."""

    steps: tuple[StepDefinition, ...]
    name: str | None = None


StepDefinition: TypeAlias = Step | Parallel | Pipeline


def step(name: str, **options: Any) -> Step:
    """Name a task as a pipeline step, overriding some of its options for this pipeline.

    ``step("load", retries=3, timeout=60)``; the allowed options are ``retries``,
    ``retry_backoff``, ``timeout``, ``crashable`` and ``cancelable``.
    """
    return Step(name, dict(options))


def parallel(*members: Any) -> Parallel:
    """Group steps that run at the same time: ``parallel("b1", "b2")``."""
    return Parallel(tuple(members))  # normalised by ``normalize``


def resolve_graph(
    name: str,
    kind: str,
    definition: Pipeline | None,
    lookup_pipeline: Callable[[str], Pipeline | None],
) -> Node:
    """Resolve a definition into the stored graph, expanding nested pipelines by name.

    ``kind`` is ``task`` (a one-step run of ``name``) or ``pipeline``. A name that
    ``lookup_pipeline`` does not know is a task. A pipeline that contains itself raises
    ``ValueError`` naming the cycle.
    """
    if kind == "task" or definition is None:
        return {
            "kind": "sequence",
            "path": "",
            "name": name,
            "steps": [_task_node("1", Step(name))],
        }
    return _sequence_node("", name, definition.steps, lookup_pipeline, (name,))


def _task_node(path: str, definition: Step) -> Node:
    node: Node = {"kind": "task", "path": path, "name": definition.name}
    if definition.options:
        node["options"] = dict(definition.options)
    return node


def _sequence_node(
    path: str,
    name: str,
    steps: tuple[StepDefinition, ...],
    lookup: Callable[[str], Pipeline | None],
    stack: tuple[str, ...],
) -> Node:
    children = [
        _node(_join(path, str(index)), member, lookup, stack)
        for index, member in enumerate(steps, start=1)
    ]
    return {
        "kind": "sequence" if not path else "pipeline",
        "path": path,
        "name": name,
        "steps": children,
    }


def _node(
    path: str,
    definition: StepDefinition,
    lookup: Callable[[str], Pipeline | None],
    stack: tuple[str, ...],
) -> Node:
    if isinstance(definition, Parallel):
        members = [
            _node(_join(path, str(index)), member, lookup, stack)
            for index, member in enumerate(definition.members)
        ]
        return {"kind": "group", "path": path, "name": "parallel", "steps": members}

    if isinstance(definition, Pipeline):
        name = definition.name or "pipeline"
        return _sequence_node(path, name, definition.steps, lookup, stack)

    nested = lookup(definition.name)
    if nested is None:
        return _task_node(path, definition)
    if definition.options:
        raise ValueError(
            f"step {definition.name!r} is a pipeline, and options apply to tasks only; "
            "set them on the steps inside it"
        )
    if definition.name in stack:
        cycle = " -> ".join((*stack, definition.name))
        raise ValueError(f"pipeline {stack[0]!r} contains itself: {cycle}")
    return _sequence_node(path, definition.name, nested.steps, lookup, (*stack, definition.name))


def _join(path: str, index: str) -> str:
    return f"{path}.{index}" if path else index


def iter_tasks(node: Node) -> Iterator[Node]:
    """Yield the task leaves of a graph in definition order."""
    if node["kind"] == "task":
        yield node
        return
    for child in node["steps"]:
        yield from iter_tasks(child)


def find_node(graph: Node, path: str) -> Node:
    """Return the node at ``path``, raising ``KeyError`` naming it when absent."""
    if graph["path"] == path:
        return graph
    for child in graph.get("steps", ()):
        if path == child["path"] or path.startswith(child["path"] + "."):
            return find_node(child, path)
    raise KeyError(f"no step {path!r} in pipeline {graph['name']!r}")


StatusOf = Callable[[str], Status]


def is_complete(node: Node, status_of: StatusOf) -> bool:
    """Return whether every task under ``node`` reached a terminal status."""
    return all(status_of(task["path"]).is_terminal for task in iter_tasks(node))


def ready_tasks(node: Node, status_of: StatusOf) -> list[Node]:
    """Return the pending tasks that may start now.

    A sequence offers the tasks of its first incomplete step; a group offers the ready
    tasks of all its incomplete members.
    """
    kind = node["kind"]
    if kind == "task":
        return [node] if status_of(node["path"]) is Status.PENDING else []
    if kind == "group":
        ready: list[Node] = []
        for child in node["steps"]:
            ready.extend(ready_tasks(child, status_of))
        return ready
    for child in node["steps"]:
        if not is_complete(child, status_of):
            return ready_tasks(child, status_of)
    return []


def predecessors(graph: Node, path: str) -> list[Node]:
    """Return the nodes that finish before the step at ``path`` starts, in order.

    These are the earlier steps of every sequence that encloses the step: their results
    are what the step's payload carries in ``tasks``. A nested pipeline that finished
    before the step is returned as one node; tasks inside it are not listed separately.
    """
    found: list[Node] = []
    _collect_predecessors(graph, path, found)
    return found


def _collect_predecessors(node: Node, path: str, found: list[Node]) -> None:
    for child in node.get("steps", ()):
        inside = path == child["path"] or path.startswith(child["path"] + ".")
        if inside:
            _collect_predecessors(child, path, found)
            return
        if node["kind"] != "group":
            found.extend(_result_nodes(child))


def _result_nodes(node: Node) -> list[Node]:
    # A finished group contributes each of its members; tasks and nested pipelines
    # contribute themselves, under their own names.
    if node["kind"] == "group":
        nodes: list[Node] = []
        for child in node["steps"]:
            nodes.extend(_result_nodes(child))
        return nodes
    return [node]


def top_level_nodes(graph: Node) -> list[Node]:
    """Return the nodes whose results make up the run's final ``tasks``."""
    nodes: list[Node] = []
    for child in graph["steps"]:
        nodes.extend(_result_nodes(child))
    return nodes


def normalize(
    steps: tuple[Any, ...], resolve_function: Callable[[Any], str]
) -> tuple[StepDefinition, ...]:
    """Turn user step arguments into definitions.

    Among several arguments a list is a parallel group; a single list argument is the
    list of steps itself. Strings are entrypoint names, registered functions are looked up
    by ``resolve_function``, and ``Step``, ``Parallel`` and ``Pipeline`` pass through.
    """
    if len(steps) == 1 and isinstance(steps[0], list):
        steps = tuple(steps[0])
    if len(steps) == 1 and isinstance(steps[0], Pipeline) and steps[0].name is None:
        steps = steps[0].steps
    if not steps:
        raise ValueError("a pipeline needs at least one step")
    return tuple(_normalize_one(item, resolve_function) for item in steps)


def _normalize_one(item: Any, resolve_function: Callable[[Any], str]) -> StepDefinition:
    if isinstance(item, Step | Pipeline):
        return item
    if isinstance(item, str):
        if not item:
            raise ValueError("a step name must not be empty")
        return Step(item)
    if isinstance(item, Parallel | list | tuple):
        members = item.members if isinstance(item, Parallel) else tuple(item)
        if not members:
            raise ValueError("a parallel group needs at least one step; got an empty group")
        return Parallel(tuple(_normalize_one(member, resolve_function) for member in members))
    if callable(item):
        return Step(resolve_function(item))
    raise TypeError(
        f"invalid pipeline step {item!r} of type {type(item).__name__}: use an entrypoint "
        "name, a registered task function, a pipeline, or a list/parallel(...) group"
    )


def names_in(definition: tuple[StepDefinition, ...]) -> Iterator[str]:
    """Yield every entrypoint name a definition refers to."""
    for item in definition:
        if isinstance(item, Step):
            yield item.name
        elif isinstance(item, Parallel):
            yield from names_in(item.members)
        else:
            yield from names_in(item.steps)
