"""The engine's contract played by hand, and independent pandas references for the example
calculations (used by ``test_calculations_values.py``).

``drive()`` follows ``orchestrator/calculation.py``: per available date of the dataset, each
calculation in dependency order; a standard calculation is called for the users with rows that
date (or, without root data, the users of its standard dependencies' results), with
``history`` over the last ``lookback`` available dates, ``previous`` only from the previous
available date, and same-date upstream results. Rows are parsed as the engine parses them.

The references (``ref_*``) are written the pandas way — ``groupby``/``shift``, ``rolling``,
``ewm`` for Wilder's smoothing, ``Series.rank`` — not by re-running the calculations' loops.
Each takes the same frame the calculations see and returns rows keyed by ``date`` (ISO) and
``user`` (text), one column per result field.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import pandas as pd

from orchestrator.calculation import MetaContext, StandardContext

RTOL, ATOL = 1e-9, 1e-12


# --- reading rows the way the engine parses them ------------------------------------------


def read_csv_text(text: str, date_col: str, user_col: str) -> pd.DataFrame:
    """A CSV as the engine reads it: empty fields are null, every other text is kept."""
    return pd.read_csv(
        io.StringIO(text),
        keep_default_na=False,
        na_values=[""],
        dtype={date_col: str, user_col: str},
    )


def engine_rows(frame: pd.DataFrame, date_col: str, user_col: str) -> list[dict[str, Any]]:
    """Rows as dicts following the engine's parsing rules (``orchestrator/rootdata.py``):
    numeric columns int when all values are integral else float, empty -> None, the date
    and user columns as text."""
    converters: dict[str, Callable[[Any], Any]] = {}
    for col in frame.columns:
        values = frame[col]
        if col in (date_col, user_col) or not pd.api.types.is_numeric_dtype(values):
            converters[col] = lambda v: None if (isinstance(v, float) and math.isnan(v)) else v
        elif (values.dropna() == values.dropna().round()).all():
            converters[col] = lambda v: None if pd.isna(v) else int(v)
        else:
            converters[col] = lambda v: None if pd.isna(v) else float(v)
    cols = list(frame.columns)
    return [
        {c: converters[c](v) for c, v in zip(cols, values)}
        for values in frame.itertuples(index=False, name=None)
    ]


# --- the engine's contract, played directly ------------------------------------------------


def drive(
    calcs: list[type], frame: pd.DataFrame, dataset: str, date_col: str, user_col: str
) -> dict[str, dict[str, Any]]:
    """Run ``calcs`` (in dependency order) over ``frame`` as the engine would, by hand.

    Returns:
        calc name -> ISO date -> {user: result} (standard) or the result dict (meta).
    """
    rows = engine_rows(frame, date_col, user_col)
    by_date: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for row in rows:
        by_date.setdefault(row[date_col], {}).setdefault(row[user_col], []).append(row)
    dates = sorted(by_date)
    out: dict[str, dict[str, Any]] = {c.name: {} for c in calcs}
    kinds = {c.name: c.kind for c in calcs}
    for i, date in enumerate(dates):
        day = dt.date.fromisoformat(date)
        prev_date = dates[i - 1] if i else None
        for cls in calcs:
            calc = cls()
            previous_all = out[cls.name].get(prev_date) if cls.historical and prev_date else None
            window = dates[max(0, i - cls.lookback + 1) : i + 1]
            if cls.kind == "meta":
                upstream = {d: out[d][date] for d in cls.dependencies}
                ctx = MetaContext(
                    day,
                    {dataset: [r for u in by_date[date].values() for r in u]},
                    upstream,
                    previous_all,
                )
                result = calc.process(ctx)
                json.dumps(result, allow_nan=False)  # JSON values only: no NaN, no numpy
                out[cls.name][date] = result
                continue
            if cls.root_data:
                users = sorted(by_date[date])
            else:
                users = sorted(
                    {u for d in cls.dependencies if kinds[d] == "standard" for u in out[d][date]}
                )
            results = {}
            for user in users:
                ctx = StandardContext(
                    date=day,
                    user=user,
                    root={dataset: by_date[date].get(user, [])},
                    history={dataset: [r for d in window for r in by_date[d].get(user, [])]},
                    upstream={
                        d: (out[d][date].get(user) if kinds[d] == "standard" else out[d][date])
                        for d in cls.dependencies
                    },
                    previous=(previous_all or {}).get(user),
                )
                result = calc.process(ctx)
                if result is not None:
                    json.dumps(result, allow_nan=False)
                    results[user] = result
            out[cls.name][date] = results
    return out


def table(results: Mapping[str, Mapping[str, Any]]) -> pd.DataFrame:
    """Standard results (ISO date -> user -> dict) as rows (date, user, *fields)."""
    records = [
        {"date": date, "user": user, **result}
        for date, per_user in results.items()
        for user, result in per_user.items()
    ]
    return pd.DataFrame.from_records(records).sort_values(["user", "date"]).reset_index(drop=True)


def assert_frame_values(
    actual: pd.DataFrame,
    expected: pd.DataFrame,
    columns: Iterable[str],
    rtol: float = RTOL,
    atol: float = ATOL,
    keys: tuple[str, ...] = ("date", "user"),
) -> None:
    """Same keys, and each column equal within tolerance (None and NaN count as equal)."""
    a = actual.set_index(list(keys)).sort_index()
    e = expected.set_index(list(keys)).sort_index()
    assert list(a.index) == list(e.index), "different (date, user) keys"
    for col in columns:
        av = pd.to_numeric(a[col].astype(object).where(a[col].notna(), np.nan)).to_numpy(float)
        ev = pd.to_numeric(e[col].astype(object).where(e[col].notna(), np.nan)).to_numpy(float)
        same_null = np.isnan(av) == np.isnan(ev)
        bad = ~same_null | ~np.isclose(av, ev, rtol=rtol, atol=atol, equal_nan=True)
        if bad.any():
            where = a.index[bad][:5].tolist()
            raise AssertionError(
                f"{col}: {int(bad.sum())} of {len(av)} differ, e.g. at {where}: "
                f"{av[bad][:5].tolist()} vs expected {ev[bad][:5].tolist()}"
            )


# --- independent references: prices --------------------------------------------------------


def with_positions(px: pd.DataFrame) -> pd.DataFrame:
    """``px`` sorted by (Name, date) with ``pos``: the index of its date among the dataset's."""
    dates = np.sort(px["date"].unique())
    out = px.sort_values(["Name", "date"]).reset_index(drop=True)
    out["pos"] = np.searchsorted(dates, out["date"])
    out["run"] = (out.groupby("Name")["pos"].diff() != 1).cumsum()  # runs without a gap
    return out


def ref_daily_return(px: pd.DataFrame, max_gap: int = 5) -> pd.DataFrame:
    p = with_positions(px)
    g = p.groupby("Name")
    prev_close, prev_pos = g["close"].shift(), g["pos"].shift()
    ok = (p["pos"] - prev_pos) <= max_gap
    return pd.DataFrame(
        {
            "date": p["date"],
            "user": p["Name"],
            "close": p["close"],
            "prev_close": prev_close.where(ok),
            "return": (p["close"] / prev_close - 1).where(ok),
        }
    )


def ref_volatility(px: pd.DataFrame, window: int = 20) -> pd.DataFrame:
    p = with_positions(px)
    records = []
    for name, rows in p.groupby("Name"):
        for pos, date in zip(rows["pos"], rows["date"]):
            inside = rows[(rows["pos"] > pos - window - 1) & (rows["pos"] <= pos)]
            returns = inside["close"].pct_change().dropna()
            vol = returns.std(ddof=1) if len(returns) >= 2 else np.nan
            records.append(
                {
                    "date": date,
                    "user": name,
                    "volatility": vol,
                    "annualised": vol * np.sqrt(252),
                    "n_returns": len(returns),
                }
            )
    return pd.DataFrame.from_records(records)


def wilder(x: pd.Series, period: int) -> pd.Series:
    """Wilder's average of ``x[1:]`` (``x[0]`` has no previous bar): NaN until index
    ``period``, there the mean of ``x[1..period]``, then ``ewm(alpha=1/period)``."""
    out = pd.Series(np.nan, index=x.index)
    if len(x) < period + 1:
        return out
    seed = x.iloc[1 : period + 1].mean()
    tail = pd.concat([pd.Series([seed]), x.iloc[period + 1 :]], ignore_index=True)
    out.iloc[period:] = tail.ewm(alpha=1 / period, adjust=False).mean().to_numpy()
    return out


def ref_rsi(px: pd.DataFrame, period: int = 14) -> pd.DataFrame:
    p = with_positions(px)
    parts = []
    for _, run in p.groupby("run"):
        delta = run["close"].diff()
        avg_gain = wilder(delta.clip(lower=0), period)
        avg_loss = wilder((-delta).clip(lower=0), period)
        rsi = (100 - 100 / (1 + avg_gain / avg_loss)).where(avg_loss != 0, 100.0)
        parts.append(
            pd.DataFrame(
                {
                    "date": run["date"],
                    "user": run["Name"],
                    "close": run["close"],
                    "rsi": rsi.where(avg_gain.notna()),
                    "avg_gain": avg_gain,
                    "avg_loss": avg_loss,
                }
            )
        )
    return pd.concat(parts, ignore_index=True)


def ref_atr(px: pd.DataFrame, period: int = 14) -> pd.DataFrame:
    p = with_positions(px)
    parts = []
    for _, run in p.groupby("run"):
        prices = run[["high", "low", "close"]].to_numpy(float)
        hi, lo = np.nanmax(prices, axis=1), np.nanmin(prices, axis=1)
        prev_close = run["close"].shift().to_numpy(float)
        tr = np.where(
            np.isnan(prev_close), hi - lo, np.fmax(hi, prev_close) - np.fmin(lo, prev_close)
        )
        atr = wilder(pd.Series(tr, index=run.index), period)
        parts.append(
            pd.DataFrame(
                {
                    "date": run["date"],
                    "user": run["Name"],
                    "close": run["close"],
                    "atr": atr,
                    "tr": pd.Series(tr, index=run.index).where(atr.notna()),
                    "atr_ratio": atr / run["close"],
                }
            )
        )
    return pd.concat(parts, ignore_index=True)


def ref_drawdown(px: pd.DataFrame, lookback: int = 63) -> pd.DataFrame:
    p = with_positions(px)
    parts = []
    for _, run in p.groupby("run"):
        name, start = run["Name"].iloc[0], run["pos"].iloc[0]
        mine = p[(p["Name"] == name) & (p["pos"] > start - lookback) & (p["pos"] <= start)]
        closes = run["close"].to_numpy(float).copy()
        closes[0] = max(closes[0], mine["close"].max())  # the re-seeded peak
        peak = np.maximum.accumulate(closes)
        parts.append(
            pd.DataFrame(
                {
                    "date": run["date"],
                    "user": run["Name"],
                    "close": run["close"],
                    "peak": peak,
                    "drawdown": run["close"].to_numpy(float) / peak - 1,
                }
            )
        )
    return pd.concat(parts, ignore_index=True)


def ref_xs_rank(daily: pd.DataFrame) -> pd.DataFrame:
    have = daily.dropna(subset=["return"]).copy()
    g = have.groupby("date")["return"]
    n = g.transform("count")
    rank = g.rank(method="average")
    have["rank"] = np.where(n == 1, 0.5, (rank - 1) / (n - 1).where(n > 1, 1))
    return have[["date", "user", "rank"]]


def ref_breadth(daily: pd.DataFrame) -> pd.DataFrame:
    r = daily["return"]
    return (
        pd.DataFrame(
            {
                "date": daily["date"],
                "advancers": r > 0,
                "decliners": r < 0,
                "unchanged": r == 0,
                "without_return": r.isna(),
            }
        )
        .groupby("date")
        .sum()
        .astype(int)
        .reset_index()
    )


def ref_risk_score(px: pd.DataFrame) -> pd.DataFrame:
    """The documented combination over the pandas references (caps and weights as documented
    in ``RiskScore``: 80 %/yr, 5 %/day, 50 %; weights 0.30, 0.20, 0.25, 0.15, 0.10)."""
    keys = ["date", "user"]
    daily = ref_daily_return(px)
    df = (
        daily[keys]
        .merge(ref_volatility(px)[[*keys, "annualised"]], on=keys)
        .merge(ref_atr(px)[[*keys, "atr_ratio"]], on=keys)
        .merge(ref_drawdown(px)[[*keys, "drawdown"]], on=keys)
        .merge(ref_rsi(px)[[*keys, "rsi"]], on=keys)
        .merge(ref_xs_rank(daily), on=keys, how="left")
    )
    comps = pd.DataFrame(
        {
            "c_volatility": (df["annualised"] / 0.80).clip(0, 1),
            "c_atr": (df["atr_ratio"] / 0.05).clip(0, 1),
            "c_drawdown": (-df["drawdown"] / 0.50).clip(0, 1),
            "c_rsi": ((df["rsi"] - 50).abs() / 50).clip(0, 1),
            "c_rank": (2 * df["rank"] - 1).abs(),
        }
    )
    weights = np.array([0.30, 0.20, 0.25, 0.15, 0.10])
    c = comps.to_numpy(float)
    have = ~np.isnan(c)
    score = 100 * np.nansum(c * weights, axis=1) / (have * weights).sum(axis=1)
    return pd.concat([df[keys], comps], axis=1).assign(score=score, n_components=have.sum(1))


# --- independent references: Berka ---------------------------------------------------------


def signed_amount(tx: pd.DataFrame) -> pd.Series:
    return tx["amount"].where(tx["type"] == "PRIJEM", -tx["amount"])


def ref_net_flow(tx: pd.DataFrame) -> pd.DataFrame:
    s = signed_amount(tx)
    f = pd.DataFrame(
        {
            "date": tx["date"],
            "user": tx["account_id"].astype(str),
            "inflow": s.clip(lower=0),
            "outflow": (-s).clip(lower=0),
            "n_credits": s > 0,
            "n_debits": s < 0,
            "n_transactions": 1,
        }
    )
    out = f.groupby(["date", "user"]).sum().reset_index()
    out[["inflow", "outflow"]] = out[["inflow", "outflow"]].round(2)
    out["net"] = (out["inflow"] - out["outflow"]).round(2)
    return out


def ref_flows_30d(tx: pd.DataFrame, window: int = 30) -> pd.DataFrame:
    daily = ref_net_flow(tx)
    dates = np.sort(tx["date"].unique())
    parts = []
    for user, rows in daily.groupby("user"):
        # every available date of the dataset, zero where the account has no transaction
        full = rows.drop(columns="user").set_index("date").reindex(dates, fill_value=0)
        full["active"] = (full["n_transactions"] > 0).astype(float)
        rolled = (
            full[["inflow", "outflow", "n_transactions", "active"]]
            .rolling(window, min_periods=1)
            .sum()
        )
        rolled = rolled.loc[rows["date"]]
        parts.append(
            pd.DataFrame(
                {
                    "date": rows["date"].to_numpy(),
                    "user": user,
                    "inflow_30d": rolled["inflow"].round(2).to_numpy(),
                    "outflow_30d": rolled["outflow"].round(2).to_numpy(),
                    "net_30d": (rolled["inflow"] - rolled["outflow"]).round(2).to_numpy(),
                    "n_transactions_30d": rolled["n_transactions"].to_numpy(),
                    "active_days_30d": rolled["active"].to_numpy(),
                }
            )
        )
    return pd.concat(parts, ignore_index=True)


def ref_balance(tx_full: pd.DataFrame) -> pd.DataFrame:
    """End-of-day balances the way the data README checked them: from the account's first
    day, previous end-of-day balance plus the day's signed amounts, snapped to the nearest
    recorded balance of that day (the README found every day within 0.20 CZK)."""
    t = tx_full.assign(
        cents=(signed_amount(tx_full) * 100).round().astype(int),
        post=(tx_full["balance"] * 100).round().astype(int),
    )
    records = []
    for account, rows in t.sort_values("date").groupby("account_id"):
        balance = 0  # accounts open with their first transaction
        for date, day in rows.groupby("date", sort=True):
            expected = balance + day["cents"].sum()
            posts = day["post"].to_numpy()
            balance = int(posts[np.lexsort((posts, np.abs(posts - expected)))[0]])
            records.append({"date": date, "user": str(account), "balance": balance / 100})
    return pd.DataFrame.from_records(records)
