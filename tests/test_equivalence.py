"""The proof that a code change is cosmetic: equal normalised AST up to renamed locals.

Pairs that must and must not be equivalent, and two properties over random programs: a
consistent renaming of locals is always proven equivalent, and whenever two programs are
proven equivalent they compute the same values (renamings that collide with a parameter, a
global or each other included).
"""

from __future__ import annotations

import ast
import textwrap

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.equivalence import proof_form


def form(source: str) -> str:
    return proof_form(ast.parse(textwrap.dedent(source)).body[0]).text


EQUIVALENT = [
    (  # a local renamed, a comment and a docstring added
        "def f(self, ctx):\n    closes = [r['close'] for r in ctx.rows]\n    return sum(closes)",
        (
            "def f(self, ctx):\n    '''Sum.'''\n    prices = [r['close'] for r in ctx.rows]  # c\n"
            "    return sum(prices)"
        ),
    ),
    (  # a comprehension variable renamed
        "def f(rows):\n    return [r * 2 for r in rows]",
        "def f(rows):\n    return [row * 2 for row in rows]",
    ),
    (  # a closed-over variable renamed in both scopes
        "def f():\n    x = 1\n    def g():\n        return x\n    return g()",
        "def f():\n    y = 1\n    def g():\n        return y\n    return g()",
    ),
    (  # loop, with and walrus targets
        (
            "def f(a):\n    t = 0\n    for v in a:\n        if (w := v * 2) > 1:\n            t += w\n"
            "    return t"
        ),
        (
            "def f(a):\n    s = 0\n    for i in a:\n        if (j := i * 2) > 1:\n            s += j\n"
            "    return s"
        ),
    ),
]

NOT_EQUIVALENT = [
    ("def f(avg):\n    return avg > 100000", "def f(avg):\n    return avg > 150000"),  # literal
    ("def f(a, b):\n    return a - b", "def f(a, b):\n    return a + b"),  # operator
    ("def f(a, b):\n    return a < b", "def f(a, b):\n    return a <= b"),  # comparison
    ("def f(a):\n    return min(a)", "def f(a):\n    return max(a)"),  # called name
    ("def f(a, b):\n    return a - b", "def f(a, b):\n    return b - a"),  # operands swapped
    ("def f(ctx):\n    return ctx.x", "def f(c):\n    return c.x"),  # a parameter renamed
    (  # a global x vs a global y: a comprehension variable must not merge them
        "def f(a):\n    return [x for x in a] + [x]",
        "def f(a):\n    return [y for y in a] + [y]",
    ),
    (  # renamed onto a global the function reads: a different program
        "def f(a):\n    t = a\n    return t + G",
        "def f(a):\n    G = a\n    return G + G",
    ),
    (  # introspection sees local names: nothing is renamed
        "def f():\n    x = 1\n    return locals()",
        "def f():\n    y = 1\n    return locals()",
    ),
    (  # statements reordered
        "def f(a):\n    x = a.pop()\n    y = a.pop()\n    return x - y",
        "def f(a):\n    y = a.pop()\n    x = a.pop()\n    return x - y",
    ),
    ("X = 1", "X = 2"),  # a module constant
]


@pytest.mark.parametrize(("old", "new"), EQUIVALENT)
def test_renamed_locals_are_proven_equivalent(old: str, new: str) -> None:
    assert form(old) == form(new)


@pytest.mark.parametrize(("old", "new"), NOT_EQUIVALENT)
def test_other_edits_are_not_equivalent(old: str, new: str) -> None:
    assert form(old) != form(new)


def test_tokens_list_literals_operators_comparisons_and_calls() -> None:
    tokens = proof_form(ast.parse("def f(a):\n    return max(a) > 3 * a[0]").body[0]).tokens
    assert tokens == (
        "call:max",
        "cmp:Gt",
        "const:int:0",
        "const:int:3",
        "op:Mult",
    )


# --- random programs ---------------------------------------------------------------------

GLOBAL = "G"
PARAM = "a"
POOL = ["x", "y", "z", "t", PARAM, GLOBAL]  # renamings may collide with the param or global


@st.composite
def programs(draw: st.DrawFn) -> list[tuple[int, list[object]]]:
    """Statements ``local_i = e1 <op> e2``; operands are earlier locals (int index), the
    parameter, the global, or small ints."""
    count = draw(st.integers(1, 4))
    body: list[tuple[int, list[object]]] = []
    for i in range(count):
        operand = st.one_of(
            st.integers(0, i - 1) if i else st.nothing(),
            st.sampled_from([PARAM, GLOBAL]),
            st.integers(-3, 3).map(lambda n: ("lit", n)),
        )
        body.append(
            (draw(st.integers(0, count - 1)), draw(st.lists(operand, min_size=2, max_size=3)))
        )
    return body


def render(body: list[tuple[int, list[object]]], names: list[str]) -> str:
    assigned: set[int] = set()
    lines = []
    for target, operands in body:
        parts = []
        for op in operands:
            if isinstance(op, int):  # an earlier local: only once it is assigned
                parts.append(names[op] if op in assigned else "0")
            elif isinstance(op, tuple):
                parts.append(f"({op[1]})")
            else:
                parts.append(op)
        lines.append(f"    {names[target]} = {' - '.join(parts)}")
        assigned.add(target)
    last = body[-1][0]
    return f"def f({PARAM}):\n" + "\n".join(lines) + f"\n    return {names[last]}, {GLOBAL}"


def evaluate(source: str) -> object:
    namespace: dict[str, object] = {GLOBAL: 7}
    exec(compile(source, "<program>", "exec"), namespace)  # noqa: S102 - generated code
    try:
        return namespace["f"](3)  # type: ignore[operator]
    except UnboundLocalError:
        return "unbound"


@settings(max_examples=300, deadline=None)
@given(programs(), st.permutations(["p0", "p1", "p2", "p3"]))
def test_a_consistent_renaming_of_locals_is_proven_equivalent(body, renamed) -> None:
    base = render(body, ["l0", "l1", "l2", "l3"])
    assert form(base) == form(render(body, list(renamed)))


@settings(max_examples=500, deadline=None)
@given(programs(), programs(), st.lists(st.sampled_from(POOL), min_size=4, max_size=4))
def test_proven_equivalent_programs_compute_the_same_values(one, two, names) -> None:
    # Any two programs — different bodies, or one body with colliding names — that the proof
    # calls equivalent must agree on every value they compute.
    first = render(one, ["l0", "l1", "l2", "l3"])
    for second in (render(one, names), render(two, names), render(two, ["l0", "l1", "l2", "l3"])):
        if form(first) == form(second):
            assert evaluate(first) == evaluate(second), (first, second)
