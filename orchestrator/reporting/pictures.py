"""Pictures of a plan: the calculation × date grid with folded ranges, and the dependency graph
laid out by passes (inline SVG in the HTML report; ``graph --format dot|mermaid`` as text).

Everything here is pure: a plan and a manifest in, values or text out. The HTML template
escapes every name, reason and detail (autoescape); ``dot`` and ``mermaid`` quote theirs.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from orchestrator.manifest import Manifest
from orchestrator.planning import Plan, Status

# One cell of the grid: (status, reason, detail); None where the calculation has no cell.
Cell = tuple[str, str, str] | None


@dataclass(frozen=True, slots=True)
class Column:
    """Consecutive plan dates whose cells have the same status and reason in every row.

    ``cells`` has one entry per row (calculation, in pass order); the detail shown is the
    first date's."""

    first: dt.date
    last: dt.date
    dates: int
    cells: tuple[Cell, ...]

    @property
    def label(self) -> str:
        if self.dates == 1:
            return self.first.isoformat()
        return f"{self.first} … {self.last} ({self.dates} dates)"


def _key(cells: tuple[Cell, ...]) -> tuple[tuple[str, str] | None, ...]:
    return tuple(None if c is None else (c[0], c[1]) for c in cells)


def fold(dates: tuple[dt.date, ...], rows: list[list[Cell]]) -> list[Column]:
    """Fold the grid's dates into ``Column``s: a new column starts where any row's status or
    reason changes. ``rows[r][i]`` is row r's cell on ``dates[i]``."""
    out: list[Column] = []
    start = 0
    for i in range(1, len(dates) + 1):
        if i == len(dates) or _key(tuple(r[i] for r in rows)) != _key(
            tuple(r[start] for r in rows)
        ):
            out.append(Column(dates[start], dates[i - 1], i - start, tuple(r[start] for r in rows)))
            start = i
    return out


def grid(plan: Plan, names: list[str]) -> list[Column]:
    """The plan's grid over ``names`` (rows, in this order) and its dates, folded."""
    position = {d: i for i, d in enumerate(plan.dates)}
    row_of = {n: r for r, n in enumerate(names)}
    rows: list[list[Cell]] = [[None] * len(plan.dates) for _ in names]
    for (name, date), d in plan.decisions.items():
        r = row_of.get(name)
        if r is not None:
            rows[r][position[date]] = (d.status.value, d.reason.value, d.detail)
    return fold(plan.dates, rows)


@dataclass(frozen=True, slots=True)
class Node:
    name: str
    x: float
    y: float
    state: str  # "up-to-date", "runnable", "blocked", "impossible", "none"


@dataclass(frozen=True, slots=True)
class Edge:
    source: str
    target: str
    window: int  # the dependency's window (1: the same date only)


@dataclass(frozen=True, slots=True)
class Layout:
    width: float
    height: float
    nodes: tuple[Node, ...]
    edges: tuple[Edge, ...]
    node_width: float
    node_height: float


def node_states(plan: Plan) -> dict[str, str]:
    """Per calculation its state in the plan: runnable (a cell will run), else blocked (a cell
    waits or is stuck), else impossible (every cell), else up-to-date."""
    seen: dict[str, set[Status]] = {}
    for (name, _), d in plan.decisions.items():
        seen.setdefault(name, set()).add(d.status)
    out = {}
    for name, statuses in seen.items():
        if Status.RUNNABLE in statuses:
            out[name] = "runnable"
        elif Status.BLOCKED in statuses:
            out[name] = "blocked"
        elif statuses == {Status.IMPOSSIBLE}:
            out[name] = "impossible"
        else:
            out[name] = "up-to-date"
    return out


def layout(manifest: Manifest, states: dict[str, str]) -> Layout:
    """A layered drawing: one column per pass, nodes ordered inside a pass by the mean row of
    their dependencies in earlier passes (one barycenter sweep, which removes most crossings of
    a pipeline's shallow graphs)."""
    node_w, node_h, gap_x, gap_y, pad = 150.0, 30.0, 80.0, 18.0, 20.0
    row: dict[str, float] = {}
    columns: list[list[str]] = []
    for members in manifest.passes:

        def weight(name: str) -> tuple[float, str]:
            deps = [row[d] for d in manifest.calcs[name].dependencies if d in row]
            return (sum(deps) / len(deps) if deps else 0.0, name)

        ordered = sorted(members, key=weight)
        for i, name in enumerate(ordered):
            row[name] = float(i)
        columns.append(ordered)
    tallest = max((len(c) for c in columns), default=0)
    nodes = []
    for c, column in enumerate(columns):
        offset = (tallest - len(column)) * (node_h + gap_y) / 2
        for i, name in enumerate(column):
            nodes.append(
                Node(
                    name,
                    pad + c * (node_w + gap_x),
                    pad + offset + i * (node_h + gap_y),
                    states.get(name, "none"),
                )
            )
    edges = tuple(
        Edge(dep, name, manifest.calcs[name].window(dep))
        for name in manifest.order
        for dep in manifest.calcs[name].dependencies
    )
    width = 2 * pad + len(columns) * node_w + max(len(columns) - 1, 0) * gap_x
    height = 2 * pad + tallest * node_h + max(tallest - 1, 0) * gap_y
    return Layout(width, height, tuple(nodes), edges, node_w, node_h)


def _quoted(name: str) -> str:
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def dot(manifest: Manifest) -> str:
    """The dependency graph in Graphviz DOT, one rank per pass (names quoted)."""
    lines = ["digraph orchestrator {", "  rankdir=LR;", "  node [shape=box];"]
    for i, members in enumerate(manifest.passes):
        lines.append(f"  {{ rank=same; {' '.join(_quoted(n) for n in members)} }}  // pass {i}")
    for name in manifest.order:
        for dep in manifest.calcs[name].dependencies:
            w = manifest.calcs[name].window(dep)
            label = f' [label="window {w}"]' if w > 1 else ""
            lines.append(f"  {_quoted(dep)} -> {_quoted(name)}{label};")
    return "\n".join(lines + ["}"]) + "\n"


def mermaid(manifest: Manifest) -> str:
    """The dependency graph as a Mermaid flowchart (node ids n0, n1, ...; names quoted)."""
    ids = {name: f"n{i}" for i, name in enumerate(manifest.order)}
    lines = ["flowchart LR"]
    for name in manifest.order:
        text = name.replace('"', "#quot;")
        lines.append(f'  {ids[name]}["{text}"]')
    for name in manifest.order:
        for dep in manifest.calcs[name].dependencies:
            w = manifest.calcs[name].window(dep)
            arrow = f"-->|window {w}|" if w > 1 else "-->"
            lines.append(f"  {ids[dep]} {arrow} {ids[name]}")
    return "\n".join(lines) + "\n"
