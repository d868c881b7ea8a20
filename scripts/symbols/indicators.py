"""Seed 003's four indicators, each in both calculation forms (``process`` and ``compute``).

A template: ``scripts/bench_symbols.py`` copies this file verbatim into a calculation package
of its work directory. Config ``columnar = true`` runs ``compute(frame)`` (blocks of dates ×
symbols), ``columnar = false`` runs ``process(ctx)`` (one symbol and date at a time). Both
forms do the same IEEE double operations in the same order, so they store the same bits: the
result hashes are equal whichever form ran (the benchmark's tests compare them).

Input: the root dataset ``prices`` (columns ``date, open, high, low, close, volume, symbol``),
one bar per symbol and date. Periods count the dataset's dates; ``t`` below is a symbol's bar
index from its first bar. NaN / ``None`` (the stored float null) means "not defined yet".

* ``sma_20``  ``sma = (c[t-19] + ... + c[t]) / 20``, summed oldest first; from t = 19.
* ``ema_20``  alpha ``k = 2 / (20 + 1)``. Seeded with the SMA of the first 20 closes at t = 19,
  then ``ema_t = (c_t - ema_{t-1}) * k + ema_{t-1}``. Seeding and the update's arithmetic are
  TA-Lib's (``src/ta_func/ta_EMA.c``: in the default compatibility mode the first value is
  ``tempReal / optInTimePeriod``, the sum of the first ``period`` inputs over ``period``, and
  each step ``prevMA = (inReal[today] - prevMA) * optInK_1 + prevMA`` with ``optInK_1 = 2.0
  / (optInTimePeriod + 1)``; its Metastock mode seeds with the first input), the classic
  definition (also StockCharts ChartSchool's "Moving Averages"). pandas' ``ewm(span=20,
  adjust=False)`` seeds with the first close instead: the seeds' difference decays by 19/21
  a date, so the two stay apart by more than 1e-12 (relative) for some 270 dates.
* ``rsi_14``  Wilder (1978), *New Concepts in Technical Trading Systems*, "The Relative
  Strength Index": changes ``d_t = c_t - c_{t-1}``, ``gain = max(d, 0)``, ``loss = max(-d,
  0)`` (+0.0 for a zero change); the first averages (t = 14) are the simple means of the
  first 14 gains and losses (summed oldest first, then divided by 14), then Wilder's smoothing
  (alpha 1/14) ``avg_t = (avg_{t-1} * 13 + x_t) / 14`` — the order of operations of TA-Lib's
  ``src/ta_func/ta_RSI.c`` ("Multiply the previous by 'period-1'. Add today value. Divide by
  'period'."). ``rsi = 100 - 100 / (1 + avg_gain / avg_loss)``, Wilder's form (TA-Lib writes
  the equal ``100 * avg_gain / (avg_gain + avg_loss)``, 0 when both are 0), and 100 when
  ``avg_loss == 0`` (RS infinite; a flat series included, by this convention). Stored:
  ``rsi, avg_gain, avg_loss`` (the averages are the state).
* ``atr_14``  Wilder (1978), "Volatility": true range ``tr_t = max(h_t - l_t, |h_t - c_{t-1}|,
  |l_t - c_{t-1}|)`` for t >= 1 (it needs a previous close); ``atr`` at t = 14 is the simple
  mean of ``tr_1 .. tr_14``, then ``atr_t = (atr_{t-1} * 13 + tr_t) / 14`` (TA-Lib's
  ``src/ta_func/ta_ATR.c``: the same seed and order).

How the state travels (seed 003 asks for the fastest exact cold catch-up): EMA, RSI and ATR
are ``historical``, their state — the previous value, or the averages — read from the own
result of the previous date (``ctx.previous`` / ``frame.previous``), and a root ``lookback``
window of exactly the seed's length (20, 15, 15 dates) gives the seed and the previous close.
The alternatives are slower: a whole-history window (not historical, exact only when it
spans every date) makes each block re-read and re-walk the history from the first date and
each cell's fingerprint hold a root hash per date of its window — quadratic in the dates, and
for the per-user form a recursion over the whole history per symbol and date; carrying the
warm-up sums in the state instead of a seed window stores two more fields in every cell for
the sake of the first 20 dates. Here each cell stores only what the next one needs. The per-user form reads ``ctx.history`` lazily (the
engine builds it on access): EMA only on the seed date; RSI and ATR read it for the
previous close (a slice of the in-memory dataset). The columnar form steps through its
block's consecutive dates once, vectorised over symbols.

A symbol without a bar on some date gets no result there, so the next date has no previous
result: the state restarts from the window when it holds a bar on each of its dates (as on
a fresh series). The benchmark's data has no gaps and no null values (a null close would
fail the user in ``process`` and give NaN in ``compute``: these templates assume complete bars).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from orchestrator.calculation import Frame, StandardCalculation, StandardContext

# Offsets: a window of `w` bars ending at span row r covers rows r - w + 1 .. r. Frames of a
# block near the start of the data have fewer span rows than that: padding the span with
# `pad` missing rows in front keeps every window an in-range slice.


def _padded(values: np.ndarray, pad: int) -> np.ndarray:
    """``values`` (s, u) with ``pad`` NaN rows in front (a missing bar before the data)."""
    out = np.full((values.shape[0] + pad, values.shape[1]), np.nan)
    out[pad:] = values
    return out


def _column(frame: Frame, column: str) -> np.ndarray:
    """(s, u) float64 of a ``prices`` column over the frame's span; NaN where no bar."""
    values = frame.root("prices", column)
    return np.where(frame.root_present("prices"), values, np.nan)


def _state(frame: Frame, field: str) -> np.ndarray:
    """(u,) the own ``field`` on the previous date (NaN: no result, or none had the field —
    e.g. every previous result was a failure marker)."""
    try:
        values = np.asarray(frame.previous(field), dtype=np.float64)
    except KeyError:
        return np.full(len(frame.users), np.nan)
    return np.where(frame.previous_present(), values, np.nan)


def _window_sum(values: np.ndarray, rows: np.ndarray, width: int) -> np.ndarray:
    """(n, u): ``values[r - width + 1] + ... + values[r]`` for each block row r, summed oldest
    first from 0.0 (the per-user loop's order); NaN where the window reaches a missing value
    or before the span. ``values`` is (s, u) over the span."""
    padded = _padded(values, width - 1)
    total = np.zeros((len(rows), values.shape[1]))
    for k in range(width):  # padded row r + k is span row r - width + 1 + k
        total = total + padded[rows + k]
    return total


def _value(result: Any, field: str) -> float | None:
    """A finite float of a previous result (None: no result, a null, or NaN)."""
    if result is None:
        return None
    value = result.get(field)
    if value is None or value != value:  # noqa: PLR0124 - NaN test
        return None
    return float(value)


def true_range(high: float, low: float, prev_close: float) -> float:
    """Wilder's true range of a bar against the previous close (price units)."""
    return max(high - low, abs(high - prev_close), abs(low - prev_close))


def _true_ranges(high: np.ndarray, low: np.ndarray, prev_close: np.ndarray) -> np.ndarray:
    """``true_range`` elementwise (NaN where an input is NaN)."""
    return np.maximum(np.maximum(high - low, np.abs(high - prev_close)), np.abs(low - prev_close))


class Sma20(StandardCalculation):
    """Simple moving average of the last ``period`` = 20 closes (price units).

    Result: ``{"sma": float | None}``; null until the symbol has ``period`` bars in a row.
    """

    name = "sma_20"
    root_data = ("prices",)
    period = 20
    lookback = period
    nullable = ("sma",)  # warm-up

    def process(self, ctx: StandardContext) -> dict[str, Any]:
        bars = ctx.history["prices"]
        if len(bars) < self.period:
            return {"sma": None}
        total = 0.0
        for bar in bars[-self.period :]:
            total = total + bar["close"]  # an int close adds as its exact double
        return {"sma": total / self.period}

    def compute(self, frame: Frame) -> dict[str, Any]:
        close = _column(frame, "close")
        return {"sma": _window_sum(close, frame.rows("prices"), self.period) / self.period}


class Ema20(StandardCalculation):
    """Exponential moving average of the closes, ``period`` = 20, ``alpha`` = 2 / 21, seeded
    with the SMA of the first 20 closes (module docstring: TA-Lib's ``TA_EMA``).

    Result: ``{"ema": float | None}`` (price units; the state of the next date).
    """

    name = "ema_20"
    root_data = ("prices",)
    historical = True
    period = 20
    alpha = 2.0 / (period + 1)
    lookback = period  # the seed's window
    nullable = ("ema",)  # warm-up

    def process(self, ctx: StandardContext) -> dict[str, Any]:
        close = float(ctx.root["prices"][-1]["close"])
        before = _value(ctx.previous, "ema")
        if before is not None:
            return {"ema": (close - before) * self.alpha + before}
        bars = ctx.history["prices"]
        if len(bars) < self.period:
            return {"ema": None}
        total = 0.0
        for bar in bars[-self.period :]:
            total = total + bar["close"]
        return {"ema": total / self.period}

    def compute(self, frame: Frame) -> dict[str, Any]:
        close = _column(frame, "close")
        rows = frame.rows("prices")
        seed = _window_sum(close, rows, self.period) / self.period
        ema = _state(frame, "ema")
        out = np.full(seed.shape, np.nan)
        for i, r in enumerate(rows.tolist()):
            stepped = (close[r] - ema) * self.alpha + ema
            ema = np.where(np.isnan(ema), seed[i], stepped)
            ema = np.where(frame.present[i], ema, np.nan)  # no result today: no state tomorrow
            out[i] = ema
        return {"ema": out}


class Rsi14(StandardCalculation):
    """Wilder's Relative Strength Index, ``period`` = 14, on a 0..100 scale (module docstring).

    Result: ``{"rsi": float | None, "avg_gain": float | None, "avg_loss": float | None}``
    (averages in price units per bar; they are the state of the next date).
    """

    name = "rsi_14"
    root_data = ("prices",)
    historical = True
    period = 14
    lookback = period + 1  # the seed's 14 changes; also the previous close
    nullable = ("rsi", "avg_gain", "avg_loss")  # warm-up

    def process(self, ctx: StandardContext) -> dict[str, Any]:
        n = self.period
        bars = ctx.history["prices"]
        close = float(bars[-1]["close"])
        gain_before = _value(ctx.previous, "avg_gain")
        loss_before = _value(ctx.previous, "avg_loss")
        if gain_before is not None and loss_before is not None:
            # a previous result: the symbol had a bar on the previous date, bars[-2]
            change = close - float(bars[-2]["close"])
            # max keeps its first argument on a tie: +0.0 for a zero change, as in compute
            gain = max(0.0, change)
            loss = max(0.0, -change)
            avg_gain = (gain_before * (n - 1) + gain) / n
            avg_loss = (loss_before * (n - 1) + loss) / n
        elif len(bars) < n + 1:
            return {"rsi": None, "avg_gain": None, "avg_loss": None}
        else:
            closes = [float(bar["close"]) for bar in bars[-(n + 1) :]]
            gains = losses = 0.0
            for j in range(n):
                change = closes[j + 1] - closes[j]
                gains = gains + max(0.0, change)
                losses = losses + max(0.0, -change)
            avg_gain, avg_loss = gains / n, losses / n
        if avg_loss == 0.0:
            rsi = 100.0
        else:
            rsi = 100.0 - 100.0 / (1.0 + avg_gain / avg_loss)
        return {"rsi": rsi, "avg_gain": avg_gain, "avg_loss": avg_loss}

    def compute(self, frame: Frame) -> dict[str, Any]:
        n = self.period
        close = _column(frame, "close")
        rows = frame.rows("prices")
        change = np.full_like(close, np.nan)
        change[1:] = close[1:] - close[:-1]  # NaN where either bar is missing
        missing = np.isnan(change)
        ups = np.where(missing, np.nan, np.where(change > 0.0, change, 0.0))
        downs = np.where(missing, np.nan, np.where(change < 0.0, -change, 0.0))
        # the seed: the n changes ending at each block row (n + 1 bars), oldest first
        seed_gain = _window_sum(ups, rows, n) / n
        seed_loss = _window_sum(downs, rows, n) / n
        gain, loss = _state(frame, "avg_gain"), _state(frame, "avg_loss")
        out = {f: np.full(seed_gain.shape, np.nan) for f in ("rsi", "avg_gain", "avg_loss")}
        with np.errstate(invalid="ignore", divide="ignore"):
            for i, r in enumerate(rows.tolist()):
                carry = ~np.isnan(gain) & ~np.isnan(loss)
                stepped_gain = (gain * (n - 1) + ups[r]) / n
                stepped_loss = (loss * (n - 1) + downs[r]) / n
                present = frame.present[i]
                gain = np.where(present, np.where(carry, stepped_gain, seed_gain[i]), np.nan)
                loss = np.where(present, np.where(carry, stepped_loss, seed_loss[i]), np.nan)
                rsi = np.where(loss == 0.0, 100.0, 100.0 - 100.0 / (1.0 + gain / loss))
                out["rsi"][i] = np.where(np.isnan(gain) | np.isnan(loss), np.nan, rsi)
                out["avg_gain"][i], out["avg_loss"][i] = gain, loss
        return out


class Atr14(StandardCalculation):
    """Wilder's Average True Range, ``period`` = 14, in price units (module docstring).

    Result: ``{"atr": float | None}`` (the state of the next date).
    """

    name = "atr_14"
    root_data = ("prices",)
    historical = True
    period = 14
    lookback = period + 1  # the seed's 14 true ranges need 15 bars; also the previous close
    nullable = ("atr",)  # warm-up

    def process(self, ctx: StandardContext) -> dict[str, Any]:
        n = self.period
        bars = ctx.history["prices"]
        bar = bars[-1]
        before = _value(ctx.previous, "atr")
        if before is not None:
            tr = true_range(float(bar["high"]), float(bar["low"]), float(bars[-2]["close"]))
            return {"atr": (before * (n - 1) + tr) / n}
        if len(bars) < n + 1:
            return {"atr": None}
        window = bars[-(n + 1) :]
        total = 0.0
        for j in range(1, n + 1):
            b = window[j]
            total = total + true_range(
                float(b["high"]), float(b["low"]), float(window[j - 1]["close"])
            )
        return {"atr": total / n}

    def compute(self, frame: Frame) -> dict[str, Any]:
        n = self.period
        close = _column(frame, "close")
        high, low = _column(frame, "high"), _column(frame, "low")
        rows = frame.rows("prices")
        prev_close = np.full_like(close, np.nan)
        prev_close[1:] = close[:-1]
        with np.errstate(invalid="ignore"):
            ranges = _true_ranges(high, low, prev_close)  # (s, u); NaN: a bar missing
        seed = _window_sum(ranges, rows, n) / n
        atr = _state(frame, "atr")
        out = np.full(seed.shape, np.nan)
        for i, r in enumerate(rows.tolist()):
            stepped = (atr * (n - 1) + ranges[r]) / n
            atr = np.where(np.isnan(atr), seed[i], stepped)
            atr = np.where(frame.present[i], atr, np.nan)  # no result today: no state tomorrow
            out[i] = atr
        return {"atr": out}
