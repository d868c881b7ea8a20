"""Shared fixtures: a real database per test (SQLite file, and PostgreSQL when configured) and
a factory for small projects (data files, calculation packages, config) written to tmp_path.

Every storage-touching test takes ``db_url``; it runs once on SQLite and once on PostgreSQL
when ``ORCHESTRATOR_TEST_POSTGRES_URL`` is set (``.ci/run`` sets it). Each PostgreSQL test gets
its own schema through ``search_path``, dropped afterwards, so tests never see each other.
"""

from __future__ import annotations

import csv
import datetime as dt
import gzip
import itertools
import os
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings
from sqlalchemy import create_engine, text

# `pytest --hypothesis-profile=long`: a longer search, by hand (tests/test_soundness.py).
settings.register_profile("long", max_examples=150, stateful_step_count=12, deadline=None)

PG_ENV = "ORCHESTRATOR_TEST_POSTGRES_URL"
_BACKENDS = ["sqlite"] + (["postgresql"] if os.environ.get(PG_ENV) else [])


def _pg_base() -> str:
    url = os.environ[PG_ENV]
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://") :]
    return url


@pytest.fixture(params=_BACKENDS)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty ledger database URL: SQLite in tmp_path, or a private PostgreSQL schema."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'ledger.db'}"
        return
    base = _pg_base()
    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = create_engine(base)
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    sep = "&" if "?" in base else "?"
    try:
        yield f"{base}{sep}options=-csearch_path%3D{schema}"
    finally:
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


_package_counter = itertools.count()

PRICES_HEADER = ["date", "open", "high", "low", "close", "volume", "Name"]


def weekdays(start: dt.date, n: int) -> list[dt.date]:
    out, day = [], start
    while len(out) < n:
        if day.weekday() < 5:
            out.append(day)
        day += dt.timedelta(days=1)
    return out


class Project:
    """A small orchestrator project in a folder: price data, a calculation package, a config.

    ``write_calcs(source)`` writes a new package version (a fresh package name each time, so a
    test process can import several versions of "the same" calculations — names come from the
    class attributes, not the module).
    """

    def __init__(self, root: Path, db_url: str):
        self.root = root
        self.db_url = db_url
        self.data = root / "data" / "prices.csv"
        self.package: str | None = None
        self.extra_config = ""
        self.root_options = ""  # extra keys of [root_data.prices]

    def write_prices(self, rows: list[dict[str, Any]]) -> None:
        self.data.parent.mkdir(parents=True, exist_ok=True)
        with self.data.open("w", newline="") as f:
            writer = csv.DictWriter(f, PRICES_HEADER)
            writer.writeheader()
            for row in rows:
                writer.writerow(row)

    def write_calcs(self, source: str, modules: dict[str, str] | None = None) -> str:
        name = f"calcs_{os.getpid()}_{next(_package_counter)}"
        pkg = self.root / name
        pkg.mkdir()
        (pkg / "__init__.py").write_text("")
        (pkg / "main.py").write_text(textwrap.dedent(source))
        for module, text_ in (modules or {}).items():
            path = pkg / f"{module}.py"  # "layers/stats" makes a subpackage
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.parent != pkg and not (path.parent / "__init__.py").exists():
                (path.parent / "__init__.py").write_text("")
            path.write_text(textwrap.dedent(text_))
        self.package = name
        self.write_config()
        return name

    def write_config(self) -> None:
        assert self.package is not None
        # Top-level keys must come before the first [table] in TOML.
        (self.root / "orchestrator.toml").write_text(
            self.extra_config
            + textwrap.dedent(
                f"""\
                database_url = "{self.db_url}"
                calculations = "{self.package}"
                system_epoch = "system_epoch.py"
                [root_data.prices]
                path = "data/prices.csv"
                date_column = "date"
                user_column = "Name"
                """
            )
            + self.root_options
        )

    @property
    def config(self) -> Path:
        return self.root / "orchestrator.toml"

    def orchestrator(self) -> Any:
        from orchestrator.app import Orchestrator

        return Orchestrator.from_config(self.config)

    def run(self, target: dt.date, workers: int | None = None, **options: Any) -> Any:
        """Run up to ``target`` (inclusive) with a fresh orchestrator, closed afterwards.

        Args:
            target: the last date to run.
            workers: processes for standard cells; None keeps the config's ``workers``.
            **options: passed on to ``Orchestrator.run`` (``calculations``, ``force``, ...).

        Returns:
            The run's ``RunSummary``.
        """
        orch = self.orchestrator()
        try:
            return orch.run(target, workers=workers, **options)
        finally:
            orch.close()

    def plan(self, target: dt.date) -> Any:
        """The dry-run ``Plan`` up to ``target`` (inclusive), from a fresh orchestrator."""
        orch = self.orchestrator()
        try:
            return orch.plan(target)
        finally:
            orch.close()

    def result_hashes(self) -> dict[tuple[str, dt.date], str | None]:
        """Every ledger cell's result hash, whatever its status (None: nothing published).

        Returns:
            ``{(calculation, date): result_hash}`` over every cell in the ledger.
        """
        orch = self.orchestrator()
        try:
            cells = orch.ledger.load_cells()
        finally:
            orch.close()
        return {(c, d): cell.result_hash for c, per in cells.items() for d, cell in per.items()}

    def outcomes(self) -> dict[tuple[str, dt.date], tuple[Any, str | None, int, str | None]]:
        """Every ledger cell's outcome, for comparing two engines cell by cell.

        Returns:
            ``{(calculation, date): (status, result_hash, users_failed, first error line)}``.
        """
        orch = self.orchestrator()
        try:
            cells = orch.ledger.load_cells()
        finally:
            orch.close()
        return {
            (calc, day): (
                cell.status,
                cell.result_hash,
                cell.users_failed,
                (cell.error or "").splitlines()[0] if cell.error else None,
            )
            for calc, per in cells.items()
            for day, cell in per.items()
        }

    def cli(self, *args: str) -> Any:
        """Invoke the click CLI in-process with ``--config`` this project's config.

        Returns:
            click's ``Result`` (exit code, output).
        """
        from click.testing import CliRunner

        from orchestrator.cli import main

        return CliRunner().invoke(main, ["--config", str(self.config), *args])


def price_rows(
    symbols: list[str], dates: list[dt.date], skip: set[tuple[str, dt.date]] = frozenset()
) -> list[dict[str, Any]]:
    """Deterministic OHLCV rows: a smooth, symbol-specific walk (no randomness to seed)."""
    rows = []
    for s_i, sym in enumerate(symbols):
        for d_i, day in enumerate(dates):
            if (sym, day) in skip:
                continue
            close = round(50 + 10 * s_i + 3 * ((d_i * (s_i + 3)) % 7) - d_i * 0.1, 2)
            rows.append(
                {
                    "date": day.isoformat(),
                    "open": close - 0.5,
                    "high": close + 1,
                    "low": close - 1,
                    "close": close,
                    "volume": 1000 + d_i,
                    "Name": sym,
                }
            )
    return rows


@pytest.fixture
def project(tmp_path: Path, db_url: str) -> Project:
    return Project(tmp_path, db_url)


def scratch_project(tmp_path: Path, name: str = "scratch") -> Project:
    """An empty project in ``tmp_path / name`` with its own fresh SQLite ledger ``name.db``:
    the from-scratch twin of a test's project, whatever database that one uses."""
    scratch = Project(tmp_path / name, f"sqlite:///{tmp_path / f'{name}.db'}")
    scratch.root.mkdir(parents=True, exist_ok=True)
    return scratch


def scratch_hashes(
    tmp_path: Path,
    rows: list[dict[str, Any]],
    calcs: str,
    target: dt.date,
    *,
    name: str = "scratch",
    extra_config: str = "",
    workers: int | None = 1,
) -> dict[tuple[str, dt.date], str | None]:
    """Result hashes of a from-scratch build of ``rows`` and ``calcs`` (see
    ``scratch_project``), asserting that the build is clean.

    Args:
        tmp_path: where the twin project and its ledger go.
        rows: the price rows (``price_rows`` shape).
        calcs: the calculation package source (``Project.write_calcs``).
        target: the last date built (inclusive).
        name: the twin's folder and ledger file name.
        extra_config: top-level config keys of the twin.
        workers: processes for the build (None: the config's).

    Returns:
        ``Project.result_hashes()`` of the twin.
    """
    scratch = scratch_project(tmp_path, name)
    scratch.write_prices(rows)
    scratch.extra_config = extra_config
    scratch.write_calcs(calcs)
    assert scratch.run(target, workers=workers).ok
    return scratch.result_hashes()


def gzip_csv(path: Path, header: list[str], rows: list[list[Any]]) -> None:
    with gzip.open(path, "wt", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
