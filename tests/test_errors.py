"""One-line errors, no traceback without ``--debug`` (issue 8, item 8; SQLite and PostgreSQL
where storage is involved): an unreadable root data file, an SQLite ledger that cannot be
created, a database locked past the wait, ``plan -o`` into a missing folder, ``runs --run``
of an unknown id. Each goes through ``orchestrator.cli.main`` as a user would call it."""

from __future__ import annotations

import datetime as dt
import gzip
import os
import sqlite3
from pathlib import Path

import pytest
from click.testing import Result
from sqlalchemy import create_engine, text

from orchestrator.ledger import store
from tests.conftest import Project, price_rows, weekdays

DATES = weekdays(dt.date(2024, 3, 1), 3)
TARGET = DATES[-1].isoformat()

SOURCE = """
from orchestrator import StandardCalculation


class Close(StandardCalculation):
    name = "close"
    category = "prices"
    root_data = ["prices"]

    def process(self, ctx):
        return {"close": ctx.root["prices"][0]["close"]}
"""


def one_line_error(result: Result, code: int) -> str:
    """The single ``Error: ...`` line of a failed command (asserting there is nothing else)."""
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0]


def setup(project: Project) -> None:
    project.write_prices(price_rows(["AAA", "BBB"], DATES))
    project.write_calcs(SOURCE)


# --- unreadable root data -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "content"),
    [("prices.csv.gz", b"this is not gzip"), ("prices.csv", b"date,close,Name\n\xff\xfe,1,A\n")],
)
def test_an_unreadable_single_file_source_names_the_file(
    project: Project, name: str, content: bytes
) -> None:
    setup(project)
    bad = project.root / "data" / name
    bad.write_bytes(content)
    project.root_options = ""
    (project.root / "orchestrator.toml").write_text(
        project.config.read_text().replace('path = "data/prices.csv"', f'path = "data/{name}"')
    )
    for command in (["run", "--date", TARGET], ["plan", "--date", TARGET]):
        line = one_line_error(project.cli(*command), 2)
        assert f"cannot read root data file {bad}" in line


def test_an_unreadable_file_of_a_folder_is_skipped_and_reported(project: Project) -> None:
    setup(project)
    folder = project.root / "data"
    with gzip.open(folder / "late.csv.gz", "wb") as f:  # truncated: a half-written delivery
        f.write(b"date,open,high,low,close,volume,Name\n" * 100)
    (folder / "late.csv.gz").write_bytes((folder / "late.csv.gz").read_bytes()[:30])
    (project.root / "orchestrator.toml").write_text(
        project.config.read_text().replace('path = "data/prices.csv"', 'path = "data"')
    )
    result = project.cli("run", "--date", TARGET)
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    assert "note: prices: late.csv.gz: unreadable, skipped (cannot read root data file" in (
        result.output
    )
    assert ": 3 cells computed," in result.output  # the readable file's dates still ran


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_a_file_without_read_permission_names_the_file(project: Project) -> None:
    setup(project)
    project.data.chmod(0)
    try:
        line = one_line_error(project.cli("run", "--date", TARGET), 2)
    finally:
        project.data.chmod(0o644)
    assert f"cannot read root data file {project.data}" in line


# --- an SQLite ledger that cannot be created -----------------------------------------------


@pytest.mark.parametrize(
    ("where", "message"),
    [
        ("missing/ledger.db", "folder {root}/missing does not exist"),
        ("a-file/ledger.db", "folder {root}/a-file does not exist (or is not a folder)"),
        ("a-folder", "cannot open or create the SQLite ledger {root}/a-folder"),
    ],
)
def test_an_sqlite_ledger_that_cannot_be_created(tmp_path: Path, where: str, message: str) -> None:
    project = Project(tmp_path, f"sqlite:///{tmp_path / where}")
    (tmp_path / "a-file").write_text("")
    (tmp_path / "a-folder").mkdir()
    setup(project)
    for command in (["run", "--date", TARGET], ["runs"], ["db", "upgrade"]):
        line = one_line_error(project.cli(*command), 2)
        assert message.format(root=tmp_path) in line
    assert not (tmp_path / "missing").exists()  # nothing was created on the way


# --- a database locked by another process ---------------------------------------------------


def test_a_locked_sqlite_ledger_is_a_one_line_error_naming_file_and_wait(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "ledger.db"
    project = Project(tmp_path, f"sqlite:///{path}")
    setup(project)
    assert project.cli("run", "--date", TARGET).exit_code == 0
    monkeypatch.setattr(store, "LOCK_WAIT_SECONDS", 0.3)
    other = sqlite3.connect(path, isolation_level=None)  # another process's write transaction
    other.execute("BEGIN EXCLUSIVE")
    try:
        for command in (["run", "--date", TARGET], ["epoch", "bump", "--calc", "close"]):
            line = one_line_error(project.cli(*command), 2)
            assert line == (
                f"Error: the ledger database {path} is locked by another process (waited 0.3 s); "
                "is another orchestrator command running? Try again when it has finished"
            )
        assert project.cli("plan", "--date", TARGET).exit_code == 0  # readers still read (WAL)
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert project.cli("run", "--date", TARGET).exit_code == 0


def test_a_migration_held_by_another_process_past_the_wait(
    project: Project, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An empty database whose migration another process holds: exit 2 with the lock message
    (SQLite: its write lock; PostgreSQL: the migration advisory lock)."""
    setup(project)
    monkeypatch.setattr(store, "LOCK_WAIT_SECONDS", 0.3)
    holder = store.make_engine(db_url)
    with holder.connect() as conn:
        if holder.dialect.name == "sqlite":
            conn.exec_driver_sql("BEGIN EXCLUSIVE")
            expected = "is locked by another process (waited 0.3 s)"
        else:
            conn.execute(
                text(f"SELECT pg_advisory_lock(:k, {store.MIGRATION_LOCK_SCOPE})"),
                {"k": store.MIGRATION_LOCK_KEY},
            )
            expected = "another process is migrating the ledger schema"
        try:
            line = one_line_error(project.cli("db", "upgrade"), 2)
            assert expected in line
        finally:
            if holder.dialect.name == "sqlite":
                conn.exec_driver_sql("ROLLBACK")
            else:
                conn.execute(text("SELECT pg_advisory_unlock_all()"))
    holder.dispose()
    upgraded = project.cli("db", "upgrade")
    assert upgraded.exit_code == 0 and "ledger schema at 0007" in upgraded.output


# --- plan -o and runs --run ---------------------------------------------------------------


def test_plan_into_a_missing_folder(project: Project) -> None:
    setup(project)
    out = project.root / "reports" / "plan.html"
    line = one_line_error(project.cli("plan", "--format", "html", "-o", str(out)), 2)
    assert line == (
        f"Error: cannot write the report to {out}: folder {out.parent} does not exist; "
        "create it or pass another --output"
    )
    out.parent.mkdir()
    assert project.cli("plan", "--format", "html", "-o", str(out)).exit_code == 0
    assert out.read_text().startswith("<!doctype html>")


def test_runs_of_an_unknown_id(project: Project) -> None:
    setup(project)
    assert project.cli("run", "--date", TARGET).exit_code == 0
    line = one_line_error(project.cli("runs", "--run", "nosuchid"), 2)
    assert line == "Error: no run with id 'nosuchid'; `orchestrator runs` lists the recent runs"
    engine = create_engine(project.db_url.replace("postgresql://", "postgresql+psycopg://"))
    with engine.connect() as conn:
        run_id = conn.execute(text("SELECT run_id FROM runs")).scalar_one()
    engine.dispose()
    known = project.cli("runs", "--run", run_id[:6])
    assert known.exit_code == 0 and known.output.startswith(f"run {run_id[:8]} COMPLETED exit 0")


def test_debug_shows_the_traceback(project: Project) -> None:
    setup(project)
    result = project.cli("--debug", "runs", "--run", "nosuchid")
    assert result.exit_code != 0
    assert type(result.exception).__name__ == "ConfigError"
