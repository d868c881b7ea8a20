"""Selection, dbt style (issue 10, item 5; SQLite and PostgreSQL): ``--select`` and
``--exclude`` on run, plan, backfill and status. A selection limits what executes, never what
a cell is decided from: a selected cell whose unselected upstream must run first is not
computed on its stale input."""

from __future__ import annotations

import datetime as dt
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator.app import Orchestrator
from orchestrator.selection import SelectionError, resolve_selection
from tests.conftest import Project, price_rows, weekdays

DATES = weekdays(dt.date(2024, 3, 1), 3)

# base -> (left, right) -> top; other is alone. Product lines and categories overlap.
SOURCE = """
from orchestrator import MetaCalculation, StandardCalculation


class Base(StandardCalculation):
    name = "base"
    category = "prices"
    product_lines = ["equity"]
    root_data = ["prices"]

    def process(self, ctx):
        return {"x": ctx.root["prices"][0]["close"] + OFFSET}


class Left(StandardCalculation):
    name = "left"
    category = "signals"
    product_lines = ["equity"]
    dependencies = ["base"]

    def process(self, ctx):
        return {"x": ctx.upstream["base"]["x"] * 2}


class Right(StandardCalculation):
    name = "right"
    category = "signals"
    product_lines = ["credit"]
    dependencies = ["base"]

    def process(self, ctx):
        return {"x": ctx.upstream["base"]["x"] * 3}


class Top(MetaCalculation):
    name = "top"
    category = "risk"
    dependencies = ["left", "right"]

    def process(self, ctx):
        return {"n": len(ctx.upstream["left"]) + len(ctx.upstream["right"])}


class Other(StandardCalculation):
    name = "other"
    category = "risk"
    product_lines = ["credit"]
    root_data = ["prices"]

    def process(self, ctx):
        return {"y": ctx.root["prices"][0]["close"]}
"""
UP = {"base": set(), "left": {"base"}, "right": {"base"}, "top": {"base", "left", "right"}}
UP["other"] = set()
DOWN = {n: {m for m, ups in UP.items() if n in ups} for n in UP}
NAMES = sorted(UP)


def setup(project: Project, offset: float = 0.0) -> None:
    project.write_prices(price_rows(["AAA", "BBB"], DATES))
    project.write_calcs(SOURCE.replace("OFFSET", repr(offset)))


@pytest.fixture
def manifest(tmp_path):  # type: ignore[no-untyped-def]
    project = Project(tmp_path, f"sqlite:///{tmp_path / 'l.db'}")
    setup(project)
    orch = Orchestrator.from_config(project.config)
    try:
        yield orch.manifest
    finally:
        orch.close()


def _expected(term: str) -> set[str]:
    if term.startswith("product_line:"):
        return {"equity": {"base", "left"}, "credit": {"right", "other"}}[term.split(":")[1]]
    if term.startswith("category:"):
        cat = {"prices": {"base"}, "signals": {"left", "right"}, "risk": {"top", "other"}}
        return cat[term.split(":")[1]]
    up, down = term.startswith("+"), term.endswith("+")
    name = term.strip("+")
    return {name} | (UP[name] if up else set()) | (DOWN[name] if down else set())


TERMS = st.one_of(
    st.builds(
        lambda n, u, d: ("+" if u else "") + n + ("+" if d else ""),
        st.sampled_from(NAMES),
        st.booleans(),
        st.booleans(),
    ),
    st.sampled_from(["product_line:equity", "product_line:credit"]),
    st.sampled_from(["category:prices", "category:signals", "category:risk"]),
)


@settings(max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    select=st.lists(TERMS, max_size=4), exclude=st.lists(TERMS, max_size=2), joined=st.booleans()
)
def test_the_selection_algebra(
    manifest, select: list[str], exclude: list[str], joined: bool
) -> None:  # type: ignore[no-untyped-def]
    given_select = [" ".join(select)] if joined and select else select
    found = resolve_selection(manifest, given_select, exclude)
    if not select and not exclude:
        assert found is None
        return
    chosen = set().union(*map(_expected, select)) if select else set(NAMES)
    assert found == chosen - set().union(*map(_expected, exclude))


@pytest.mark.parametrize(
    ("term", "hint"),
    [
        ("lefft", "did you mean 'left'"),
        ("+topp+", "did you mean 'top'"),
        ("product_line:equityy", "did you mean 'equity'"),
        ("category:nope", "known: prices, risk, signals"),
    ],
)
def test_an_unknown_term_is_a_one_line_error(
    project: Project, manifest, term: str, hint: str
) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(SelectionError, match=hint):
        resolve_selection(manifest, [term])
    setup(project)
    result = project.cli("plan", "--select", term)
    assert result.exit_code == 2 and hint in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_a_selected_run_executes_only_the_selection_and_never_on_a_stale_input(
    project: Project,
) -> None:
    setup(project)
    target = DATES[-1].isoformat()
    assert project.cli("run", "--date", target).exit_code == 0
    before = project.result_hashes()
    setup(project, offset=1.0)  # base's code changes: everything downstream of it is stale

    # Selecting left alone: base must run first, so left waits and is not computed; exit 1.
    waiting = project.cli("run", "--date", target, "--select", "left")
    assert waiting.exit_code == 1, waiting.output
    assert "not computed: an upstream cell outside the selection must run first" in waiting.output
    assert ": 0 cells computed," in waiting.output
    assert project.result_hashes() == before

    # other is independent of base: selected alone it is up to date; base stays stale.
    assert project.cli("run", "--date", target, "--select", "other").exit_code == 0

    # +left: base and left run, right and top are outside the selection.
    picked = project.cli("run", "--date", target, "--select", "+left")
    assert picked.exit_code == 0, picked.output
    assert (
        ": 6 cells computed," in picked.output and "outside the range or selection" in picked.output
    )
    after = project.result_hashes()
    for day in DATES:
        assert after[("base", day)] != before[("base", day)]
        assert after[("left", day)] != before[("left", day)]
        assert after[("right", day)] == before[("right", day)]  # not run: still the old one
    plan = project.cli("plan", "--date", target, "--format", "json", "--select", "right+")
    cells = json.loads(plan.output)["cells"]
    assert {c["calculation"] for c in cells} == {"right", "top"}
    assert {c["reason"] for c in cells if c["calculation"] == "right"} == {"UPSTREAM_CHANGED"}
    status = project.cli("status", "--date", target, "--format", "json", "--exclude", "right+")
    shown = json.loads(status.output)["calculations"]
    assert {c["name"] for c in shown} == {"base", "other", "left"}
    assert status.exit_code == 0
    # The rest, then everything is up to date.
    assert (
        project.cli(
            "backfill", "--start", DATES[0].isoformat(), "--end", target, "--select", "right+"
        ).exit_code
        == 0
    )
    assert json.loads(project.cli("status", "--date", target, "--format", "json").output)["ok"]
