#!/usr/bin/env python
"""Seed 003's benchmark: 2,500 symbols × 5 years of daily bars × 4 indicators, on our
orchestrator, against an independent pandas / NumPy reference.

Seed 003 (E06, "Processing Engine", §1.2 and §9.1): "Process 2,500 symbols in < 30 seconds
(4 cores)", "Memory usage < 2GB during batch processing". Here a *cold catch-up*: every cell
(indicator × date) of an empty ledger computed by one ``orchestrator run`` process.

What one invocation does, in a work directory (a temporary one, or ``--keep DIR``):

1. generates the bars (``generate``: NumPy ``PCG64`` seeded with ``SEED``; a geometric random
   walk of closes, opens near the previous close, ``high >= max(open, close)`` and ``low <=
   min(open, close)``, prices in cents) and writes them as one CSV, ``data/prices.csv``
   (``date, open, high, low, close, volume, symbol``; floats written with ``repr``, so they
   parse back exactly);
2. writes the calculation package (the template ``scripts/symbols/indicators.py``, copied
   verbatim: SMA(20), EMA(20), Wilder's RSI(14) and ATR(14), each with a ``compute(frame)``
   and a ``process(ctx)`` form giving the same bits) and the config (``columnar = true`` for
   ``--style columnar``, ``false`` for ``--style per-user``; ``workers``; the dataset held in
   memory, ``root_memory_mb``);
3. runs ``orchestrator --config ... run --date LAST`` as a whole process timed from outside:
   the cold catch-up (``wall_s``), then the same command again, a no-op (``noop_s``). Wall
   clock and the largest process's maximum RSS come from ``/usr/bin/time -v`` when it exists
   (else ``time.perf_counter``); the summed RSS of the process tree is polled with psutil
   every 50 ms as well (``peak_tree_rss_mb``: forked workers share pages, so it overcounts);
4. times the reference as a whole process (``bench_symbols.py --reference-only``: Python start,
   imports, ``pandas.read_csv`` of the same CSV, the 4 indicators with pandas' ``rolling`` /
   ``ewm`` and NumPy, written to an ``.npz``) — ``reference_s``, and ``ratio = wall_s /
   reference_s``;
5. checks stored values against the reference (rtol 1e-12, NaN exactly where it is NaN):
   every field of every symbol on a sample of dates (the warm-up dates, both sides of each
   block boundary, the last date and ``--sample-dates`` random ones), or on every date with
   ``--check-all``; and that every cell was published with every symbol, that the cold run
   completed ``4 × dates`` cells and the no-op none.

Output: one JSON object (``--json``: only it) with ``wall_s, peak_rss_mb, cells, noop_s,
reference_s, ratio, values_ok`` and details. Exit code 1 when a run failed, a cell count is
off or a value differs.

Usage:
    .venv/bin/python scripts/bench_symbols.py [--symbols 2500] [--years 5] \\
        [--style columnar|per-user] [--workers N] [--check-all] [--json] [--keep DIR]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_run import orchestrator_exe, timed

HERE = Path(__file__).resolve().parent
TEMPLATE = HERE / "symbols" / "indicators.py"
STYLES = ("columnar", "per-user")
SEED = 3_2500_1260  # seed 003, 2,500 symbols, 1,260 dates
TRADING_DAYS = 252  # weekdays of a "year" of bars
FIRST_DATE = "2020-01-01"
RTOL = 1e-12
# Stored fields per calculation (what the reference computes too).
FIELDS = {
    "sma_20": ("sma",),
    "ema_20": ("ema",),
    "rsi_14": ("rsi", "avg_gain", "avg_loss"),
    "atr_14": ("atr",),
}
BLOCK_DATES = 256  # the engine's default chunk (config ``block_dates``)
TARGET_S = 30.0  # seed 003 §9.1, stated for 4 cores

SUMMARY = re.compile(
    r"^Run \w+ finished in [\d.]+ s(?: \([^)]*\))?, [\d.]+ s of it executing: "
    r"([\d,]+) cells? computed, ([\d,]+) failed",
    re.MULTILINE,
)


# --- input ------------------------------------------------------------------------------------


def generate(symbols: int, days: int, seed: int = SEED) -> dict[str, np.ndarray]:
    """Deterministic daily bars: ``days`` weekdays from ``FIRST_DATE`` × ``symbols`` symbols.

    Drawn from ``np.random.Generator(np.random.PCG64(seed))`` in this order: start prices
    (uniform 20..200), daily volatilities (uniform 1 %..2.5 %), log-returns (days × symbols
    normals), overnight gaps (normals, a fifth of the volatility), high / low excursions
    (exponentials, half the volatility), volumes (integers). The close is a geometric random
    walk, ``close_t = close_{t-1} * exp(sigma * z_t)``; the open is the previous close times
    the gap (the start price on the first date); high and low stretch ``max(open, close)`` up
    and ``min(open, close)`` down by the excursions. All prices are rounded to cents *after*
    the walk: rounding is monotone, so ``high >= max(open, close)`` and ``low <= min(open,
    close)`` hold for the rounded values too (and ``low > 0``).

    Returns:
        ``open, high, low, close`` (D, S) float64, ``volume`` (D, S) int64, ``dates`` (D,)
        str ``YYYY-MM-DD`` and ``symbols`` (S,) str ``S0000`` ... (ascending).
    """
    rng = np.random.Generator(np.random.PCG64(seed))
    p0 = rng.uniform(20.0, 200.0, size=symbols)
    sigma = rng.uniform(0.01, 0.025, size=symbols)
    z = rng.standard_normal(size=(days, symbols))
    gap = rng.standard_normal(size=(days, symbols))
    up = rng.exponential(size=(days, symbols))
    down = rng.exponential(size=(days, symbols))
    volume = rng.integers(10_000, 5_000_000, size=(days, symbols), dtype=np.int64)
    close = p0 * np.exp(np.cumsum(sigma * z, axis=0))
    before = np.vstack([p0[None, :], close[:-1]])
    open_ = before * np.exp(0.2 * sigma * gap)
    high = np.maximum(open_, close) * (1.0 + 0.5 * sigma * up)
    low = np.minimum(open_, close) * np.maximum(1.0 - 0.5 * sigma * down, 0.5)
    dates = np.busday_offset(np.datetime64(FIRST_DATE), np.arange(days), roll="forward")
    width = max(4, len(str(symbols - 1)))
    return {
        "open": np.round(open_, 2),
        "high": np.round(high, 2),
        "low": np.round(low, 2),
        "close": np.round(close, 2),
        "volume": volume,
        "dates": dates.astype(str),
        "symbols": np.array([f"S{i:0{width}d}" for i in range(symbols)]),
    }


def write_csv(data: dict[str, np.ndarray], path: Path) -> None:
    """``path``: a header and one row per date and symbol, dates ascending, symbols ascending
    within a date; prices as ``repr`` of the float (exact round trip)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    symbols = data["symbols"].tolist()
    columns = [data[c].tolist() for c in ("open", "high", "low", "close", "volume")]
    with path.open("w", encoding="utf-8") as out:
        out.write("date,open,high,low,close,volume,symbol\n")
        for t, date in enumerate(data["dates"].tolist()):
            o, h, lo, c, v = (col[t] for col in columns)
            out.write(
                "".join(
                    f"{date},{o[s]!r},{h[s]!r},{lo[s]!r},{c[s]!r},{v[s]},{sym}\n"
                    for s, sym in enumerate(symbols)
                )
            )


# --- the independent reference -------------------------------------------------------------------


def wilder_seeded(x: Any, first: int, period: int, alpha: float) -> Any:
    """An exponential average (pandas ``ewm(alpha, adjust=False)``, i.e. ``y_t = (1 - alpha)
    * y_{t-1} + alpha * x_t``) of the columns of DataFrame ``x`` that starts at row ``first +
    period - 1`` from the simple mean of rows ``first .. first + period - 1``; NaN before.

    Written apart from the calculation templates: pandas' recursion, in its own arithmetic."""
    seed_row = first + period - 1
    seeded = x.copy()
    seeded.iloc[:seed_row] = np.nan
    seeded.iloc[seed_row] = x.iloc[first : seed_row + 1].mean(axis=0)
    return seeded.ewm(alpha=alpha, adjust=False).mean()


def reference(csv_path: Path) -> dict[str, np.ndarray]:
    """The 4 indicators from the CSV with pandas, for data with a bar per symbol and date.

    Returns:
        ``dates`` (D,) str, ``symbols`` (S,) str, and per stored field (``FIELDS``) a (D, S)
        float64 array, NaN where the indicator is not defined.
    """
    import pandas as pd

    frame = pd.read_csv(csv_path, dtype={"symbol": str, "date": str})
    wide = {
        c: frame.pivot(index="date", columns="symbol", values=c).sort_index().sort_index(axis=1)
        for c in ("high", "low", "close")
    }
    close, high, low = wide["close"], wide["high"], wide["low"]
    days = len(close)
    out: dict[str, np.ndarray] = {
        "dates": np.array(close.index, dtype=str),
        "symbols": np.array(close.columns, dtype=str),
        "sma": close.rolling(20).mean().to_numpy(),
    }
    # EMA(20): alpha 2 / 21, seeded with the SMA of the first 20 closes
    out["ema"] = wilder_seeded(close, 0, 20, 2.0 / 21.0).to_numpy() if days >= 20 else None
    # RSI(14): Wilder averages of the gains and losses of changes 1..; seeds at row 14
    change = close.diff()
    gain, loss = change.clip(lower=0.0), (-change).clip(lower=0.0)
    if days >= 15:
        avg_gain = wilder_seeded(gain, 1, 14, 1.0 / 14.0).to_numpy()
        avg_loss = wilder_seeded(loss, 1, 14, 1.0 / 14.0).to_numpy()
        with np.errstate(divide="ignore", invalid="ignore"):
            rsi = np.where(avg_loss == 0.0, 100.0, 100.0 - 100.0 / (1.0 + avg_gain / avg_loss))
        out["rsi"] = np.where(np.isnan(avg_gain), np.nan, rsi)
        out["avg_gain"], out["avg_loss"] = avg_gain, avg_loss
        # ATR(14): Wilder average of the true ranges 1..
        prev = close.shift(1)
        tr = np.maximum(np.maximum(high - low, (high - prev).abs()), (low - prev).abs())
        out["atr"] = wilder_seeded(tr, 1, 14, 1.0 / 14.0).to_numpy()
    for name in ("ema", "rsi", "avg_gain", "avg_loss", "atr"):
        if out.get(name) is None:
            out[name] = np.full(close.shape, np.nan)
    return out


def reference_only(csv_path: Path, out_path: Path) -> dict[str, Any]:
    """The reference as a process of its own: read, compute, save (``np.savez``)."""
    start = time.perf_counter()
    ref = reference(csv_path)
    computed = time.perf_counter() - start
    np.savez(out_path, **ref)
    return {"compute_s": computed, "dates": len(ref["dates"])}


# --- the project ---------------------------------------------------------------------------------


class Project:
    """The benchmark's work directory: data, calculation package, config, state."""

    def __init__(self, root: Path):
        self.root = root
        self.csv = root / "data" / "prices.csv"
        self.reference = root / "data" / "reference.npz"
        self.package = root / "calcs" / "bench_symbols_calcs"
        self.state = root / "state"
        self.logs = root / "logs"
        self.config = root / "orchestrator.toml"

    def write(self, style: str, workers: int, block_dates: int) -> None:
        """A fresh package (the template verbatim), config and empty state."""
        shutil.rmtree(self.package.parent, ignore_errors=True)
        self.package.mkdir(parents=True)
        (self.package / "__init__.py").write_text('"""Seed 003 benchmark calculations."""\n')
        shutil.copyfile(TEMPLATE, self.package / "indicators.py")
        shutil.rmtree(self.state, ignore_errors=True)
        self.state.mkdir(parents=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        raw_mb = self.csv.stat().st_size / 2**20
        self.config.write_text(
            "\n".join(
                [
                    f'database_url = "sqlite:///{self.state / "orchestrator.db"}"',
                    f'calculations = "{self.package}"',
                    f'system_epoch = "{self.root / "system_epoch.py"}"',
                    f'work_dir = "{self.state / "work"}"',
                    f"columnar = {'true' if style == 'columnar' else 'false'}",
                    f"workers = {workers}",
                    f"block_dates = {block_dates}",
                    # the dataset is read with history windows: hold it in memory
                    f"root_memory_mb = {max(64, int(raw_mb * 2) + 64)}",
                    "",
                    "[root_data.prices]",
                    f'path = "{self.csv}"',
                    'date_column = "date"',
                    'user_column = "symbol"',
                    "",
                ]
            )
        )


# --- timing ----------------------------------------------------------------------------------------


def run_orchestrator(project: Project, label: str, last: str, env: dict[str, str]) -> dict:
    """One timed ``orchestrator run`` process; its output kept in ``logs/``."""
    cmd = [orchestrator_exe(), "--config", str(project.config), "run", "--date", last]
    result = timed(cmd, env, project.root)
    (project.logs / f"{label}.out").write_text(result["stdout"])
    (project.logs / f"{label}.err").write_text(result["stderr"])
    found = SUMMARY.findall(result["stdout"])
    result["completed"] = int(found[-1][0].replace(",", "")) if found else None
    result["failed"] = int(found[-1][1].replace(",", "")) if found else None
    lines = result["stdout"].strip().splitlines()
    result["summary"] = next((x for x in reversed(lines) if x.startswith("Run ")), None)
    result["tail"] = (result["stderr"].strip().splitlines() + lines)[-5:]
    return result


# --- checking stored values ------------------------------------------------------------------------


def sample_dates(days: int, extra: int, seed: int, block: int) -> list[int]:
    """Date indices to check: the warm-up (0..20, where every indicator starts), both sides
    of each block boundary (a historical block starts from the stored state), the last
    date, and ``extra`` more drawn from ``seed``."""
    picked = set(range(min(days, 21)))
    for start in range(block, days, block):
        picked.update((start - 1, start))
    picked.add(days - 1)
    rng = np.random.Generator(np.random.PCG64(seed))
    picked.update(rng.integers(0, days, size=min(extra, days)).tolist())
    return sorted(i for i in picked if 0 <= i < days)


def compare(name: str, got: np.ndarray, want: np.ndarray) -> str | None:
    """None when ``got`` matches ``want`` (NaN exactly where it is NaN, else rtol 1e-12),
    else one line naming the number of mismatches and the first."""
    got_nan, want_nan = np.isnan(got), np.isnan(want)
    with np.errstate(invalid="ignore"):
        close = np.isclose(got, want, rtol=RTOL, atol=0.0)
    bad = (got_nan != want_nan) | (~want_nan & ~got_nan & ~close)
    if not bad.any():
        return None
    i = int(np.flatnonzero(bad)[0])
    return (
        f"{name}: {int(bad.sum())} value(s) differ; first at {i}: stored {got.flat[i]!r}, "
        f"reference {want.flat[i]!r}"
    )


def check_values(
    config: Path, ref: dict[str, np.ndarray], rows: list[int]
) -> tuple[list[str], int, int]:
    """The stored tables of every calculation on the dates ``rows`` (indices into the
    reference's dates) against the reference, every field and symbol.

    Returns:
        (problems, one line each; cells checked; values checked).
    """
    from orchestrator.app import Orchestrator
    from orchestrator.results import decode_tables

    dates = [dt.date.fromisoformat(ref["dates"][i]) for i in rows]
    symbols = ref["symbols"].tolist()
    problems: list[str] = []
    cells = values = 0
    orch = Orchestrator.from_config(config)
    try:
        for calc, fields in FIELDS.items():
            got = {f: np.full((len(rows), len(symbols)), np.nan) for f in fields}
            for lo in range(0, len(dates), 200):  # bounded memory: 200 tables at a time
                part = dates[lo : lo + 200]
                payloads = orch.ledger.shard_payloads_many([(calc, d) for d in part])
                for k, date in enumerate(part, start=lo):
                    if (calc, date) not in payloads:
                        problems.append(f"{calc} {date}: no published result")
                        continue
                    table = decode_tables(payloads[(calc, date)])
                    if table.users != symbols:
                        problems.append(
                            f"{calc} {date}: {len(table.users)} symbols, expected {len(symbols)}"
                        )
                        continue
                    cells += 1
                    for f in fields:
                        column = table.columns.get(f)
                        if column is None:
                            problems.append(f"{calc} {date}: no field {f!r}")
                            continue
                        got[f][k] = column.floats()
            for f in fields:
                values += got[f].size
                problem = compare(f"{calc}.{f}", got[f], ref[f][rows])
                if problem:
                    problems.append(problem)
    finally:
        orch.close()
    return problems, cells, values


def published_cells(config: Path) -> dict[str, int]:
    """Per calculation, the number of cells with a published result hash."""
    from orchestrator.app import Orchestrator

    orch = Orchestrator.from_config(config)
    try:
        hashes = orch.ledger.load_result_hashes(FIELDS)
    finally:
        orch.close()
    return {c: sum(h is not None for h in hashes.get(c, {}).values()) for c in FIELDS}


# --- the benchmark ---------------------------------------------------------------------------------


def _round(x: float | None, digits: int = 3) -> float | None:
    return None if x is None else round(x, digits)


def bench(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    """Everything in ``root``; returns the report (``ok``: all checks passed)."""
    days = round(args.years * TRADING_DAYS)
    if days < 1 or args.symbols < 1:
        raise SystemExit("--symbols and --years must give at least one symbol and one date")
    project = Project(root)
    started = time.perf_counter()
    data = generate(args.symbols, days)
    write_csv(data, project.csv)
    generate_s = time.perf_counter() - started
    last = str(data["dates"][-1])
    env = {k: v for k, v in os.environ.items() if k != "ORCHESTRATOR_DB_URL"}
    project.write(args.style, args.workers, args.block_dates)

    cold = run_orchestrator(project, "cold", last, env)
    noop = run_orchestrator(project, "noop", last, env)

    ref_cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--reference-only",
        "--csv",
        str(project.csv),
        "--out",
        str(project.reference),
    ]
    ref_run = timed(ref_cmd, env, root)
    ref_out = json.loads(ref_run["stdout"]) if ref_run["exit_code"] == 0 else {}

    problems: list[str] = []
    expected = len(FIELDS) * days
    if cold["exit_code"] != 0:
        problems.append(f"cold run exit {cold['exit_code']}: {' | '.join(cold['tail'])}")
    if noop["exit_code"] != 0:
        problems.append(f"no-op run exit {noop['exit_code']}: {' | '.join(noop['tail'])}")
    if cold["completed"] != expected:
        problems.append(f"cold run completed {cold['completed']} cells, expected {expected}")
    if noop["completed"] != 0:
        problems.append(f"no-op run completed {noop['completed']} cells, expected 0")
    published = published_cells(project.config)
    for calc, n in published.items():
        if n != days:
            problems.append(f"{calc}: {n} published cells, expected {days}")
    checked_cells = checked_values = 0
    if ref_run["exit_code"] != 0:
        problems.append("the reference process failed: " + ref_run["stderr"].strip()[-300:])
        value_problems = ["no reference"]
    else:
        with np.load(project.reference) as npz:
            ref = {k: npz[k] for k in npz.files}
        if ref["symbols"].tolist() != data["symbols"].tolist() or len(ref["dates"]) != days:
            value_problems = ["the reference's symbols or dates differ from the generated ones"]
        else:
            rows = (
                list(range(days))
                if args.check_all
                else sample_dates(days, args.sample_dates, SEED + 1, args.block_dates)
            )
            value_problems, checked_cells, checked_values = check_values(project.config, ref, rows)
    reference_s = ref_run["wall_s"]
    report = {
        "benchmark": "seed-003",
        "style": args.style,
        "symbols": args.symbols,
        "years": args.years,
        "dates": days,
        "workers": args.workers,
        "block_dates": args.block_dates,
        "wall_s": round(cold["wall_s"], 3),
        "cpu_s": _round(cold["cpu_s"]),
        "peak_rss_mb": round(cold["peak_rss_mb"], 1),
        "peak_tree_rss_mb": round(cold["peak_tree_rss_mb"], 1),
        "cells": cold["completed"],
        "expected_cells": expected,
        "noop_s": round(noop["wall_s"], 3),
        "noop_cells": noop["completed"],
        "noop_peak_rss_mb": round(noop["peak_rss_mb"], 1),
        "reference_s": round(reference_s, 3),
        "reference_cpu_s": _round(ref_run["cpu_s"]),
        "reference_compute_s": round(ref_out.get("compute_s", float("nan")), 3),
        "reference_peak_rss_mb": round(ref_run["peak_rss_mb"], 1),
        "ratio": round(cold["wall_s"] / reference_s, 2) if reference_s > 0 else None,
        "values_ok": not value_problems,
        "checked": {
            "all_dates": bool(args.check_all),
            "cells": checked_cells,
            "values": checked_values,
        },
        "value_problems": value_problems[:10],
        "problems": problems[:10],
        "exit_codes": [cold["exit_code"], noop["exit_code"]],
        "summary": cold["summary"],
        "target_s": TARGET_S,
        "under_target": cold["wall_s"] < TARGET_S,
        "cpus": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "generate_s": round(generate_s, 3),
        "csv_mb": round(project.csv.stat().st_size / 2**20, 1),
    }
    report["ok"] = report["values_ok"] and not problems
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--symbols", type=int, default=2500)
    parser.add_argument("--years", type=float, default=5.0, help="252 weekdays a year")
    parser.add_argument("--style", choices=STYLES, default="columnar")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--block-dates", type=int, default=BLOCK_DATES)
    parser.add_argument("--check-all", action="store_true", help="check every stored value")
    parser.add_argument("--sample-dates", type=int, default=40, help="random dates to check")
    parser.add_argument("--json", action="store_true", help="print the JSON object only")
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it")
    parser.add_argument("--reference-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--csv", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.reference_only:
        if args.csv is None or args.out is None:
            parser.error("--reference-only needs --csv FILE and --out FILE.npz")
        print(json.dumps(reference_only(args.csv, args.out)))
        return 0

    if args.keep is not None:
        root = args.keep.resolve()
        root.mkdir(parents=True, exist_ok=True)
        report = bench(args, root)
    else:
        with tempfile.TemporaryDirectory(prefix="bench_symbols_") as tmp:
            report = bench(args, Path(tmp))
    if not args.json:
        print(
            f"{report['style']} {report['symbols']} symbols x {report['dates']} dates: "
            f"cold {report['wall_s']:.2f}s ({report['peak_rss_mb']:.0f} MiB), "
            f"no-op {report['noop_s']:.2f}s, reference {report['reference_s']:.2f}s "
            f"(x{report['ratio']}), cells {report['cells']}/{report['expected_cells']}, "
            f"values {'ok' if report['values_ok'] else 'MISMATCH'}",
            file=sys.stderr,
        )
        for line in report["problems"] + report["value_problems"]:
            print(f"  {line}", file=sys.stderr)
    print(json.dumps(report))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
