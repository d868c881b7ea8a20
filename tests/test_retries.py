"""Retries, reconciliation and dead letters (SQLite and PostgreSQL)."""

from __future__ import annotations

from pathlib import Path

from orchestrator.planning import Reason
from tests.conftest import Project
from tests.test_scenarios import BASE, DATES, TARGET, plan, run, setup

BAD_DAY = DATES[4]
ALWAYS_FAILS = BASE.replace(
    '        rsi = ctx.upstream["rsi"]["rsi"]\n',
    '        rsi = ctx.upstream["rsi"]["rsi"]\n'
    f"        if ctx.date.isoformat() == '{BAD_DAY.isoformat()}':\n"
    "            raise ValueError('vendor sent garbage')\n",
)


def test_a_flaky_cell_is_retried_in_the_same_run(project: Project, tmp_path: Path) -> None:
    marker = tmp_path / "failed-once"
    flaky = BASE.replace(
        '        rsi = ctx.upstream["rsi"]["rsi"]\n',
        '        rsi = ctx.upstream["rsi"]["rsi"]\n'
        "        import pathlib\n"
        f"        marker = pathlib.Path({str(marker)!r})\n"
        f"        if ctx.date.isoformat() == '{BAD_DAY.isoformat()}' and not marker.exists():\n"
        "            marker.write_text('x')\n"
        "            raise ConnectionError('flaky')\n",
    )
    setup(project, flaky)
    summary = run(project)
    assert summary.ok and summary.failed == []
    orch = project.orchestrator()
    attempts = orch.ledger.attempts("signal", BAD_DAY)
    cell = orch.ledger.cell("signal", BAD_DAY)
    orch.close()
    assert [a.status for a in attempts] == ["FAILED", "COMPLETED"]
    assert [a.reason for a in attempts] == ["NEW", "RETRY"]
    assert cell.status == "COMPLETED" and cell.attempts == 0


def test_retries_then_dead_letter_then_manual_retry(project: Project) -> None:
    setup(project, ALWAYS_FAILS)  # max_attempts defaults to 3
    first = run(project)
    assert [(c, d) for c, d, _ in first.failed] == [("signal", BAD_DAY)]
    orch = project.orchestrator()
    assert orch.ledger.cell("signal", BAD_DAY).attempts == 2  # first try + reconciliation
    orch.close()
    assert plan(project).decisions[("signal", BAD_DAY)].reason is Reason.RETRY

    second = run(project)
    assert second.executed == {("signal", BAD_DAY): "RETRY"}
    orch = project.orchestrator()
    cell = orch.ledger.cell("signal", BAD_DAY)
    orch.close()
    assert cell.status == "DEAD_LETTER" and cell.attempts == 3

    third_plan = plan(project)
    dead = third_plan.decisions[("signal", BAD_DAY)]
    assert dead.reason is Reason.DEAD_LETTER and "vendor sent garbage" in dead.detail
    assert run(project).executed == {}  # out of the nightly loop
    listed = project.cli("dlq", "list")
    assert f"signal                   {BAD_DAY} attempts 3: ValueError: vendor sent garbage" in (
        listed.output
    )

    project.write_calcs(BASE)  # the fix
    assert plan(project).decisions[("signal", BAD_DAY)].reason is Reason.DEAD_LETTER
    assert project.cli("dlq", "retry").exit_code == 2  # says what to name
    retried = project.cli("dlq", "retry", "signal", BAD_DAY.isoformat())
    assert "1 dead letter(s) will be retried" in retried.output
    assert plan(project).decisions[("signal", BAD_DAY)].reason is Reason.RETRY
    fixed = run(project)
    assert fixed.ok and ("signal", BAD_DAY) in fixed.executed
    assert project.cli("dlq", "list").output.strip() == "no dead letters"


def test_dead_letter_blocks_historical_successors(project: Project) -> None:
    broken = BASE.replace(
        '        close = ctx.upstream["price_extractor"]["close"]\n',
        '        close = ctx.upstream["price_extractor"]["close"]\n'
        f"        if ctx.date.isoformat() == '{BAD_DAY.isoformat()}':\n"
        "            raise RuntimeError('bad day')\n",
    )
    setup(project, broken)
    project.extra_config = "max_attempts = 1\n"
    project.write_config()
    run(project)
    p = plan(project)
    assert p.decisions[("rsi", BAD_DAY)].reason is Reason.DEAD_LETTER
    nxt = DATES[DATES.index(BAD_DAY) + 1]
    assert p.decisions[("rsi", nxt)].reason is Reason.UPSTREAM_DEAD_LETTER
    assert p.decisions[("market", BAD_DAY)].reason is Reason.UPSTREAM_DEAD_LETTER
    assert p.decisions[("price_extractor", nxt)].reason is Reason.UP_TO_DATE
    assert TARGET in p.dates
