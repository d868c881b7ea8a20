"""Acceptance walk-through on the real S&P 500 file: the "Done when" list of the nightly-run issue.

Copies calculations/prices into a scratch folder (so edits never touch the repository), then
runs whole ``orchestrator`` processes, each timed from outside:

1. cold catch-up to 2018-02-07 (every cell NEW);
2. the same command again (every cell SKIPPED / UP_TO_DATE, nothing executed);
3. RSI period 14 -> 15: rsi_14 re-runs, then only what depends on it and changed;
4. a comment-only edit of the RSI class: nothing re-runs;
4b. a local variable renamed in Rsi14.process: COSMETIC_CHANGE by proof (no user code runs), nothing re-runs;
5. ``epoch bump``: the plan makes every cell RUNNABLE (EPOCH_CHANGED).

Usage:
    .venv/bin/python scripts/acceptance_sp500.py [--data PATH] [--date 2018-02-07] [--db URL]
Prints one line per step and a final JSON line with every figure.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

from orchestrator.memory import run_measured

REPO = Path(__file__).resolve().parents[1]
POLL_SECONDS = 1.0  # memory polling reads smaps_rollup of every process: not too often
DEFAULT_DATA = REPO.parent / "shared" / "data" / "sp500_daily_ohlcv_2013-02-08_2018-02-07.csv.gz"
ORCH = [sys.executable, "-m", "orchestrator.cli"]


def timed(args: list[str], cwd: Path) -> tuple[float, int, subprocess.CompletedProcess[str]]:
    """Run a command; wall seconds, peak memory (PSS) of its process tree, the result."""
    return run_measured(args, cwd, POLL_SECONDS)


def plan_counts(
    cfg: Path, date: str, cwd: Path
) -> tuple[dict[str, int], Counter[str], Counter[str]]:
    done = subprocess.run(
        [*ORCH, "--config", str(cfg), "plan", "--date", date, "--format", "json"],
        cwd=cwd,
        capture_output=True,
        text=True,
        check=True,
    )
    report = json.loads(done.stdout)
    reasons = Counter(c["reason"] for c in report["cells"])
    runnable = Counter(c["calculation"] for c in report["cells"] if c["status"] == "RUNNABLE")
    return report["counts"], reasons, runnable


def executed_per_calc(db: str) -> dict[str, int]:
    """Cells executed by the last run, per calculation, read from its run attempts."""
    from sqlalchemy import create_engine, text

    engine = create_engine(db)
    with engine.connect() as conn:
        run_id = conn.execute(
            text("SELECT run_id FROM runs ORDER BY started_at DESC LIMIT 1")
        ).scalar()
        rows = conn.execute(
            text(
                "SELECT calculation, COUNT(*) FROM run_attempts WHERE run_id = :r GROUP BY calculation"
            ),
            {"r": run_id},
        ).all()
    engine.dispose()
    return dict(sorted(rows))


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--date", default="2018-02-07")
    parser.add_argument(
        "--db", default=None, help="ledger URL (default: SQLite in the scratch folder)"
    )
    parser.add_argument("--workers", type=int, default=2, help="processes for standard cells")
    args = parser.parse_args()
    if not args.data.exists():
        print(f"data file {args.data} not found; pass --data", file=sys.stderr)
        return 2
    figures: dict[str, object] = {}
    with tempfile.TemporaryDirectory(prefix="acceptance_") as tmp:
        work = Path(tmp)
        pkg = work / "accept_prices"
        shutil.copytree(REPO / "calculations" / "prices", pkg)
        db = args.db or f"sqlite:///{work / 'ledger.db'}"
        cfg = work / "orchestrator.toml"
        cfg.write_text(
            f'database_url = "{db}"\ncalculations = "{pkg}"\nsystem_epoch = "system_epoch.py"\n'
            f"workers = {args.workers}\n"
            f'[root_data.prices]\npath = "{args.data}"\ndate_column = "date"\nuser_column = "Name"\n'
        )
        (work / "system_epoch.py").write_text("SYSTEM_EPOCH = 1\n")
        run = [*ORCH, "--config", str(cfg), "run", "--date", args.date]

        took, peak, res = timed(run, work)
        print(f"1. cold catch-up: {took:.1f}s, peak {peak / 2**20:.0f} MiB: {res.stdout.strip()}")
        figures["cold_seconds"], figures["cold_peak_mib"] = round(took, 2), round(peak / 2**20)
        if res.returncode != 0:
            print(res.stderr, file=sys.stderr)
            return 1

        took, peak, res = timed(run, work)
        counts, reasons, _ = plan_counts(cfg, args.date, work)
        print(f"2. no-op run: {took:.2f}s, peak {peak / 2**20:.0f} MiB: {res.stdout.strip()}")
        print(f"   plan afterwards: {counts} {dict(reasons)}")
        figures["noop_seconds"], figures["noop_peak_mib"] = round(took, 2), round(peak / 2**20)
        figures["noop_plan_counts"] = counts

        wilder = pkg / "wilder.py"
        source = wilder.read_text()
        at = source.index("class Rsi14")
        edited = source[:at] + source[at:].replace("period = 14", "period = 15", 1)
        wilder.write_text(edited)
        counts, reasons, runnable = plan_counts(cfg, args.date, work)
        print(f"3. RSI period 14 -> 15: plan {counts}, runnable {dict(runnable)}")
        took, _, res = timed(run, work)
        per_calc = executed_per_calc(db)
        print(f"   run {took:.1f}s: {res.stdout.strip()}\n   executed per calculation: {per_calc}")
        figures["rsi_change_executed"] = per_calc
        figures["rsi_change_seconds"] = round(took, 2)

        at = edited.index("class Rsi14")
        commented = edited[:at] + edited[at:].replace(
            "    period = 15\n", "    # a comment only\n    period = 15  # and another\n", 1
        )
        wilder.write_text(commented)
        counts, reasons, _ = plan_counts(cfg, args.date, work)
        took, _, res = timed(run, work)
        print(f"4. comment-only edit: plan {counts}; run: {res.stdout.strip()}")
        figures["comment_edit_plan_counts"] = counts

        at = commented.index("class Rsi14")
        renamed = commented[:at] + (
            commented[at:]
            .replace(
                'change = close - float(prev["close"])', 'delta = close - float(prev["close"])', 1
            )
            .replace("max(change, 0.0)", "max(delta, 0.0)", 1)
            .replace("max(-change, 0.0)", "max(-delta, 0.0)", 1)
        )
        assert renamed != commented, "the rename edit must apply"
        wilder.write_text(renamed)
        counts, reasons, _ = plan_counts(cfg, args.date, work)
        took, _, res = timed(run, work)
        print(
            f"4b. local variable renamed in Rsi14.process: plan {counts} {dict(reasons)}; "
            f"run: {res.stdout.strip()}"
        )
        figures["rename_plan_reasons"] = dict(reasons)

        subprocess.run(
            [*ORCH, "--config", str(cfg), "epoch", "bump"],
            cwd=work,
            check=True,
            capture_output=True,
        )
        counts, reasons, _ = plan_counts(cfg, args.date, work)
        print(f"5. epoch bump: plan {counts} {dict(reasons)}")
        figures["epoch_bump_plan_counts"] = counts
        figures["epoch_bump_reasons"] = dict(reasons)
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
