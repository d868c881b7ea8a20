"""Both forms of every shipped columnar calculation publish the same results, cell by cell.

A calculation with a columnar form (``compute(frame)``) keeps its per-user form
(``process(ctx)``); the engine runs ``compute`` unless the config says ``columnar = false``,
and the form enters no fingerprint, so the two must publish the same result hash on every
input (``orchestrator/calculation.py``). Each test here builds the same project twice from
scratch, once per form, and compares every cell's result hash:

* a hand-made panel with the hard cases of price data (instruments listing late and
  delisting, gaps of 1-3 dates and longer than ``daily_return.max_gap``, null, zero and
  negative closes, null and swapped high/low, a flat series, a repeated (Name, date) row, a
  malformed value) over 70 dates, so every lookback window fills;
* a Hypothesis property test over random small panels (gaps, nulls and bad closes drawn).

The hashes are over IEEE bits, so equal hashes mean the two forms did the same arithmetic in
the same order. The values themselves are checked against independent references in
``test_calculations_values.py``.
"""

from __future__ import annotations

import datetime as dt
import importlib
import inspect
import math
import pkgutil
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import Project, scratch_project, weekdays

# Every shipped calculation package whose calculations have a columnar form.
PACKAGES = ["calculations.prices"]
DATES = weekdays(dt.date(2024, 1, 1), 70)
MAX_GAP = 5  # daily_return.max_gap: a longer gap is not bridged
QUIRKY = ["BBB", "CCC", "DDD", "EEE", "FFF", "GGG", "III", "JJJ", "KKK"]  # and HHH
PLAIN = ["AAA", "LLL", "MMM", "NNN", "OOO", "PPP", "QQQ", "RRR", "SSS"]


def test_every_shipped_package_with_columnar_calculations_is_covered() -> None:
    import calculations

    columnar = set()
    for package in pkgutil.iter_modules(calculations.__path__, "calculations."):
        for module in pkgutil.walk_packages(
            importlib.import_module(package.name).__path__, package.name + "."
        ):
            for _, cls in inspect.getmembers(importlib.import_module(module.name), inspect.isclass):
                if callable(getattr(cls, "compute", None)) and cls.__module__ == module.name:
                    columnar.add(package.name)
    assert columnar and columnar <= set(PACKAGES), columnar


def bar(name: str, day: dt.date, close: Any, spread: float = 1.0) -> dict[str, Any]:
    """One OHLCV row; ``close`` None is a null close (an empty field), a str is kept as text."""
    number = close if isinstance(close, float) else None
    return {
        "date": day.isoformat(),
        "open": None if number is None else round(number - 0.25, 4),
        "high": None if number is None else round(number + spread, 4),
        "low": None if number is None else round(number - spread, 4),
        "close": close,
        "volume": 1000,
        "Name": name,
    }


def walk(i: int, d: int) -> float:
    """A deterministic, wiggly, instrument-specific close (no randomness to seed)."""
    return round(40.0 + 6.0 * i + 4.0 * math.sin(0.45 * d * (i + 1)) + 0.05 * d * (i % 3 - 1), 4)


def hard_rows() -> list[dict[str, Any]]:
    """19 instruments over ``DATES``, most with a quirk (see the module docstring); enough
    plain ones that the one failing user stays under ``max_failure_rate`` (10 %)."""
    rows: list[dict[str, Any]] = []
    n = len(DATES)
    for i, name in enumerate(PLAIN[:3] + QUIRKY + PLAIN[3:]):
        skip: set[int] = set()
        if name == "BBB":  # gaps of 1, 2 and 3 dates (bridged), then one of 8 (not)
            skip = {10, 20, 21, 30, 31, 32, *range(44, 52)}
        if name == "CCC":  # listed on the 25th date
            skip = set(range(24))
        if name == "DDD":  # delisted after the 40th date
            skip = set(range(40, n))
        if name == "FFF":  # flat later on (see below), re-seeded on flat bars after a gap
            skip = {40}
        if name == "III":  # gaps of MAX_GAP - 1 dates (bridged), MAX_GAP (not) and 13
            skip = {*range(15, 15 + MAX_GAP - 1), *range(30, 30 + MAX_GAP), *range(45, 58)}
        for d, day in enumerate(DATES):
            if d in skip:
                continue
            close: Any = walk(i, d)
            spread = 1.0
            if name == "EEE":  # null closes, a zero close, a negative close
                close = {5: None, 6: None, 18: 0.0, 33: -3.5, 34: None}.get(d, close)
            if name == "FFF" and d >= 16:  # flat from the 17th date: RSI 100, volatility 0
                close = 55.0
            if name == "GGG" and d == 30:  # swapped high/low
                spread = -1.0
            row = bar(name, day, close, spread)
            if name == "GGG" and d in (12, 13):  # null high/low (close-only bars)
                row["high"] = row["low"] = None
            rows.append(row)
    # HHH: listed late on a null close (no component of the risk score: no result), then a
    # gap, back on a null close again, then plain.
    for d in [*range(28, 31), *range(38, len(DATES))]:
        rows.append(bar("HHH", DATES[d], None if d in (28, 38) else walk(7, d)))
    # JJJ: one date repeated with a different close; the last row of the date counts.
    rows.append(bar("JJJ", DATES[22], 123.25))
    # KKK: a malformed close on one date (its user fails that date and the windows over it).
    for row in rows:
        if row["Name"] == "KKK" and row["date"] == DATES[50].isoformat():
            row["close"] = "1.2.3"
    return rows


def build(
    project: Project,
    rows: list[dict[str, Any]],
    package: str,
    columnar: bool,
    block_dates: int | None = None,
) -> Any:
    """Write ``rows`` and a config running ``package`` in one form (columnar: in blocks of
    ``block_dates``, None for the default), run every date, and return the run's summary."""
    project.write_prices(rows)
    project.extra_config = (
        ("" if block_dates is None else f"block_dates = {block_dates}\n")
        if columnar
        else "columnar = false\n"
    )
    project.package = package
    project.write_config()
    return project.run(max(dt.date.fromisoformat(r["date"]) for r in rows))


def columnar_names(project: Project) -> dict[str, bool]:
    """calculation name -> whether the engine sees a columnar form (``spec.columnar``)."""
    orch = project.orchestrator()
    try:
        return {name: spec.columnar for name, spec in orch.manifest.calcs.items()}
    finally:
        orch.close()


def both_forms(
    columnar: Project,
    per_user: Project,
    rows: list[dict[str, Any]],
    package: str,
    block_dates: int | None = None,
) -> tuple[dict[Any, str | None], dict[Any, str | None], Any]:
    """Result hashes of the columnar build in ``columnar`` and the per-user one in
    ``per_user``, and the columnar run's summary; the two runs' outcomes must agree."""
    first = build(columnar, rows, package, columnar=True, block_dates=block_dates)
    second = build(per_user, rows, package, columnar=False)
    assert (first.ok, first.exit_code) == (second.ok, second.exit_code)
    assert sorted(first.failed) == sorted(second.failed)
    return columnar.result_hashes(), per_user.result_hashes(), first


def assert_same_hashes(a: dict[Any, str | None], b: dict[Any, str | None]) -> None:
    assert sorted(a) == sorted(b)
    differ = sorted(key for key in a if a[key] != b[key])
    assert not differ, f"{len(differ)} cells differ between the forms, first {differ[:5]}"


@pytest.mark.parametrize("package", PACKAGES)
# One block for all dates; blocks of 7, so that state crosses blocks through stored results.
@pytest.mark.parametrize("block_dates", [None, 7], ids=["one_block", "blocks_of_7"])
def test_both_forms_publish_the_same_hashes_on_the_hard_cases(
    project: Project, tmp_path: Path, package: str, block_dates: int | None
) -> None:
    rows = hard_rows()
    per_user = scratch_project(tmp_path, "per_user")
    col, ref, summary = both_forms(project, per_user, rows, package, block_dates)

    forms = columnar_names(project)
    assert forms and all(forms.values()), forms  # every calculation really runs in blocks
    assert_same_hashes(col, ref)
    # Every cell is published but around KKK's malformed row: it fails KKK in daily_return's
    # window (6 dates), a meta calculation fails on a date a dependency has a failed user
    # (xs_rank, breadth), and risk_score waits for xs_rank there.
    around = {(name, day) for name in ("xs_rank", "breadth", "risk_score") for day in DATES[50:56]}
    unpublished = {(n, d) for n in forms for d in DATES} - {k for k, h in col.items() if h}
    assert unpublished <= around and len(col) > 0.9 * len(forms) * len(DATES)
    assert not summary.ok

    # The hard cases really happened (in the columnar results, equal to the per-user ones).
    orch = project.orchestrator()
    try:
        ret = {d: orch.load_result("daily_return", d) for d in DATES}
        assert ret[DATES[33]]["BBB"]["prev_date"] == DATES[29].isoformat()  # a 3-date gap
        assert ret[DATES[52]]["BBB"]["return"] is None  # after 8 dates missed
        assert ret[DATES[19]]["III"]["prev_date"] == DATES[14].isoformat()
        assert ret[DATES[35]]["III"]["return"] is None and "III" not in ret[DATES[34]]
        assert ret[DATES[18]]["EEE"]["close"] is None  # a zero close counts as missing
        assert ret[DATES[22]]["JJJ"]["close"] == 123.25  # the repeated row's last one
        assert "__failed__" in orch.load_result("drawdown", DATES[50])["KKK"]
        score = orch.load_result("risk_score", DATES[28])
        assert "HHH" not in score and "CCC" in score  # no component: no result
        assert orch.load_result("rsi_14", DATES[69])["FFF"]["rsi"] == 100.0
        assert orch.load_result("volatility_20", DATES[69])["FFF"]["volatility"] == 0.0
    finally:
        orch.close()


# --- property: random small panels -----------------------------------------------------------

SYMBOLS = ["A", "B", "C", "D", "E", "F"]


@st.composite
def panels(draw: st.DrawFn) -> list[dict[str, Any]]:
    """3-6 instruments over 20-45 dates, each with its own first and last date, single
    missed dates and now and then a run of them (up to ``MAX_GAP + 3``), and closes that are
    mostly a random walk, sometimes unchanged (ties), null, zero or negative; some bars have
    a null or swapped high/low, some dates a second row of the instrument.

    At most half of a date's closes are missing: more would fail validation (a non-nullable
    ``close`` null for over 50 % of the users), and a failed cell inside a historical block is
    where the engine's two forms part (``test_a_failed_cell_stops_a_historical_block``)."""
    n = draw(st.integers(20, 45))
    rows = []
    for name in SYMBOLS[: draw(st.integers(3, len(SYMBOLS)))]:
        start = draw(st.integers(0, n // 2))
        stop = draw(st.integers(start + 1, n))
        gaps = draw(st.sets(st.integers(start, stop - 1), max_size=(stop - start) // 3))
        if draw(st.booleans()):
            at = draw(st.integers(start, stop - 1))
            gaps |= set(range(at, min(stop, at + draw(st.integers(1, MAX_GAP + 3)))))
        level = last = draw(st.floats(5.0, 200.0))
        for d in range(start, stop):
            if d in gaps:
                continue
            kind = draw(st.integers(0, 19))
            close: float | None
            if kind <= 2:
                close = [None, 0.0, -1.5][kind]
            elif kind == 3:
                close = last
            else:
                level = max(1.0, level * (1.0 + draw(st.floats(-0.08, 0.08))))
                close = last = round(level, 3)
            row = bar(name, DATES[d], close, spread=draw(st.sampled_from([1.0, 0.5, -0.5])))
            if draw(st.integers(0, 9)) == 0:
                row["high"] = row["low"] = None
            rows.append(row)
            if draw(st.integers(0, 19)) == 0:  # a repeated (Name, date), just as (in)valid
                again = round(close * 1.01, 3) if close is not None and close > 0 else None
                rows.append(bar(name, DATES[d], again))
    by_date: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for row in rows:
        by_date.setdefault(row["date"], {}).setdefault(row["Name"], []).append(row)
    for day in by_date.values():
        missing = [
            bars
            for bars in day.values()
            if not (isinstance(bars[0]["close"], float) and bars[0]["close"] > 0)
        ]
        for bars in missing[: max(0, len(missing) - len(day) // 2)]:
            for row in bars:
                row.update(bar(row["Name"], dt.date.fromisoformat(row["date"]), 10.0))
    return rows


# CI's budget, unless a longer profile was chosen (--hypothesis-profile=long, conftest.py).
_ACTIVE = settings()
PANELS = (
    _ACTIVE if _ACTIVE.max_examples > 100 else settings(_ACTIVE, max_examples=10, deadline=None)
)


@pytest.mark.parametrize("package", PACKAGES)
@settings(
    PANELS,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(rows=panels(), block_dates=st.sampled_from([1, 3, 16, None]))
def test_both_forms_publish_the_same_hashes_on_random_panels(
    tmp_path_factory: pytest.TempPathFactory,
    package: str,
    rows: list[dict[str, Any]],
    block_dates: int | None,
) -> None:
    tmp = tmp_path_factory.mktemp("panel")
    col, ref, summary = both_forms(
        scratch_project(tmp, "columnar"),
        scratch_project(tmp, "per_user"),
        rows,
        package,
        block_dates,
    )
    assert summary.ok and all(h is not None for h in col.values())  # every cell published
    assert_same_hashes(col, ref)


# --- where the engine's forms part ------------------------------------------------------------


def test_a_failed_cell_stops_a_historical_block(tmp_path: Path) -> None:
    # Three instruments over 8 dates; on the 4th two closes are null: drawdown's `close` is
    # null for 2 of 3 users (> 50 %), so that cell fails validation.
    rows = [
        bar(name, day, None if d == 3 and name != "A" else walk(i, d))
        for i, name in enumerate("ABC")
        for d, day in enumerate(DATES[:8])
    ]
    col, ref, _ = both_forms(
        scratch_project(tmp_path, "columnar"),
        scratch_project(tmp_path, "per_user"),
        rows,
        PACKAGES[0],
    )
    assert ref[("drawdown", DATES[3])] is None and ("drawdown", DATES[4]) not in ref  # blocked
    assert_same_hashes(col, ref)
