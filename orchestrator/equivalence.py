"""Proofs that two versions of a definition behave the same, from the code alone.

A code change is *cosmetic* — recorded, not re-run — only when it is proven equivalent. The
proof here is syntactic: two definitions are equivalent when their normalised ASTs (see
``fingerprint.normalise``: no comments, docstrings, formatting or positions) are equal after
a *consistent renaming of local variables* (alpha-equivalence). Renaming is the one rewrite
this module proves; each rule below is what makes it safe:

* **Scopes come from the compiler.** ``symtable`` classifies every name of every function
  scope (local, parameter, free, global). A name is renamed only when, in every scope of the
  definition where it appears, it is a local non-parameter or a free variable bound by an
  enclosing function — never global, never in a class body or at module level (defaults and
  decorators are evaluated there). So a name that is a global in one version and a local in
  the other never matches, and a comprehension variable that shadows a global is left alone.
* **Only plain variables.** Names bound by anything but an ``ast.Name`` — parameters (callers
  may pass them by keyword), imports, ``def``/``class`` names, ``except ... as e``, ``match``
  captures, ``global``/``nonlocal`` declarations — keep their spelling.
* **No introspection.** A definition that calls ``locals``, ``vars``, ``dir``, ``eval`` or
  ``exec``, or reads frames (``f_locals``, ``sys._getframe``, ``inspect.currentframe``), can
  observe local names: nothing in it is renamed.
* Renamed names become ``<local N>`` (N by order of first appearance in ``ast.walk``), which
  is not an identifier, so it can never collide with a name that was kept.

Two definitions whose forms are equal are therefore the same program up to the names of
variables no code can observe. Anything else — a changed literal, operator, comparison,
called name, a reordered statement — is a CODE_CHANGED, and early cutoff keeps its cost down.

``tokens`` lists a definition's literals, operators, comparisons and called names: the
simulation heuristic (opt-in, ``simulation.py``) may call a change cosmetic only when they are
unchanged, because a fabricated world can show that behaviour changed, never that it did not.
"""

from __future__ import annotations

import ast
import symtable
import textwrap
from typing import NamedTuple

from orchestrator.fingerprint import normalise

# Calls and attributes through which code can see its own local variables' names.
_INTROSPECTION_CALLS = frozenset({"locals", "vars", "dir", "eval", "exec"})
_INTROSPECTION_ATTRIBUTES = frozenset({"f_locals", "_getframe", "currentframe"})


class ProofForm(NamedTuple):
    """A definition's canonical form for the equivalence proof.

    Attributes:
        text: ``ast.dump`` of the normalised AST with renameable locals renamed; equal texts
            mean equivalent definitions.
        tokens: sorted ``kind:value`` strings of its literals (``const:``), operators
            (``op:``), comparisons (``cmp:``) and called names (``call:``, after renaming).
    """

    text: str
    tokens: tuple[str, ...]


def proof_form(stmt: ast.stmt) -> ProofForm:
    """The proof form of one top-level statement or class member (left unmodified).

    Raises:
        SyntaxError: the statement's source does not compile (never treated as equivalent).
    """
    source = textwrap.dedent(ast.unparse(stmt))
    tree = ast.parse(source)
    renamed = _renameable(tree, symtable.symtable(source, "<definition>", "exec"))
    mapping: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and node.id in renamed:
            node.id = mapping.setdefault(node.id, f"<local {len(mapping)}>")
    text = normalise(tree)  # also drops docstrings, in place, after the walk above
    return ProofForm(text, tuple(sorted(_tokens(tree))))


def _renameable(tree: ast.Module, top: symtable.SymbolTable) -> frozenset[str]:
    """Names that may be renamed consistently throughout ``tree`` (see the module rules)."""
    fixed: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and node.id in _INTROSPECTION_CALLS:
            return frozenset()
        if isinstance(node, ast.Attribute) and node.attr in _INTROSPECTION_ATTRIBUTES:
            return frozenset()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            fixed.add(node.name)
        elif isinstance(node, ast.alias):
            fixed.add((node.asname or node.name).split(".")[0])
        elif isinstance(node, ast.ExceptHandler) and node.name:
            fixed.add(node.name)
        elif isinstance(node, (ast.Global, ast.Nonlocal)):
            fixed.update(node.names)
        elif isinstance(node, ast.arg):
            fixed.add(node.arg)
        elif isinstance(node, (ast.MatchAs, ast.MatchStar)) and node.name:
            fixed.add(node.name)
        elif isinstance(node, ast.MatchMapping) and node.rest:
            fixed.add(node.rest)
    fixed.update(s.get_name() for s in top.get_symbols())  # module level: never renamed
    local: set[str] = set()
    stack = list(top.get_children())
    while stack:
        table = stack.pop()
        stack.extend(table.get_children())
        is_function = table.get_type() == "function"
        for symbol in table.get_symbols():
            name = symbol.get_name()
            if not is_function or symbol.is_parameter() or symbol.is_global():
                fixed.add(name)
            elif symbol.is_local():
                local.add(name)
            elif not symbol.is_free():
                fixed.add(name)
    return frozenset(local - fixed)


def _tokens(tree: ast.AST) -> list[str]:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant):
            out.append(f"const:{type(node.value).__name__}:{node.value!r}")
        elif isinstance(node, (ast.BinOp, ast.AugAssign, ast.UnaryOp, ast.BoolOp)):
            out.append(f"op:{type(node.op).__name__}")
        elif isinstance(node, ast.Compare):
            out.append("cmp:" + ",".join(type(op).__name__ for op in node.ops))
        elif isinstance(node, ast.Call):
            out.append(f"call:{ast.unparse(node.func)}")
    return out


__all__ = ["ProofForm", "proof_form"]
