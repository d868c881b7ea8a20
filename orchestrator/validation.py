"""Heuristic validation of a cell's results before they are published (seed 004 §7).

Better to fail and alert than to persist corrupt data that pollutes every dependent. Checks,
with thresholds per calculation (class attributes, see ``calculation.py``):

* **NaN / Inf** in a numeric field (``allow_nan = False``) — anywhere in a meta result too;
* **null density** — a field that is null (or missing) for more than ``max_null_fraction`` of
  the users (default 0.5), except the fields listed in ``nullable`` (warm-up periods);
* **flatline** — a float field with zero variance across at least ``flatline_min_users``
  users (default 50), except the fields in ``flatline_ok``.

Statistics are accumulated per field in one pass (``collect``) and merge across worker
processes (``FieldStats.merge``), so validation sees every user however the cell was computed.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any


@dataclass(frozen=True, slots=True)
class Rules:
    """A calculation's validation thresholds (``None`` disables a check)."""

    allow_nan: bool = False
    max_null_fraction: float | None = 0.5
    nullable: frozenset[str] = frozenset()
    flatline_min_users: int | None = 50
    flatline_ok: frozenset[str] = frozenset()


@dataclass(slots=True)
class FieldStats:
    """One field over a cell's users: how often present, null, non-finite; float range."""

    present: int = 0
    nulls: int = 0
    non_finite: int = 0
    floats: int = 0
    low: float = math.inf
    high: float = -math.inf
    leaf: bool = False  # a nested value's path ("x.y", "x[]"): only the NaN/Inf check applies

    def merge(self, other: FieldStats) -> None:
        self.leaf = self.leaf or other.leaf
        self.present += other.present
        self.nulls += other.nulls
        self.non_finite += other.non_finite
        self.floats += other.floats
        self.low = min(self.low, other.low)
        self.high = max(self.high, other.high)


@dataclass(slots=True)
class Stats:
    """Per-field statistics of a cell's results, and how many results there were."""

    results: int = 0
    fields: dict[str, FieldStats] = field(default_factory=dict)

    def merge(self, other: Stats) -> None:
        self.results += other.results
        for name, stats in other.fields.items():
            self.fields.setdefault(name, FieldStats()).merge(stats)


def collect(results: Iterable[Any]) -> Stats:
    """Statistics of flat per-user results (standard cells) or of one nested result (meta:
    every numeric leaf, keyed by its path).

    Column-wise (one pass of C-level builtins per field), because it runs on every result of
    every cell: per-value Python loops cost seconds on a five-year catch-up.
    """
    rows = [r for r in results if isinstance(r, Mapping)]
    out = Stats(results=len(rows))
    if not rows:
        return out
    names: set[str] = set().union(*rows)
    for name in names:
        try:
            values = list(map(itemgetter(name), rows))  # C speed when every row has it
        except KeyError:
            values = [row.get(name, _MISSING) for row in rows]
        missing = values.count(_MISSING)
        nulls = values.count(None)
        kinds = set(map(type, values))
        # Subclasses of float (NumPy's float64) serialise as floats, NaN included: check them.
        float_kinds = {k for k in kinds if issubclass(k, float)}
        if kinds == {float}:
            floats = values
        else:
            floats = [v for v in values if isinstance(v, float)] if float_kinds else []
        finite = list(filter(math.isfinite, floats))
        stats = FieldStats(
            present=len(values) - missing,
            nulls=nulls,
            non_finite=len(floats) - len(finite),
            floats=len(finite),
            low=min(finite, default=math.inf),
            high=max(finite, default=-math.inf),
        )
        out.fields[name] = stats
        if kinds - _SCALARS - float_kinds:  # nested values (meta): check numeric leaves
            for value in values:
                if isinstance(value, (Mapping, list)):
                    for path, leaf in _leaves(value, name):
                        if isinstance(leaf, float) and not math.isfinite(leaf):
                            out.fields.setdefault(path, FieldStats(leaf=True)).non_finite += 1
    return out


_MISSING = object()
_SCALARS = {type(None), bool, int, float, str, object}


def _leaves(value: Any, path: str) -> Iterable[tuple[str, Any]]:
    if isinstance(value, Mapping):
        for key, item in value.items():
            yield from _leaves(item, f"{path}.{key}")
    elif isinstance(value, list):
        for item in value:
            yield from _leaves(item, f"{path}[]")
    else:
        yield path, value


def problems(rules: Rules, stats: Stats, per_user: bool = True) -> list[str]:
    """What fails validation, one line per field; empty when the results pass. Null density
    and flatline are about users, so a meta result (``per_user=False``) gets the NaN check."""
    out = []
    for name, s in sorted(stats.fields.items()):
        if s.non_finite and not rules.allow_nan:
            out.append(f"{name}: {s.non_finite} NaN/Inf value(s)")
        if not per_user or s.leaf:
            continue
        missing = s.nulls + (stats.results - s.present)
        if (
            rules.max_null_fraction is not None
            and name not in rules.nullable
            and stats.results
            and missing / stats.results > rules.max_null_fraction
        ):
            out.append(
                f"{name}: null for {missing} of {stats.results} results "
                f"({missing / stats.results:.0%} > {rules.max_null_fraction:.0%})"
            )
        if (
            rules.flatline_min_users is not None
            and name not in rules.flatline_ok
            and s.floats >= rules.flatline_min_users
            and s.low == s.high
        ):
            out.append(f"{name}: flatline, {s.low!r} for all {s.floats} results")
    return out


def collect_table(table: Any) -> Stats:
    """``collect``'s statistics of a ``columns.Table`` (a columnar block's date), over the
    users without a failure marker: vectorised per column. NaN is the float null (counted
    with the nulls, as ``None`` in a per-user result); ±Inf is non-finite."""
    import numpy as np

    from orchestrator.results import FAILED_KEY

    n = len(table)
    marker = table.columns.get(FAILED_KEY)
    ok = np.ones(n, dtype=bool)
    if marker is not None:
        ok = ~(np.ones(n, dtype=bool) if marker.present is None else marker.present)
    out = Stats(results=int(ok.sum()))
    for name, col in table.columns.items():
        if name == FAILED_KEY:
            continue
        here = ok if col.present is None else ok & col.present
        present = int(here.sum())
        if col.kind == "f8":
            values = np.asarray(col.values)[here]
            nan = np.isnan(values)
            finite = values[np.isfinite(values)]
            out.fields[name] = FieldStats(
                present=present,
                nulls=int(nan.sum()),
                non_finite=int(len(values) - nan.sum() - len(finite)),
                floats=len(finite),
                low=float(finite.min()) if len(finite) else math.inf,
                high=float(finite.max()) if len(finite) else -math.inf,
            )
        elif col.kind in ("i8", "b1"):
            nulls = 0 if col.valid is None else int((~col.valid & here).sum())
            out.fields[name] = FieldStats(present=present, nulls=nulls)
        else:
            values = [v for v, h in zip(col.values, here.tolist(), strict=True) if h]
            sub = collect([{name: v} for v in values])
            stats = sub.fields.pop(name, FieldStats())
            stats.present = present
            out.fields[name] = stats
            out.fields.update(sub.fields)  # nested leaves' paths, as ``collect`` gives them
    return out
