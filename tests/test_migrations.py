"""The schema comes only from Alembic: head matches the models; up and down both work."""

from __future__ import annotations

import pytest
from sqlalchemy import inspect

from orchestrator.errors import StorageError
from orchestrator.ledger.models import Base
from orchestrator.ledger.store import Ledger, current_revision, downgrade, make_engine, upgrade


def test_upgrade_to_head_matches_models_and_downgrade_to_base(db_url: str) -> None:
    engine = make_engine(db_url)
    upgrade(engine)
    assert current_revision(engine) == "0002"
    tables = set(inspect(engine).get_table_names()) - {"alembic_version"}
    assert tables == set(Base.metadata.tables)
    for name, table in Base.metadata.tables.items():
        columns = {c["name"] for c in inspect(engine).get_columns(name)}
        assert columns == {c.name for c in table.columns}, name
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
