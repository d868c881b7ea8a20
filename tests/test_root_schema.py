"""Root data fingerprints cover the schema (issue 8, item 2; SQLite and PostgreSQL, the
in-memory parse and the root store).

Swapping two header columns, renaming one, or a column turning from ``int`` to ``float``
leaves the rows' text as it was; each must still change the content hash of every date with
rows from that file — and only those — so the plan re-runs exactly those cells, as
ROOT_DATA_CHANGED with a detail naming the change, and afterwards every cell's result hash
equals that of a from-scratch build of the changed data. A new hash format re-reads a
stored root index instead of reusing it.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from orchestrator import rootdata
from orchestrator.planning import Reason, Status
from orchestrator.rootdata import Dataset
from orchestrator.rootstore import StoredDataset
from tests.conftest import PRICES_HEADER, Project, price_rows, scratch_project
from tests.test_scenarios import DATES, SYMBOLS, TARGET

CALCS = '''
from orchestrator import StandardCalculation


class Bar(StandardCalculation):
    """Every column of the user's row, by name, and the type of its volume."""

    name = "bar"
    category = "prices"
    root_data = ["prices"]
    lookback = LOOKBACK

    def process(self, ctx):
        row = ctx.root["prices"][0]
        out = {k: v for k, v in row.items() if k not in ("date", "Name")}
        out["volume_type"] = type(row.get("volume")).__name__
        return out


class Spread(StandardCalculation):
    name = "spread"
    category = "signals"
    dependencies = ["bar"]

    def process(self, ctx):
        bar = ctx.upstream["bar"]
        return {"spread": (bar.get("close") or 0) - (bar.get("open") or 0)}
'''

FIRST, SECOND = DATES[:6], DATES[6:]  # the dates of file a.csv, of file b.csv
# "store": no history windows, so the prices are streamed from the root store; "memory": a
# history window of 2 dates holds them in memory. Both parsers must see every change.
PARSERS = {"store": 1, "memory": 2}


def lines(dates: list[dt.date], header: list[str] = PRICES_HEADER) -> list[str]:
    rows = price_rows(SYMBOLS, dates)
    return [",".join(header)] + [",".join(str(r[c]) for c in PRICES_HEADER) for r in rows]


def write(folder: Path, name: str, text_lines: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text("\n".join(text_lines) + "\n")


def make(project: Project, lookback: int) -> Project:
    project.root.mkdir(parents=True, exist_ok=True)
    write(project.root / "data" / "prices", "a.csv", lines(FIRST))
    write(project.root / "data" / "prices", "b.csv", lines(SECOND))
    project.write_calcs(CALCS.replace("LOOKBACK", str(lookback)))
    # A folder source of two files (the Project default is one file).
    project.config.write_text(
        project.config.read_text().replace('path = "data/prices.csv"', 'path = "data/prices"')
    )
    return project


def from_scratch(project: Project, tmp_path: Path, lookback: int) -> dict:
    """Result hashes of a fresh project over a copy of ``project``'s data now."""
    scratch = make(scratch_project(tmp_path), lookback)
    for name in ("a.csv", "b.csv"):
        source = project.root / "data" / "prices" / name
        (scratch.root / "data" / "prices" / name).write_text(source.read_text())
    assert scratch.run(TARGET).ok
    return scratch.result_hashes()


def window_days(lookback: int, day: dt.date) -> list[dt.date]:
    """The changed dates (of b.csv) in the window of ``bar`` on ``day``."""
    end = DATES.index(day) + 1
    return [d for d in DATES[max(0, end - lookback) : end] if d in SECOND]


def check(project: Project, tmp_path: Path, lookback: int, what: dict[dt.date, str]) -> None:
    """The plan re-runs bar exactly on b.csv's dates, naming ``what`` changed on each date
    of its window; then the run equals a fresh build."""
    decisions = project.plan(TARGET).decisions
    changed = {d for (c, d), x in decisions.items() if c == "bar" and x.status is Status.RUNNABLE}
    assert changed == set(SECOND)
    for day in SECOND:
        decision = decisions[("bar", day)]
        assert decision.reason is Reason.ROOT_DATA_CHANGED
        expected = "; ".join(
            f"prices: {change} on {', '.join(d.isoformat() for d in days)}"
            for change, days in _group({d: what[d] for d in window_days(lookback, day)}).items()
        )
        assert decision.detail == expected
    for day in FIRST:
        assert decisions[("bar", day)].reason is Reason.UP_TO_DATE
    summary = project.run(TARGET)
    assert summary.ok, summary.lines()
    assert {d for c, d in summary.executed if c == "bar"} == set(SECOND)
    assert project.result_hashes() == from_scratch(project, tmp_path, lookback)


def _group(by_day: dict[dt.date, str]) -> dict[str, list[dt.date]]:
    out: dict[str, list[dt.date]] = {}
    for day, change in sorted(by_day.items()):
        out.setdefault(change, []).append(day)
    return out


@pytest.fixture(params=sorted(PARSERS))
def setup(request: pytest.FixtureRequest, tmp_path: Path, db_url: str) -> tuple[Project, int]:
    lookback = PARSERS[request.param]
    project = make(Project(tmp_path / "project", db_url), lookback)
    assert project.run(TARGET).ok
    orch = project.orchestrator()
    kind = Dataset if request.param == "memory" else StoredDataset
    assert isinstance(orch.dataset("prices"), kind)
    orch.close()
    return project, lookback


def test_swapped_columns_rerun_their_dates_and_match_a_fresh_build(
    setup: tuple[Project, int], tmp_path: Path
) -> None:
    project, lookback = setup
    swapped = ["date", "close", "high", "low", "open", "volume", "Name"]
    write(project.root / "data" / "prices", "b.csv", lines(SECOND, swapped))
    check(project, tmp_path, lookback, dict.fromkeys(SECOND, "columns open, close swapped"))


def test_a_renamed_column_reruns_its_dates_and_matches_a_fresh_build(
    setup: tuple[Project, int], tmp_path: Path
) -> None:
    project, lookback = setup
    renamed = ["date", "open", "high", "low", "Close", "volume", "Name"]
    write(project.root / "data" / "prices", "b.csv", lines(SECOND, renamed))
    check(project, tmp_path, lookback, dict.fromkeys(SECOND, "column close renamed to Close"))


def test_a_column_turning_float_reruns_its_dates_and_matches_a_fresh_build(
    setup: tuple[Project, int], tmp_path: Path
) -> None:
    project, lookback = setup
    text = lines(SECOND)
    fixed = SECOND[2].isoformat()
    i = next(i for i, line in enumerate(text) if line.startswith(fixed))
    fields = text[i].split(",")
    fields[5] = fields[5] + ".5"  # one volume with a fraction: the file's volumes are floats
    text[i] = ",".join(fields)
    write(project.root / "data" / "prices", "b.csv", text)
    what = dict.fromkeys(SECOND, "column volume int -> float")
    what[SECOND[2]] += ", rows changed"
    check(project, tmp_path, lookback, what)
    orch = project.orchestrator()
    bar = orch.load_result("bar", SECOND[0])
    orch.close()
    assert {r["volume_type"] for r in bar.values()} == {"float"}


def test_a_new_hash_format_rereads_the_stored_index(
    setup: tuple[Project, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The stored index is reused while the source digest is unchanged: the hash format is
    # part of that digest, so hashes made by other rules are never kept. Every cell reading
    # root data re-runs once (ROOT_DATA_CHANGED), and early cutoff stops the cascade.
    project, _ = setup
    monkeypatch.setattr(rootdata, "ROOT_HASH_FORMAT", rootdata.ROOT_HASH_FORMAT + 1)
    before = project.result_hashes()
    summary = project.run(TARGET)
    assert summary.ok
    assert set(summary.executed) == {("bar", d) for d in DATES}
    assert set(summary.executed.values()) == {"ROOT_DATA_CHANGED"}
    assert project.result_hashes() == before
    assert project.plan(TARGET).counts()["RUNNABLE"] == 0
