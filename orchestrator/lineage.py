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
import copy
import importlib.util
import inspect
import linecache
import sys
import textwrap
from collections.abc import Callable
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
def _module_text(module: str) -> tuple[str, str] | None:
    """(file, text) of a module's Python source, read once per process; None without one."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return None
    with open(spec.origin, encoding="utf-8") as f:
        return spec.origin, f.read()


@cache
def _module_source(module: str) -> ast.Module | None:
    found = _module_text(module)
    return None if found is None else ast.parse(found[1])


@cache
def _module_lines(module: str) -> _Lines | None:
    found = _module_text(module)
    return None if found is None else _Lines(found[1])


@cache  # per tree (trees are cached per module): looked up for every name followed
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
    import importlib.metadata  # here: only a trace that is not cached reads distributions

    dists = importlib.metadata.packages_distributions().get(top_level)
    if not dists:
        return None
    name = min(dists)
    try:
        return name, importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def class_source_digest(cls: type) -> tuple[str, str]:
    """(file, digest of its text) of the source ``inspect.getsource(cls)`` reads now: the
    same lines, through ``linecache`` as ``inspect.findsource`` gets them.

    Raises:
        OSError / TypeError: ``cls`` has no source file (as ``inspect.getsource``).
    """
    file = inspect.getsourcefile(cls)
    if file:
        linecache.checkcache(file)
    else:
        file = inspect.getfile(cls)
    module = inspect.getmodule(cls, file)
    lines = linecache.getlines(file, module.__dict__) if module else linecache.getlines(file)
    return file, digest("source-text", "".join(lines))


def text_digest(module: str) -> tuple[str, str] | None:
    """(file, digest of its text) of the source ``trace`` reads for ``module``; None when it
    has no Python source."""
    found = _module_text(module)
    return None if found is None else (found[0], digest("source-text", found[1]))


class _Lines:
    """A source text as UTF-8 bytes with the offset of each line (AST columns count bytes)."""

    def __init__(self, text: str):
        self.data = text.encode("utf-8")
        starts = [0]
        at = self.data.find(b"\n")
        while at >= 0:
            starts.append(at + 1)
            at = self.data.find(b"\n", at + 1)
        self.starts = starts
        # Line numbers of the parser and of this split agree only on plain "\n" endings.
        self.plain = b"\r" not in self.data and b"\x0c" not in self.data

    def standalone(self, stmt: ast.stmt) -> tuple[bytes, ast.stmt] | None:
        """The source of ``stmt`` as a module of its own (its decorators and its lines from
        the first one's start, under ``if 1:`` when indented) and that module's statement,
        parsed afresh; None when it cannot be cut out alone (a statement after ``;``, or a
        text whose line ends the split does not follow)."""
        if not self.plain or stmt.end_lineno is None or stmt.end_col_offset is None:
            return None
        first = min([stmt.lineno, *(d.lineno for d in getattr(stmt, "decorator_list", ()))])
        start = self.starts[first - 1]
        end = self.starts[stmt.end_lineno - 1] + stmt.end_col_offset
        text = self.data[start:end]
        indented = text[:1] in (b" ", b"\t")
        source = b"if 1:\n" + text if indented else text
        try:
            body = ast.parse(source).body
        except SyntaxError:
            return None
        if indented:
            body = body[0].body if len(body) == 1 and isinstance(body[0], ast.If) else []
        if len(body) != 1 or type(body[0]) is not type(stmt):
            return None
        return source, body[0]


class Reads:
    """What one trace reads besides the class itself, recorded as it reads, so that a cached
    lineage can be checked against the same reads later (``lineage_cache``); and a memo of
    statement parts, keyed by each statement's own source text.

    Attributes:
        source: (file, digest) of the class's source (``class_source_digest``).
        texts: module -> (file, digest) of the source read for it (``text_digest``), None
            for a module without Python source.
        modules: dotted name -> whether it is a module (``from pkg import x``: x a module?).
        dists: top-level import name -> (distribution, version) or None.
        used: memo keys read or written.
    """

    def __init__(
        self,
        memo: dict[str, Any] | None = None,
        distribution: Callable[[str], tuple[str, str] | None] | None = None,
    ):
        self.memo = memo
        self._distribution = distribution or _distribution_of
        self.source: tuple[str, str] | None = None
        self.texts: dict[str, tuple[str, str] | None] = {}
        self.modules: dict[str, bool] = {}
        self.dists: dict[str, tuple[str, str] | None] = {}
        self.used: set[str] = set()

    def class_source(self, cls: type) -> str:
        source = inspect.getsource(cls)
        self.source = class_source_digest(cls)
        return source

    def tree(self, module: str) -> tuple[ast.Module, _Lines] | None:
        self.texts[module] = text_digest(module)
        tree, lines = _module_source(module), _module_lines(module)
        return None if tree is None or lines is None else (tree, lines)

    def is_module(self, name: str) -> bool:
        found = self.modules[name] = _is_module(name)
        return found

    def distribution(self, top: str) -> tuple[str, str] | None:
        found = self.dists[top] = self._distribution(top)
        return found

    def parts(
        self, stmt: ast.stmt, lines: _Lines, home: bool
    ) -> tuple[list[str] | None, ProofForm | None, str]:
        """(statement digests of a function, proof form, normal form) of ``stmt``: for a
        definition of the class's own module (``home``) all three, else only the normal
        form. Computed on a fresh parse of the statement's own source, never on ``stmt``
        (a cached module tree): so they are the same in every trace, whatever an earlier one
        did to the tree; and they are memoised under that source, of which they are a
        function."""
        function = home and isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef))
        cut = lines.standalone(stmt)
        key = None
        if cut is not None and self.memo is not None:
            key = digest("lineage-part", [home, cut[0]])
            known = self.memo.get(key)
            if isinstance(known, dict):
                try:
                    proof = ProofForm(known["p"][0], tuple(known["p"][1])) if home else None
                    out = (list(known["s"]) if function else None, proof, str(known["n"]))
                except (KeyError, TypeError, IndexError):
                    pass  # a damaged entry: computed again below
                else:
                    self.used.add(key)
                    return out
        node = cut[1] if cut is not None else copy.deepcopy(stmt)
        statements = [d for d, _ in statement_digests(node)] if function else None  # type: ignore[arg-type]
        proof = proof_form(node) if home else None
        normal = normalise(node)
        if key is not None and self.memo is not None:
            entry: dict[str, Any] = {"n": normal}
            if home:
                entry["p"] = [proof.text, list(proof.tokens)]  # type: ignore[union-attr]
            if function:
                entry["s"] = statements
            self.memo[key] = entry
            self.used.add(key)
        return statements, proof, normal


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


def trace(cls: type, local_prefix: str | None = None, reads: Reads | None = None) -> Lineage:
    """The lineage of calculation class ``cls``.

    Args:
        cls: the calculation class.
        local_prefix: top-level package whose modules are project-local layers (default: the
            top-level package of ``cls``'s module). ``orchestrator`` itself never is.
        reads: records what the trace reads (and memoises statement parts); a fresh one by
            default. The lineage is a function of the class's module and qualified name,
            ``local_prefix``, the engine's code and Python version, and what ``reads``
            records — what ``lineage_cache`` checks before reusing one.

    Raises:
        OSError / TypeError: the source of ``cls`` cannot be found (e.g. defined in a REPL).
        SyntaxError: a source does not parse (never treated as "unchanged").
    """
    reads = reads if reads is not None else Reads()
    home = cls.__module__
    prefix = local_prefix or home.split(".")[0]

    def local(module: str) -> bool:
        return (module == prefix or module.startswith(prefix + ".")) and not module.startswith(
            "orchestrator"
        )

    class_text = textwrap.dedent(reads.class_source(cls))
    class_tree = ast.parse(class_text)
    class_lines = _Lines(class_text)
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
                statements, proof, normal = reads.parts(member, class_lines, home=True)
                if statements is not None:
                    lineage.statements[key] = statements
                lineage.proof[key] = proof  # type: ignore[assignment]
                lineage.code[key] = normal
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
        source = reads.tree(module)
        if source is None:
            continue
        tree, lines = source
        defs = _definitions(tree)
        head, _, attribute = name.partition(".")
        stmt = defs.get(head)
        if stmt is None:
            continue
        key = head if module == home else f"{_relative(module, prefix)}:{head}"
        if isinstance(stmt, (ast.Import, ast.ImportFrom)):
            binding = _follow_import(stmt, module, head, attribute, local, lineage, pending, reads)
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
        statements, proof, normal = reads.parts(stmt, lines, home=module == home)
        if module == home:
            if statements is not None:
                lineage.statements[key] = statements
            lineage.proof[key] = proof  # type: ignore[assignment]
        (lineage.code if module == home else lineage.layers)[key] = normal
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
    reads: Reads,
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
            if reads.is_module(submodule):  # ``from pkg import module``
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
                parsed = reads.tree(target)
                pending.extend((target, n) for n in (_definitions(parsed[0]) if parsed else {}))
        else:
            external.append(ast.alias(alias.name, alias.asname))
            top = target.split(".")[0]
            # The engine's own version is not the calculation's infrastructure: our result
            # and hash formats (in every infra hash) are what a new engine may change.
            if top and top != "orchestrator" and top not in sys.stdlib_module_names:
                found = reads.distribution(top)
                if found:
                    lineage.packages[found[0]] = found[1]
    if not external:
        return None
    if isinstance(stmt, ast.ImportFrom):
        return ast.ImportFrom(module=_absolute(stmt, module), names=external, level=0)
    return ast.Import(names=external)
