"""A no-op ``orchestrator run`` stays cheap to start: what it must not import.

Most of a no-op run's wall time is the process's start-up, its imports. Alembic (the ledger
is at ``store.SCHEMA_HEAD``), pyarrow (no root data file is parsed: the stored index is
reused), pandas, SQLAlchemy's ORM and, for an SQLite ledger, the PostgreSQL dialect are not
needed; importing any of them again costs every nightly run tens of milliseconds each.
"""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import Project
from tests.test_scenarios import CALCS, DATES, TARGET, setup

# Run the CLI in a fresh interpreter and report the heavy packages it imported.
PROBE = """
import json, sys
from orchestrator.cli import main
try:
    main(sys.argv[1:])
except SystemExit as e:
    status = e.code
heavy = sorted(
    m for m in sys.modules
    if m.partition(".")[0] in ("alembic", "pyarrow", "pandas")
    or m.startswith(("sqlalchemy.orm", "sqlalchemy.dialects.postgresql"))
)
print(json.dumps({"status": status, "heavy": heavy}))
"""


def test_a_noop_run_imports_no_alembic_pyarrow_or_orm(project: Project) -> None:
    setup(project)
    assert project.run(TARGET).ok  # computes everything: the next run is a no-op
    command = ["--config", str(project.config), "run", "--date", str(TARGET)]
    done = subprocess.run(
        [sys.executable, "-c", PROBE, *command],
        capture_output=True,
        text=True,
        check=False,
        cwd=project.root,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    *output, report = done.stdout.strip().splitlines()
    found = json.loads(report)
    assert found["status"] == 0, done.stdout
    assert f"0 cells computed, 0 failed, {len(CALCS) * len(DATES):,} skipped (up to date)" in (
        "\n".join(output)
    )
    heavy = set(found["heavy"])
    if project.db_url.startswith("postgresql"):  # its engine needs its dialect, of course
        heavy = {m for m in heavy if not m.startswith("sqlalchemy.dialects.postgresql")}
    assert heavy == set(), sorted(heavy)
