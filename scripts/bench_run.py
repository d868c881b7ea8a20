#!/usr/bin/env python
"""Benchmark: wall time and peak memory of whole ``orchestrator run`` processes.

(a) cold catch-up: delete the config's SQLite ledger, then ``orchestrator --config X run
    --date D`` from nothing;
(b) the no-op: the same command again (``--repeat`` times); it must complete 0 cells;
then ``orchestrator plan --format json`` must show every cell SKIPPED or IMPOSSIBLE.

Each process runs under ``/usr/bin/time -v`` (wall clock, max RSS of the largest process)
while its process tree is polled with psutil (peak of the summed RSS of the tree).

Usage:
    .venv/bin/python scripts/bench_run.py [--config examples/sp500.toml] [--date 2018-02-07]
        [--repeat 3] [--skip-cold] [--db URL | --private] [--cold-target 60] [--noop-target 3] [--keep]

The ledger is the config's ``database_url`` (after ``ORCHESTRATOR_DB_URL``); it is deleted for
the cold run only when it is an SQLite file. Any other database needs ``--db``: an SQLite URL
(the file is deleted) or a ``postgresql://`` URL, which gets a fresh schema
``bench_run_<hex>`` (via ``?options=-csearch_path%3D<schema>``), dropped afterwards unless
``--keep``. The last line printed is one JSON object of figures.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Self

import psutil

from orchestrator.config import load_config

ROOT = Path(__file__).resolve().parents[1]
# ``RunSummary.headline``: the run's one plain sentence (counts with thousands separators).
SUMMARY = re.compile(
    r"Run (?P<run>\w+) finished in (?P<wall>[\d.]+) s(?: \([^)]*\))?, "
    r"(?P<seconds>[\d.]+) s of it executing: "
    r"(?P<completed>[\d,]+) cells? computed, (?P<failed>[\d,]+) failed"
    r"(?:, (?P<users_failed>[\d,]+) users? failed)?, "
    r"(?P<skipped>[\d,]+) skipped \(up to date\), (?P<blocked>[\d,]+) blocked, "
    r"(?P<impossible>[\d,]+) impossible(?:, (?P<outside>[\d,]+) outside the range or selection)?; "
    r"peak memory (?P<peak>\d+) MiB"
)
TIME_WALL = re.compile(r"Elapsed \(wall clock\) time.*: (?:(\d+):)?(\d+):([\d.]+)")
TIME_RSS = re.compile(r"Maximum resident set size \(kbytes\): (\d+)")
TIME_CPU = re.compile(r"(?:User|System) time \(seconds\): ([\d.]+)")
TIME_EXIT = re.compile(r"Command exited with non-zero status \d+\s*$")


def orchestrator_exe() -> str:
    here = Path(sys.executable).parent / "orchestrator"
    if here.exists():
        return str(here)
    found = shutil.which("orchestrator")
    if found is None:
        sys.exit("cannot find the `orchestrator` console script; install the project first")
    return found


def timed(cmd: list[str], env: dict[str, str], cwd: Path) -> dict[str, Any]:
    """Run ``cmd`` as a whole process, timed from outside.

    Returns:
        ``{"wall_s", "cpu_s", "peak_rss_mb", "peak_tree_rss_mb", "exit_code", "stdout",
        "stderr"}``: wall clock, user + system CPU seconds (of the process and the children
        it waited for) and the largest process's maximum RSS from ``/usr/bin/time -v`` when
        it exists (else ``time.perf_counter``, no CPU figure, and the polled tree), the polled
        tree's peak summed RSS (MiB).
    """
    timer = Path("/usr/bin/time")
    use_time = timer.exists()
    full = ([str(timer), "-v"] if use_time else []) + cmd
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(full, stdout=out, stderr=err, env=env, cwd=cwd)
        with TreeRss(proc.pid, include_root=True) as poll:
            code = proc.wait()
        wall = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    tree = poll.peak / 2**20
    result: dict[str, Any] = {
        "wall_s": wall,
        "peak_rss_mb": tree,
        "peak_tree_rss_mb": tree,
        "exit_code": code,
        "cpu_s": None,
    }
    if use_time:
        report = stderr.rsplit("\tCommand being timed", 1)
        stderr = TIME_EXIT.sub("", report[0]).rstrip()
        m = TIME_WALL.search(report[-1])
        if m:
            h, mnt, s = m.groups()
            result["wall_s"] = int(h or 0) * 3600 + int(mnt) * 60 + float(s)
        m = TIME_RSS.search(report[-1])
        if m:
            result["peak_rss_mb"] = int(m.group(1)) / 1024
        cpu = TIME_CPU.findall(report[-1])
        if cpu:
            result["cpu_s"] = sum(float(x) for x in cpu)
    result["stdout"], result["stderr"] = stdout, stderr
    return result


def sqlite_path(url: str) -> Path | None:
    if not url.startswith("sqlite:///"):
        return None
    rest = url[len("sqlite:///") :]
    if not rest or rest == ":memory:":
        return None
    return Path(rest)


def delete_sqlite(path: Path) -> None:
    for suffix in ("", "-wal", "-shm", "-journal"):
        p = Path(str(path) + suffix)
        if p.exists():
            p.unlink()


def _pg(url: str) -> str:
    return (
        "postgresql+psycopg://" + url[len("postgresql://") :]
        if url.startswith("postgresql://")
        else url
    )


def pg_schema(url: str, schema: str, create: bool) -> None:
    from sqlalchemy import create_engine, text

    engine = create_engine(_pg(url))
    with engine.begin() as conn:
        if create:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
        else:
            conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
    engine.dispose()


class TreeRss:
    """Polls the summed RSS of a process's descendants (``/usr/bin/time`` itself excluded)."""

    def __init__(self, pid: int, interval: float = 0.05, include_root: bool = False):
        self.pid = pid
        self.interval = interval
        self.include_root = include_root
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
            total = 0
            try:
                procs = root.children(recursive=True) + ([root] if self.include_root else [])
            except psutil.NoSuchProcess:
                return
            for p in procs:
                try:
                    total += p.memory_info().rss
                except psutil.NoSuchProcess:
                    pass
            self.peak = max(self.peak, total)
            self._stop.wait(self.interval)


def run_cli(args: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run the orchestrator CLI once; wall clock, max RSS, exit code, stdout/stderr."""
    timer = Path("/usr/bin/time")
    use_time = timer.exists()
    cmd = ([str(timer), "-v"] if use_time else []) + [orchestrator_exe(), *args]
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, cwd=ROOT)
        with TreeRss(proc.pid, include_root=not use_time) as poll:
            code = proc.wait()
        wall = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    result: dict[str, Any] = {
        "cmd": " ".join(["orchestrator", *args]),
        "exit_code": code,
        "wall_s": wall,
        "tree_peak_rss_mib": poll.peak / 2**20,
        "max_rss_mib": None,
        "stdout": stdout,
        "stderr": stderr,
    }
    if use_time:
        m = TIME_WALL.search(stderr)
        if m:
            h, mnt, s = m.groups()
            result["wall_s"] = int(h or 0) * 3600 + int(mnt) * 60 + float(s)
        m = TIME_RSS.search(stderr)
        if m:
            result["max_rss_mib"] = int(m.group(1)) / 1024
        # Keep only the program's own stderr (the time report starts with "\tCommand being timed").
        result["stderr"] = stderr.split("\tCommand being timed")[0]
    if code != 0 and "Command exited with non-zero status" in stderr:
        result["stderr"] = (
            result["stderr"].replace("Command exited with non-zero status", "").rstrip()
        )
    return result


def parse_summary(stdout: str) -> dict[str, Any] | None:
    m = SUMMARY.search(stdout)
    if not m:
        return None
    d = m.groupdict()
    out: dict[str, Any] = {
        k: int(v.replace(",", ""))
        for k, v in d.items()
        if k not in ("run", "seconds", "wall") and v is not None
    }
    out["run"] = d["run"]
    out["seconds"] = float(d["seconds"])  # executing (the engine's own figure)
    out["wall"] = float(d["wall"])
    out.setdefault("outside", 0)
    out.setdefault("users_failed", 0)
    return out


def show(label: str, r: dict[str, Any], summary: dict[str, Any] | None) -> None:
    rss = f"{r['max_rss_mib']:.0f}" if r["max_rss_mib"] is not None else "?"
    print(
        f"{label}: exit {r['exit_code']}, wall {r['wall_s']:.2f}s, max RSS {rss} MiB "
        f"(tree peak {r['tree_peak_rss_mib']:.0f} MiB)"
    )
    if summary:
        print(
            f"    {summary['completed']} completed, {summary['failed']} failed, {summary['skipped']} skipped, "
            f"{summary['blocked']} blocked, {summary['impossible']} impossible; engine-reported "
            f"{summary['seconds']:.2f}s, peak {summary['peak']} MiB"
        )
    else:
        print("    no summary line found; stdout/stderr tail:")
        for line in (r["stdout"] + r["stderr"]).strip().splitlines()[-15:]:
            print(f"    | {line}")


def _stat(values: list[float]) -> dict[str, float]:
    return {
        "median": round(statistics.median(values), 3),
        "min": round(min(values), 3),
        "max": round(max(values), 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(ROOT / "examples" / "sp500.toml"))
    parser.add_argument("--date", default="2018-02-07")
    parser.add_argument("--repeat", type=int, default=3, help="no-op runs (default 3)")
    parser.add_argument(
        "--skip-cold", action="store_true", help="keep the ledger; only the no-op runs"
    )
    parser.add_argument("--db", default=None, help="ledger URL to use instead of the config's")
    parser.add_argument("--cold-target", type=float, default=60.0)
    parser.add_argument("--noop-target", type=float, default=3.0)
    parser.add_argument(
        "--no-plan-check", action="store_true", help="skip the plan --format json check"
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep a postgres schema / private SQLite file"
    )
    parser.add_argument(
        "--private",
        action="store_true",
        help="use a fresh SQLite ledger in a temporary folder instead of the config's (does not "
        "touch a ledger someone else may be using)",
    )
    args = parser.parse_args(argv)

    config_path = Path(args.config).resolve()
    if not config_path.is_file():
        print(f"config {config_path} not found; pass --config PATH", file=sys.stderr)
        return 2
    schema = None
    db_url = args.db
    private_dir = None
    if args.private:
        if args.db or args.skip_cold:
            print("--private cannot be combined with --db or --skip-cold", file=sys.stderr)
            return 2
        private_dir = tempfile.mkdtemp(prefix="bench_run_")
        db_url = f"sqlite:///{private_dir}/ledger.db"
    if db_url and db_url.startswith("postgresql") and "search_path" not in db_url:
        if args.skip_cold:
            print("--skip-cold with a postgresql --db: using the database as it is")
        else:
            schema = f"bench_run_{uuid.uuid4().hex[:10]}"
            pg_schema(db_url, schema, create=True)
            sep = "&" if "?" in db_url else "?"
            db_url = f"{db_url}{sep}options=-csearch_path%3D{schema}"
    url = load_config(config_path, db_url).database_url
    path = sqlite_path(url)
    if not args.skip_cold and path is None and schema is None:
        print(
            f"refusing to wipe non-SQLite ledger {url!r} for the cold run; pass --db "
            "(an SQLite or postgresql:// URL) or --skip-cold",
            file=sys.stderr,
        )
        return 2

    base = ["--config", str(config_path)] + (["--db", db_url] if db_url else [])
    run_args = [*base, "run", "--date", args.date]
    print(f"config: {config_path}")
    print(f"ledger: {url if schema is None else f'{args.db} (schema {schema})'}")
    print(f"command: orchestrator {' '.join(run_args)}")
    figures: dict[str, Any] = {"bench": "run", "config": str(config_path), "date": args.date}
    ok = True
    try:
        if not args.skip_cold:
            if path is not None:
                delete_sqlite(path)
            r = run_cli(run_args)
            s = parse_summary(r["stdout"])
            show("cold catch-up", r, s)
            cold_ok = r["exit_code"] == 0 and s is not None and r["wall_s"] <= args.cold_target
            print(f"    target wall <= {args.cold_target:g}s: {'MET' if cold_ok else 'MISSED'}")
            figures["cold"] = {
                "wall_s": round(r["wall_s"], 2),
                "max_rss_mib": None if r["max_rss_mib"] is None else round(r["max_rss_mib"], 1),
                "tree_peak_rss_mib": round(r["tree_peak_rss_mib"], 1),
                "exit_code": r["exit_code"],
                "summary": s,
                "target_s": args.cold_target,
                "target_met": cold_ok,
            }
            ok &= r["exit_code"] == 0 and s is not None
            if path is not None and path.exists():
                figures["db_mib"] = round(
                    sum(
                        Path(str(path) + x).stat().st_size
                        for x in ("", "-wal")
                        if Path(str(path) + x).exists()
                    )
                    / 2**20,
                    1,
                )

        walls: list[float] = []
        rss: list[float] = []
        noop_summaries = []
        for i in range(args.repeat):
            r = run_cli(run_args)
            s = parse_summary(r["stdout"])
            show(f"no-op run {i + 1}", r, s)
            walls.append(r["wall_s"])
            rss.append(r["max_rss_mib"] if r["max_rss_mib"] is not None else r["tree_peak_rss_mib"])
            noop_summaries.append(s)
            if s is None or r["exit_code"] != 0:
                ok = False
            elif s["completed"] != 0 or s["failed"] != 0:
                ok = False
                print(f"    NOT A NO-OP: {s['completed']} completed, {s['failed']} failed")
        if walls:
            noop_ok = all(
                x is not None and x["completed"] == 0 and x["failed"] == 0 for x in noop_summaries
            )
            noop_met = noop_ok and statistics.median(walls) <= args.noop_target
            print(
                f"no-op wall median {statistics.median(walls):.2f}s (min {min(walls):.2f} .. max {max(walls):.2f}), "
                f"max RSS {max(rss):.0f} MiB; target <= {args.noop_target:g}s: {'MET' if noop_met else 'MISSED'}"
            )
            figures["noop"] = {
                "wall_s": _stat(walls),
                "max_rss_mib": round(max(rss), 1),
                "completed": [s["completed"] if s else None for s in noop_summaries],
                "skipped": [s["skipped"] if s else None for s in noop_summaries],
                "engine_seconds": [s["seconds"] if s else None for s in noop_summaries],
                "target_s": args.noop_target,
                "target_met": noop_met,
                "all_noop": noop_ok,
            }

        if not args.no_plan_check:
            r = run_cli([*base, "plan", "--date", args.date, "--format", "json"])
            try:
                plan = json.loads(r["stdout"])
            except json.JSONDecodeError:
                plan = None
            if plan is None:
                ok = False
                print(
                    f"plan --format json failed (exit {r['exit_code']}): {r['stderr'].strip()[-500:]}"
                )
            else:
                cells = plan["cells"]
                counts = plan["counts"]
                reasons: dict[str, int] = {}
                for c in cells:
                    reasons[c["reason"]] = reasons.get(c["reason"], 0) + 1
                pending = [c for c in cells if c["status"] in ("RUNNABLE", "BLOCKED")]
                print(
                    f"plan after the runs: {len(cells)} cells, {counts}, reasons {dict(sorted(reasons.items()))}; "
                    f"wall {r['wall_s']:.2f}s, max RSS {r['max_rss_mib'] or r['tree_peak_rss_mib']:.0f} MiB"
                )
                for c in pending[:10]:
                    print(
                        f"    still due: {c['calculation']} {c['date']} {c['status']}/{c['reason']}: {c['detail']}"
                    )
                if pending:
                    ok = False
                figures["plan"] = {
                    "cells": len(cells),
                    "counts": counts,
                    "reasons": dict(sorted(reasons.items())),
                    "wall_s": round(r["wall_s"], 2),
                    "all_skipped_or_impossible": not pending,
                }
    finally:
        if schema is not None and not args.keep:
            pg_schema(args.db, schema, create=False)
        if private_dir is not None and not args.keep:
            shutil.rmtree(private_dir, ignore_errors=True)
    figures["ok"] = ok
    print(json.dumps(figures))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
