"""Dependency windows: ``dependencies = {"ret": W}`` reads the dependency's last W dates.

A cell's fingerprint holds the result hash of every date of its window, so a change of the
dependency on one date re-runs exactly the W cells whose window holds that date (and early
cutoff stops a re-run upstream whose result did not change). Both forms see the same window
and publish the same hashes.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter

import pytest

from tests.conftest import Project, price_rows, weekdays

DATES = weekdays(dt.date(2024, 3, 1), 15)
SYMBOLS = ["AAA", "BBB", "CCC", "DDD"]
WIDTH = 4

CALCS = """
import math

import numpy as np

from orchestrator.calculation import MetaCalculation, StandardCalculation


class Ret(StandardCalculation):
    name = "ret"
    root_data = ("prices",)
    lookback = 2
    nullable = ("r",)

    def process(self, ctx):
        close = ctx.root["prices"][-1]["close"]
        before = [r for r in ctx.history["prices"] if r["date"] < ctx.date.isoformat()]
        if not before:
            return {"r": None}
        return {"r": close / before[-1]["close"] - 1.0}

    def compute(self, frame):
        close = frame.root("prices", "close")
        prev = np.full_like(close, np.nan)
        prev[1:] = close[:-1]
        return {"r": (close / prev - 1.0)[frame.rows("prices")]}


class WindowSum(StandardCalculation):
    name = "wsum"
    dependencies = {"ret": WIDTH}
    nullable = ("s",)

    def process(self, ctx):
        seen = [x["r"] for x in ctx.upstream["ret"] if x is not None and x["r"] is not None]
        total = 0.0
        for r in seen:
            total = total + r
        return {"s": total if seen else None, "n": len(seen), "w": len(ctx.upstream["ret"])}

    def compute(self, frame):
        r = frame.upstream("ret", "r")
        rows = frame.upstream_rows("ret")
        s = np.full((len(rows), r.shape[1]), np.nan)
        n = np.zeros((len(rows), r.shape[1]), dtype=np.int64)
        w = np.zeros((len(rows), r.shape[1]), dtype=np.int64)
        for i, row in enumerate(rows.tolist()):
            total = np.zeros(r.shape[1])
            for k in range(max(0, row - WIDTH + 1), row + 1):
                ok = np.isfinite(r[k])
                total = total + np.where(ok, r[k], 0.0)
                n[i] += ok
            s[i] = np.where(n[i] > 0, total, np.nan)
            w[i] = row + 1 - max(0, row - WIDTH + 1)
        return {"s": s, "n": n, "w": w}


class WindowCount(MetaCalculation):
    name = "wcount"
    dependencies = {"ret": WIDTH}

    def process(self, ctx):
        return {"dates": len(ctx.upstream["ret"]), "results": sum(len(r) for r in ctx.upstream["ret"])}

    def compute(self, frame):
        present = frame.upstream_present("ret")
        rows = frame.upstream_rows("ret")
        dates, results = [], []
        for row in rows.tolist():
            lo = max(0, row - WIDTH + 1)
            dates.append(row + 1 - lo)
            results.append(int(present[lo : row + 1].sum()))
        return {"dates": np.array(dates), "results": np.array(results)}
""".replace("WIDTH", str(WIDTH))


def _project(tmp_path, db_url: str, columnar: bool, name: str) -> Project:
    root = tmp_path / name
    root.mkdir()
    project = Project(root, db_url if columnar else f"sqlite:///{root / 'ledger.db'}")
    project.extra_config = f"columnar = {'true' if columnar else 'false'}\n"
    project.write_prices(price_rows(SYMBOLS, DATES, skip={("CCC", DATES[6])}))
    project.write_calcs(CALCS)
    return project


@pytest.fixture
def pair(tmp_path, db_url: str) -> tuple[Project, Project]:
    return _project(tmp_path, db_url, True, "columnar"), _project(
        tmp_path, db_url, False, "per_user"
    )


def test_both_forms_read_the_same_window(pair: tuple[Project, Project]) -> None:
    columnar, per_user = pair
    assert columnar.run(DATES[-1]).ok and per_user.run(DATES[-1]).ok
    hashes = columnar.result_hashes()
    assert hashes == per_user.result_hashes()
    assert len(hashes) == 3 * len(DATES)
    orch = columnar.orchestrator()
    try:
        assert orch.load_result("wcount", DATES[0]) == {"dates": 1, "results": 4}
        assert orch.load_result("wcount", DATES[-1]) == {"dates": WIDTH, "results": 4 * WIDTH}
        # CCC has no row on DATES[6]: its window there misses a date, and it gets no result
        seven = orch.load_result("wcount", DATES[7])
        assert seven == {"dates": WIDTH, "results": 4 * WIDTH - 1}
        assert "CCC" not in orch.load_result("wsum", DATES[6])
        assert orch.load_result("wsum", DATES[7])["CCC"]["n"] == 2  # (ret of DATES[7]: None)
    finally:
        orch.close()


@pytest.mark.parametrize("columnar", [True, False])
def test_a_change_on_one_date_reruns_the_cells_whose_window_holds_it(
    tmp_path, db_url: str, columnar: bool
) -> None:
    project = _project(tmp_path, db_url, columnar, "p")
    assert project.run(DATES[-1]).ok
    # One close of one symbol changes on DATES[5]: ret changes on DATES[5] (its own return)
    # and DATES[6] (the next return from it); wsum on every date whose window holds either.
    rows = price_rows(SYMBOLS, DATES, skip={("CCC", DATES[6])})
    for row in rows:
        if row["Name"] == "AAA" and row["date"] == DATES[5].isoformat():
            row["close"] += 1.0
    project.write_prices(rows)
    summary = project.run(DATES[-1])
    assert summary.ok
    ran = Counter(calc for calc, _ in summary.executed)
    assert {d for c, d in summary.executed if c == "ret"} == {DATES[5], DATES[6]}
    assert {d for c, d in summary.executed if c == "wsum"} == set(DATES[5 : 6 + WIDTH])
    assert ran["wcount"] == 0 or ran["wcount"] == len(DATES[5 : 6 + WIDTH])
    assert project.run(DATES[-1]).executed == {}  # and then nothing is left to do


def test_the_plan_names_the_window_date_that_changed(tmp_path, db_url: str) -> None:
    project = _project(tmp_path, db_url, True, "p")
    assert project.run(DATES[-1]).ok
    # Re-run ret on one date with a different result: force is not a change of inputs, a
    # code change is; so change the data of a single date instead.
    rows = price_rows(SYMBOLS, DATES, skip={("CCC", DATES[6])})
    for row in rows:
        if row["Name"] == "BBB" and row["date"] == DATES[10].isoformat():
            row["close"] *= 1.5
    project.write_prices(rows)
    summary = project.run(DATES[-1], calculations=["ret"])  # only ret re-runs now
    assert {d for c, d in summary.executed} == {DATES[10], DATES[11]}
    plan = project.plan(DATES[-1])
    detail = plan.decisions[("wsum", DATES[12])].detail
    assert f"ret@{DATES[10].isoformat()}" in detail and f"ret@{DATES[11].isoformat()}" in detail
    assert plan.decisions[("wsum", DATES[9])].reason.value == "UP_TO_DATE"


def test_a_window_must_be_a_positive_int(tmp_path, db_url: str) -> None:
    project = _project(tmp_path, db_url, True, "p")
    project.write_calcs(CALCS.replace('dependencies = {"ret": 4}', 'dependencies = {"ret": 0}', 1))
    result = project.cli("plan", "--date", DATES[-1].isoformat())
    assert result.exit_code != 0
    assert "'dependencies' maps names to windows" in result.output
