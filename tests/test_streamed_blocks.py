"""Columnar blocks over a root store, a user range at a time, give the in-memory engine's cells.

A standard calculation in its columnar form over a dataset read from its root store computes
each block one user range (a column part of the store) at a time (``execution/ranged.py``):
root data from the store's column parts, upstream and previous results from the shards of the
range's users, validation statistics merged over the ranges. The same project run with the
dataset held in memory (one block over every user) must publish the same result hashes and
record the same outcome per cell (status, failed users, first line of the error), whatever
fails where: malformed rows, gaps, a block whose ``compute`` raises, a NaN that fails
validation, failures inherited through a window and the previous date; with parts of 1 to 4
users, nightly runs (blocks of one date) or one catch-up (one block). Downstream, a
per-user calculation (the walk) and a meta calculation read the ranged results from the
ledger. SQLite and PostgreSQL.
"""

from __future__ import annotations

import datetime as dt
import uuid
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from orchestrator import rootstore
from orchestrator.app import Orchestrator
from tests.conftest import Project, price_rows, weekdays

DATES = weekdays(dt.date(2024, 5, 6), 6)
SYMBOLS = [f"S{i}" for i in range(7)]

SOURCE = """
import numpy as np

from orchestrator import MetaCalculation, StandardCalculation

DATES = {dates!r}
RAISES = {raises!r}  # the day index on which ``spread`` raises (None: never)
INF = {nan!r}  # (symbol, day index) whose ``ratio`` is infinite: fails validation


def _today(frame, column):
    return frame.root("prices", column)[frame.rows("prices")]


class Close(StandardCalculation):
    name = "close"
    root_data = ["prices"]
    max_failure_rate = 0.9

    def process(self, ctx):
        return {{"close": ctx.root["prices"][-1]["close"]}}

    def compute(self, frame):
        return {{"close": _today(frame, "close")}}


class Spread(StandardCalculation):
    name = "spread"
    root_data = ["prices"]
    dependencies = {{"close": 2}}
    max_failure_rate = 0.9

    def process(self, ctx):
        if RAISES is not None and ctx.date.isoformat() == DATES[RAISES]:
            raise RuntimeError("spread is broken today")
        row = ctx.root["prices"][-1]
        window = [r["close"] for r in ctx.upstream["close"] if r is not None]
        return {{"spread": row["high"] - row["low"], "mean": sum(window) / len(window)}}

    def compute(self, frame):
        if RAISES is not None and DATES[RAISES] in [d.isoformat() for d in frame.dates]:
            raise RuntimeError("spread is broken today")
        closes = frame.upstream("close", "close")
        here = frame.upstream_present("close")
        rows = frame.upstream_rows("close")
        sums = np.zeros(frame.present.shape)
        counts = np.zeros(frame.present.shape)
        for back in (1, 0):
            at = np.maximum(rows - back, 0)
            use = here[at] & (rows - back >= 0)[:, None]
            sums = sums + np.where(use, np.nan_to_num(closes[at]), 0.0)
            counts = counts + use
        return {{
            "spread": _today(frame, "high") - _today(frame, "low"),
            "mean": sums / np.maximum(counts, 1),
        }}


class Ratio(StandardCalculation):
    name = "ratio"
    root_data = ["prices"]
    dependencies = ["close"]
    max_failure_rate = 0.9

    def process(self, ctx):
        day = DATES.index(ctx.date.isoformat())
        if (ctx.user, day) in INF:
            return {{"ratio": float("inf")}}
        return {{"ratio": ctx.root["prices"][-1]["volume"] / ctx.upstream["close"]["close"]}}

    def compute(self, frame):
        ratio = _today(frame, "volume") / frame.upstream("close", "close")
        for i, day in enumerate(frame.dates):
            for k, user in enumerate(frame.users):
                if (user, DATES.index(day.isoformat())) in INF:
                    ratio[i, k] = np.inf
        return {{"ratio": ratio}}


class Count(StandardCalculation):
    name = "count"
    root_data = ["prices"]
    historical = True
    max_failure_rate = 0.9

    def process(self, ctx):
        return {{"n": (ctx.previous or {{"n": 0}})["n"] + 1}}

    def compute(self, frame):
        last = np.nan_to_num(frame.previous("n"))
        out = np.zeros(frame.present.shape)
        for i in range(len(frame.dates)):
            out[i] = last + 1
            last = np.where(frame.present[i], out[i], 0.0)
        return {{"n": out.astype(np.int64)}}


class Walked(StandardCalculation):
    name = "walked"
    dependencies = ["spread", "count"]
    max_failure_rate = 0.9

    def process(self, ctx):
        return {{"score": ctx.upstream["spread"]["spread"] * ctx.upstream["count"]["n"]}}


class Board(MetaCalculation):
    name = "board"
    dependencies = ["close"]

    def process(self, ctx):
        return {{"users": len(ctx.upstream["close"] or {{}})}}
"""
CALCS = ["close", "spread", "ratio", "count", "walked", "board"]


def _rows(bad: set[tuple[int, int]], gaps: set[tuple[int, int]]) -> list[dict[str, Any]]:
    """Price rows; ``bad`` (symbol index, day index) get a non-number close (malformed),
    ``gaps`` have no row."""
    skip = {(SYMBOLS[u], DATES[d]) for u, d in gaps}
    rows = price_rows(SYMBOLS, DATES, skip=skip)
    for row in rows:
        key = (SYMBOLS.index(row["Name"]), DATES.index(dt.date.fromisoformat(row["date"])))
        if key in bad:
            row["close"] = "n/a"
    return rows


def _twins(
    base: Path,
    db_url: str | None,
    source: str,
    rows: list[dict[str, Any]],
    part_users: int,
    nightly: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> tuple[dict[Any, Any], dict[Any, Any]]:
    """Run the same project with its prices held in memory (into ``db_url``, else a fresh
    SQLite file) and from its root store in parts of ``part_users`` users (a fresh SQLite
    file); return both outcomes."""
    out = []
    for memory in (True, False):
        root = base / f"{uuid.uuid4().hex[:8]}-{memory}"
        root.mkdir(parents=True)
        url = (db_url if memory else None) or f"sqlite:///{root / 'ledger.db'}"
        project = Project(root, url)
        project.write_prices(rows)
        project.extra_config = "max_attempts = 1\nflush_users = 2\n"
        project.write_calcs(source)
        with monkeypatch.context() as m:
            m.setattr(rootstore, "PART_USERS", part_users)
            # No calculation reads a history window: the dataset streams from its store
            # unless held in memory, which only this switch asks for here.
            m.setattr(Orchestrator, "holds_in_memory", lambda self, name, held=memory: held)
            for day in DATES if nightly else DATES[-1:]:
                project.run(day)
            project.run(DATES[-1])  # retries and reconciliation, both engines again
        out.append(project.outcomes())
    return out[0], out[1]


def _source(raises: int | None, nan: set[tuple[str, int]]) -> str:
    return SOURCE.format(dates=[d.isoformat() for d in DATES], raises=raises, nan=sorted(nan))


def test_failures_of_every_kind_give_the_in_memory_cells(
    tmp_path: Path, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows = _rows(bad={(1, 2), (4, 0), (6, 3)}, gaps={(0, 1), (3, 2), (6, 4)})
    source = _source(raises=None, nan={("S2", 1), ("S5", 1)})
    memory, ranged = _twins(tmp_path, db_url, source, rows, 2, False, monkeypatch)
    assert memory == ranged
    assert len(memory) == len(CALCS) * len(DATES)
    assert memory[("ratio", DATES[1])][3] == "VALIDATION: ratio: 2 NaN/Inf value(s)"
    assert memory[("close", DATES[2])][2:] == (
        1,
        (
            "1 of 6 users failed; first: S1: malformed"
            " root data: prices.csv:9: close='n/a' is not a number"
        ),
    )
    assert memory[("count", DATES[3])][2] == 3  # S1's failure carried, S4's, S6's own
    assert memory[("walked", DATES[3])][2] >= 1  # inherited from spread and count
    assert memory[("spread", DATES[5])][0] == "COMPLETED"


def test_nightly_runs_read_previous_states_by_range(
    tmp_path: Path, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows = _rows(bad={(2, 1)}, gaps={(5, 2), (5, 3)})
    memory, ranged = _twins(tmp_path, db_url, _source(3, set()), rows, 3, True, monkeypatch)
    assert memory == ranged
    assert memory[("spread", DATES[3])] == (
        "DEAD_LETTER",
        None,
        0,
        "Traceback (most recent call last):",
    )
    assert memory[("spread", DATES[4])][0] == "COMPLETED"
    # a dead letter's state stops its historical successors, in both engines
    assert memory[("count", DATES[1])][:3] == ("DEAD_LETTER", memory[("count", DATES[1])][1], 1)
    assert ("count", DATES[2]) not in memory and memory[("close", DATES[5])][0] == "COMPLETED"


cells = st.sets(st.tuples(st.integers(0, len(SYMBOLS) - 1), st.integers(0, len(DATES) - 1)))


@settings(  # SQLite only: every example needs two fresh ledgers
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    bad=cells.filter(lambda s: len(s) <= 3),
    gaps=cells.filter(lambda s: len(s) <= 4),
    raises=st.one_of(st.none(), st.integers(0, len(DATES) - 1)),
    nan=st.sets(st.tuples(st.sampled_from(SYMBOLS), st.integers(0, len(DATES) - 1)), max_size=2),
    part_users=st.integers(1, 4),
    nightly=st.booleans(),
)
# A range holding one user, failed: its slice of ``close`` has no ``close`` column, which the
# whole result has (found by this property; ``TableCache.get_range`` fills such fields).
@example(bad={(0, 0)}, gaps=set(), raises=None, nan=set(), part_users=1, nightly=True)
def test_any_ranges_give_the_in_memory_cells(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    bad: set[tuple[int, int]],
    gaps: set[tuple[int, int]],
    raises: int | None,
    nan: set[tuple[str, int]],
    part_users: int,
    nightly: bool,
) -> None:
    rows = _rows(bad, gaps - bad)
    source = _source(raises, nan)
    memory, ranged = _twins(tmp_path, None, source, rows, part_users, nightly, monkeypatch)
    assert memory == ranged
