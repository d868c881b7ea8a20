"""scripts/bench_workload.py: the WORKLOAD.md benchmark on our orchestrator.

The end-to-end tests run the script on a tiny input (5 symbols × 30 dates) in both calculation
forms and check what it reports against WORKLOAD.md's rules: every stored value equals the
independent reference, and each scenario re-executes exactly its ideal number of cells
(A = 8·D, B0 = 0, C = D + 2·(D - 14) — rsi_14 everywhere, then risk_score and market_summary
where rsi_14 changed, t >= 14 —, E = D: returns only, early cutoff stops the rest).
"""

from __future__ import annotations

import ast
import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "bench_workload.py"


def _load(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


bench = _load(SCRIPT, "bench_workload")
columnar = _load(ROOT / "scripts" / "workload" / "columnar.py", "workload_columnar")
per_user = _load(ROOT / "scripts" / "workload" / "per_user.py", "workload_per_user")

DAYS = 30
IDEAL = {"A": 8 * DAYS, "B0": 0, "C": DAYS + 2 * (DAYS - 14), "E": DAYS}


def test_small_reference_matches_workload_checksums() -> None:
    """The generator (in WORKLOAD.md's RNG order) and the reference reproduce its table."""
    data = bench.generate(100, 250)
    assert data["dates"][0] == "2024-01-01" and data["dates"][-1] == "2024-12-13"
    sums = bench.checksums(bench.reference(data["close"]))
    assert bench.checksum_problems(100, 250, sums) == []
    sums["rsi_14"] = (sums["rsi_14"][0] * (1 + 1e-8), sums["rsi_14"][1])
    assert len(bench.checksum_problems(100, 250, sums)) == 1


def test_ideal_cells_are_workload_md_figures() -> None:
    got = {s: bench.ideal_cells(s, 250) for s in bench.SCENARIOS}
    assert got == {"A": 2000, "B0": 0, "B": 0, "C": 722, "D": 0, "E": 250, "R": 0}


@pytest.mark.parametrize("template", [columnar, per_user], ids=["columnar", "per-user"])
def test_templates_define_the_workload_dag(template: ModuleType) -> None:
    from orchestrator.calculation import Calculation

    calcs = {
        c.name: c
        for c in vars(template).values()
        if isinstance(c, type) and issubclass(c, Calculation) and c.name
    }
    assert sorted(calcs) == sorted(bench.CALCS)
    assert dict(calcs["volatility_20"].dependencies) == {"returns": 20}
    assert {calcs["breadth"].kind, calcs["market_summary"].kind} == {"meta"}
    assert set(calcs["risk_score"].dependencies) == {"volatility_20", "rsi_14", "xs_rank"}
    assert calcs["rsi_14"].period == 14


@pytest.mark.parametrize("style", sorted(bench.TEMPLATES))
def test_scenario_edits_match_once_and_do_what_they_say(style: str) -> None:
    text = bench.TEMPLATES[style].read_text()
    tree = ast.dump(ast.parse(text))
    c, d, e = (bench.edited(text, s) for s in "CDE")
    assert "period = 15" in c and ast.dump(ast.parse(c)) != tree
    # D only adds comments and a blank line: the same syntax tree, three more lines.
    assert ast.dump(ast.parse(d)) == tree and d.count("\n") == text.count("\n") + 2
    assert "np.subtract(ratio, 1.0)" in e and "cur / prev" not in e
    compile(e, "e.py", "exec")
    with pytest.raises(ValueError, match="exactly once"):
        bench.edited(c, "C")  # the period line is gone


@given(
    before=st.lists(st.sampled_from(["x = 1", "  y = 2", "", "# period = 14 later"]), max_size=4),
    after=st.lists(st.sampled_from(["z = 3", "\tw = 4", ""]), max_size=4),
    pad=st.sampled_from(["", "    ", "\t\t"]),
)
def test_replace_line_touches_only_the_exact_line(
    before: list[str], after: list[str], pad: str
) -> None:
    text = "\n".join([*before, pad + "period = 14", *after]) + "\n"
    out = bench.replace_line(text, "period = 14", ["# c", "", "period = 14  # t"])
    assert out == "\n".join([*before, pad + "# c", "", pad + "period = 14  # t", *after]) + "\n"
    with pytest.raises(ValueError, match="found 2"):
        bench.replace_line(text + pad + "period = 14\n", "period = 14", ["period = 15"])
    with pytest.raises(ValueError, match="found 0"):
        bench.replace_line(text, "period = 1", ["period = 15"])


def _run(style: str, keep: Path) -> list[dict]:
    cmd = [sys.executable, str(SCRIPT), "--symbols", "5", "--days", str(DAYS), "--style", style]
    cmd += ["--scenarios", "A,B0,C,E", "--reps", "1", "--json", "--keep", str(keep)]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=120, cwd=ROOT)
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return lines


@pytest.mark.parametrize("style", sorted(bench.TEMPLATES))
def test_tiny_run_matches_reference_and_ideal_cells(style: str, tmp_path: Path) -> None:
    lines = _run(style, tmp_path)
    ref, *scenarios = lines
    assert ref["scenario"] == "reference" and ref["wall_s"] > 0
    assert [s["scenario"] for s in scenarios] == list(IDEAL)
    for s in scenarios:
        assert s["style"] == style and s["exit_codes"] == [0]
        assert s["values_ok"], s["value_problems"]
        assert s["ideal_cells"] == IDEAL[s["scenario"]]
        assert s["cells"] == IDEAL[s["scenario"]], s["cells_by_calc"]
        assert s["ratio"] == pytest.approx(s["wall_s"] / s["reference_s"], rel=0.02)
    by_scenario = {s["scenario"]: s for s in scenarios}
    assert by_scenario["E"]["cells_by_calc"] == {"returns": DAYS}
    assert by_scenario["C"]["cells_by_calc"] == {
        "market_summary": DAYS - 14,
        "risk_score": DAYS - 14,
        "rsi_14": DAYS,
    }
    # The value check can fail: the state after E (period 14) is not the period-15 world.
    data = bench.generate(5, DAYS)
    wrong = bench.check_values(
        tmp_path / "orchestrator.toml", data, bench.reference(data["close"], 15)
    )
    assert any(p.startswith("rsi_14:") for p in wrong)
    assert any(p.startswith("risk_score:") for p in wrong)
    assert (
        bench.check_values(tmp_path / "orchestrator.toml", data, bench.reference(data["close"]))
        == []
    )
    assert np.isfinite(ref["compute_s"])
