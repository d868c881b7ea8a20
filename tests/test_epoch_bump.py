"""``epoch bump`` changes nothing if it cannot record the bump: file and ledger agree (issue 8,
item 10; SQLite and PostgreSQL).

Before, the global bump rewrote ``system_epoch.py`` first and recorded it after: a failing
ledger write left the file bumped and the ledger without the bump (and its reason).
"""

from __future__ import annotations

import datetime as dt
import sqlite3

from sqlalchemy import text

from orchestrator.ledger.store import make_engine
from tests.conftest import Project, price_rows, weekdays
from tests.test_errors import SOURCE, one_line_error

DATES = weekdays(dt.date(2024, 3, 1), 2)
OLD = '"""The epoch."""\n\nSYSTEM_EPOCH = 3  # bumped by hand\n'


def setup(project: Project) -> None:
    project.write_prices(price_rows(["AAA"], DATES))
    project.write_calcs(SOURCE)
    (project.root / "system_epoch.py").write_text(OLD)
    assert project.cli("db", "upgrade").exit_code == 0


def sql(project: Project, *statements: str) -> None:
    if project.db_url.startswith("sqlite"):  # no foreign_keys pragma: see the deferred guard
        conn = sqlite3.connect(project.db_url[len("sqlite:///") :], isolation_level=None)
        for statement in statements:
            conn.execute(statement)
        conn.close()
        return
    engine = make_engine(project.db_url)
    with engine.begin() as c:
        for statement in statements:
            c.execute(text(statement))
    engine.dispose()


def bumps(project: Project) -> list[tuple[str | None, int]]:
    engine = make_engine(project.db_url)
    with engine.connect() as c:
        rows = c.execute(text("SELECT calculation, epoch FROM epoch_bumps ORDER BY id")).all()
    engine.dispose()
    return [tuple(r) for r in rows]


def test_a_bump_is_in_the_file_and_in_the_ledger(project: Project) -> None:
    setup(project)
    result = project.cli("epoch", "bump", "--reason", "new fx source")
    assert result.exit_code == 0, result.output
    assert (project.root / "system_epoch.py").read_text() == OLD.replace("= 3", "= 4")
    assert bumps(project) == [(None, 4)]


def test_a_failing_insert_leaves_the_file_alone(project: Project) -> None:
    setup(project)
    sql(project, "DROP TABLE epoch_bumps")
    line = one_line_error(project.cli("epoch", "bump", "--reason", "x"), 2)
    assert line.startswith("Error: cannot record the epoch bump in the ledger (")
    assert "system_epoch.py is unchanged" in line
    assert (project.root / "system_epoch.py").read_text() == OLD
    line = one_line_error(project.cli("epoch", "bump", "--calc", "close"), 2)
    assert "cannot record the epoch bump in the ledger" in line


def test_a_failing_commit_puts_the_file_back(project: Project) -> None:
    """The insert succeeds and the file is written, but the commit fails (a deferred
    foreign key to an empty table): the file goes back to the old epoch."""
    setup(project)
    sql(
        project,
        "CREATE TABLE guard (id INTEGER PRIMARY KEY)",
        "ALTER TABLE epoch_bumps ADD COLUMN guard INTEGER DEFAULT 1 "
        "REFERENCES guard (id) DEFERRABLE INITIALLY DEFERRED",
    )
    line = one_line_error(project.cli("epoch", "bump"), 2)
    assert "cannot record the epoch bump in the ledger (IntegrityError" in line
    assert (project.root / "system_epoch.py").read_text() == OLD
    assert bumps(project) == []
    assert not (project.root / "system_epoch.tmp").exists()


def test_a_missing_ledger_changes_nothing(project: Project) -> None:
    setup(project)
    missing = project.root / "no-such-folder" / "ledger.db"
    result = project.cli("--db", f"sqlite:///{missing}", "epoch", "bump")
    line = one_line_error(result, 2)
    assert f"cannot create the SQLite ledger {missing}" in line
    assert (project.root / "system_epoch.py").read_text() == OLD
