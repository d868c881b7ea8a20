"""Two (here: four) first runs at the same moment on an empty database do not collide in the
schema migration (issue 8, item 9; SQLite and PostgreSQL). Migrations are serialised — a
PostgreSQL advisory lock, SQLite's exclusive write lock — so one process migrates and the
others wait and then find the schema at head.

Before, on PostgreSQL, the processes that lost the race failed with
``UniqueViolation ... pg_type_typname_nsp_index`` (both creating the same table).
"""

from __future__ import annotations

import multiprocessing
import traceback
from typing import Any

from sqlalchemy import inspect, text

from orchestrator.ledger.models import METADATA
from orchestrator.ledger.store import Ledger, make_engine, schema_heads

PROCESSES = 4


def _open(url: str, barrier: Any, results: Any) -> None:
    barrier.wait()  # all at once
    try:
        Ledger.open(url).dispose()
        results.put("ok")
    except BaseException:  # noqa: BLE001 - reported to the test
        results.put(traceback.format_exc())


def test_simultaneous_first_opens_migrate_once(db_url: str) -> None:
    context = multiprocessing.get_context("spawn")  # no state shared with this process
    barrier = context.Barrier(PROCESSES)
    results = context.Queue()
    processes = [
        context.Process(target=_open, args=(db_url, barrier, results)) for _ in range(PROCESSES)
    ]
    for process in processes:
        process.start()
    outcomes = [results.get(timeout=120) for _ in processes]
    for process in processes:
        process.join(timeout=30)
    assert outcomes == ["ok"] * PROCESSES, "\n".join(o for o in outcomes if o != "ok")
    engine = make_engine(db_url)
    with engine.connect() as conn:
        versions = conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all()
    tables = set(inspect(engine).get_table_names())
    engine.dispose()
    assert versions == list(schema_heads())  # at head, exactly once
    assert tables == set(METADATA.tables) | {"alembic_version"}
