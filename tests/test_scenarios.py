"""The dispatcher's state machine, walked end to end on a real ledger (SQLite and PostgreSQL).

Seed 004, manual §5: A logic change, C upstream invalidation cascade, D upstream stability
firewall, E impossible state, F category migration — plus the nightly no-op, comment-only
edits, epoch bump, root data corrections, failures and catch-up. (B, the cosmetic refactor
proven by simulation, belongs to the audit-chain issue; a comment-only edit is covered here.)
Each test asserts exactly which cells run and which are skipped, with their reasons.
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
from collections import Counter

import pytest

from orchestrator.app import bump_epoch
from orchestrator.errors import RootDataError
from orchestrator.planning import Reason, Status
from orchestrator.reporting import render
from tests.conftest import Project, price_rows, weekdays

DATES = weekdays(dt.date(2024, 1, 1), 12)
SYMBOLS = ["AAA", "BBB", "CCC"]
TARGET = DATES[-1]

BASE = '''
from orchestrator import MetaCalculation, StandardCalculation


class PriceExtractor(StandardCalculation):
    name = "price_extractor"
    category = "prices"
    root_data = ["prices"]

    def process(self, ctx):
        return {"close": ctx.root["prices"][0]["close"]}


class RSI(StandardCalculation):
    """Relative strength of the last `period` closes (a simple stand-in for Wilder's RSI)."""

    name = "rsi"
    category = "signals"
    dependencies = ["price_extractor"]
    historical = True
    period = 3
    nullable = ("rsi",)  # warm-up: no moves on the first date

    def process(self, ctx):
        close = ctx.upstream["price_extractor"]["close"]
        prev = ctx.previous or {"closes": []}
        closes = (prev["closes"] + [close])[-(self.period + 1):]
        moves = [b - a for a, b in zip(closes, closes[1:])]
        gain = sum(m for m in moves if m > 0)
        loss = -sum(m for m in moves if m < 0)
        rsi = None if not moves else (100.0 if loss == 0 else 100 - 100 / (1 + gain / loss))
        return {"closes": closes, "rsi": rsi}


class Signal(StandardCalculation):
    name = "signal"
    category = "signals"
    dependencies = ["rsi"]

    def process(self, ctx):
        rsi = ctx.upstream["rsi"]["rsi"]
        return {"overbought": rsi is not None and rsi > 70}


class Market(MetaCalculation):
    name = "market"
    category = "market"
    dependencies = ["rsi"]

    def process(self, ctx):
        values = [r["rsi"] for r in ctx.upstream["rsi"].values() if r["rsi"] is not None]
        return {"n": len(values), "mean_rsi": sum(values) / len(values) if values else None}
'''

CALCS = ["price_extractor", "rsi", "signal", "market"]


def setup(project: Project, source: str = BASE, rows=None) -> None:
    project.write_prices(rows if rows is not None else price_rows(SYMBOLS, DATES))
    project.write_calcs(source)


def run(project: Project, target: dt.date = TARGET, **kwargs):
    """``Project.run`` with this module's TARGET as the default date."""
    return project.run(target, **kwargs)


def plan(project: Project, target: dt.date = TARGET):
    """``Project.plan`` with this module's TARGET as the default date."""
    return project.plan(target)


def executed(summary) -> dict[str, int]:
    return dict(Counter(calc for calc, _ in summary.executed))


def reasons_of(summary, calc: str) -> set[str]:
    return {r for (c, _), r in summary.executed.items() if c == calc}


def test_cold_run_computes_everything_and_second_run_is_a_noop(project: Project) -> None:
    setup(project)
    first = run(project)
    assert first.ok
    assert executed(first) == {c: len(DATES) for c in CALCS}
    assert set(first.executed.values()) == {"NEW"}

    again = plan(project)
    assert again.counts() == {
        "RUNNABLE": 0,
        "SKIPPED": 4 * len(DATES),
        "BLOCKED": 0,
        "IMPOSSIBLE": 0,
    }
    assert {d.reason for d in again.decisions.values()} == {Reason.UP_TO_DATE}
    second = run(project)
    assert second.executed == {} and second.skipped == 4 * len(DATES)


def test_cold_plan_orders_dependents_after_upstream(project: Project) -> None:
    setup(project)
    p = plan(project)
    position = {key: i for i, key in enumerate(p.order)}
    for date in DATES:
        assert position[("price_extractor", date)] < position[("rsi", date)]
        assert position[("rsi", date)] < position[("signal", date)]
    for a, b in itertools.pairwise(DATES):
        assert position[("rsi", a)] < position[("rsi", b)]


def test_scenario_a_logic_change_reruns_the_calc_and_what_its_new_results_change(
    project: Project,
) -> None:
    setup(project)
    run(project)
    project.write_calcs(BASE.replace("period = 3", "period = 5"))

    p = plan(project)
    rsi = [p.decisions[("rsi", d)] for d in DATES]
    assert {d.reason for d in rsi} == {Reason.CODE_CHANGED}
    assert {p.decisions[("price_extractor", d)].reason for d in DATES} == {Reason.UP_TO_DATE}
    # Dependents wait: they re-run only if RSI's new result differs.
    assert {p.decisions[("signal", d)].reason for d in DATES} == {Reason.WAITING_ON_UPSTREAM}

    summary = run(project)
    assert executed(summary)["rsi"] == len(DATES)
    assert "price_extractor" not in executed(summary)
    # The first dates have fewer than 4 closes: period 3 and 5 agree there, so the market
    # cell of those dates is cut off; later dates differ and re-run.
    assert reasons_of(summary, "market") == {"UPSTREAM_CHANGED"}
    assert 0 < executed(summary)["market"] < len(DATES)
    assert summary.reasons["UPSTREAM_UNCHANGED"] > 0
    assert plan(project).counts()["RUNNABLE"] == 0


def test_comment_docstring_and_formatting_edits_rerun_nothing(project: Project) -> None:
    setup(project)
    run(project)
    edited = BASE.replace(
        "    period = 3\n",
        "    # the look-back, in closes\n    period   =   3  # trailing comment\n\n",
    ).replace('"""Relative strength', '"""Reworded docstring. Relative strength')
    project.write_calcs(edited)
    p = plan(project)
    assert p.counts()["RUNNABLE"] == 0 and p.counts()["BLOCKED"] == 0
    assert run(project).executed == {}


def test_scenario_c_upstream_invalidation_cascades(project: Project) -> None:
    setup(project)
    run(project)
    # The extractor "fixes a bug": closes are now rounded to whole units.
    project.write_calcs(
        BASE.replace(
            'return {"close": ctx.root["prices"][0]["close"]}',
            'return {"close": round(ctx.root["prices"][0]["close"])}',
        )
    )
    summary = run(project)
    assert reasons_of(summary, "price_extractor") == {"CODE_CHANGED"}
    assert executed(summary)["price_extractor"] == len(DATES)
    assert reasons_of(summary, "rsi") == {"UPSTREAM_CHANGED"}
    assert executed(summary)["rsi"] == len(DATES)


def test_scenario_d_identical_upstream_output_is_a_firewall(project: Project) -> None:
    setup(project)
    run(project)
    # A behaviour change the simulation sees (it caps its fabricated 1e6 closes) that leaves
    # every real close as it was: the extractor re-runs, its identical results stop the rest.
    project.write_calcs(
        BASE.replace(
            'return {"close": ctx.root["prices"][0]["close"]}',
            'row = ctx.root["prices"][0]\n        return {"close": min(row["close"], 1e5)}',
        )
    )
    p = plan(project)
    assert {p.decisions[("rsi", d)].reason for d in DATES} == {Reason.WAITING_ON_UPSTREAM}
    summary = run(project)
    assert executed(summary) == {"price_extractor": len(DATES)}
    assert summary.reasons["UPSTREAM_UNCHANGED"] == len(DATES)  # rsi, cut off at the firewall
    assert summary.reasons["UP_TO_DATE"] == 2 * len(DATES)  # signal and market never waited
    final = plan(project)
    assert final.counts()["SKIPPED"] == 4 * len(DATES)


def test_scenario_e_missing_root_data_is_impossible_and_propagates(project: Project) -> None:
    hole = DATES[5]
    rows = [r for r in price_rows(SYMBOLS, DATES) if r["date"] != hole.isoformat()]
    setup(project, rows=rows)
    project.extra_config = 'calendar = "daily"\n'
    project.write_config()
    p = plan(project)
    assert p.decisions[("price_extractor", hole)].reason is Reason.NO_DATA
    assert p.decisions[("rsi", hole)].reason is Reason.UPSTREAM
    assert "no prices rows" in p.decisions[("market", hole)].detail  # the root cause, named
    weekend = dt.date(2024, 1, 6)
    assert p.decisions[("signal", weekend)].status is Status.IMPOSSIBLE
    summary = run(project)
    assert summary.ok
    # The rest of the graph carried on, and RSI's history skipped the hole.
    assert executed(summary)["rsi"] == len(DATES) - 1
    orch = project.orchestrator()
    after = orch.load_result("rsi", DATES[6])["AAA"]
    orch.close()
    assert len(after["closes"]) == 4


def test_dates_after_the_completeness_marker_are_held_back(project: Project) -> None:
    setup(project)  # every date's rows are in the file, the last one still being written
    marker = project.root / "data" / "prices.complete"
    project.root_options = 'complete_marker = "data/prices.complete"\n'
    project.write_config()
    p = plan(project)  # no marker yet: nothing is complete
    assert p.decisions[("price_extractor", TARGET)].reason is Reason.NO_DATA
    assert "no completeness marker yet" in p.decisions[("market", TARGET)].detail

    marker.write_text(f"{DATES[-2]}\n")
    summary = run(project)
    assert summary.ok and executed(summary) == {c: len(DATES) - 1 for c in CALCS}
    p = plan(project)
    assert p.decisions[("rsi", TARGET)].reason is Reason.UPSTREAM
    assert f"complete through {DATES[-2]} by its marker" in p.decisions[("rsi", TARGET)].detail
    # The report says what is held back, in every format.
    for fmt in ("text", "markdown", "html"):
        assert f"complete through {DATES[-2]} by its marker" in render(p, fmt)
    root = json.loads(render(p, "json"))["root"]["prices"]
    assert root == {
        "dates": len(DATES) - 1,
        "first": DATES[0].isoformat(),
        "last": DATES[-2].isoformat(),
        "complete_through": DATES[-2].isoformat(),
        "marker": True,
        "skipped": 0,
        "problems": [],
    }

    marker.write_text(f"{TARGET}\n")  # the day is whole: only it runs
    summary = run(project)
    assert summary.ok and set(summary.executed) == {(c, TARGET) for c in CALCS}
    assert set(summary.executed.values()) == {"NEW"}

    marker.write_text("tomorrow")
    orch = project.orchestrator()
    with pytest.raises(RootDataError, match="not a YYYY-MM-DD date"):
        orch.plan(TARGET)
    orch.close()


def test_target_date_without_data_is_impossible_no_data(project: Project) -> None:
    setup(project)
    future = TARGET + dt.timedelta(days=3)
    p = plan(project, future)
    assert p.decisions[("price_extractor", future)].reason is Reason.NO_DATA
    assert p.decisions[("market", future)].reason is Reason.UPSTREAM


def test_scenario_f_category_change_is_a_category_migration(project: Project) -> None:
    setup(project)
    run(project)
    project.write_calcs(BASE.replace('category = "market"', 'category = "risk"'))
    p = plan(project)
    assert {p.decisions[("market", d)].reason for d in DATES} == {Reason.CATEGORY_MIGRATED}
    assert p.counts()["RUNNABLE"] == len(DATES)


def test_epoch_bump_makes_every_cell_runnable(project: Project) -> None:
    setup(project)
    run(project)
    bump_epoch(project.root / "system_epoch.py")
    p = plan(project)
    assert p.counts()["RUNNABLE"] == 4 * len(DATES)
    assert {d.reason for d in p.decisions.values()} == {Reason.EPOCH_CHANGED}


def test_root_data_correction_reruns_that_date_then_cuts_off(project: Project) -> None:
    setup(project)
    run(project)
    rows = price_rows(SYMBOLS, DATES)
    fixed_day = DATES[4].isoformat()
    for row in rows:
        if row["Name"] == "BBB" and row["date"] == fixed_day:
            row["volume"] += 1  # a correction nobody reads: same results downstream
    project.write_prices(rows)
    p = plan(project)
    changed = [k for k, d in p.decisions.items() if d.reason is Reason.ROOT_DATA_CHANGED]
    assert changed == [("price_extractor", DATES[4])]
    assert "prices on " + fixed_day in p.decisions[("price_extractor", DATES[4])].detail
    summary = run(project)
    assert summary.executed == {("price_extractor", DATES[4]): "ROOT_DATA_CHANGED"}


def test_root_data_correction_of_a_read_value_cascades(project: Project) -> None:
    setup(project)
    run(project)
    rows = price_rows(SYMBOLS, DATES)
    for row in rows:
        if row["Name"] == "BBB" and row["date"] == DATES[4].isoformat():
            row["close"] += 5
    project.write_prices(rows)
    summary = run(project)
    assert summary.executed[("price_extractor", DATES[4])] == "ROOT_DATA_CHANGED"
    assert summary.executed[("rsi", DATES[4])] == "UPSTREAM_CHANGED"
    # RSI carries 4 closes: the changed close stays in its result for 3 more dates; the 4th
    # re-runs (its previous result changed) but produces the old result, so it cuts off there.
    rsi_dates = sorted(d for c, d in summary.executed if c == "rsi")
    assert rsi_dates == DATES[4:9]
    assert ("rsi", DATES[9]) not in summary.executed


def test_failure_is_recorded_dependents_blocked_and_retried(project: Project) -> None:
    broken = BASE.replace(
        '        rsi = ctx.upstream["rsi"]["rsi"]\n',
        '        rsi = ctx.upstream["rsi"]["rsi"]\n        if ctx.date.day == 10:\n'
        "            raise ValueError('signal exploded')\n",
    )
    setup(project, broken)
    summary = run(project)
    assert not summary.ok
    assert [(c, d) for c, d, _ in summary.failed] == [("signal", dt.date(2024, 1, 10))]
    assert "signal exploded" in summary.failed[0][2]
    orch = project.orchestrator()
    cell = orch.ledger.cell("signal", dt.date(2024, 1, 10))
    orch.close()
    assert cell.status == "FAILED" and "Traceback" in cell.error
    assert plan(project).decisions[("signal", dt.date(2024, 1, 10))].reason is Reason.RETRY

    project.write_calcs(BASE)  # fixed
    retry = run(project)
    assert retry.executed == {("signal", dt.date(2024, 1, 10)): "CODE_CHANGED"} or retry.executed[
        ("signal", dt.date(2024, 1, 10))
    ] in ("RETRY", "CODE_CHANGED")
    assert retry.ok


def test_failed_historical_cell_blocks_its_successors(project: Project) -> None:
    broken = BASE.replace(
        '        close = ctx.upstream["price_extractor"]["close"]\n',
        '        close = ctx.upstream["price_extractor"]["close"]\n'
        "        if ctx.date.day == 4:\n            raise RuntimeError('bad day')\n",
    )
    setup(project, broken)
    summary = run(project)
    assert {(c, d) for c, d, _ in summary.failed} == {("rsi", dt.date(2024, 1, 4))}
    assert not any(c == "rsi" and d > dt.date(2024, 1, 4) for c, d in summary.executed)
    p = plan(project)
    assert p.decisions[("rsi", dt.date(2024, 1, 4))].reason is Reason.RETRY
    assert p.decisions[("rsi", dt.date(2024, 1, 5))].reason is Reason.NEW


def test_failure_keeps_the_previous_result_published(project: Project) -> None:
    setup(project)
    run(project)
    orch = project.orchestrator()
    before = orch.load_result("market", TARGET)
    orch.close()
    project.write_calcs(
        BASE.replace("values = [r[", "raise KeyError('boom')\n        values = [r[")
    )
    summary = run(project)
    assert {c for c, _, _ in summary.failed} == {"market"}
    orch = project.orchestrator()
    assert orch.load_result("market", TARGET) == before
    orch.close()


def test_user_without_a_row_gets_no_result_that_day(project: Project) -> None:
    gap = DATES[3]
    rows = price_rows(SYMBOLS, DATES, skip={("CCC", gap)})
    setup(project, rows=rows)
    run(project)
    orch = project.orchestrator()
    on_gap = orch.load_result("price_extractor", gap)
    after = orch.load_result("rsi", DATES[4])
    orch.close()
    assert set(on_gap) == {"AAA", "BBB"}
    # The day after the gap, CCC's previous result does not exist: its history restarts.
    assert len(after["CCC"]["closes"]) == 1 and len(after["AAA"]["closes"]) == 4


def test_catch_up_after_new_data_runs_only_the_new_dates(project: Project) -> None:
    setup(project, rows=price_rows(SYMBOLS, DATES[:8]))
    run(project, DATES[7])
    project.write_prices(price_rows(SYMBOLS, DATES))
    summary = run(project)
    assert {d for _, d in summary.executed} == set(DATES[8:])
    assert executed(summary) == {c: 4 for c in CALCS}


def test_backfill_force_reruns_only_the_range(project: Project) -> None:
    setup(project)
    run(project)
    summary = run(project, DATES[5], start=DATES[3], calculations=["rsi"], force=True)
    assert {k for k in summary.executed} == {("rsi", d) for d in DATES[3:6]}
    assert set(summary.executed.values()) == {"FORCED"}


@pytest.mark.parametrize("shard_bytes", [1024])
def test_results_span_many_shards_and_reassemble(project: Project, shard_bytes: int) -> None:
    many = [f"S{i:03d}" for i in range(120)]
    project.write_prices(price_rows(many, DATES[:3]))
    project.extra_config = f"shard_bytes = {shard_bytes}\nflush_users = 7\n"
    project.write_calcs(BASE)
    run(project, DATES[2])
    orch = project.orchestrator()
    result = orch.load_result("rsi", DATES[2])
    attempts = orch.ledger.attempts("rsi", DATES[2])
    orch.close()
    assert sorted(result) == many
    assert attempts[-1].shards > 1 and attempts[-1].flushes > 1


def test_parallel_workers_publish_exactly_the_serial_results(project: Project) -> None:
    symbols = [f"S{i:02d}" for i in range(25)]
    setup(project, rows=price_rows(symbols, DATES))
    project.extra_config = "flush_users = 4\nshard_bytes = 1024\n"  # many shards per cell
    project.write_config()
    serial = run(project)
    before = project.result_hashes()
    forced = run(project, calculations=CALCS, force=True, workers=2)
    assert forced.ok and len(forced.executed) == 4 * len(DATES)
    assert set(forced.executed.values()) == {"FORCED"}
    assert project.result_hashes() == before
    assert serial.users_processed == forced.users_processed
    orch = project.orchestrator()
    assert sorted(orch.load_result("rsi", TARGET)) == symbols
    assert orch.load_result("market", TARGET)["n"] == 25
    attempts = orch.ledger.attempts("rsi", TARGET)
    orch.close()
    assert attempts[-1].shards > 2


def test_parallel_workers_record_failures_and_block_dependents(project: Project) -> None:
    broken = BASE.replace(
        '        close = ctx.upstream["price_extractor"]["close"]\n',
        '        close = ctx.upstream["price_extractor"]["close"]\n'
        "        if ctx.date.day == 4:\n            raise RuntimeError('bad day')\n",
    )
    setup(project, broken)
    summary = run(project, workers=2)
    assert {(c, d) for c, d, _ in summary.failed} == {("rsi", dt.date(2024, 1, 4))}
    assert "bad day" in summary.failed[0][2]
    assert not any(c == "rsi" and d > dt.date(2024, 1, 4) for c, d in summary.executed)
    assert executed(summary)["price_extractor"] == len(DATES)
