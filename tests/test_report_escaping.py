"""Reports escape everything that comes from users and data (issue 8, item 12; SQLite and
PostgreSQL): an epoch reason, an error message and a user id holding HTML reach the HTML
plan escaped, and the Markdown plan with no tag a viewer would render.

The HTML template is ``plan.html.j2``: ``select_autoescape(["html"])`` does not match that
name, so before the fix nothing in the page was escaped.
"""

from __future__ import annotations

import datetime as dt

from orchestrator.reporting import _env
from tests.conftest import Project, price_rows, weekdays

DATES = weekdays(dt.date(2024, 3, 1), 3)
REASON = "<img src=x onerror=alert(1)>"
SCRIPT = "<script>alert('error')</script>"
USER = '<svg onload="alert(2)">'  # a user id, straight from the data

SOURCE = f"""
from orchestrator import StandardCalculation


class Score(StandardCalculation):
    name = "score"
    category = "risk"
    root_data = ["prices"]
    max_failure_rate = 1.0  # published without the failed user: retried (RETRY, with its error)

    def process(self, ctx):
        if ctx.user == {USER!r}:
            raise RuntimeError({SCRIPT!r})
        return {{"score": ctx.root["prices"][0]["close"] * 2}}


class Rank(StandardCalculation):
    name = "rank"
    category = "risk"
    dependencies = ["score"]

    def process(self, ctx):
        return {{"high": ctx.upstream["score"]["score"] > 100}}
"""


def _setup(project: Project) -> None:
    project.write_prices(price_rows(["AAA", USER, "ZZZ"], DATES))
    project.write_calcs(SOURCE)
    run = project.cli("run", "--date", DATES[-1].isoformat())
    assert run.exit_code == 1, run.output  # a failed user: not clean
    bump = project.cli("epoch", "bump", "--calc", "rank", "--reason", REASON)
    assert bump.exit_code == 0, bump.output


def test_html_plan_escapes_reasons_errors_and_user_ids(project: Project) -> None:
    _setup(project)
    result = project.cli("plan", "--date", DATES[-1].isoformat(), "--format", "html")
    assert result.exit_code == 0, result.output
    page = result.output
    # What is planned really carries the hostile text (so the test can fail) ...
    assert "EPOCH_CHANGED" in page and "RETRY" in page
    assert "&lt;img src=x onerror=alert(1)&gt;" in page
    assert "&lt;script&gt;alert(&#39;error&#39;)&lt;/script&gt;" in page
    assert "&lt;svg onload=&#34;alert(2)&#34;&gt;" in page
    # ... and none of it as markup (the report draws its own graph as an <svg>, without onload).
    for raw in ("<img", "<script", "<svg onload"):
        assert raw not in page


def test_markdown_plan_renders_no_tag(project: Project) -> None:
    _setup(project)
    result = project.cli("plan", "--date", DATES[-1].isoformat(), "--format", "markdown")
    assert result.exit_code == 0, result.output
    text = result.output
    assert "&lt;img src=x onerror=alert(1)>" in text
    for raw in ("<img", "<script", "<svg"):
        assert raw not in text


def test_text_plan_shows_the_reason_verbatim(project: Project) -> None:
    """A terminal shows text as it is: no entities there."""
    _setup(project)
    result = project.cli("plan", "--date", DATES[-1].isoformat())
    assert result.exit_code == 0, result.output
    assert REASON in result.output


def test_every_html_template_is_autoescaped() -> None:
    names = _env.list_templates()
    assert "plan.html.j2" in names
    for name in names:
        template = _env.get_template(name)
        escaped = "txt" not in name and "md" not in name
        assert template.environment.autoescape(name) is escaped, name  # type: ignore[operator]
