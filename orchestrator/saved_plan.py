"""Reviewed plans, Terraform's plan/apply: ``plan --save FILE`` and ``run --plan FILE``.

A saved plan holds the decisions (cell -> reason) and everything they were decided from:
per calculation its code, layer and infrastructure hashes, category, scoped epoch and the
definition the planner reads (kind, dependencies and windows, root data, lookback,
historical, earliest date); the system epoch; every root dataset's available dates with their
content hashes; a digest of each calculation's stored cells (fingerprint parts, result hash,
status, attempts: ``Ledger.cell_digests``); the target date and the selection.

``run --plan FILE`` observes again and ``compare`` lists every difference in one line each
("rsi_14 code changed since the plan was made"); any difference refuses the run (exit 2)
before anything executes. With none, the planner (pure: same inputs, same plan) makes the
same decisions, which ``compare`` checks too, and the run executes exactly them.

``capture`` and ``compare`` are pure; reading and writing the file are at the edges.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.errors import ConfigError
from orchestrator.planning import Plan, PlanRequest

FORMAT = 1
KIND = "orchestrator-plan"


class SavedPlanError(ConfigError):
    """A plan file that cannot be read, is not a saved plan, or is of another format (exit 2)."""


class StalePlanError(ConfigError):
    """The world changed since the plan was made: the run is refused (exit 2)."""


@dataclass(frozen=True, slots=True)
class SavedPlan:
    """A plan and its inputs (see the module docstring); JSON-ready values only.

    ``calcs``: name -> {"code", "layer", "infra", "category", "scoped_epoch", "definition"};
    ``root``: dataset -> {ISO date: content hash}; ``ledger``: name -> digest of its cells;
    ``decisions``: "name|ISO date" -> reason; ``selection``: sorted names or None (all).
    """

    target: str
    selection: tuple[str, ...] | None
    epoch: int
    calcs: Mapping[str, Mapping[str, Any]]
    root: Mapping[str, Mapping[str, str]]
    ledger: Mapping[str, str]
    decisions: Mapping[str, str]
    version: str = ""


def capture(
    request: PlanRequest,
    plan: Plan,
    ledger: Mapping[str, str],
    selection: frozenset[str] | None,
    version: str = "",
) -> SavedPlan:
    """The saved form of ``plan``, made from ``request`` with the ledger's cell digests."""
    calcs = {}
    for name, spec in sorted(request.manifest.calcs.items()):
        calcs[name] = {
            "code": spec.code_hash,
            "layer": spec.layer_hash,
            "infra": spec.infra_hash,
            "category": spec.category,
            "scoped_epoch": request.scoped_epochs.get(name, (0, ""))[0],
            "definition": {
                "kind": spec.kind,
                "dependencies": list(spec.dependencies),
                "windows": [list(w) for w in spec.windows],
                "root_data": list(spec.root_data),
                "lookback": spec.lookback,
                "historical": spec.historical,
                "earliest_date": spec.earliest_date.isoformat() if spec.earliest_date else None,
            },
        }
    return SavedPlan(
        target=plan.target_date.isoformat(),
        selection=tuple(sorted(selection)) if selection is not None else None,
        epoch=request.epoch,
        calcs=calcs,
        root={
            ds: {d.isoformat(): h for d, h in sorted(dates.items())}
            for ds, dates in sorted(request.root.items())
        },
        ledger=dict(sorted(ledger.items())),
        decisions={f"{k[0]}|{k[1].isoformat()}": d.reason.value for k, d in plan.decisions.items()},
        version=version,
    )


def _listed(items: list[str], limit: int = 3) -> str:
    return ", ".join(items[:limit]) + (
        f" and {len(items) - limit} more" if len(items) > limit else ""
    )


def compare(saved: SavedPlan, current: SavedPlan) -> list[str]:
    """Every difference between the inputs of a saved plan and those observed now, one
    line each (empty: the plan still holds); then, only if the inputs agree, the decisions."""
    out = []
    if saved.target != current.target or saved.selection != current.selection:
        out.append("the plan's target date or selection differs from this run's")
    if saved.epoch != current.epoch:
        out.append(f"system epoch changed {saved.epoch} -> {current.epoch} since the plan was made")
    for name in sorted(set(saved.calcs) | set(current.calcs)):
        before, now = saved.calcs.get(name), current.calcs.get(name)
        if before is None:
            out.append(f"calculation {name} was added since the plan was made")
            continue
        if now is None:
            out.append(f"calculation {name} was removed since the plan was made")
            continue
        for part, words in (
            ("code", "code"),
            ("layer", "helper (layer) code"),
            ("infra", "infrastructure (package versions)"),
            ("category", "category"),
            ("scoped_epoch", "epoch"),
            ("definition", "definition (dependencies, windows, root data, lookback)"),
        ):
            if before.get(part) != now.get(part):
                out.append(f"{name} {words} changed since the plan was made")
    for ds in sorted(set(saved.root) | set(current.root)):
        before_dates, now_dates = saved.root.get(ds, {}), current.root.get(ds, {})
        changed = sorted(
            d for d in set(before_dates) | set(now_dates) if before_dates.get(d) != now_dates.get(d)
        )
        if changed:
            out.append(f"root data {ds} changed since the plan was made on {_listed(changed)}")
    moved = sorted(
        name
        for name in set(saved.ledger) | set(current.ledger)
        if saved.ledger.get(name) != current.ledger.get(name)
    )
    if moved:
        out.append(f"ledger changed since the plan was made (cells written): {_listed(moved)}")
    if not out and saved.decisions != current.decisions:  # (a planner that is not pure)
        differ = sorted(
            k
            for k in set(saved.decisions) | set(current.decisions)
            if saved.decisions.get(k) != current.decisions.get(k)
        )
        out.append(
            f"the plan's decisions differ now: {_listed([k.replace('|', ' ') for k in differ])}"
        )
    return out


def write(path: Path, saved: SavedPlan) -> None:
    """Write ``saved`` as JSON (sorted keys).

    Raises:
        SavedPlanError: the file cannot be written.
    """
    body = {
        "kind": KIND,
        "format": FORMAT,
        "version": saved.version,
        "target": saved.target,
        "selection": list(saved.selection) if saved.selection is not None else None,
        "epoch": saved.epoch,
        "calcs": saved.calcs,
        "root": saved.root,
        "ledger": saved.ledger,
        "decisions": saved.decisions,
    }
    try:
        path.write_text(json.dumps(body, indent=1, sort_keys=True) + "\n")
    except OSError as e:
        raise SavedPlanError(f"cannot write the plan to {path}: {e.strerror or e}") from e


def read(path: Path) -> SavedPlan:
    """Read a saved plan.

    Raises:
        SavedPlanError: unreadable, not JSON, not a saved plan, or another format.
    """
    try:
        body = json.loads(path.read_text())
    except OSError as e:
        raise SavedPlanError(f"cannot read the plan {path}: {e.strerror or e}") from e
    except ValueError as e:
        raise SavedPlanError(f"{path} is not a saved plan (not JSON: {e})") from e
    if not isinstance(body, dict) or body.get("kind") != KIND:
        raise SavedPlanError(f"{path} is not a saved plan (make one with plan --save)")
    if body.get("format") != FORMAT:
        raise SavedPlanError(
            f"{path} is a saved plan of format {body.get('format')!r}, this version reads "
            f"{FORMAT}; make the plan again with plan --save"
        )
    try:
        dt.date.fromisoformat(body["target"])
        return SavedPlan(
            target=body["target"],
            selection=tuple(body["selection"]) if body["selection"] is not None else None,
            epoch=int(body["epoch"]),
            calcs=dict(body["calcs"]),
            root={ds: dict(v) for ds, v in body["root"].items()},
            ledger=dict(body["ledger"]),
            decisions=dict(body["decisions"]),
            version=str(body.get("version", "")),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise SavedPlanError(f"{path} is a damaged saved plan ({type(e).__name__}: {e})") from e
