"""Measures of one instrument's close series: daily return, volatility and drawdown.

All three read only ``close`` from the ``prices`` dataset. ``_closes`` is the one place that
decides which closes count (see the package docstring), ``_valid_closes`` its columnar twin;
they live in this module, next to their users, so editing them changes their code hashes (the
code hash follows module-level helpers).
"""

from __future__ import annotations

import math
from itertools import pairwise
from typing import Any

import numpy as np

from orchestrator.calculation import Frame, StandardCalculation, StandardContext

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


def _valid_closes(frame: Frame) -> tuple[np.ndarray, np.ndarray]:
    """The columnar ``_closes``: ``(close, valid)``, both (s, u) over the span of ``prices``.

    ``valid`` is True where the user's (last) row of that date has a positive close; ``close``
    is float64, NaN wherever ``valid`` is False.
    """
    close = frame.root("prices", "close")
    if close.dtype.kind != "f":  # not a numeric column (e.g. every close null): None -> NaN
        close = np.array(
            [[np.nan if v is None else float(v) for v in row] for row in close.tolist()],
            dtype=np.float64,
        ).reshape(close.shape)
    with np.errstate(invalid="ignore"):
        valid = frame.root_present("prices") & (close > 0)
    return np.where(valid, close, np.nan), valid


def _latest_before(valid: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """(n, u) int: for each row ``r`` of ``rows``, the latest span row ``< r`` with a valid
    close (-1: none in the span)."""
    span = np.arange(valid.shape[0])[:, None]
    latest = np.maximum.accumulate(np.where(valid, span, -1), axis=0)  # latest valid <= j
    out = np.full((len(rows), valid.shape[1]), -1, dtype=np.int64)
    later = rows >= 1
    out[later] = latest[rows[later] - 1]
    return out


def _iso(dates: Any) -> np.ndarray:
    """(s,) object array of the ISO texts of ``dates``."""
    out = np.empty(len(dates), dtype=object)
    out[:] = [d.isoformat() for d in dates]
    return out


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

    Both forms: ``process`` per instrument, ``compute`` over a block (the same division).

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

    def compute(self, frame: Frame) -> dict[str, Any]:
        closes, valid = _valid_closes(frame)
        rows = frame.rows("prices")
        base = _latest_before(valid, rows)  # (n, u) span row of the previous valid close
        close = closes[rows]
        found = valid[rows] & (base >= 0) & (base >= (rows - self.max_gap)[:, None])
        prev_close = np.where(found, np.take_along_axis(closes, np.maximum(base, 0), 0), np.nan)
        # None wherever there is no result, too: the engine nulls only float outputs there,
        # and a failed user's text would be stored under its missing key.
        found &= frame.present
        prev_date = np.where(found, _iso(frame.span("prices"))[np.maximum(base, 0)], None)
        return {
            "close": close,
            "prev_close": prev_close,
            "prev_date": prev_date,
            "return": close / prev_close - 1.0,  # NaN wherever either is missing
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

    Arithmetic, exactly (both forms): two passes, the textbook formula without the
    cancellation of ``sum(x^2)``; each sum accumulates oldest return first, ``s = s + x``, in
    IEEE double; squares are ``d * d``; ``sqrt`` is the correctly rounded square root.

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
        total = 0.0
        for r in returns:
            total = total + r
        mean = total / n
        squares = 0.0
        for r in returns:
            d = r - mean
            squares = squares + d * d
        vol = math.sqrt(squares / (n - 1))
        return {
            "volatility": vol,
            "annualised": vol * math.sqrt(TRADING_DAYS_PER_YEAR),
            "n_returns": n,
        }

    def compute(self, frame: Frame) -> dict[str, Any]:
        w = self.window
        closes, valid = _valid_closes(frame)
        rows = frame.rows("prices")
        span = np.arange(len(closes))
        base = _latest_before(valid, span)  # (s, u): each return's base row
        has = valid & (base >= 0)
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            returns = closes / np.take_along_axis(closes, np.maximum(base, 0), 0) - 1.0
        # The window's returns, oldest first: the one ending on row j counts for date row r
        # when r - w < j <= r and its base is in the window too (base >= r - w).
        ends = [rows - w + 1 + k for k in range(w)]
        counts = [
            (j >= 0)[:, None]
            & has[np.maximum(j, 0)]
            & (base[np.maximum(j, 0)] >= (rows - w)[:, None])
            for j in ends
        ]
        n = np.sum(counts, axis=0)
        total = np.zeros((len(rows), len(frame.users)))
        for j, c in zip(ends, counts):
            total = total + np.where(c, returns[np.maximum(j, 0)], 0.0)  # + 0.0 is exact
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = total / n
            squares = np.zeros_like(total)
            for j, c in zip(ends, counts):
                d = returns[np.maximum(j, 0)] - mean
                squares = squares + np.where(c, d * d, 0.0)
            vol = np.where(n >= 2, np.sqrt(squares / (n - 1)), np.nan)
        return {
            "volatility": vol,
            "annualised": vol * math.sqrt(TRADING_DAYS_PER_YEAR),
            "n_returns": n.astype(np.int64),
        }


def _previous_floats(frame: Frame, field: str) -> np.ndarray:
    """(u,) float64: the own numeric field ``field`` on ``frame.previous_date`` (NaN where the
    user had no result or a null, and everywhere when no previous result has the field)."""
    try:
        return np.asarray(frame.previous(field), dtype=np.float64)
    except KeyError:  # e.g. every previous result is a failure marker
        return np.full(len(frame.users), np.nan)


def _previous_texts(frame: Frame, field: str) -> np.ndarray:
    """(u,) object array: the own text field ``field`` on ``frame.previous_date`` (None where
    the user had no result or a null)."""
    out = np.full(len(frame.users), None, dtype=object)
    try:
        texts = frame.previous(field)  # an object array for a text field
    except KeyError:  # no previous result has the field
        return out
    out[:] = [t if isinstance(t, str) else None for t in np.asarray(texts).tolist()]
    return out


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
        prev = ctx.previous or {}
        carried = prev.get("peak") is not None
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

    def compute(self, frame: Frame) -> dict[str, Any]:
        closes, valid = _valid_closes(frame)
        rows = frame.rows("prices")
        size, w = len(closes), self.lookback
        # The re-seed of every block date, used where no peak is carried: the highest valid
        # close of the window and the date of its oldest valid close.
        seed_peak = np.full((len(rows), len(frame.users)), np.nan)
        for k in range(w):
            j = rows - k
            seed_peak = np.fmax(
                seed_peak, np.where((j >= 0)[:, None], closes[np.maximum(j, 0)], np.nan)
            )
        span = np.arange(size)[:, None]
        oldest = np.minimum.accumulate(np.where(valid, span, size)[::-1], axis=0)[::-1]
        first = oldest[np.maximum(rows - w + 1, 0)]
        seed_since = _iso(frame.span("prices"))[np.minimum(first, size - 1)]
        shape = (len(rows), len(frame.users))
        peaks = np.full(shape, np.nan)
        since = np.full(shape, None, dtype=object)
        had = frame.previous_present()  # a result on the date before: the state to carry
        peak = _previous_floats(frame, "peak")
        tracked = _previous_texts(frame, "tracked_since")
        for i, r in enumerate(rows.tolist()):
            carried = had & ~np.isnan(peak)
            close, ok = closes[r], valid[r]
            grown = np.where(close > peak, close, peak)  # max(peak, close), as in process
            peak = np.where(carried, np.where(ok, grown, peak), np.where(ok, seed_peak[i], np.nan))
            tracked = np.where(carried, tracked, np.where(ok, seed_since[i], None))
            peaks[i], since[i] = peak, tracked
            had = frame.present[i]  # no result today: no state tomorrow (a gap)
        since[~frame.present] = None  # as prev_date in DailyReturn.compute
        close = closes[rows]
        return {
            "close": close,
            "peak": peaks,
            "drawdown": close / peaks - 1.0,  # NaN on a null close
            "tracked_since": since,
        }
