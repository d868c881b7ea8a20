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

Arithmetic, exactly (both forms, ``process`` per instrument and ``compute`` over a block): a
seed's sums accumulate oldest bar first, ``s = s + x``, in IEEE double, then divide by ``N``;
a step is ``(avg * (N - 1) + x) / N``. The columnar form steps through the block's dates in
order (the recursion), vectorised over instruments.
"""

from __future__ import annotations

from itertools import pairwise
from typing import Any

import numpy as np

from orchestrator.calculation import Frame, StandardCalculation, StandardContext


def _bars(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per date (the last one if a date repeats), oldest first."""
    by_date: dict[str, dict[str, Any]] = {}
    for row in rows:
        by_date[row["date"]] = row
    return [by_date[d] for d in sorted(by_date)]


def _close(bar: dict[str, Any]) -> float | None:
    close = bar.get("close")
    return float(close) if close is not None and close > 0 else None


def _numbers(frame: Frame, column: str) -> np.ndarray:
    """(s, u) float64 of a numeric ``prices`` column over the span (NaN: no row or null)."""
    values = frame.root("prices", column)
    if values.dtype.kind == "f":
        return values
    return np.array(
        [[np.nan if v is None else float(v) for v in row] for row in values.tolist()],
        dtype=np.float64,
    ).reshape(values.shape)


def _close_matrix(frame: Frame) -> tuple[np.ndarray, np.ndarray]:
    """The columnar ``_close``: ``(close, valid)``, (s, u) over the span of ``prices``; the
    close of the user's (last) row of a date where positive, else NaN and ``valid`` False."""
    close = _numbers(frame, "close")
    with np.errstate(invalid="ignore"):
        valid = frame.root_present("prices") & (close > 0)
    return np.where(valid, close, np.nan), valid


def _runs(valid: np.ndarray) -> np.ndarray:
    """(s, u) int: how many span rows up to and including each one have a valid close without
    interruption (0 on an invalid one)."""
    span = np.arange(valid.shape[0])[:, None]
    return span - np.maximum.accumulate(np.where(valid, -1, span), axis=0)


def _previous_floats(frame: Frame, field: str) -> np.ndarray:
    """(u,) float64: the own field ``field`` on ``frame.previous_date`` (NaN where the user had
    no result or a null, and everywhere when no previous result has the field)."""
    try:
        return np.asarray(frame.previous(field), dtype=np.float64)
    except KeyError:  # e.g. every previous result is a failure marker
        return np.full(len(frame.users), np.nan)


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


def _bar_ranges(
    close: np.ndarray, high: np.ndarray, low: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """``(hi, lo)`` of ``true_range`` elementwise over arrays (NaN: a null high or low): the
    same comparisons in the same order as ``max`` / ``min`` there, so the same floats."""
    hi = np.where(high > close, high, close)
    hi = np.where(low > hi, low, hi)
    lo = np.where(high < close, high, close)
    lo = np.where(low < lo, low, lo)
    return hi, lo


def _true_ranges(hi: np.ndarray, lo: np.ndarray, prev_close: np.ndarray) -> np.ndarray:
    """``true_range`` elementwise from ``_bar_ranges``; a NaN ``prev_close`` is no previous
    close: both comparisons are then False, which leaves ``hi - lo``, as there."""
    top = np.where(prev_close > hi, prev_close, hi)
    bottom = np.where(prev_close < lo, prev_close, lo)
    return top - bottom


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
            gains = losses = 0.0
            for a, b in pairwise(closes):
                change = b - a  # type: ignore[operator]
                gains = gains + max(change, 0.0)
                losses = losses + max(-change, 0.0)
            avg_gain, avg_loss = gains / n, losses / n
        rsi = 100.0 if avg_loss == 0 else 100.0 - 100.0 / (1.0 + avg_gain / avg_loss)
        return {"rsi": rsi, "avg_gain": avg_gain, "avg_loss": avg_loss, "close": close}

    def compute(self, frame: Frame) -> dict[str, Any]:
        n = self.period
        closes, valid = _close_matrix(frame)
        rows = frame.rows("prices")
        change = np.full_like(closes, np.nan)
        change[1:] = closes[1:] - closes[:-1]
        # max(x, 0.0) is x unless 0.0 > x: the same test, so the same signed zeros
        up = np.where(0.0 > change, 0.0, change)
        down = np.where(0.0 > -change, 0.0, -change)
        seeded = _runs(valid)[rows] >= n + 1  # n + 1 valid bars in a row, today the last
        gains = np.zeros((len(rows), len(frame.users)))
        losses = np.zeros_like(gains)
        for k in range(n):  # oldest change first, as in process
            j = np.maximum(rows - n + 1 + k, 0)
            gains = gains + up[j]
            losses = losses + down[j]
        seed_gain, seed_loss = gains / n, losses / n
        shape = gains.shape
        out = {f: np.full(shape, np.nan) for f in ("rsi", "avg_gain", "avg_loss")}
        had = frame.previous_present()
        gain, loss = _previous_floats(frame, "avg_gain"), _previous_floats(frame, "avg_loss")
        last = _previous_floats(frame, "close")
        with np.errstate(invalid="ignore", divide="ignore"):
            for i, r in enumerate(rows.tolist()):
                close, ok = closes[r], valid[r]
                carry = ok & had & ~np.isnan(gain) & ~np.isnan(last)
                seed = ok & ~carry & seeded[i]
                d = close - last
                stepped_gain = (gain * (n - 1) + np.where(0.0 > d, 0.0, d)) / n
                stepped_loss = (loss * (n - 1) + np.where(0.0 > -d, 0.0, -d)) / n
                gain = np.where(carry, stepped_gain, np.where(seed, seed_gain[i], np.nan))
                loss = np.where(carry, stepped_loss, np.where(seed, seed_loss[i], np.nan))
                out["rsi"][i] = np.where(loss == 0, 100.0, 100.0 - 100.0 / (1.0 + gain / loss))
                out["avg_gain"][i], out["avg_loss"][i] = gain, loss
                had, last = frame.present[i], close  # no result today: no state tomorrow
        out["close"] = closes[rows]
        return out


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
            total = 0.0
            for a, b in pairwise(bars):
                tr = true_range(b, _close(a))
                total = total + tr  # type: ignore[operator]
            atr = total / n
        return {"atr": atr, "tr": tr, "close": close, "atr_ratio": atr / close}

    def compute(self, frame: Frame) -> dict[str, Any]:
        n = self.period
        closes, valid = _close_matrix(frame)
        high, low = _numbers(frame, "high"), _numbers(frame, "low")
        rows = frame.rows("prices")
        before = np.full_like(closes, np.nan)
        before[1:] = closes[:-1]
        # every bar against the close of the span row before it: the seed's true ranges
        hi, lo = _bar_ranges(closes, high, low)
        ranges = _true_ranges(hi, lo, before)
        seeded = _runs(valid)[rows] >= n + 1
        total = np.zeros((len(rows), len(frame.users)))
        for k in range(n):  # oldest bar first, as in process
            total = total + ranges[np.maximum(rows - n + 1 + k, 0)]
        seed_atr = total / n
        # No seed: today's true range against the latest valid close earlier in the window.
        span = np.arange(len(closes))[:, None]
        latest = np.maximum.accumulate(np.where(valid, span, -1), axis=0)
        base = np.full(total.shape, -1, dtype=np.int64)
        base[rows >= 1] = latest[rows[rows >= 1] - 1]
        base = np.where(base >= (rows - n)[:, None], base, -1)
        earlier = np.where(base >= 0, np.take_along_axis(closes, np.maximum(base, 0), 0), np.nan)
        unseeded_tr = _true_ranges(hi[rows], lo[rows], earlier)
        atrs, trs = np.full(total.shape, np.nan), np.full(total.shape, np.nan)
        had = frame.previous_present()
        atr, last = _previous_floats(frame, "atr"), _previous_floats(frame, "close")
        for i, r in enumerate(rows.tolist()):
            close, ok = closes[r], valid[r]
            carry = ok & had & ~np.isnan(atr) & ~np.isnan(last)
            seed = ok & ~carry & seeded[i]
            stepped_tr = _true_ranges(hi[r], lo[r], last)
            stepped = (atr * (n - 1) + stepped_tr) / n
            atr = np.where(carry, stepped, np.where(seed, seed_atr[i], np.nan))
            tr = np.where(carry, stepped_tr, np.where(seed, ranges[r], unseeded_tr[i]))
            atrs[i], trs[i] = atr, np.where(ok, tr, np.nan)
            had, last = frame.present[i], close  # no result today: no state tomorrow
        return {"atr": atrs, "tr": trs, "close": closes[rows], "atr_ratio": atrs / closes[rows]}
