"""Measures of one instrument's close series: daily return, volatility and drawdown.

All three read only ``close`` from the ``prices`` dataset. ``_closes`` is the one place that
decides which closes count (see the package docstring); it lives in this module, next to its
users, so editing it changes their code hashes (the code hash follows module-level helpers).
"""

from __future__ import annotations

import math
from itertools import pairwise
from typing import Any

from orchestrator.calculation import StandardCalculation, StandardContext

TRADING_DAYS_PER_YEAR = 252


def _closes(rows: list[dict[str, Any]]) -> list[tuple[str, float]]:
    """``(ISO date, close)`` per date of ``rows``, oldest first.

    A date whose (last) row has a null or non-positive close is left out, so it can neither
    start nor end a return.
    """
    by_date: dict[str, Any] = {}
    for row in rows:
        by_date[row["date"]] = row.get("close")
    return [(d, float(c)) for d, c in sorted(by_date.items()) if c is not None and c > 0]


def _today_close(ctx: StandardContext) -> float | None:
    todays = _closes(ctx.root["prices"])
    return todays[-1][1] if todays else None


class DailyReturn(StandardCalculation):
    """Simple close-to-close return of an instrument against its previous available close.

    ``return = close_t / close_prev - 1`` (a fraction), where ``close_prev`` is the
    instrument's latest valid close among the ``max_gap`` available dataset dates before
    ``t``. A return therefore bridges up to ``max_gap - 1`` dates the instrument missed (the
    1-3 date gaps of BMY, DHR, ICE, O and ORCL in the S&P file) but not a longer gap (the
    ten-date gaps of DHR, ES and O in March 2015): a move over two weeks is not a daily return.
    ``prev_date`` says which close the return is against. (The simple, not log, return:
    e.g. Campbell, Lo & MacKinlay 1997, *The Econometrics of Financial Markets*, §1.4.)

    Not historical on purpose: ``ctx.previous`` is None after a gap, while ``ctx.history``
    still holds the close before it, and without state the dates can run in parallel.

    Quirks: the first row of an instrument (first date of the data, late listing, after a long
    gap) has ``return = None``. Null ``open``/``high``/``low`` and zero volume do not matter.
    A null close gives ``close = None, return = None`` and is not used as a base later.
    Bad prints of the source (LNT −49 % then +101 % on 2016-05-19/20) are returned as they are.

    Result: ``{"close": float | None, "prev_close": float | None,
    "prev_date": "YYYY-MM-DD" | None, "return": float | None}``.
    """

    name = "daily_return"
    # Null on an instrument's first row (no earlier close): every row of the first date.
    nullable = ("prev_close", "prev_date", "return")
    category = "returns"
    root_data = ("prices",)
    max_gap = 5
    # Today plus the max_gap dates before it: where the previous close is looked for.
    lookback = max_gap + 1

    def process(self, ctx: StandardContext) -> dict[str, Any]:
        today = ctx.date.isoformat()
        close = _today_close(ctx)
        earlier = [(d, c) for d, c in _closes(ctx.history["prices"]) if d < today]
        if close is None or not earlier:
            return {"close": close, "prev_close": None, "prev_date": None, "return": None}
        prev_date, prev_close = earlier[-1]
        return {
            "close": close,
            "prev_close": prev_close,
            "prev_date": prev_date,
            "return": close / prev_close - 1.0,
        }


class Volatility20(StandardCalculation):
    """Sample standard deviation of the last 20 daily close-to-close returns.

    ``volatility = sqrt(sum((r_i - mean(r))^2) / (n - 1))`` (ddof = 1) over the simple returns
    ``r_i = c_i / c_{i-1} - 1`` between consecutive valid closes of the instrument among the
    last ``window + 1`` available dataset dates (today included), so ``n <= window``.
    ``annualised = volatility * sqrt(252)`` (252 trading days a year, the usual convention).
    Both are fractions per day / per year, not percent. (Historical volatility as in Hull,
    *Options, Futures, and Other Derivatives*, "Estimating volatility from historical data",
    with simple instead of log returns, which differ by O(r^2).)

    Quirks: with fewer than 2 returns (a new listing's first two days, or the first dates of the
    data) both values are ``None``. Inside the window, a return between two closes that a gap
    separates counts as one return (it is the move between two observed closes); the window
    then holds fewer than 20 returns and ``n_returns`` says how many. Null closes are skipped.

    Result: ``{"volatility": float | None, "annualised": float | None, "n_returns": int}``.
    """

    name = "volatility_20"
    nullable = ("volatility", "annualised")  # fewer than 2 returns: the first dates
    category = "risk"
    root_data = ("prices",)
    window = 20
    lookback = window + 1

    def process(self, ctx: StandardContext) -> dict[str, Any]:
        closes = [c for _, c in _closes(ctx.history["prices"])]
        returns = [b / a - 1.0 for a, b in pairwise(closes)][-self.window :]
        n = len(returns)
        if n < 2:
            return {"volatility": None, "annualised": None, "n_returns": n}
        # Two passes with fsum: the textbook formula, without the cancellation of sum(x^2).
        mean = math.fsum(returns) / n
        vol = math.sqrt(math.fsum((r - mean) ** 2 for r in returns) / (n - 1))
        return {
            "volatility": vol,
            "annualised": vol * math.sqrt(TRADING_DAYS_PER_YEAR),
            "n_returns": n,
        }


class Drawdown(StandardCalculation):
    """Drawdown of the close from its running peak: ``close / peak - 1`` (a fraction <= 0).

    The usual definition (e.g. Magdon-Ismail & Atiya 2004, "Maximum drawdown", *Risk*), on
    closes, relative to the peak.

    ``peak`` is the highest valid close since ``tracked_since``, carried from day to day through
    ``ctx.previous``: ``peak_t = max(peak_{t-1}, close_t)``. When there is no previous result
    (first date of the data, a new listing, or after a day the instrument has no row, since the
    engine passes no state across a gap) the peak is re-seeded as the highest close over the
    last ``lookback`` available dates (about a quarter of trading), and ``tracked_since`` is
    the oldest of those closes. A gap therefore forgets peaks older than the window: a
    documented approximation, traded for a bounded history.

    Quirks: a null close gives ``close = None, drawdown = None`` and keeps the peak, so the
    next date continues from it. A bad print above the peak would raise the peak for good; none
    of the known bad prints of the S&P file is upward from a peak (LNT's is downward).

    Result: ``{"close": float | None, "peak": float | None, "drawdown": float | None,
    "tracked_since": "YYYY-MM-DD" | None}``.
    """

    name = "drawdown"
    flatline_ok = ("drawdown",)  # 0.0 for every instrument on its first date
    category = "risk"
    root_data = ("prices",)
    historical = True
    lookback = 63

    def process(self, ctx: StandardContext) -> dict[str, Any]:
        close = _today_close(ctx)
        prev = ctx.previous
        carried = prev is not None and prev.get("peak") is not None
        if close is None:
            return {
                "close": None,
                "peak": prev["peak"] if carried else None,
                "drawdown": None,
                "tracked_since": prev.get("tracked_since") if carried else None,
            }
        if carried:
            peak = max(float(prev["peak"]), close)
            since = prev.get("tracked_since")
        else:
            window = _closes(ctx.history["prices"])
            peak = max([close, *(c for _, c in window)])
            since = window[0][0] if window else ctx.date.isoformat()
        return {
            "close": close,
            "peak": peak,
            "drawdown": close / peak - 1.0,
            "tracked_since": since,
        }
