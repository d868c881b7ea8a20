"""scripts/reference_sp500.py and the value check of scripts/bench_sp500.py on a tiny CSV.

The synthetic file has what the real one has and more: a bridged 2-date gap and a 7-date gap
(past ``max_gap``), a late listing, a null close and a non-positive one, a null high, swapped
high/low, a repeated (Name, date) and a flat series. The engine runs the real
``calculations/prices`` (copied by the benchmark's ``Project``) over it; every stored cell of
the 8 calculations must agree with the reference, and a perturbed reference value must be
caught.
"""

from __future__ import annotations

import datetime as dt
import gzip
import importlib.util
import math
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str) -> ModuleType:
    path = ROOT / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


reference = _load("reference_sp500")
bench = _load("bench_sp500")

DATES = [d.date().isoformat() for d in pd.bdate_range("2020-01-01", periods=45)]


def synthetic_rows() -> list[dict[str, object]]:
    """Rows of the tiny file, in file order (a repeated row comes after the first)."""
    rng = np.random.default_rng(7)
    rows: list[dict[str, object]] = []

    def bar(name: str, i: int, close: float | None, **over: object) -> dict[str, object]:
        c = 0.0 if close is None else close
        row = {"date": DATES[i], "open": c, "high": c * 1.01, "low": c * 0.99}
        row.update(close=close, volume=1000 + i, Name=name)
        row.update(over)
        return row

    walk = 50 * np.cumprod(1 + rng.normal(0, 0.02, len(DATES)))
    rows += [bar("AAA", i, float(walk[i])) for i in range(len(DATES))]
    rows.append(bar("AAA", 20, float(walk[20]) * 1.05))  # repeated: this one wins
    walk = 20 * np.cumprod(1 + rng.normal(0, 0.03, len(DATES)))
    gaps = {10, 11} | set(range(25, 32))  # 2 dates (bridged), then 7 (past max_gap = 5)
    for i in range(len(DATES)):
        if i in gaps:
            continue
        over: dict[str, object] = {}
        if i == 5:
            over = {"high": None}
        if i == 6:
            over = {"high": walk[i] * 0.98, "low": walk[i] * 1.02}  # swapped
        rows.append(bar("BBB", i, float(walk[i]), **over))
    walk = 5 * np.cumprod(1 + rng.normal(0, 0.01, len(DATES)))
    for i in range(8, len(DATES)):  # late listing
        close = None if i == 30 else (-1.0 if i == 36 else float(walk[i]))
        rows.append(bar("CCC", i, close))
    rows += [bar("FLAT", i, 10.0) for i in range(len(DATES))]
    return rows


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny") / "prices.csv.gz"
    frame = pd.DataFrame(
        synthetic_rows(), columns=["date", "open", "high", "low", "close", "volume", "Name"]
    )
    with gzip.open(path, "wt") as f:
        frame.to_csv(f, index=False)  # None -> empty field
    return path


@pytest.fixture(scope="module")
def tables(tiny: Path) -> dict[str, pd.DataFrame]:
    return reference.compute(reference.read_prices(tiny))


def _cell(tables: dict[str, pd.DataFrame], calc: str, date: int, name: str) -> pd.Series:
    t = tables[calc]
    hit = t[(t["date"].astype(str) == DATES[date]) & (t["Name"].astype(str) == name)]
    assert len(hit) == 1
    return hit.iloc[0]


def test_reference_follows_the_documented_definitions(tables: dict[str, pd.DataFrame]) -> None:
    """Hand-checked cells: gaps, nulls, repeats, warm-up, a flat series."""
    rows = [r for r in synthetic_rows() if r["Name"] == "BBB"]
    close = {r["date"]: r["close"] for r in rows}
    after_short = _cell(tables, "daily_return", 12, "BBB")  # 10, 11 missing: bridged
    assert after_short["prev_date"] == DATES[9]
    assert math.isclose(
        after_short["return"], close[DATES[12]] / close[DATES[9]] - 1, rel_tol=1e-15
    )
    assert pd.isna(_cell(tables, "daily_return", 32, "BBB")["return"])  # 25..31 missing
    assert _cell(tables, "volatility_20", 32, "BBB")["n_returns"] == 13  # 12..24 in [12, 32]
    repeated = [r for r in synthetic_rows() if r["Name"] == "AAA" and r["date"] == DATES[20]]
    assert _cell(tables, "drawdown", 20, "AAA")["close"] == repeated[-1]["close"]
    # A null close and a negative one: no close, no return; the next return skips them.
    assert pd.isna(_cell(tables, "daily_return", 30, "CCC")["close"])
    assert _cell(tables, "daily_return", 31, "CCC")["prev_date"] == DATES[29]
    assert pd.isna(_cell(tables, "daily_return", 36, "CCC")["close"])
    # RSI: a value on CCC's 15th consecutive valid bar (8..22), none right after the null
    # close of 30 (the run 31..35 is too short)
    assert pd.isna(_cell(tables, "rsi_14", 21, "CCC")["rsi"])
    assert not pd.isna(_cell(tables, "rsi_14", 22, "CCC")["rsi"])
    assert pd.isna(_cell(tables, "rsi_14", 35, "CCC")["rsi"])
    # Flat: warm-up of 14 bars, then RSI 100 (avg_loss 0), volatility 0, drawdown 0.
    assert pd.isna(_cell(tables, "rsi_14", 13, "FLAT")["rsi"])
    assert _cell(tables, "rsi_14", 14, "FLAT")["rsi"] == 100.0
    assert _cell(tables, "volatility_20", 30, "FLAT")["volatility"] == 0.0
    assert _cell(tables, "drawdown", 30, "FLAT")["drawdown"] == 0.0
    # ATR's first value on the 15th bar; the late listing's first tr is its own range.
    assert pd.isna(_cell(tables, "atr_14", 13, "AAA")["atr"])
    assert not pd.isna(_cell(tables, "atr_14", 14, "AAA")["atr"])
    first = next(r for r in synthetic_rows() if r["Name"] == "CCC")
    assert math.isclose(_cell(tables, "atr_14", 8, "CCC")["tr"], first["high"] - first["low"])
    # Ranks of a date in [0, 1], the n of that date's returns.
    ranks = tables["xs_rank"][tables["xs_rank"]["date"].astype(str) == DATES[3]]
    assert sorted(ranks["rank"]) == [0.0, 0.5, 1.0]  # CCC not listed yet; FLAT's return 0
    breadth = tables["breadth"].set_index(tables["breadth"]["date"].astype(str))
    assert breadth.loc[DATES[0], "without_return"] == 3  # everyone's first row


def test_every_stored_cell_agrees_with_the_reference(tiny: Path, tmp_path: Path) -> None:
    """The engine on the tiny file vs the reference, all cells, then one perturbed value."""
    project = bench.Project(tmp_path / "project", tiny, DATES[-1], 1, "columnar")
    assert reference.main(["--input", str(tiny), "--out", str(project.ref)]) == 0
    done = subprocess.run(
        project.orchestrator("run", "--date", DATES[-1]),
        cwd=project.root,
        check=False,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    summary = bench.parse_summary(done.stdout)
    assert summary is not None and summary["completed"] == 8 * len(DATES)
    everything = 10**6  # more than any table: every row is checked
    values = bench.check_values(project, everything)
    assert values["disagreements"] == []
    assert set(values["by_calc"]) == {*bench.STANDARD, *bench.META}
    tabs = reference.read(project.ref)
    sizes = {c: len(tabs[c]) for c in (*bench.STANDARD, "xs_rank", "breadth")}
    checked = {c: v[1] for c, v in values["by_calc"].items()}
    # every row once, plus the standard tables' re-seed sample
    assert {c: checked[c] for c in bench.META} == {c: sizes[c] for c in bench.META}
    extra = sum(checked[c] - sizes[c] for c in bench.STANDARD)
    assert extra == values["edge"][1] > 0
    assert values["share"] == 1.0

    rsi = tabs["rsi_14"]
    at = int(np.flatnonzero(rsi["rsi"].notna().to_numpy())[0])
    rsi.loc[at, "rsi"] *= 1 + 1e-8  # past rtol 1e-9
    rsi.to_parquet(project.ref / "rsi_14.parquet", index=False)
    values = bench.check_values(project, everything)
    assert values["agree"] == values["checked"] - 1
    assert [(d["calc"], d["fields"]) for d in values["disagreements"]] == [("rsi_14", ["rsi"])]


def test_agree_rules() -> None:
    assert bench.agree(None, float("nan")) and bench.agree(float("nan"), None)
    assert not bench.agree(None, 0.0) and not bench.agree(1.0, None)
    assert bench.agree(1.0, 1.0 + 5e-10) and not bench.agree(1.0, 1.0 + 5e-9)
    assert bench.agree(3e-13, 0.0)  # rounding around 0
    assert bench.agree("2020-01-01", "2020-01-01") and not bench.agree("2020-01-01", "2020-01-02")
    assert bench.agree(3, 3) and not bench.agree(3, 4)
    assert bench.compare_cell(None, {"a": 1.0}) == ["<no stored result>"]
    assert bench.compare_cell({"a": 1.0, "b": 2}, {"a": 1.0}) == ["+b"]


def test_project_config_points_at_the_copies(tiny: Path, tmp_path: Path) -> None:
    import tomllib

    project = bench.Project(tmp_path / "p", tiny, DATES[-1], 3, "per-user")
    config = tomllib.loads(project.config.read_text())
    assert config["workers"] == 3 and config["columnar"] is False
    assert config["calculations"] == str(project.package)
    assert config["root_data"]["prices"]["path"] == str(tiny)
    assert config["database_url"] == f"sqlite:///{project.root / 'ledger.db'}"
    project.set_rsi_period(15)
    assert "    period = 15\n" in project.wilder.read_text()
    assert (ROOT / "calculations" / "prices" / "wilder.py").read_text().count("period = 15") == 0
    project.set_rsi_period(14)
    assert (
        project.wilder.read_text() == (ROOT / "calculations" / "prices" / "wilder.py").read_text()
    )
    assert dt.date.fromisoformat(project.date) == dt.date.fromisoformat(DATES[-1])
