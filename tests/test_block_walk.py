"""The per-user form gives the same cells in a block as in a walk (SQLite and PostgreSQL).

A per-user calculation over root data held in memory runs inside the block engine
(``blocks._run_users``: a loop over the users of each block date); over a root store its
users are streamed (``Executor._walk``). Both must publish the same result hashes and record
the same outcome per cell — status, failed users, the circuit breaker's verdict — whatever
fails where: exceptions in user code, malformed root rows (on the date and in a history
window), failures inherited from upstream, from a window and from the previous date.
"""

from __future__ import annotations

import datetime as dt
import uuid
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import Project, price_rows, weekdays

DATES = weekdays(dt.date(2024, 3, 4), 7)
SYMBOLS = [f"U{i}" for i in range(6)]

# ``FAILS`` (user, day index) pairs raise in ``extract``; ``FLAKY`` in the historical ``trend``.
SOURCE = """
from orchestrator import MetaCalculation, StandardCalculation

FAILS = set({fails!r})
FLAKY = set({flaky!r})
DATES = {dates!r}


class Extract(StandardCalculation):
    name = "extract"
    root_data = ["prices"]
    breaker_min_users = {breaker}
    max_failure_rate = {rate}

    def process(self, ctx):
        if (ctx.user, DATES.index(ctx.date.isoformat())) in FAILS:
            raise RuntimeError(f"broken {{ctx.user}}")
        rows = ctx.root["prices"]
        return {{"close": rows[-1]["close"], "n": len(rows), "tag": ctx.user.lower()}}


class Momentum(StandardCalculation):
    name = "momentum"
    max_failure_rate = 0.9
    root_data = ["prices"]
    lookback = 3  # a history window: the dataset is held in memory (unless root_memory_mb = 0)

    def process(self, ctx):
        closes = [row["close"] for row in ctx.history["prices"]]
        if len(closes) < 2:
            return None  # no result: the user is still counted as processed
        return {{"change": closes[-1] - closes[0], "days": len(closes)}}


class Trend(StandardCalculation):
    name = "trend"
    max_failure_rate = 0.9
    dependencies = ["extract"]
    historical = True
    nullable = ("last",)

    def process(self, ctx):
        if (ctx.user, DATES.index(ctx.date.isoformat())) in FLAKY:
            raise ValueError("flaky state")
        close = ctx.upstream["extract"]["close"]
        prev = ctx.previous or {{"count": 0, "last": None}}
        return {{"count": prev["count"] + 1, "last": prev["last"], "up": close > (prev["last"] or 0)}}


class Smooth(StandardCalculation):
    name = "smooth"
    max_failure_rate = 0.9
    dependencies = {{"extract": 3, "trend": 1, "momentum": 1}}
    nullable = ("momentum",)

    def process(self, ctx):
        window = [r["close"] for r in ctx.upstream["extract"] if r is not None]
        moved = ctx.upstream["momentum"]
        return {{
            "mean": sum(window) / len(window),
            "count": ctx.upstream["trend"]["count"],
            "momentum": moved and moved["change"],
        }}


class Board(MetaCalculation):
    name = "board"
    dependencies = ["momentum"]

    def process(self, ctx):
        return {{"users": len(ctx.upstream["momentum"] or {{}})}}
"""
CALCS = ["extract", "momentum", "trend", "smooth", "board"]


def _rows(bad: set[tuple[int, int]], gaps: set[tuple[int, int]]) -> list[dict[str, Any]]:
    """Price rows; ``bad`` (user index, day index) get a non-number close (malformed),
    ``gaps`` have no row; the first user has two rows a day (the per-user form sees both)."""
    skip = {(SYMBOLS[u], DATES[d]) for u, d in gaps}
    rows = price_rows(SYMBOLS, DATES, skip=skip)
    for row in rows:
        key = (SYMBOLS.index(row["Name"]), DATES.index(dt.date.fromisoformat(row["date"])))
        if key in bad:
            row["close"] = "n/a"
    rows += [dict(r, close=r["close"] if r["close"] == "n/a" else 1.0) for r in rows[:3]]
    return rows


def _twins(
    base: Path,
    db_url: str | None,
    source: str,
    rows: list[dict[str, Any]],
    nightly: bool = False,
) -> tuple[dict[Any, Any], dict[Any, Any]]:
    """Run the same project with its prices in memory (blocks, into ``db_url``, else a fresh
    SQLite file) and from the root store (the walk, into a fresh SQLite file); return both
    outcomes. ``nightly``: one run per date, each block one date (else one run of all)."""
    out = []
    for memory in (64, 0):
        root = base / f"{uuid.uuid4().hex[:8]}-{memory}"
        root.mkdir(parents=True)
        url = (db_url if memory else None) or f"sqlite:///{root / 'ledger.db'}"
        project = Project(root, url)
        project.write_prices(rows)
        project.extra_config = f"root_memory_mb = {memory}\nmax_attempts = 1\n"
        project.write_calcs(source)
        orch = project.orchestrator()
        assert orch.holds_in_memory("prices") is bool(memory)
        orch.close()
        for day in DATES if nightly else DATES[-1:]:
            project.run(day)
        project.run(DATES[-1])  # reconciliation and retries: both engines again
        out.append(project.outcomes())
    return out[0], out[1]


def _source(
    fails: set[tuple[str, int]], flaky: set[tuple[str, int]], breaker: int, rate: float = 0.9
) -> str:
    """The calculations, ``extract`` failing at ``fails`` with its circuit breaker armed
    after ``breaker`` users at a failure rate of ``rate``."""
    return SOURCE.format(
        fails=sorted(fails),
        flaky=sorted(flaky),
        dates=[d.isoformat() for d in DATES],
        breaker=breaker,
        rate=rate,
    )


def test_failures_of_every_kind_give_the_walks_cells(tmp_path: Path, db_url: str) -> None:
    fails = {("U1", 2), ("U2", 2), ("U4", 5)}
    flaky = {("U3", 3)}
    rows = _rows(bad={(0, 4), (5, 1)}, gaps={(2, 3), (4, 0)})
    blocks, walk = _twins(tmp_path, db_url, _source(fails, flaky, breaker=100), rows)
    assert blocks == walk
    assert len(blocks) == len(CALCS) * len(DATES)
    failed = {key: users for key, (_, _, users, _) in blocks.items() if users}
    # own failures (exceptions, malformed rows) and inherited ones (window, previous date)
    assert failed[("extract", DATES[2])] == 2 and failed[("momentum", DATES[4])] >= 1
    assert ("trend", DATES[3]) in failed and ("smooth", DATES[4]) in failed


def test_a_malformed_row_before_the_block_of_a_user_absent_from_it(
    tmp_path: Path, db_url: str
) -> None:
    # Nightly runs: U5 (the last user) and U2 have a malformed row, then no rows for days.
    # Their rows sit in the history window of later blocks that do not hold them; the
    # window's rule fails only a user with rows on the date, never a neighbour.
    gaps = {(5, d) for d in range(1, 5)} | {(2, d) for d in range(3, 6)}
    rows = _rows(bad={(5, 0), (2, 2)}, gaps=gaps)
    blocks, walk = _twins(tmp_path, db_url, _source(set(), set(), 100), rows, nightly=True)
    assert blocks == walk
    assert blocks[("momentum", DATES[3])][2] == 0  # nobody on day 3 has U2's bad row


def test_the_circuit_breaker_trips_on_the_same_dates(tmp_path: Path, db_url: str) -> None:
    # 3 of the first 4 users fail on day 1: past 2 users and 40 %, the cell is aborted.
    fails = {("U0", 1), ("U1", 1), ("U3", 1), ("U5", 4)}
    source = _source(fails, set(), breaker=2, rate=0.4)
    blocks, walk = _twins(tmp_path, db_url, source, _rows(set(), set()))
    assert blocks == walk
    assert blocks[("extract", DATES[1])][0] == "DEAD_LETTER"  # max_attempts = 1
    assert "circuit breaker" in blocks[("extract", DATES[1])][3]


pairs = st.sets(st.tuples(st.sampled_from(SYMBOLS), st.integers(0, len(DATES) - 1)), max_size=6)
cells = st.sets(st.tuples(st.integers(0, len(SYMBOLS) - 1), st.integers(0, len(DATES) - 1)))


@settings(  # SQLite only: every example needs two fresh ledgers
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    fails=pairs,
    flaky=pairs,
    bad=cells.filter(lambda s: len(s) <= 3),
    gaps=cells.filter(lambda s: len(s) <= 4),
    breaker=st.sampled_from([2, 100]),
    rate=st.sampled_from([0.1, 0.9]),
    nightly=st.booleans(),
)
def test_any_failures_give_the_walks_cells(
    tmp_path: Path,
    fails: set[tuple[str, int]],
    flaky: set[tuple[str, int]],
    bad: set[tuple[int, int]],
    gaps: set[tuple[int, int]],
    breaker: int,
    rate: float,
    nightly: bool,
) -> None:
    source = _source(fails, flaky, breaker, rate)
    blocks, walk = _twins(tmp_path, None, source, _rows(bad, gaps - bad), nightly)
    assert blocks == walk
