"""Reviewed plans (issue 10, item 3; SQLite and PostgreSQL): ``plan --save FILE`` then
``run --plan FILE`` runs exactly that plan, or refuses (exit 2, nothing executed) naming what
changed since it was made: code, epoch, root data, the ledger."""

from __future__ import annotations

import datetime as dt
import json
import uuid
from pathlib import Path

from tests.conftest import Project, price_rows, weekdays

DATES = weekdays(dt.date(2024, 3, 1), 3)
SOURCE = """
from orchestrator import StandardCalculation


class Gain(StandardCalculation):
    name = "gain"
    category = "signals"
    root_data = ["prices"]

    def process(self, ctx):
        return {"g": ctx.root["prices"][0]["close"] * FACTOR}


class Flag(StandardCalculation):
    name = "flag"
    category = "signals"
    dependencies = ["gain"]

    def process(self, ctx):
        return {"up": ctx.upstream["gain"]["g"] > 100}
"""


def setup(project: Project, factor: float = 1.5) -> None:
    project.write_prices(price_rows(["AAA", "BBB"], DATES))
    project.write_calcs(SOURCE.replace("FACTOR", repr(factor)))


def save(project: Project, path: Path, *args: str) -> None:
    result = project.cli("plan", "--date", DATES[-1].isoformat(), "--save", str(path), *args)
    assert result.exit_code == 0, result.output
    assert json.loads(path.read_text())["kind"] == "orchestrator-plan"


def refused(project: Project, path: Path) -> str:
    before = project.result_hashes()
    result = project.cli("run", "--plan", str(path))
    assert result.exit_code == 2, result.output
    assert project.result_hashes() == before  # nothing executed
    line = result.output.strip().splitlines()[-1]
    assert line.startswith("Error: the saved plan is stale, nothing ran: ")
    return line


def test_an_unchanged_plan_runs_and_matches_a_plain_run(project: Project, tmp_path: Path) -> None:
    setup(project)
    path = tmp_path / "p.json"
    save(project, path)
    result = project.cli("run", "--plan", str(path))
    assert result.exit_code == 0, result.output
    assert ": 6 cells computed," in result.output
    twin = Project(tmp_path / f"twin-{uuid.uuid4().hex[:6]}", f"sqlite:///{tmp_path / 'twin.db'}")
    twin.root.mkdir()
    setup(twin)
    assert twin.cli("run", "--date", DATES[-1].isoformat()).exit_code == 0
    assert project.result_hashes() == twin.result_hashes()
    # The plan is spent: the ledger moved since it was made.
    assert "ledger changed since the plan was made (cells written): flag, gain" in refused(
        project, path
    )


def test_a_code_edit_or_an_epoch_bump_refuses_the_plan(project: Project, tmp_path: Path) -> None:
    setup(project)
    project.run(DATES[-1])
    path = tmp_path / "p.json"
    save(project, path)
    setup(project, factor=2.5)
    assert "gain code changed since the plan was made" in refused(project, path)
    setup(project)  # back: the plan holds again, as long as nothing else changed
    save(project, path)
    assert project.cli("epoch", "bump", "--reason", "test").exit_code == 0
    assert "system epoch changed 0 -> 1 since the plan was made" in refused(project, path)
    save(project, path)
    assert project.cli("epoch", "bump", "--calc", "flag").exit_code == 0
    assert "flag epoch changed since the plan was made" in refused(project, path)


def test_a_root_data_correction_refuses_the_plan(project: Project, tmp_path: Path) -> None:
    setup(project)
    project.run(DATES[-1])
    path = tmp_path / "p.json"
    save(project, path)
    rows = price_rows(["AAA", "BBB"], DATES)
    rows[1]["close"] = float(rows[1]["close"]) + 1
    project.write_prices(rows)
    line = refused(project, path)
    assert f"root data prices changed since the plan was made on {rows[1]['date']}" in line


def test_a_selection_is_saved_and_run_as_saved(project: Project, tmp_path: Path) -> None:
    setup(project)
    path = tmp_path / "p.json"
    save(project, path, "--select", "gain")
    assert json.loads(path.read_text())["selection"] == ["gain"]
    result = project.cli("run", "--plan", str(path))
    assert result.exit_code == 0 and ": 3 cells computed," in result.output
    both = project.cli("run", "--plan", str(path), "--select", "flag")
    assert both.exit_code == 2 and "--plan runs the saved plan's date and selection" in both.output


def test_a_foreign_or_damaged_file_is_a_one_line_error(project: Project, tmp_path: Path) -> None:
    setup(project)
    cases = {
        "missing.json": "cannot read the plan",
        "text.json": "is not a saved plan (not JSON",
        "other.json": "is not a saved plan (make one with plan --save)",
        "future.json": "is a saved plan of format 99",
        "broken.json": "is a damaged saved plan",
    }
    (tmp_path / "text.json").write_text("not json")
    (tmp_path / "other.json").write_text('{"x": 1}')
    (tmp_path / "future.json").write_text('{"kind": "orchestrator-plan", "format": 99}')
    (tmp_path / "broken.json").write_text('{"kind": "orchestrator-plan", "format": 1}')
    for name, message in cases.items():
        result = project.cli("run", "--plan", str(tmp_path / name))
        assert result.exit_code == 2, (name, result.output)
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], (name, result.output)
