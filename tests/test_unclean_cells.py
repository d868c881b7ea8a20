"""``Ledger.unclean_cells``: exactly the cells of the range that are not complete and clean."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator.ledger.store import CELLS, Ledger
from tests.test_plan_digest import DAYS, NOW, write

STATES = st.sampled_from(["COMPLETED", "PARTIAL", "FAILED", "DEAD_LETTER"])


@pytest.fixture
def ledger(db_url: str) -> Iterator[Ledger]:
    opened = Ledger.open(db_url)
    yield opened
    opened.dispose()


def test_unclean_cells_are_those_of_the_range_only(ledger: Ledger) -> None:
    @settings(
        max_examples=25,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )
    @given(
        cells=st.lists(st.tuples(st.sampled_from(["a", "b"]), st.sampled_from(DAYS), STATES)),
        failed_users=st.lists(st.booleans(), min_size=len(DAYS), max_size=len(DAYS)),
        bounds=st.tuples(st.sampled_from(DAYS), st.sampled_from(DAYS)).map(sorted),
        calcs=st.sampled_from([["a"], ["b"], ["a", "b"]]),
    )
    def check(
        cells: list[tuple[str, dt.date, str]],
        failed_users: list[bool],
        bounds: list[dt.date],
        calcs: list[str],
    ) -> None:
        with ledger.engine.begin() as conn:
            conn.execute(CELLS.delete())
        stored = {(c, d): s for c, d, s in cells}  # the last state of a cell wins
        for (calc, date), status in stored.items():
            published = status in ("COMPLETED", "PARTIAL")
            ledger.publish_with_shards([write(calc, date, status, published=published)], [], NOW)
        users_failed = {d: 2 if f else 0 for d, f in zip(DAYS, failed_users, strict=True)}
        with ledger.engine.begin() as conn:
            for date, n in users_failed.items():
                conn.execute(CELLS.update().where(CELLS.c.date == date).values(users_failed=n))
        low, high = bounds
        want = sorted(
            (date, calc)
            for (calc, date), status in stored.items()
            if calc in calcs
            and low <= date <= high
            and (status != "COMPLETED" or users_failed[date] > 0)
        )
        rows = ledger.unclean_cells(calcs, low, high)
        assert [(r.date, r.calculation) for r in rows] == want
        assert all(r.users_failed == users_failed[r.date] for r in rows)

    check()
