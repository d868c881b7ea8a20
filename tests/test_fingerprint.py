"""The canonical encoder and the code hash: golden values and must/must-not-change pairs."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from orchestrator.columns import Table, column_of
from orchestrator.fingerprint import (
    digest,
    encode,
    inputs_digest,
    normalised_source,
    result_hash_of,
    result_line,
    table_hash,
)


def test_golden_digests_pin_the_encoding() -> None:
    # Changing these means every stored fingerprint changes: bump HASH_FORMAT with a migration.
    assert digest("t", {"a": [1, 2.5, None, True, "x"]}) == "15f2f08c42cabfde120b21279a92acef"
    # A meta result: its canonical JSON line (RESULT_FORMAT 2).
    assert result_hash_of([result_line(None, {"r": 0.1})]) == "2cc45d7319aefc2930f54d0158219ab1"


def test_golden_table_hash_pins_the_column_records() -> None:
    # A standard result (RESULT_FORMAT 2): users and typed columns, NaN as the float null.
    # The per-user form's dicts and the columnar form's arrays give the same hash.
    golden = "eef5bcb41c9a1ecc6b84ecbce93a5e80"
    arrays = Table(
        ["AAPL", "MSFT"],
        {
            "r": column_of(np.array([0.1, np.nan])),
            "n": column_of(np.array([3, 4])),
            "s": column_of(["x", None]),
        },
    )
    dicts = Table.from_results(
        ["AAPL", "MSFT"], [{"r": 0.1, "n": 3, "s": "x"}, {"r": None, "n": 4, "s": None}]
    )
    assert table_hash([arrays]) == golden
    assert table_hash([dicts]) == golden


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (1, "1"),
        (1, 1.0),
        (1, True),
        (0, False),
        (None, ""),
        (("ab", "c"), ("a", "bc")),
        ([1, [2, 3]], [[1, 2], 3]),
        ({"a": 1}, [["a", 1]]),
        (b"x", "x"),
    ],
)
def test_distinct_values_encode_differently(a: object, b: object) -> None:
    assert encode(a) != encode(b)


def test_mappings_and_sets_are_order_independent() -> None:
    assert encode({"a": 1, "b": 2}) == encode({"b": 2, "a": 1})
    assert encode({3, 1, 2}) == encode({2, 3, 1})


def test_float_rules() -> None:
    assert encode(-0.0) == encode(0.0)
    assert encode(float("nan")) == encode(-math.nan)
    assert encode(0.1 + 0.2) != encode(0.3)


def test_unknown_types_are_rejected() -> None:
    with pytest.raises(TypeError):
        encode(object())
    with pytest.raises(TypeError):
        result_line("u", {"x": object()})


def test_domain_tags_separate_digests() -> None:
    assert digest("code", [1]) != digest("result", [1])


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
        lambda children: st.lists(children) | st.dictionaries(st.text(), children),
        max_leaves=20,
    )
)
def test_encoding_is_injective_on_round_trip(value: object) -> None:
    # Equal encodings for equal values, and a value never encodes like its string form.
    assert encode(value) == encode(value)
    if not isinstance(value, str):
        assert encode(value) != encode(str(value))


def test_inputs_digest_depends_on_every_part_and_its_position() -> None:
    h1, h2 = "a" * 32, "b" * 32
    shape = digest("shape", ["x"])
    assert inputs_digest(shape, [h1, h2]) != inputs_digest(shape, [h2, h1])
    assert inputs_digest(shape, [h1]) != inputs_digest(digest("shape", ["y"]), [h1])


def test_result_lines_are_canonical() -> None:
    assert result_line("u", {"b": 1, "a": [1.5, None]}) == b'["u",{"a":[1.5,null],"b":1}]\n'
    assert result_line(None, {"k": "é\n"}) == b'[null,{"k":"\\u00e9\\n"}]\n'


SOURCE = '''
class C:
    """Doc."""
    period = 14  # comment

    def process(self, ctx):
        # why
        x = ctx * 2
        return {"x": x}
'''


def test_comments_docstrings_and_formatting_do_not_change_the_normal_form() -> None:
    variant = '''
class C:

    period   =   14

    def process(self, ctx):
        """Another docstring."""
        x = (ctx *
             2)
        return {'x': x}
'''
    assert normalised_source(SOURCE) == normalised_source(variant)


@pytest.mark.parametrize(
    "edit",
    [
        ("period = 14", "period = 15"),
        ("ctx * 2", "ctx * 3"),
        ('{"x": x}', '{"y": x}'),
    ],
)
def test_logic_edits_change_the_normal_form(edit: tuple[str, str]) -> None:
    assert normalised_source(SOURCE) != normalised_source(SOURCE.replace(*edit))
