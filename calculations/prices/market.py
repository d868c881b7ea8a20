"""Market-wide (meta) calculations over the day's ``daily_return`` results of all instruments.

Both read ``ctx.upstream["daily_return"]`` (instrument -> result) and ignore instruments whose
return is ``None`` (first row, late listing, after a long gap): they are counted apart, never
as unchanged. Each has both forms: ``process`` per date, ``compute`` over a block of dates
(``frame.upstream("daily_return", "return")``, NaN where an instrument has no return).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from orchestrator.calculation import Frame, MetaCalculation, MetaContext


def _returns(results: Mapping[str, Any] | None) -> dict[str, float]:
    """Instrument -> return, for the instruments that have one."""
    return {
        user: float(r["return"])
        for user, r in (results or {}).items()
        if r is not None and r.get("return") is not None
    }


class XsRank(MetaCalculation):
    """Cross-sectional percentile rank of each instrument's daily return.

    Returns are ranked ascending, 1..n, ties sharing the average of their ranks (as
    ``pandas.Series.rank(method="average")``); ``pct = (rank - 1) / (n - 1)`` maps the lowest
    return to 0.0 and the highest to 1.0. A single instrument gets 0.5 (neither end); with no
    returns, ``ranks`` is empty. Ties are exact float equality.

    Result: ``{"ranks": {instrument: float in [0, 1]}, "n": int}``.
    """

    name = "xs_rank"
    category = "market"
    dependencies = ("daily_return",)

    def process(self, ctx: MetaContext) -> dict[str, Any]:
        returns = _returns(ctx.upstream["daily_return"])
        ordered = sorted(returns.items(), key=lambda item: (item[1], item[0]))
        n = len(ordered)
        ranks: dict[str, float] = {}
        start = 0
        while start < n:
            end = start  # [start, end] is one group of equal returns
            while end + 1 < n and ordered[end + 1][1] == ordered[start][1]:
                end += 1
            average_rank = (start + end) / 2 + 1
            pct = 0.5 if n == 1 else (average_rank - 1) / (n - 1)
            for user, _ in ordered[start : end + 1]:
                ranks[user] = pct
            start = end + 1
        return {"ranks": dict(sorted(ranks.items())), "n": n}

    def compute(self, frame: Frame) -> dict[str, Any]:
        returns = frame.upstream("daily_return", "return")
        users = frame.users
        ranks = np.empty(len(frame.dates), dtype=object)
        counts = np.zeros(len(frame.dates), dtype=np.int64)
        for i, row in enumerate(returns):
            has = ~np.isnan(row)
            values = row[has]
            n = len(values)
            order = np.argsort(values, kind="stable")
            ordered = values[order]
            # [start, end] of each group of equal returns, in sorted positions
            new = np.ones(n, dtype=bool)
            new[1:] = ordered[1:] != ordered[:-1]
            group = np.cumsum(new) - 1
            starts = np.flatnonzero(new)
            ends = np.append(starts[1:] - 1, n - 1)
            average_rank = (starts + ends)[group] / 2 + 1
            pct = np.full(n, 0.5) if n == 1 else (average_rank - 1) / (n - 1)
            per_user = np.empty(n)
            per_user[order] = pct
            ranks[i] = dict(zip(users[has].tolist(), per_user.tolist()))
            counts[i] = n
        return {"ranks": ranks, "n": counts}


class Breadth(MetaCalculation):
    """Market breadth: how many instruments rose, fell or did not move.

    ``advancers`` have return > 0, ``decliners`` < 0, ``unchanged`` == 0;
    ``share_advancing = advancers / (advancers + decliners + unchanged)`` (a fraction), ``None``
    when no instrument has a return. ``without_return`` counts instruments with a row but no
    return (first row, late listing, after a long gap).

    Result: ``{"advancers": int, "decliners": int, "unchanged": int, "n": int,
    "without_return": int, "share_advancing": float | None}``.
    """

    name = "breadth"
    category = "market"
    dependencies = ("daily_return",)

    def process(self, ctx: MetaContext) -> dict[str, Any]:
        results = ctx.upstream["daily_return"] or {}
        returns = _returns(results).values()
        advancers = sum(1 for r in returns if r > 0)
        decliners = sum(1 for r in returns if r < 0)
        unchanged = sum(1 for r in returns if r == 0)
        n = advancers + decliners + unchanged
        return {
            "advancers": advancers,
            "decliners": decliners,
            "unchanged": unchanged,
            "n": n,
            "without_return": sum(1 for r in results.values() if r is not None) - n,
            "share_advancing": advancers / n if n else None,
        }

    def compute(self, frame: Frame) -> dict[str, Any]:
        returns = frame.upstream("daily_return", "return")
        with np.errstate(invalid="ignore"):
            advancers = (returns > 0).sum(axis=1)
            decliners = (returns < 0).sum(axis=1)
            unchanged = (returns == 0).sum(axis=1)
            n = advancers + decliners + unchanged
            share = np.where(n > 0, advancers / np.maximum(n, 1), np.nan)
        return {
            "advancers": advancers,
            "decliners": decliners,
            "unchanged": unchanged,
            "n": n,
            "without_return": frame.upstream_present("daily_return").sum(axis=1) - n,
            "share_advancing": share,
        }
