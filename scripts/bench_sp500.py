#!/usr/bin/env python
"""The S&P 500 targets of the nightly-run issue as one benchmark, whole processes timed.

On the real file (``/work/shared/data/sp500_daily_ohlcv_2013-02-08_2018-02-07.csv.gz``, or
``--data``; absent: a message and exit 0), per repetition, in a fresh work folder holding a
copy of ``calculations/prices`` (``bench_prices/``), of ``system_epoch.py`` and of
``examples/sp500.toml`` pointed at them, the real data and a ledger in the folder:

============  ==================================================================  ==========
step          what runs                                                           target
============  ==================================================================  ==========
reference     ``scripts/reference_sp500.py``: the 8 indicators in pandas/NumPy,    -
              CSV read and Parquet written, one process
cold          ``orchestrator --config CFG run --date D`` from nothing              <= 4 x ref
noop          the same again (0 cells completed)                                   <= 1 s
bump_rsi_14   ``epoch bump --calc rsi_14 --reason bench``, then ``run``           <= 0.15 x cold
bump_risk     ``epoch bump --calc risk_score`` (5 upstreams read), then ``run``    <= 0.15 x cold
rsi_period    Rsi14 ``period = 14`` -> 15 in the copy, ``run`` (file restored)    -
============  ==================================================================  ==========

and for every engine step, peak memory of the process tree <= 2 x the reference's.

Every command runs under ``/usr/bin/time -v`` (wall clock; largest process's max RSS) while
its process tree is polled with psutil (``bench_run.TreeRss``, every 50 ms: the summed RSS of
the engine and its workers; and every 0.5 s the summed PSS, in which pages the forked workers
share with the parent count once). Cells are the run summary line's ``completed``, per
calculation from ``orchestrator runs --run ID``.

After the first cold run, a sample of cells (``--sample`` random (calc, date, user) cells per
calculation, plus cells right after a gap or a listing) is read from the ledger
(``Orchestrator.load_user_result`` / ``load_result``) and compared field by field with the
reference's Parquet output (floats at rtol 1e-9, atol 1e-12; nulls must match; ints and texts
exactly): the share that agrees is reported, with the first disagreements.

Output: one JSON object per step (``--json``: only those), fields ``step, style, workers,
reps, wall_s`` (median), ``walls``, ``reference_walls`` (the reference of the same
repetition), ``peak_tree_mb`` (median of the RSS sums), ``peak_tree_pss_mb``,
``max_rss_mb``, ``cells``, ``cells_by_calc``, ``ratio`` (the step's target ratio: median over
repetitions of the same-repetition ratio), ``target``, ``target_met``, ``mem_ratio``
(peak_tree_mb / reference's); then ``{"step": "values", ...}``; with ``--profile``, a
cProfile of one extra cold run (``workers = 1``, so every cell runs in the profiled process):
the top 25 functions by tottime.

Usage:
    .venv/bin/python scripts/bench_sp500.py [--reps 3] [--workers N] [--style columnar|per-user]
        [--json] [--profile] [--sample 50] [--data FILE] [--date 2018-02-07] [--keep DIR]
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import math
import pstats
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from collections import Counter
from pathlib import Path
from typing import Any, Self

import numpy as np
import pandas as pd
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_run import (  # a sibling script, not a package
    TIME_RSS,
    TIME_WALL,
    TreeRss,
    orchestrator_exe,
    parse_summary,
)

from orchestrator.memory import tree_pss

ROOT = Path(__file__).resolve().parents[1]
DATA = Path("/work/shared/data/sp500_daily_ohlcv_2013-02-08_2018-02-07.csv.gz")
REFERENCE = ROOT / "scripts" / "reference_sp500.py"
STEPS = ("reference", "cold", "noop", "bump_rsi_14", "bump_risk_score", "rsi_period")
STANDARD = ("daily_return", "volatility_20", "drawdown", "rsi_14", "atr_14", "risk_score")
META = ("xs_rank", "breadth")
RTOL, ATOL = 1e-9, 1e-12
COLD_TARGET, RERUN_TARGET, NOOP_TARGET_S, MEM_TARGET = 4.0, 0.15, 1.0, 2.0
ATTEMPT = re.compile(
    r"^(?P<calc>\w+)\s+(?P<date>\d{4}-\d\d-\d\d) (?P<status>\w+)\s+(?P<reason>\w+)"
)


# --- the project --------------------------------------------------------------------------------


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string is a JSON string
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML form for {value!r}")


def dump_toml(config: dict[str, Any]) -> str:
    """TOML text of a config: top-level scalars, then ``[a.b]`` tables of scalars (the shape
    of the orchestrator's config)."""
    lines = [f"{k} = {_toml_value(v)}" for k, v in config.items() if not isinstance(v, dict)]
    for name, table in config.items():
        if isinstance(table, dict):
            for sub, values in table.items():
                lines.append(f"\n[{name}.{sub}]")
                lines.extend(f"{k} = {_toml_value(v)}" for k, v in values.items())
    return "\n".join(lines) + "\n"


class Project:
    """A work folder: ``bench_prices/`` (a copy of calculations/prices), ``system_epoch.py``,
    ``sp500.toml`` (examples/sp500.toml with absolute paths to them, to ``data`` and to
    ``ledger.db`` here; ``workers`` / ``columnar`` as asked), ``ref/`` for the reference."""

    def __init__(
        self,
        root: Path,
        data: Path,
        date: str,
        workers: int | None,
        style: str,
        executor: str | None = None,
    ):
        self.root, self.date = root, date
        shutil.rmtree(root, ignore_errors=True)  # from nothing, also in a kept folder
        root.mkdir(parents=True)
        self.package = root / "bench_prices"
        shutil.copytree(ROOT / "calculations" / "prices", self.package)
        shutil.copy(ROOT / "system_epoch.py", root / "system_epoch.py")
        config = tomllib.loads((ROOT / "examples" / "sp500.toml").read_text())
        config["database_url"] = f"sqlite:///{root / 'ledger.db'}"
        config["calculations"] = str(self.package)
        config["system_epoch"] = str(root / "system_epoch.py")
        config["columnar"] = style == "columnar"
        if workers is not None:
            config["workers"] = workers
        if executor is not None:
            config["executor"] = executor
        config["root_data"]["prices"]["path"] = str(data)
        self.workers = int(config.get("workers", 1))
        self.config = root / "sp500.toml"
        self.config.write_text(dump_toml(config))
        self.ref = root / "ref"
        self.wilder = self.package / "wilder.py"
        self._wilder_source = self.wilder.read_text()

    def orchestrator(self, *args: str) -> list[str]:
        return [orchestrator_exe(), "--config", str(self.config), *args]

    def set_rsi_period(self, period: int) -> None:
        """Rewrite ``period = 14`` of class Rsi14 in the copy (14: the original file back)."""
        source = self._wilder_source
        if period != 14:
            at = source.index("class Rsi14")
            edited = source[at:].replace("    period = 14\n", f"    period = {period}\n", 1)
            if edited == source[at:]:
                raise RuntimeError("Rsi14 has no 'period = 14' line to edit")
            source = source[:at] + edited
        self.wilder.write_text(source)


# --- timing -------------------------------------------------------------------------------------


class TreePss:
    """Peak summed PSS (``orchestrator.memory.tree_pss``) of a process tree, polled every
    ``interval`` seconds (reading smaps_rollup is dearer than RSS: not too often)."""

    def __init__(self, pid: int, interval: float = 0.5):
        self.pid = pid
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _poll(self) -> None:
        try:
            root = psutil.Process(self.pid)
        except psutil.NoSuchProcess:
            return
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, tree_pss(root))
            except psutil.Error:
                return
            self._stop.wait(self.interval)


def timed(cmd: list[str], cwd: Path) -> dict[str, Any]:
    """Run ``cmd`` to completion as a whole process, measured from outside.

    Returns:
        ``wall_s`` (``/usr/bin/time``'s wall clock, else perf_counter), ``peak_tree_mb`` (peak
        summed RSS of the command's process tree, MiB), ``peak_tree_pss_mb``, ``max_rss_mb``
        (largest process, from ``/usr/bin/time``; None without it), ``exit_code``, ``stdout``,
        ``stderr`` (without the time report).
    """
    timer = Path("/usr/bin/time")
    use_time = timer.exists()
    full = ([str(timer), "-v"] if use_time else []) + cmd
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(full, stdout=out, stderr=err, cwd=cwd)
        with TreeRss(proc.pid, include_root=not use_time) as rss, TreePss(proc.pid) as pss:
            code = proc.wait()
        wall = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    result: dict[str, Any] = {
        "wall_s": wall,
        "peak_tree_mb": rss.peak / 2**20,
        "peak_tree_pss_mb": pss.peak / 2**20,
        "max_rss_mb": None,
        "exit_code": code,
    }
    if use_time:
        report = stderr.rsplit("\tCommand being timed", 1)
        stderr = re.sub(r"Command exited with non-zero status \d+\s*$", "", report[0]).rstrip()
        if m := TIME_WALL.search(report[-1]):
            h, mnt, s = m.groups()
            result["wall_s"] = int(h or 0) * 3600 + int(mnt) * 60 + float(s)
        if m := TIME_RSS.search(report[-1]):
            result["max_rss_mb"] = int(m.group(1)) / 1024
    result["stdout"], result["stderr"] = stdout, stderr
    return result


def attempts_by_calc(project: Project, run_id: str) -> dict[str, int]:
    """Cells completed by run ``run_id``, per calculation (``orchestrator runs --run``)."""
    done = subprocess.run(
        project.orchestrator("runs", "--run", run_id),
        capture_output=True,
        text=True,
        cwd=project.root,
        check=True,
    )
    counts: Counter[str] = Counter()
    for line in done.stdout.splitlines():
        m = ATTEMPT.match(line)
        if m and m["status"] == "COMPLETED":
            counts[m["calc"]] += 1
    return dict(sorted(counts.items()))


def run_step(project: Project, step: str) -> dict[str, Any]:
    """One engine step: its preparation (not timed), then one timed ``run`` process."""
    if step == "bump_rsi_14":
        subprocess.run(
            project.orchestrator("epoch", "bump", "--calc", "rsi_14", "--reason", "bench"),
            cwd=project.root,
            check=True,
            capture_output=True,
        )
    elif step == "bump_risk_score":
        subprocess.run(
            project.orchestrator("epoch", "bump", "--calc", "risk_score", "--reason", "bench"),
            cwd=project.root,
            check=True,
            capture_output=True,
        )
    elif step == "rsi_period":
        project.set_rsi_period(15)
    try:
        result = timed(project.orchestrator("run", "--date", project.date), project.root)
    finally:
        if step == "rsi_period":
            project.set_rsi_period(14)
    summary = parse_summary(result["stdout"])
    result["summary"] = summary
    result["cells"] = summary["completed"] if summary else None
    result["cells_by_calc"] = (
        attempts_by_calc(project, summary["run"]) if summary and summary["completed"] else {}
    )
    return result


def run_reference(project: Project, data: Path, rsi_period: int = 14) -> dict[str, Any]:
    cmd = [sys.executable, str(REFERENCE), "--input", str(data), "--out", str(project.ref)]
    if rsi_period != 14:
        cmd += ["--rsi-period", str(rsi_period)]
    result = timed(cmd, project.root)
    lines = result["stdout"].strip().splitlines()
    result["phases"] = json.loads(lines[-1]) if result["exit_code"] == 0 and lines else None
    result["cells"] = None
    return result


# --- checking stored values against the reference -----------------------------------------------


def _null(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v)) or v is pd.NA


def agree(got: Any, want: Any) -> bool:
    """One field: nulls on both sides (None / NaN), equal texts and ints, or floats within
    rtol 1e-9 (atol 1e-12, for values that are 0 up to rounding)."""
    if _null(got) or _null(want):
        return _null(got) and _null(want)
    if isinstance(got, str) or isinstance(want, str):
        return str(got) == str(want)
    if isinstance(got, bool) or isinstance(want, bool):
        return bool(got) == bool(want)
    if isinstance(got, int) and isinstance(want, int | np.integer):
        return got == int(want)
    return math.isclose(float(got), float(want), rel_tol=RTOL, abs_tol=ATOL)


def compare_cell(got: Any, want: dict[str, Any]) -> list[str]:
    """The fields where a stored result ``got`` (a dict, or None: no result) differs from the
    reference's row ``want`` (field -> value); the stored result's extra fields count too."""
    if got is None:
        return ["<no stored result>"]
    if not isinstance(got, dict):
        return [f"<stored {type(got).__name__}>"]
    bad = [f for f, v in want.items() if not agree(got.get(f), v)]
    bad += [f"+{f}" for f in got if f not in want]
    return bad


def _edge_rows(table: pd.DataFrame, span: int = 20) -> np.ndarray:
    """Row numbers of ``table`` (``date``, ``Name`` categoricals) within ``span`` rows of an
    instrument's start after a gap or a late listing: where the indicators re-seed."""
    pos = table["date"].cat.codes.to_numpy().astype(np.int64)
    uid = table["Name"].cat.codes.to_numpy().astype(np.int64)
    order = np.lexsort((pos, uid))
    p, u = pos[order], uid[order]
    start = np.ones(len(p), dtype=bool)
    start[1:] = (u[1:] != u[:-1]) | (p[1:] != p[:-1] + 1)
    start &= p > 0  # the file's first date is everyone's start: not an edge
    run = np.cumsum(np.r_[True, (u[1:] != u[:-1]) | (p[1:] != p[:-1] + 1)])
    first = pd.Series(np.arange(len(p))).groupby(run).transform("min").to_numpy()
    near = (np.arange(len(p)) - first < span) & start[first]
    return np.sort(order[near])


def check_values(
    project: Project, sample: int, seed: int = 20180207, rtol: float = RTOL
) -> dict[str, Any]:
    """Stored values of sampled cells vs the reference's Parquet tables in ``project.ref``.

    Samples ``sample`` random rows of each reference table (standard calculations: (date,
    user) cells; ``xs_rank``: (date, user) ranks, with the date's ``n``; ``breadth``: dates)
    plus ``sample // 4`` rows of each standard table near a re-seed (``_edge_rows``).

    Returns:
        ``{"checked", "agree", "share", "by_calc": {calc: [agree, checked]}, "edge": [agree,
        checked], "disagreements": [first 12, with fields and both values]}``.
    """
    sys.path.insert(0, str(REFERENCE.parent))
    from reference_sp500 import read

    from orchestrator.app import Orchestrator

    tables = read(project.ref)
    rng = np.random.default_rng(seed)
    by_calc: dict[str, list[int]] = {}
    edge = [0, 0]
    problems: list[dict[str, Any]] = []
    orch = Orchestrator.from_config(project.config)

    def record(
        calc: str, date: str, user: str | None, bad: list[str], got: Any, want: Any, is_edge: bool
    ) -> None:
        tally = by_calc.setdefault(calc, [0, 0])
        tally[1] += 1
        tally[0] += not bad
        if is_edge:
            edge[1] += 1
            edge[0] += not bad
        if bad and len(problems) < 12:
            show = {
                f: [got.get(f) if isinstance(got, dict) else None, want.get(f)]
                for f in bad
                if not f.startswith(("<", "+"))
            }
            problems.append(
                {
                    "calc": calc,
                    "date": date,
                    "user": user,
                    "fields": bad,
                    "stored_vs_reference": show,
                }
            )

    try:
        for calc in STANDARD:
            table = tables[calc]
            picks = [
                (i, False)
                for i in rng.choice(len(table), size=min(sample, len(table)), replace=False)
            ]
            edges = _edge_rows(table)
            if len(edges):
                picks += [
                    (i, True)
                    for i in rng.choice(edges, size=min(sample // 4, len(edges)), replace=False)
                ]
            fields = [c for c in table.columns if c not in ("date", "Name")]
            for i, is_edge in picks:
                row = table.iloc[int(i)]
                date, user = str(row["date"]), str(row["Name"])
                want = {f: _plain(row[f]) for f in fields}
                got = orch.load_user_result(calc, dt.date.fromisoformat(date), user)
                record(calc, date, user, compare_cell(got, want), got, want, is_edge)
        ranks, counts = tables["xs_rank"], tables["xs_rank_n"].set_index("date")["n"]
        cache: dict[str, Any] = {}
        for i in rng.choice(len(ranks), size=min(sample, len(ranks)), replace=False):
            row = ranks.iloc[int(i)]
            date, user = str(row["date"]), str(row["Name"])
            if date not in cache:
                cache[date] = orch.load_result("xs_rank", dt.date.fromisoformat(date))
            stored = cache[date] or {}
            got = {"rank": (stored.get("ranks") or {}).get(user), "n": stored.get("n")}
            want = {"rank": float(row["rank"]), "n": int(counts[row["date"]])}
            record("xs_rank", date, user, compare_cell(got, want), got, want, False)
        breadth = tables["breadth"]
        fields = [c for c in breadth.columns if c != "date"]
        for i in rng.choice(len(breadth), size=min(sample, len(breadth)), replace=False):
            row = breadth.iloc[int(i)]
            date = str(row["date"])
            want = {f: _plain(row[f]) for f in fields}
            got = orch.load_result("breadth", dt.date.fromisoformat(date))
            record("breadth", date, None, compare_cell(got, want), got, want, False)
    finally:
        orch.close()
    checked = sum(t[1] for t in by_calc.values())
    agreed = sum(t[0] for t in by_calc.values())
    return {
        "checked": checked,
        "agree": agreed,
        "share": round(agreed / checked, 4) if checked else None,
        "rtol": rtol,
        "by_calc": by_calc,
        "edge": edge,
        "disagreements": problems,
    }


def _plain(v: Any) -> Any:
    """A Parquet cell as a plain Python value (NaN / None / pd.NA -> None)."""
    if _null(v):
        return None
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, np.floating):
        return float(v)
    return v if isinstance(v, int | float) else str(v)


# --- profile ------------------------------------------------------------------------------------


def profile_cold(root: Path, data: Path, date: str, style: str, top: int = 25) -> dict[str, Any]:
    """A cold run under cProfile with ``workers = 1`` (every cell in the profiled process):
    wall clock and the ``top`` functions by tottime."""
    project = Project(root, data, date, 1, style)
    out = root / "cold.prof"
    cmd = [
        sys.executable,
        "-m",
        "cProfile",
        "-o",
        str(out),
        "-m",
        "orchestrator.cli",
        "--config",
        str(project.config),
        "run",
        "--date",
        date,
    ]
    result = timed(cmd, root)
    stats = pstats.Stats(str(out))
    text = io.StringIO()
    stats.stream = text  # type: ignore[attr-defined]
    stats.sort_stats("tottime").print_stats(top)
    rows = []
    for (file, line, func), (cc, nc, tt, ct, _) in sorted(
        stats.stats.items(),  # type: ignore[attr-defined]
        key=lambda item: -item[1][2],
    )[:top]:
        rows.append(
            {
                "function": f"{Path(file).name}:{line}({func})",
                "ncalls": nc,
                "tottime": round(tt, 3),
                "cumtime": round(ct, 3),
            }
        )
    return {
        "step": "profile",
        "style": style,
        "workers": 1,
        "wall_s": round(result["wall_s"], 2),
        "total_tt": round(stats.total_tt, 2),  # type: ignore[attr-defined]
        "summary": parse_summary(result["stdout"]),
        "top": rows,
        "text": text.getvalue(),
    }


# --- the benchmark ------------------------------------------------------------------------------


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 3) if values else None


def report(
    step: str,
    runs: list[dict[str, Any]],
    refs: list[dict[str, Any]],
    colds: list[dict[str, Any]],
    args: argparse.Namespace,
    workers: int,
) -> dict[str, Any]:
    """The JSON object of one step over its repetitions (``refs`` / ``colds``: the reference and
    cold run of the same repetitions)."""
    walls = [r["wall_s"] for r in runs]
    peaks = [r["peak_tree_mb"] for r in runs]
    ref_walls = [r["wall_s"] for r in refs]
    out: dict[str, Any] = {
        "step": step,
        "style": args.style,
        "executor": args.executor or "default",
        "workers": workers,
        "reps": len(runs),
        "wall_s": _median(walls),
        "walls": [round(w, 3) for w in walls],
        "reference_walls": [round(w, 3) for w in ref_walls],
        "peak_tree_mb": _median(peaks),
        "peak_tree_pss_mb": _median([r["peak_tree_pss_mb"] for r in runs]),
        "max_rss_mb": _median([r["max_rss_mb"] for r in runs if r["max_rss_mb"] is not None]),
        "cells": runs[0]["cells"]
        if len({r["cells"] for r in runs}) == 1
        else [r["cells"] for r in runs],
        "exit_codes": [r["exit_code"] for r in runs],
    }
    if step == "reference":
        out["phases"] = runs[0].get("phases")
        return out
    out["cells_by_calc"] = runs[0].get("cells_by_calc")
    out["engine_seconds"] = [r["summary"]["seconds"] if r.get("summary") else None for r in runs]
    ratio: float | None = None
    target: float | None = None
    if step == "cold":
        ratio = _median([r["wall_s"] / f["wall_s"] for r, f in zip(runs, refs)])
        target = COLD_TARGET
        out["ratio_of"] = "cold / reference"
    elif step == "noop":
        ratio, target = out["wall_s"], NOOP_TARGET_S
        out["ratio_of"] = "seconds"
        out["ratio_to_cold"] = _median([r["wall_s"] / c["wall_s"] for r, c in zip(runs, colds)])
    else:
        ratio = _median([r["wall_s"] / c["wall_s"] for r, c in zip(runs, colds)])
        target = RERUN_TARGET if step.startswith("bump_") else None
        out["ratio_of"] = f"{step} / cold"
    out["ratio"] = ratio
    out["target"] = target
    out["target_met"] = None if target is None or ratio is None else ratio <= target
    out["mem_ratio"] = _median([r["peak_tree_mb"] / f["peak_tree_mb"] for r, f in zip(runs, refs)])
    out["mem_pss_ratio"] = _median(
        [
            r["peak_tree_pss_mb"] / f["peak_tree_pss_mb"]
            for r, f in zip(runs, refs)
            if f["peak_tree_pss_mb"]
        ]
    )
    out["mem_target"] = MEM_TARGET
    out["mem_target_met"] = out["mem_ratio"] is not None and out["mem_ratio"] <= MEM_TARGET
    if step == "noop":
        out["noop_ok"] = all(r["cells"] == 0 for r in runs)
    return out


def _say(args: argparse.Namespace, text: str) -> None:
    if not args.json:
        print(text, flush=True)


def bench(args: argparse.Namespace, base: Path) -> int:
    per_step: dict[str, list[dict[str, Any]]] = {s: [] for s in STEPS}
    values: dict[str, Any] | None = None
    workers = 1
    for rep in range(args.reps):
        project = Project(
            base / f"rep{rep + 1}", args.data, args.date, args.workers, args.style, args.executor
        )
        workers = project.workers
        _say(args, f"rep {rep + 1}/{args.reps}: {project.root} ({args.style}, workers {workers})")
        for step in STEPS:
            result = (
                run_reference(project, args.data)
                if step == "reference"
                else run_step(project, step)
            )
            per_step[step].append(result)
            rss = result["peak_tree_mb"]
            _say(
                args,
                f"  {step:16} {result['wall_s']:7.2f} s  tree {rss:6.0f} MiB  cells {result['cells']}  exit {result['exit_code']}",
            )
            if result["exit_code"] != 0:
                print(
                    f"{step} failed (exit {result['exit_code']}):\n{result['stderr'][-3000:]}",
                    file=sys.stderr,
                )
                return 1
            if step == "cold" and values is None:
                values = check_values(project, args.sample)
                _say(
                    args,
                    f"  values: {values['agree']}/{values['checked']} sampled cells agree with the reference",
                )
        if not args.keep:
            shutil.rmtree(project.root, ignore_errors=True)
    refs, colds = per_step["reference"], per_step["cold"]
    for step in STEPS:
        print(json.dumps(report(step, per_step[step], refs, colds, args, workers)), flush=True)
    if values is not None:
        print(json.dumps({"step": "values", **values}), flush=True)
    if args.profile:
        prof = profile_cold(base / "profile", args.data, args.date, args.style)
        text = prof.pop("text")
        _say(args, text)
        print(json.dumps(prof), flush=True)
        if not args.keep:
            shutil.rmtree(base / "profile", ignore_errors=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--date", default="2018-02-07", help="target date of every run")
    parser.add_argument("--reps", type=int, default=1, help="repetitions (medians reported)")
    parser.add_argument("--workers", type=int, default=None, help="override the config's")
    parser.add_argument("--style", choices=("columnar", "per-user"), default="columnar")
    parser.add_argument("--executor", default=None, help="executor = NAME in the config")
    parser.add_argument("--json", action="store_true", help="print only the JSON lines")
    parser.add_argument("--sample", type=int, default=50, help="sampled cells per calculation")
    parser.add_argument("--profile", action="store_true", help="also profile a cold run")
    parser.add_argument("--keep", type=Path, default=None, help="work in DIR and keep it")
    args = parser.parse_args(argv)
    if not args.data.exists():
        print(
            f"bench_sp500: data file {args.data} not found; skipped (pass --data FILE)",
            file=sys.stderr,
        )
        return 0
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
        return bench(args, args.keep.resolve())
    with tempfile.TemporaryDirectory(prefix="bench_sp500_") as tmp:
        return bench(args, Path(tmp))


if __name__ == "__main__":
    sys.exit(main())
