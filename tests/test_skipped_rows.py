"""Skipped root rows stay visible on every run and plan while they exist (SQLite and
PostgreSQL).

A row that can be given to no user (a bad date, an empty user field, a row of the wrong
width with no single reading) fails nobody: it is skipped and counted. The count and the
first examples are stored with the dataset's index (``root_sources.problems``), so a later
run that reuses the index — the source is unchanged, no file is read — still lists them in
its notes, and ``plan`` shows them in every format. Fixing the file makes them go away.
"""

from __future__ import annotations

import datetime as dt
import json

from orchestrator.app import skipped_note
from tests.conftest import PRICES_HEADER, Project, price_rows, weekdays

DATES = weekdays(dt.date(2024, 1, 1), 5)
TARGET = DATES[-1]
USERS = ["AAA", "BBB"]

CALCS = """
from orchestrator import StandardCalculation


class Close(StandardCalculation):
    name = "close"
    category = "prices"
    root_data = ["prices"]

    def process(self, ctx):
        return {"close": ctx.root["prices"][0]["close"]}
"""

NOTE = (
    "prices: 1 row skipped, no user or date can be read from them: "
    "prices.csv:4: bad date '2024-13-01'"
)


def write(project: Project, bad: bool) -> None:
    """The price file; with ``bad``, line 4 is a row whose date is no date."""
    lines = [",".join(PRICES_HEADER)] + [
        ",".join(str(r[c]) for c in PRICES_HEADER) for r in price_rows(USERS, DATES)
    ]
    if bad:
        lines.insert(3, "2024-13-01,1,2,0.5,1.5,10,BBB")
    project.data.parent.mkdir(parents=True, exist_ok=True)
    project.data.write_text("\n".join(lines) + "\n")


def test_skipped_rows_are_reported_by_every_run_and_plan_until_fixed(project: Project) -> None:
    write(project, bad=True)
    project.write_calcs(CALCS)

    first = project.run(TARGET)
    assert first.ok and first.exit_code == 0  # skipped rows fail nobody
    assert NOTE in first.notes

    # The source is unchanged: the index is reused from the ledger, no file is read, and the
    # skipped row is still reported (before, this run said nothing).
    second = project.run(TARGET)
    assert second.ok and second.exit_code == 0 and second.completed == 0
    assert NOTE in second.notes

    plan = project.plan(TARGET)
    assert plan.root["prices"].skipped == 1
    assert plan.root["prices"].problems == ("prices.csv:4: bad date '2024-13-01'; row skipped",)

    shown = project.cli("plan", "--date", TARGET.isoformat(), "--format", "json")
    assert shown.exit_code == 0, shown.output
    root = json.loads(shown.output)["root"]["prices"]
    assert root["skipped"] == 1
    assert root["problems"] == ["prices.csv:4: bad date '2024-13-01'; row skipped"]

    text = project.cli("plan", "--date", TARGET.isoformat())
    assert text.exit_code == 0, text.output
    assert "1 row(s) skipped, no user or date can be read from them:" in text.output
    assert "prices.csv:4: bad date '2024-13-01'; row skipped" in text.output
    for fmt in ("markdown", "html"):
        report = project.cli("plan", "--date", TARGET.isoformat(), "--format", fmt)
        assert report.exit_code == 0, report.output
        assert "prices.csv:4: bad date" in report.output, fmt

    write(project, bad=False)  # fixed: the notes and the plan's examples are gone
    fixed = project.run(TARGET)
    assert fixed.ok
    assert not any("skipped" in note for note in fixed.notes), fixed.notes
    again = project.run(TARGET)
    assert again.ok and not again.notes
    clean = json.loads(
        project.cli("plan", "--date", TARGET.isoformat(), "--format", "json").output
    )["root"]["prices"]
    assert clean["skipped"] == 0 and clean["problems"] == []
    assert "skipped" not in project.cli("plan", "--date", TARGET.isoformat()).output


def test_an_index_stored_before_problems_were_recorded_is_read_again(project: Project) -> None:
    """A ledger upgraded to 0005 has no problems for datasets indexed before: the next run
    reads the source once rather than report its skipped rows as none."""
    from sqlalchemy import update

    from orchestrator.ledger.store import ROOT_SOURCES

    write(project, bad=True)
    project.write_calcs(CALCS)
    assert project.run(TARGET).ok
    orch = project.orchestrator()
    try:
        with orch.ledger.engine.begin() as conn:
            conn.execute(update(ROOT_SOURCES).values(problems=None))
        assert orch.ledger.load_root_problems() == {}
    finally:
        orch.close()
    assert NOTE in project.run(TARGET).notes


def test_the_note_counts_rows_and_lists_examples() -> None:
    problems = [
        "a.csv:3: missing user; row skipped",
        "b.csv.gz: unreadable, skipped (not gzip)",
    ]
    assert skipped_note("prices", 25, problems) == (
        "prices: 25 rows skipped, no user or date can be read from them (the first 1 listed): "
        "a.csv:3: missing user; b.csv.gz: unreadable, skipped (not gzip)"
    )
    assert skipped_note("prices", 0, problems[1:]) == (
        "prices: b.csv.gz: unreadable, skipped (not gzip)"
    )


def test_0005_adds_problems_to_existing_sources_and_drops_them_down(db_url: str) -> None:
    from sqlalchemy import inspect, text

    from orchestrator.ledger.store import downgrade, make_engine, upgrade

    engine = make_engine(db_url)
    upgrade(engine, "0004")
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO root_sources (dataset, source_digest, rows, malformed, indexed_at)"
                " VALUES ('prices', :d, 10, 1, :t)"
            ),
            {"d": "d" * 32, "t": dt.datetime(2024, 1, 3)},
        )
    upgrade(engine, "0005")
    with engine.connect() as conn:
        assert conn.execute(text("SELECT dataset, problems FROM root_sources")).all() == [
            ("prices", None)  # indexed before 0005: never recorded, read again by the app
        ]
    downgrade(engine, "0004")
    columns = {c["name"] for c in inspect(engine).get_columns("root_sources")}
    assert "problems" not in columns and "malformed" in columns
    with engine.connect() as conn:
        assert conn.execute(text("SELECT dataset FROM root_sources")).all() == [("prices",)]
    engine.dispose()
