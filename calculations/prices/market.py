"""Market-wide (meta) calculations over the day's ``daily_return`` results of all instruments.

Both read ``ctx.upstream["daily_return"]`` (instrument -> result) and ignore instruments whose
return is ``None`` (first row, late listing, after a long gap): they are counted apart, never
as unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from orchestrator.calculation import MetaCalculation, MetaContext


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
