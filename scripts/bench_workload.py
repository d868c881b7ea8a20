#!/usr/bin/env python
"""The WORKLOAD.md side-by-side benchmark, run on our orchestrator.

Implements ``/work/shared/benchmarks/WORKLOAD.md``: the same input (its generator, in its RNG
order), the same 8 calculations × D dates, the same scenarios and the same counting, so the
figures compare with the peers' (redun, Dagster).

What one invocation does, in a work directory (a temporary one, or ``--keep DIR``):

1. generates the input (``generate``) and writes it as a CSV root dataset ``data/prices.csv``
   (columns ``date, close, volume, symbol``; the user column is ``symbol``) and as
   ``data/prices.npz`` for the reference;
2. times the independent NumPy reference as a whole process
   (``bench_workload.py --reference-only --input data/prices.npz``) and checks its checksums
   against WORKLOAD.md's table for the small and large sizes;
3. writes the calculation package of the chosen ``--style`` (the template
   ``scripts/workload/columnar.py`` or ``per_user.py``, copied verbatim) and the config;
4. runs each scenario as one whole ``orchestrator --config ... run --date LAST`` process,
   timed from outside (``/usr/bin/time -v``: wall clock and maximum RSS; without it
   ``time.perf_counter`` and psutil polling of the process tree):

   ==  ==================================  ========================================
   A   empty state                         cold backfill of every cell
   B0  right after A, same state           no-op
   B   baseline (state after A + B0)       no-op
   C   baseline                            rsi_14's ``period`` 14 -> 15
   D   baseline                            comments and a blank line around it
   E   baseline                            returns' division rewritten with NumPy ufuncs
   R   baseline, then C's edit (untimed)   C reverted: every cell re-pointed (REUSED)
   ==  ==================================  ========================================

   Scenarios B-E start from a restored copy of the baseline, so repetitions are independent;
   each repetition of A starts from nothing and B0 follows it;
5. counts the re-executed cells (lines ``calc,date`` that the calculation bodies append to
   ``$PEERS_EXEC_LOG``) against the ideal counts, and checks every stored value of every cell
   against the reference (rtol 1e-12, NaN exactly where the reference has NaN; scenario C
   against a reference with period 15).

Output: one JSON object per line with ``--json`` — first ``{"scenario": "reference", ...}``,
then one per scenario with ``scenario, style, wall_s`` (median over ``--reps``),
``wall_min, wall_max, peak_rss_mb, cells, ideal_cells, values_ok, reference_s, ratio``
(``wall_s / reference_s``) and details. Exit code 1 when a run failed, a cell count differs
from the ideal, a value differs, or the reference's checksums differ from WORKLOAD.md's.

Usage:
    .venv/bin/python scripts/bench_workload.py --symbols 100 --days 250 --style columnar \\
        --scenarios A,B0,B,C,D,E [--reps 3] [--json] [--keep DIR]
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_run import orchestrator_exe, timed

HERE = Path(__file__).resolve().parent
TEMPLATES = {
    "columnar": HERE / "workload" / "columnar.py",
    "per-user": HERE / "workload" / "per_user.py",
}
SCENARIOS = ("A", "B0", "B", "C", "D", "E", "R")
# Options added to every timed ``orchestrator run`` (--executor, --workers), set by ``main``.
RUN_OPTIONS: list[str] = []
CALCS = (
    "returns",
    "volatility_20",
    "rsi_14",
    "drawdown",
    "breadth",
    "xs_rank",
    "risk_score",
    "market_summary",
)
# The stored field of each standard calculation that holds WORKLOAD.md's value.
STANDARD_FIELDS = {
    "returns": "r",
    "volatility_20": "vol",
    "rsi_14": "rsi",
    "drawdown": "dd",
    "xs_rank": "rank",
    "risk_score": "risk",
}
RTOL = 1e-12
PERIOD = 14
SEED = 20261123

# WORKLOAD.md §2's checksums: (sum of finite values, number of finite values) per size.
CHECKSUMS: dict[tuple[int, int], dict[str, tuple[float, int]]] = {
    (100, 250): {
        "returns": (10.54857283, 24_900),
        "volatility_20": (496.7434723, 24_800),
        "rsi_14": (1197772.826, 23_600),
        "drawdown": (-3194.620787, 25_000),
        "breadth": (126.1, 249),
        "xs_rank": (12450.0, 24_900),
        "risk_score": (11864.26793, 23_600),
        "market_summary": (118.6426793, 236),
    },
    (2000, 250): {
        "returns": (267.8594682, 498_000),
        "volatility_20": (9652.168734, 496_000),
        "rsi_14": (24120381.82, 472_000),
        "drawdown": (-59734.19828, 500_000),
        "breadth": (126.1405, 249),
        "xs_rank": (249000.0, 498_000),
        "risk_score": (233122.8823, 472_000),
        "market_summary": (116.5614411, 236),
    },
}
# The checksums are printed with 10 significant digits.
CHECKSUM_RTOL = 1e-9

SUMMARY = re.compile(r"^Run \w+ finished .*$", re.MULTILINE)


# --- input ---------------------------------------------------------------------------------


def generate(symbols: int, days: int) -> dict[str, np.ndarray]:
    """WORKLOAD.md §1's input, drawn in exactly its order from ``default_rng(20261123)``.

    Returns:
        ``close`` (D, S) float64 (a geometric random walk rounded to cents), ``volume``
        (D, S) int64, ``dates`` (D,) str ``YYYY-MM-DD`` (weekdays from 2024-01-01) and
        ``symbols`` (S,) str ``SYM0000`` ...
    """
    rng = np.random.default_rng(SEED)
    p0 = rng.uniform(20.0, 200.0, size=symbols)
    sigma = rng.uniform(0.01, 0.03, size=symbols)
    z = rng.standard_normal(size=(days, symbols))
    close = np.round(p0 * np.exp(np.cumsum(0.0003 + sigma * z, axis=0)), 2)
    volume = rng.integers(100_000, 5_000_000, size=(days, symbols), dtype=np.int64)
    dates = np.busday_offset(np.datetime64("2024-01-01"), np.arange(days), roll="forward")
    return {
        "close": close,
        "volume": volume,
        "dates": dates.astype(str),
        "symbols": np.array([f"SYM{i:04d}" for i in range(symbols)]),
    }


def write_input(data: dict[str, np.ndarray], folder: Path) -> tuple[Path, Path]:
    """``prices.csv`` (one row per date and symbol, dates ascending) and ``prices.npz``.

    Closes are written with ``repr`` of the float, so parsing gives back the exact value."""
    folder.mkdir(parents=True, exist_ok=True)
    csv_path, npz_path = folder / "prices.csv", folder / "prices.npz"
    symbols = data["symbols"].tolist()
    with csv_path.open("w", encoding="utf-8") as out:
        out.write("date,close,volume,symbol\n")
        for date, closes, volumes in zip(
            data["dates"].tolist(), data["close"].tolist(), data["volume"].tolist(), strict=True
        ):
            out.write(
                "".join(
                    f"{date},{c!r},{v},{s}\n"
                    for c, v, s in zip(closes, volumes, symbols, strict=True)
                )
            )
    np.savez(
        npz_path,
        close=data["close"],
        volume=data["volume"],
        dates=data["dates"],
        symbols=data["symbols"],
    )
    return csv_path, npz_path


# --- the independent reference ---------------------------------------------------------------


def reference(close: np.ndarray, period: int = PERIOD) -> dict[str, Any]:
    """WORKLOAD.md §2 computed directly with NumPy, date by date where a rule is per date.

    Written apart from both calculation forms (no shared code): rolling windows are slices of
    the whole (D, S) matrix, the rank is a tie-group count from ``np.unique``.

    Args:
        close: (D, S) float64 closes.
        period: the RSI period (14; scenario C's edit makes it 15).

    Returns:
        calc -> (D, S) float64 for the standard calculations (NaN: not defined);
        ``breadth`` -> (D,); ``market_summary`` -> {"mean_risk": (D,), "breadth": (D,),
        "n_valid": (D,) int}.
    """
    days, symbols = close.shape
    returns = np.full((days, symbols), np.nan)
    returns[1:] = close[1:] / close[:-1] - 1.0

    vol = np.full((days, symbols), np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        for t in range(days):
            window = returns[max(0, t - 19) : t + 1]
            n = np.isfinite(window).sum(axis=0)
            if (n >= 2).any():
                dev = window - np.nanmean(window, axis=0)
                var = np.nansum(dev * dev, axis=0) / (n - 1)
                vol[t] = np.where(n >= 2, np.sqrt(var), np.nan)

    rsi = np.full((days, symbols), np.nan)
    for t in range(period, days):
        d = np.diff(close[t - period : t + 1], axis=0)
        gain = np.mean(np.maximum(d, 0.0), axis=0)
        loss = np.mean(np.maximum(-d, 0.0), axis=0)
        with np.errstate(invalid="ignore", divide="ignore"):
            value = 100.0 - 100.0 / (1.0 + gain / loss)
        rsi[t] = np.where(loss == 0.0, np.where(gain == 0.0, 50.0, 100.0), value)

    drawdown = close / np.maximum.accumulate(close, axis=0) - 1.0

    breadth = np.full(days, np.nan)
    rank = np.full((days, symbols), np.nan)
    for t in range(days):
        finite = np.isfinite(returns[t])
        values = returns[t][finite]
        n = values.size
        if n == 0:
            continue
        breadth[t] = np.count_nonzero(values > 0.0) / n
        if n == 1:
            rank[t, finite] = 0.5
            continue
        _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
        below = np.cumsum(counts) - counts  # values strictly smaller than each group's
        average = below + (counts + 1) / 2.0  # mean of the 1-based ranks below+1 .. below+count
        rank[t, finite] = (average[inverse] - 1.0) / (n - 1)

    risk = math.sqrt(252.0) * vol + np.abs(rsi - 50.0) / 100.0 + 0.1 * (1.0 - rank)
    finite_risk = np.isfinite(risk)
    n_valid = finite_risk.sum(axis=1)
    mean_risk = np.full(days, np.nan)
    for t in range(days):
        if n_valid[t]:
            mean_risk[t] = np.mean(risk[t][finite_risk[t]])
    return {
        "returns": returns,
        "volatility_20": vol,
        "rsi_14": rsi,
        "drawdown": drawdown,
        "breadth": breadth,
        "xs_rank": rank,
        "risk_score": risk,
        "market_summary": {"mean_risk": mean_risk, "breadth": breadth, "n_valid": n_valid},
    }


def checksums(ref: dict[str, Any]) -> dict[str, tuple[float, int]]:
    """WORKLOAD.md's checksums of a reference: per calculation the sum and the count of its
    finite values (``market_summary``: of ``mean_risk``)."""
    out = {}
    for calc in CALCS:
        values = ref[calc]["mean_risk"] if calc == "market_summary" else ref[calc]
        finite = values[np.isfinite(values)]
        out[calc] = (float(finite.sum()), int(finite.size))
    return out


def checksum_problems(symbols: int, days: int, sums: dict[str, tuple[float, int]]) -> list[str]:
    """Differences from WORKLOAD.md's checksum table (empty for sizes it does not list)."""
    expected = CHECKSUMS.get((symbols, days))
    if expected is None:
        return []
    out = []
    for calc, (want_sum, want_n) in expected.items():
        got_sum, got_n = sums[calc]
        if got_n != want_n or not math.isclose(got_sum, want_sum, rel_tol=CHECKSUM_RTOL):
            out.append(
                f"{calc}: sum {got_sum:.10g} ({got_n} finite), WORKLOAD.md: "
                f"{want_sum:.10g} ({want_n})"
            )
    return out


def reference_only(npz: Path) -> dict[str, Any]:
    """The reference run as a process of its own: read the input, compute, checksum."""
    with np.load(npz) as data:
        close = data["close"]
    start = time.perf_counter()
    sums = checksums(reference(close))
    return {
        "compute_s": time.perf_counter() - start,
        "checksums": {k: {"sum": s, "finite": n} for k, (s, n) in sums.items()},
    }


# --- scenario edits ----------------------------------------------------------------------------


def replace_line(text: str, line: str, new_lines: list[str]) -> str:
    """Replace the one line of ``text`` that reads exactly ``line`` (after its indentation)
    by ``new_lines``, each indented like it (an empty string stays an empty line).

    Raises:
        ValueError: no line or more than one line reads ``line``.
    """
    pattern = re.compile(rf"^([ \t]*){re.escape(line)}$", re.MULTILINE)
    found = pattern.findall(text)
    if len(found) != 1:
        raise ValueError(f"the line {line!r} must occur exactly once, found {len(found)}")

    def indent(match: re.Match[str]) -> str:
        pad = match.group(1)
        return "\n".join(pad + new if new else "" for new in new_lines)

    return pattern.sub(indent, text, count=1)


def edited(text: str, scenario: str) -> str:
    """A template's source with WORKLOAD.md §3's code edit of ``scenario`` applied."""
    if scenario == "C":
        return replace_line(text, "period = 14", ["period = 15"])
    if scenario == "D":
        return replace_line(
            text,
            "period = 14",
            [
                "# The look-back of the index, in dates (Wilder's choice).",
                "",
                "period = 14  # dates",
            ],
        )
    if scenario == "E":
        return replace_line(
            text,
            "out = cur / prev - 1.0",
            ["ratio = np.true_divide(cur, prev)", "out = np.subtract(ratio, 1.0)"],
        )
    return text


def ideal_cells(scenario: str, days: int, period: int = PERIOD) -> int:
    """WORKLOAD.md §3's ideal number of re-executed cells (with per-cell early cutoff)."""
    changed = max(0, days - period)  # rsi_14 changes on t >= 14 (NaN under period 15 at t=14)
    ideal = {"A": 8 * days, "B0": 0, "B": 0, "C": days + 2 * changed, "D": 0, "E": days}
    return {**ideal, "R": 0}[scenario]  # R: C's edit reverted, every result retained


# --- the project ---------------------------------------------------------------------------------


class Project:
    """The benchmark's work directory: input, calculation package, config, state."""

    def __init__(self, root: Path, style: str):
        self.root = root
        self.style = style
        self.package = root / "calcs" / f"bench_{style.replace('-', '_')}"
        self.state = root / "state"
        self.baseline = root / "baseline"
        self.logs = root / "logs"
        self.config = root / "orchestrator.toml"

    def write_config(self, csv_path: Path) -> None:
        self.config.write_text(
            "\n".join(
                [
                    f'database_url = "sqlite:///{self.state / "orchestrator.db"}"',
                    f'calculations = "{self.package}"',
                    f'system_epoch = "{self.root / "system_epoch.py"}"',
                    f'work_dir = "{self.state / "work"}"',
                    f"columnar = {'true' if self.style == 'columnar' else 'false'}",
                    "",
                    "[root_data.prices]",
                    f'path = "{csv_path}"',
                    'date_column = "date"',
                    'user_column = "symbol"',
                    "",
                ]
            )
        )

    def write_package(self, scenario: str) -> None:
        """A fresh package (no stale ``__pycache__``: C's edit keeps the file's size)."""
        shutil.rmtree(self.package.parent, ignore_errors=True)
        self.package.mkdir(parents=True)
        (self.package / "__init__.py").write_text('"""WORKLOAD.md benchmark calculations."""\n')
        text = TEMPLATES[self.style].read_text()
        (self.package / "workload.py").write_text(edited(text, scenario))

    def reset_state(self) -> None:
        shutil.rmtree(self.state, ignore_errors=True)
        self.state.mkdir(parents=True)

    def save_baseline(self) -> None:
        shutil.rmtree(self.baseline, ignore_errors=True)
        shutil.copytree(self.state, self.baseline)

    def restore_baseline(self) -> None:
        shutil.rmtree(self.state, ignore_errors=True)
        shutil.copytree(self.baseline, self.state)


# --- timing ---------------------------------------------------------------------------------------


def compare(name: str, got: np.ndarray, want: np.ndarray) -> str | None:
    """None when ``got`` matches ``want`` (NaN exactly where it is NaN, else rtol 1e-12), else
    one line naming the first mismatch."""
    got_nan, want_nan = np.isnan(got), np.isnan(want)
    close = np.isclose(got, want, rtol=RTOL, atol=0.0)
    bad = (got_nan != want_nan) | (~want_nan & ~got_nan & ~close)
    if not bad.any():
        return None
    i = int(np.flatnonzero(bad)[0])
    return f"{name}: {int(bad.sum())} value(s) differ; first at {i}: stored {got.flat[i]!r}, reference {want.flat[i]!r}"


def check_values(config: Path, data: dict[str, np.ndarray], ref: dict[str, Any]) -> list[str]:
    """Every stored value of every cell against the reference: one line per problem.

    Standard cells are read as their stored column tables (``Ledger.shard_payloads_many`` +
    ``results.decode_tables``: the published shards, without a dict per user), meta cells
    through ``Orchestrator.load_result``. Each standard cell must hold every symbol.
    """
    import datetime as dt

    from orchestrator.app import Orchestrator
    from orchestrator.results import decode_tables

    dates = [dt.date.fromisoformat(d) for d in data["dates"].tolist()]
    symbols = data["symbols"].tolist()
    problems: list[str] = []
    orch = Orchestrator.from_config(config)
    try:
        for calc, field in STANDARD_FIELDS.items():
            payloads = orch.ledger.shard_payloads_many([(calc, d) for d in dates])
            got = np.full(ref[calc].shape, np.nan)
            for t, date in enumerate(dates):
                if (calc, date) not in payloads:
                    problems.append(f"{calc} {date}: no published result")
                    continue
                table = decode_tables(payloads[(calc, date)])
                if table.users != symbols:
                    problems.append(
                        f"{calc} {date}: users {len(table.users)}, expected {len(symbols)}"
                    )
                    continue
                column = table.columns.get(field)
                if column is None:
                    problems.append(f"{calc} {date}: no field {field!r}")
                    continue
                got[t] = column.floats()
            problem = compare(calc, got, ref[calc])
            if problem:
                problems.append(problem)
        for calc, fields in (
            ("breadth", ("breadth",)),
            ("market_summary", ("mean_risk", "breadth", "n_valid")),
        ):
            columns = {f: np.full(len(dates), np.nan) for f in fields}
            for t, date in enumerate(dates):
                result = orch.load_result(calc, date)
                if result is None:
                    problems.append(f"{calc} {date}: no published result")
                    continue
                for f in fields:
                    value = result.get(f)
                    columns[f][t] = np.nan if value is None else float(value)
            for f in fields:
                want = ref[calc] if calc == "breadth" else ref[calc][f]
                problem = compare(f"{calc}.{f}", columns[f], np.asarray(want, dtype=np.float64))
                if problem:
                    problems.append(problem)
    finally:
        orch.close()
    return problems


# --- scenarios ------------------------------------------------------------------------------------


def count_cells(log: Path) -> tuple[int, dict[str, int], int]:
    """Cells of an exec log (distinct lines), per calculation, and how many lines repeat an
    earlier one: a cell computed twice in one process, or — expected — once per user range
    when an executor splits a block's users over several processes."""
    lines = log.read_text().splitlines() if log.exists() else []
    cells = sorted(set(lines))
    by_calc = collections.Counter(line.split(",", 1)[0] for line in cells)
    return len(cells), dict(sorted(by_calc.items())), len(lines) - len(cells)


def run_scenario(
    project: Project, scenario: str, rep: int, last_date: str, env: dict[str, str]
) -> dict[str, Any]:
    """One ``orchestrator run`` process, its exec log counted."""
    project.logs.mkdir(parents=True, exist_ok=True)
    log = project.logs / f"exec-{scenario}-{rep}.log"
    log.unlink(missing_ok=True)
    run_env = dict(env, PEERS_EXEC_LOG=str(log))
    cmd = [orchestrator_exe(), "--config", str(project.config), "run", "--date", last_date]
    cmd += RUN_OPTIONS
    result = timed(cmd, run_env, project.root)
    (project.logs / f"run-{scenario}-{rep}.out").write_text(result["stdout"])
    (project.logs / f"run-{scenario}-{rep}.err").write_text(result["stderr"])
    cells, by_calc, repeated = count_cells(log)
    summary = SUMMARY.findall(result["stdout"])
    return {
        "wall_s": result["wall_s"],
        "peak_rss_mb": result["peak_rss_mb"],
        "exit_code": result["exit_code"],
        "cells": cells,
        "cells_by_calc": by_calc,
        "repeated_lines": repeated,
        "summary": summary[-1] if summary else None,
        "stderr_tail": result["stderr"].strip().splitlines()[-5:] if result["exit_code"] else [],
    }


def _splits(args: argparse.Namespace) -> bool:
    """Whether the runs may split a block's users over several processes."""
    return args.executor == "dask" or (args.workers or 1) > 1


def report(
    scenario: str,
    style: str,
    args: argparse.Namespace,
    runs: list[dict[str, Any]],
    problems: list[list[str]],
    reference_s: float,
) -> dict[str, Any]:
    """The JSON object of one scenario over its repetitions."""
    walls = [r["wall_s"] for r in runs]
    rss = [r["peak_rss_mb"] for r in runs if r["peak_rss_mb"] is not None]
    cells = [r["cells"] for r in runs]
    ideal = ideal_cells(scenario, args.days)
    wall = statistics.median(walls)
    values_ok = not any(problems)
    return {
        "scenario": scenario,
        "style": style,
        "executor": " ".join(RUN_OPTIONS) or "default",
        "symbols": args.symbols,
        "days": args.days,
        "reps": len(runs),
        "wall_s": round(wall, 3),
        "wall_min": round(min(walls), 3),
        "wall_max": round(max(walls), 3),
        "walls": [round(w, 3) for w in walls],
        "peak_rss_mb": round(statistics.median(rss), 1) if rss else None,
        "peak_rss_mb_max": round(max(rss), 1) if rss else None,
        "cells": cells[0] if len(set(cells)) == 1 else cells,
        "ideal_cells": ideal,
        # (a block's users split over processes log its cells once per user range)
        "cells_ok": all(c == ideal for c in cells)
        and (_splits(args) or not any(r["repeated_lines"] for r in runs)),
        "cells_by_calc": runs[0]["cells_by_calc"],
        "values_ok": values_ok,
        "value_problems": [p for ps in problems for p in ps][:10],
        "exit_codes": [r["exit_code"] for r in runs],
        "summary": runs[-1]["summary"],
        "stderr_tail": next((r["stderr_tail"] for r in runs if r["stderr_tail"]), []),
        "reference_s": round(reference_s, 3),
        "ratio": round(wall / reference_s, 2) if reference_s > 0 else None,
    }


def bench(args: argparse.Namespace, root: Path, emit: Any) -> bool:
    """Run everything in ``root``; ``emit`` prints one JSON object. True when all is well."""
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = sorted(set(scenarios) - set(SCENARIOS))
    if unknown:
        raise SystemExit(f"unknown scenario(s) {', '.join(unknown)}; known: {', '.join(SCENARIOS)}")
    data = generate(args.symbols, args.days)
    csv_path, npz_path = write_input(data, root / "data")
    last_date = str(data["dates"][-1])
    env = {k: v for k, v in os.environ.items() if k != "ORCHESTRATOR_DB_URL"}
    ok = True

    # The reference as a whole process, timed the same way as the scenarios.
    ref_runs = []
    for _ in range(args.reps):
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--reference-only",
            "--input",
            str(npz_path),
        ]
        ref_runs.append(timed(cmd, env, root))
    ref_out = json.loads(ref_runs[-1]["stdout"]) if ref_runs[-1]["exit_code"] == 0 else {}
    sums = {k: (v["sum"], v["finite"]) for k, v in ref_out.get("checksums", {}).items()}
    table_problems = (
        checksum_problems(args.symbols, args.days, sums)
        if sums
        else ["the reference process failed"]
    )
    reference_s = statistics.median(r["wall_s"] for r in ref_runs)
    ok &= not table_problems
    emit(
        {
            "scenario": "reference",
            "style": "numpy",
            "symbols": args.symbols,
            "days": args.days,
            "reps": len(ref_runs),
            "wall_s": round(reference_s, 3),
            "wall_min": round(min(r["wall_s"] for r in ref_runs), 3),
            "wall_max": round(max(r["wall_s"] for r in ref_runs), 3),
            "peak_rss_mb": max((r["peak_rss_mb"] or 0.0) for r in ref_runs),
            "compute_s": ref_out.get("compute_s"),
            "checksums": ref_out.get("checksums"),
            "checksums_listed": (args.symbols, args.days) in CHECKSUMS,
            "checksums_ok": not table_problems,
            "checksum_problems": table_problems,
        }
    )
    refs = {PERIOD: reference(data["close"], PERIOD), 15: reference(data["close"], 15)}

    project = Project(root, args.style)
    project.write_config(csv_path)
    results: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    problems: dict[str, list[list[str]]] = collections.defaultdict(list)

    def check(scenario: str) -> None:
        period = 15 if scenario == "C" else PERIOD
        problems[scenario].append(check_values(project.config, data, refs[period]))

    timed_a = "A" in scenarios or "B0" in scenarios
    needs_baseline = any(s in scenarios for s in ("B", "C", "D", "E", "R"))
    if timed_a or needs_baseline:
        for rep in range(args.reps if timed_a else 1):
            project.write_package("A")
            project.reset_state()
            results["A"].append(run_scenario(project, "A", rep, last_date, env))
            if "A" in scenarios:
                check("A")
            results["B0"].append(run_scenario(project, "B0", rep, last_date, env))
            if "B0" in scenarios:
                check("B0")
        project.save_baseline()
    for scenario in scenarios:
        if scenario in ("A", "B0"):
            continue
        for rep in range(args.reps):
            project.restore_baseline()
            if scenario == "R":  # C's edit (untimed), then reverted: the timed run
                project.write_package("C")
                run_scenario(project, "R-C", rep, last_date, env)
                project.write_package("A")
            else:
                project.write_package(scenario)
            results[scenario].append(run_scenario(project, scenario, rep, last_date, env))
            check(scenario)
    for scenario in scenarios:
        line = report(
            scenario, args.style, args, results[scenario], problems[scenario], reference_s
        )
        ok &= line["cells_ok"] and line["values_ok"] and not any(line["exit_codes"])
        emit(line)
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--symbols", type=int, default=100)
    parser.add_argument("--days", type=int, default=250)
    parser.add_argument("--style", choices=sorted(TEMPLATES), default="columnar")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--executor", default=None, help="orchestrator run --executor NAME")
    parser.add_argument("--workers", type=int, default=None, help="orchestrator run --workers N")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="one JSON object per line only")
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it")
    parser.add_argument("--reference-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--input", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    RUN_OPTIONS[:] = [
        *(["--executor", args.executor] if args.executor else []),
        *(["--workers", str(args.workers)] if args.workers else []),
    ]

    if args.reference_only:
        if args.input is None:
            parser.error("--reference-only needs --input FILE.npz")
        print(json.dumps(reference_only(args.input)))
        return 0

    def emit(obj: dict[str, Any]) -> None:
        if args.json:
            print(json.dumps(obj), flush=True)
            return
        if obj["scenario"] == "reference":
            state = (
                "ok" if obj["checksums_ok"] else "MISMATCH " + "; ".join(obj["checksum_problems"])
            )
            print(
                f"reference  {obj['wall_s']:8.2f}s  {obj['peak_rss_mb']:7.0f} MiB  checksums {state}"
            )
            return
        flags = []
        if not obj["cells_ok"]:
            flags.append(
                f"CELLS {obj['cells']} != ideal {obj['ideal_cells']} {obj['cells_by_calc']}"
            )
        if not obj["values_ok"]:
            flags.append("VALUES: " + "; ".join(obj["value_problems"]))
        if any(obj["exit_codes"]):
            flags.append(f"EXIT {obj['exit_codes']}: {' | '.join(obj['stderr_tail'])}")
        print(
            f"{obj['scenario']:<3} {obj['style']:<9} {obj['wall_s']:8.2f}s "
            f"({obj['wall_min']:.2f}-{obj['wall_max']:.2f})  {obj['peak_rss_mb'] or 0:7.0f} MiB  "
            f"cells {obj['cells']}/{obj['ideal_cells']}  x{obj['ratio']} reference  "
            + ("ok" if not flags else "  ".join(flags)),
            flush=True,
        )

    if args.keep is not None:
        root = args.keep.resolve()
        root.mkdir(parents=True, exist_ok=True)
        ok = bench(args, root, emit)
    else:
        with tempfile.TemporaryDirectory(prefix="bench_workload_") as tmp:
            ok = bench(args, Path(tmp), emit)
    if not ok:
        print(
            "bench_workload: MISMATCH (cells, values, exit codes or checksums; see above)",
            file=sys.stderr,
        )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
