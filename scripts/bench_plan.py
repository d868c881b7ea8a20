#!/usr/bin/env python
"""Benchmark: plan time of the "no-op nightly" over a synthetic ledger.

Builds 100 synthetic calculations (10 layers x 10, each depending on 1-3 calculations of
earlier layers, a few historical, the first layer and a few others reading the root dataset
"prices" with lookbacks 1..20) and a root index of 3,650 consecutive days, fills the ledger
with one COMPLETED cell per calculation x date whose fingerprint is exactly what the planner
computes, then measures, over several repetitions in a fresh process:

  (a) ``Ledger.load_cells`` — the bulk ledger read of ``Orchestrator.observe``;
  (b) ``make_plan(PlanRequest(...))`` — the pure decision over every cell;
  (c) both together, plus the peak RSS of the measuring process.

The plan must be all SKIPPED / UP_TO_DATE; otherwise the first non-skipped decisions are
printed (a planner bug). When the total exceeds the target, a cProfile of one plan is printed.

Usage:
    .venv/bin/python scripts/bench_plan.py [--calcs 100] [--dates 3650] [--db URL]
        [--repeat 3] [--target-seconds 2] [--profile] [--keep]

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
    MoreObservation,
    PlanRequest,
    Status,
    make_plan,
    plan_with,
)

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
    manifest: Manifest, root: dict[str, dict[dt.date, str]], ledger: Any
) -> PlanRequest:
    return PlanRequest(
        manifest=manifest,
        ledger=ledger,
        root=root,
        epoch=EPOCH,
        target=max(root["prices"]),
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
        ledger.dispose()
        return {"seeded": 0, "existing": existing, "migrate_s": t_migrate, "seed_s": 0.0}

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
    ledger.dispose()
    return {"seeded": written, "existing": 0, "migrate_s": t_migrate, "seed_s": t_seed}


# --- measuring (runs in a fresh child process so its peak RSS is the plan's own) ----------


def _rss_mib() -> float:
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    except ImportError:  # pragma: no cover
        return float("nan")


def measure(
    url: str, n_calcs: int, n_dates: int, repeat: int, profile: bool, target: float
) -> dict[str, Any]:
    manifest = Manifest.build(synthetic_specs(n_calcs))
    root = synthetic_root(n_dates)
    ledger = Ledger.open(url)
    gc.collect()
    base_rss = _rss_mib()
    loads: list[float] = []
    decides: list[float] = []
    totals: list[float] = []
    after_load: list[float] = []
    after_plan: list[float] = []
    counts: dict[str, int] = {}
    reasons: dict[str, int] = {}
    bad: list[dict[str, str]] = []
    n_cells = 0
    for _ in range(repeat):
        t0 = time.perf_counter()
        cells = ledger.load_cells(manifest.calcs, slim=True)  # as Orchestrator.observe does
        t1 = time.perf_counter()
        after_load.append(_rss_mib())
        plan, _ = plan_with(
            build_request(manifest, root, cells),
            lambda names: MoreObservation(ledger.load_cells(names), {}, {}),
        )
        t2 = time.perf_counter()
        after_plan.append(_rss_mib())
        loads.append(t1 - t0)
        decides.append(t2 - t1)
        totals.append(t2 - t0)
        n_cells = sum(len(per_date) for per_date in cells.values())
        counts = plan.counts()
        reasons = plan.reason_counts()
        bad = [
            {
                "calculation": d.calculation,
                "date": d.date.isoformat(),
                "status": d.status.value,
                "reason": d.reason.value,
                "detail": d.detail,
            }
            for k in plan.order
            if (d := plan.decisions[k]).status is not Status.SKIPPED
        ][:10]
        del cells, plan
        gc.collect()

    profile_text = ""
    if profile or statistics.median(totals) > target:
        cells = ledger.load_cells(manifest.calcs, slim=True)  # as Orchestrator.observe does
        request = build_request(manifest, root, cells)
        prof = cProfile.Profile()
        prof.enable()
        make_plan(request)
        prof.disable()
        out = io.StringIO()
        stats = pstats.Stats(prof, stream=out).strip_dirs()
        stats.sort_stats("tottime").print_stats(15)
        out.write("\n--- load_cells ---\n")
        del cells, request
        gc.collect()
        prof = cProfile.Profile()
        prof.enable()
        ledger.load_cells(manifest.calcs)
        prof.disable()
        pstats.Stats(prof, stream=out).strip_dirs().sort_stats("tottime").print_stats(12)
        profile_text = out.getvalue()
    ledger.dispose()
    return {
        "cells": n_cells,
        "load_s": loads,
        "decide_s": decides,
        "total_s": totals,
        "rss_base_mib": base_rss,
        "rss_after_load_mib": max(after_load),
        "rss_after_plan_mib": max(after_plan),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "counts": counts,
        "reasons": reasons,
        "not_skipped_sample": bad,
        "profile": profile_text,
    }


def _stat(values: list[float]) -> dict[str, float]:
    return {
        "median": round(statistics.median(values), 4),
        "min": round(min(values), 4),
        "max": round(max(values), 4),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calcs", type=int, default=100)
    parser.add_argument("--dates", type=int, default=3650)
    parser.add_argument("--db", default=None, help="ledger URL (default: a temporary SQLite file)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--target-seconds", type=float, default=2.0)
    parser.add_argument("--profile", action="store_true", help="always print a cProfile")
    parser.add_argument("--keep", action="store_true", help="keep the database / schema")
    parser.add_argument("--measure-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.measure_only:  # the child: print one JSON line
        result = measure(
            args.db, args.calcs, args.dates, args.repeat, args.profile, args.target_seconds
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
    try:
        print(f"ledger: {shown_url}")
        print(f"seeding {args.calcs} calculations x {args.dates} dates ...", flush=True)
        seeded = seed(url, args.calcs, args.dates)
        if seeded["seeded"]:
            print(
                f"  migrations {seeded['migrate_s']:.1f}s, wrote {seeded['seeded']:,} cells in {seeded['seed_s']:.1f}s"
            )
        else:
            print(f"  reusing {seeded['existing']:,} existing cells")
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

        print(f"measuring in a fresh process, {args.repeat} repetitions ...", flush=True)
        cmd = [
            sys.executable,
            __file__,
            "--measure-only",
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
        ] + (["--profile"] if args.profile else [])
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            print(proc.stdout, proc.stderr, sep="\n", file=sys.stderr)
            return 2
        r = json.loads(proc.stdout.strip().splitlines()[-1])
    finally:
        if schema is not None and not args.keep:
            drop_schema(base_url, schema)
        elif schema is not None:
            print(f"kept schema {schema}; reuse with --db '{url}'")
        if tmpdir is not None and not args.keep:
            shutil.rmtree(tmpdir, ignore_errors=True)
        elif tmpdir is not None:
            print(f"kept {tmpdir}")

    load, decide, total = _stat(r["load_s"]), _stat(r["decide_s"]), _stat(r["total_s"])
    expected = args.calcs * args.dates
    all_skipped = r["counts"].get("SKIPPED", 0) == expected and r["cells"] == expected
    print(f"cells in ledger: {r['cells']:,} (expected {expected:,})")
    print(f"plan counts: {r['counts']}  reasons: {r['reasons']}")
    for label, s in (("load_cells", load), ("make_plan", decide), ("total", total)):
        print(
            f"  {label:<11} median {s['median']:.3f}s  (min {s['min']:.3f} .. max {s['max']:.3f})"
        )
    print(
        f"  RSS: base {r['rss_base_mib']:.0f} MiB, after load {r['rss_after_load_mib']:.0f} MiB, "
        f"after plan {r['rss_after_plan_mib']:.0f} MiB, peak {r['peak_rss_mib']:.0f} MiB"
    )
    ok_time = total["median"] <= args.target_seconds
    print(f"target total <= {args.target_seconds:g}s: {'MET' if ok_time else 'MISSED'}")
    if not all_skipped:
        print("PLAN IS NOT ALL SKIPPED — first non-skipped decisions (planner bug?):")
        for d in r["not_skipped_sample"]:
            print(f"  {d['calculation']} {d['date']} {d['status']}/{d['reason']}: {d['detail']}")
    if r["profile"]:
        print("--- cProfile of one make_plan (tottime) ---")
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
                "load_s": load,
                "decide_s": decide,
                "total_s": total,
                "peak_rss_mib": round(r["peak_rss_mib"], 1),
                "rss_after_plan_mib": round(r["rss_after_plan_mib"], 1),
                "seed_s": round(float(seeded["seed_s"]), 2),
                "db_mib": round(size, 1) if size is not None else None,
                "counts": r["counts"],
                "reasons": r["reasons"],
                "all_skipped": all_skipped,
                "target_s": args.target_seconds,
                "target_met": ok_time,
            }
        )
    )
    return 0 if all_skipped else 1


if __name__ == "__main__":
    sys.exit(main())
