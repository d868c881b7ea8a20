"""A malformed row is a failure of its user on its date, with file and line (issue 8, item 3,
parsing; SQLite and PostgreSQL, the root store and the in-memory parse).

A short row or a long row (more or fewer fields than the header) is never padded, cut, or
read as "no row": that user fails that date in the cell reading it, and the error the user
sees — the stored failure marker, ``orchestrator failures``, the run's summary — names the
file and line. The other users of the date are published. A row that cannot be given to a
user (a bad date, no user field) is skipped and counted, and listed with file:line among the
run's notes. Integers parse as integers, negative and signed ones included.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.rootdata import Dataset
from orchestrator.rootstore import StoredDataset
from tests.conftest import PRICES_HEADER, Project, price_rows, scratch_project
from tests.test_propagation import SYMBOLS
from tests.test_scenarios import BASE, DATES, TARGET

BAD_DAY = DATES[3]
# "store": no history windows, the prices are streamed from the root store; "memory": a
# history window holds them in memory. Both parsers must fail the user the same way.
PARSERS = {
    "store": BASE,
    "memory": BASE.replace(
        'root_data = ["prices"]\n', 'root_data = ["prices"]\n    lookback = 2\n', 1
    ),
}


def text_lines() -> list[str]:
    rows = price_rows(SYMBOLS, DATES)
    return [",".join(PRICES_HEADER)] + [",".join(str(r[c]) for c in PRICES_HEADER) for r in rows]


def write(project: Project, lines: list[str]) -> None:
    project.data.parent.mkdir(parents=True, exist_ok=True)
    project.data.write_text("\n".join(lines) + "\n")


def bbb_line(lines: list[str]) -> int:
    """The index of BBB's row on BAD_DAY (its line number in the file is one more)."""
    return next(
        i for i, line in enumerate(lines) if line.startswith(BAD_DAY.isoformat()) and ",BBB" in line
    )


@pytest.mark.parametrize("parser", sorted(PARSERS))
@pytest.mark.parametrize(
    ("shape", "edit", "fields"),
    [
        ("short", lambda line: line.rsplit(",", 2)[0] + ",BBB", 6),  # the volume is missing
        ("long", lambda line: line + ",extra", 8),
    ],
    ids=["short", "long"],
)
def test_a_short_or_long_row_fails_its_user_with_file_and_line(
    project: Project, tmp_path: Path, parser: str, shape: str, edit, fields: int
) -> None:
    lines = text_lines()
    i = bbb_line(lines)
    lines[i] = edit(lines[i])
    assert len(lines[i].split(",")) == fields, shape
    write(project, lines)
    project.write_calcs(PARSERS[parser])
    summary = project.run(TARGET)
    where = f"prices.csv:{i + 1}: {fields} fields, the header has 7"

    assert not summary.ok and summary.exit_code == 1
    # In memory, price_extractor reads a window of 2 dates: BBB fails on the next date too.
    expected = (
        "1 user failed in 1 cell: price_extractor 2024-01-04"
        if parser == "store"
        else "2 users failed in 2 cells: price_extractor 2024-01-04, price_extractor 2024-01-05"
    )
    assert f"{expected} (orchestrator failures)" in summary.lines()
    assert any("1 user-date(s) with malformed rows" in note for note in summary.notes)
    orch = project.orchestrator()
    kind = Dataset if parser == "memory" else StoredDataset
    assert isinstance(orch.dataset("prices"), kind)
    extracted = orch.load_result("price_extractor", BAD_DAY)
    failures = orch.ledger.user_failures("price_extractor", BAD_DAY)
    orch.close()
    # The stored result of BBB is a failure naming the file and line; nobody else failed.
    marker = extracted["BBB"]["__failed__"]
    assert marker["error"] == f"malformed root data: {where}"
    assert [(f.user, f.kind) for f in failures] == [("BBB", "own")]
    assert where in failures[0].error
    assert all("__failed__" not in extracted[s] for s in SYMBOLS if s != "BBB")
    shown = project.cli("failures")
    assert where in shown.output, shown.output

    lines[i] = text_lines()[i]  # the fix heals to a from-scratch build
    write(project, lines)
    assert project.run(TARGET).ok
    scratch = scratch_project(tmp_path)
    write(scratch, lines)
    scratch.write_calcs(PARSERS[parser])
    assert scratch.run(TARGET).ok
    assert project.result_hashes() == scratch.result_hashes()


def test_rows_without_a_readable_date_or_user_are_listed_in_the_notes(
    project: Project,
) -> None:
    lines = text_lines()
    lines.insert(5, "2024-13-01,1,2,0.5,1.5,10,BBB")  # line 6: no such date
    lines.insert(8, "2024-01-03")  # line 9: one field, no user
    write(project, lines)
    project.write_calcs(BASE)
    summary = project.run(TARGET)
    assert summary.ok  # no user to fail: skipped, counted and reported
    assert (
        "prices: 2 rows skipped, no user or date can be read from them: "
        "prices.csv:6: bad date '2024-13-01'; "
        "prices.csv:9: 1 field, the header has 7, and no single known user and date "
        "can be read from it" in summary.notes
    )
    orch = project.orchestrator()
    assert orch.dataset("prices").malformed == 2
    orch.close()


INT_CALC = """
from orchestrator import StandardCalculation


class VolumeType(StandardCalculation):
    name = "volume_type"
    category = "prices"
    root_data = ["prices"]
    lookback = LOOKBACK

    def process(self, ctx):
        row = ctx.root["prices"][0]
        return {"type": type(row["volume"]).__name__, "volume": row["volume"]}
"""


@pytest.mark.parametrize("lookback", [1, 2], ids=["store", "memory"])
def test_negative_and_signed_integers_are_ints(project: Project, lookback: int) -> None:
    rows = price_rows(SYMBOLS[:3], DATES[:2])
    rows[0]["volume"] = -1
    rows[1]["volume"] = "+3"
    project.write_prices(rows)
    project.write_calcs(INT_CALC.replace("LOOKBACK", str(lookback)))
    assert project.run(TARGET).ok
    orch = project.orchestrator()
    result = orch.load_result("volume_type", DATES[0])
    orch.close()
    assert {r["type"] for r in result.values()} == {"int"}
    assert [result[s]["volume"] for s in SYMBOLS[:3]] == [-1, 1000, 1000]
    assert repr(result[SYMBOLS[0]]["volume"]) == "-1"
    orch = project.orchestrator()
    assert orch.load_result("volume_type", DATES[1])[SYMBOLS[0]] == {"type": "int", "volume": 3}
    orch.close()
