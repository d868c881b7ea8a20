"""The WORKLOAD.md benchmark's 8 calculations in the columnar form (``compute(frame)``).

A template: ``scripts/bench_workload.py`` copies this file verbatim into a calculation package
of its work directory and applies the scenario edits to that copy. Definitions are those of
``/work/shared/benchmarks/WORKLOAD.md`` §2; the values are the same as the per-user form's
(``per_user.py``) and the benchmark's NumPy reference.

Each ``compute`` gets a block of dates × users (``orchestrator.calculation.Frame``) and returns
one (dates, users) array per field — (dates,) for a meta calculation. NaN ("not defined") is
the float null of a stored result: the warm-up dates of ``returns``, ``volatility_20``,
``rsi_14``, ``xs_rank`` and ``risk_score`` are NaN for every user, so those fields are
``nullable``. ``xs_rank`` reads all users of ``returns`` at once.

Every calculation body appends ``calc,date`` to the file named by ``$PEERS_EXEC_LOG`` for each
date of its block (one line per cell it computes: the peers' convention).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any, ClassVar

import numpy as np

from orchestrator.calculation import Frame, MetaCalculation, StandardCalculation

TRADING_DAYS = 252


def _executed(calc: str, dates: Iterable[Any]) -> None:
    """Append one ``calc,date`` line per block date to ``$PEERS_EXEC_LOG``."""
    path = os.environ.get("PEERS_EXEC_LOG")
    if path:
        with open(path, "a", encoding="utf-8") as log:
            log.write("".join(f"{calc},{d.isoformat()}\n" for d in dates))


class Returns(StandardCalculation):
    """Close-to-close return: ``close[t] / close[t-1] - 1``; NaN at t = 0.

    Result: ``{"r": float}`` per user.
    """

    name = "returns"
    root_data = ("prices",)
    lookback = 2  # today and the previous available date
    nullable = ("r",)  # t = 0: no previous close

    def compute(self, frame: Frame) -> dict[str, Any]:
        _executed(self.name, frame.dates)
        close = frame.root("prices", "close")  # (s, u): one span date before the block
        rows = frame.rows("prices")
        cur = close[rows]
        prev = np.full_like(cur, np.nan)
        has = rows >= 1  # row 0 of a span is the first date of the data only
        prev[has] = close[rows[has] - 1]
        out = cur / prev - 1.0
        return {"r": out}


class Volatility20(StandardCalculation):
    """Sample standard deviation (ddof 1) of the finite ``returns`` on t-19..t.

    ``sqrt(sum((x - m)^2) / (n - 1))`` over the n finite values x with mean m; NaN for n < 2.
    Two passes over the 20 window offsets (count and sum, then squared deviations), one
    (n, u) array at a time, so memory stays a few times the block's.

    Result: ``{"vol": float}`` per user.
    """

    name = "volatility_20"
    dependencies: ClassVar[dict[str, int]] = {"returns": 20}  # a 20-date window of returns: t-19..t
    nullable = ("vol",)  # t < 2
    window = 20

    def compute(self, frame: Frame) -> dict[str, Any]:
        _executed(self.name, frame.dates)
        r = frame.upstream("returns", "r")  # (s, u) over the window span
        rows = frame.upstream_rows("returns")
        shape = (len(rows), r.shape[1])

        def lag(k: int) -> Any:
            """(n, u): the returns k dates before each block date (NaN before the data)."""
            idx = rows - k
            x = np.full(shape, np.nan)
            ok = idx >= 0
            x[ok] = r[idx[ok]]
            return x

        count = np.zeros(shape)
        total = np.zeros(shape)
        for k in range(self.window):
            x = lag(k)
            finite = np.isfinite(x)
            count += finite
            total += np.where(finite, x, 0.0)
        squares = np.zeros(shape)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = total / count
            for k in range(self.window):
                x = lag(k)
                squares += np.where(np.isfinite(x), (x - mean) ** 2, 0.0)
            vol = np.sqrt(squares / (count - 1.0))
        return {"vol": np.where(count >= 2, vol, np.nan)}


class Rsi14(StandardCalculation):
    """Relative strength index over the last ``period`` close differences (simple means).

    gain = mean(max(d, 0)), loss = mean(max(-d, 0)) over the period differences d of
    close[t-period..t]; ``100 - 100 / (1 + gain / loss)``, 100 when loss = 0 (50 when gain is 0
    too); NaN for t < period.

    Result: ``{"rsi": float}`` per user.
    """

    name = "rsi_14"
    root_data = ("prices",)
    period = 14
    lookback = period + 1
    nullable = ("rsi",)  # t < period

    def compute(self, frame: Frame) -> dict[str, Any]:
        _executed(self.name, frame.dates)
        close = frame.root("prices", "close")  # (s, u): period span dates before the block
        rows = frame.rows("prices")
        out = np.full((len(rows), close.shape[1]), np.nan)
        # A span starts `period` dates before the block, or at the first date of the data:
        # a row below `period` is a date t < period.
        valid = rows >= self.period
        if valid.any():
            diffs = np.diff(close, axis=0)  # diffs[j] = close[j + 1] - close[j]
            gains = np.lib.stride_tricks.sliding_window_view(
                np.maximum(diffs, 0.0), self.period, axis=0
            )
            losses = np.lib.stride_tricks.sliding_window_view(
                np.maximum(-diffs, 0.0), self.period, axis=0
            )
            # Window w covers diffs[w .. w + period - 1], i.e. close[w .. w + period].
            starts = rows[valid] - self.period
            gain = gains[starts].mean(axis=-1)
            loss = losses[starts].mean(axis=-1)
            with np.errstate(invalid="ignore", divide="ignore"):
                rsi = 100.0 - 100.0 / (1.0 + gain / loss)
            rsi = np.where(loss == 0.0, np.where(gain == 0.0, 50.0, 100.0), rsi)
            out[valid] = np.where(np.isnan(gain) | np.isnan(loss), np.nan, rsi)
        return {"rsi": out}


class Drawdown(StandardCalculation):
    """``close[t] / max(close[0..t]) - 1``, the running peak carried from the previous date.

    Result: ``{"dd": float, "peak": float}`` per user.
    """

    name = "drawdown"
    root_data = ("prices",)
    historical = True
    flatline_ok = ("dd",)  # 0.0 for every symbol at t = 0

    def compute(self, frame: Frame) -> dict[str, Any]:
        _executed(self.name, frame.dates)
        close = frame.root("prices", "close")[frame.rows("prices")]  # (n, u)
        before = frame.previous("peak")  # (u,) NaN: no previous date
        # fmax skips NaN: the first date's peak is its close.
        peak = np.fmax.accumulate(np.vstack([before[None, :], close]), axis=0)[1:]
        return {"dd": close / peak - 1.0, "peak": peak}


class Breadth(MetaCalculation):
    """Share of the finite returns that are positive: count(r > 0) / count(finite r); NaN
    when none is finite.

    Result: ``{"breadth": float | None, "n": int}`` per date.
    """

    name = "breadth"
    dependencies = ("returns",)

    def compute(self, frame: Frame) -> dict[str, Any]:
        _executed(self.name, frame.dates)
        r = frame.upstream("returns", "r")  # (n, u)
        n = np.isfinite(r).sum(axis=1)
        positive = (r > 0.0).sum(axis=1)  # NaN > 0 is False
        with np.errstate(invalid="ignore", divide="ignore"):
            breadth = np.where(n > 0, positive / n, np.nan)
        return {"breadth": breadth, "n": n.astype(np.int64)}


class XsRank(StandardCalculation):
    """Cross-sectional rank of each return among the day's finite returns, in [0, 1]:
    (average 1-based rank, ties averaged, - 1) / (n - 1); 0.5 when n = 1; NaN where the
    return is NaN.

    Result: ``{"rank": float}`` per user.
    """

    name = "xs_rank"
    dependencies = ("returns",)
    nullable = ("rank",)  # t = 0

    def compute(self, frame: Frame) -> dict[str, Any]:
        _executed(self.name, frame.dates)
        r = frame.upstream("returns", "r")  # (n, u): every user of each date at once
        out = np.full(r.shape, np.nan)
        for i, day in enumerate(r):
            ok = np.isfinite(day)
            values = day[ok]
            n = len(values)
            if n == 0:
                continue
            if n == 1:
                out[i, ok] = 0.5
                continue
            ordered = np.sort(values)
            lo = np.searchsorted(ordered, values, side="left")
            hi = np.searchsorted(ordered, values, side="right")
            # The tied block holds 1-based ranks lo+1 .. hi: its average is their midpoint.
            out[i, ok] = ((lo + 1 + hi) / 2.0 - 1.0) / (n - 1)
        return {"rank": out}


class RiskScore(StandardCalculation):
    """``sqrt(252) * vol + abs(rsi - 50) / 100 + 0.1 * (1 - xs_rank)``; NaN propagates.

    Result: ``{"risk": float}`` per user.
    """

    name = "risk_score"
    dependencies = ("volatility_20", "rsi_14", "xs_rank")
    nullable = ("risk",)  # t < 14 (rsi)

    def compute(self, frame: Frame) -> dict[str, Any]:
        _executed(self.name, frame.dates)
        vol = frame.upstream("volatility_20", "vol")
        rsi = frame.upstream("rsi_14", "rsi")
        rank = frame.upstream("xs_rank", "rank")
        risk = np.sqrt(TRADING_DAYS) * vol + np.abs(rsi - 50.0) / 100.0 + 0.1 * (1.0 - rank)
        return {"risk": risk}


class MarketSummary(MetaCalculation):
    """The day's mean finite ``risk_score``, the breadth, and the count of finite risks.

    Result: ``{"mean_risk": float | None, "breadth": float | None, "n_valid": int}`` per date.
    """

    name = "market_summary"
    dependencies = ("risk_score", "breadth")

    def compute(self, frame: Frame) -> dict[str, Any]:
        _executed(self.name, frame.dates)
        risk = frame.upstream("risk_score", "risk")  # (n, u)
        finite = np.isfinite(risk)
        n = finite.sum(axis=1)
        total = np.where(finite, risk, 0.0).sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(n > 0, total / n, np.nan)
        return {
            "mean_risk": mean,
            "breadth": frame.upstream("breadth", "breadth"),
            "n_valid": n.astype(np.int64),
        }
