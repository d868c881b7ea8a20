"""``orchestrator status``: one screen per calculation, from the plan and the ledger.

``build_status`` is pure: the dry-run ``Plan`` up to a date, the ledger's unclean cells of
the range (``Ledger.unclean_cells``: failed, dead-lettered, running, or published with failed
users) and the last run's record in, a frozen ``Status`` out. ``render_status`` shows it as
text, JSON or self-contained HTML (jinja2, escaped).

A calculation is *complete through* date D when each of its cells up to D is up to date
(SKIPPED) or impossible (no data), and clean in the ledger; the range is ``ok`` when every
cell is, which is what ``status`` exits 0 on (1 otherwise, as ``run``).
"""

from __future__ import annotations

import datetime as dt
import json
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from orchestrator.planning import Plan
from orchestrator.planning import Status as CellStatus


@dataclass(frozen=True, slots=True)
class UncleanCell:
    """A cell that is not complete and clean in the ledger: its stored ``status``
    (FAILED, DEAD_LETTER, RUNNING, PARTIAL, or COMPLETED with inherited failed users), its
    failed users and the first line of its error."""

    date: dt.date
    status: str
    users_failed: int
    error: str


@dataclass(frozen=True, slots=True)
class CalcStatus:
    """One calculation's cells over the range.

    ``states`` counts the plan's states (RUNNABLE, SKIPPED, BLOCKED, IMPOSSIBLE), ``reasons``
    its reasons; ``complete_through`` is the last date through which every cell is up to date
    or impossible and clean (None: not even the first); ``unclean`` the ledger's unclean cells.
    """

    name: str
    cells: int
    states: dict[str, int]
    reasons: dict[str, int]
    complete_through: dt.date | None
    unclean: tuple[UncleanCell, ...]

    @property
    def ok(self) -> bool:
        """Every cell up to date (or impossible) and clean. A REUSED cell is SKIPPED but not
        yet re-pointed: the next run does it (without computing)."""
        done = self.states.get("SKIPPED", 0) + self.states.get("IMPOSSIBLE", 0)
        done -= self.reasons.get("REUSED", 0)
        return done == self.cells and not self.unclean


@dataclass(frozen=True, slots=True)
class LastRun:
    """The last run's record: id, trigger, start and end (aware UTC; end None while running
    or after a crash), its status (COMPLETED, FAILED = not clean, ABORTED, RUNNING) and exit
    code."""

    run_id: str
    trigger: str
    started_at: dt.datetime
    finished_at: dt.datetime | None
    status: str
    exit_code: int | None

    @property
    def seconds(self) -> float | None:
        if self.finished_at is None:
            return None
        return (self.finished_at - self.started_at).total_seconds()


@dataclass(frozen=True, slots=True)
class Status:
    """The status of every calculation from the plan's first date to ``target_date``."""

    target_date: dt.date
    first_date: dt.date | None
    calculations: tuple[CalcStatus, ...]
    last_run: LastRun | None

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.calculations)

    @property
    def exit_code(self) -> int:
        """0 when every cell of the range is complete and clean, else 1 (as ``run``)."""
        return 0 if self.ok else 1


def build_status(
    names: Sequence[str],
    plan: Plan,
    unclean: Iterable[Any],
    last_run: LastRun | None,
    only: frozenset[str] | None = None,
) -> Status:
    """The status of the calculations ``names`` (in that order; ``only``: of these alone).

    Args:
        names: calculations in pass order.
        plan: the dry-run plan up to the status date.
        unclean: rows (calculation, date, status, users_failed, error) of the range's unclean
            cells, as ``Ledger.unclean_cells`` gives them.
        last_run: the most recent run, if any.
        only: restrict to these calculations (a selection); None: all.
    """
    bad: dict[str, dict[dt.date, UncleanCell]] = {}
    for row in unclean:
        error = (row.error or "").strip().splitlines()
        bad.setdefault(row.calculation, {})[row.date] = UncleanCell(
            row.date, row.status, row.users_failed or 0, error[-1] if error else ""
        )
    per_calc: dict[str, list[tuple[dt.date, CellStatus, str]]] = {}
    for (name, date), why in plan.cell_reasons():
        per_calc.setdefault(name, []).append((date, why.status, why.value))
    out = []
    for name in names:
        if only is not None and name not in only:
            continue
        cells = sorted(per_calc.get(name, []))
        mine = bad.get(name, {})
        through = None
        for date, state, reason in cells:
            if (
                date in mine
                or state not in (CellStatus.SKIPPED, CellStatus.IMPOSSIBLE)
                or reason == "REUSED"  # not re-pointed yet
            ):
                break
            if state is CellStatus.SKIPPED:
                through = date
        out.append(
            CalcStatus(
                name=name,
                cells=len(cells),
                states=dict(Counter(state.value for _, state, _ in cells)),
                reasons=dict(Counter(reason for _, _, reason in cells)),
                complete_through=through,
                unclean=tuple(mine[d] for d in sorted(mine)),
            )
        )
    return Status(plan.target_date, plan.dates[0] if plan.dates else None, tuple(out), last_run)


def status_json(status: Status) -> dict[str, Any]:
    """The JSON form: ``{"target_date", "first_date", "ok", "last_run": {"run_id", "trigger",
    "started_at", "finished_at", "seconds", "status", "exit_code"} | null, "calculations":
    [{"name", "cells", "complete_through", "ok", "states", "reasons", "unclean": [{"date",
    "status", "users_failed", "error"}]}]}`` (dates ISO, times ISO UTC)."""
    run = status.last_run
    return {
        "target_date": status.target_date.isoformat(),
        "first_date": status.first_date.isoformat() if status.first_date else None,
        "ok": status.ok,
        "last_run": None
        if run is None
        else {
            "run_id": run.run_id,
            "trigger": run.trigger,
            "started_at": run.started_at.isoformat(),
            "finished_at": run.finished_at.isoformat() if run.finished_at else None,
            "seconds": run.seconds,
            "status": run.status,
            "exit_code": run.exit_code,
        },
        "calculations": [
            {
                "name": c.name,
                "cells": c.cells,
                "complete_through": c.complete_through.isoformat() if c.complete_through else None,
                "ok": c.ok,
                "states": c.states,
                "reasons": c.reasons,
                "unclean": [
                    {
                        "date": u.date.isoformat(),
                        "status": u.status,
                        "users_failed": u.users_failed,
                        "error": u.error,
                    }
                    for u in c.unclean
                ],
            }
            for c in status.calculations
        ],
    }


def _run_line(run: LastRun | None) -> str:
    if run is None:
        return "no run yet"
    took = f", {run.seconds:.1f} s" if run.seconds is not None else ""
    code = f", exit {run.exit_code}" if run.exit_code is not None else ""
    return (
        f"run {run.run_id[:8]} ({run.trigger}) started {run.started_at:%Y-%m-%d %H:%M:%S} UTC: "
        f"{run.status}{code}{took}"
    )


def _unclean_line(name: str, u: UncleanCell) -> str:
    what = {
        "DEAD_LETTER": "dead letter (orchestrator dlq list)",
        "RUNNING": "running or left by a crashed run",
        "FAILED": "failed (orchestrator runs)",
    }.get(u.status, f"{u.status.lower()} (orchestrator failures {name} {u.date})")
    users = f", {u.users_failed} users failed" if u.users_failed else ""
    error = f": {u.error}" if u.error else ""
    return f"{name} {u.date} {what}{users}{error}"


def render_status(status: Status, fmt: str) -> str:
    """``status`` as ``text`` (aligned columns for a terminal), ``json`` or ``html``.

    Raises:
        ValueError: an unknown format.
    """
    if fmt == "json":
        return json.dumps(status_json(status), indent=2) + "\n"
    rows = [
        (
            c.name,
            str(c.complete_through or "-"),
            c.states.get("SKIPPED", 0),
            c.states.get("RUNNABLE", 0),
            c.states.get("BLOCKED", 0),
            c.states.get("IMPOSSIBLE", 0),
            len(c.unclean),
        )
        for c in status.calculations
    ]
    problems = [_unclean_line(c.name, u) for c in status.calculations for u in c.unclean]
    span = f"{status.first_date} to {status.target_date}" if status.first_date else "no dates"
    if fmt == "html":
        from orchestrator.reporting import _env

        return _env.get_template("status.html.j2").render(
            status=status,
            rows=rows,
            problems=problems,
            span=span,
            run=_run_line(status.last_run),
            zip=zip,
        )
    if fmt != "text":
        raise ValueError(f"unknown format {fmt!r}")
    header = (
        "calculation",
        "complete through",
        "up to date",
        "to run",
        "blocked",
        "impossible",
        "unclean",
    )
    width = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = [f"Status {span} (dates of the plan); last {_run_line(status.last_run)}", ""]
    for r in [header, *rows]:
        lines.append(
            "  ".join(
                str(v).ljust(width[i]) if i < 2 else str(v).rjust(width[i]) for i, v in enumerate(r)
            ).rstrip()
        )
    if problems:
        lines += ["", f"Not complete and clean ({len(problems)} cells):"]
        lines += [f"  {p}" for p in problems[:50]]
        if len(problems) > 50:
            lines.append(f"  ... and {len(problems) - 50} more")
    pending = sum(
        c.states.get("RUNNABLE", 0) + c.states.get("BLOCKED", 0) for c in status.calculations
    )
    if pending:
        lines += ["", f"{pending} cells still to run or blocked (orchestrator plan)."]
    lines += [
        "",
        "Everything complete and clean." if status.ok else "Not complete and clean: exit 1.",
    ]
    return "\n".join(lines) + "\n"
