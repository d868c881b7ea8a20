"""Benchmark: the cost of simulating calculations (the simulation hash behind COSMETIC_CHANGE).

For every calculation of a config (default ``examples/sp500.toml``), simulates it alone — its
upstream closure's simulations are computed first and not counted — on the fabricated world,
with line tracing on, and reports the median wall time over repetitions, the number of
fabricated outputs and the lines of its module that ran. Uses the column types recorded in the
config's ledger (run the config once first); without them it fabricates one float column.

Usage:
    .venv/bin/python scripts/bench_simulation.py [--config examples/sp500.toml] [--repeat 5]
The last line printed is one JSON object of figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from orchestrator.app import Orchestrator
from orchestrator.simulation import simulate, simulate_one

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", type=Path, default=REPO / "examples" / "sp500.toml")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    orch = Orchestrator.from_config(args.config)
    manifest = orch.manifest
    schemas = orch.ledger.load_root_schemas()
    figures: dict[str, dict[str, float | int]] = {}
    for name in manifest.order:
        spec = manifest.calcs[name]
        upstream = simulate(manifest, set(spec.dependencies), schemas) if spec.dependencies else {}
        times = []
        sim = None
        for _ in range(args.repeat):
            start = time.perf_counter()
            sims = dict(upstream)
            sim = simulate_one(spec, manifest, sims, schemas)
            times.append(time.perf_counter() - start)
        assert sim is not None
        figures[name] = {
            "ms_median": round(statistics.median(times) * 1000, 2),
            "outputs": len(sim.outputs),
            "lines_executed": len(sim.lines),
        }
        print(
            f"{name:20} {figures[name]['ms_median']:8.2f} ms  "
            f"{figures[name]['outputs']:3d} outputs  {figures[name]['lines_executed']:3d} lines"
        )
    total = sum(f["ms_median"] for f in figures.values())
    print(
        f"all {len(figures)} calculations: {total:.1f} ms"
        f" (schemas known: {', '.join(sorted(schemas)) or 'none'})"
    )
    print(
        json.dumps(
            {
                "bench": "simulation",
                "config": str(args.config),
                "per_calc": figures,
                "total_ms": round(total, 2),
            }
        )
    )
    orch.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
