#!/usr/bin/env python3
"""Write the bundled example price data, deterministically: ``examples/data/prices.csv.gz``.

Synthetic daily OHLCV bars in the layout of the real S&P 500 file
(``date,open,high,low,close,volume,Name``, sorted by ``Name`` then ``date``), for fictional
tickers over the weekdays ending 2024-12-31 (no holidays). Closes follow a one-factor geometric
random walk (a market factor plus an idiosyncratic part, per-ticker volatility 1-3 % a day);
open, high and low are drawn around it so that ``low <= open, close <= high``.

The quirks of the real file are planted on purpose, so the example exercises them:

* a late listing: the 2nd ticker starts at 40 % of the period;
* a gap: the 3rd ticker has no rows for three consecutive weekdays in the middle;
* a null bar: on one date the 4th ticker has empty ``open``, ``high`` and ``low`` and
  ``volume`` 0 (the pattern of DHR 2016-01-12 in the real file).

Same arguments, same bytes: the generator is seeded and the gzip header has no timestamp.
Usage: ``python scripts/make_example_data.py [--out PATH] [--symbols 40] [--days 260]``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gzip
import io
import string
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "examples" / "data" / "prices.csv.gz"
LAST_DATE = dt.date(2024, 12, 31)
COLUMNS = ["date", "open", "high", "low", "close", "volume", "Name"]


def weekdays_ending(last: dt.date, count: int) -> list[dt.date]:
    """The ``count`` weekdays up to and including ``last``, oldest first."""
    days: list[dt.date] = []
    day = last
    while len(days) < count:
        if day.weekday() < 5:
            days.append(day)
        day -= dt.timedelta(days=1)
    return days[::-1]


def tickers(rng: np.random.Generator, count: int) -> list[str]:
    """``count`` distinct fictional tickers of 3-4 capital letters, sorted."""
    letters = np.array(list(string.ascii_uppercase))
    names: set[str] = set()
    while len(names) < count:
        names.add("".join(rng.choice(letters, size=int(rng.integers(3, 5)))))
    return sorted(names)


def _price(x: float) -> str:
    # Four decimals, written like the source file writes them (shortest repr, no padding).
    return repr(round(float(x), 4))


def make_rows(symbols: int, days: int, seed: int) -> list[list[str]]:
    """The CSV rows (without header), sorted by Name then date.

    Raises:
        ValueError: fewer than 1 symbol or fewer than 10 days.
    """
    if symbols < 1 or days < 10:
        raise ValueError(f"need --symbols >= 1 and --days >= 10, got {symbols} and {days}")
    rng = np.random.default_rng(seed)
    dates = weekdays_ending(LAST_DATE, days)
    names = tickers(rng, symbols)
    market = rng.normal(0.0003, 0.009, size=days)
    rows: list[list[str]] = []
    for i, name in enumerate(names):
        beta = rng.uniform(0.5, 1.5)
        sigma = rng.uniform(0.01, 0.03)
        log_returns = beta * market + rng.normal(0.0, sigma, size=days)
        close = rng.uniform(10.0, 500.0) * np.exp(np.cumsum(log_returns))
        prev_close = np.concatenate([[close[0]], close[:-1]])
        open_ = prev_close * np.exp(rng.normal(0.0, sigma / 3, size=days))
        high = np.maximum(open_, close) * (1 + np.abs(rng.normal(0.0, sigma / 2, size=days)))
        low = np.minimum(open_, close) * (1 - np.abs(rng.normal(0.0, sigma / 2, size=days)))
        volume = rng.lognormal(14.0, 0.5, size=days).astype(np.int64)
        present = np.ones(days, dtype=bool)
        null_bar = -1
        if i == 1:  # late listing
            present[: days * 2 // 5] = False
        elif i == 2:  # a three-weekday gap in the middle
            present[days // 2 : days // 2 + 3] = False
        elif i == 3:  # one bar with null open/high/low and no volume
            null_bar = days * 3 // 4
        for t in range(days):
            if not present[t]:
                continue
            if t == null_bar:
                o = h = lo = ""
                v = "0"
            else:
                o, h, lo, v = _price(open_[t]), _price(high[t]), _price(low[t]), str(volume[t])
            rows.append([dates[t].isoformat(), o, h, lo, _price(close[t]), v, name])
    return rows


def write_csv_gz(path: Path, rows: list[list[str]]) -> None:
    """Write ``rows`` under the header as gzip with a fixed header (mtime 0, no file name)."""
    text = io.StringIO()
    text.write(",".join(COLUMNS) + "\n")
    for row in rows:
        text.write(",".join(row) + "\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz:
        gz.write(text.getvalue().encode())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"default {DEFAULT_OUT}")
    parser.add_argument("--symbols", type=int, default=40, help="number of tickers (40)")
    parser.add_argument("--days", type=int, default=260, help="number of weekdays (260)")
    parser.add_argument("--seed", type=int, default=20241231, help="random seed (20241231)")
    args = parser.parse_args(argv)
    try:
        rows = make_rows(args.symbols, args.days, args.seed)
    except ValueError as e:
        parser.error(str(e))
    write_csv_gz(args.out, rows)
    print(f"wrote {len(rows)} rows for {args.symbols} tickers to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
