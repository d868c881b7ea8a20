"""Failed users are seen; exit codes cron can trust (issue 8, items 5 and 6; SQLite and
PostgreSQL).

A calculation raising for 3 of 60 users publishes the other 57, but the run exits 1 and says
so, each failed user's traceback is stored and shown (``failures``, ``runs --run``), the cell
is retried by later runs (RETRY) and dead-lettered after ``max_attempts``; dead letters and
cells blocked by them exit 1 too, and a blocked chain names the dead letter at its top.
"""

from __future__ import annotations

import datetime as dt

import pytest
from click.testing import Result

from orchestrator.planning import Reason
from tests.conftest import Project, price_rows, weekdays

DATES = weekdays(dt.date(2024, 3, 1), 3)
DAY = DATES[1]
USERS = [f"U{i:03d}" for i in range(60)]
BAD = {"U007", "U023", "U041"}

SOURCE = f'''
from orchestrator import StandardCalculation


class Score(StandardCalculation):
    name = "score"
    category = "risk"
    root_data = ["prices"]

    def process(self, ctx):
        close = ctx.root["prices"][0]["close"]
        if ctx.date.isoformat() == "{DAY.isoformat()}" and ctx.user in {sorted(BAD)!r}:
            raise ValueError(f"no quote for {{ctx.user}}")
        return {{"score": close * 2}}


class Rank(StandardCalculation):
    name = "rank"
    category = "risk"
    dependencies = ["score"]

    def process(self, ctx):
        return {{"high": ctx.upstream["score"]["score"] > 100}}
'''


def run_cli(project: Project, workers: int = 1) -> Result:
    return project.cli("run", "--date", DATES[-1].isoformat(), "--workers", str(workers))


def run_id_of(result: Result) -> str:
    line = next(x for x in result.output.splitlines() if x.startswith("Run "))
    return line.split()[1]


@pytest.mark.parametrize("workers", [1, 2])
def test_three_of_sixty_failing_users_are_seen_retried_and_dead_lettered(
    project: Project, workers: int
) -> None:
    project.write_prices(price_rows(USERS, DATES))
    project.write_calcs(SOURCE)

    first = run_cli(project, workers)
    assert first.exit_code == 1, first.output
    assert "3 users failed in 1 cell: score 2024-03-04 (orchestrator failures)" in first.output
    assert "3 users failed upstream or on an earlier date in 1 more cell: rank 2024-03-04" in (
        first.output
    )
    orch = project.orchestrator()
    score = orch.ledger.cell("score", DAY)
    rank = orch.ledger.cell("rank", DAY)
    published = orch.load_result("score", DAY)
    orch.close()
    assert (score.status, score.users_failed, score.attempts) == ("PARTIAL", 3, 1)
    assert (rank.status, rank.users_failed) == ("COMPLETED", 3)  # inherited: not retried
    assert len(published) == 60 and set(published["U008"]) == {"score"}
    assert published["U007"]["__failed__"] == {
        "calculation": "score",
        "date": DAY.isoformat(),
        "error": "ValueError: no quote for U007",
    }

    listing = project.cli("failures", "score", DAY.isoformat())
    assert listing.exit_code == 0
    assert "score 2024-03-04 PARTIAL: 3 user(s) failed" in listing.output
    for user in sorted(BAD):  # the whole traceback, ending at the calculation's line
        assert f"score 2024-03-04 user {user} (own," in listing.output
        assert f"ValueError: no quote for {user}" in listing.output
    assert 'main.py", line 13, in process' in listing.output
    assert 'raise ValueError(f"no quote for {ctx.user}")' in listing.output
    downstream = project.cli("failures", "rank")
    assert "rank 2024-03-04 user U023 (upstream," in downstream.output
    assert "upstream score failed for user U023 on 2024-03-04" in downstream.output

    shown = project.cli("show", "score", DAY.isoformat())
    assert shown.exit_code == 0 and '"__failed__"' in shown.stdout
    assert "note: 3 user(s) failed in score on 2024-03-04" in shown.stderr
    one = project.cli("show", "score", DAY.isoformat(), "--user", "U023")
    assert one.exit_code == 1
    assert "score failed for user U023 on 2024-03-04: ValueError: no quote for U023" in one.stderr

    runs = project.cli("runs", "--run", run_id_of(first))
    assert f"run {run_id_of(first)} FAILED exit 1" in runs.output
    assert "3 users failed in 1 cell: score 2024-03-04 (orchestrator failures)" in runs.output
    assert 'main.py", line 13, in process' in runs.output and "user U041 (own" in runs.output

    orch = project.orchestrator()
    decision = orch.plan(DATES[-1]).decisions[("score", DAY)]
    orch.close()
    assert decision.reason is Reason.RETRY
    assert (
        decision.detail
        == "attempt 1: 3 of 60 users failed; first: U007: ValueError: no quote for U007"
    )

    second = run_cli(project, workers)
    assert second.exit_code == 1 and "3 users failed in 1 cell" in second.output
    third = run_cli(project, workers)  # max_attempts = 3: a dead letter, still published
    assert third.exit_code == 1
    assert "1 dead letter: score 2024-03-04 (orchestrator dlq list)" in third.output
    orch = project.orchestrator()
    attempts = orch.ledger.attempts("score", DAY)
    cell = orch.ledger.cell("score", DAY)
    still = orch.load_result("score", DAY)
    orch.close()
    assert [(a.reason, a.status) for a in attempts] == [
        ("NEW", "PARTIAL"),
        ("RETRY", "PARTIAL"),
        ("RETRY", "DEAD_LETTER"),
    ]
    assert cell.status == "DEAD_LETTER" and cell.attempts == 3 and len(still) == 60

    fourth = run_cli(project, workers)  # nothing runs, and it is still not clean
    assert fourth.exit_code == 1
    assert "1 dead letter: score 2024-03-04" in fourth.output
    assert "1 cell blocked by a failure upstream, caused by score 2024-03-04" in fourth.output
    assert ": 0 cells computed," in fourth.output


def test_stored_failures_are_bounded_and_counted(project: Project) -> None:
    many = [f"U{i:03d}" for i in range(300)]
    project.write_prices(price_rows(many, DATES[:1]))
    project.write_calcs(
        """
        from orchestrator import StandardCalculation


        class Score(StandardCalculation):
            name = "score"
            root_data = ["prices"]

            def process(self, ctx):
                if int(ctx.user[1:]) % 12 == 0:  # 25 of 300: under the circuit breaker
                    raise KeyError(ctx.user)
                return {"score": ctx.root["prices"][0]["close"]}
        """
    )
    result = project.cli("run", "--date", DATES[0].isoformat())
    assert result.exit_code == 1
    assert "25 users failed in 1 cell" in result.output
    orch = project.orchestrator()
    stored = orch.ledger.user_failures("score", DATES[0])
    cell = orch.ledger.cell("score", DATES[0])
    orch.close()
    assert cell.users_failed == 25
    assert [r.user for r in stored] == [f"U{i:03d}" for i in range(0, 240, 12)]  # first 20
    listing = project.cli("failures")
    assert "score 2024-03-01 PARTIAL: 25 user(s) failed (20 stored)" in listing.output


def test_a_clean_run_exits_0_and_says_nothing_more(project: Project) -> None:
    project.write_prices(price_rows(USERS[:5], DATES))
    project.write_calcs(SOURCE.replace(f"{sorted(BAD)!r}", "[]"))
    for _ in range(2):  # the cold run, then the no-op
        result = run_cli(project)
        assert result.exit_code == 0, result.output
        assert "not clean" not in result.output and "failed in" not in result.output
    runs = project.cli("runs", "--run", run_id_of(result))
    assert "COMPLETED exit 0" in runs.output
    assert project.cli("failures").output.strip() == "no failed users"


CHAIN = """
from orchestrator import StandardCalculation


class A(StandardCalculation):
    name = "a"
    root_data = ["prices"]
    historical = True

    def process(self, ctx):
        if ctx.date.isoformat() == "{day}":
            raise RuntimeError("feed down")
        return {{"v": ctx.root["prices"][0]["close"]}}


class B(StandardCalculation):
    name = "b"
    dependencies = ["a"]

    def process(self, ctx):
        return {{"v": ctx.upstream["a"]["v"] + 1}}


class C(StandardCalculation):
    name = "c"
    dependencies = ["b"]

    def process(self, ctx):
        return {{"v": ctx.upstream["b"]["v"] + 1}}
"""


def test_a_dead_letter_chain_names_its_root_cause_and_blocks_with_exit_1(
    project: Project,
) -> None:
    project.extra_config = "max_attempts = 1\n"
    project.write_prices(price_rows(USERS[:3], DATES))
    project.write_calcs(CHAIN.format(day=DATES[0].isoformat()))
    first = run_cli(project)
    assert first.exit_code == 1 and "FAILED a 2024-03-01" in first.output
    orch = project.orchestrator()
    p = orch.plan(DATES[-1])
    orch.close()
    d = {key: (x.reason, x.detail) for key, x in p.decisions.items()}
    assert d[("a", DATES[0])][0] is Reason.DEAD_LETTER
    assert d[("b", DATES[0])] == (Reason.UPSTREAM_DEAD_LETTER, "a is dead-lettered")
    # Two levels down: the dead letter itself, not the blocked cell in between.
    assert d[("c", DATES[0])] == (
        Reason.UPSTREAM_DEAD_LETTER,
        "a on 2024-03-01 is dead-lettered (via b)",
    )
    assert d[("a", DATES[1])] == (
        Reason.UPSTREAM_DEAD_LETTER,
        "own previous cell (2024-03-01) is dead-lettered",
    )
    assert d[("c", DATES[2])] == (
        Reason.UPSTREAM_DEAD_LETTER,
        "a on 2024-03-01 is dead-lettered (via b)",
    )
    text = project.cli("plan", "--date", DATES[-1].isoformat()).output
    assert "a on 2024-03-01 is dead-lettered (via own previous cell (2024-03-04))" in text

    again = run_cli(project)
    assert again.exit_code == 1
    assert "1 dead letter: a 2024-03-01 (orchestrator dlq list)" in again.output
    assert "8 cells blocked by a failure upstream, caused by a 2024-03-01" in again.output
