"""A composite 0..100 risk score per instrument, from the other price calculations."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np

from orchestrator.calculation import Frame, StandardCalculation, StandardContext


def _clip01(x: float) -> float:
    return min(max(x, 0.0), 1.0)


def _clip01_array(x: np.ndarray) -> np.ndarray:
    """``_clip01`` elementwise (NaN stays NaN): the same comparisons as ``max`` / ``min``."""
    low = np.where(0.0 > x, 0.0, x)
    return np.where(1.0 < low, 1.0, low)


def _upstream_floats(frame: Frame, dependency: str, key: str) -> np.ndarray:
    """(n, u) float64 of a standard dependency's field, NaN where the user has no result, a
    null or a non-finite value (``field`` in ``process``)."""
    try:
        values = np.asarray(frame.upstream(dependency, key), dtype=np.float64)
    except KeyError:  # no result of it has the field: missing, as ``result.get`` says
        return np.full(frame.present.shape, np.nan)
    return np.where(np.isfinite(values), values, np.nan)


def _meta_ranks(frame: Frame, dependency: str) -> np.ndarray:
    """(n, u) float64: each user's rank in the ``ranks`` mapping of a meta dependency's result
    on each block date (NaN: not ranked, or no result).

    """
    out = np.full(frame.present.shape, np.nan)
    position = {user: k for k, user in enumerate(frame.users.tolist())}
    rows = frame.upstream_rows(dependency).tolist()
    mappings = frame.upstream(dependency, "ranks")  # (s,) object: each date's mapping
    for i, row in enumerate(rows):
        for user, rank in (mappings[row] or {}).items():
            k = position.get(user)
            if k is not None and rank is not None:
                out[i, k] = float(rank)
    return out


class RiskScore(StandardCalculation):
    """Weighted average of five risk components, each mapped to 0..1, scaled to 0..100.

    Components (``None`` when its input is missing):

    * ``c_volatility = clip(volatility_20.annualised / vol_cap)``: annualised volatility, 80 %
      a year or more counts as full risk.
    * ``c_atr = clip(atr_14.atr_ratio / atr_cap)``: the average true range as a fraction of
      the close, 5 % a day or more is full risk.
    * ``c_drawdown = clip(-drawdown.drawdown / drawdown_cap)``: 50 % below the peak is full risk.
    * ``c_rsi = |rsi_14.rsi - 50| / 50``: distance from neutral momentum; overbought and
      oversold both count (0 at RSI 50, 1 at 0 or 100).
    * ``c_rank = |2 * xs_rank - 1|``: how extreme today's return is across the market
      (0 at the median, 1 for the day's best or worst mover).

    ``score = 100 * sum(w_i * c_i) / sum(w_i)`` over the available components, with
    ``weights``; ``n_components`` says how many were available. The caps and weights are a
    documented house choice, not a published model; they are class attributes, so changing
    one changes the code hash and re-runs the score.

    Null-safety: a missing upstream result or field only drops its component; an instrument
    with no component at all gets no result (``None``). Users: the instruments with a result in
    any standard dependency that date (this calculation reads no root data).

    Arithmetic, exactly (both forms): both sums accumulate the available components in the
    order above, ``s = s + x``, in IEEE double; ``score = (100 * weighted) / total_weight``.

    Result: ``{"score": float, "n_components": int, "c_volatility": float | None,
    "c_atr": float | None, "c_drawdown": float | None, "c_rsi": float | None,
    "c_rank": float | None}``.
    """

    name = "risk_score"
    # Components are null while their inputs warm up; on the first date only the drawdown
    # (0 for everyone) is known, so the score is flat there.
    nullable = ("c_atr", "c_rank", "c_rsi", "c_volatility")
    flatline_ok = ("score", "c_drawdown")
    category = "risk"
    dependencies = ("volatility_20", "rsi_14", "atr_14", "drawdown", "xs_rank")
    vol_cap = 0.80
    atr_cap = 0.05
    drawdown_cap = 0.50
    weights: ClassVar[dict[str, float]] = {
        "volatility": 0.30,
        "atr": 0.20,
        "drawdown": 0.25,
        "rsi": 0.15,
        "rank": 0.10,
    }

    def process(self, ctx: StandardContext) -> dict[str, Any] | None:
        up = ctx.upstream

        def field(dependency: str, key: str) -> float | None:
            result = up.get(dependency)
            value = result.get(key) if result else None
            return float(value) if value is not None and math.isfinite(value) else None

        ranks = (up.get("xs_rank") or {}).get("ranks") or {}
        vol = field("volatility_20", "annualised")
        atr = field("atr_14", "atr_ratio")
        dd = field("drawdown", "drawdown")
        rsi = field("rsi_14", "rsi")
        rank = ranks.get(ctx.user)
        components = {
            "volatility": None if vol is None else _clip01(vol / self.vol_cap),
            "atr": None if atr is None else _clip01(atr / self.atr_cap),
            "drawdown": None if dd is None else _clip01(-dd / self.drawdown_cap),
            "rsi": None if rsi is None else _clip01(abs(rsi - 50.0) / 50.0),
            "rank": None if rank is None else _clip01(abs(2.0 * float(rank) - 1.0)),
        }
        present = {k: c for k, c in components.items() if c is not None}
        if not present:
            return None
        total_weight = weighted = 0.0
        for k, c in present.items():
            total_weight = total_weight + self.weights[k]
            weighted = weighted + self.weights[k] * c
        return {
            "score": 100.0 * weighted / total_weight,
            "n_components": len(present),
            **{f"c_{k}": c for k, c in components.items()},
        }

    def compute(self, frame: Frame) -> dict[str, Any]:
        vol = _upstream_floats(frame, "volatility_20", "annualised")
        atr = _upstream_floats(frame, "atr_14", "atr_ratio")
        dd = _upstream_floats(frame, "drawdown", "drawdown")
        rsi = _upstream_floats(frame, "rsi_14", "rsi")
        rank = _meta_ranks(frame, "xs_rank")
        components = {
            "volatility": _clip01_array(vol / self.vol_cap),
            "atr": _clip01_array(atr / self.atr_cap),
            "drawdown": _clip01_array(-dd / self.drawdown_cap),
            "rsi": _clip01_array(np.abs(rsi - 50.0) / 50.0),
            "rank": _clip01_array(np.abs(2.0 * rank - 1.0)),
        }
        total_weight = np.zeros(frame.present.shape)
        weighted = np.zeros_like(total_weight)
        count = np.zeros(frame.present.shape, dtype=np.int64)
        for k, c in components.items():  # + 0.0 for a missing component is exact
            known = ~np.isnan(c)
            total_weight = total_weight + np.where(known, self.weights[k], 0.0)
            weighted = weighted + np.where(known, self.weights[k] * c, 0.0)
            count += known
        frame.skip(count == 0)  # no component at all: no result, as process returns None
        with np.errstate(invalid="ignore", divide="ignore"):
            score = 100.0 * weighted / total_weight
        return {
            "score": score,
            "n_components": count,
            **{f"c_{k}": c for k, c in components.items()},
        }
