#!/usr/bin/env python
"""Benchmark: plan time of the "no-op nightly" over a synthetic ledger.

Builds 100 synthetic calculations (10 layers x 10, each depending on 1-3 calculations of
earlier layers, a few historical, the first layer and a few others reading the root dataset
"prices" with lookbacks 1..20) and a root index of 3,650 consecutive days, fills the ledger
with one COMPLETED cell per calculation x date whose fingerprint is exactly what the planner
computes (and the ledger digests of those cells), then measures in fresh processes, one per
way of planning, over several repetitions:

  * ``digest`` (what ``Orchestrator.plan`` does): ``Ledger.load_digests`` and
    ``plan_with`` from the digests, reading only the rows of months not proven unchanged;
  * ``full`` (the reference, the planner before digests): ``Ledger.load_cells`` of every
    slim row and ``plan_with`` over them — measured in the same sitting, so the two figures
    share the machine's load;

each with the peak RSS of its process. The plan must be all SKIPPED / UP_TO_DATE (with
``--nightly``, the plan of one more date than the ledger holds: besides, one NEW cell per
calculation on that date); otherwise the first other decisions are printed (a planner bug). ``--check`` also compares every
decision of the two plans (in a process of its own: it lists the whole plan). When the digest
total exceeds the target, a cProfile of one plan is printed.

Usage:
    .venv/bin/python scripts/bench_plan.py [--calcs 100] [--dates 3650] [--db URL]
        [--repeat 3] [--target-seconds 0.5] [--target-mib 200] [--nightly] [--check]
        [--no-reference] [--profile] [--keep]

    # 1,000,000 cells: --calcs 274 --dates 3650

``--db`` defaults to a temporary SQLite file (deleted afterwards). A ``postgresql://`` URL
gets a fresh schema ``bench_plan_<hex>`` (through ``?options=-csearch_path%3D<schema>``),
dropped afterwards unless ``--keep``; a URL that already sets ``search_path`` is used as it is.
A ledger that already holds cells is reused, not re-seeded (``--keep`` prints how to reuse it).
The last line printed is one JSON object of figures.
"""

from __future__ import annotations

import argparse
import cProfile
import datetime as dt
import gc
import io
import json
import os
import pstats
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import xxhash
from sqlalchemy import create_engine, insert, text

from orchestrator.ledger.store import CELLS, Ledger
from orchestrator.manifest import CalcSpec, Manifest
from orchestrator.planning import (
    Decider,
    DigestDecisions,
    MoreObservation,
    PlanRequest,
    Status,
    make_plan,
    plan_with,
)
from orchestrator.status import build_status, render_status

FIRST_DATE = dt.date(2008, 1, 1)
EPOCH = 0
CHUNK = 20_000


class _Dummy:
    """Stands in for a calculation class: the planner never touches ``cls``."""


def _hex(*parts: object) -> str:
    return xxhash.xxh3_128_hexdigest("|".join(map(str, parts)).encode())


# --- the synthetic project ----------------------------------------------------------------


def synthetic_specs(n_calcs: int, seed: int = 7) -> list[CalcSpec]:
    """``n_calcs`` calculations in layers of 10: a realistic DAG, deterministic per seed."""
    rng = random.Random(seed)
    width = 10
    layers: list[list[str]] = []
    specs: list[CalcSpec] = []
    for i in range(n_calcs):
        layer, slot = divmod(i, width)
        if slot == 0:
            layers.append([])
        name = f"c{layer:02d}_{slot:02d}"
        if layer == 0:
            deps: tuple[str, ...] = ()
            root: tuple[str, ...] = ("prices",)
        else:
            # At least one dependency in the previous layer, so there are exactly n/10 passes.
            picked = {rng.choice(layers[layer - 1])}
            earlier = [n for lay in layers[:layer] for n in lay]
            for _ in range(rng.randint(0, 2)):
                picked.add(rng.choice(earlier))
            deps = tuple(sorted(picked))
            root = ("prices",) if slot in (3, 7) else ()  # a few later calcs read prices too
        historical = layer > 0 and slot == 5 or (layer == 0 and slot == 9)
        lookback = rng.randint(1, 20) if root else 1
        specs.append(
            CalcSpec(
                name=name,
                kind="meta" if slot == 8 else "standard",
                category=("signals", "risk", "features")[slot % 3],
                dependencies=deps,
                root_data=root,
                historical=historical,
                lookback=lookback,
                earliest_date=None,
                product_lines=(),
                max_failure_rate=0.1,
                code_hash=_hex("code", name),
                cls=_Dummy,
            )
        )
        layers[-1].append(name)
    return specs


def synthetic_root(n_dates: int) -> dict[str, dict[dt.date, str]]:
    return {
        "prices": {FIRST_DATE + dt.timedelta(days=i): _hex("prices", i) for i in range(n_dates)}
    }


def build_request(
    manifest: Manifest,
    root: dict[str, dict[dt.date, str]],
    ledger: Any,
    digests: Any = None,
) -> PlanRequest:
    return PlanRequest(
        manifest=manifest,
        ledger=ledger,
        root=root,
        epoch=EPOCH,
        target=max(root["prices"]),
        digests=digests,
    )


def fake_result_hash(key: tuple[str, dt.date]) -> str:
    return _hex("result", key[0], key[1].isoformat())


# --- database helpers ---------------------------------------------------------------------


def with_search_path(url: str, schema: str) -> str:
    sep = "&" if "?" in url else "?"
    return f"{url}{sep}options=-csearch_path%3D{schema}"


def _pg_admin_url(url: str) -> str:
    return (
        "postgresql+psycopg://" + url[len("postgresql://") :]
        if url.startswith("postgresql://")
        else url
    )


def create_schema(url: str, schema: str) -> None:
    engine = create_engine(_pg_admin_url(url))
    with engine.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    engine.dispose()


def drop_schema(url: str, schema: str) -> None:
    engine = create_engine(_pg_admin_url(url))
    with engine.begin() as conn:
        conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
    engine.dispose()


def seed(url: str, n_calcs: int, n_dates: int) -> dict[str, float | int]:
    """Create the schema (migrations) and fill the ledger with matching COMPLETED cells."""
    t0 = time.perf_counter()
    ledger = Ledger.open(url)
    t_migrate = time.perf_counter() - t0
    with ledger.engine.connect() as conn:
        existing = conn.execute(text("SELECT count(*) FROM cells")).scalar_one()
    if existing:
        # Reused: its rows were written by this script, consistent by construction; digests
        # of another format (older code) are made again rather than left untrusted.
        stale = any(not d.clean.all() for d in ledger.load_digests().values())
        t2 = time.perf_counter()
        if stale:
            ledger.rebuild_digests()
        ledger.dispose()
        return {
            "seeded": 0,
            "existing": existing,
            "migrate_s": t_migrate,
            "seed_s": 0.0,
            "digest_s": time.perf_counter() - t2 if stale else 0.0,
        }

    manifest = Manifest.build(synthetic_specs(n_calcs))
    root = synthetic_root(n_dates)
    request = build_request(manifest, root, {})
    t1 = time.perf_counter()
    empty_plan = make_plan(request)  # every cell NEW; its order is a valid dependency order
    decider = Decider(request)
    now = dt.datetime.now(dt.UTC)
    run_id = uuid.uuid4().hex
    rows: list[dict[str, Any]] = []
    written = 0
    with ledger.engine.begin() as conn:
        for key in empty_plan.order:
            spec = manifest.calcs[key[0]]
            inputs = decider.inputs(spec, key[1], fake_result_hash)
            rows.append(
                {
                    "calculation": key[0],
                    "date": key[1],
                    "status": "COMPLETED",
                    "category": spec.category,
                    "code_hash": spec.code_hash,
                    "layer_hash": spec.layer_hash,
                    "infra_hash": spec.infra_hash,
                    "epoch": request.epoch,
                    "inputs_digest": inputs.digest,
                    "upstream_hashes": dict(inputs.upstream),
                    "root_hashes": {k: dict(v) for k, v in inputs.root.items()},
                    "previous_hash": inputs.previous_hash,
                    "result_hash": fake_result_hash(key),
                    "generation": _hex("gen", *key),
                    "users": 500,
                    "attempts": 0,
                    "lease_expires_at": None,
                    "run_id": run_id,
                    "error": None,
                    "hash_format": 1,
                    "updated_at": now,
                }
            )
            if len(rows) >= CHUNK:
                conn.execute(insert(CELLS), rows)
                written += len(rows)
                rows = []
        if rows:
            conn.execute(insert(CELLS), rows)
            written += len(rows)
    t_seed = time.perf_counter() - t1
    # Written straight to the table (its triggers marked every month dirty): digest them.
    t2 = time.perf_counter()
    ledger.rebuild_digests()
    t_digest = time.perf_counter() - t2
    ledger.dispose()
    return {
        "seeded": written,
        "existing": 0,
        "migrate_s": t_migrate,
        "seed_s": t_seed,
        "digest_s": t_digest,
    }


# --- measuring (runs in a fresh child process so its peak RSS is the plan's own) ----------


def _peak_rss_mib() -> float:
    """This process's peak RSS (``VmHWM``): unlike ``ru_maxrss``, which Linux carries over
    ``exec`` from the parent that forked the process (here: the seeding parent), it counts
    this program's memory only."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _rss_mib() -> float:
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    except ImportError:  # pragma: no cover
        return float("nan")


def _observe_more(ledger: Ledger) -> Any:
    def more(names: set[str], months: Any = None) -> MoreObservation:
        rows = ledger.load_cells(names) if months is None else ledger.load_buckets(months, False)
        return MoreObservation(rows, {}, {})

    return more


def plan_once(ledger: Ledger, manifest: Manifest, root: Any, mode: str) -> tuple[Any, int, float]:
    """One plan as ``Orchestrator.plan`` makes it: (plan, cells read, seconds reading)."""
    t0 = time.perf_counter()
    if mode == "digest":
        digests = ledger.load_digests(manifest.calcs)
        request = build_request(manifest, root, {}, digests)
        cells = sum(int(d.cells.sum()) for d in digests.values())
    else:
        snapshot = ledger.load_cells(manifest.calcs, slim=True)
        request = build_request(manifest, root, snapshot)
        cells = sum(len(per_date) for per_date in snapshot.values())
    t_read = time.perf_counter() - t0
    plan, _ = plan_with(request, _observe_more(ledger), ledger)
    return plan, cells, t_read


def measure(
    url: str,
    n_calcs: int,
    n_dates: int,
    repeat: int,
    profile: bool,
    target: float,
    mode: str,
    nightly: bool = False,
) -> dict[str, Any]:
    manifest = Manifest.build(synthetic_specs(n_calcs))
    root = synthetic_root(n_dates + (1 if nightly else 0))
    ledger = Ledger.open(url)
    gc.collect()
    base_rss = _rss_mib()
    loads: list[float] = []
    decides: list[float] = []
    totals: list[float] = []
    after_plan: list[float] = []
    statuses: list[float] = []
    counts: dict[str, int] = {}
    reasons: dict[str, int] = {}
    bad: list[dict[str, str]] = []
    n_cells = 0
    read = 0
    for _ in range(repeat):
        t0 = time.perf_counter()
        plan, n_cells, t_read = plan_once(ledger, manifest, root, mode)
        t2 = time.perf_counter()
        after_plan.append(_rss_mib())
        loads.append(t_read)
        decides.append(t2 - t0 - t_read)
        totals.append(t2 - t0)
        counts = plan.counts()
        reasons = plan.reason_counts()
        decided = (
            plan.decisions.explicit
            if isinstance(plan.decisions, DigestDecisions)
            else plan.decisions
        )
        read = len(decided)  # cells decided one by one (each read from the ledger)
        bad = [
            {
                "calculation": d.calculation,
                "date": d.date.isoformat(),
                "status": d.status.value,
                "reason": d.reason.value,
                "detail": d.detail,
            }
            for d in decided.values()
            if d.status is not Status.SKIPPED and not (nightly and d.date == max(root["prices"]))
        ][:10]
        # ``orchestrator status`` over the same plan: every cell by state, the unclean
        # cells and the text report (the plan itself is timed above).
        t3 = time.perf_counter()
        status = build_status(
            manifest.order,
            plan,
            ledger.unclean_cells(manifest.calcs, plan.dates[0], plan.target_date),
            None,
        )
        render_status(status, "text")
        statuses.append(time.perf_counter() - t3)
        del plan, status
        gc.collect()

    profile_text = ""
    if profile or (mode == "digest" and statistics.median(totals) > target):
        prof = cProfile.Profile()
        prof.enable()
        plan_once(ledger, manifest, root, mode)
        prof.disable()
        out = io.StringIO()
        pstats.Stats(prof, stream=out).strip_dirs().sort_stats("tottime").print_stats(20)
        profile_text = out.getvalue()
    ledger.dispose()
    return {
        "mode": mode,
        "cells": n_cells,
        "decided_one_by_one": read,
        "load_s": loads,
        "decide_s": decides,
        "total_s": totals,
        "status_extra_s": statuses,
        "rss_base_mib": base_rss,
        "rss_after_plan_mib": max(after_plan),
        "peak_rss_mib": _peak_rss_mib(),
        "counts": counts,
        "reasons": reasons,
        "not_skipped_sample": bad,
        "profile": profile_text,
    }


def check(url: str, n_calcs: int, n_dates: int, nightly: bool = False) -> dict[str, Any]:
    """Every decision of the digest plan against the full plan's (lists the whole plan)."""
    manifest = Manifest.build(synthetic_specs(n_calcs))
    root = synthetic_root(n_dates + (1 if nightly else 0))
    ledger = Ledger.open(url)
    digest_plan, _, _ = plan_once(ledger, manifest, root, "digest")
    full_plan, _, _ = plan_once(ledger, manifest, root, "full")
    ours = dict(digest_plan.decisions.items())
    theirs = dict(full_plan.decisions.items())
    differing = [k for k in theirs if ours.get(k) != theirs[k]] + [
        k for k in ours if k not in theirs
    ]
    ledger.dispose()
    return {
        "mode": "check",
        "compared": len(theirs),
        "differing": len(differing),
        "sample": [f"{k[0]} {k[1]}: {ours.get(k)} != {theirs.get(k)}" for k in differing[:5]],
        "order_equal": list(digest_plan.order) == list(full_plan.order),
    }


def _stat(values: list[float]) -> dict[str, float]:
    return {
        "median": round(statistics.median(values), 4),
        "min": round(min(values), 4),
        "max": round(max(values), 4),
    }


def _child(args: argparse.Namespace, url: str, mode: str) -> dict[str, Any]:
    cmd = (
        [
            sys.executable,
            __file__,
            "--measure-only",
            mode,
            "--db",
            url,
            "--calcs",
            str(args.calcs),
            "--dates",
            str(args.dates),
            "--repeat",
            str(args.repeat),
            "--target-seconds",
            str(args.target_seconds),
        ]
        + (["--profile"] if args.profile else [])
        + (["--nightly"] if args.nightly else [])
    )
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        print(proc.stdout, proc.stderr, sep="\n", file=sys.stderr)
        raise SystemExit(2)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calcs", type=int, default=100)
    parser.add_argument("--dates", type=int, default=3650)
    parser.add_argument("--db", default=None, help="ledger URL (default: a temporary SQLite file)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--target-seconds", type=float, default=0.5)
    parser.add_argument("--target-mib", type=float, default=200.0)
    parser.add_argument("--check", action="store_true", help="compare every decision")
    parser.add_argument("--no-reference", action="store_true", help="skip the full-path run")
    parser.add_argument(
        "--nightly",
        action="store_true",
        help="plan one more date than the ledger holds (the nightly plan: one NEW per calc)",
    )
    parser.add_argument("--profile", action="store_true", help="always print a cProfile")
    parser.add_argument("--keep", action="store_true", help="keep the database / schema")
    parser.add_argument("--measure-only", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.measure_only:  # a child: print one JSON line
        if args.measure_only == "check":
            result = check(args.db, args.calcs, args.dates, args.nightly)
        else:
            result = measure(
                args.db,
                args.calcs,
                args.dates,
                args.repeat,
                args.profile,
                args.target_seconds,
                args.measure_only,
                args.nightly,
            )
        print(json.dumps(result))
        return 0

    tmpdir = None
    schema = None
    url = args.db
    if url is None:
        tmpdir = tempfile.mkdtemp(prefix="bench_plan_")
        url = f"sqlite:///{tmpdir}/ledger.db"
    elif url.startswith("postgresql") and "search_path" not in url:
        schema = f"bench_plan_{uuid.uuid4().hex[:10]}"
        create_schema(url, schema)
        base_url, url = url, with_search_path(url, schema)
    shown_url = url if schema is None else f"{args.db} (schema {schema})"
    results: dict[str, dict[str, Any]] = {}
    try:
        print(f"ledger: {shown_url}")
        print(f"seeding {args.calcs} calculations x {args.dates} dates ...", flush=True)
        seeded = seed(url, args.calcs, args.dates)
        if seeded["seeded"]:
            print(
                f"  migrations {seeded['migrate_s']:.1f}s, wrote {seeded['seeded']:,} cells in "
                f"{seeded['seed_s']:.1f}s, their digests in {seeded['digest_s']:.1f}s"
            )
        else:
            print(f"  reusing {seeded['existing']:,} existing cells")
            if seeded["digest_s"]:
                print(
                    f"  their digests were of another format: made again in {seeded['digest_s']:.1f}s"
                )
        size = None
        if url.startswith("sqlite:///"):
            size = (
                sum(
                    os.path.getsize(p)
                    for p in Path(url[len("sqlite:///") :]).parent.glob("*")
                    if p.is_file()
                )
                / 2**20
            )
            print(f"  SQLite file(s): {size:.0f} MiB")

        modes = ["digest"] if args.no_reference else ["full", "digest"]
        print(
            f"measuring {' and '.join(modes)} in fresh processes, {args.repeat} repetitions ...",
            flush=True,
        )
        for mode in modes:
            results[mode] = _child(args, url, mode)
        if args.check:
            results["check"] = _child(args, url, "check")
    finally:
        if schema is not None and not args.keep:
            drop_schema(base_url, schema)
        elif schema is not None:
            print(f"kept schema {schema}; reuse with --db '{url}'")
        if tmpdir is not None and not args.keep:
            shutil.rmtree(tmpdir, ignore_errors=True)
        elif tmpdir is not None:
            print(f"kept {tmpdir}")

    expected = args.calcs * args.dates
    r = results["digest"]
    ref = results.get("full")
    new = args.calcs if args.nightly else 0  # the new date: one NEW cell per calculation
    all_skipped = (
        r["counts"].get("SKIPPED", 0) == expected
        and r["cells"] == expected
        and r["reasons"].get("NEW", 0) == new
        and r["counts"].get("RUNNABLE", 0) == new
    )
    print(f"cells in ledger: {r['cells']:,} (expected {expected:,})")
    print(f"plan counts: {r['counts']}  reasons: {r['reasons']}")
    print(f"cells decided one by one: {r['decided_one_by_one']:,}")
    stats = {
        mode: {k: _stat(v[k]) for k in ("load_s", "decide_s", "total_s", "status_extra_s")}
        for mode, v in results.items()
        if mode != "check"
    }
    for label, key in (
        ("read", "load_s"),
        ("plan", "decide_s"),
        ("total", "total_s"),
        ("status", "status_extra_s"),  # on top of the plan: `orchestrator status`
    ):
        s = stats["digest"][key]
        line = f"  {label:<6} median {s['median']:.3f}s  (min {s['min']:.3f} .. max {s['max']:.3f})"
        if ref is not None:
            f = stats["full"][key]
            line += f"   | full-path reference: median {f['median']:.3f}s"
        print(line)
    print(
        f"  RSS: base {r['rss_base_mib']:.0f} MiB, after plan {r['rss_after_plan_mib']:.0f} MiB, "
        f"peak {r['peak_rss_mib']:.0f} MiB"
        + (f"   | full-path reference: peak {ref['peak_rss_mib']:.0f} MiB" if ref else "")
    )
    total = stats["digest"]["total_s"]
    ok_time = total["median"] <= args.target_seconds
    ok_mem = r["peak_rss_mib"] <= args.target_mib
    print(f"target total <= {args.target_seconds:g}s: {'MET' if ok_time else 'MISSED'}")
    print(f"target peak RSS <= {args.target_mib:g} MiB: {'MET' if ok_mem else 'MISSED'}")
    exact = True
    if "check" in results:
        c = results["check"]
        exact = c["differing"] == 0 and c["order_equal"]
        print(
            f"check: {c['compared']:,} decisions compared with the full path, "
            f"{c['differing']} differ, order {'equal' if c['order_equal'] else 'DIFFERS'}"
        )
        for line in c["sample"]:
            print(f"  {line}")
    if not all_skipped:
        print("PLAN IS NOT AS EXPECTED — first non-skipped decisions (planner bug?):")
        for d in r["not_skipped_sample"]:
            print(f"  {d['calculation']} {d['date']} {d['status']}/{d['reason']}: {d['detail']}")
    if r["profile"]:
        print("--- cProfile of one digest plan (tottime) ---")
        print(r["profile"].rstrip())
    print(
        json.dumps(
            {
                "bench": "plan",
                "db": "sqlite" if url.startswith("sqlite") else url.split(":")[0].split("+")[0],
                "calcs": args.calcs,
                "dates": args.dates,
                "cells": r["cells"],
                "repeat": args.repeat,
                "load_s": stats["digest"]["load_s"],
                "decide_s": stats["digest"]["decide_s"],
                "total_s": total,
                "peak_rss_mib": round(r["peak_rss_mib"], 1),
                "rss_after_plan_mib": round(r["rss_after_plan_mib"], 1),
                "decided_one_by_one": r["decided_one_by_one"],
                "reference_total_s": stats["full"]["total_s"] if ref else None,
                "reference_peak_rss_mib": round(ref["peak_rss_mib"], 1) if ref else None,
                "seed_s": round(float(seeded["seed_s"]), 2),
                "db_mib": round(size, 1) if size is not None else None,
                "counts": r["counts"],
                "reasons": r["reasons"],
                "nightly": args.nightly,
                "all_skipped": all_skipped,
                "exact": exact if "check" in results else None,
                "target_s": args.target_seconds,
                "target_met": ok_time,
                "target_mib": args.target_mib,
                "memory_target_met": ok_mem,
            }
        )
    )
    return 0 if all_skipped and exact else 1


if __name__ == "__main__":
    sys.exit(main())
