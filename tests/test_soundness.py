"""Soundness, as a property: after any sequence of edits, the ledger holds exactly what a
from-scratch build holds, and nothing ran that a minimal build would not run.

A Hypothesis ``RuleBasedStateMachine`` edits a small project — code variants of its
calculations (logic, threshold, a renamed local, a comment), helper-module edits, root-data
corrections, late rows, a new date, header changes, scoped and global epoch bumps, a
category change — and runs the orchestrator after each edit. Then:

* **never stale**: every cell's result hash equals that of a from-scratch build of the same
  code and data (a fresh SQLite ledger; memoised per state of the files);
* **never wasteful**: every cell that really executed (each ``process`` call logs its cell)
  had a reason a minimal build would accept: it is new; an epoch covering it was bumped; its
  code or helper changed beyond what the proof of ``equivalence.py`` calls cosmetic; its
  root-data window changed; or an input's result hash (an upstream's, or its own previous
  date's when historical) differs from before the edit. Results that come out the same
  stop the cascade (early cutoff);
* **reverts are free**: when the files and epochs return to a state the sequence already
  built, nothing executes: every cell is up to date or re-pointed to the result it had
  then (REUSED; the project retains up to 100 results per cell, so none was pruned).

Runs on SQLite and on PostgreSQL (``ORCHESTRATOR_TEST_POSTGRES_URL``). CI runs a bounded
budget (50 sequences of up to 6 edits); for a longer search::

    .venv/bin/python -m pytest tests/test_soundness.py --hypothesis-profile=long
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import io
import itertools
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, ClassVar

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule
from sqlalchemy import create_engine, text

from orchestrator.app import Orchestrator
from tests.conftest import PG_ENV, _pg_base, weekdays

SYMBOLS = ["AAA", "BBB", "CCC"]
DATES = weekdays(dt.date(2024, 3, 1), 6)
EXTRA_DATE = weekdays(dt.date(2024, 3, 1), 7)[-1]
COLUMNS = ["date", "open", "high", "low", "close", "volume", "Name"]
LOG_ENV = "SOUNDNESS_LOG"

# Each variant: (source, proof class). Variants of one class are proven equivalent (a comment,
# a renamed local); a different class is a real code change, which may or may not change
# results (then early cutoff applies).
CLOSE_BODY = {
    "base": ('return {"close": ctx.root["prices"][0]["close"]}', 0),
    "comment": (
        '# the close of the day\n        return {"close": ctx.root["prices"][0]["close"]}',
        0,
    ),
    "capped": ('return {"close": min(ctx.root["prices"][0]["close"], 1e9)}', 1),  # same values
    "shifted": ('return {"close": ctx.root["prices"][0]["close"] + 1}', 2),
}
LEVEL_THRESHOLDS = [50, 60]


def body(*lines: str) -> str:
    """Statements of a ``process`` body, indented for the module template."""
    return "\n        ".join(lines)


TREND_BODY = {
    "base": (
        body(
            'prev = ctx.previous or {"ups": 0, "last": None}',
            'now = ctx.upstream["close"]["close"]',
            'up = prev["last"] is not None and now > prev["last"]',
            'return {"ups": prev["ups"] + int(up), "last": now}',
        ),
        0,
    ),
    "renamed": (
        body(
            'state = ctx.previous or {"ups": 0, "last": None}',
            'value = ctx.upstream["close"]["close"]',
            'up = state["last"] is not None and value > state["last"]',
            'return {"ups": state["ups"] + int(up), "last": value}',
        ),
        0,
    ),
    "non_strict": (
        body(
            'prev = ctx.previous or {"ups": 0, "last": None}',
            'now = ctx.upstream["close"]["close"]',
            'up = prev["last"] is not None and now >= prev["last"]',
            'return {"ups": prev["ups"] + int(up), "last": now}',
        ),
        1,
    ),
}

HELPER = {
    "base": ("def mean(values):\n    return sum(values) / len(values)\n", 0),
    "comment": (
        "def mean(values):\n    # arithmetic mean\n    return sum(values) / len(values)\n",
        0,
    ),
    "plus_zero": ("def mean(values):\n    return sum(values) / len(values) + 0\n", 1),
    "biased": ("def mean(values):\n    return (sum(values) + 1) / len(values)\n", 2),
}


def calculations(pkg: str, code: dict[str, Any]) -> str:
    """The calculations module for one code state."""
    level_locals = "prices" if code["level_renamed"] else "closes"
    level_comment = "        # mean of the window\n" if code["level_comment"] else ""
    return f'''
import os

from orchestrator import MetaCalculation, StandardCalculation

from {pkg}.stats import mean


def _log(name, ctx):
    with open(os.environ["{LOG_ENV}"], "a") as f:
        f.write(f"{{name}},{{ctx.date}}\\n")


class Close(StandardCalculation):
    name = "close"
    category = "{code["close_category"]}"
    root_data = ["prices"]

    def process(self, ctx):
        _log(self.name, ctx)
        {CLOSE_BODY[code["close"]][0]}


class Level(StandardCalculation):
    name = "level"
    root_data = ["prices"]
    lookback = 2

    def process(self, ctx):
        _log(self.name, ctx)
{level_comment}        {level_locals} = [r["close"] for r in ctx.history["prices"]]
        return {{"mean": mean({level_locals}), "high": mean({level_locals}) > {LEVEL_THRESHOLDS[code["threshold"]]}}}


class Trend(StandardCalculation):
    name = "trend"
    dependencies = ["close"]
    historical = True

    def process(self, ctx):
        _log(self.name, ctx)
        {TREND_BODY[code["trend"]][0]}


class Board(MetaCalculation):
    name = "board"
    dependencies = ["level", "trend"]

    def process(self, ctx):
        _log(self.name, ctx)
        return {{
            "high": sum(1 for r in ctx.upstream["level"].values() if r["high"]),
            "ups": sum(r["ups"] for r in ctx.upstream["trend"].values()),
        }}
'''


def proof_classes(code: dict[str, Any]) -> dict[str, tuple[Any, ...]]:
    """Per calculation, what a minimal build compares: its code's proof class and that of
    the helper it uses. A category is placement, not code."""
    helper = HELPER[code["helper"]][1]
    return {
        "close": (CLOSE_BODY[code["close"]][1],),
        "level": (code["threshold"], helper),
        "trend": (TREND_BODY[code["trend"]][1],),
        "board": (),
    }


def first_rows() -> dict[tuple[str, dt.date], dict[str, Any]]:
    rows = {}
    for s, sym in enumerate(SYMBOLS):
        for d, day in enumerate(DATES):
            if (sym, d) in (("CCC", 2), ("BBB", 4)):  # gaps a late row may fill
                continue
            close = 45 + 5 * s + 3 * ((d * (s + 2)) % 5)
            rows[(sym, day)] = {
                "open": close - 1,
                "high": close + 1,
                "low": close - 2,
                "close": close,
                "volume": 100 + d,
            }
    return rows


class Soundness(RuleBasedStateMachine):
    backend = "sqlite"
    # files digest -> the from-scratch build's result hashes, shared by every sequence
    _scratch: ClassVar[dict[str, dict[tuple[str, dt.date], str | None]]] = {}

    def __init__(self) -> None:
        super().__init__()
        self.root = Path(tempfile.mkdtemp(prefix="soundness-"))
        self.versions = itertools.count()
        self.schema: str | None = None
        if self.backend == "postgresql":
            self.schema = f"s_{uuid.uuid4().hex[:12]}"
            with create_engine(_pg_base()).begin() as conn:
                conn.execute(text(f'CREATE SCHEMA "{self.schema}"'))
            base = _pg_base()
            self.db_url = (
                f"{base}{'&' if '?' in base else '?'}options=-csearch_path%3D{self.schema}"
            )
        else:
            self.db_url = f"sqlite:///{self.root / 'ledger.db'}"
        self.code: dict[str, Any] = {
            "close": "base",
            "threshold": 0,
            "level_renamed": False,
            "level_comment": False,
            "trend": "base",
            "helper": "base",
            "close_category": "market",
        }
        self.rows = first_rows()
        self.swapped = False  # header labels of open and close exchanged
        self.order = list(COLUMNS)  # physical column order
        self.bumped: set[str] = set()  # calculations whose epoch this edit bumped; "*": all
        self.prev_code = dict(self.code)
        self.prev_content: dict[dt.date, Any] = {}
        self.prev_hashes: dict[tuple[str, dt.date], str | None] = {}
        self.epochs: dict[str, int] = {}  # bumps so far, per calculation ("*": global)
        self.visited: set[str] = set()  # states (files and epochs) built so far

    # --- the project on disk ------------------------------------------------------------

    def write(self) -> None:
        pkg = f"sound_{os.getpid()}_{uuid.uuid4().hex[:6]}_{next(self.versions)}"
        folder = self.root / pkg
        folder.mkdir()
        (folder / "__init__.py").write_text("")
        (folder / "stats.py").write_text(HELPER[self.code["helper"]][0])
        (folder / "main.py").write_text(calculations(pkg, self.code))
        self.package = pkg
        (self.root / "data").mkdir(exist_ok=True)
        (self.root / "data" / "prices.csv").write_text(self.csv_text())
        for name, url, work in (
            ("orchestrator.toml", self.db_url, "work"),
            ("scratch.toml", "sqlite:///scratch.db", "scratch-work"),
        ):
            (self.root / name).write_text(
                f'database_url = "{url}"\ncalculations = "{pkg}"\n'
                + ("retain_results = 100\n" if name == "orchestrator.toml" else "")
                + f'system_epoch = "system_epoch.py"\nwork_dir = "{work}"\n'
                '[root_data.prices]\npath = "data/prices.csv"\ndate_column = "date"\n'
                'user_column = "Name"\n'
            )

    def header(self) -> list[str]:
        swap = {"open": "close", "close": "open"} if self.swapped else {}
        return [swap.get(c, c) for c in self.order]

    def line(self, key: tuple[str, dt.date]) -> list[str]:
        values = {**self.rows[key], "date": key[1].isoformat(), "Name": key[0]}
        return [str(values[c]) for c in self.order]

    def csv_text(self) -> str:
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(self.header())
        for key in sorted(self.rows, key=lambda k: (k[1], k[0])):
            writer.writerow(self.line(key))
        return out.getvalue()

    def content(self) -> dict[dt.date, Any]:
        """What a minimal build compares per date: the header and the date's rows."""
        header = tuple(self.header())
        out: dict[dt.date, Any] = {}
        for key in sorted(self.rows, key=lambda k: k[0]):
            out.setdefault(key[1], [header]).append(tuple(self.line(key)))
        return {d: tuple(v) for d, v in out.items()}

    def run(self, config: str, log: Path) -> dict[tuple[str, dt.date], str | None]:
        os.environ[LOG_ENV] = str(log)
        orch = Orchestrator.from_config(self.root / config)
        try:
            orch.run(max(d for _, d in self.rows))
            cells = orch.ledger.load_cells()
        finally:
            orch.close()
        return {
            (name, date): cell.result_hash
            for name, per_date in cells.items()
            for date, cell in per_date.items()
            if cell.status == "COMPLETED"
        }

    def scratch(self) -> dict[tuple[str, dt.date], str | None]:
        digest = hashlib.sha256(
            (
                calculations("p", self.code) + HELPER[self.code["helper"]][0] + self.csv_text()
            ).encode()
        ).hexdigest()
        if digest not in self._scratch:
            (self.root / "scratch.db").unlink(missing_ok=True)
            shutil.rmtree(self.root / "scratch-work", ignore_errors=True)
            self._scratch[digest] = self.run("scratch.toml", self.root / "scratch.log")
        return self._scratch[digest]

    # --- edits --------------------------------------------------------------------------

    @initialize()
    def build(self) -> None:
        self.built = True  # the invariant runs the first build

    @rule(variant=st.sampled_from(sorted(CLOSE_BODY)))
    def edit_close(self, variant: str) -> None:
        self.code["close"] = variant

    @rule(threshold=st.sampled_from([0, 1]), renamed=st.booleans(), comment=st.booleans())
    def edit_level(self, threshold: int, renamed: bool, comment: bool) -> None:
        self.code.update(threshold=threshold, level_renamed=renamed, level_comment=comment)

    @rule(variant=st.sampled_from(sorted(TREND_BODY)))
    def edit_trend(self, variant: str) -> None:
        self.code["trend"] = variant

    @rule(variant=st.sampled_from(sorted(HELPER)))
    def edit_helper(self, variant: str) -> None:
        self.code["helper"] = variant

    @rule()
    def change_category(self) -> None:
        self.code["close_category"] = (
            "signals" if self.code["close_category"] == "market" else "market"
        )

    @rule(data=st.data())
    def correct_a_close(self, data: st.DataObject) -> None:
        key = data.draw(st.sampled_from(sorted(self.rows, key=lambda k: (k[1], k[0]))))
        self.rows[key] = {
            **self.rows[key],
            "close": self.rows[key]["close"] + data.draw(st.sampled_from([-7, 1, 12])),
        }

    @rule(data=st.data())
    def add_a_late_row(self, data: st.DataObject) -> None:
        missing = [(s, d) for s in SYMBOLS for d in DATES if (s, d) not in self.rows]
        if missing:
            key = data.draw(st.sampled_from(missing))
            self.rows[key] = {"open": 51, "high": 53, "low": 50, "close": 52, "volume": 7}

    @rule()
    def add_a_date(self) -> None:
        for s, sym in enumerate(SYMBOLS):
            self.rows.setdefault(
                (sym, EXTRA_DATE),
                {"open": 60, "high": 62, "low": 58, "close": 61 - 9 * s, "volume": 9},
            )

    @rule()
    def swap_header_labels(self) -> None:
        self.swapped = not self.swapped  # open and close exchange meaning

    @rule()
    def reorder_columns(self) -> None:
        # Same data, other column order: the dates' fingerprints change, results do not.
        i, j = self.order.index("open"), self.order.index("volume")
        self.order[i], self.order[j] = self.order[j], self.order[i]

    @rule(calc=st.sampled_from(["close", "level", "trend", "board"]))
    def bump_a_scoped_epoch(self, calc: str) -> None:
        orch = Orchestrator.from_config(self.root / "orchestrator.toml")
        try:
            orch.bump_epoch(calc, "test")
        finally:
            orch.close()
        self.bumped.add(calc)
        self.epochs[calc] = self.epochs.get(calc, 0) + 1

    @rule()
    def bump_the_global_epoch(self) -> None:
        orch = Orchestrator.from_config(self.root / "orchestrator.toml")
        try:
            orch.bump_epoch(None, "test")
        finally:
            orch.close()
        self.bumped.add("*")
        self.epochs["*"] = self.epochs.get("*", 0) + 1

    # --- the property -------------------------------------------------------------------

    @invariant()
    def sound_after_each_edit(self) -> None:
        if getattr(self, "built", False):
            self.check_run(first=not hasattr(self, "package"))

    def check_run(self, first: bool = False) -> None:
        self.write()
        log = self.root / "exec.log"
        log.write_text("")
        hashes = self.run("orchestrator.toml", log)
        expected = self.scratch()
        assert hashes == expected, {
            k: (hashes.get(k), expected.get(k))
            for k in set(hashes) | set(expected)
            if hashes.get(k) != expected.get(k)
        }
        executed = {
            (name, dt.date.fromisoformat(day))
            for name, day in (line.split(",") for line in log.read_text().splitlines())
        }
        content = self.content()
        if not first:
            wasted = sorted(k for k in executed if not self.may_run(k, hashes, content))
            assert not wasted, f"ran without a reason a minimal build would accept: {wasted}"
        state = hashlib.sha256(
            (
                calculations("p", self.code)
                + HELPER[self.code["helper"]][0]
                + self.csv_text()
                + repr(sorted(self.epochs.items()))
            ).encode()
        ).hexdigest()
        if state in self.visited:
            assert not executed, f"a revert to a state already built ran {sorted(executed)}"
        self.visited.add(state)
        self.prev_hashes, self.prev_content = hashes, content
        self.prev_code = dict(self.code)
        self.bumped = set()

    def may_run(
        self,
        key: tuple[str, dt.date],
        now: dict[tuple[str, dt.date], str | None],
        content: dict[dt.date, Any],
    ) -> bool:
        name, date = key
        if key not in self.prev_hashes or "*" in self.bumped or name in self.bumped:
            return True
        if proof_classes(self.code)[name] != proof_classes(self.prev_code)[name]:
            return True
        axis = sorted(content)
        earlier = [d for d in axis if d < date]
        if name in ("close", "level"):
            lookback = 2 if name == "level" else 1
            window = [d for d in axis if d <= date][-lookback:]
            old_axis = sorted(self.prev_content)
            old_window = [d for d in old_axis if d <= date][-lookback:]
            if [content.get(d) for d in window] != [self.prev_content.get(d) for d in old_window]:
                return True
        deps = {"close": [], "level": [], "trend": ["close"], "board": ["level", "trend"]}[name]
        if any(now.get((u, date)) != self.prev_hashes.get((u, date)) for u in deps):
            return True
        if name == "trend" and earlier:
            previous = (name, earlier[-1])
            return now.get(previous) != self.prev_hashes.get(previous)
        return False

    def teardown(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
        if self.schema is not None:
            engine = create_engine(_pg_base())
            with engine.begin() as conn:
                conn.execute(text(f'DROP SCHEMA "{self.schema}" CASCADE'))
            engine.dispose()


# CI's budget, unless a longer profile was chosen (--hypothesis-profile=long, conftest.py).
_ACTIVE = settings()
SOUNDNESS = (
    _ACTIVE
    if _ACTIVE.max_examples > 100
    else settings(_ACTIVE, max_examples=50, stateful_step_count=6, deadline=None)
)


class SoundnessPostgres(Soundness):
    backend = "postgresql"


TestSoundnessSQLite = Soundness.TestCase
TestSoundnessSQLite.settings = SOUNDNESS

TestSoundnessPostgres = pytest.mark.skipif(
    not os.environ.get(PG_ENV), reason=f"set {PG_ENV} to run on PostgreSQL"
)(SoundnessPostgres.TestCase)
TestSoundnessPostgres.settings = SOUNDNESS
