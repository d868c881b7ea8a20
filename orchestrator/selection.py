"""Selecting calculations, dbt style: ``--select`` and ``--exclude`` terms over the manifest.

A term is a calculation name; ``+name`` (it and its whole upstream), ``name+`` (it and its
whole downstream), ``+name+`` (both); ``product_line:X`` (the calculations of a product line);
``category:Y`` (of a category). One ``--select`` may hold several space-separated terms; all
the terms of all ``--select`` options are a union, and ``--exclude`` terms (the same grammar)
are removed from it. No ``--select``: every calculation.

A selection limits what *executes*, never what a cell is decided from: the plan covers every
calculation, a selected cell whose unselected upstream must run first waits for it (BLOCKED,
WAITING_ON_UPSTREAM) instead of being computed on stale inputs, and the cells outside the
selection are counted as outside, neither run nor failed.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence

from orchestrator.errors import ConfigError
from orchestrator.manifest import Manifest


class SelectionError(ConfigError):
    """A selection term names no calculation, product line or category (exit 2)."""


def _terms(expressions: Iterable[str]) -> list[str]:
    return [term for expression in expressions for term in expression.split()]


def _hint(word: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, sorted(known), n=3)
    return f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""


def _one(manifest: Manifest, term: str) -> set[str]:
    """The calculations one term selects.

    Raises:
        SelectionError: the term names nothing known.
    """
    calcs = manifest.calcs
    for prefix, attribute in (("product_line:", "product_lines"), ("category:", "category")):
        if term.startswith(prefix):
            value = term[len(prefix) :]
            found = {
                n
                for n, spec in calcs.items()
                if (
                    value in spec.product_lines
                    if attribute == "product_lines"
                    else spec.category == value
                )
            }
            if not found:
                known = (
                    {p for spec in calcs.values() for p in spec.product_lines}
                    if attribute == "product_lines"
                    else {spec.category for spec in calcs.values()}
                )
                what = prefix.rstrip(":").replace("_", " ")
                raise SelectionError(
                    f"--select/--exclude {term!r}: no calculation has {what} {value!r}"
                    + (_hint(value, known) or f" (known: {', '.join(sorted(known)) or 'none'})")
                )
            return found
    up, down = term.startswith("+"), term.endswith("+") and len(term) > 1
    name = term[1 if up else 0 : len(term) - 1 if down else len(term)]
    if name not in calcs:
        raise SelectionError(
            f"--select/--exclude {term!r}: unknown calculation {name!r}" + _hint(name, calcs)
        )
    selected = {name}
    if up:
        selected |= manifest.upstream([name])
    if down:
        selected |= manifest.downstream([name])
    return selected


def resolve_selection(
    manifest: Manifest, select: Sequence[str] = (), exclude: Sequence[str] = ()
) -> frozenset[str] | None:
    """The calculations ``select`` minus ``exclude`` pick (see the module docstring); None
    when neither is given (everything).

    Raises:
        SelectionError: a term names nothing known.
    """
    if not select and not exclude:
        return None
    chosen: set[str] = set(manifest.calcs) if not _terms(select) else set()
    for term in _terms(select):
        chosen |= _one(manifest, term)
    for term in _terms(exclude):
        chosen -= _one(manifest, term)
    return frozenset(chosen)
