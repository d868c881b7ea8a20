"""``Ledger.collect_orphans``: exactly the shards no published cell points at are deleted."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from orchestrator.ledger.store import CELLS, SHARDS, Ledger
from tests.test_plan_digest import DAYS, NOW, write

CALCS = ["a", "b"]


@pytest.fixture
def ledger(db_url: str) -> Iterator[Ledger]:
    opened = Ledger.open(db_url)
    yield opened
    opened.dispose()


def shard(calc: str, date: dt.date, generation: str, seq: int) -> dict[str, Any]:
    return {
        "calculation": calc,
        "date": date,
        "generation": generation,
        "seq": seq,
        "first_user": "u",
        "last_user": "u",
        "users": 1,
        "raw_bytes": 1,
        "data": b"x",
    }


def stored_shards(ledger: Ledger) -> set[tuple[str, dt.date, str, int]]:
    with ledger.engine.connect() as conn:
        rows = conn.execute(
            select(SHARDS.c.calculation, SHARDS.c.date, SHARDS.c.generation, SHARDS.c.seq)
        ).all()
    return {(c, d, g, s) for c, d, g, s in rows}


def generations(ledger: Ledger) -> dict[tuple[str, dt.date], str | None]:
    with ledger.engine.connect() as conn:
        rows = conn.execute(select(CELLS.c.calculation, CELLS.c.date, CELLS.c.generation)).all()
    return {(c, d): g for c, d, g in rows}


def test_orphans_are_deleted_and_published_shards_kept(ledger: Ledger) -> None:
    @settings(
        max_examples=25,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )
    @given(
        published=st.sets(st.tuples(st.sampled_from(CALCS), st.sampled_from(DAYS))),
        shards=st.sets(
            st.tuples(
                st.sampled_from(CALCS),
                st.sampled_from(DAYS),
                st.sampled_from(["current", "crashed", "older"]),
                st.integers(0, 2),
            )
        ),
    )
    def check(
        published: set[tuple[str, dt.date]], shards: set[tuple[str, dt.date, str, int]]
    ) -> None:
        with ledger.engine.begin() as conn:
            conn.execute(SHARDS.delete())
            conn.execute(CELLS.delete())
        ledger.publish_with_shards([write(c, d) for c, d in sorted(published)], [], NOW)
        current = generations(ledger)
        rows = [
            shard(c, d, (current.get((c, d)) or "none") if kind == "current" else kind, seq)
            for c, d, kind, seq in sorted(shards)
        ]
        ledger.write_shards(rows)
        before = stored_shards(ledger)
        kept = {s for s in before if current.get((s[0], s[1])) == s[2]}
        assert ledger.collect_orphans() == len(before - kept)
        assert stored_shards(ledger) == kept
        assert ledger.collect_orphans() == 0

    check()


def test_many_orphans_are_deleted_in_chunks(ledger: Ledger) -> None:
    ledger.publish_with_shards([write("a", DAYS[0])], [], NOW)
    generation = generations(ledger)[("a", DAYS[0])]
    assert generation is not None
    ledger.write_shards([shard("a", DAYS[0], generation, 0)])
    ledger.write_shards([shard("a", d, "crashed", seq) for d in DAYS for seq in range(80)])
    assert ledger.collect_orphans() == len(DAYS) * 80
    assert stored_shards(ledger) == {("a", DAYS[0], generation, 0)}
