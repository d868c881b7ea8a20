"""``orchestrator status`` (issue 10, item 1; SQLite and PostgreSQL): per calculation, the
date it is complete through, cells by state, unclean cells and the last run; exit 0 only when
every cell of the range is complete and clean."""

from __future__ import annotations

import datetime as dt
import json

from orchestrator.app import Orchestrator
from tests.conftest import Project, price_rows, weekdays

DATES = weekdays(dt.date(2024, 3, 1), 4)
USERS = [f"U{i:03d}" for i in range(40)]

SOURCE = """
from orchestrator import StandardCalculation


class Score(StandardCalculation):
    name = "score"
    category = "risk"
    root_data = ["prices"]

    def process(self, ctx):
        if ctx.date.isoformat() in {BAD_DAYS!r} and ctx.user in {BAD_USERS!r}:
            raise ValueError("<script>alert(1)</script> no quote")
        return {{"score": ctx.root["prices"][0]["close"] * 2}}


class Board(StandardCalculation):
    name = "board"
    category = "risk"
    dependencies = ["score"]

    def process(self, ctx):
        return {{"high": ctx.upstream["score"]["score"] > 100}}
"""


def setup(project: Project, bad_days: set[str] = frozenset(), bad_users: set[str] = frozenset()):
    project.write_prices(price_rows(USERS, DATES))
    project.write_calcs(SOURCE.format(BAD_DAYS=set(bad_days), BAD_USERS=set(bad_users)))


def status_json(project: Project, *args: str) -> tuple[int, dict]:
    result = project.cli("status", "--date", DATES[-1].isoformat(), "--format", "json", *args)
    return result.exit_code, json.loads(result.output)


def test_status_before_and_after_a_clean_run(project: Project) -> None:
    setup(project)
    code, before = status_json(project)
    assert code == 1 and before["last_run"] is None and not before["ok"]
    assert all(c["complete_through"] is None for c in before["calculations"])
    assert [c["states"] for c in before["calculations"]] == [{"RUNNABLE": 4}, {"RUNNABLE": 4}]
    assert project.cli("run", "--date", DATES[-1].isoformat()).exit_code == 0
    code, after = status_json(project)
    assert code == 0 and after["ok"]
    assert [c["name"] for c in after["calculations"]] == ["score", "board"]
    for calc in after["calculations"]:
        assert calc["cells"] == len(DATES) and calc["states"] == {"SKIPPED": len(DATES)}
        assert calc["complete_through"] == DATES[-1].isoformat() and calc["unclean"] == []
    run = after["last_run"]
    assert run["status"] == "COMPLETED" and run["exit_code"] == 0 and run["seconds"] > 0
    text = project.cli("status", "--date", DATES[-1].isoformat())
    assert text.exit_code == 0 and "Everything complete and clean." in text.output
    row = next(line for line in text.output.splitlines() if line.startswith("score "))
    assert row.split() == ["score", DATES[-1].isoformat(), "4", "0", "0", "0", "0"]


def test_status_names_partial_and_dead_lettered_cells(project: Project) -> None:
    project.extra_config = "max_attempts = 1\n"
    # Two users fail on the third date (the cell is PARTIAL: published for the others), every
    # user on the second (the cell fails as a whole and becomes a dead letter).
    days = {DATES[1].isoformat(), DATES[2].isoformat()}
    setup(project, bad_days=days, bad_users={"U003", "U017"})
    project.write_calcs(
        SOURCE.format(BAD_DAYS={DATES[2].isoformat()}, BAD_USERS={"U003", "U017"}).replace(
            "    def process(self, ctx):\n        if",
            f"    def process(self, ctx):\n        if ctx.date.isoformat() == "
            f"'{DATES[1].isoformat()}':\n            raise ValueError('<b>down</b>')\n        if",
            1,
        )
    )
    result = project.cli("run", "--date", DATES[-1].isoformat())
    assert result.exit_code == 1, result.output
    code, found = status_json(project)
    assert code == 1 and not found["ok"]
    score = found["calculations"][0]
    assert score["complete_through"] == DATES[0].isoformat()
    unclean = {u["date"]: u for u in score["unclean"]}
    assert unclean[DATES[1].isoformat()]["status"] == "DEAD_LETTER"
    assert unclean[DATES[2].isoformat()]["users_failed"] == 2
    assert found["last_run"]["exit_code"] == 1 and found["last_run"]["status"] == "FAILED"
    text = project.cli("status", "--date", DATES[-1].isoformat())
    assert text.exit_code == 1 and "Not complete and clean (" in text.output
    assert f"score {DATES[1]} dead letter (orchestrator dlq list)" in text.output
    assert f"score {DATES[2]}" in text.output and "2 users failed" in text.output
    html = project.cli("status", "--date", DATES[-1].isoformat(), "--format", "html")
    assert html.exit_code == 1
    assert "<b>down</b>" not in html.output and "&lt;b&gt;down&lt;/b&gt;" in html.output
    assert "<script>" not in html.output


def test_status_to_a_file_and_into_a_missing_folder(project: Project) -> None:
    setup(project)
    out = project.root / "status.html"
    result = project.cli(
        "status", "--date", DATES[-1].isoformat(), "--format", "html", "-o", str(out)
    )
    assert result.exit_code == 1 and out.read_text().startswith("<!doctype html>")
    missing = project.root / "nope" / "s.html"
    bad = project.cli("status", "--format", "html", "-o", str(missing))
    assert bad.exit_code == 2 and "cannot write the report" in bad.output


def test_status_is_the_same_value_from_the_api(project: Project) -> None:
    setup(project)
    project.run(DATES[-1])
    orch = Orchestrator.from_config(project.config)
    try:
        found = orch.status(DATES[-1])
    finally:
        orch.close()
    assert found.ok and found.exit_code == 0
    assert [c.complete_through for c in found.calculations] == [DATES[-1], DATES[-1]]
