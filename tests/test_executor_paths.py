"""Every executor path publishes exactly a serial from-scratch build's result hashes (SQLite and
PostgreSQL, one and two workers).

The paths: a pass of root-data cells, a pass holding only cells without root data (driven by
upstream results), a mixed pass, meta-only passes, a standard cell after a meta one. Re-running
only some of them (scoped epoch bumps) is what crashed the workers (issue 8, item 11): a run
whose standard work has no root data of its own sampled no users, so the partition had no
boundaries and ``Partition.span`` raised ``IndexError`` in every worker.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from pathlib import Path

import pytest
from click.testing import CliRunner

from orchestrator.cli import main
from orchestrator.execution.workers import Partition
from tests.conftest import Project, price_rows, scratch_hashes, weekdays

DATES = weekdays(dt.date(2024, 3, 1), 8)
TARGET = DATES[-1]
# A late listing and a gap, so users differ from date to date.
SYMBOLS = [f"S{i:02d}" for i in range(13)]
SKIP = {("S00", d) for d in DATES[:3]} | {("S07", DATES[4]), ("S12", DATES[5])}

CALCS = '''
from orchestrator import MetaCalculation, StandardCalculation


class Base(StandardCalculation):
    name = "base"
    category = "prices"
    root_data = ["prices"]

    def process(self, ctx):
        return {"close": ctx.root["prices"][0]["close"]}


class Derived(StandardCalculation):
    """Without root data: driven by its upstream's users; historical."""

    name = "derived"
    category = "signals"
    dependencies = ["base"]
    historical = True

    def process(self, ctx):
        prev = ctx.previous or {"sum": 0.0, "n": 0}
        return {"sum": round(prev["sum"] + ctx.upstream["base"]["close"], 6), "n": prev["n"] + 1}


class Breadth(MetaCalculation):
    """Meta, next to ``derived`` (a mixed pass of cells without root data)."""

    name = "breadth"
    category = "market"
    dependencies = ["base"]

    def process(self, ctx):
        return {"users": len(ctx.upstream["base"])}


class Summary(MetaCalculation):
    """Alone in its pass: a meta-only pass."""

    name = "summary"
    category = "market"
    dependencies = ["derived"]

    def process(self, ctx):
        values = [r["sum"] for r in ctx.upstream["derived"].values()]
        return {"mean": round(sum(values) / len(values), 6)}


class Relative(StandardCalculation):
    """Standard, after a meta cell, without root data."""

    name = "relative"
    category = "signals"
    dependencies = ["derived", "summary"]

    def process(self, ctx):
        return {"above": ctx.upstream["derived"]["sum"] > ctx.upstream["summary"]["mean"]}
'''
ALL = ["base", "derived", "breadth", "summary", "relative"]


SHARDS = "flush_users = 3\nshard_bytes = 1024\n"  # several shards per cell


def _setup(project: Project) -> None:
    project.write_prices(price_rows(SYMBOLS, DATES, skip=SKIP))
    project.extra_config = SHARDS
    project.write_calcs(CALCS)


def _bump(project: Project, calc: str) -> None:
    orch = project.orchestrator()
    try:
        orch.bump_epoch(calc, "test")
    finally:
        orch.close()


@pytest.fixture
def serial_hashes(tmp_path: Path) -> dict:
    """A from-scratch serial build of the same code and data, in its own SQLite ledger."""
    rows = price_rows(SYMBOLS, DATES, skip=SKIP)
    return scratch_hashes(tmp_path, rows, CALCS, TARGET, name="serial", extra_config=SHARDS)


@pytest.mark.parametrize("workers", [1, 2])
def test_every_executor_path_publishes_the_serial_hashes(
    project: Project, serial_hashes: dict, workers: int
) -> None:
    _setup(project)
    first = project.run(TARGET, workers=workers)
    assert first.ok
    assert Counter(c for c, _ in first.executed) == {c: len(DATES) for c in ALL}
    assert project.result_hashes() == serial_hashes
    # Each bump re-runs one pass's cells without root data (and early cutoff stops there):
    # a pass of standard cells driven by upstream results alone, a meta-only pass, a standard
    # cell after a meta cell, a meta cell in a mixed pass.
    for calc in ["derived", "summary", "relative", "breadth"]:
        _bump(project, calc)
        again = project.run(TARGET, workers=workers)
        assert again.ok, again.failed
        assert Counter(c for c, _ in again.executed) == {calc: len(DATES)}
        assert set(again.executed.values()) == {"EPOCH_CHANGED"}
        assert project.result_hashes() == serial_hashes


def test_the_bundled_example_reruns_risk_score_on_two_workers(tmp_path: Path) -> None:
    """The report of item 11, on the bundled example (smaller): run with two workers, bump
    ``risk_score``'s epoch, run again."""
    repo = Path(__file__).resolve().parents[1]
    (tmp_path / "system_epoch.py").write_text("SYSTEM_EPOCH = 0\n")
    data = tmp_path / "prices.csv.gz"
    import subprocess
    import sys

    subprocess.run(
        [sys.executable, str(repo / "scripts" / "make_example_data.py"), "--out", str(data)]
        + ["--symbols", "12", "--days", "30"],
        check=True,
        capture_output=True,
    )
    (tmp_path / "orchestrator.toml").write_text(
        f'database_url = "sqlite:///{tmp_path / "ledger.db"}"\n'
        'calculations = "calculations.prices"\n'
        f'[root_data.prices]\npath = "{data}"\nuser_column = "Name"\n'
    )
    runner = CliRunner()
    args = ["--config", str(tmp_path / "orchestrator.toml")]
    run = [*args, "run", "--date", "2024-12-31", "--workers", "2"]
    first = runner.invoke(main, run)
    assert first.exit_code == 0, first.output
    bump = runner.invoke(main, [*args, "epoch", "bump", "--calc", "risk_score"])
    assert bump.exit_code == 0, bump.output
    second = runner.invoke(main, run)
    assert second.exit_code == 0, second.output
    assert "IndexError" not in second.output
    assert ": 30 cells computed, 0 failed" in second.output


@pytest.mark.parametrize("count", [1, 2, 3, 5])
@pytest.mark.parametrize("users", [set(), {"a"}, {"a", "b"}, {f"u{i:03d}" for i in range(100)}])
def test_a_partition_has_one_span_per_worker_and_they_cover_every_user(
    users: set[str], count: int
) -> None:
    partition = Partition.balanced(users, count)
    assert partition.size == count
    spans = [partition.span(k) for k in range(count)]
    with pytest.raises(IndexError):
        partition.span(count)
    for user in ["", "a", "b", "u050", "zzz", *users]:
        owners = [
            k
            for k, (lo, hi) in enumerate(spans)
            if (lo is None or user >= lo) and (hi is None or user < hi)
        ]
        assert len(owners) == 1, (user, spans)
