"""What code a calculation is built from: its class, its helpers, its layers, its packages.

Starting from the class, every name it uses is resolved through the AST of its module:

* a function, class or constant of the same module is part of its *code* (and followed);
* a name imported from a *project-local* module — one under the calculations' top-level
  package, e.g. ``calculations.layers.stats`` — is part of its *layers*, keyed
  ``module:name``, and followed inside that module in turn (``import pkg.mod as m`` then
  ``m.f`` resolves ``f`` in ``pkg.mod``; a bare use of a module alias takes the whole module);
* a name imported from anything else is a *package*: outside the standard library its
  distribution's version becomes part of the infrastructure hash.

Each part is the normalised AST of its defining statement (see ``fingerprint``), so comments,
docstrings and formatting never count, and a changed constant in a helper module does. The
result is deterministic and independent of import order.
"""

from __future__ import annotations

import ast
import builtins
import importlib.metadata
import importlib.util
import inspect
import sys
import textwrap
from dataclasses import dataclass, field
from functools import cache
from typing import Any

from orchestrator.equivalence import ProofForm, proof_form
from orchestrator.fingerprint import digest, infra_parts, normalise

_BUILTINS = frozenset(dir(builtins))

# Class attributes that place or police results but never change them: a category change is a
# CATEGORY_MIGRATED move, not a code change; validation thresholds apply at the next publish.
PLACEMENT_ATTRIBUTES = frozenset(
    {
        "category",
        "product_lines",
        "max_failure_rate",
        "breaker_min_users",
        "allow_nan",
        "max_null_fraction",
        "nullable",
        "flatline_min_users",
        "flatline_ok",
        "cosmetic_verdict",
    }
)


@dataclass(frozen=True, slots=True)
class Lineage:
    """The parts a calculation is built from.

    Attributes:
        code: definition name -> normalised AST: the class header under its qualified name,
            each member as ``Class.member``, helpers of its own module under their names.
        layers: ``module:name`` -> normalised AST, for definitions of project-local modules
            (module relative to the calculations' top-level package).
        packages: distribution name -> installed version, for non-stdlib imports.
        statements: code function name -> digests of every statement inside it (nested
            ones too), so a simulation can check that each new statement executed.
        proof: code definition name -> its proof form (``equivalence.proof_form``): equal
            forms prove a code change cosmetic.
    """

    def digests(self) -> dict[str, dict[str, str]]:
        """Per kind ("code", "layer"), definition -> digest of its normal form: what the
        code-version registry keeps to name a changed definition later."""
        return {
            "code": {k: digest("def", v) for k, v in self.code.items()},
            "layer": {k: digest("def", v) for k, v in self.layers.items()},
        }

    def registry_parts(self) -> dict[str, dict[str, Any]]:
        """What the registry keeps per kind: definition digests, plus for code the statement
        digests of each function under ``"__stmts__"``."""
        digests = self.digests()
        return {
            "code": {
                **digests["code"],
                "__stmts__": self.statements,
                "__proof__": self.proof_hash,
                "__tokens__": self.tokens_hash,
            },
            "layer": digests["layer"],
        }

    code: dict[str, str] = field(default_factory=dict)
    layers: dict[str, str] = field(default_factory=dict)
    packages: dict[str, str] = field(default_factory=dict)
    statements: dict[str, list[str]] = field(default_factory=dict)
    proof: dict[str, ProofForm] = field(default_factory=dict)

    @property
    def code_hash(self) -> str:
        return digest("code", self.code)

    @property
    def proof_hash(self) -> str:
        """Equal for two code versions iff they are proven equivalent (same definitions,
        each equal up to a consistent renaming of local variables)."""
        return digest("code-proof", {k: v.text for k, v in self.proof.items()})

    @property
    def tokens_hash(self) -> str:
        """Of every literal, operator, comparison and called name of the code (a multiset):
        the simulation heuristic never calls a change cosmetic when it differs."""
        return digest("code-tokens", sorted(t for v in self.proof.values() for t in v.tokens))

    @property
    def layer_hash(self) -> str:
        return digest("layer", self.layers)

    @property
    def infra_parts(self) -> dict[str, object]:
        return infra_parts(self.packages)

    @property
    def infra_hash(self) -> str:
        return digest("infra", self.infra_parts)


@cache
def _module_source(module: str) -> ast.Module | None:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return None
    with open(spec.origin, encoding="utf-8") as f:
        return ast.parse(f.read())


def _definitions(tree: ast.Module) -> dict[str, ast.stmt]:
    """Top-level name -> defining statement (function, class, assignment, import)."""
    defs: dict[str, ast.stmt] = {}
    for stmt in tree.body:
        if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defs[stmt.name] = stmt
        elif isinstance(stmt, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
            for target in targets:
                for node in ast.walk(target):
                    if isinstance(node, ast.Name):
                        defs[node.id] = stmt
        elif isinstance(stmt, (ast.Import, ast.ImportFrom)):
            for alias in stmt.names:
                defs[(alias.asname or alias.name).split(".")[0]] = stmt
    return defs


def _references(node: ast.AST) -> tuple[set[str], set[tuple[str, str]]]:
    """Names a statement reads, and ``(name, attribute)`` pairs for ``name.attribute``."""
    attribute_nodes = [
        n for n in ast.walk(node) if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)
    ]
    bases = {id(n.value) for n in attribute_nodes}  # ``m`` in ``m.f``: not a bare use of m
    names = {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and id(n) not in bases}
    attributes = {(n.value.id, n.attr) for n in attribute_nodes}  # type: ignore[attr-defined]
    return names - _BUILTINS, attributes


def _absolute(stmt: ast.ImportFrom, module: str) -> str:
    if not stmt.level:
        return stmt.module or ""
    package = module.rsplit(".", stmt.level)[0]
    return f"{package}.{stmt.module}" if stmt.module else package


def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


@cache
def _distribution_of(top_level: str) -> tuple[str, str] | None:
    dists = importlib.metadata.packages_distributions().get(top_level)
    if not dists:
        return None
    name = min(dists)
    try:
        return name, importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def statement_digests(function: ast.FunctionDef | ast.AsyncFunctionDef) -> list[tuple[str, int]]:
    """(digest of the normal form, line) of every statement inside ``function``, nested ones
    included. Digests are taken on a copy: normalising strips docstrings in place."""
    copy = ast.parse(ast.unparse(function)).body[0]
    lines = [n.lineno for n in ast.walk(function) if isinstance(n, ast.stmt) and n is not function]
    nodes = [n for n in ast.walk(copy) if isinstance(n, ast.stmt) and n is not copy]
    return [(digest("stmt", normalise(n)), line) for n, line in zip(nodes, lines, strict=True)]


def _relative(module: str, prefix: str) -> str:
    # Keys are relative to the calculations' package, so renaming that package (or a test
    # importing a copy under another name) does not change the layer hash.
    return module[len(prefix) + 1 :] if module.startswith(prefix + ".") else module


def _member_name(stmt: ast.stmt) -> str:
    if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return stmt.name
    if isinstance(stmt, ast.Assign):
        return ",".join(ast.unparse(t) for t in stmt.targets)
    if isinstance(stmt, (ast.AnnAssign, ast.AugAssign)):
        return ast.unparse(stmt.target)
    return ast.unparse(stmt)[:40]


def _is_placement(stmt: ast.stmt) -> bool:
    if isinstance(stmt, ast.Assign):
        names = [t.id for t in stmt.targets if isinstance(t, ast.Name)]
        return bool(names) and all(n in PLACEMENT_ATTRIBUTES for n in names)
    if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
        return stmt.target.id in PLACEMENT_ATTRIBUTES
    return False


def trace(cls: type, local_prefix: str | None = None) -> Lineage:
    """The lineage of calculation class ``cls``.

    Args:
        cls: the calculation class.
        local_prefix: top-level package whose modules are project-local layers (default: the
            top-level package of ``cls``'s module). ``orchestrator`` itself never is.

    Raises:
        OSError / TypeError: the source of ``cls`` cannot be found (e.g. defined in a REPL).
        SyntaxError: a source does not parse (never treated as "unchanged").
    """
    home = cls.__module__
    prefix = local_prefix or home.split(".")[0]

    def local(module: str) -> bool:
        return (module == prefix or module.startswith(prefix + ".")) and not module.startswith(
            "orchestrator"
        )

    class_tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    lineage = Lineage()
    for node in class_tree.body:
        if isinstance(node, ast.ClassDef):
            # One part per member, so an explanation can say "changed Rsi14.process".
            members = [
                s
                for s in node.body
                if not _is_placement(s)
                and not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))
            ]
            node.body = [ast.Pass()]
            lineage.proof[cls.__qualname__] = proof_form(node)
            lineage.code[cls.__qualname__] = normalise(node)
            for member in members:
                key = f"{cls.__qualname__}.{_member_name(member)}"
                if isinstance(member, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    lineage.statements[key] = [d for d, _ in statement_digests(member)]
                lineage.proof[key] = proof_form(member)
                lineage.code[key] = normalise(member)
            node.body = members or [ast.Pass()]

    seen: set[tuple[str, str]] = {(home, cls.__name__)}
    pending: list[tuple[str, str]] = []

    def enqueue(module: str, node: ast.AST) -> None:
        names, attributes = _references(node)
        pending.extend((module, n) for n in names)
        pending.extend((module, f"{n}.{a}") for n, a in attributes)

    enqueue(home, class_tree)
    while pending:
        module, name = pending.pop()
        if (module, name) in seen:
            continue
        seen.add((module, name))
        tree = _module_source(module)
        if tree is None:
            continue
        defs = _definitions(tree)
        head, _, attribute = name.partition(".")
        stmt = defs.get(head)
        if stmt is None:
            continue
        key = head if module == home else f"{_relative(module, prefix)}:{head}"
        if isinstance(stmt, (ast.Import, ast.ImportFrom)):
            binding = _follow_import(stmt, module, head, attribute, local, lineage, pending)
            if binding is not None:
                # What a name imported from outside the project is bound to is part of the
                # code: ``from math import floor as rnd`` -> ``ceil as rnd`` changes behaviour
                # with every use of ``rnd`` unchanged.
                if module == home:
                    lineage.proof[key] = proof_form(binding)
                (lineage.code if module == home else lineage.layers)[key] = normalise(binding)
            continue
        if attribute:  # an attribute of a local object: the object itself is the part
            pending.append((module, head))
            continue
        if module == home:
            if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lineage.statements[key] = [d for d, _ in statement_digests(stmt)]
            lineage.proof[key] = proof_form(stmt)
        (lineage.code if module == home else lineage.layers)[key] = normalise(stmt)
        enqueue(module, stmt)
    return lineage


def _follow_import(
    stmt: ast.Import | ast.ImportFrom,
    module: str,
    name: str,
    attribute: str,
    local: object,
    lineage: Lineage,
    pending: list[tuple[str, str]],
) -> ast.stmt | None:
    """Resolve ``name`` (optionally ``name.attribute``) bound by an import statement.

    Returns:
        For a name bound to something outside the project (a package, the standard
        library, the engine), the import of that one name with its module made absolute —
        ``from math import floor as rnd`` — else None (project-local names are followed).
    """
    assert callable(local)
    external: list[ast.alias] = []
    for alias in stmt.names:
        bound = (alias.asname or alias.name).split(".")[0]
        if bound != name:
            continue
        if isinstance(stmt, ast.ImportFrom):
            source = _absolute(stmt, module)
            submodule = f"{source}.{alias.name}"
            if _is_module(submodule):  # ``from pkg import module``
                target, wanted = submodule, attribute
            else:
                target, wanted = source, alias.name + (f".{attribute}" if attribute else "")
        else:
            target = alias.name if alias.asname else alias.name.split(".")[0]
            wanted = attribute
        if local(target):
            if wanted:
                pending.append((target, wanted))
            else:  # the module itself is used as a value: all of it counts
                tree = _module_source(target)
                pending.extend((target, n) for n in (_definitions(tree) if tree else {}))
        else:
            external.append(ast.alias(alias.name, alias.asname))
            top = target.split(".")[0]
            # The engine's own version is not the calculation's infrastructure: our result
            # and hash formats (in every infra hash) are what a new engine may change.
            if top and top != "orchestrator" and top not in sys.stdlib_module_names:
                found = _distribution_of(top)
                if found:
                    lineage.packages[found[0]] = found[1]
    if not external:
        return None
    if isinstance(stmt, ast.ImportFrom):
        return ast.ImportFrom(module=_absolute(stmt, module), names=external, level=0)
    return ast.Import(names=external)
