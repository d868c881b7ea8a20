"""Reverts are free (constructive traces): a cell whose current fingerprint equals one it has
a retained result for is re-pointed to that result without computing (REUSED), on SQLite and
PostgreSQL.

A code change and its revert, a data correction and its revert, an epoch edited back, an old
version only cosmetically different from the current code; the per-user and the columnar
engine, in one process and with workers; what is never retained (a result with failed users),
retention bounded per cell, ``orchestrator gc`` (never a current result), a selection that
leaves a reused upstream outside, and the pure retention policy as a Hypothesis property.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import func, select

from orchestrator.errors import RunLockedError
from orchestrator.ledger import retention
from orchestrator.ledger.models import CELLS, RETAINED, SHARDS
from orchestrator.ledger.store import lock_holder
from orchestrator.planning import Reason
from tests import test_blocks as blocks
from tests.conftest import Project, price_rows, scratch_hashes
from tests.test_scenarios import BASE, DATES, SYMBOLS, TARGET

PERIOD_4 = BASE.replace("period = 3", "period = 4")
# The same code as BASE up to a renamed local: proven cosmetic (``equivalence.py``).
RENAMED = BASE.replace("values = [r", "found = [r").replace(
    '"n": len(values), "mean_rsi": sum(values) / len(values) if values else None',
    '"n": len(found), "mean_rsi": sum(found) / len(found) if found else None',
)


def _retained(project: Project) -> Counter[tuple[str, dt.date]]:
    """Retained results per cell."""
    orch = project.orchestrator()
    try:
        with orch.ledger.engine.connect() as conn:
            rows = conn.execute(select(RETAINED.c.calculation, RETAINED.c.date)).all()
    finally:
        orch.close()
    return Counter((r[0], r[1]) for r in rows)


def _generations(project: Project) -> set[tuple[str, dt.date, str]]:
    """Every (calculation, date, generation) that has shards."""
    orch = project.orchestrator()
    try:
        with orch.ledger.engine.connect() as conn:
            rows = conn.execute(
                select(SHARDS.c.calculation, SHARDS.c.date, SHARDS.c.generation).distinct()
            ).all()
    finally:
        orch.close()
    return {(r[0], r[1], r[2]) for r in rows}


def _held(project: Project, table: Any) -> set[tuple[str, dt.date, str]]:
    """The (calculation, date, generation) of the current cells or the retained results."""
    orch = project.orchestrator()
    try:
        with orch.ledger.engine.connect() as conn:
            rows = conn.execute(select(table.c.calculation, table.c.date, table.c.generation)).all()
    finally:
        orch.close()
    return {(r[0], r[1], r[2]) for r in rows}


def _results(project: Project) -> dict[tuple[str, dt.date], Any]:
    """Every published cell's decoded result."""
    orch = project.orchestrator()
    try:
        cells = orch.ledger.load_cells()
        return {
            (name, date): orch.load_result(name, date)
            for name, per_date in cells.items()
            for date, cell in per_date.items()
            if cell.result_hash is not None
        }
    finally:
        orch.close()


def _start(project: Project, calcs: str = BASE) -> tuple[Any, dict[Any, str | None]]:
    project.write_prices(price_rows(SYMBOLS, DATES))
    project.write_calcs(calcs)
    first = project.run(TARGET)
    assert first.ok
    return first, project.result_hashes()


def test_a_reverted_code_change_computes_nothing_and_why_names_the_result(
    project: Project,
) -> None:
    first, before = _start(project)
    results = _results(project)
    project.write_calcs(PERIOD_4)
    changed = project.run(TARGET)
    assert changed.ok and changed.completed > 0
    assert project.result_hashes() != before
    recomputed = set(changed.executed)

    project.write_calcs(BASE)
    plan = project.plan(TARGET)
    reused = {k for k, d in plan.decisions.items() if d.reason is Reason.REUSED}
    assert reused == recomputed  # every cell the change re-ran, and nothing else
    assert plan.counts()["RUNNABLE"] == 0 and plan.counts()["BLOCKED"] == 0
    detail = plan.decisions[("rsi", DATES[5])].detail
    assert f"of run {first.run_id[:8]}" in detail and "else CODE_CHANGED" in detail

    status = project.cli("status", "--date", str(TARGET))
    assert status.exit_code == 1, status.output  # not re-pointed yet: the next run does it

    reverted = project.run(TARGET)
    assert reverted.ok
    assert reverted.completed == 0 and reverted.executed == {}
    assert reverted.reused == len(recomputed)
    assert "reused (stored results of the same fingerprint)" in reverted.headline()
    assert project.result_hashes() == before
    assert _results(project) == results

    why = project.cli("why", "signal", str(DATES[5]))
    assert why.exit_code == 0, why.output
    assert "UP_TO_DATE" in why.output
    assert f"run {reverted.run_id[:8]}" in why.output and "REUSED (REUSED)" in why.output
    assert f"of run {first.run_id[:8]}" in why.output  # the result it re-pointed to

    # Back and forth: the changed version's results were retained in turn.
    project.write_calcs(PERIOD_4)
    again = project.run(TARGET)
    assert again.completed == 0 and again.reused == len(recomputed)
    assert project.result_hashes() != before
    # And the ledger holds no shards but the current and the retained results'.
    assert _generations(project) == _held(project, CELLS) | _held(project, RETAINED)
    assert sum(_retained(project).values()) == len(recomputed)


def test_a_reverted_data_correction_reuses_the_cell_and_its_dependents(
    project: Project,
) -> None:
    _, before = _start(project)
    corrected = price_rows(SYMBOLS, DATES)
    for row in corrected:
        if row["Name"] == "BBB" and row["date"] == DATES[4].isoformat():
            row["close"] += 5
    project.write_prices(corrected)
    fixed = project.run(TARGET)
    assert fixed.ok and fixed.completed > 0
    assert ("price_extractor", DATES[4]) in fixed.executed

    project.write_prices(price_rows(SYMBOLS, DATES))
    plan = project.plan(TARGET)
    assert plan.decisions[("price_extractor", DATES[4])].reason is Reason.REUSED
    assert "else ROOT_DATA_CHANGED" in plan.decisions[("price_extractor", DATES[4])].detail
    reverted = project.run(TARGET)
    assert reverted.ok and reverted.completed == 0
    assert reverted.reused == len(fixed.executed)
    assert project.result_hashes() == before


def test_an_epoch_edited_back_reuses_what_the_old_epoch_computed(project: Project) -> None:
    _, before = _start(project)
    epoch_file = project.root / "system_epoch.py"
    bumped = project.cli("epoch", "bump", "--reason", "try")
    assert bumped.exit_code == 0, bumped.output
    rerun = project.run(TARGET)
    assert rerun.ok and rerun.completed == len(before)
    epoch_file.write_text(epoch_file.read_text().replace("SYSTEM_EPOCH = 1", "SYSTEM_EPOCH = 0"))
    plan = project.plan(TARGET)
    assert {d.reason for d in plan.decisions.values()} == {Reason.REUSED}
    back = project.run(TARGET)
    assert back.ok and back.completed == 0 and back.reused == len(before)
    assert project.result_hashes() == before


def test_an_old_version_cosmetically_equal_to_the_current_code_is_reused(
    project: Project,
) -> None:
    _, before = _start(project, RENAMED)
    project.write_calcs(BASE)  # a renamed local: cosmetic, nothing re-runs
    cosmetic = project.run(TARGET)
    assert cosmetic.completed == 0
    project.write_calcs(BASE.replace("values = [r", "values = [2 * r"))  # a real change
    changed = project.run(TARGET)
    assert changed.completed > 0
    project.write_calcs(RENAMED)  # the first version: its results were stored under BASE
    back = project.run(TARGET)
    assert back.completed == 0 and back.reused == len(changed.executed)
    assert project.result_hashes() == before


@pytest.mark.parametrize(("columnar", "workers"), [(True, 1), (False, 1), (False, 2)])
def test_both_engines_reuse_including_a_historical_chain(
    project: Project, columnar: bool, workers: int
) -> None:
    project.extra_config = f"columnar = {'true' if columnar else 'false'}\n"
    project.write_prices(blocks.rows())
    project.write_calcs(blocks.SOURCE)
    assert project.run(blocks.TARGET, workers=workers).ok
    before = project.result_hashes()
    project.write_calcs(blocks.source({"ema": [("alpha = 0.5", "alpha = 0.3")]}))
    changed = project.run(blocks.TARGET, workers=workers)
    assert changed.ok
    assert {k[0] for k in changed.executed} == {"ema", "flag", "market"}
    project.write_calcs(blocks.SOURCE)
    back = project.run(blocks.TARGET, workers=workers)
    assert back.ok and back.completed == 0 and back.reused == len(changed.executed)
    assert project.result_hashes() == before
    # A data correction and its revert, through every calculation.
    project.write_prices(blocks.rows(closes={("AAA", blocks.DATES[2]): 77.0}))
    fixed = project.run(blocks.TARGET, workers=workers)
    assert fixed.ok and fixed.completed > 0
    project.write_prices(blocks.rows())
    undone = project.run(blocks.TARGET, workers=workers)
    assert undone.ok and undone.completed == 0 and undone.reused == len(fixed.executed)
    assert project.result_hashes() == before


# One user of three fails in signal: published PARTIAL (its failure rate allows it).
FAILING = BASE.replace(
    '    def process(self, ctx):\n        rsi = ctx.upstream["rsi"]["rsi"]',
    "    max_failure_rate = 0.5\n\n"
    '    def process(self, ctx):\n        if ctx.user == "BBB":\n'
    '            raise ValueError("no BBB")\n        rsi = ctx.upstream["rsi"]["rsi"]',
)


def test_a_result_with_failed_users_is_never_retained_nor_reused(project: Project) -> None:
    project.extra_config = "max_attempts = 10\n"
    project.write_prices(price_rows(SYMBOLS, DATES))
    project.write_calcs(FAILING)
    partial = project.run(TARGET)
    assert not partial.ok and partial.users_failed
    project.write_calcs(BASE)
    fixed = project.run(TARGET)
    assert fixed.ok and fixed.completed > 0
    assert not any(name == "signal" for name, _ in _retained(project))
    project.write_calcs(FAILING)
    again = project.run(TARGET)
    assert again.reused == 0 and {k[0] for k in again.executed} == {"signal"}
    assert not again.ok  # computed, failing again: never a clean result served for it


def test_retention_is_bounded_per_cell_and_gc_never_prunes_a_current_result(
    project: Project, tmp_path: Path
) -> None:
    _start(project)
    variants = [BASE.replace("period = 3", f"period = {p}") for p in (4, 5, 6, 7, 8)]
    for source in variants:
        project.write_calcs(source)
        assert project.run(TARGET).ok
    kept = _retained(project)
    assert kept and max(kept.values()) == 3  # retain_results defaults to 3 per cell
    current = project.result_hashes()
    results = _results(project)

    dry = project.cli("gc", "--keep", "1", "--dry-run")
    assert dry.exit_code == 0 and "would prune" in dry.output, dry.output
    assert _retained(project) == kept
    one = project.cli("gc", "--keep", "1")
    assert one.exit_code == 0 and "pruned" in one.output, one.output
    assert max(_retained(project).values()) == 1
    # The newest retained result is the one kept: the version before the last is reused.
    project.write_calcs(variants[-2])
    back = project.run(TARGET)
    assert back.completed == 0 and back.reused > 0
    project.write_calcs(variants[-1])
    assert project.run(TARGET).completed == 0
    assert project.result_hashes() == current

    none = project.cli("gc", "--keep", "0")
    assert none.exit_code == 0, none.output
    assert not _retained(project)
    assert _results(project) == results  # every current result is still whole
    assert project.result_hashes() == scratch_hashes(
        tmp_path, price_rows(SYMBOLS, DATES), variants[-1], TARGET
    )
    # Nothing retained: a revert computes again.
    project.write_calcs(variants[-2])
    assert project.run(TARGET).completed > 0


def test_gc_by_age_and_under_the_run_lock(project: Project) -> None:
    _start(project)
    project.write_calcs(PERIOD_4)
    assert project.run(TARGET).ok
    orch = project.orchestrator()
    try:
        young = orch.gc(keep=3, older_than_days=1)
        assert young.pruned == 0 and young.kept > 0
        later = dt.datetime.now(dt.UTC) + dt.timedelta(days=2)
        old = orch.gc(keep=3, older_than_days=1, now=later, dry_run=True)
        assert old.pruned == young.kept and old.pruned_bytes > 0
        holder = lock_holder("another-run")
        orch.ledger.acquire_lock(holder, dt.datetime.now(dt.UTC), dt.timedelta(minutes=5))
        with pytest.raises(RunLockedError):
            orch.gc(keep=0)
        orch.ledger.release_lock(holder)
    finally:
        orch.close()
    assert sum(_retained(project).values()) == young.kept
    bad = project.cli("gc", "--keep", "-1")
    assert bad.exit_code == 2


def test_retain_results_0_keeps_no_superseded_result(project: Project) -> None:
    project.extra_config = "retain_results = 0\n"
    _start(project)
    project.write_calcs(PERIOD_4)
    changed = project.run(TARGET)
    assert not _retained(project)
    project.write_calcs(BASE)
    back = project.run(TARGET)
    assert back.reused == 0 and back.completed == changed.completed


def test_orphans_are_collected_but_retained_shards_are_not(project: Project) -> None:
    _start(project)
    project.write_calcs(PERIOD_4)
    assert project.run(TARGET).ok
    before = _generations(project)
    orch = project.orchestrator()
    try:
        assert orch.ledger.collect_orphans() == 0
    finally:
        orch.close()
    assert _generations(project) == before


def test_a_selection_leaves_a_dependent_of_an_unapplied_reuse_waiting(project: Project) -> None:
    _, before = _start(project)
    project.write_calcs(PERIOD_4)
    assert project.run(TARGET).ok
    changed = project.result_hashes()
    project.write_calcs(BASE)
    orch = project.orchestrator()
    try:
        selection = frozenset({"signal"})
        summary = orch.run(TARGET, selection=selection)
    finally:
        orch.close()
    # rsi is REUSED outside the selection: signal must not be re-pointed against it yet.
    assert not summary.ok and summary.waiting
    assert project.result_hashes() == changed
    done = project.run(TARGET)
    assert done.ok and done.completed == 0
    assert project.result_hashes() == before


# --- the retention policy, for every input ---------------------------------------------------

_T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
_entry = st.builds(
    lambda i, calc, day, hours: retention.Entry(
        i,
        calc,
        dt.date(2024, 1, 1) + dt.timedelta(days=day),
        f"g{i}",
        _T0 + dt.timedelta(hours=hours),
    ),
    st.integers(0, 10**6),
    st.sampled_from(["a", "b"]),
    st.integers(0, 3),
    st.integers(0, 200),
)


@given(
    entries=st.lists(_entry, max_size=40, unique_by=lambda e: e.id),
    keep=st.integers(0, 5),
    days=st.none() | st.integers(0, 10),
)
def test_prunable_keeps_exactly_each_cells_newest_within_the_age(
    entries: list[retention.Entry], keep: int, days: int | None
) -> None:
    now = _T0 + dt.timedelta(days=5)
    older = None if days is None else dt.timedelta(days=days)
    pruned = set(retention.prunable(entries, keep, older, now))
    kept = [e for e in entries if e not in pruned]
    for cell in {(e.calculation, e.date) for e in entries}:
        mine = sorted(
            (e for e in entries if (e.calculation, e.date) == cell),
            key=lambda e: (e.retained_at, e.id),
            reverse=True,
        )
        expected = [e for e in mine[:keep] if older is None or now - e.retained_at <= older]
        assert {e.id for e in kept if (e.calculation, e.date) == cell} == {e.id for e in expected}
    # More kept never prunes more.
    assert set(retention.prunable(entries, keep + 1, older, now)) <= pruned
    with pytest.raises(ValueError):
        retention.prunable(entries, -1)


def test_gc_report_counts_bytes_of_the_shards_it_prunes(project: Project) -> None:
    _start(project)
    project.write_calcs(PERIOD_4)
    assert project.run(TARGET).ok
    orch = project.orchestrator()
    try:
        with orch.ledger.engine.connect() as conn:
            retained_bytes = conn.execute(
                select(func.sum(func.length(SHARDS.c.data))).where(
                    SHARDS.c.generation.in_(select(RETAINED.c.generation))
                )
            ).scalar_one()
        report = orch.gc(keep=0)
    finally:
        orch.close()
    assert report.pruned_bytes == retained_bytes and report.kept == 0


def test_a_ledger_of_0006_upgrades_and_its_results_are_retained_from_then_on(
    project: Project,
) -> None:
    from orchestrator.ledger.store import current_revision, downgrade, make_engine

    _, before = _start(project)
    engine = make_engine(project.db_url)
    downgrade(engine, "0006")  # the ledger as the previous release left it
    assert current_revision(engine) == "0006"
    engine.dispose()
    project.write_calcs(PERIOD_4)  # opens the ledger: migrated to head first
    changed = project.run(TARGET)
    assert changed.ok and changed.completed > 0
    project.write_calcs(BASE)
    back = project.run(TARGET)
    assert back.completed == 0 and back.reused == changed.completed
    assert project.result_hashes() == before
    # Results published before the upgrade have no attempt naming their generation.
    plan_detail = project.cli("why", "rsi", str(DATES[5]))
    assert "REUSED" in plan_detail.output and "(computed " in plan_detail.output


def test_a_saved_plan_that_reuses_results_is_refused_once_gc_pruned_them(
    project: Project, tmp_path: Path
) -> None:
    _start(project)
    project.write_calcs(PERIOD_4)
    assert project.run(TARGET).ok
    project.write_calcs(BASE)
    path = tmp_path / "p.json"
    saved = project.cli("plan", "--date", str(TARGET), "--save", str(path))
    assert saved.exit_code == 0, saved.output
    assert project.cli("gc", "--keep", "0").exit_code == 0  # the results it would reuse
    refused = project.cli("run", "--plan", str(path))
    assert refused.exit_code == 2
    assert "ledger changed since the plan was made" in refused.output
    assert "rsi" in refused.output
