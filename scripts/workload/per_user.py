"""The WORKLOAD.md benchmark's 8 calculations in the per-user form (``process(ctx)``).

A template: ``scripts/bench_workload.py`` copies this file verbatim into a calculation package
of its work directory and applies the scenario edits to that copy. Definitions are those of
``/work/shared/benchmarks/WORKLOAD.md`` §2, one calculation per row of its table; the values
are the same as the columnar form's (``columnar.py``) and the benchmark's NumPy reference.

Nulls: NaN ("not defined") is returned as ``None`` (the float null of a stored result), so the
warm-up dates of ``returns``, ``volatility_20``, ``rsi_14``, ``xs_rank`` and ``risk_score``
are null for every user and those fields are ``nullable``.

``xs_rank`` is cross-sectional, but a standard calculation only sees its own user's upstream:
the ``breadth`` meta result therefore also carries the day's sorted finite returns
(``sorted``), and ``xs_rank`` depends on ``breadth`` and ``returns``. The cells stay 8 per
date and a change of ``returns`` reaches ``xs_rank`` through both.

Every calculation body appends ``calc,date`` to the file named by ``$PEERS_EXEC_LOG`` once per
cell it computes (the peers' convention for counting re-executed cells).
"""

from __future__ import annotations

import bisect
import datetime as dt
import itertools
import math
import os
from typing import Any, ClassVar

import numpy as np  # noqa: F401 - scenario E rewrites Returns with np.true_divide

from orchestrator.calculation import (
    MetaCalculation,
    MetaContext,
    StandardCalculation,
    StandardContext,
)

TRADING_DAYS = 252
_LOGGED: set[tuple[str, dt.date]] = set()


def _executed(calc: str, date: dt.date) -> None:
    """Append ``calc,date`` to ``$PEERS_EXEC_LOG`` the first time this process computes the
    cell (``process`` runs once per user; the log counts cells)."""
    key = (calc, date)
    if key in _LOGGED:
        return
    _LOGGED.add(key)
    path = os.environ.get("PEERS_EXEC_LOG")
    if path:
        with open(path, "a", encoding="utf-8") as log:
            log.write(f"{calc},{date.isoformat()}\n")


def _value(result: Any, field: str) -> float | None:
    """A finite float field of an upstream result, else None (no result, null)."""
    if result is None:
        return None
    value = result.get(field)
    if value is None or not math.isfinite(value):
        return None
    return float(value)


class Returns(StandardCalculation):
    """Close-to-close return: ``close[t] / close[t-1] - 1``; null at t = 0.

    Result: ``{"r": float | None}``.
    """

    name = "returns"
    root_data = ("prices",)
    lookback = 2  # today and the previous available date
    nullable = ("r",)  # t = 0: no previous close

    def process(self, ctx: StandardContext) -> dict[str, Any]:
        _executed(self.name, ctx.date)
        rows = ctx.history["prices"]
        if len(rows) < 2:
            return {"r": None}
        cur = float(rows[-1]["close"])
        prev = float(rows[-2]["close"])
        out = cur / prev - 1.0
        return {"r": float(out)}


class Volatility20(StandardCalculation):
    """Sample standard deviation (ddof 1) of the finite ``returns`` on t-19..t.

    ``sqrt(sum((x - m)^2) / (n - 1))`` over the n finite values x with mean m; null for n < 2.

    Result: ``{"vol": float | None}``.
    """

    name = "volatility_20"
    dependencies: ClassVar[dict[str, int]] = {"returns": 20}  # a 20-date window of returns: t-19..t
    nullable = ("vol",)  # t < 2

    def process(self, ctx: StandardContext) -> dict[str, Any]:
        _executed(self.name, ctx.date)
        xs = [x for r in ctx.upstream["returns"] if (x := _value(r, "r")) is not None]
        n = len(xs)
        if n < 2:
            return {"vol": None}
        m = math.fsum(xs) / n
        return {"vol": math.sqrt(math.fsum((x - m) ** 2 for x in xs) / (n - 1))}


class Rsi14(StandardCalculation):
    """Relative strength index over the last ``period`` close differences (simple means).

    gain = mean(max(d, 0)), loss = mean(max(-d, 0)) over the period differences d of
    close[t-period..t]; ``100 - 100 / (1 + gain / loss)``, 100 when loss = 0 (50 when gain is 0
    too); null for t < period.

    Result: ``{"rsi": float | None}``.
    """

    name = "rsi_14"
    root_data = ("prices",)
    period = 14
    lookback = period + 1
    nullable = ("rsi",)  # t < period

    def process(self, ctx: StandardContext) -> dict[str, Any]:
        _executed(self.name, ctx.date)
        closes = [float(r["close"]) for r in ctx.history["prices"]]
        if len(closes) < self.period + 1:
            return {"rsi": None}
        closes = closes[-(self.period + 1) :]
        diffs = [b - a for a, b in itertools.pairwise(closes)]
        gain = math.fsum(max(d, 0.0) for d in diffs) / self.period
        loss = math.fsum(max(-d, 0.0) for d in diffs) / self.period
        if loss == 0.0:
            return {"rsi": 50.0 if gain == 0.0 else 100.0}
        return {"rsi": 100.0 - 100.0 / (1.0 + gain / loss)}


class Drawdown(StandardCalculation):
    """``close[t] / max(close[0..t]) - 1``, the running peak carried in ``ctx.previous``.

    Result: ``{"dd": float, "peak": float}``.
    """

    name = "drawdown"
    root_data = ("prices",)
    historical = True
    flatline_ok = ("dd",)  # 0.0 for every symbol at t = 0

    def process(self, ctx: StandardContext) -> dict[str, Any]:
        _executed(self.name, ctx.date)
        close = float(ctx.root["prices"][-1]["close"])
        before = _value(ctx.previous, "peak")
        peak = close if before is None else max(before, close)
        return {"dd": close / peak - 1.0, "peak": peak}


class Breadth(MetaCalculation):
    """Share of the finite returns that are positive: count(r > 0) / count(finite r); null
    when none is finite.

    Result: ``{"breadth": float | None, "n": int, "sorted": [float, ...]}`` (``sorted``: the
    day's finite returns ascending, for ``xs_rank``).
    """

    name = "breadth"
    dependencies = ("returns",)

    def process(self, ctx: MetaContext) -> dict[str, Any]:
        _executed(self.name, ctx.date)
        results = ctx.upstream["returns"] or {}
        finite = sorted(x for r in results.values() if (x := _value(r, "r")) is not None)
        n = len(finite)
        positive = sum(1 for x in finite if x > 0.0)
        return {"breadth": positive / n if n else None, "n": n, "sorted": finite}


class XsRank(StandardCalculation):
    """Cross-sectional rank of the return among the day's finite returns, in [0, 1]:
    (average 1-based rank, ties averaged, - 1) / (n - 1); 0.5 when n = 1; null where the
    return is null.

    Result: ``{"rank": float | None}``.
    """

    name = "xs_rank"
    dependencies = ("breadth", "returns")
    nullable = ("rank",)  # t = 0

    def process(self, ctx: StandardContext) -> dict[str, Any]:
        _executed(self.name, ctx.date)
        r = _value(ctx.upstream["returns"], "r")
        if r is None:
            return {"rank": None}
        finite = ctx.upstream["breadth"]["sorted"]
        n = len(finite)
        if n == 1:
            return {"rank": 0.5}
        lo = bisect.bisect_left(finite, r)
        hi = bisect.bisect_right(finite, r)
        # The tied block holds 1-based ranks lo+1 .. hi: its average is their midpoint.
        return {"rank": ((lo + 1 + hi) / 2.0 - 1.0) / (n - 1)}


class RiskScore(StandardCalculation):
    """``sqrt(252) * vol + abs(rsi - 50) / 100 + 0.1 * (1 - xs_rank)``; null when any input is.

    Result: ``{"risk": float | None}``.
    """

    name = "risk_score"
    dependencies = ("volatility_20", "rsi_14", "xs_rank")
    nullable = ("risk",)  # t < 14 (rsi)

    def process(self, ctx: StandardContext) -> dict[str, Any]:
        _executed(self.name, ctx.date)
        vol = _value(ctx.upstream["volatility_20"], "vol")
        rsi = _value(ctx.upstream["rsi_14"], "rsi")
        rank = _value(ctx.upstream["xs_rank"], "rank")
        if vol is None or rsi is None or rank is None:
            return {"risk": None}
        return {
            "risk": math.sqrt(TRADING_DAYS) * vol + abs(rsi - 50.0) / 100.0 + 0.1 * (1.0 - rank)
        }


class MarketSummary(MetaCalculation):
    """The day's mean finite ``risk_score``, the breadth, and the count of finite risks.

    Result: ``{"mean_risk": float | None, "breadth": float | None, "n_valid": int}``.
    """

    name = "market_summary"
    dependencies = ("risk_score", "breadth")

    def process(self, ctx: MetaContext) -> dict[str, Any]:
        _executed(self.name, ctx.date)
        results = ctx.upstream["risk_score"] or {}
        risks = [x for r in results.values() if (x := _value(r, "risk")) is not None]
        n = len(risks)
        return {
            "mean_risk": math.fsum(risks) / n if n else None,
            "breadth": _value(ctx.upstream["breadth"], "breadth"),
            "n_valid": n,
        }
