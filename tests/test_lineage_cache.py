"""The lineage cache: reused only when nothing it was made from changed, never hiding an edit.

Edits are made between processes (as between two nightly runs): each ``discover`` below runs
in a fresh interpreter, which reads the cache the previous one wrote.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from orchestrator import lineage
from orchestrator.lineage import Reads, _Lines, trace
from orchestrator.lineage_cache import LineageCache, engine_key, site_key
from orchestrator.manifest import discover

ROOT = Path(__file__).resolve().parents[1]

HELPERS = '''
SCALE = 2.0


def scaled(x):
    """Times SCALE."""
    return x * SCALE
'''

CALCS = """
from orchestrator import StandardCalculation

from {pkg}.helpers import scaled

OFFSET = 1


def _shift(x):
    return x + OFFSET


class Alpha(StandardCalculation):
    name = "alpha"

    def process(self, ctx):
        return {{"v": scaled(_shift(3))}}


class Beta(StandardCalculation):
    name = "beta"
    dependencies = ["alpha"]

    def process(self, ctx):
        return {{"v": 7}}
"""

# Prints, for each calculation, the hashes through the cache and through a plain trace, and
# the cache's hit and miss counts.
PROBE = """
import json, sys
from pathlib import Path
from orchestrator.lineage import trace
from orchestrator.lineage_cache import LineageCache
from orchestrator.manifest import discover
folder, cache_path = sys.argv[1], Path(sys.argv[2])
cache = LineageCache.load(cache_path)
specs = discover(folder, cache=cache)
out = {"hits": cache.hits, "misses": cache.misses, "calcs": {}}
for s in specs:
    plain = trace(s.cls, Path(folder).name)
    out["calcs"][s.name] = {
        "cached": [s.lineage.code_hash, s.lineage.layer_hash, s.infra_hash,
                   s.lineage.proof_hash, s.lineage.tokens_hash, s.lineage.statements],
        "plain": [plain.code_hash, plain.layer_hash, plain.infra_hash,
                  plain.proof_hash, plain.tokens_hash, plain.statements],
    }
print(json.dumps(out))
"""


def _package(root: Path, name: str) -> Path:
    pkg = root / name
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "helpers.py").write_text(HELPERS)
    (pkg / "calcs.py").write_text(CALCS.format(pkg=name))
    return pkg


def _discover(pkg: Path, cache: Path) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, str(pkg), str(cache)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    for name, both in out["calcs"].items():  # the cache is transparent: always the trace's
        assert both["cached"] == both["plain"], name
    return out


def _hash(out: dict, calc: str, part: int = 0) -> str:
    return out["calcs"][calc]["cached"][part]


def test_a_warm_cache_is_used_and_gives_the_traced_lineage(tmp_path: Path) -> None:
    pkg, cache = _package(tmp_path, "lc_warm"), tmp_path / "cache.json"
    cold = _discover(pkg, cache)
    assert (cold["hits"], cold["misses"]) == (0, 2)
    assert cache.exists()
    warm = _discover(pkg, cache)
    assert (warm["hits"], warm["misses"]) == (2, 0)
    assert warm["calcs"] == cold["calcs"]


@pytest.mark.parametrize(
    ("file", "old", "new", "calc", "part"),
    [
        # a literal in a method, same length (same file size): the code hash
        ("calcs.py", 'return {"v": 7}', 'return {"v": 8}', "beta", 0),
        # a constant of the class's module that a helper reads
        ("calcs.py", "OFFSET = 1", "OFFSET = 2", "alpha", 0),
        # a constant of a project-local helper module: the layer hash
        ("helpers.py", "SCALE = 2.0", "SCALE = 3.0", "alpha", 1),
    ],
)
def test_a_code_edit_changes_the_hash_with_the_cache_present(
    tmp_path: Path, file: str, old: str, new: str, calc: str, part: int
) -> None:
    pkg, cache = _package(tmp_path, f"lc_edit_{file[:4]}_{calc}_{part}"), tmp_path / "c.json"
    _discover(pkg, cache)
    before = _discover(pkg, cache)
    assert before["misses"] == 0
    source = (pkg / file).read_text()
    assert old in source
    (pkg / file).write_text(source.replace(old, new))
    after = _discover(pkg, cache)
    assert after["misses"] >= 1
    assert _hash(after, calc, part) != _hash(before, calc, part)
    # and back: the original text gives the original hash again
    (pkg / file).write_text(source)
    again = _discover(pkg, cache)
    assert _hash(again, calc, part) == _hash(before, calc, part)


def test_a_comment_edit_is_traced_again_and_keeps_the_hash(tmp_path: Path) -> None:
    pkg, cache = _package(tmp_path, "lc_comment"), tmp_path / "cache.json"
    before = _discover(pkg, cache)
    source = (pkg / "calcs.py").read_text()
    (pkg / "calcs.py").write_text(source.replace("OFFSET = 1", "# why\n\nOFFSET = 1  # one"))
    after = _discover(pkg, cache)
    assert after["misses"] == 2  # the file changed: nothing reused without a new trace
    assert after["calcs"] == before["calcs"]


def test_a_damaged_or_foreign_cache_file_is_an_empty_cache(tmp_path: Path) -> None:
    pkg, cache = _package(tmp_path, "lc_damaged"), tmp_path / "cache.json"
    good = _discover(pkg, cache)
    data = json.loads(cache.read_text())
    for entry in data["entries"].values():
        entry["lineage"]["code"] = {"forged": "x"}  # would be wrong if it were used
    data["engine"] = "another engine"
    cache.write_text(json.dumps(data))
    foreign = _discover(pkg, cache)
    assert foreign["misses"] == 2
    assert foreign["calcs"] == good["calcs"]
    cache.write_text("{not json")
    broken = _discover(pkg, cache)
    assert broken["misses"] == 2
    assert broken["calcs"] == good["calcs"]


def test_the_shipped_calculations_are_the_same_through_the_cache(tmp_path: Path) -> None:
    path = tmp_path / "cache.json"
    for package in ("calculations.prices", "calculations.berka"):
        first = LineageCache.load(path)
        specs = discover(package, ROOT, first)
        second = LineageCache.load(path)
        for spec in specs:
            plain = trace(spec.cls, "calculations")
            cached = second.trace(spec.cls, "calculations")
            assert cached == plain, spec.name
        assert (second.hits, second.misses) == (len(specs), 0)


def test_the_site_key_changes_when_a_distribution_appears(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(tmp_path))
    before = site_key()
    (tmp_path / "somepkg-1.0.dist-info").mkdir()
    assert site_key() != before
    before = site_key()
    (tmp_path / "somepkg-1.0.dist-info" / "METADATA").write_text("Name: somepkg\n")
    assert site_key() != before


def test_the_engine_key_depends_on_the_tracing_code(monkeypatch: pytest.MonkeyPatch) -> None:
    key = engine_key()
    assert engine_key() == key
    monkeypatch.setattr(sys, "version", sys.version + " patched")
    assert engine_key() != key


def test_a_statement_is_cut_out_with_its_decorators_or_not_at_all() -> None:
    text = textwrap.dedent(
        """\
        import functools

        @functools.cache
        @staticmethod
        def f(x):
            s = '''a
        b'''
            return x

        class C:
            @property
            def p(self):
                return 1
            a = 1; b = 2
        """
    )
    tree = ast.parse(text)
    lines = _Lines(text)
    f = tree.body[1]
    cut = lines.standalone(f)
    assert cut is not None
    assert cut[0].startswith(b"@functools.cache")
    assert ast.dump(cut[1]) == ast.dump(ast.parse(ast.unparse(f)).body[0])
    method = tree.body[2].body[0]
    cut = lines.standalone(method)
    assert cut is not None and cut[0].startswith(b"if 1:\n    @property")
    assert ast.dump(cut[1]) == ast.dump(ast.parse(textwrap.dedent(ast.unparse(method))).body[0])
    assert lines.standalone(tree.body[2].body[2]) is None  # ``b = 2`` after ``a = 1;``


def test_memoised_parts_are_keyed_by_the_statement_text() -> None:
    memo: dict = {}
    one, two = "def f(x):\n    return x + 1\n", "def f(x):\n    return x + 2\n"
    parts = [Reads(memo).parts(ast.parse(t).body[0], _Lines(t), home=True) for t in (one, two)]
    assert parts[0][2] != parts[1][2]
    assert len(memo) == 2
    again = Reads(memo).parts(ast.parse(one).body[0], _Lines(one), home=True)
    assert again == parts[0]
    assert lineage.normalise(ast.parse(one).body[0]) == parts[0][2]
