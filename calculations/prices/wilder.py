"""Wilder's RSI and ATR: indicators smoothed with Wilder's running average.

Source: J. Welles Wilder Jr., *New Concepts in Technical Trading Systems* (1978), chapters on
the Relative Strength Index and on Volatility (Average True Range).

Wilder's smoothing of a series ``x`` with period ``N``: the first average is the simple mean of
the first ``N`` values, then ``avg_t = (avg_{t-1} * (N - 1) + x_t) / N`` (an exponential average
with ``alpha = 1 / N``). Both indicators need a previous close, so the first average needs
``N + 1`` bars and the first value appears on an instrument's ``N + 1``-th bar (TA-Lib's
convention for both).

State is carried through ``ctx.previous`` (``historical = True``). When there is none — an
instrument's first dates, or after a date it has no row, since the engine passes no state
across a gap — the average is re-seeded from ``ctx.history``, whose window is exactly the last
``N + 1`` available dataset dates: a seed needs a valid bar on each of them, i.e. ``N + 1``
consecutive bars with no gap. Until then the indicator is ``None``. As a result every value
equals Wilder's indicator computed over the instrument's current run of consecutive bars.
"""

from __future__ import annotations

import math
from itertools import pairwise
from typing import Any

from orchestrator.calculation import StandardCalculation, StandardContext


def _bars(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per date (the last one if a date repeats), oldest first."""
    by_date: dict[str, dict[str, Any]] = {}
    for row in rows:
        by_date[row["date"]] = row
    return [by_date[d] for d in sorted(by_date)]


def _close(bar: dict[str, Any]) -> float | None:
    close = bar.get("close")
    return float(close) if close is not None and close > 0 else None


def _seed_bars(ctx: StandardContext, size: int) -> list[dict[str, Any]] | None:
    """The last ``size`` bars of the window ending today, or None unless the window holds a
    bar with a valid close on each of its ``size`` dates (i.e. no gap, no null close)."""
    today = ctx.date.isoformat()
    bars = [b for b in _bars(ctx.history["prices"]) if b["date"] <= today][-size:]
    if len(bars) < size or bars[-1]["date"] != today:
        return None
    if any(_close(b) is None for b in bars):
        return None
    return bars


def true_range(bar: dict[str, Any], prev_close: float | None) -> float | None:
    """Wilder's true range of ``bar``: ``max(hi, prev_close) - min(lo, prev_close)``, which is
    ``max(hi - lo, |hi - prev_close|, |lo - prev_close|)``; just ``hi - lo`` without a previous
    close.

    ``hi`` and ``lo`` are the max and min of the non-null values of ``high``, ``low`` and
    ``close``: a bar's range must contain its own close. This repairs swapped high/low (AOS
    2014-05-19 has high < low) and closes outside the range; with a null high or low (DHR, O,
    UA... in the S&P file) the range shrinks to what is known and the true range falls back to
    the close-to-close move, a lower bound. ``open`` is not part of the true range, so bad
    opens (CHD 2014-05-19) do not matter. Returns None when the close is missing.
    """
    close = _close(bar)
    if close is None:
        return None
    known = [float(v) for v in (bar.get("high"), bar.get("low")) if v is not None]
    hi = max([close, *known])
    lo = min([close, *known])
    if prev_close is None:
        return hi - lo
    return max(hi, prev_close) - min(lo, prev_close)


class Rsi14(StandardCalculation):
    """Wilder's Relative Strength Index over ``period`` = 14 bars, on a 0..100 scale.

    Source: Wilder (1978), *New Concepts in Technical Trading Systems*, "The Relative Strength
    Index"; seeding as in TA-Lib's ``RSI`` (the first average is the simple mean).

    With ``d_t = close_t - close_{t-1}``, ``gain_t = max(d_t, 0)``, ``loss_t = max(-d_t, 0)``,
    ``avg_gain`` and ``avg_loss`` are Wilder averages (see the module docstring) and
    ``RSI = 100 - 100 / (1 + avg_gain / avg_loss)``; ``RSI = 100`` when ``avg_loss == 0``
    (including a flat series, by this convention).

    Quirks: ``None`` during warm-up and for ``period`` bars after a gap or a null close (re-seed
    rule of the module docstring). Null open/high/low and zero volume do not matter. Bad prints
    (LNT 2016-05-19) enter the averages like any move.

    Result: ``{"rsi": float | None, "avg_gain": float | None, "avg_loss": float | None,
    "close": float | None}`` (averages in price units per bar; ``close`` is the state).
    """

    name = "rsi_14"
    nullable = ("rsi", "avg_gain", "avg_loss")  # warm-up: the first `period` bars
    category = "signals"
    root_data = ("prices",)
    historical = True
    period = 14
    lookback = period + 1

    def process(self, ctx: StandardContext) -> dict[str, Any]:
        n = self.period
        todays = _bars(ctx.root["prices"])
        close = _close(todays[-1]) if todays else None
        empty = {"rsi": None, "avg_gain": None, "avg_loss": None, "close": close}
        if close is None:
            return empty
        prev = ctx.previous
        if prev and prev.get("avg_gain") is not None and prev.get("close") is not None:
            change = close - float(prev["close"])
            avg_gain = (float(prev["avg_gain"]) * (n - 1) + max(change, 0.0)) / n
            avg_loss = (float(prev["avg_loss"]) * (n - 1) + max(-change, 0.0)) / n
        else:
            bars = _seed_bars(ctx, n + 1)
            if bars is None:
                return empty
            closes = [_close(b) for b in bars]
            changes = [b - a for a, b in pairwise(closes)]  # type: ignore[operator]
            avg_gain = math.fsum(max(c, 0.0) for c in changes) / n
            avg_loss = math.fsum(max(-c, 0.0) for c in changes) / n
        rsi = 100.0 if avg_loss == 0 else 100.0 - 100.0 / (1.0 + avg_gain / avg_loss)
        return {"rsi": rsi, "avg_gain": avg_gain, "avg_loss": avg_loss, "close": close}


class Atr14(StandardCalculation):
    """Wilder's Average True Range over ``period`` = 14 bars, in price units.

    Source: Wilder (1978), *New Concepts in Technical Trading Systems*, "Volatility"; seeding as
    in TA-Lib's ``ATR`` (the mean of the first ``period`` true ranges that have a previous close).

    ``atr`` is the Wilder average (module docstring) of ``true_range`` (see that function for
    null and inconsistent high/low); the seed averages the true ranges of the last ``period``
    bars, each against the close before it. ``atr_ratio = atr / close`` (a fraction of the
    price, comparable across instruments; TA-Lib's NATR is this times 100).

    Quirks: ``atr`` is ``None`` during warm-up and for ``period`` bars after a gap or a null
    close; ``tr`` is then still given when a close of the instrument precedes today in the
    window (against that close, even across a gap), else the bar's own range.

    Result: ``{"atr": float | None, "tr": float | None, "close": float | None,
    "atr_ratio": float | None}``.
    """

    name = "atr_14"
    nullable = ("atr", "atr_ratio")  # warm-up: the first `period` bars
    category = "risk"
    root_data = ("prices",)
    historical = True
    period = 14
    lookback = period + 1

    def process(self, ctx: StandardContext) -> dict[str, Any]:
        n = self.period
        todays = _bars(ctx.root["prices"])
        bar = todays[-1] if todays else {}
        close = _close(bar) if bar else None
        if close is None:
            return {"atr": None, "tr": None, "close": None, "atr_ratio": None}
        prev = ctx.previous
        if prev and prev.get("atr") is not None and prev.get("close") is not None:
            tr = true_range(bar, float(prev["close"]))
            atr = (float(prev["atr"]) * (n - 1) + tr) / n  # type: ignore[operator]
        else:
            bars = _seed_bars(ctx, n + 1)
            if bars is None:
                today = ctx.date.isoformat()
                earlier = [
                    c
                    for b in _bars(ctx.history["prices"])
                    if b["date"] < today and (c := _close(b)) is not None
                ]
                tr = true_range(bar, earlier[-1] if earlier else None)
                return {"atr": None, "tr": tr, "close": close, "atr_ratio": None}
            trs = [true_range(b, _close(a)) for a, b in pairwise(bars)]
            tr = trs[-1]
            atr = math.fsum(trs) / n  # type: ignore[arg-type]
        return {"atr": atr, "tr": tr, "close": close, "atr_ratio": atr / close}
