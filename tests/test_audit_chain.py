"""The audit chain: re-run exactly what changed, and say why (SQLite and PostgreSQL).

Layers (helper modules a calculation imports), explanations that name the changed
definition, scoped epochs with reasons, category migration without recomputation, and the
provenance behind ``orchestrator why``.
"""

from __future__ import annotations

import datetime as dt
import itertools
import os
from pathlib import Path

import pytest

from orchestrator.lineage import trace
from orchestrator.planning import Reason
from orchestrator.simulation import SIM_DATES
from tests.conftest import Project, price_rows, weekdays

DATES = weekdays(dt.date(2024, 3, 1), 6)
TARGET = DATES[-1]

STATS = """
SCALE = 2


def mean(values):
    return sum(values) / len(values) * SCALE / 2


def spread(values):
    return max(values) - min(values)


def unused(values):
    return None
"""

CALCS = """
import os

from orchestrator import MetaCalculation, StandardCalculation

from {pkg}.layers.stats import mean
from {pkg}.layers import stats


def _log(name, ctx):
    # Every real computation leaves a line, like the peers' $PEERS_EXEC_LOG.
    with open(os.environ["EXEC_LOG"], "a") as f:
        f.write(f"{{name}},{{ctx.date}}\\n")


class Level(StandardCalculation):
    name = "level"
    category = "signals"
    root_data = ["prices"]
    lookback = 3

    def process(self, ctx):
        _log(self.name, ctx)
        closes = [r["close"] for r in ctx.history["prices"]]
        return {{"mean": mean(closes)}}


class Range(StandardCalculation):
    name = "range"
    category = "signals"
    root_data = ["prices"]
    lookback = 3

    def process(self, ctx):
        _log(self.name, ctx)
        return {{"spread": stats.spread([r["close"] for r in ctx.history["prices"]])}}


class Board(MetaCalculation):
    name = "board"
    category = "market"
    dependencies = ["level", "range"]

    def process(self, ctx):
        _log(self.name, ctx)
        return {{"n": len(ctx.upstream["level"]), "top": max(ctx.upstream["range"].values(),
                 key=lambda r: r["spread"])["spread"]}}
"""


@pytest.fixture
def exec_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "exec.log"
    path.write_text("")
    monkeypatch.setenv("EXEC_LOG", str(path))
    return path


_versions = itertools.count()


def write(project: Project, stats: str = STATS, calcs: str = CALCS) -> None:
    # A fresh package name per version: sys.modules caches imports by name.
    name = f"audit_{os.getpid()}_{next(_versions)}"
    pkg = project.root / name
    (pkg / "layers").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "layers" / "__init__.py").write_text("")
    (pkg / "layers" / "stats.py").write_text(stats)
    (pkg / "main.py").write_text(calcs.format(pkg=name))
    project.package = name
    project.write_config()


def executed(log: Path) -> dict[str, int]:
    """Cells really computed since the last call (a standard cell logs once per user; the
    simulation's fabricated dates do not count)."""
    counts: dict[str, int] = {}
    simulated = {d.isoformat() for d in SIM_DATES}
    for line in set(log.read_text().splitlines()):
        if line.split(",")[1] in simulated:
            continue
        calc = line.split(",")[0]
        counts[calc] = counts.get(calc, 0) + 1
    log.write_text("")
    return counts


@pytest.fixture
def built(project: Project, exec_log: Path) -> Project:
    project.write_prices(price_rows(["AAA", "BBB"], DATES))
    write(project)
    project.run(TARGET)
    assert executed(exec_log) == {"level": 6, "range": 6, "board": 6}
    return project


def test_changing_a_helper_reruns_exactly_its_users_and_names_it(built: Project, exec_log) -> None:
    write(
        built,
        STATS.replace("return max(values) - min(values)", "return max(values) - min(values) + 0"),
    )
    p = built.plan(TARGET)
    assert {p.decisions[("range", d)].reason for d in DATES} == {Reason.LAYER_CHANGED}
    assert p.decisions[("range", TARGET)].detail == "changed layers.stats:spread"
    assert {p.decisions[("level", d)].reason for d in DATES} == {Reason.UP_TO_DATE}
    built.run(TARGET)
    # spread + 0 gives the same numbers: range re-runs, the board is cut off.
    assert executed(exec_log) == {"range": 6}


def test_changing_an_unused_helper_reruns_nothing(built: Project, exec_log) -> None:
    write(built, STATS.replace("return None", "return 0"))
    assert built.plan(TARGET).counts()["RUNNABLE"] == 0
    built.run(TARGET)
    assert executed(exec_log) == {}


def test_a_constant_a_helper_reads_is_not_cosmetic(built: Project, exec_log) -> None:
    write(built, STATS.replace("SCALE = 2", "SCALE = 4"))
    p = built.plan(TARGET)
    assert p.decisions[("level", TARGET)].reason is Reason.LAYER_CHANGED
    assert p.decisions[("level", TARGET)].detail == "changed layers.stats:SCALE"
    assert p.decisions[("range", TARGET)].reason is Reason.UP_TO_DATE
    built.run(TARGET)
    assert executed(exec_log) == {"level": 6, "board": 6}  # new means: the board changes too


def simulated_lines(log: Path) -> int:
    """Lines the simulation's fabricated dates left in the log (user code it ran)."""
    simulated = {d.isoformat() for d in SIM_DATES}
    return sum(1 for line in log.read_text().splitlines() if line.split(",")[1] in simulated)


def test_code_change_names_the_changed_member(built: Project, exec_log) -> None:
    write(
        built,
        calcs=CALCS.replace(
            'return {{"mean": mean(closes)}}', 'return {{"mean": mean(closes) + 1}}'
        ),
    )
    p = built.plan(TARGET)
    assert p.decisions[("level", TARGET)].reason is Reason.CODE_CHANGED
    assert p.decisions[("level", TARGET)].detail == (
        "changed Level.process (proof: not proven equivalent)"
    )


def test_scenario_b_local_variable_rename_is_proven_cosmetic(built: Project, exec_log) -> None:
    # Seed 004 §5 B: a renamed variable changes the code hash; the proof (AST equal up to a
    # consistent renaming of locals) shows it changes nothing, without running any code.
    write(
        built,
        calcs=CALCS.replace("closes = [r", "prices = [r").replace("mean(closes)", "mean(prices)"),
    )
    p = built.plan(TARGET)
    assert {p.decisions[("level", d)].reason for d in DATES} == {Reason.COSMETIC_CHANGE}
    assert p.decisions[("level", TARGET)].detail == (
        "proof: proven equivalent: equal up to renamed local variables: changed Level.process"
    )
    assert p.counts()["RUNNABLE"] == 0 and p.counts()["BLOCKED"] == 0
    assert simulated_lines(exec_log) == 0  # the plan ran no user code
    built.run(TARGET)
    assert executed(exec_log) == {}
    # The equivalence is recorded: the cells now carry the new code hash, the plan is fast.
    assert {d.reason for d in built.plan(TARGET).decisions.values()} == {Reason.UP_TO_DATE}


def test_renaming_a_parameter_is_not_cosmetic(built: Project, exec_log) -> None:
    # A caller may pass a parameter by keyword: its name is part of the interface.
    write(
        built,
        calcs=CALCS.replace(
            "def process(self, ctx):\n        _log(self.name, ctx)\n        closes",
            "def process(self, c):\n        _log(self.name, c)\n        closes",
        ).replace(
            'for r in ctx.history["prices"]]\n        return {{"mean"',
            'for r in c.history["prices"]]\n        return {{"mean"',
        ),
    )
    p = built.plan(TARGET)
    assert p.decisions[("level", TARGET)].reason is Reason.CODE_CHANGED


THRESHOLD = CALCS.replace(
    'return {{"mean": mean(closes)}}',
    'return {{"mean": mean(closes), "big": mean(closes) > 100000}}',
)


def test_a_changed_threshold_is_never_cosmetic(built: Project, exec_log) -> None:
    # The fabricated world never has a mean between 100000 and 150000, so the simulation hash
    # stays equal; the proof still sees a changed literal: CODE_CHANGED under either rule.
    write(built, calcs=THRESHOLD)
    built.run(TARGET)
    executed(exec_log)
    write(built, calcs=THRESHOLD.replace("> 100000", "> 150000"))
    p = built.plan(TARGET)
    assert {p.decisions[("level", d)].reason for d in DATES} == {Reason.CODE_CHANGED}
    assert "proof: not proven equivalent" in p.decisions[("level", TARGET)].detail
    assert simulated_lines(exec_log) == 0


@pytest.mark.parametrize("where", ["config", "class"])
def test_the_simulation_heuristic_is_opt_in_and_still_refuses_a_changed_literal(
    built: Project, exec_log, where: str
) -> None:
    opt_in = "    lookback = 3\n    cosmetic_verdict = 'simulation'\n\n    def process(self, ctx):\n        _log(self.name, ctx)\n        closes"
    source = THRESHOLD
    if where == "class":
        source = THRESHOLD.replace(
            "    lookback = 3\n\n    def process(self, ctx):\n        _log(self.name, ctx)\n        closes",
            opt_in,
        )
        assert source != THRESHOLD
    else:
        built.extra_config = 'cosmetic_verdict = "simulation"\n'
    write(built, calcs=source)
    built.run(TARGET)
    executed(exec_log)
    # A changed literal: never cosmetic, even with the heuristic, and the plan says the rule.
    write(built, calcs=source.replace("> 100000", "> 150000"))
    p = built.plan(TARGET)
    assert p.decisions[("level", TARGET)].reason is Reason.CODE_CHANGED
    assert p.decisions[("level", TARGET)].detail == (
        "changed Level.process (simulation: a literal, operator, comparison or called name changed)"
    )
    assert simulated_lines(exec_log) == 0  # refused before running any user code


def test_the_simulation_heuristic_accepts_an_equivalent_reordering(
    built: Project, exec_log
) -> None:
    built.extra_config = 'cosmetic_verdict = "simulation"\n'
    source = CALCS.replace(
        'return {{"mean": mean(closes)}}', 'return {{"mean": mean(closes), "n": 1 + len(closes)}}'
    )
    write(built, calcs=source)
    built.run(TARGET)
    executed(exec_log)
    # Same tokens, same simulated behaviour, every new statement ran: cosmetic by heuristic.
    write(built, calcs=source.replace("1 + len(closes)", "len(closes) + 1"))
    p = built.plan(TARGET)
    assert simulated_lines(exec_log) > 0  # the opt-in ran user code on the fabricated world
    assert p.decisions[("level", TARGET)].reason is Reason.COSMETIC_CHANGE
    assert p.decisions[("level", TARGET)].detail == (
        "simulation: same simulated behaviour (heuristic): changed Level.process"
    )


def test_an_unexecuted_change_is_not_called_cosmetic(built: Project, exec_log) -> None:
    # The new branch never runs on the fabricated world, so even the opt-in heuristic
    # cannot vouch for it.
    built.extra_config = 'cosmetic_verdict = "simulation"\n'
    write(built)
    built.run(TARGET)
    executed(exec_log)
    write(
        built,
        calcs=CALCS.replace(
            "        closes = [r",
            "        if ctx.user == 'nobody':\n            return {{'mean': 0}}\n        closes = [r",
        ),
    )
    p = built.plan(TARGET)
    assert p.decisions[("level", TARGET)].reason is Reason.CODE_CHANGED
    assert "simulation:" in p.decisions[("level", TARGET)].detail


def test_the_removed_simulate_attribute_is_refused_with_the_replacement(
    built: Project, exec_log
) -> None:
    source = CALCS.replace(
        "    lookback = 3\n\n    def process",
        "    lookback = 3\n    simulate = False\n\n    def process",
        1,
    )
    assert source != CALCS
    write(built, calcs=source)
    result = built.cli("plan")
    assert result.exit_code == 2, result.output
    assert "cosmetic_verdict" in result.output


def test_scoped_epoch_forces_one_calculation_with_its_reason(built: Project, exec_log) -> None:
    result = built.cli("epoch", "bump", "--calc", "range", "--reason", "vendor resent March")
    assert result.exit_code == 0, result.output
    p = built.plan(TARGET)
    assert {p.decisions[("range", d)].reason for d in DATES} == {Reason.EPOCH_CHANGED}
    assert p.decisions[("range", TARGET)].detail == "epoch of range 0 -> 1: vendor resent March"
    assert p.decisions[("level", TARGET)].reason is Reason.UP_TO_DATE
    built.run(TARGET)
    assert executed(exec_log) == {"range": 6}  # same results: the board is cut off
    listed = built.cli("epoch", "list")
    assert "range" in listed.output and "vendor resent March" in listed.output


def test_global_epoch_bump_reason_is_shown(built: Project) -> None:
    result = built.cli("epoch", "bump", "--reason", "new vendor")
    assert result.exit_code == 0
    p = built.plan(TARGET)
    assert p.decisions[("board", TARGET)].detail == "system epoch 0 -> 1: new vendor"


def test_category_migration_moves_results_without_recomputing(built: Project, exec_log) -> None:
    orch = built.orchestrator()
    before = orch.load_result("board", TARGET)
    orch.close()
    write(built, calcs=CALCS.replace('category = "market"', 'category = "risk"'))
    p = built.plan(TARGET)
    assert {p.decisions[("board", d)].reason for d in DATES} == {Reason.CATEGORY_MIGRATED}
    assert p.decisions[("board", TARGET)].detail == "category market -> risk"
    summary = built.run(TARGET)
    assert executed(exec_log) == {}  # nothing recomputed
    assert set(summary.executed.values()) == {"CATEGORY_MIGRATED"}
    orch = built.orchestrator()
    cell = orch.ledger.cell("board", TARGET)
    attempts = orch.ledger.attempts("board", TARGET)
    assert cell.category == "risk" and orch.load_result("board", TARGET) == before
    orch.close()
    assert attempts[-1].status == "MIGRATED" and attempts[-1].users == 0
    assert built.plan(TARGET).counts()["RUNNABLE"] == 0


def test_category_and_code_change_together_recompute(built: Project, exec_log) -> None:
    write(
        built,
        calcs=CALCS.replace('category = "market"', 'category = "risk"').replace(
            '"n": len(ctx.upstream["level"])', '"n": 1 + len(ctx.upstream["level"])'
        ),
    )
    p = built.plan(TARGET)
    assert p.decisions[("board", TARGET)].reason is Reason.CODE_CHANGED
    built.run(TARGET)
    assert executed(exec_log) == {"board": 6}
    orch = built.orchestrator()
    assert orch.ledger.cell("board", TARGET).category == "risk"
    orch.close()


def test_why_explains_a_cell_from_its_fingerprint_parts(built: Project) -> None:
    ok = built.cli("why", "level", TARGET.isoformat())
    assert ok.exit_code == 0, ok.output
    assert ok.output.startswith(f"level on {TARGET}: SKIPPED (UP_TO_DATE)")
    assert "<- differs" not in ok.output
    write(built, STATS.replace("SCALE = 2", "SCALE = 3"))
    changed = built.cli("why", "level", TARGET.isoformat(), "--format", "json")
    import json

    report = json.loads(changed.output)
    assert report["reason"] == "LAYER_CHANGED"
    differing = [p["part"] for p in report["parts"] if not p["same"]]
    assert differing == ["layer hash"]
    roots = [p for p in report["parts"] if p["part"].startswith("root prices")]
    assert len(roots) == 3  # lookback 3: the dates it read
    bad = built.cli("why", "nope", TARGET.isoformat())
    assert bad.exit_code == 2


def probe_lineage(source: str):
    """The lineage of class ``Probe`` defined by ``source`` in a throwaway module."""
    import importlib.util
    import sys

    path = Path(__file__).parent / f"_lineage_probe_{next(_versions)}.py"
    path.write_text(source)
    try:
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[path.stem] = module
        spec.loader.exec_module(module)
        return trace(module.Probe)
    finally:
        path.unlink()
        sys.modules.pop(path.stem, None)


def test_lineage_records_imported_packages_and_ignores_the_stdlib() -> None:
    import importlib.metadata

    lineage = probe_lineage(
        "import json\nimport zstandard\nfrom orchestrator import StandardCalculation\n"
        "class Probe(StandardCalculation):\n"
        "    def process(self, ctx):\n        return {'v': json.dumps(zstandard.__name__)}\n"
    )
    assert lineage.packages == {"zstandard": importlib.metadata.version("zstandard")}
    # What each imported name is bound to is code too.
    assert set(lineage.code) == {
        "Probe",
        "Probe.process",
        "json",
        "zstandard",
        "StandardCalculation",
    }


def test_rebinding_an_imported_name_changes_the_code_hash() -> None:
    # Every use of ``rnd`` is unchanged, yet ceil is not floor: never the same code.
    source = (
        "from math import floor as rnd\nfrom orchestrator import StandardCalculation\n"
        "class Probe(StandardCalculation):\n"
        "    def process(self, ctx):\n        return {'v': rnd(2.5)}\n"
    )
    floor = probe_lineage(source)
    ceil = probe_lineage(source.replace("floor as rnd", "ceil as rnd"))
    assert floor.code_hash != ceil.code_hash
    assert floor.proof_hash != ceil.proof_hash
    assert floor.code["rnd"] != ceil.code["rnd"]
    # Formatting of the import does not count.
    spaced = probe_lineage(
        source.replace("from math import floor as rnd", "from math import (floor as rnd)")
    )
    assert spaced.code_hash == floor.code_hash


def test_infrastructure_change_names_the_package(project: Project, exec_log) -> None:
    import importlib.metadata

    project.extra_config = 'packages = ["zstandard"]\n'
    project.write_prices(price_rows(["AAA", "BBB"], DATES))
    write(project)
    project.run(TARGET)
    executed(exec_log)
    project.extra_config = 'packages = ["zstandard", "xxhash"]\n'
    project.write_config()
    p = project.plan(TARGET)
    assert {d.reason for d in p.decisions.values()} == {Reason.INFRA_CHANGED}
    version = importlib.metadata.version("xxhash")
    assert p.decisions[("level", TARGET)].detail == f"xxhash absent -> {version}"
    project.extra_config = 'packages = ["no-such-distribution-here"]\n'
    project.write_config()
    bad = project.cli("plan")
    assert bad.exit_code == 2 and "is not installed" in bad.output
