"""The schema comes only from Alembic: head matches the models; up and down both work."""

from __future__ import annotations

import pytest
from sqlalchemy import inspect

from orchestrator.errors import StorageError
from orchestrator.ledger.models import METADATA, UNMODELLED_INDEXES
from orchestrator.ledger.store import (
    SCHEMA_HEAD,
    Ledger,
    at_schema_head,
    current_revision,
    downgrade,
    make_engine,
    schema_heads,
    upgrade,
)


def test_upgrade_to_head_matches_models_and_downgrade_to_base(db_url: str) -> None:
    engine = make_engine(db_url)
    upgrade(engine)
    assert current_revision(engine) == "0007"
    tables = set(inspect(engine).get_table_names()) - {"alembic_version"}
    assert tables == set(METADATA.tables)
    for name, table in METADATA.tables.items():
        columns = {c["name"]: c["nullable"] for c in inspect(engine).get_columns(name)}
        assert columns == {c.name: c.nullable for c in table.columns}, name
        indexes = {i["name"] for i in inspect(engine).get_indexes(name)}
        modelled = {i.name for i in table.indexes}
        assert indexes == modelled | UNMODELLED_INDEXES.get(name, set()), name
    downgrade(engine, "base")
    assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    upgrade(engine)
    engine.dispose()


def test_a_newer_schema_is_refused_with_what_to_do(db_url: str) -> None:
    engine = make_engine(db_url)
    upgrade(engine)
    with engine.begin() as conn:
        conn.exec_driver_sql("UPDATE alembic_version SET version_num = '9999'")
    engine.dispose()
    with pytest.raises(StorageError, match="newer than this orchestrator"):
        Ledger.open(db_url)


def test_unreachable_database_is_a_storage_error() -> None:
    with pytest.raises(StorageError, match="cannot connect"):
        Ledger.open("postgresql://postgres@127.0.0.1:1/nothing")


def test_0003_computes_the_build_key_of_existing_and_new_cells(db_url: str) -> None:
    import datetime as dt

    from sqlalchemy import text

    from orchestrator.ledger.store import build_key

    engine = make_engine(db_url)
    upgrade(engine, "0002")
    row = {
        "calculation": "rsi",
        "date": dt.date(2024, 1, 2),
        "status": "COMPLETED",
        "category": "signals",
        "code_hash": "c" * 32,
        "layer_hash": "l" * 32,
        "infra_hash": "i" * 32,
        "epoch": 3,
        "scoped_epoch": 1,
        "inputs_digest": "d" * 32,
        "upstream_hashes": "{}",
        "root_hashes": "{}",
        "users": 0,
        "attempts": 0,
        "hash_format": 1,
        "updated_at": dt.datetime(2024, 1, 3),
    }
    insert = text(
        f"INSERT INTO cells ({', '.join(row)}) VALUES ({', '.join(':' + k for k in row)})"
    )
    with engine.begin() as conn:
        conn.execute(insert, row)
    upgrade(engine)  # the existing cell gets its key
    with engine.begin() as conn:
        conn.execute(insert, {**row, "date": dt.date(2024, 1, 3), "status": "FAILED"})
        conn.execute(text("UPDATE cells SET epoch = 4 WHERE date = :d"), {"d": dt.date(2024, 1, 2)})
        keys = dict(conn.execute(text("SELECT status, build_key FROM cells")).all())
    parts = ("signals", "c" * 32, "l" * 32, "i" * 32)
    assert keys == {
        "COMPLETED": build_key("COMPLETED", *parts, 4, 1),  # kept current by the database
        "FAILED": build_key("FAILED", *parts, 3, 1),
    }
    downgrade(engine, "base")
    engine.dispose()


def test_schema_head_constant_is_the_alembic_head(db_url: str) -> None:
    """``SCHEMA_HEAD`` (what ``Ledger.open`` compares without Alembic) is the migrations'
    head: a new migration without bumping it fails here. Only a ledger at that head skips
    Alembic; an older one is still migrated on open."""
    assert schema_heads() == (SCHEMA_HEAD,)
    engine = make_engine(db_url)
    assert not at_schema_head(engine)  # empty: no alembic_version table
    upgrade(engine)
    assert at_schema_head(engine)
    assert current_revision(engine) == SCHEMA_HEAD
    downgrade(engine, "0005")
    assert not at_schema_head(engine)
    Ledger.open(db_url).dispose()  # an older schema: migrated to head by Alembic
    assert current_revision(engine) == SCHEMA_HEAD
    assert at_schema_head(engine)
    engine.dispose()
