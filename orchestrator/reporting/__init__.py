"""Reports render a ``Plan``; they never decide anything.

Text for terminals, Markdown, HTML (jinja2 templates in ``templates/``) and JSON. Cells are
grouped into runs of consecutive dates with the same calculation, status and reason, so a
catch-up of thousands of dates stays readable.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any

import jinja2

from orchestrator.manifest import Manifest
from orchestrator.planning import Decision, Plan, RootSummary, Status, decision_json

# Everything a report shows may come from users or data (epoch reasons, error messages, user
# ids, column names). HTML templates are escaped by name: they end in ``.html.j2``, which
# ``select_autoescape(["html"])`` does not match (it tests the last suffix), so the list names
# the full suffix — and every template not named as text is escaped too (fail safe).
_TEXT_TEMPLATES = ("txt.j2", "md.j2")
_LOADER = jinja2.PackageLoader("orchestrator.reporting", "templates")
_OPTIONS: dict[str, Any] = {
    "loader": _LOADER,
    "trim_blocks": True,
    "lstrip_blocks": True,
    "keep_trailing_newline": True,
}
_env = jinja2.Environment(
    autoescape=jinja2.select_autoescape(
        enabled_extensions=("html.j2", "html", "htm", "xml"),
        disabled_extensions=_TEXT_TEMPLATES,
        default_for_string=True,
        default=True,
    ),
    **_OPTIONS,
)


def _markdown_cell(value: object) -> object:
    """Every ``{{ value }}`` of a Markdown template: Markdown viewers render raw HTML, and a
    ``|`` or a newline would break the table row, so ``&``, ``<`` (no tag can start) and
    ``|`` are escaped and newlines become spaces; ``>`` stays readable (``a -> b``)."""
    if value is None or isinstance(value, (int, float, dt.date)):
        return value
    text = str(value).replace("&", "&amp;").replace("<", "&lt;")
    return text.replace("|", "\\|").replace("\r", " ").replace("\n", " ")


_markdown_env = jinja2.Environment(autoescape=False, finalize=_markdown_cell, **_OPTIONS)


@dataclass(frozen=True, slots=True)
class Span:
    """Consecutive planned dates of one calculation sharing a status, reason and detail."""

    calculation: str
    status: str
    reason: str
    first: dt.date
    last: dt.date
    cells: int
    detail: str


def spans(plan: Plan, statuses: tuple[Status, ...] = tuple(Status)) -> list[Span]:
    """Group the plan's cells (per calculation, in date order) into ``Span``s."""
    by_calc: dict[str, list[Decision]] = {}
    for key in plan.order:
        d = plan.decisions[key]
        if d.status in statuses:
            by_calc.setdefault(d.calculation, []).append(d)
    out: list[Span] = []
    position = {date: i for i, date in enumerate(plan.dates)}
    for calc in sorted(by_calc):
        run: list[Decision] = []
        for d in by_calc[calc]:
            if run and (
                d.reason is not run[-1].reason
                or _generic(d.detail) != _generic(run[-1].detail)
                or position[d.date] != position[run[-1].date] + 1
            ):
                out.append(_span(run))
                run = []
            run.append(d)
        if run:
            out.append(_span(run))
    return out


def _generic(detail: str) -> str:
    # Details that differ only by a date (e.g. "no prices rows on 2018-01-01") group together.
    return re.sub(r"\d{4}-\d{2}-\d{2}", "<date>", detail)


def _span(run: list[Decision]) -> Span:
    first, last = run[0], run[-1]
    return Span(
        calculation=first.calculation,
        status=first.status.value,
        reason=first.reason.value,
        first=first.date,
        last=last.date,
        cells=len(run),
        detail=_generic(first.detail) if len(run) > 1 else first.detail,
    )


def _context(plan: Plan) -> dict[str, Any]:
    per_calc: dict[str, Counter[str]] = {}
    for d in plan.decisions.values():
        per_calc.setdefault(d.calculation, Counter())[d.status.value] += 1
    return {
        "plan": plan,
        "counts": plan.counts(),
        "reasons": plan.reason_counts(),
        "statuses": [s.value for s in Status],
        "per_calc": {c: dict(v) for c, v in sorted(per_calc.items())},
        "spans": spans(plan, (Status.RUNNABLE, Status.BLOCKED, Status.IMPOSSIBLE)),
        "first": plan.dates[0] if plan.dates else None,
        "last": plan.dates[-1] if plan.dates else None,
        "root": [(name, summary, _marker(summary)) for name, summary in plan.root.items()],
    }


def _marker(summary: RootSummary) -> str:
    through = summary.complete_through
    if through is None:
        return ""
    if through == dt.date.min:
        return "no completeness marker yet: every date held back"
    return f"complete through {through} by its marker"


def _pictures(plan: Plan, manifest: Manifest | None) -> dict[str, Any]:
    """The HTML report's grid and graph (``pictures``); none without the manifest."""
    if manifest is None:
        return {"graph": None, "columns": [], "grid_rows": [], "nodes": {}, "abbrev": {}}
    from orchestrator.planning import Reason
    from orchestrator.reporting import pictures

    present = {name for name, _ in plan.decisions}
    names = [n for n in manifest.order if n in present]  # rows: a selection shows fewer
    drawn = pictures.layout(manifest, pictures.node_states(plan))
    abbrev = {r.value: "".join(w[0] for w in r.value.split("_")) for r in Reason}
    return {
        "graph": drawn,
        "nodes": {n.name: n for n in drawn.nodes},
        "columns": pictures.grid(plan, names),
        "grid_rows": names,
        "abbrev": abbrev,
    }


def render(plan: Plan, fmt: str, manifest: Manifest | None = None) -> str:
    """The plan as ``fmt`` in {"text", "markdown", "html", "json"}; the HTML report draws the
    dependency graph and the calculation × date grid when given the ``manifest``."""
    if fmt == "json":
        return json.dumps(
            {
                "target_date": plan.target_date.isoformat(),
                "counts": plan.counts(),
                "root": {
                    name: {
                        "dates": r.dates,
                        "first": r.first and r.first.isoformat(),
                        "last": r.last and r.last.isoformat(),
                        "complete_through": (
                            None
                            if r.complete_through in (None, dt.date.min)
                            else r.complete_through.isoformat()  # type: ignore[union-attr]
                        ),
                        "marker": r.complete_through is not None,
                        "skipped": r.skipped,  # rows given to no user
                        "problems": list(r.problems),  # the first 20, "file:line: what"
                    }
                    for name, r in plan.root.items()
                },
                "cells": [decision_json(plan.decisions[k]) for k in plan.order],
            },
            indent=None,
        )
    if fmt == "markdown":
        return _markdown_env.get_template("plan.md.j2").render(**_context(plan))
    if fmt == "html":
        return _env.get_template("plan.html.j2").render(
            **_context(plan), **_pictures(plan, manifest)
        )
    return _env.get_template("plan.txt.j2").render(**_context(plan))
