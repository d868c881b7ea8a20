#!/usr/bin/env python
"""An independent pandas/NumPy computation of the 8 price calculations over a whole OHLCV file.

The yardstick of ``scripts/bench_sp500.py``: the same work as a cold ``orchestrator run`` of
``calculations/prices`` — read the gzipped CSV, compute every indicator on every (date,
instrument), write the results — done the plain data-science way, vectorised, in one process.
It implements the definitions of the calculations' docstrings, not their code:

* dates are the *available* dates of the file (a date with at least one row); an instrument
  gets a result on the dates it has a row, and only there; a (Name, date) repeated in the file
  keeps its last row; a close that is null or not positive is missing;
* ``daily_return``: ``close / prev - 1`` against the latest valid close among the
  ``max_gap`` = 5 available dates before (a longer gap gives no return);
* ``volatility_20``: sample std (ddof 1) of the returns between consecutive valid closes
  inside the last 21 available dates (today included, so at most 20 returns; fewer than 2:
  null), ``annualised = vol * sqrt(252)``;
* ``drawdown``: ``close / peak - 1``; the peak is carried along a run of consecutive rows
  (``peak = max(peak, close)``, a null close keeps it) and re-seeded at the first valid close
  of a run as the highest valid close of the last 63 available dates, ``tracked_since`` being
  the date of the oldest valid close of that window;
* ``rsi_14`` / ``atr_14``: Wilder's averages over each run of consecutive valid closes (a gap
  or a null close starts a new run): the simple mean of the first ``period`` gains/losses
  (true ranges), then ``ewm(alpha=1/period, adjust=False)``; null for the first ``period``
  bars of a run; ``tr`` outside a seeded average is the true range against the latest valid
  close of the last ``period`` dates before (across a gap), else the bar's own range;
  ``hi``/``lo`` of a bar are the max/min of its non-null high, low and close;
* ``xs_rank``: per date, ``(rank - 1) / (n - 1)`` of the returns (``rank(method="average")``;
  a single return gets 0.5); ``breadth``: counts of returns > 0, < 0, == 0, rows without a
  return, share advancing;
* ``risk_score``: the weighted average of the five clipped components over those available
  (caps 0.80/yr, 0.05/day, 0.50; weights 0.30, 0.20, 0.25, 0.15, 0.10), times 100; no
  component at all: no result.

Arithmetic is pandas' (rolling windows, ``ewm``, Kahan/Welford online sums), not the engine's
``s = s + x`` loops, so values agree to rounding (``rtol`` 1e-9 in the benchmark), not bit for
bit. Output: one Parquet file per calculation in ``--out`` — standard ones as long tables
``date, Name, <fields>`` (one row per instrument with a row that date), ``xs_rank`` as
``date, Name, rank`` plus ``xs_rank_n.parquet`` (``date, n``), ``breadth`` one row per date.

Usage:
    .venv/bin/python scripts/reference_sp500.py --input FILE.csv.gz --out DIR [--json]
The last line printed is a JSON object: seconds per phase, rows, instruments, dates.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

TRADING_DAYS_PER_YEAR = 252
MAX_GAP = 5
VOL_WINDOW = 20
DRAWDOWN_LOOKBACK = 63
PERIOD = 14
CAPS = {"volatility": 0.80, "atr": 0.05, "drawdown": 0.50}
WEIGHTS = {"volatility": 0.30, "atr": 0.20, "drawdown": 0.25, "rsi": 0.15, "rank": 0.10}


def read_prices(path: str | Path) -> pd.DataFrame:
    """The OHLCV file as the engine reads it: only empty fields are null (a ticker such as
    ``NA`` stays text); the last row of a repeated (Name, date) wins.

    Returns:
        Columns ``date``, ``Name`` (categoricals, categories sorted), ``open, high, low,
        close, volume`` (float64, NaN where empty), plus ``pos`` / ``uid`` (the date's and
        the instrument's category codes); one row per (Name, date), sorted by Name then date.
    """
    px = pd.read_csv(
        path,
        keep_default_na=False,
        na_values=[""],
        dtype={"date": "category", "Name": "category"},
    )
    for column in ("open", "high", "low", "close", "volume"):
        px[column] = pd.to_numeric(px[column], errors="coerce").astype(np.float64)
    for column, code in (("date", "pos"), ("Name", "uid")):
        px[column] = px[column].cat.reorder_categories(sorted(px[column].cat.categories))
        px[code] = px[column].cat.codes.astype(np.int64)
    key = px["uid"].to_numpy() * len(px["date"].cat.categories) + px["pos"].to_numpy()
    last = ~pd.Series(key).duplicated(keep="last").to_numpy()
    return px[last].iloc[np.argsort(key[last], kind="stable")].reset_index(drop=True)


class Grid:
    """The file on the grid of available dates × instruments.

    Attributes:
        dates: (D,) object array of ISO dates, ascending; users: (U,) instruments, ascending.
        long: one row per (instrument, date) with a row, sorted by instrument then date, with
            ``uid`` / ``pos`` (column and row in the grid) and ``ok`` (valid close).
        present: (D, U) bool, the instrument has a row; valid: (D, U) bool, a positive close.
        close, high, low: (D, U) float64, NaN where missing (close: NaN where not valid).
    """

    def __init__(self, px: pd.DataFrame):
        self.dates = np.asarray(px["date"].cat.categories, dtype=object)
        self.users = np.asarray(px["Name"].cat.categories, dtype=object)
        long = px.copy()
        long["ok"] = (long["close"] > 0).to_numpy()
        self.long = long
        shape = (len(self.dates), len(self.users))
        at = (long["pos"].to_numpy(), long["uid"].to_numpy())
        self.present = np.zeros(shape, dtype=bool)
        self.present[at] = True
        self.valid = np.zeros(shape, dtype=bool)
        self.valid[at] = long["ok"].to_numpy()

        def dense(column: str) -> np.ndarray:
            out = np.full(shape, np.nan)
            out[at] = long[column].to_numpy()
            return out

        self.close = np.where(self.valid, dense("close"), np.nan)
        self.high, self.low = dense("high"), dense("low")

    def frame(self, values: np.ndarray) -> pd.DataFrame:
        """A (D, U) array as a DataFrame (rows: date positions; columns: user ids)."""
        return pd.DataFrame(values)

    def date_labels(self, positions: np.ndarray) -> pd.Categorical:
        """ISO dates of float row positions (NaN: null), as a categorical."""
        codes = np.where(np.isnan(positions), -1, positions).astype(np.int64)
        return pd.Categorical.from_codes(codes, categories=self.long["date"].cat.categories)

    def rows(self, values: np.ndarray) -> np.ndarray:
        """A (D, U) array read at the long table's rows (instrument, date with a row)."""
        return values[self.long["pos"].to_numpy(), self.long["uid"].to_numpy()]


def _valid_positions(grid: Grid) -> pd.DataFrame:
    """(D, U): the row position where the close is valid, NaN elsewhere."""
    return grid.frame(np.where(grid.valid, np.arange(len(grid.dates))[:, None], np.nan))


def _first_valid_from(grid: Grid, back: int) -> np.ndarray:
    """(D, U) float: the first row with a valid close in ``[t - back, t]`` (NaN: none)."""
    following = _valid_positions(grid).bfill().to_numpy()  # first valid row >= k
    start = np.maximum(np.arange(len(grid.dates)) - back, 0)
    first = following[start]
    return np.where(first <= np.arange(len(grid.dates))[:, None], first, np.nan)


def _take(values: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``values[rows[t, u], u]`` with NaN where ``rows`` is NaN."""
    ok = ~np.isnan(rows)
    picked = np.take_along_axis(values, np.where(ok, rows, 0).astype(np.int64), axis=0)
    return np.where(ok, picked, np.nan)


def daily_return(grid: Grid) -> tuple[pd.DataFrame, np.ndarray]:
    """The ``daily_return`` table and the (D, U) matrix of returns (NaN: none)."""
    t = np.arange(len(grid.dates))[:, None]
    base = _valid_positions(grid).ffill().shift(1).to_numpy()  # latest valid row < t
    found = grid.valid & (base >= t - MAX_GAP)
    prev_close = np.where(found, _take(grid.close, base), np.nan)
    ret = grid.close / prev_close - 1.0
    prev_date = grid.date_labels(grid.rows(np.where(found, base, np.nan)))
    table = _table(
        grid,
        close=grid.rows(grid.close),
        prev_close=grid.rows(prev_close),
        prev_date=prev_date,
        **{"return": grid.rows(ret)},
    )
    return table, ret


def volatility_20(grid: Grid) -> tuple[pd.DataFrame, np.ndarray]:
    """The ``volatility_20`` table and the (D, U) matrix of ``annualised``.

    Rolling statistics over the 21 rows ``[t - 20, t]`` of the returns placed at their end
    row count every return ending in the window; the one ending at the window's first valid
    close has its base outside the window, so it is taken out again (Welford's removal).
    """
    w = VOL_WINDOW
    prev_close = grid.frame(grid.close).ffill().shift(1).to_numpy()
    returns = grid.frame(grid.close / prev_close - 1.0)  # NaN: no valid close or no earlier one
    rolling = returns.rolling(w + 1, min_periods=0)
    count = rolling.count().to_numpy()
    mean = rolling.mean().to_numpy()
    m2 = np.where(count >= 2, rolling.var(ddof=1).to_numpy() * (count - 1), 0.0)
    first = _take(returns.to_numpy(), _first_valid_from(grid, w))
    drop = ~np.isnan(first)
    n = count - drop
    with np.errstate(invalid="ignore", divide="ignore"):
        kept_mean = np.where(drop, (count * mean - first) / n, mean)
        m2 = np.where(drop, m2 - (first - mean) * (first - kept_mean), m2)
        vol = np.where(n >= 2, np.sqrt(np.maximum(m2, 0.0) / (n - 1)), np.nan)
    annualised = vol * np.sqrt(TRADING_DAYS_PER_YEAR)
    table = _table(
        grid,
        volatility=grid.rows(vol),
        annualised=grid.rows(annualised),
        n_returns=grid.rows(n).astype(np.int64),
    )
    return table, annualised


def _runs(long: pd.DataFrame) -> np.ndarray:
    """Run ids of a long table sorted by uid, pos: a new run where the instrument changes or
    a date position is skipped."""
    pos, uid = long["pos"].to_numpy(), long["uid"].to_numpy()
    new = np.ones(len(long), dtype=bool)
    new[1:] = (uid[1:] != uid[:-1]) | (pos[1:] != pos[:-1] + 1)
    return np.cumsum(new)


def drawdown(grid: Grid) -> tuple[pd.DataFrame, np.ndarray]:
    """The ``drawdown`` table and the (D, U) matrix of drawdowns."""
    lb = DRAWDOWN_LOOKBACK
    seed_peak = grid.rows(grid.frame(grid.close).rolling(lb, min_periods=1).max().to_numpy())
    first = grid.rows(_first_valid_from(grid, lb - 1))
    long = grid.long
    close = np.where(long["ok"], long["close"], np.nan)
    segment = _runs(long)  # state is carried along consecutive rows (null closes included)
    seen = pd.Series(long["ok"].to_numpy()).groupby(segment).cumsum().to_numpy()
    seed = long["ok"].to_numpy() & (seen == 1)
    start = pd.Series(np.where(seed, seed_peak, np.where(seen >= 1, close, np.nan)))
    peak = start.groupby(segment).cummax().groupby(segment).ffill().to_numpy()
    since = pd.Series(np.where(seed, first, np.nan)).groupby(segment).ffill().to_numpy()
    tracked = grid.date_labels(since)
    dd = close / peak - 1.0
    out = np.full(grid.present.shape, np.nan)
    out[long["pos"].to_numpy(), long["uid"].to_numpy()] = dd
    return _table(grid, close=close, peak=peak, drawdown=dd, tracked_since=tracked), out


def _wilder(x: pd.Series, k: np.ndarray, run: np.ndarray, period: int) -> np.ndarray:
    """Wilder's average of ``x`` along each run (``k``: 0-based index in the run; ``x`` at
    ``k = 0`` is ignored): NaN before ``k = period``, there the mean of ``x[1..period]``,
    after it ``ewm(alpha=1/period, adjust=False)``."""
    summed = x.where(k > 0, 0.0).groupby(run).cumsum().to_numpy()
    start = np.where(k == period, summed / period, np.where(k > period, x.to_numpy(), np.nan))
    series = pd.Series(start)
    keep = series.notna().to_numpy()
    out = np.full(len(x), np.nan)
    if keep.any():
        smooth = (
            series[keep]
            .groupby(run[keep])
            .ewm(alpha=1.0 / period, adjust=False)
            .mean()
            .droplevel(0)
            .sort_index()
        )
        out[smooth.index.to_numpy()] = smooth.to_numpy()
    return out


def _valid_runs(grid: Grid) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """Rows of the long table with a valid close, their run ids (consecutive valid closes)
    and their index in the run."""
    bars = grid.long[grid.long["ok"].to_numpy()].reset_index(drop=True)
    run = _runs(bars)
    k = pd.Series(np.ones(len(bars))).groupby(run).cumcount().to_numpy()
    return bars, run, k


def rsi_14(grid: Grid, period: int = PERIOD) -> tuple[pd.DataFrame, np.ndarray]:
    """The ``rsi_14`` table (RSI over ``period`` bars) and the (D, U) matrix of RSI."""
    bars, run, k = _valid_runs(grid)
    change = bars["close"].diff().where(k > 0)
    avg_gain = _wilder(change.clip(lower=0.0), k, run, period)
    avg_loss = _wilder((-change).clip(lower=0.0), k, run, period)
    with np.errstate(divide="ignore", invalid="ignore"):
        rsi = np.where(avg_loss == 0, 100.0, 100.0 - 100.0 / (1.0 + avg_gain / avg_loss))
    rsi = np.where(np.isnan(avg_gain), np.nan, rsi)
    fields = _on_rows(grid, bars, rsi=rsi, avg_gain=avg_gain, avg_loss=avg_loss)
    fields["close"] = grid.rows(grid.close)
    matrix = np.full(grid.present.shape, np.nan)
    matrix[bars["pos"].to_numpy(), bars["uid"].to_numpy()] = rsi
    return _table(grid, **fields), matrix


def atr_14(grid: Grid, period: int = PERIOD) -> tuple[pd.DataFrame, np.ndarray]:
    """The ``atr_14`` table and the (D, U) matrix of ``atr_ratio``."""
    bars, run, k = _valid_runs(grid)
    close = bars["close"].to_numpy()
    known = bars[["high", "low"]].to_numpy()
    hi = np.fmax(close, np.fmax(known[:, 0], known[:, 1]))  # fmax/fmin skip a null high/low
    lo = np.fmin(close, np.fmin(known[:, 0], known[:, 1]))
    # The close before: the run's previous bar, or at a run's start the instrument's latest
    # valid close of the last `period` dates (across the gap), else none (the bar's range).
    same = np.r_[False, bars["uid"].to_numpy()[1:] == bars["uid"].to_numpy()[:-1]]
    near = np.r_[False, np.diff(bars["pos"].to_numpy()) <= period]
    prev = np.where(same & near, np.r_[np.nan, close[:-1]], np.nan)
    tr = np.where(np.isnan(prev), hi - lo, np.fmax(hi, prev) - np.fmin(lo, prev))
    atr = _wilder(pd.Series(tr), k, run, period)
    fields = _on_rows(grid, bars, atr=atr, tr=tr, atr_ratio=atr / close)
    fields["close"] = grid.rows(grid.close)
    matrix = np.full(grid.present.shape, np.nan)
    matrix[bars["pos"].to_numpy(), bars["uid"].to_numpy()] = atr / close
    return _table(grid, **fields), matrix


def xs_rank(grid: Grid, ret: np.ndarray) -> tuple[pd.DataFrame, pd.DataFrame, np.ndarray]:
    """Per-date percentile ranks: the long table ``date, Name, rank``, the table ``date, n``
    and the (D, U) matrix of ranks."""
    ranks = grid.frame(ret).rank(axis=1, method="average").to_numpy()
    n = np.sum(~np.isnan(ret), axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        pct = np.where((n == 1)[:, None], 0.5, (ranks - 1.0) / (n - 1)[:, None])
    pct = np.where(np.isnan(ret), np.nan, pct)
    t, u = np.nonzero(~np.isnan(pct))
    dates, users = grid.long["date"].cat.categories, grid.long["Name"].cat.categories
    table = pd.DataFrame(
        {
            "date": pd.Categorical.from_codes(t, categories=dates),
            "Name": pd.Categorical.from_codes(u, categories=users),
            "rank": pct[t, u],
        }
    )
    counts = pd.DataFrame({"date": grid.dates, "n": n.astype(np.int64)})
    return table, counts, pct


def breadth(grid: Grid, ret: np.ndarray) -> pd.DataFrame:
    """One row per date: advancers, decliners, unchanged, n, without_return, share."""
    with np.errstate(invalid="ignore"):
        up, down, flat = (ret > 0).sum(1), (ret < 0).sum(1), (ret == 0).sum(1)
    n = up + down + flat
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.where(n > 0, up / n, np.nan)
    return pd.DataFrame(
        {
            "date": grid.dates,
            "advancers": up,
            "decliners": down,
            "unchanged": flat,
            "n": n,
            "without_return": grid.present.sum(1) - n,
            "share_advancing": share,
        }
    )


def risk_score(grid: Grid, inputs: dict[str, np.ndarray]) -> pd.DataFrame:
    """The composite score over the (D, U) component inputs ``volatility`` (annualised),
    ``atr`` (atr_ratio), ``drawdown``, ``rsi``, ``rank``; rows without any component are left
    out."""
    comps = {
        "volatility": inputs["volatility"] / CAPS["volatility"],
        "atr": inputs["atr"] / CAPS["atr"],
        "drawdown": -inputs["drawdown"] / CAPS["drawdown"],
        "rsi": np.abs(inputs["rsi"] - 50.0) / 50.0,
        "rank": np.abs(2.0 * inputs["rank"] - 1.0),
    }
    comps = {k: np.clip(v, 0.0, 1.0) for k, v in comps.items()}  # NaN stays NaN
    stack = np.stack([comps[k] for k in WEIGHTS])
    weights = np.array(list(WEIGHTS.values()))[:, None, None]
    known = ~np.isnan(stack)
    total = np.where(known, weights, 0.0).sum(0)
    count = known.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        score = 100.0 * np.nansum(stack * weights, axis=0) / total
    fields = {"score": grid.rows(score), "n_components": grid.rows(count).astype(np.int64)}
    fields.update({f"c_{k}": grid.rows(v) for k, v in comps.items()})
    table = _table(grid, **fields)
    return table[table["n_components"].to_numpy() > 0].reset_index(drop=True)


def _on_rows(grid: Grid, bars: pd.DataFrame, **values: np.ndarray) -> dict[str, np.ndarray]:
    """Values given on the valid-close rows ``bars``, spread to every row of the long table
    (NaN on a row with a null close)."""
    out = {}
    at = (bars["pos"].to_numpy(), bars["uid"].to_numpy())
    for name, v in values.items():
        dense = np.full(grid.present.shape, np.nan)
        dense[at] = v
        out[name] = grid.rows(dense)
    return out


def _table(grid: Grid, **fields: Any) -> pd.DataFrame:
    """A long table: ``date, Name`` of every row of ``grid.long`` (categoricals) plus
    ``fields`` (arrays over those rows)."""
    return pd.DataFrame({"date": grid.long["date"], "Name": grid.long["Name"], **fields})


def compute(px: pd.DataFrame, rsi_period: int = PERIOD) -> dict[str, pd.DataFrame]:
    """Every calculation over ``px`` (as ``read_prices`` returns it).

    Returns:
        name -> table: ``daily_return``, ``volatility_20``, ``drawdown``, ``rsi_14``,
        ``atr_14``, ``risk_score`` (long, ``date, Name, <fields>``), ``xs_rank`` (``date,
        Name, rank``), ``xs_rank_n`` (``date, n``), ``breadth`` (``date, <fields>``).
    """
    grid = Grid(px)
    out: dict[str, pd.DataFrame] = {}
    out["daily_return"], ret = daily_return(grid)
    out["volatility_20"], annualised = volatility_20(grid)
    out["drawdown"], dd = drawdown(grid)
    out["rsi_14"], rsi = rsi_14(grid, rsi_period)
    out["atr_14"], atr_ratio = atr_14(grid)
    out["xs_rank"], out["xs_rank_n"], rank = xs_rank(grid, ret)
    out["breadth"] = breadth(grid, ret)
    inputs = {"volatility": annualised, "atr": atr_ratio, "drawdown": dd, "rsi": rsi}
    out["risk_score"] = risk_score(grid, {**inputs, "rank": rank})
    return out


def write(tables: dict[str, pd.DataFrame], folder: Path) -> None:
    """One ``<name>.parquet`` per table in ``folder`` (created)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, table in tables.items():
        table.to_parquet(folder / f"{name}.parquet", index=False)


def read(folder: Path) -> dict[str, pd.DataFrame]:
    """The tables ``write`` wrote."""
    return {p.stem: pd.read_parquet(p) for p in sorted(folder.glob("*.parquet"))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", required=True, type=Path, help="OHLCV CSV (gzipped or not)")
    parser.add_argument("--out", required=True, type=Path, help="folder for the Parquet files")
    parser.add_argument("--rsi-period", type=int, default=PERIOD)
    args = parser.parse_args(argv)
    if not args.input.exists():
        print(f"input {args.input} not found", file=sys.stderr)
        return 2
    phases: dict[str, Any] = {}
    start = time.perf_counter()
    px = read_prices(args.input)
    phases["read_s"] = time.perf_counter() - start
    at = time.perf_counter()
    tables = compute(px, args.rsi_period)
    phases["compute_s"] = time.perf_counter() - at
    at = time.perf_counter()
    write(tables, args.out)
    phases["write_s"] = time.perf_counter() - at
    summary = {
        "rows": len(px),
        "instruments": int(px["Name"].nunique()),
        "dates": int(px["date"].nunique()),
        **{k: round(v, 3) for k, v in phases.items()},
        "total_s": round(time.perf_counter() - start, 3),
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
