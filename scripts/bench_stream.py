"""Benchmark: stream N synthetic users through one pass of 5 standard calculations, one date.

For each N (default 100,000, 300,000 and 1,000,000) it writes a synthetic root file (one row
per user: date, user, price, quantity), a package of 5 simple standard calculations sharing
the pass, and a config (SQLite ledger, flush every 5,000 users, one process), then runs
``orchestrator run`` as a whole process and reports the figures below. No calculation reads a
history window, so the source is imported once into its root store and streamed from it in
user order (defaults, nothing forced: see ``root_memory_mb`` in the README).

* peak memory of the process (proportional set size, polled every 250 ms);
* the run's own execution time (the summary line) and throughput in user-calculations per
  second (N x 5 / execution time), and the whole process's wall time (the root store's
  import included);
* the reference timed in the same sitting: the same 5 columns computed by pandas/NumPy in a
  process of its own (``--reference-only``: Python start, read the CSV, compute, write the
  columns zstandard-compressed), its wall time and peak memory, and ``ratio`` = the
  orchestrator's execution time / the reference's wall time.

Both forms of the 5 calculations are given; ``--style`` picks which the engine runs
(``columnar = true|false``): the columnar one computes each calculation's single date as one
block of all users.

Usage:
    .venv/bin/python scripts/bench_stream.py [--users 100000 300000 1000000] [--workers 1]
        [--style columnar|per-user]
The last line printed is one JSON object of figures.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
import tempfile
from pathlib import Path

from orchestrator.memory import run_measured

POLL_SECONDS = 0.25

CALCS = '''
from orchestrator import StandardCalculation


import numpy as np


def _today(frame, column):
    """(u,) values of the block's single date (the benchmark has one)."""
    return frame.root("trades", column)[frame.rows("trades")[0]]


class Notional(StandardCalculation):
    """price x quantity."""
    root_data = ["trades"]
    def process(self, ctx):
        row = ctx.root["trades"][0]
        return {"notional": row["price"] * row["qty"]}
    def compute(self, frame):
        return {"notional": (_today(frame, "price") * _today(frame, "qty"))[None, :]}


class Signed(StandardCalculation):
    """quantity with the sign of the price move from 100."""
    root_data = ["trades"]
    def process(self, ctx):
        row = ctx.root["trades"][0]
        return {"signed": row["qty"] if row["price"] >= 100 else -row["qty"]}
    def compute(self, frame):
        qty = _today(frame, "qty")
        signed = np.where(_today(frame, "price") >= 100, qty, -qty)
        return {"signed": np.nan_to_num(signed).astype(np.int64)[None, :]}


class Bucket(StandardCalculation):
    """price bucket of width 10."""
    root_data = ["trades"]
    def process(self, ctx):
        return {"bucket": int(ctx.root["trades"][0]["price"] // 10)}
    def compute(self, frame):
        price = np.nan_to_num(_today(frame, "price"))
        return {"bucket": (price // 10).astype(np.int64)[None, :]}


class Premium(StandardCalculation):
    """relative distance of the price from 100."""
    root_data = ["trades"]
    def process(self, ctx):
        return {"premium": ctx.root["trades"][0]["price"] / 100.0 - 1.0}
    def compute(self, frame):
        return {"premium": (_today(frame, "price") / 100.0 - 1.0)[None, :]}


class Large(StandardCalculation):
    """whether the trade is large."""
    root_data = ["trades"]
    def process(self, ctx):
        return {"large": ctx.root["trades"][0]["qty"] > 500}
    def compute(self, frame):
        return {"large": (_today(frame, "qty") > 500)[None, :]}
'''


def reference_only(csv_path: Path, out_path: Path) -> None:
    """The 5 calculations' columns by pandas/NumPy, written zstandard-compressed."""
    import numpy as np
    import pandas as pd
    import zstandard

    frame = pd.read_csv(csv_path)
    price = frame["price"].to_numpy(dtype=np.float64)
    qty = frame["qty"].to_numpy(dtype=np.int64)
    columns = {
        "notional": price * qty,
        "signed": np.where(price >= 100, qty, -qty),
        "bucket": (price // 10).astype(np.int64),
        "premium": price / 100.0 - 1.0,
        "large": qty > 500,
    }
    users = "\n".join(frame["user"].tolist()).encode()
    compressor = zstandard.ZstdCompressor(level=3)
    with out_path.open("wb") as f:
        f.write(compressor.compress(users))
        for values in columns.values():
            f.write(compressor.compress(np.ascontiguousarray(values).tobytes()))


def measure(
    users: int, workers: int, work: Path, style: str, executor: str | None = None
) -> dict[str, float | int]:
    folder = work / f"n{users}"
    (folder / "bench_stream_calcs").mkdir(parents=True)
    (folder / "bench_stream_calcs" / "__init__.py").write_text("")
    (folder / "bench_stream_calcs" / "calcs.py").write_text(CALCS)
    with (folder / "trades.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["date", "user", "price", "qty"])
        for i in range(users):
            writer.writerow(
                [
                    "2024-01-02",
                    f"u{i:07d}",
                    f"{50 + (i * 7919) % 10000 / 100:.2f}",
                    (i * 104729) % 1000 + 1,
                ]
            )
    (folder / "orchestrator.toml").write_text(
        'database_url = "sqlite:///ledger.db"\ncalculations = "bench_stream_calcs"\n'
        f'system_epoch = "epoch.py"\nworkers = {workers}\nflush_users = 5000\n'
        f"columnar = {'true' if style == 'columnar' else 'false'}\n"
        + (f'executor = "{executor}"\n' if executor else "")
        + '[root_data.trades]\npath = "trades.csv"\ndate_column = "date"\nuser_column = "user"\n'
    )
    each: dict[int, int] = {}
    wall, peak, done = run_measured(
        [
            sys.executable,
            "-m",
            "orchestrator.cli",
            "--config",
            str(folder / "orchestrator.toml"),
            "run",
            "--date",
            "2024-01-02",
        ],
        folder,
        POLL_SECONDS,
        each,
    )
    out, err = done.stdout, done.stderr
    # (the run's process is the one with the lowest pid: its children came after it)
    run_pid = min(each) if each else 0
    others = sorted(size for pid, size in each.items() if pid != run_pid)
    if done.returncode != 0:
        raise SystemExit(f"run failed for {users} users:\n{out}\n{err}")
    executed = float(re.search(r", ([0-9.]+) s of it executing:", out).group(1))  # type: ignore[union-attr]
    ref_wall, ref_peak, ref = run_measured(
        [
            sys.executable,
            __file__,
            "--reference-only",
            str(folder / "trades.csv"),
            str(folder / "reference.zst"),
        ],
        folder,
        POLL_SECONDS,
    )
    if ref.returncode != 0:
        raise SystemExit(f"the reference failed for {users} users:\n{ref.stderr}")
    return {
        "users": users,
        "peak_mib": round(peak / 2**20),
        "run_process_peak_mib": round(each.get(run_pid, 0) / 2**20),
        "worker_peak_mib": round(max(others, default=0) / 2**20),
        "execute_s": executed,
        "wall_s": round(wall, 2),
        "user_calcs_per_s": round(users * 5 / executed),
        "reference_s": round(ref_wall, 2),
        "reference_peak_mib": round(ref_peak / 2**20),
        "ratio": round(executed / ref_wall, 2),
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--users", type=int, nargs="+", default=[100_000, 300_000, 1_000_000])
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--executor", default=None, help="executor = NAME in the config")
    parser.add_argument("--reference-only", nargs=2, type=Path, metavar=("CSV", "OUT"))
    parser.add_argument(
        "--style",
        choices=["columnar", "per-user"],
        default="columnar",
        help="the calculations' form: compute(frame) in blocks, or process(ctx) per user",
    )
    args = parser.parse_args()
    if args.reference_only:
        reference_only(*args.reference_only)
        return 0
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_stream_") as tmp:
        for users in args.users:
            figures = measure(users, args.workers, Path(tmp), args.style, args.executor)
            results.append(figures)
            print(
                f"{users:>9,} users: peak {figures['peak_mib']} MiB (run process "
                f"{figures['run_process_peak_mib']}, largest other {figures['worker_peak_mib']}), execute "
                f"{figures['execute_s']} s ({figures['user_calcs_per_s']:,} user-calcs/s), "
                f"wall {figures['wall_s']} s; reference {figures['reference_s']} s "
                f"(peak {figures['reference_peak_mib']} MiB), ratio {figures['ratio']}"
            )
    print(
        json.dumps(
            {
                "bench": "stream",
                "style": args.style,
                "workers": args.workers,
                "executor": args.executor or "default",
                "results": results,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
