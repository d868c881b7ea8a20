"""Blocks over worker processes (``execution/blockpool.py``) publish what one process publishes.

With ``workers = 2`` a standard block's users are split into ranges, each computed by a forked
worker through the block contract (``run_block``), and the outcomes joined in the parent. For
both forms (per-user ``process`` in blocks; columnar ``compute``) the ledger must be a serial
run's cell by cell: result hash, status, users failed, the error, the failed users stored —
including the circuit breaker, which a per-user date trips at the same user as a serial run
whatever range that user is in, and the stored failed users, capped per kind in user order.
Splitting is forced down to one user per range with ``MIN_SPLIT_USERS``.
"""

from __future__ import annotations

import datetime as dt
import itertools
import uuid
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator.columns import Table
from orchestrator.execution import blockpool
from orchestrator.execution.blocks import DateOutcome
from tests.conftest import Project
from tests.test_block_walk import DATES, SYMBOLS, _rows, _source
from tests.test_blocks import SOURCE as COLUMNAR_SOURCE
from tests.test_blocks import TARGET as COLUMNAR_TARGET
from tests.test_blocks import ledger_view, rows, run_view

SPLIT: list[int] = []  # blocks the pool split, per test (its own counter, not a result)


@pytest.fixture(autouse=True)
def split_every_block(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(blockpool, "MIN_SPLIT_USERS", 1)
    run = blockpool.BlockPool.run

    def counted(self: blockpool.BlockPool, *args: Any) -> Any:
        SPLIT.append(1)
        return run(self, *args)

    monkeypatch.setattr(blockpool.BlockPool, "run", counted)


def _pair(
    base: Path,
    db_url: str | None,
    source: str,
    prices: list[dict[str, Any]],
    target: dt.date,
    nightly: list[dt.date] | None = None,
    columnar: bool = False,
) -> tuple[Any, Any]:
    """The same in-memory project run with 1 and with 2 workers: (ledger, run summaries)
    of each."""
    out = []
    for workers in (1, 2):
        root = base / f"{uuid.uuid4().hex[:8]}-w{workers}"
        root.mkdir(parents=True)
        url = (db_url if workers == 2 else None) or f"sqlite:///{root / 'ledger.db'}"
        project = Project(root, url)
        project.write_prices(prices)
        project.extra_config = f"max_attempts = 1\ncolumnar = {'true' if columnar else 'false'}\n"
        project.write_calcs(source)
        SPLIT.clear()
        summaries = [run_view(project.run(day, workers=workers)) for day in nightly or [target]]
        # the two workers computed the per-user blocks; columnar ones stay in the parent
        assert bool(SPLIT) is (workers == 2 and not columnar)
        summaries.append(run_view(project.run(target, workers=workers)))
        out.append((ledger_view(project), summaries))
    return out[0], out[1]


def test_per_user_blocks_over_two_workers_give_the_serial_ledger(
    tmp_path: Path, db_url: str
) -> None:
    fails = {("U1", 2), ("U2", 2), ("U4", 5)}
    source = _source(fails, {("U3", 3)}, breaker=100)
    prices = _rows(bad={(0, 4), (5, 1)}, gaps={(2, 3), (4, 0)})
    serial, parallel = _pair(tmp_path, db_url, source, prices, DATES[-1])
    assert parallel == serial
    assert any(cell["users_failed"] for cell in serial[0].values())  # users failed somewhere


def test_the_circuit_breaker_trips_at_the_serial_user_across_ranges(
    tmp_path: Path, db_url: str
) -> None:
    # Day 1: U0 (first range: U0-U2) and U3 (second range: U3-U5) fail; past 2 users and
    # 40 % the breaker trips at U3 (2 of 4) — its worker alone saw 1 of 1, never past 2.
    fails = {("U0", 1), ("U3", 1), ("U5", 4)}
    source = _source(fails, set(), breaker=2, rate=0.4)
    serial, parallel = _pair(tmp_path, db_url, source, _rows(set(), set()), DATES[-1])
    assert parallel == serial
    cell = serial[0][("extract", DATES[1])]
    assert cell["status"] == "DEAD_LETTER" and "circuit breaker: 2 of 4" in cell["error"]


def test_columnar_blocks_with_two_workers_give_the_serial_ledger(
    tmp_path: Path, db_url: str
) -> None:
    from tests.test_blocks import BAD_DAY

    prices = rows(bad={("BBB", BAD_DAY): "1.2.3"})
    serial, parallel = _pair(
        tmp_path, db_url, COLUMNAR_SOURCE, prices, COLUMNAR_TARGET, columnar=True
    )
    assert parallel == serial


@settings(  # SQLite only: every example needs two fresh ledgers
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    fails=st.sets(st.tuples(st.sampled_from(SYMBOLS), st.integers(0, len(DATES) - 1)), max_size=8),
    bad=st.sets(
        st.tuples(st.integers(0, len(SYMBOLS) - 1), st.integers(0, len(DATES) - 1)), max_size=3
    ),
    breaker=st.sampled_from([1, 2, 4, 100]),
    rate=st.sampled_from([0.1, 0.3, 0.6]),
    nightly=st.booleans(),
)
def test_any_failures_over_two_workers_give_the_serial_ledger(
    tmp_path: Path,
    fails: set[tuple[str, int]],
    bad: set[tuple[int, int]],
    breaker: int,
    rate: float,
    nightly: bool,
) -> None:
    source = _source(fails, set(), breaker, rate)
    serial, parallel = _pair(
        tmp_path, None, source, _rows(bad, set()), DATES[-1], DATES if nightly else None
    )
    assert parallel == serial


# --- merging one date's ranges -------------------------------------------------------------


def _part(users: list[str], kinds: list[str | None], limit: int) -> DateOutcome:
    """A range's outcome of one date as ``_run_users`` gives it with ``breaker=False``:
    ``kinds[i]`` is "own", "upstream" or None (a result) for ``users[i]``."""
    failed, events = [], []
    own = inherited = 0
    for i, (user, kind) in enumerate(zip(users, kinds, strict=True)):
        if kind == "own":
            own += 1
            if own <= limit:
                failed.append({"user": user, "kind": "own", "error": "x"})
            events.append((i + 1, own, inherited, len(failed)))
        elif kind == "upstream":
            inherited += 1
            if inherited <= limit:
                failed.append({"user": user, "kind": "upstream", "error": "y"})
    return DateOutcome(Table(list(users), {}), len(users), own, inherited, failed, None, events)


def _serial(kinds: list[str | None], limit: int, min_users: int, rate: float) -> DateOutcome:
    """What one process gives for the whole date: the walk's breaker rule, restated."""
    users = [f"u{i:03d}" for i in range(len(kinds))]
    failed: list[dict[str, str]] = []
    own = inherited = 0
    for i, kind in enumerate(kinds):
        if kind == "own":
            own += 1
            if own <= limit:
                failed.append({"user": users[i], "kind": "own", "error": "x"})
            if i + 1 >= min_users and own / (i + 1) > rate:
                msg = f"circuit breaker: {own} of {i + 1} users failed ({own / (i + 1):.0%} > {rate:.0%})"
                return DateOutcome(Table([], {}), i + 1, own, inherited, failed, msg)
        elif kind == "upstream":
            inherited += 1
            if inherited <= limit:
                failed.append({"user": users[i], "kind": "upstream", "error": "y"})
    return DateOutcome(Table(users, {}), len(kinds), own, inherited, failed)


@settings(max_examples=300, deadline=None)
@given(
    kinds=st.lists(st.sampled_from([None, None, "own", "upstream"]), max_size=30),
    cuts=st.lists(st.integers(0, 30), max_size=4),
    limit=st.integers(1, 4),
    min_users=st.integers(1, 10),
    rate=st.sampled_from([0.0, 0.2, 0.5, 0.9]),
)
def test_merged_ranges_trip_and_keep_what_one_process_does(
    kinds: list[str | None], cuts: list[int], limit: int, min_users: int, rate: float
) -> None:
    users = [f"u{i:03d}" for i in range(len(kinds))]
    bounds = [0, *sorted(min(c, len(kinds)) for c in cuts), len(kinds)]
    parts = [_part(users[a:b], kinds[a:b], limit) for a, b in itertools.pairwise(bounds)]
    merged = blockpool.merge_dates(parts, limit, (min_users, rate))
    want = _serial(kinds, limit, min_users, rate)
    got = (merged.processed, merged.failures, merged.inherited, merged.failed_users)
    assert got == (want.processed, want.failures, want.inherited, want.failed_users)
    assert merged.aborted == want.aborted
    if want.aborted is None:
        assert merged.table.users == users
