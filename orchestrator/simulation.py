"""The simulation hash: what a calculation *does* on a fixed, fabricated world — an opt-in
heuristic (``cosmetic_verdict = "simulation"``), never the default.

A simulation can show that behaviour changed; it can never prove that it did not (a changed
money threshold behaves the same on every fabricated value that misses both thresholds). The
default verdict is the proof of ``equivalence.py``, which runs no user code. With the opt-in,
a change the proof rejects is still never cosmetic when a literal, operator, comparison or
called name changed (``Lineage.tokens_hash``); only then is the simulation consulted.

When a calculation's code hash changes, the question is whether its behaviour changed. The
fabricator builds deterministic contexts for it — seeded by the calculation's name — from the
root data schemas (columns and types, inferred when a source is indexed) and from the
simulated outputs of its dependencies, and the sim runner runs ``process`` on them and hashes
every output (an exception counts as its type name). Two code versions with the same
simulation hash behave the same on that world.

The world covers the edge cases calculations trip on: several users and a single user, an
empty history, a missing upstream result, zeros, negatives, a NaN, and thirty consecutive
dates (so warm-ups complete and historical calculations carry their ``previous`` result).

A change is only called cosmetic when the simulation executed it: the runner records which
lines of the calculation's module ran (``sys.settrace``), and every statement that is new in a
changed or added function must have run. A changed constant or class attribute cannot be
proven by execution, so it is never cosmetic. Seed 004 §4 ("Behavioral Hashing (SimHash)").
"""

from __future__ import annotations

import ast
import datetime as dt
import inspect
import math
import random
import sys
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Self

from orchestrator.calculation import MetaContext, StandardContext
from orchestrator.fingerprint import digest
from orchestrator.lineage import statement_digests
from orchestrator.manifest import CalcSpec, Manifest

# A month of consecutive dates: enough for warm-ups (a 14-period indicator seeds on day 15)
# and for historical state carried day to day.
SIM_DATES = tuple(dt.date(2001, 1, 1) + dt.timedelta(days=i) for i in range(30))
USERS = ("u0", "u1", "u2", "u3", "u4")
SOLO = "s0"
NO_HISTORY_USER = "u1"  # its rows exist only today: an empty history
NO_UPSTREAM_USER = "u2"  # its upstream results are missing (None)
NAN_USER = "u3"  # its float fields are NaN on the second date, negative on the third

Schema = Mapping[str, str]  # column -> "int" | "float" | "str" | "date" | "user"


@dataclass(slots=True)
class Simulation:
    """One calculation's simulated outputs and the lines of its module that ran.

    Attributes:
        outputs: (scenario, ISO date, user or None) -> result (or {"__error__": type name}).
        lines: line numbers of the calculation's module executed during the simulation.
    """

    outputs: dict[tuple[str, str, str | None], Any] = field(default_factory=dict)
    lines: set[int] = field(default_factory=set)

    @property
    def sim_hash(self) -> str:
        return digest("sim", sorted((list(k), _hashable(v)) for k, v in self.outputs.items()))


def _hashable(value: Any) -> Any:
    try:
        digest("probe", value)
        return value
    except TypeError:  # a non-JSON value: its type is what we can compare
        return {"__unhashable__": type(value).__name__}


def _value(rng: random.Random, kind: str, user: str, date: dt.date, column: str) -> Any:
    """A fabricated value. Most users see plausible values every day, so calculations reach
    their steady state (warm-ups complete); the edge cases are planted: zeros for u2, a NaN
    then a negative for u3, extreme magnitudes now and then for u4."""
    if kind == "date":
        return date.isoformat()
    if kind == "user":
        return user
    day = SIM_DATES.index(date) if date in SIM_DATES else 0
    if kind == "int":
        if user == "u2" and day % 3 == 0:
            return 0
        if user == "u3" and day == 2:
            return -rng.randint(1, 50)
        return rng.randint(1, 1000)
    if kind == "float":
        if user == NAN_USER and day == 1:
            return math.nan
        if user == NAN_USER and day == 2:
            return -round(rng.uniform(1, 100), 4)
        if user == "u2" and day % 3 == 0:
            return 0.0
        if user == "u4" and day % 7 == 3:
            return rng.choice([1e-3, 1e6])
        return round(rng.uniform(1, 500), 2)
    return rng.choice(["", "A", "B", "PRIJEM", "VYDAJ", column[:3].upper()])


def _rows(
    rng: random.Random, schema: Schema, users: tuple[str, ...], dates: tuple[dt.date, ...]
) -> dict[tuple[dt.date, str], list[dict[str, Any]]]:
    """Fabricated rows per (date, user): two rows for u4 (several rows a day), none for the
    empty-history user before the last date."""
    out: dict[tuple[dt.date, str], list[dict[str, Any]]] = {}
    for date in dates:
        for user in users:
            if user == NO_HISTORY_USER and date != dates[-1]:
                continue
            count = 2 if user == "u4" else 1
            out[(date, user)] = [
                {c: _value(rng, kind, user, date, c) for c, kind in schema.items()}
                for _ in range(count)
            ]
    return out


class _LineRecorder:
    """Records executed line numbers of one file (``sys.settrace``), restoring any tracer
    that was installed before (coverage tools, debuggers)."""

    def __init__(self, filename: str):
        self.filename = filename
        self.lines: set[int] = set()

    def _trace(self, frame: Any, event: str, arg: Any) -> Any:
        if frame.f_code.co_filename != self.filename:
            return None
        if event == "line":
            self.lines.add(frame.f_lineno)
        return self._trace

    def __enter__(self) -> Self:
        self._previous = sys.gettrace()
        sys.settrace(self._trace)
        return self

    def __exit__(self, *exc: object) -> None:
        sys.settrace(self._previous)


def simulate(
    manifest: Manifest, names: set[str], schemas: Mapping[str, Schema]
) -> dict[str, Simulation]:
    """Simulate ``names`` and everything upstream of them, in dependency order.

    Args:
        manifest: the calculations.
        names: calculations to simulate (their upstream closure is simulated too).
        schemas: dataset -> column types (columns of an unknown dataset are fabricated as
            one float column named "value").

    Returns:
        name -> Simulation, for ``names`` and their upstream closure.
    """
    wanted = set(names)
    stack = list(names)
    while stack:
        for dep in manifest.calcs[stack.pop()].dependencies:
            if dep not in wanted:
                wanted.add(dep)
                stack.append(dep)
    sims: dict[str, Simulation] = {}
    for name in manifest.order:
        if name in wanted:
            sims[name] = simulate_one(manifest.calcs[name], manifest, sims, schemas)
    return sims


def simulate_one(
    spec: CalcSpec,
    manifest: Manifest,
    sims: Mapping[str, Simulation],
    schemas: Mapping[str, Schema],
) -> Simulation:
    rng = random.Random(digest("simulation", spec.name))
    sim = Simulation()
    filename = inspect.getsourcefile(spec.cls) or ""
    for scenario, users in (("many", USERS), ("solo", (SOLO,))):
        dates = SIM_DATES if scenario == "many" else SIM_DATES[:1]
        rows = {
            ds: _rows(rng, schemas.get(ds) or {"value": "float"}, users, dates)
            for ds in spec.root_data
        }
        instance = spec.cls()
        for i, date in enumerate(dates):
            upstream = {
                dep: _upstream(manifest, sims, dep, scenario, date) for dep in spec.dependencies
            }
            # a windowed dependency is read as the list of its window's dates, oldest first
            windows = {
                dep: [
                    _upstream(manifest, sims, dep, scenario, d)
                    for d in dates[max(0, i + 1 - spec.window(dep)) : i + 1]
                ]
                for dep in spec.dependencies
                if spec.window(dep) > 1
            }
            with _LineRecorder(filename) as recorder:
                if spec.is_standard:
                    for user in users:
                        if spec.root_data and not any(rows[ds].get((date, user)) for ds in rows):
                            continue
                        ctx: StandardContext | MetaContext = StandardContext(
                            date=date,
                            user=user,
                            root={ds: rows[ds].get((date, user), []) for ds in rows},
                            history={
                                ds: [
                                    r
                                    for d in dates[max(0, i + 1 - spec.lookback) : i + 1]
                                    for r in rows[ds].get((d, user), [])
                                ]
                                for ds in rows
                            },
                            upstream={
                                dep: (
                                    None
                                    if user == NO_UPSTREAM_USER
                                    else [
                                        v.get(user) if manifest.calcs[dep].is_standard else v
                                        for v in windows[dep]
                                    ]
                                    if dep in windows
                                    else (
                                        value.get(user)
                                        if manifest.calcs[dep].is_standard
                                        else value
                                    )
                                )
                                for dep, value in upstream.items()
                            },
                            previous=sim.outputs.get((scenario, dates[i - 1].isoformat(), user))
                            if spec.historical and i > 0
                            else None,
                        )
                        sim.outputs[(scenario, date.isoformat(), user)] = _run(instance, ctx)
                else:
                    ctx = MetaContext(
                        date=date,
                        root={
                            ds: [r for u in users for r in rows[ds].get((date, u), [])]
                            for ds in rows
                        },
                        upstream={**upstream, **windows},
                        previous=sim.outputs.get((scenario, dates[i - 1].isoformat(), None))
                        if spec.historical and i > 0
                        else None,
                    )
                    sim.outputs[(scenario, date.isoformat(), None)] = _run(instance, ctx)
            sim.lines |= recorder.lines
    return sim


def _upstream(
    manifest: Manifest, sims: Mapping[str, Simulation], dep: str, scenario: str, date: dt.date
) -> Any:
    outputs = sims[dep].outputs
    if manifest.calcs[dep].is_standard:
        return {
            user: result
            for (s, d, user), result in outputs.items()
            if s == scenario
            and d == date.isoformat()
            and isinstance(result, dict)
            and "__error__" not in result
        }
    return outputs.get((scenario, date.isoformat(), None))


def _run(instance: Any, ctx: Any) -> Any:
    try:
        return instance.process(ctx)
    except Exception as e:  # noqa: BLE001 - behaviour includes how it fails
        return {"__error__": type(e).__name__}


def unverified_changes(
    spec: CalcSpec,
    changed: set[str],
    lines: set[int],
    old_statements: Mapping[str, list[str]],
) -> list[str]:
    """Changed or added definitions of ``spec``'s code that the simulation did not vouch for.

    A changed function is vouched for when every statement that is new in it — not among the
    old version's statements of that function (``old_statements``, from the registry) — ran
    at least once (its line is in ``lines``). Anything else changed (a constant, a class
    attribute, the class header) cannot be proven by execution.

    Returns:
        Sorted names that cannot be vouched for.
    """
    module = sys.modules[spec.cls.__module__]
    tree = ast.parse(inspect.getsource(module))
    functions: dict[str, ast.FunctionDef | ast.AsyncFunctionDef] = {}
    for stmt in tree.body:
        if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)):
            functions[stmt.name] = stmt
        elif isinstance(stmt, ast.ClassDef) and stmt.name == spec.cls.__name__:
            for member in stmt.body:
                if isinstance(member, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    functions[f"{spec.cls.__qualname__}.{member.name}"] = member
    out = []
    for name in changed:
        function = functions.get(name)
        if function is None:
            out.append(name)
            continue
        remaining = Counter(old_statements.get(name, []))
        for stmt_digest, line in statement_digests(function):
            if remaining[stmt_digest] > 0:
                remaining[stmt_digest] -= 1
            elif line not in lines:
                out.append(name)
                break
    return sorted(out)
