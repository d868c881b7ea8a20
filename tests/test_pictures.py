"""Pictures of a plan (issue 10, item 6): the calculation × date grid with folded ranges and the
dependency graph in the HTML report, ``graph --format dot|mermaid``, and the report rendered in
a real headless browser (Debian's ``chromium``; skipped where it is absent), its screenshot kept
in ``tests/artifacts/``."""

from __future__ import annotations

import datetime as dt
import itertools
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from orchestrator.reporting.pictures import fold
from tests.conftest import Project, price_rows, weekdays

DATES = weekdays(dt.date(2024, 3, 1), 12)
ARTIFACTS = Path(__file__).parent / "artifacts"

SOURCE = """
from orchestrator import MetaCalculation, StandardCalculation


class Returns(StandardCalculation):
    name = "returns"
    category = "prices"
    root_data = ["prices"]

    def process(self, ctx):
        return {"r": ctx.root["prices"][0]["close"] / 100}


class Vol(StandardCalculation):
    name = "vol"
    category = "risk"
    dependencies = {"returns": 3}

    def process(self, ctx):
        return {"v": len(ctx.upstream["returns"])}


class Board(MetaCalculation):
    name = "board"
    category = "risk"
    dependencies = ["vol"]

    def process(self, ctx):
        return {"n": len(ctx.upstream["vol"])}
"""

CELL = st.one_of(
    st.none(),
    st.tuples(
        st.sampled_from(["RUNNABLE", "SKIPPED", "BLOCKED"]),
        st.sampled_from(["NEW", "UP_TO_DATE", "WAITING_ON_UPSTREAM"]),
        st.sampled_from(["", "a detail"]),
    ),
)


@given(
    st.integers(1, 3).flatmap(
        lambda r: st.lists(st.lists(CELL, min_size=r, max_size=r), min_size=1, max_size=30)
    )
)
def test_folding_keeps_every_date_and_adjacent_columns_differ(per_date) -> None:  # type: ignore[no-untyped-def]
    dates = tuple(dt.date(2024, 1, 1) + dt.timedelta(days=i) for i in range(len(per_date)))
    rows = [list(r) for r in zip(*per_date, strict=True)]
    columns = fold(dates, rows)
    key = lambda cells: tuple(None if c is None else c[:2] for c in cells)
    unfolded = [key(c.cells) for c in columns for _ in range(c.dates)]
    assert unfolded == [key(cells) for cells in per_date]
    assert sum(c.dates for c in columns) == len(dates)
    assert all(key(a.cells) != key(b.cells) for a, b in itertools.pairwise(columns))
    assert [c.first for c in columns] == [
        dates[sum(x.dates for x in columns[:i])] for i in range(len(columns))
    ]


def setup(project: Project) -> None:
    project.write_prices(price_rows(["AAA", "BBB"], DATES))
    project.write_calcs(SOURCE)


def report(project: Project) -> str:
    out = project.root / "plan.html"
    result = project.cli(
        "plan", "--date", DATES[-1].isoformat(), "--format", "html", "-o", str(out)
    )
    assert result.exit_code == 0, result.output
    return out.read_text()


def test_the_report_draws_the_graph_and_a_folded_grid_escaped(project: Project) -> None:
    setup(project)
    project.run(DATES[5])  # the first 6 dates done: two folded columns, up to date and new
    assert project.cli("epoch", "bump", "--reason", "<script>alert(1)</script>").exit_code == 0
    html = report(project)
    assert html.count('<g class="node') == 3 and "window 3" in html
    assert "<script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    # the first 6 dates re-run for the epoch, the next 6 are new: two folded columns
    assert f"{DATES[0]} … {DATES[5]} (6 dates)" in html
    assert f"{DATES[6]} … {DATES[-1]} (6 dates)" in html
    project.run(DATES[-1])
    project.run(DATES[-1])
    folded = report(project)
    assert f"{DATES[0]} … {DATES[-1]} (12 dates)" in folded
    assert folded.count('<td class="cell SKIPPED"') == 3  # one folded column, three rows


def test_graph_as_dot_and_mermaid(project: Project) -> None:
    setup(project)
    dot = project.cli("graph", "--format", "dot")
    assert dot.exit_code == 0 and dot.output.startswith("digraph orchestrator {")
    assert '"returns" -> "vol" [label="window 3"];' in dot.output
    assert '"vol" -> "board";' in dot.output
    mermaid = project.cli("graph", "--format", "mermaid")
    assert mermaid.output.splitlines()[0] == "flowchart LR"
    assert "-->|window 3|" in mermaid.output and '["board"]' in mermaid.output


def _browser() -> str | None:
    return next(
        (p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None
    )


def _png_pixels(data: bytes) -> tuple[int, int, bytes]:
    """Width, height and the decompressed scanlines of a PNG (stdlib only)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, width, height = 8, b"", 0, 0
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            width, height = struct.unpack(">II", body[:8])
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    return width, height, zlib.decompress(idat)


@pytest.mark.skipif(_browser() is None, reason="no chromium here (apt-get install chromium)")
def test_a_real_browser_renders_the_report(project: Project) -> None:
    setup(project)
    project.run(DATES[5])
    html = report(project)
    page = project.root / "plan.html"
    browser = _browser()
    assert browser is not None
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--window-size=1400,900"]
    dom = subprocess.run(
        [browser, *flags, "--dump-dom", page.as_uri()],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert dom.returncode == 0, dom.stderr[-500:]
    assert "<svg" in dom.stdout and dom.stdout.count('class="cell') >= 3 * 2
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "plan.png"
    shot.unlink(missing_ok=True)
    done = subprocess.run(
        [browser, *flags, f"--screenshot={shot}", page.as_uri()],
        check=False,
        capture_output=True,
        timeout=120,
    )
    assert done.returncode == 0 and shot.is_file(), done.stderr[-500:]
    width, height, pixels = _png_pixels(shot.read_bytes())
    assert (width, height) == (1400, 900)
    assert len(set(pixels[: width * 4 * 200])) > 10  # the top of the page is not one colour
    assert "Dependency graph" in html
    print(f"screenshot: {shot}")
