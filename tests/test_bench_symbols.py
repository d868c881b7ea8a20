"""scripts/bench_symbols.py: seed 003's benchmark (symbols × dates × 4 indicators).

The end-to-end test runs the script tiny (20 symbols × 63 dates) in both calculation forms and
checks what it reports: the cold run computes 4 cells per date, the re-run none, and every
stored value equals the independent pandas reference. The two forms must store the same bits:
their ledgers hold equal result hashes cell by cell. The checker itself must catch a wrong
value, and the generator's bars are consistent for any seed and size.
"""

from __future__ import annotations

import datetime as dt
import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "bench_symbols.py"
SYMBOLS, YEARS = 20, 0.25
DAYS = round(YEARS * 252)


def _load(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


bench = _load(SCRIPT, "bench_symbols")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[dict, Path]]:
    """Both styles run once, tiny, each with its work directory kept."""
    out = {}
    for style in bench.STYLES:
        keep = tmp_path_factory.mktemp(style)
        done = subprocess.run(
            [
                sys.executable,
                str(SCRIPT),
                "--symbols",
                str(SYMBOLS),
                "--years",
                str(YEARS),
                "--style",
                style,
                "--check-all",
                "--json",
                "--keep",
                str(keep),
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        out[style] = (json.loads(done.stdout.strip().splitlines()[-1]), keep)
    return out


@pytest.mark.parametrize("style", bench.STYLES)
def test_tiny_run_is_complete_and_exact(runs: dict, style: str) -> None:
    report, _ = runs[style]
    assert report["style"] == style and report["dates"] == DAYS
    assert report["values_ok"] and report["ok"], report
    assert report["cells"] == report["expected_cells"] == 4 * DAYS
    assert report["noop_cells"] == 0
    assert report["exit_codes"] == [0, 0]
    # --check-all: every field of every symbol on every date
    fields = sum(len(f) for f in bench.FIELDS.values())
    assert report["checked"]["cells"] == 4 * DAYS
    assert report["checked"]["values"] == fields * SYMBOLS * DAYS
    for key in ("wall_s", "noop_s", "reference_s", "peak_rss_mb", "ratio"):
        assert report[key] > 0


def _hashes(keep: Path) -> dict[str, dict[dt.date, str | None]]:
    from orchestrator.app import Orchestrator

    orch = Orchestrator.from_config(keep / "orchestrator.toml")
    try:
        return orch.ledger.load_result_hashes(bench.FIELDS)
    finally:
        orch.close()


def test_both_forms_store_the_same_bits(runs: dict) -> None:
    columnar = _hashes(runs["columnar"][1])
    per_user = _hashes(runs["per-user"][1])
    assert sorted(columnar) == sorted(bench.FIELDS)
    for calc in bench.FIELDS:
        assert len(columnar[calc]) == DAYS
        assert None not in columnar[calc].values()
        assert columnar[calc] == per_user[calc], calc


def _stored(keep: Path, calc: str, field: str) -> np.ndarray:
    from orchestrator.app import Orchestrator
    from orchestrator.results import decode_tables

    with np.load(keep / "data" / "reference.npz") as npz:
        dates = [dt.date.fromisoformat(d) for d in npz["dates"].tolist()]
    orch = Orchestrator.from_config(keep / "orchestrator.toml")
    try:
        payloads = orch.ledger.shard_payloads_many([(calc, d) for d in dates])
        return np.vstack(
            [decode_tables(payloads[(calc, d)]).columns[field].floats() for d in dates]
        )
    finally:
        orch.close()


def test_warm_up_and_seeds(runs: dict) -> None:
    """The stated seeding: EMA(20) starts at t = 19 from the SMA of the first 20 closes
    (the same bits), RSI and ATR at t = 14; nothing is defined before."""
    keep = runs["columnar"][1]
    sma, ema = _stored(keep, "sma_20", "sma"), _stored(keep, "ema_20", "ema")
    rsi, atr = _stored(keep, "rsi_14", "rsi"), _stored(keep, "atr_14", "atr")
    assert np.isnan(sma[:19]).all() and np.isnan(ema[:19]).all()
    assert np.array_equal(ema[19], sma[19]) and not np.isnan(ema[19]).any()
    assert not np.array_equal(ema[20], sma[20])
    assert np.isnan(rsi[:14]).all() and np.isnan(atr[:14]).all()
    assert not np.isnan(rsi[14:]).any() and not np.isnan(atr[14:]).any()
    assert ((rsi[14:] > 0) & (rsi[14:] < 100)).all() and (atr[14:] > 0).all()


def test_checker_catches_a_wrong_value(runs: dict) -> None:
    keep = runs["per-user"][1]
    with np.load(keep / "data" / "reference.npz") as npz:
        ref = {k: npz[k] for k in npz.files}
    rows = list(range(DAYS))
    assert bench.check_values(keep / "orchestrator.toml", ref, rows)[0] == []
    ref["atr"] = ref["atr"].copy()
    ref["atr"][40, 3] *= 1 + 1e-11  # beyond rtol 1e-12
    ref["ema"] = ref["ema"].copy()
    ref["ema"][5, 0] = 1.0  # a value where the stored result is null
    problems, cells, _ = bench.check_values(keep / "orchestrator.toml", ref, rows)
    assert cells == 4 * DAYS
    assert len(problems) == 2
    assert problems[0].startswith("ema_20.ema: 1 value(s) differ")
    assert problems[1].startswith("atr_14.atr: 1 value(s) differ")


def test_compare_tolerance() -> None:
    want = np.array([1.0, np.nan, 100.0])
    assert bench.compare("x", want * (1 + 5e-13), want) is None
    assert bench.compare("x", want * (1 + 5e-12), want) is not None
    assert bench.compare("x", np.array([1.0, 0.0, 100.0]), want) is not None


@settings(max_examples=25, deadline=None)
@given(
    symbols=st.integers(1, 12),
    days=st.integers(1, 300),
    seed=st.integers(0, 2**32 - 1),
)
def test_generated_bars_are_consistent(symbols: int, days: int, seed: int) -> None:
    data = bench.generate(symbols, days, seed)
    o, h, lo, c = (data[k] for k in ("open", "high", "low", "close"))
    assert o.shape == h.shape == lo.shape == c.shape == (days, symbols)
    assert (h >= np.maximum(o, c)).all() and (lo <= np.minimum(o, c)).all()
    assert (lo > 0).all() and (data["volume"] > 0).all()
    assert np.array_equal(np.round(c, 2), c)  # cents
    assert data["symbols"].tolist() == sorted(data["symbols"].tolist())
    dates = data["dates"].tolist()
    assert dates == sorted(set(dates)) and dates[0] == bench.FIRST_DATE
    assert all(dt.date.fromisoformat(d).weekday() < 5 for d in dates)
    again = bench.generate(symbols, days, seed)
    assert all(np.array_equal(data[k], again[k]) for k in data)


def test_forms_agree_on_bars_with_gaps(tmp_path: Path) -> None:
    """Symbols missing bars (a gap restarts the state from the window; a symbol listed late,
    one delisted early): both forms still store the same bits, and the state restarts."""
    data = bench.generate(6, 60, seed=7)
    rng = np.random.Generator(np.random.PCG64(8))
    keep = rng.random((60, 6)) > 0.04  # random gaps for S0004, S0005
    keep[:, :4] = True
    keep[:25, 1] = False  # listed late
    keep[40:, 2] = False  # delisted
    keep[30, 3] = False  # one gap: EMA restarts 20 bars later, RSI and ATR 15 later
    lines = ["date,open,high,low,close,volume,symbol"]
    for t, date in enumerate(data["dates"].tolist()):
        for s, sym in enumerate(data["symbols"].tolist()):
            if keep[t, s]:
                o, h, lo, c = (float(data[k][t, s]) for k in ("open", "high", "low", "close"))
                lines.append(f"{date},{o!r},{h!r},{lo!r},{c!r},{data['volume'][t, s]},{sym}")
    hashes = {}
    last = data["dates"][-1]
    for style in bench.STYLES:
        project = bench.Project(tmp_path / style)
        project.csv.parent.mkdir(parents=True)
        project.csv.write_text("\n".join(lines) + "\n")
        project.write(style, 1, 16)  # several historical blocks
        done = subprocess.run(
            [bench.orchestrator_exe(), "--config", str(project.config), "run", "--date", last],
            capture_output=True,
            text=True,
            check=False,
        )
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        hashes[style] = _hashes(project.root)
    assert hashes["columnar"] == hashes["per-user"]
    ema = _stored_by_date(tmp_path / "columnar", "ema_20", "ema", data["dates"].tolist())
    sym3 = ema["S0003"]
    assert not np.isnan(sym3[29]) and np.isnan(sym3[30:50]).all() and not np.isnan(sym3[50])
    assert np.isnan(ema["S0001"][:44]).all() and not np.isnan(ema["S0001"][44])
    assert not np.isnan(ema["S0002"][19:40]).any() and np.isnan(ema["S0002"][40:]).all()
    atr = _stored_by_date(tmp_path / "per-user", "atr_14", "atr", data["dates"].tolist())
    assert np.isnan(atr["S0003"][30:45]).all() and not np.isnan(atr["S0003"][45:]).any()


def _stored_by_date(root: Path, calc: str, field: str, dates: list[str]) -> dict[str, np.ndarray]:
    """symbol -> (dates,) stored values of ``field`` (NaN: null or no result that date)."""
    from orchestrator.app import Orchestrator
    from orchestrator.results import decode_tables

    days = [dt.date.fromisoformat(d) for d in dates]
    orch = Orchestrator.from_config(root / "orchestrator.toml")
    try:
        payloads = orch.ledger.shard_payloads_many([(calc, d) for d in days])
    finally:
        orch.close()
    out: dict[str, np.ndarray] = {}
    for t, d in enumerate(days):
        if (calc, d) not in payloads:
            continue
        table = decode_tables(payloads[(calc, d)])
        for user, value in zip(table.users, table.columns[field].floats().tolist(), strict=True):
            out.setdefault(user, np.full(len(days), np.nan))[t] = value
    return out
