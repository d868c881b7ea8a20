"""The block engine: calculations with a columnar form (``compute(frame)``) publish exactly what
their per-user form (``process(ctx)``) publishes, cell by cell (SQLite and PostgreSQL).

Every calculation of ``SOURCE`` has both forms: a root calculation with a history window
(``window``), one reading root data and an upstream (``dev``), a historical one without root
data carrying its state in ``frame.previous`` (``ema``), one driven by its upstream alone
(``flag``) and a meta calculation (``market``). Each test builds two projects from the same
data and code, one with ``columnar = true`` and one with ``columnar = false``, and compares
them cell by cell: result hashes, stored status, users failed, the error, the failed users
(``orchestrator failures``), what each run executed and why, and its summary lines.
Failures of the columnar form itself (``compute`` raising or returning the wrong shape) have
no per-user counterpart: their cells fail visibly and publish nothing.

The tests at the end pin engine gaps these comparisons found (fixed in 084188a).
"""

from __future__ import annotations

import datetime as dt
import re
import textwrap
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from tests.conftest import (
    Project,
    _pg_base,
    price_rows,
    scratch_hashes,
    scratch_project,
    weekdays,
)

DATES = weekdays(dt.date(2024, 1, 1), 12)
TARGET = DATES[-1]
# 20 users: one failed user a date (5 %) stays under the cells' failure rate (10 %).
SYMBOLS = ["AAA", "BBB", "CCC", *(f"S{i:02d}" for i in range(17))]
GAP = ("BBB", DATES[8])  # BBB has no row that date: its history in ``ema`` restarts after it
BAD_DAY = DATES[3]

HEADER = """
import numpy as np

from orchestrator import MetaCalculation, StandardCalculation

LOOKBACK = 3
"""

# name -> (class header with ``process``, the ``compute`` method). Both forms add floats in
# the same order (a running sum from 0.0, absent values as + 0.0), so they agree to the bit.
CLASSES: dict[str, tuple[str, str]] = {
    "window": (
        '''
class Window(StandardCalculation):
    """Mean close over the last LOOKBACK available dates of the user's rows."""

    name = "window"
    root_data = ["prices"]
    lookback = LOOKBACK

    def process(self, ctx):
        closes = [r["close"] for r in ctx.history["prices"]]
        total = 0.0
        for close in closes:
            total = total + close
        return {"ma": total / len(closes), "n": len(closes), "full": len(closes) == LOOKBACK}
''',
        """
    def compute(self, frame):
        close = frame.root("prices", "close")
        have = frame.root_present("prices")
        total = np.zeros(frame.present.shape)
        count = np.zeros(frame.present.shape, dtype=np.int64)
        for i, row in enumerate(frame.rows("prices").tolist()):
            for j in range(max(0, row - LOOKBACK + 1), row + 1):
                total[i] = total[i] + np.where(have[j], close[j], 0.0)
                count[i] += have[j]
        return {"ma": total / np.maximum(count, 1), "n": count, "full": count == LOOKBACK}
""",
    ),
    "dev": (
        """
class Dev(StandardCalculation):
    name = "dev"
    root_data = ["prices"]
    dependencies = ["window"]

    def process(self, ctx):
        dev = ctx.root["prices"][0]["close"] - ctx.upstream["window"]["ma"]
        return {"dev": dev, "up": dev > 0, "label": "up" if dev > 0 else "down"}
""",
        """
    def compute(self, frame):
        close = frame.root("prices", "close")[frame.rows("prices")]
        dev = close - frame.upstream("window", "ma")
        return {"dev": dev, "up": dev > 0, "label": np.where(dev > 0, "up", "down")}
""",
    ),
    "ema": (
        """
class Ema(StandardCalculation):
    name = "ema"
    dependencies = ["dev"]
    historical = True
    alpha = 0.5

    def process(self, ctx):
        dev = ctx.upstream["dev"]["dev"]
        if ctx.previous is None:
            return {"ema": dev, "days": 1}
        ema = self.alpha * dev + (1 - self.alpha) * ctx.previous["ema"]
        return {"ema": ema, "days": ctx.previous["days"] + 1}
""",
        """
    def compute(self, frame):
        dev = frame.upstream("dev", "dev")
        ema, days, had = frame.previous("ema"), frame.previous("days"), frame.previous_present()
        out_ema = np.full(dev.shape, np.nan)
        out_days = np.zeros(dev.shape, dtype=np.int64)
        for i in range(len(frame.dates)):
            now = frame.present[i]
            step = np.where(had, self.alpha * dev[i] + (1 - self.alpha) * ema, dev[i])
            count = np.where(had, days + 1, 1)
            out_ema[i] = step
            out_days[i] = np.where(now, count, 0)
            ema, days, had = np.where(now, step, np.nan), np.where(now, count, np.nan), now
        return {"ema": out_ema, "days": out_days}
""",
    ),
    "flag": (
        """
class Flag(StandardCalculation):
    name = "flag"
    dependencies = ["ema"]

    def process(self, ctx):
        ema = ctx.upstream["ema"]
        return {"hot": ema["ema"] > 0, "twice": ema["ema"] * 2, "days": ema["days"]}
""",
        """
    def compute(self, frame):
        ema = frame.upstream("ema", "ema")
        days = np.where(frame.present, frame.upstream("ema", "days"), 0).astype(np.int64)
        return {"hot": ema > 0, "twice": ema * 2, "days": days}
""",
    ),
    "market": (
        """
class Market(MetaCalculation):
    name = "market"
    dependencies = ["ema"]

    def process(self, ctx):
        total, n = 0.0, 0
        for result in ctx.upstream["ema"].values():
            total, n = total + result["ema"], n + 1
        return {"mean": total / n if n else None, "n": n}
""",
        """
    def compute(self, frame):
        ema, have = frame.upstream("ema", "ema"), frame.upstream_present("ema")
        total = np.zeros(len(frame.dates))
        n = np.zeros(len(frame.dates), dtype=np.int64)
        for k in range(len(frame.users)):
            total = total + np.where(have[:, k], ema[:, k], 0.0)
            n += have[:, k]
        return {"mean": np.where(n > 0, total / np.maximum(n, 1), np.nan), "n": n}
""",
    ),
}
CALCS = list(CLASSES)


def source(
    edits: dict[str, list[tuple[str, str]]] | None = None,
    per_user_only: tuple[str, ...] = (),
    compute: dict[str, str] | None = None,
    extra: dict[str, str] | None = None,
) -> str:
    """The calculation package's source.

    Args:
        edits: calculation -> (old, new) texts replaced in its source (both forms).
        per_user_only: calculations written without ``compute``.
        compute: calculation -> a replacement body of its ``compute`` (indented 8).
        extra: calculation -> class attributes added (indented 4).
    """
    parts = [HEADER]
    for name, (head, method) in CLASSES.items():
        if compute and name in compute:
            method = "\n    def compute(self, frame):\n" + textwrap.indent(
                textwrap.dedent(compute[name]), " " * 8
            )
        body = head + ("" if name in per_user_only else method)
        if extra and name in extra:
            body = body.replace("\n    def process", f"{extra[name]}\n    def process", 1)
        for old, new in (edits or {}).get(name, []):
            assert body.count(old) == 1, (name, old)
            body = body.replace(old, new)
        parts.append(body)
    return "\n".join(parts)


SOURCE = source()


def rows(
    bad: dict[tuple[str, dt.date], str] | None = None,
    closes: dict[tuple[str, dt.date], float] | None = None,
    volumes: dict[tuple[str, dt.date], int] | None = None,
) -> list[dict[str, Any]]:
    """Price rows of SYMBOLS on DATES (BBB missing on its GAP date), with ``bad`` closes (text
    that is not a number), changed ``closes`` and changed ``volumes``."""
    out = price_rows(SYMBOLS, DATES, skip={GAP})
    for row in out:
        key = (row["Name"], dt.date.fromisoformat(row["date"]))
        row["close"] = (closes or {}).get(key, row["close"])
        row["close"] = (bad or {}).get(key, row["close"])
        row["volume"] = (volumes or {}).get(key, row["volume"])
    return out


# --- two projects, one per form -------------------------------------------------------------


@pytest.fixture
def twin_url(db_url: str, tmp_path: Path) -> Iterator[str]:
    """A second empty ledger on the same backend as ``db_url``."""
    if db_url.startswith("sqlite"):
        yield f"sqlite:///{tmp_path / 'twin.db'}"
        return
    base = _pg_base()
    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = create_engine(base)
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    sep = "&" if "?" in base else "?"
    try:
        yield f"{base}{sep}options=-csearch_path%3D{schema}"
    finally:
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


class Twins:
    """The same project twice: ``columnar = true`` and ``columnar = false``."""

    def __init__(self, tmp_path: Path, columnar_url: str, per_user_url: str, config: str = ""):
        self.columnar = Project(tmp_path / "columnar", columnar_url)
        self.per_user = Project(tmp_path / "per_user", per_user_url)
        for project, flag in ((self.columnar, "true"), (self.per_user, "false")):
            project.root.mkdir(parents=True)
            project.extra_config = f"columnar = {flag}\n{config}"
        self.summaries: tuple[Any, Any] | None = None

    @property
    def both(self) -> tuple[Project, Project]:
        return (self.columnar, self.per_user)

    def write(self, prices: list[dict[str, Any]] | None = None, calcs: str | None = None) -> None:
        for project in self.both:
            if prices is not None:
                project.write_prices(prices)
            if calcs is not None:
                project.write_calcs(calcs)

    def run(
        self, target: dt.date = TARGET, workers: tuple[int, int] = (1, 1), same: bool = True
    ) -> Any:
        """Run both up to ``target`` (``workers`` for the columnar and the per-user project)
        and, with ``same``, assert that the runs and the ledgers agree. Returns the columnar
        run's summary."""
        summaries = (
            self.columnar.run(target, workers=workers[0]),
            self.per_user.run(target, workers=workers[1]),
        )
        self.summaries = summaries
        if same:
            self.assert_same()
        return summaries[0]

    def assert_same(self) -> None:
        assert self.summaries is not None
        columnar, per_user = (run_view(s) for s in self.summaries)
        assert columnar == per_user
        left, right = (ledger_view(p) for p in self.both)
        assert left.keys() == right.keys()
        for key in sorted(left):
            assert left[key] == right[key], key
        for calc in STANDARD:
            outputs = [normalised(p, p.cli("failures", calc).output) for p in self.both]
            assert outputs[0] == outputs[1], calc


def run_view(summary: Any) -> dict[str, Any]:
    """What a run summary says, without its ids and timings."""
    return {
        "exit": summary.exit_code,
        "lines": summary.lines(),
        "executed": summary.executed,
        "failed": summary.failed,
        "users_failed": summary.users_failed,
        "completed": summary.completed,
        "skipped": summary.skipped,
        "blocked": summary.blocked,
    }


def normalised(project: Project, text_: str) -> str:
    """``text_`` without what differs between two projects: folders, package names, run ids."""
    assert project.package is not None
    text_ = text_.replace(str(project.root), "<root>").replace(project.package, "<package>")
    return re.sub(r"\brun [0-9a-f]{8}\b", "run <id>", text_)


STANDARD = [c for c in CALCS if c != "market"]


def ledger_view(project: Project) -> dict[tuple[str, dt.date], Any]:
    """Every cell as the ledger holds it: status, result hash, users failed, attempts, the
    error, the failed users (kind and error), and the last attempt (reason, status, users,
    users failed)."""
    orch = project.orchestrator()
    try:
        cells = orch.ledger.load_cells()
        failures = orch.ledger.user_failures()
        out = {}
        for calc, per in cells.items():
            for date, cell in per.items():
                attempts = orch.ledger.attempts(calc, date)
                last = attempts[-1]
                out[(calc, date)] = {
                    "status": cell.status,
                    "result_hash": cell.result_hash,
                    "users_failed": cell.users_failed,
                    "attempts": cell.attempts,
                    "error": cell.error and normalised(project, cell.error),
                    "failed": sorted(
                        (f.user, f.kind, normalised(project, f.error))
                        for f in failures
                        if (f.calculation, f.date) == (calc, date)
                    ),
                    "attempt": (last.reason, last.status, last.users, last.users_failed),
                }
        return out
    finally:
        orch.close()


@pytest.fixture
def twins(tmp_path: Path, db_url: str, twin_url: str) -> Twins:
    return Twins(tmp_path, db_url, twin_url)


def results(project: Project, calc: str, date: dt.date) -> Any:
    orch = project.orchestrator()
    try:
        return orch.load_result(calc, date)
    finally:
        orch.close()


def cell(project: Project, calc: str, date: dt.date) -> Any:
    orch = project.orchestrator()
    try:
        return orch.ledger.cell(calc, date)
    finally:
        orch.close()


def executed(summary: Any) -> Counter[str]:
    return Counter(calc for calc, _ in summary.executed)


# --- cold runs and code changes -----------------------------------------------------------


def test_a_cold_run_and_the_no_op_are_the_same_in_both_forms(twins: Twins) -> None:
    twins.write(rows(), SOURCE)
    first = twins.run()
    assert first.ok and executed(first) == {c: len(DATES) for c in CALCS}
    # The values themselves, against a hand computation of the first three dates.
    closes = {(r["Name"], r["date"]): r["close"] for r in rows() if r["Name"] in ("AAA", "BBB")}
    window = results(twins.columnar, "window", DATES[2])
    total = 0.0
    for day in DATES[:3]:
        total += closes[("AAA", day.isoformat())]
    expected = total / 3
    assert window["AAA"] == {"ma": expected, "n": 3, "full": True}
    ema = {d: results(twins.columnar, "ema", d) for d in DATES}
    assert [ema[d]["AAA"]["days"] for d in DATES] == list(range(1, 13))
    # BBB has no row on its GAP date: no result there, and its state restarts after it.
    assert "BBB" not in ema[GAP[1]] and ema[DATES[9]]["BBB"]["days"] == 1
    assert ema[DATES[7]]["BBB"]["days"] == 8
    dev = {d: results(twins.columnar, "dev", d)["AAA"]["dev"] for d in DATES[:2]}
    assert ema[DATES[1]]["AAA"]["ema"] == 0.5 * dev[DATES[1]] + 0.5 * dev[DATES[0]]
    market = results(twins.columnar, "market", GAP[1])
    assert market["n"] == len(SYMBOLS) - 1
    again = twins.run()
    assert again.ok and not again.executed and again.skipped == len(CALCS) * len(DATES)


def test_each_project_runs_the_form_it_is_configured_for(twins: Twins) -> None:
    # The witness that the comparisons compare two forms: a compute() that counts its dates
    # differently shows which form each project ran.
    twins.write(rows(), source(edits={"window": [('"n": count,', '"n": count + 100,')]}))
    twins.run(DATES[2], same=False)
    n = [results(p, "window", DATES[2])["AAA"]["n"] for p in twins.both]
    assert n == [103, 3]


def test_an_edit_with_the_same_output_re_runs_only_the_edited_calculation(twins: Twins) -> None:
    twins.write(rows(), SOURCE)
    twins.run()
    # Not cosmetic (an operator more), but the same output: early cutoff stops at window.
    same = source(
        edits={
            "window": [
                ("total / len(closes)", "(total * 1.0) / len(closes)"),
                ("total / np.maximum(count, 1)", "(total * 1.0) / np.maximum(count, 1)"),
            ]
        }
    )
    twins.write(calcs=same)
    rerun = twins.run()
    assert rerun.ok and executed(rerun) == {"window": len(DATES)}
    assert set(rerun.executed.values()) == {"CODE_CHANGED"}
    assert rerun.reasons["UPSTREAM_UNCHANGED"] == len(DATES)  # dev, the rest stays UP_TO_DATE
    # A change of output re-runs the edited calculation and what its results change.
    # On the first date ema is dev itself (no previous): flag and market stop there.
    twins.write(calcs=same.replace("alpha = 0.5", "alpha = 0.25"))
    changed = twins.run()
    assert executed(changed) == {
        "ema": len(DATES),
        "flag": len(DATES) - 1,
        "market": len(DATES) - 1,
    }


# --- malformed rows -----------------------------------------------------------------------


@pytest.mark.parametrize("memory", ["in memory", "root store"])
def test_malformed_rows_fail_the_same_users_cells_and_dates_in_both_forms(
    tmp_path: Path, db_url: str, twin_url: str, memory: str
) -> None:
    # window's history window keeps prices in memory; root_memory_mb = 0 streams them from
    # the root store (the columnar blocks build their matrices from either).
    config = "root_memory_mb = 0\n" if memory == "root store" else ""
    twins = Twins(tmp_path, db_url, twin_url, config=config)
    # BBB's close is not a number on BAD_DAY (its window holds it two more dates); CCC's on
    # DATES[9] too, so two cells of window have a failure on the date and one in the window.
    bad = {("BBB", BAD_DAY): "1.2.3", ("CCC", DATES[9]): "n/a"}
    twins.write(rows(bad=bad), SOURCE)
    summary = twins.run()
    assert not summary.ok and summary.exit_code == 1
    project = twins.columnar
    expect_window = {BAD_DAY: "BBB", DATES[4]: "BBB", DATES[5]: "BBB"}
    expect_window |= {DATES[9]: "CCC", DATES[10]: "CCC", DATES[11]: "CCC"}
    for day in DATES:
        got = cell(project, "window", day)
        if day in expect_window:
            assert (got.status, got.users_failed) == ("PARTIAL", 1), day
            marker = results(project, "window", day)[expect_window[day]]["__failed__"]
            assert marker["calculation"] == "window" and "prices.csv" in marker["error"]
            assert ("history window" in marker["error"]) == (day not in (BAD_DAY, DATES[9]))
        else:
            assert (got.status, got.users_failed) == ("COMPLETED", 0), day
    # dev reads the date's row (own failure) and window (inherited on the two later dates).
    dev = {d: cell(project, "dev", d) for d in (BAD_DAY, DATES[4])}
    assert (dev[BAD_DAY].status, dev[BAD_DAY].users_failed) == ("PARTIAL", 1)
    assert (dev[DATES[4]].status, dev[DATES[4]].users_failed) == ("COMPLETED", 1)
    # ema carries BBB's failure on every later date, until the gap; then BBB starts afresh.
    ema = {d: results(project, "ema", d) for d in DATES}
    # The origin is dev's own failure that date (a previous result's failure comes first).
    origin = {"calculation": "dev", "date": BAD_DAY.isoformat()}
    for day in DATES[3:8]:
        assert set(ema[day]["BBB"]) == {"__failed__"}, day
        assert {k: ema[day]["BBB"]["__failed__"][k] for k in origin} == origin
    assert "BBB" not in ema[GAP[1]] and ema[DATES[9]]["BBB"]["days"] == 1
    for day in DATES[9:]:
        assert set(ema[day]["CCC"]) == {"__failed__"}, day
    # The meta calculation fails on every date ema has a failed user, naming the user.
    market = {d: cell(project, "market", d) for d in DATES}
    failing = set(DATES[3:8]) | set(DATES[9:])
    assert {d for d, c in market.items() if c.status == "FAILED"} == failing
    assert "upstream ema failed for 1 user(s)" in market[BAD_DAY].error
    assert "BBB" in market[BAD_DAY].error and "CCC" in market[DATES[9]].error
    # The fix heals both forms to the same ledger: a from-scratch build's.
    twins.write(rows())
    assert twins.run().ok
    assert twins.columnar.result_hashes() == scratch_hashes(tmp_path, rows(), SOURCE, TARGET)


# --- a user failing upstream --------------------------------------------------------------

FAILING_WINDOW = {
    "window": [
        (
            "        closes = [",
            "        if ctx.user == 'CCC' and ctx.date.isoformat() == '"
            + DATES[5].isoformat()
            + "':\n            raise ZeroDivisionError('bad tick')\n        closes = [",
        )
    ]
}


def test_a_user_failing_upstream_propagates_the_same_in_both_forms(twins: Twins) -> None:
    # window has only its per-user form here, so the columnar project mixes both forms: the
    # blocks of dev, ema, flag and market read window's markers from its stored table.
    twins.write(rows(), source(edits=FAILING_WINDOW, per_user_only=("window",)))
    summary = twins.run()
    assert not summary.ok
    project = twins.columnar
    window = cell(project, "window", DATES[5])
    assert (window.status, window.users_failed) == ("PARTIAL", 1)
    for day in DATES[5:]:
        got = results(project, "ema", day)["CCC"]
        assert got["__failed__"]["error"] == "ZeroDivisionError: bad tick", day
        assert cell(project, "market", day).status == "FAILED"
    assert "__failed__" not in results(project, "ema", DATES[4])["CCC"]
    listing = project.cli("failures", "ema", DATES[6].isoformat()).output
    assert "upstream window failed for user CCC on " + DATES[5].isoformat() in listing
    twins.write(calcs=source(per_user_only=("window",)))  # the fix heals forward
    assert twins.run().ok


# --- the columnar form failing --------------------------------------------------------------

BROKEN = {
    "raises": ("raise RuntimeError('columnar bug')\n", "RuntimeError: columnar bug"),
    "not a dict": ("return [1, 2]\n", "compute() must return a dict of arrays, not list"),
    "wrong shape": (
        "return {'dev': np.zeros(len(frame.users))}\n",
        "compute() returned 'dev' of shape",
    ),
    "one user short": (
        "return {'dev': np.zeros((len(frame.dates), len(frame.users) - 1))}\n",
        "compute() returned 'dev' of shape",
    ),
    "reserved key": (
        "return {'__failed__': np.zeros(frame.present.shape)}\n",
        "'__failed__' is a reserved result key",
    ),
    "bad dtype": (
        "return {'dev': np.zeros(frame.present.shape, dtype=complex)}\n",
        "compute() returned 'dev' of dtype complex128",
    ),
}


def run_id_of(output: str) -> str:
    line = next(x for x in output.splitlines() if x.startswith("Run "))
    return line.split()[1]


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_a_broken_compute_fails_its_cells_visibly_and_publishes_nothing(
    project: Project, case: str
) -> None:
    body, message = BROKEN[case]
    project.extra_config = "block_dates = 5\n"
    project.write_prices(rows())
    project.write_calcs(source(compute={"dev": body}))
    result = project.cli("run", "--date", TARGET.isoformat())
    assert result.exit_code == 1, result.output
    assert f"{len(DATES)} cells failed: dev {DATES[0]}" in result.output
    runs = project.cli("runs", "--run", run_id_of(result.output))
    assert message in runs.output
    orch = project.orchestrator()
    try:
        for day in DATES:
            dev = orch.ledger.cell("dev", day)
            assert dev.status == "FAILED" and message in dev.error, day
            assert dev.result_hash is None and orch.load_result("dev", day) is None
            assert orch.ledger.cell("window", day).status == "COMPLETED"
            assert orch.ledger.cell("ema", day) is None  # blocked: never attempted
        attempts = orch.ledger.attempts("dev", DATES[0])
        assert [a.status for a in attempts] == ["FAILED", "FAILED"]  # retried once in the run
    finally:
        orch.close()
    assert f"{3 * len(DATES)} cells blocked by a failure upstream, caused by dev" in result.output
    if case == "raises":  # the whole traceback is stored, down to the line in compute()
        error = cell(project, "dev", DATES[0]).error
        assert "in compute" in error and "raise RuntimeError('columnar bug')" in error


def test_a_broken_compute_keeps_the_previous_result_published(project: Project) -> None:
    project.write_prices(rows())
    project.write_calcs(SOURCE)
    assert project.run(TARGET).ok
    before = {d: cell(project, "dev", d).result_hash for d in DATES}
    project.write_calcs(source(compute={"dev": "raise RuntimeError('columnar bug')\n"}))
    summary = project.run(TARGET)
    assert not summary.ok and {c for c, _, _ in summary.failed} == {"dev"}
    for day in DATES:
        dev = cell(project, "dev", day)
        assert dev.status == "FAILED" and dev.result_hash == before[day]
        assert results(project, "dev", day) is not None


# --- validation -------------------------------------------------------------------------------

NON_FINITE = {"AAA": "inf", "CCC": "-inf"}  # on DATES[4]


def test_a_non_finite_value_fails_validation_in_both_forms(twins: Twins) -> None:
    day = DATES[4]
    anchor = '        dev = ctx.root["prices"][0]["close"] - ctx.upstream["window"]["ma"]\n'
    process = (
        anchor,
        anchor
        + f"        if ctx.date.isoformat() == {day.isoformat()!r} and ctx.user in {NON_FINITE!r}:\n"
        + f"            dev = float({NON_FINITE!r}[ctx.user])\n",
    )
    compute = (
        '        dev = close - frame.upstream("window", "ma")\n',
        '        dev = close - frame.upstream("window", "ma")\n'
        + f"        day = dt.date.fromisoformat({day.isoformat()!r})\n"
        + "        if day in frame.dates:\n"
        + f"            for user, value in {NON_FINITE!r}.items():\n"
        + "                k = list(frame.users).index(user)\n"
        + "                dev[frame.dates.index(day), k] = float(value)\n",
    )
    calcs = "import datetime as dt\n" + source(edits={"dev": [process, compute]})
    twins.write(rows(), calcs)
    summary = twins.run()
    # Only that date fails; nothing of it is published and its dependents wait.
    assert [(c, d) for c, d, _ in summary.failed] == [("dev", day)]
    failed = cell(twins.columnar, "dev", day)
    assert failed.error == "VALIDATION: dev: 2 NaN/Inf value(s)" and failed.result_hash is None
    assert cell(twins.columnar, "ema", day) is None


def test_a_flatline_fails_validation_in_both_forms(twins: Twins) -> None:
    calcs = source(
        edits={
            "window": [
                ('"full": len(closes)', '"const": 1.5, "full": len(closes)'),
                ('"full": count', '"const": np.full(count.shape, 1.5), "full": count'),
            ]
        },
        extra={"window": "    flatline_min_users = 5\n"},
    )
    twins.write(rows(), calcs)
    summary = twins.run()
    assert {c for c, _, _ in summary.failed} == {"window"}
    error = cell(twins.columnar, "window", DATES[0]).error
    assert error == f"VALIDATION: const: flatline, 1.5 for all {len(SYMBOLS)} results"


# --- chunking and workers ----------------------------------------------------------------------


@pytest.mark.parametrize("block_dates", [1, 3])
def test_block_sizes_give_the_same_ledger(
    tmp_path: Path, db_url: str, twin_url: str, block_dates: int
) -> None:
    # Both projects columnar: one with blocks of block_dates, one with the default (256).
    small = Project(tmp_path / "small", db_url)
    large = Project(tmp_path / "large", twin_url)
    for project, config in ((small, f"block_dates = {block_dates}\n"), (large, "")):
        project.root.mkdir()
        project.extra_config = config
        project.write_prices(rows(bad={("BBB", BAD_DAY): "1.2.3"}))
        project.write_calcs(SOURCE)
    runs = [run_view(p.run(TARGET)) for p in (small, large)]
    assert runs[0] == runs[1]
    assert ledger_view(small) == ledger_view(large)


def test_the_worker_pool_gives_the_same_ledger_as_the_columnar_form(twins: Twins) -> None:
    # The per-user form through two workers against the columnar form, serial.
    twins.write(rows(bad={("BBB", BAD_DAY): "1.2.3"}), SOURCE)
    assert not twins.run(workers=(1, 2)).ok
    twins.write(rows())
    assert twins.run(workers=(1, 2)).ok


def test_a_worker_pool_and_blocks_in_one_run_give_the_same_ledger(twins: Twins) -> None:
    # window has only its per-user form (and fails CCC once): in the columnar project its
    # cells go through the worker pool and the other calculations' blocks read them.
    twins.write(
        rows(bad={("BBB", BAD_DAY): "1.2.3"}),
        source(edits=FAILING_WINDOW, per_user_only=("window",)),
    )
    assert not twins.run(workers=(2, 2)).ok


# --- historical blocks re-decided in order ----------------------------------------------------------


@pytest.mark.parametrize("block_dates", [256, 2])
def test_a_change_of_some_dates_re_runs_the_historical_cells_in_order_with_early_cutoff(
    tmp_path: Path, db_url: str, twin_url: str, block_dates: int
) -> None:
    twins = Twins(tmp_path, db_url, twin_url, config=f"block_dates = {block_dates}\n")
    twins.write(rows(), SOURCE)
    twins.run()
    # BBB's close changes on DATES[4]: window and dev change there and on the two dates its
    # window holds it; ema carries the change in its state until BBB's gap (DATES[8]),
    # where BBB has no result, so ema's result there is unchanged and the later dates stop.
    # A volume change on DATES[1] is read by nobody: window re-runs there, and stops.
    changed = rows(closes={("BBB", DATES[4]): 99.5}, volumes={("AAA", DATES[1]): 7})
    twins.write(changed)
    summary = twins.run()
    assert summary.ok
    ran = {calc: sorted(d for c, d in summary.executed if c == calc) for calc in CALCS}
    assert ran["window"] == [DATES[1], DATES[2], DATES[3], *DATES[4:7]]
    assert ran["dev"] == [DATES[1], *DATES[4:7]]
    assert ran["ema"] == DATES[4:9]
    assert ran["flag"] == ran["market"] == DATES[4:8]
    assert summary.executed[("ema", DATES[7])] == "UPSTREAM_CHANGED"
    assert summary.executed[("dev", DATES[1])] == "ROOT_DATA_CHANGED"
    assert summary.reasons["UPSTREAM_UNCHANGED"] >= 3
    # And the same ledger as a from-scratch build of the changed data.
    scratch = scratch_project(twins.columnar.root.parent)
    scratch.write_prices(changed)
    scratch.write_calcs(SOURCE)
    assert scratch.run(TARGET).ok
    assert twins.columnar.result_hashes() == scratch.result_hashes()


# --- gaps found by these comparisons (fixed in 084188a) ----------------------------------------------------------------------


def test_a_meta_calculation_over_failed_users_fails_as_in_the_per_user_form(twins: Twins) -> None:
    twins.write(rows(bad={("BBB", BAD_DAY): "1.2.3"}), SOURCE)
    twins.run(same=False)
    views = [ledger_view(p) for p in twins.both]
    market = [{d: v for (c, d), v in view.items() if c == "market"} for view in views]
    assert market[0][BAD_DAY]["status"] == "FAILED"
    assert market[0] == market[1]
    outputs = [normalised(p, p.cli("failures", "market").output) for p in twins.both]
    assert "user BBB (upstream" in outputs[1]
    assert outputs[0] == outputs[1]


LABEL = """
class Label(StandardCalculation):
    name = "label"
    dependencies = ["dev"]

    def process(self, ctx):
        return {"label": "up" if ctx.upstream["dev"]["dev"] > 0 else "down"}

    def compute(self, frame):
        return {"label": np.where(frame.upstream("dev", "dev") > 0, "up", "down")}
"""


def test_a_text_field_of_a_block_with_a_failed_user_hashes_as_in_the_per_user_form(
    twins: Twins,
) -> None:
    twins.write(rows(bad={("BBB", BAD_DAY): "1.2.3"}), SOURCE + LABEL)
    twins.run(same=False)
    read = [results(p, "label", BAD_DAY) for p in twins.both]
    assert set(read[0]["BBB"]) == {"__failed__"} and read[0] == read[1]
    hashes = [p.result_hashes()[("label", BAD_DAY)] for p in twins.both]
    assert hashes[0] == hashes[1]


EMPTY = """
from orchestrator import StandardCalculation


class Tick(StandardCalculation):
    name = "tick"
    root_data = ["prices"]

    def process(self, ctx):
        return {}


class Seen(StandardCalculation):
    name = "seen"
    dependencies = ["tick"]

    def process(self, ctx):
        return {"seen": SEEN}
"""


def test_results_without_fields_drive_their_dependents_in_later_runs(
    project: Project, tmp_path: Path
) -> None:
    project.extra_config = "columnar = false\n"
    project.write_prices(rows())
    project.write_calcs(EMPTY.replace("SEEN", "1"))
    assert project.run(TARGET).ok
    assert len(results(project, "seen", DATES[0])) == len(SYMBOLS)
    project.write_calcs(EMPTY.replace("SEEN", "2"))  # only the dependent re-runs
    assert project.run(TARGET).ok
    assert len(results(project, "seen", DATES[0])) == len(SYMBOLS)  # a scratch build's
    assert len(results(project, "tick", DATES[0])) == len(SYMBOLS)
