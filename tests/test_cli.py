"""The command line: output shapes and exit codes (0 ok, 1 cells failed, 2 usage/config)."""

from __future__ import annotations

import datetime as dt
import json

from click.testing import CliRunner

from orchestrator.app import Orchestrator
from orchestrator.cli import main
from orchestrator.ledger.store import Ledger
from tests.conftest import Project
from tests.test_scenarios import BASE, DATES, TARGET, setup


def test_run_then_plan_json_reports_every_cell_skipped(project: Project) -> None:
    setup(project)
    first = project.cli("run", "--date", TARGET.isoformat())
    assert first.exit_code == 0, first.output
    assert ": 48 cells computed, 0 failed, 0 skipped (up to date)," in first.output

    result = project.cli("plan", "--date", TARGET.isoformat(), "--format", "json")
    assert result.exit_code == 0
    report = json.loads(result.output)
    assert report["target_date"] == TARGET.isoformat()
    assert report["counts"] == {"RUNNABLE": 0, "SKIPPED": 48, "BLOCKED": 0, "IMPOSSIBLE": 0}
    cell = report["cells"][0]
    assert set(cell) == {"calculation", "date", "status", "reason", "detail", "result_hash"}
    assert cell["status"] == "SKIPPED" and cell["reason"] == "UP_TO_DATE"
    assert len(cell["result_hash"]) == 32


def test_plan_text_markdown_html(project: Project, tmp_path) -> None:
    setup(project)
    text = project.cli("plan", "--date", TARGET.isoformat())
    assert text.exit_code == 0
    assert "RUNNABLE          48" in text.output and "NEW: never computed" in text.output
    md = project.cli("plan", "--date", TARGET.isoformat(), "--format", "markdown")
    assert "| RUNNABLE | 48 |" in md.output
    out = tmp_path / "plan.html"
    html = project.cli("plan", "--date", TARGET.isoformat(), "--format", "html", "-o", str(out))
    assert html.exit_code == 0 and "<td>rsi</td>" in out.read_text()


def test_failed_cells_exit_1(project: Project) -> None:
    setup(project, BASE.replace("values = [r[", "raise ValueError('nope')\n        values = [r["))
    result = project.cli("run", "--date", TARGET.isoformat())
    assert result.exit_code == 1
    assert "FAILED market" in result.output and "nope" in result.output


def test_configuration_errors_exit_2_with_one_line(project: Project, tmp_path) -> None:
    result = CliRunner().invoke(main, ["--config", str(tmp_path / "missing.toml"), "plan"])
    assert result.exit_code == 2
    assert result.output.startswith("Error: config file") and "Traceback" not in result.output
    bad = tmp_path / "bad.toml"
    bad.write_text("database_url = [")
    assert CliRunner().invoke(main, ["--config", str(bad), "plan"]).exit_code == 2
    setup(
        project,
        BASE.replace(
            'dependencies = ["rsi"]\n\n    def process(self, ctx):\n        rsi',
            'dependencies = ["rsx"]\n\n    def process(self, ctx):\n        rsi',
        ),
    )
    result = project.cli("plan")
    assert result.exit_code == 2 and "depends on 'rsx'" in result.output


def test_bad_date_is_a_usage_error(project: Project) -> None:
    setup(project)
    result = project.cli("run", "--date", "2024-13-01")
    assert result.exit_code == 2 and "YYYY-MM-DD" in result.output


def test_show_prints_results_as_json(project: Project) -> None:
    setup(project)
    project.cli("run", "--date", TARGET.isoformat())
    whole = project.cli("show", "market", TARGET.isoformat())
    assert whole.exit_code == 0 and json.loads(whole.output)["n"] == 3
    one = project.cli("show", "rsi", TARGET.isoformat(), "--user", "AAA")
    assert set(json.loads(one.output)) == {"closes", "rsi"}
    assert project.cli("show", "rsi", "1999-01-01").exit_code == 1
    assert project.cli("show", "nope", TARGET.isoformat()).exit_code == 2


def test_graph_lists_passes_and_edges(project: Project) -> None:
    setup(project)
    result = project.cli("graph", "--format", "json")
    graph = json.loads(result.output)
    assert graph["passes"] == [["price_extractor"], ["rsi"], ["market", "signal"]]
    assert ["rsi", "signal"] in graph["edges"]


def test_epoch_bump_and_backfill(project: Project) -> None:
    setup(project)
    project.cli("run", "--date", TARGET.isoformat())
    assert project.cli("epoch", "bump").exit_code == 0
    assert "SYSTEM_EPOCH = 1" in (project.root / "system_epoch.py").read_text()
    back = project.cli("backfill", "--start", DATES[0].isoformat(), "--end", DATES[2].isoformat())
    assert back.exit_code == 0 and ": 12 cells computed," in back.output
    bad = project.cli("backfill", "--start", DATES[2].isoformat(), "--end", DATES[0].isoformat())
    assert bad.exit_code == 2


def test_second_run_is_refused_while_one_holds_the_lock(project: Project) -> None:
    setup(project)
    orch = Orchestrator.from_config(project.config)
    now = dt.datetime.now(dt.UTC)
    orch.ledger.acquire_lock("someone-else", now, dt.timedelta(minutes=5))
    result = project.cli("run", "--date", TARGET.isoformat())
    assert result.exit_code == 2 and "another run (someone-else)" in result.output
    orch.ledger.release_lock("someone-else")
    # An expired lock (a crashed run) does not block.
    orch.ledger.acquire_lock("crashed", now - dt.timedelta(hours=1), dt.timedelta(minutes=5))
    assert project.cli("run", "--date", TARGET.isoformat()).exit_code == 0
    orch.close()


def test_db_upgrade(project: Project) -> None:
    setup(project)
    result = project.cli("db", "upgrade")
    assert result.exit_code == 0 and "ledger schema at 0007" in result.output
    assert Ledger.open(project.db_url).count("cells") == 0


def test_config_from_pyproject_tool_table(project: Project, tmp_path, monkeypatch) -> None:
    setup(project)
    table = project.config.read_text()
    project.config.unlink()
    # The same keys under [tool.orchestrator] (tables nest: [tool.orchestrator.root_data.X]).
    body = table.replace("[root_data.prices]", "[tool.orchestrator.root_data.prices]")
    (project.root / "pyproject.toml").write_text(
        '[project]\nname = "demo"\n\n[tool.orchestrator]\n' + body
    )
    monkeypatch.chdir(project.root)  # no --config: orchestrator.toml absent, pyproject used
    result = CliRunner().invoke(main, ["run", "--date", TARGET.isoformat()])
    assert result.exit_code == 0, result.output
    assert f": {4 * len(DATES)} cells computed," in result.output
    (project.root / "pyproject.toml").write_text('[project]\nname = "demo"\n')
    result = CliRunner().invoke(main, ["run", "--date", TARGET.isoformat()])
    assert result.exit_code == 2 and "orchestrator.toml" in result.output
