"""``scripts/make_example_data.py``: deterministic bytes, the S&P layout, the planted quirks."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pandas as pd
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "make_example_data.py"


@pytest.fixture(scope="module")
def script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_example_data", SCRIPT)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def test_same_arguments_same_bytes(script: ModuleType, tmp_path: Path):
    a, b, c = tmp_path / "a.csv.gz", tmp_path / "b.csv.gz", tmp_path / "c.csv.gz"
    assert script.main(["--out", str(a)]) == 0
    assert script.main(["--out", str(b)]) == 0
    assert script.main(["--out", str(c), "--seed", "1"]) == 0
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()


def test_layout_size_and_quirks(script: ModuleType, tmp_path: Path):
    out = tmp_path / "prices.csv.gz"
    script.main(["--out", str(out), "--symbols", "40", "--days", "260"])
    df = pd.read_csv(out, keep_default_na=False, na_values=[""])
    assert list(df.columns) == ["date", "open", "high", "low", "close", "volume", "Name"]
    assert df["Name"].nunique() == 40
    assert df["date"].max() == "2024-12-31" and df["date"].nunique() == 260
    assert pd.to_datetime(df["date"]).dt.day_of_week.max() <= 4  # weekdays only
    assert df.equals(df.sort_values(["Name", "date"]).reset_index(drop=True))
    assert not df.duplicated(["Name", "date"]).any()
    sizes = df.groupby("Name").size()
    assert sorted(sizes[sizes < 260].tolist()) == [156, 257]  # late listing, 3-day gap
    nulls = df[df["open"].isna()]
    assert len(nulls) == 1 and nulls["volume"].iloc[0] == 0 and nulls["high"].isna().all()
    assert df["close"].notna().all() and (df["close"] > 0).all()
    ok = df.dropna()
    assert (ok["low"] <= ok[["open", "close"]].min(axis=1)).all()
    assert (ok["high"] >= ok[["open", "close"]].max(axis=1)).all()


def test_rejects_a_degenerate_size(script: ModuleType, tmp_path: Path):
    with pytest.raises(SystemExit):
        script.main(["--out", str(tmp_path / "x.csv.gz"), "--days", "3"])
