"""Auto-discovery, validation, Kahn passes and Tarjan cycle reports."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.errors import CycleError, ManifestError
from orchestrator.manifest import Manifest, discover, find_cycle, kahn_passes
from tests.conftest import Project

CALC = """
from orchestrator import MetaCalculation, StandardCalculation


class {cls}(StandardCalculation):
    name = "{name}"
    dependencies = {deps}

    def process(self, ctx):
        return {{}}
"""


def _write(project_dir: Path, name: str, modules: dict[str, str]) -> str:
    pkg = project_dir / name
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    for module, source in modules.items():
        target = pkg / f"{module}.py"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(source)
    return str(pkg)


def _calc(cls: str, name: str, deps: list[str]) -> str:
    return CALC.format(cls=cls, name=name, deps=deps)


def test_discovery_finds_classes_at_any_depth_by_folder_path(tmp_path: Path) -> None:
    folder = _write(tmp_path, "disc_a", {"one": _calc("A", "a", [])})
    sub = Path(folder) / "deeper"
    sub.mkdir()
    (sub / "__init__.py").write_text("")
    (sub / "two.py").write_text(_calc("B", "b", ["a"]))
    specs = discover(folder)
    assert [s.name for s in specs] == ["a", "b"]
    manifest = Manifest.build(specs)
    assert manifest.passes == (("a",), ("b",))


def test_unknown_dependency_names_both_sides(tmp_path: Path) -> None:
    folder = _write(tmp_path, "disc_b", {"m": _calc("A", "a", ["missing"])})
    with pytest.raises(ManifestError, match="'a' depends on 'missing', which does not exist"):
        Manifest.build(discover(folder))


def test_duplicate_names_are_rejected_with_both_classes(tmp_path: Path) -> None:
    folder = _write(
        tmp_path, "disc_c", {"m1": _calc("A", "same", []), "m2": _calc("B", "same", [])}
    )
    with pytest.raises(ManifestError, match="duplicate calculation name 'same'.*m1.A.*m2.B"):
        Manifest.build(discover(folder))


def test_cycle_error_names_the_exact_chain(tmp_path: Path) -> None:
    folder = _write(
        tmp_path,
        "disc_d",
        {
            "m": _calc("A", "a", ["c"])
            + _calc("B", "b", ["a"]).split("\n", 3)[3]
            + _calc("C", "c", ["b"]).split("\n", 3)[3]
            + _calc("D", "d", []).split("\n", 3)[3],
        },
    )
    with pytest.raises(CycleError) as err:
        Manifest.build(discover(folder))
    assert str(err.value).startswith("dependency cycle: a -> c -> b -> a")
    assert err.value.chain == ["a", "c", "b", "a"]


def test_kahn_passes_are_waves_of_independent_nodes() -> None:
    graph = {"a": [], "b": [], "c": ["a"], "d": ["a", "b"], "e": ["c", "d"]}
    assert kahn_passes(graph) == (("a", "b"), ("c", "d"), ("e",))


def test_find_cycle_on_self_loop_and_acyclic() -> None:
    assert find_cycle({"a": ["a"]}) == ["a", "a"]
    assert find_cycle({"a": [], "b": ["a"]}) == []


def test_import_error_in_a_calculation_module_is_a_definition_error(tmp_path: Path) -> None:
    folder = _write(tmp_path, "disc_e", {"m": "import not_a_module_anywhere\n"})
    with pytest.raises(ManifestError, match="cannot import calculation module 'disc_e.m'"):
        discover(folder)


def test_bad_metadata_is_reported(tmp_path: Path) -> None:
    source = _calc("A", "a", []).replace('name = "a"', 'name = "a"\n    lookback = 0')
    folder = _write(tmp_path, "disc_f", {"m": source})
    with pytest.raises(ManifestError, match="'lookback' must be an int >= 1"):
        discover(folder)


def test_slice_keeps_the_upstream_closure(tmp_path: Path) -> None:
    folder = _write(
        tmp_path,
        "disc_g",
        {"m1": _calc("A", "a", []), "m2": _calc("B", "b", ["a"]), "m3": _calc("C", "c", [])},
    )
    manifest = Manifest.build(discover(folder))
    assert set(manifest.slice(["b"]).calcs) == {"a", "b"}
    with pytest.raises(ManifestError, match="unknown calculation"):
        manifest.slice(["zzz"])


def test_unconfigured_root_data_is_an_actionable_error(project: Project) -> None:
    from orchestrator.errors import DefinitionError

    project.write_prices([])
    project.write_calcs(
        "from orchestrator import StandardCalculation\n"
        "class A(StandardCalculation):\n    root_data = ['trades']\n"
        "    def process(self, ctx):\n        return None\n"
    )
    with pytest.raises(DefinitionError, match=r"add a \[root_data.trades\] table"):
        _ = project.orchestrator().manifest
