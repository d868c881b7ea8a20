"""A failure never turns into a silently different result (issue 8, item 3, propagation;
SQLite and PostgreSQL, one and two workers).

A malformed close (``1.2.3``) fails its user on that date in the calculation reading it; the
user's dependents that date, and its historical successors on every later date, fail for
that user too — never computed from "no upstream result" or restarted from an empty state —
and a meta calculation over them fails naming the user. Once the row is fixed everything
heals (the fixed date is ROOT_DATA_CHANGED, dead letters included) to exactly the result
hashes of a from-scratch build of the fixed data.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.planning import Reason
from tests.conftest import Project, price_rows, scratch_hashes
from tests.test_scenarios import BASE, DATES, TARGET

BAD_DAY = DATES[3]
# 20 users: one failed user (5 %) stays under the cell's failure rate (10 %).
SYMBOLS = ["AAA", "BBB", "CCC", *(f"S{i:02d}" for i in range(17))]


def rows(bad: bool) -> list[dict[str, object]]:
    out = price_rows(SYMBOLS, DATES)
    if bad:
        row = next(r for r in out if r["Name"] == "BBB" and r["date"] == BAD_DAY.isoformat())
        row["close"] = "1.2.3"
    return out


@pytest.mark.parametrize("workers", [1, 2])
def test_a_malformed_row_fails_its_user_downstream_and_later_then_heals(
    project: Project, tmp_path: Path, workers: int
) -> None:
    project.write_prices(rows(bad=True))
    project.write_calcs(BASE)
    first = project.run(TARGET, workers=workers)
    assert not first.ok and first.exit_code == 1
    orch = project.orchestrator()
    extracted = orch.load_result("price_extractor", BAD_DAY)
    rsi = {d: orch.load_result("rsi", d) for d in DATES}
    signal = orch.load_result("signal", BAD_DAY)
    market = orch.ledger.cell("market", BAD_DAY)
    before = orch.ledger.cell("market", DATES[2])
    orch.close()
    origin = extracted["BBB"]["__failed__"]
    assert origin["calculation"] == "price_extractor" and origin["date"] == BAD_DAY.isoformat()
    assert "prices.csv" in origin["error"] and "close='1.2.3' is not a number" in origin["error"]
    # The dependent that date, and the historical successors on every later date, fail for
    # BBB with the same origin: no result computed from a missing upstream or an empty state.
    assert signal["BBB"] == {"__failed__": origin}
    for day in DATES[3:]:
        assert rsi[day]["BBB"] == {"__failed__": origin}, day
        assert set(rsi[day]["AAA"]) == {"closes", "rsi"}  # the other users are published
    assert "__failed__" not in rsi[DATES[2]]["BBB"]
    # The meta calculation never aggregates without BBB: it fails, naming the user.
    assert market.status == "FAILED" and "upstream rsi failed for 1 user(s)" in market.error
    assert "BBB" in market.error and before.status == "COMPLETED"
    lines = first.lines()
    assert lines == [
        (
            "9 cells failed: market 2024-01-04, market 2024-01-05, market 2024-01-08 and 6 more "
            "(orchestrator runs --run ID)"
        ),
        "1 user failed in 1 cell: price_extractor 2024-01-04 (orchestrator failures)",
        (
            "18 users failed upstream or on an earlier date in 18 more cells: rsi 2024-01-04, "
            "signal 2024-01-04, rsi 2024-01-05 and 15 more (orchestrator failures)"
        ),
    ]

    for _ in range(2):  # retried until it is a dead letter (max_attempts = 3)
        assert not project.run(TARGET, workers=workers).ok
    orch = project.orchestrator()
    assert orch.ledger.cell("price_extractor", BAD_DAY).status == "DEAD_LETTER"
    orch.close()

    project.write_prices(rows(bad=False))  # the fix
    planned = project.plan(TARGET).decisions
    fixed = planned[("price_extractor", BAD_DAY)]
    assert fixed.reason is Reason.ROOT_DATA_CHANGED and "prices on 2024-01-04" in fixed.detail
    healed = project.run(TARGET, workers=workers)
    assert healed.ok and healed.exit_code == 0, healed.lines()
    assert healed.executed[("rsi", DATES[-1])] == "UPSTREAM_CHANGED"  # the heal flowed forward
    assert project.result_hashes() == scratch_hashes(tmp_path, rows(bad=False), BASE, TARGET)


def test_a_raising_user_propagates_to_its_successors_and_heals_with_the_code(
    project: Project, tmp_path: Path
) -> None:
    broken = BASE.replace(
        '        close = ctx.upstream["price_extractor"]["close"]\n',
        '        close = ctx.upstream["price_extractor"]["close"]\n'
        f"        if ctx.user == 'CCC' and ctx.date.isoformat() == '{BAD_DAY.isoformat()}':\n"
        "            raise ZeroDivisionError('bad tick')\n",
    )
    project.write_prices(rows(bad=False))
    project.write_calcs(broken)
    first = project.run(TARGET, workers=1)
    assert not first.ok
    orch = project.orchestrator()
    later = orch.load_result("rsi", DATES[-1])
    orch.close()
    assert later["CCC"]["__failed__"]["error"] == "ZeroDivisionError: bad tick"
    assert later["CCC"]["__failed__"]["date"] == BAD_DAY.isoformat()
    project.write_calcs(BASE)  # the fix: CODE_CHANGED re-runs rsi and it heals forward
    assert project.run(TARGET, workers=1).ok
    assert project.result_hashes() == scratch_hashes(tmp_path, rows(bad=False), BASE, TARGET)


WINDOWED = """
from orchestrator import StandardCalculation


class Range3(StandardCalculation):
    name = "range3"
    root_data = ["prices"]
    lookback = 3

    def process(self, ctx):
        closes = [r["close"] for r in ctx.history["prices"]]
        return {"range": max(closes) - min(closes), "n": len(closes)}
"""


@pytest.mark.parametrize("in_memory", [True, False])
def test_a_malformed_row_fails_every_window_that_holds_it_then_heals(
    project: Project, tmp_path: Path, in_memory: bool
) -> None:
    # A window read without its malformed row would be a silently different result: the user
    # fails on the bad date and on every later date whose window still holds it.
    if not in_memory:
        project.extra_config = "root_memory_mb = 0\n"  # the root store's path
    project.write_prices(rows(bad=True))
    project.write_calcs(WINDOWED)
    assert not project.run(TARGET, workers=1).ok
    orch = project.orchestrator()
    results = {d: orch.load_result("range3", d) for d in DATES}
    orch.close()
    bad_at = DATES.index(BAD_DAY)
    for i, day in enumerate(DATES):
        failed = "__failed__" in (results[day] or {}).get("BBB", {})
        assert failed == (bad_at <= i < bad_at + 3), (day, results[day].get("BBB"))
        assert "__failed__" not in results[day]["AAA"]
    later = results[DATES[bad_at + 1]]["BBB"]["__failed__"]
    assert "history window" in later["error"] and "close='1.2.3'" in later["error"]
    # Fixed: the windows that held the row re-run and equal a from-scratch build.
    project.write_prices(rows(bad=False))
    assert project.run(TARGET, workers=1).ok
    assert project.result_hashes() == scratch_hashes(tmp_path, rows(bad=False), WINDOWED, TARGET)
