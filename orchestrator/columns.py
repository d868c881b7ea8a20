"""Columnar results: a standard cell's users × fields as typed columns, stored and hashed.

A standard cell's result is a ``Table``: its users (ascending ids) and one ``Column`` per
field. Both calculation forms produce one — the per-user form's dicts are turned into columns
(``Table.from_results``), the columnar form's arrays are columns already — so a block reader
gets NumPy arrays without decoding a dict per user, and the per-user view still sees dicts
(``Table.pairs``).

Column kinds (``Column.kind``):

========  ==========================================  ==================================
kind      values                                      null
========  ==========================================  ==================================
``f8``    float64 ndarray                             NaN (NaN *is* the null of a float)
``i8``    int64 ndarray + ``valid`` mask              ``valid`` False
``b1``    bool ndarray + ``valid`` mask               ``valid`` False
``str``   list of str                                 None
``json``  list of JSON values (mixed or nested)       None
``null``  list of None (every value null)             —
========  ==========================================  ==================================

Any column may have a ``present`` mask: False where a user's dict has no such key (a failed
user's result holds only ``__failed__``; a per-user calculation may return different keys).

NaN is a first-class value: in a float column it is the null, exactly as in NumPy/pandas, so a
NaN of the columnar form and a ``None`` of the per-user form are the same stored value, and a
per-user reader sees ``None`` for it. Validation counts it as a null (the null-density rule);
±Inf is a non-finite value, rejected unless the calculation ``allow_nan``. In the per-user
form a NaN *float* is still rejected unless ``allow_nan`` (it is usually a 0/0 bug; ``None``
is the explicit null), counted by ``Column.nans``.

**The result hash** (``fingerprint.ColumnHasher``, format ``RESULT_FORMAT``) is over a
canonical byte stream per column that depends on the values only — not on a column's
storage kind, nor on where shards were cut, nor on how many workers computed it:

* every value is one 9-byte record ``tag + payload`` (little-endian u64): ``N`` null (a float
  NaN, a None), ``M`` missing key, ``f`` float (IEEE-754 bits, ``-0.0`` folded into ``0.0``),
  ``i`` int64, ``b`` bool (0/1), ``s`` str (payload: UTF-8 length; the bytes go to the
  column's side stream), ``j`` anything else (payload: length of its canonical JSON text, in
  the side stream). A JSON-kind column tags each value by its own type, so ``1.5`` is ``f``
  whichever kind the shard holding it chose;
* users are a ``str`` stream of their own;
* the digest is ``xxh3_128(encode("result") + encode(RESULT_FORMAT) + encode([n, users,
  [[name, records, side], ...]]))`` with the per-stream xxh3-128 digests, columns by name.

Stored bytes (``encode_table``, zstandard-compressed by the shard writer): ``MAGIC``, a u32
header length, a JSON header ``{"n", "users", "columns": [[name, kind, has_valid,
has_present, values-if-str/json]]}`` and then, per column in order, its numeric buffers
(values; ``valid`` and ``present`` masks as one byte per user when flagged).
"""

from __future__ import annotations

import bisect
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from operator import itemgetter
from typing import Any

import numpy as np

from orchestrator.fingerprint import users_memo

MAGIC = b"OCOL1\n"
KINDS = ("f8", "i8", "b1", "str", "json", "null")
_I64_MIN, _I64_MAX = -(2**63), 2**63 - 1
_MISSING = object()


@dataclass(slots=True)
class Column:
    """One field of a cell over its users (see the module docstring for ``kind``).

    Attributes:
        kind: one of ``KINDS``.
        values: ndarray (``f8``/``i8``/``b1``, length n) or list (``str``/``json``/``null``).
        valid: bool ndarray, False where an ``i8``/``b1`` value is null; None: all valid.
        present: bool ndarray, False where the user's result has no such key; None: all.
        nans: NaN floats the per-user form returned (validation only; never stored).
    """

    kind: str
    values: Any
    valid: np.ndarray | None = None
    present: np.ndarray | None = None
    nans: int = 0

    def __len__(self) -> int:
        return len(self.values)

    def take(self, index: np.ndarray) -> Column:
        """The column at positions ``index`` (an int array)."""

        def pick(mask: np.ndarray | None) -> np.ndarray | None:
            return None if mask is None else mask[index]

        if isinstance(self.values, np.ndarray):
            values: Any = self.values[index]
        else:
            values = [self.values[i] for i in index.tolist()]
        return Column(self.kind, values, pick(self.valid), pick(self.present))

    def python(self) -> list[Any]:
        """The values as Python objects (null as None; missing keys included as None)."""
        if self.kind == "f8":
            out = self.values.tolist()
            nan = np.isnan(self.values)
            if nan.any():
                for i in np.flatnonzero(nan).tolist():
                    out[i] = None
            return out
        if self.kind in ("i8", "b1"):
            out = self.values.tolist()
            if self.valid is not None:
                for i in np.flatnonzero(~self.valid).tolist():
                    out[i] = None
            return out
        values = list(self.values)
        if self.kind == "json":  # a top-level NaN is the null, whatever the column's kind
            for i, v in enumerate(values):
                if isinstance(v, float) and math.isnan(v):
                    values[i] = None
        return values

    def floats(self) -> np.ndarray:
        """The values as float64 (null: NaN); for ``f8``/``i8``/``b1``/``null`` columns.

        Raises:
            TypeError: a ``str`` or ``json`` column.
        """
        if self.kind == "f8":
            out = self.values
        elif self.kind in ("i8", "b1"):
            out = self.values.astype(np.float64)
            if self.valid is not None:
                out[~self.valid] = np.nan
        elif self.kind == "null":
            out = np.full(len(self.values), np.nan)
        else:
            raise TypeError(f"a {self.kind} column has no float view")
        if self.present is not None:
            out = np.where(self.present, out, np.nan)
        return out


def column_of(values: Sequence[Any] | np.ndarray) -> Column:
    """The column of ``values``: a NumPy array (float, int, bool, or object/str; a masked
    array's masked values are nulls) or a list of Python values (None for null), kind
    inferred from the types present.

    Raises:
        TypeError: a NumPy array of an unsupported dtype (complex, datetime, ...).
    """
    if isinstance(values, np.ma.MaskedArray):  # a masked value is a null of any kind
        mask = np.ma.getmaskarray(values)
        col = column_of(np.ma.getdata(values))
        if mask.any():
            if col.kind == "f8":
                col.values = np.where(mask, np.nan, col.values)
            elif col.kind in ("i8", "b1"):
                col.valid = ~mask
            else:
                col = column_of([None if m else v for v, m in zip(col.values, mask.tolist())])
        return col
    if isinstance(values, np.ndarray):
        if values.ndim != 1:
            raise TypeError(f"a column is 1-D, got an array of shape {values.shape}")
        k = values.dtype.kind
        if k == "f":
            return Column("f8", values.astype(np.float64, copy=False))
        if k in "iu":
            if k == "u" and len(values) and int(values.max()) > _I64_MAX:
                return column_of(values.tolist())  # past int64: Python ints, as per user
            return Column("i8", values.astype(np.int64, copy=False))
        if k == "b":
            return Column("b1", values.astype(bool, copy=False))
        if k in "OUS":
            return column_of(values.tolist())
        raise TypeError(f"results cannot hold a NumPy array of dtype {values.dtype}")
    vals = list(values)
    kinds = set(map(type, vals))
    kinds.discard(type(None))
    if not kinds:
        return Column("null", [None] * len(vals))
    if all(issubclass(k, float) or issubclass(k, np.floating) for k in kinds):
        arr = np.array([math.nan if v is None else v for v in vals], dtype=np.float64)
        nans = int(np.isnan(arr).sum()) - vals.count(None)
        return Column("f8", arr, nans=nans)
    if all(
        (issubclass(k, int) or issubclass(k, np.integer)) and not issubclass(k, (bool, np.bool_))
        for k in kinds
    ):
        ints = [0 if v is None else int(v) for v in vals]
        if min(ints) >= _I64_MIN and max(ints) <= _I64_MAX:
            valid = None if len(kinds) == len(set(map(type, vals))) else _not_none(vals)
            return Column("i8", np.array(ints, dtype=np.int64), valid)
    elif all(issubclass(k, (bool, np.bool_)) for k in kinds):
        valid = None if len(kinds) == len(set(map(type, vals))) else _not_none(vals)
        return Column("b1", np.array([bool(v) for v in vals], dtype=bool), valid)
    elif kinds == {str}:
        return Column("str", vals)
    return Column("json", vals, nans=sum(1 for v in vals if type(v) is float and math.isnan(v)))


def _not_none(values: list[Any]) -> np.ndarray:
    return np.fromiter((v is not None for v in values), dtype=bool, count=len(values))


@dataclass(slots=True)
class Table:
    """A standard cell's result, or a slice of it: users ascending, one column per field.

    Attributes:
        users: user ids, ascending, unique (length n).
        columns: field name -> ``Column`` of length n.
    """

    users: list[str]
    columns: dict[str, Column]

    def __len__(self) -> int:
        return len(self.users)

    @classmethod
    def from_results(cls, users: list[str], results: Sequence[Mapping[str, Any]]) -> Table:
        """The table of per-user result dicts (``results[i]`` is ``users[i]``'s).

        Raises:
            TypeError: a value a column cannot hold (see ``column_of``).
        """
        columns: dict[str, Column] = {}
        if results:
            names: set[str] = set().union(*results)
            for name in sorted(names):
                try:
                    values = list(map(itemgetter(name), results))  # every result has it
                    present = None
                except KeyError:
                    values = [r.get(name, _MISSING) for r in results]
                    present = np.fromiter(
                        (v is not _MISSING for v in values), dtype=bool, count=len(values)
                    )
                    values = [None if v is _MISSING else v for v in values]
                col = column_of(values)
                col.present = present
                columns[name] = col
        return cls(list(users), columns)

    def take(self, index: np.ndarray) -> Table:
        """The rows at positions ``index`` (ascending ints), columns missing there dropped."""
        n = len(index)
        if n and int(index[-1]) - int(index[0]) == n - 1:  # a run of rows: a list slice
            users = _slice(self.users, int(index[0]), int(index[-1]) + 1)
        else:
            users = [self.users[i] for i in index.tolist()]
        columns = {}
        for name, col in self.columns.items():
            part = col.take(index)
            if part.present is not None:
                if not part.present.any():
                    continue
                if part.present.all():
                    part.present = None
            columns[name] = part
        return Table(users, columns)

    def between(self, lo: str | None, hi: str | None) -> Table:
        """The rows with ``lo <= user < hi`` (None: unbounded; users are ascending), every
        column kept (a column nobody in the range has stays, all absent): a reader of the
        range sees the fields the whole result has."""
        a = 0 if lo is None else bisect.bisect_left(self.users, lo)
        b = len(self.users) if hi is None else bisect.bisect_left(self.users, hi)
        if a == 0 and b == len(self.users):
            return self
        index = np.arange(a, b)
        columns = {name: col.take(index) for name, col in self.columns.items()}
        return Table(_slice(self.users, a, b), columns)

    def with_fields(self, fields: Mapping[str, bool]) -> Table:
        """This table with a column, absent for every user, for each field of ``fields``
        (name -> holds texts) it lacks."""
        missing = [name for name in fields if name not in self.columns]
        if not missing:
            return self
        n = len(self.users)
        columns = dict(self.columns)
        for name in missing:
            if fields[name]:
                columns[name] = Column("str", [None] * n, None, np.zeros(n, dtype=bool))
            else:
                columns[name] = Column("f8", np.full(n, np.nan), None, np.zeros(n, dtype=bool))
        return Table(self.users, columns)

    def pairs(self) -> list[tuple[str, dict[str, Any]]]:
        """``(user, result dict)`` per user, as the per-user form sees results: null values
        are None (a NaN float too), missing keys are absent."""
        names = list(self.columns)
        if not names:  # every user's result is {}: still one pair per user
            return [(user, {}) for user in self.users]
        lists = [self.columns[n].python() for n in names]
        if not any(self.columns[n].present is not None for n in names):
            if len(names) == 1:  # the common case, a display per user: ~3x dict(zip(...))
                name = names[0]
                return list(zip(self.users, [{name: v} for v in lists[0]]))
            return list(zip(self.users, (dict(zip(names, row)) for row in zip(*lists))))
        presents = [self.columns[n].present for n in names]
        out = []
        for i, user in enumerate(self.users):
            out.append(
                (
                    user,
                    {n: lst[i] for n, lst, p in zip(names, lists, presents) if p is None or p[i]},
                )
            )
        return out


# (id(users), start, stop) -> (users, users[start:stop]): tables cut alike from one users
# list (the calculations of a user range, shard by shard) share the slices, so their
# encodings are memoised by identity (``fingerprint.users_memo``).
_SLICES: dict[tuple[int, int, int], tuple[list[str], list[str]]] = {}
_SLICES_KEPT = 64


def _slice(users: list[str], start: int, stop: int) -> list[str]:
    key = (id(users), start, stop)
    found = _SLICES.get(key)
    if found is not None and found[0] is users:
        return found[1]
    part = users[start:stop]
    _SLICES[key] = (users, part)
    if len(_SLICES) > _SLICES_KEPT:
        del _SLICES[next(iter(_SLICES))]
    return part


def _flags(mask: np.ndarray | None, n: int) -> np.ndarray:
    return np.ones(n, dtype=bool) if mask is None else mask


def concat(tables: Sequence[Table]) -> Table:
    """One table of consecutive slices (users ascending across them), e.g. a cell's shards.
    Kinds are re-inferred from the values, so slices stored with different kinds join."""
    if len(tables) == 1:
        return tables[0]
    users = [u for t in tables for u in t.users]
    columns = {}
    for name in sorted({n for t in tables for n in t.columns}):
        parts = [t.columns.get(name) for t in tables]
        kinds = {c.kind if c is not None else None for c in parts}
        if len(kinds) == 1 and kinds <= {"f8", "i8", "b1"}:  # fixed width: join the arrays
            cols: list[Column] = parts  # type: ignore[assignment]
            merged = Column(cols[0].kind, np.concatenate([c.values for c in cols]))
            merged.nans = sum(c.nans for c in cols)
            if any(c.valid is not None for c in cols):
                merged.valid = np.concatenate([_flags(c.valid, len(c.values)) for c in cols])
            if any(c.present is not None for c in cols):
                merged.present = np.concatenate([_flags(c.present, len(c.values)) for c in cols])
            columns[name] = merged
            continue
        values: list[Any] = []
        present: list[bool] = []
        for t, col in zip(tables, parts):
            if col is None:
                values.extend([None] * len(t))
                present.extend([False] * len(t))
            else:
                values.extend(col.python())
                present.extend([True] * len(t) if col.present is None else col.present.tolist())
        merged = column_of(values)
        merged.present = None if all(present) else np.array(present, dtype=bool)
        columns[name] = merged
    return Table(users, columns)


# --- storage ------------------------------------------------------------------------------


def encode_table(table: Table) -> bytes:
    """The raw (uncompressed) stored bytes of ``table`` (layout: module docstring)."""
    header_cols = []
    buffers: list[bytes] = []
    for name, col in table.columns.items():
        has_valid = col.valid is not None and not col.valid.all()
        has_present = col.present is not None
        entry: list[Any] = [name, col.kind, has_valid, has_present]
        if col.kind in ("f8", "i8"):
            buffers.append(
                np.ascontiguousarray(
                    col.values, dtype="<f8" if col.kind == "f8" else "<i8"
                ).tobytes()
            )
        elif col.kind == "b1":
            buffers.append(np.ascontiguousarray(col.values, dtype=np.uint8).tobytes())
        elif col.kind in ("str", "json"):
            entry.append(col.values)
        if has_valid:
            buffers.append(col.valid.astype(np.uint8).tobytes())  # type: ignore[union-attr]
        if has_present:
            buffers.append(col.present.astype(np.uint8).tobytes())  # type: ignore[union-attr]
        header_cols.append(entry)
    # the bytes json.dumps({"n": .., "users": .., "columns": ..}) writes, users memoised
    header = b"".join(
        [
            b'{"n":%d,"users":' % len(table.users),
            _users_json(table.users),
            b',"columns":',
            _HEADER_JSON.encode(header_cols).encode(),
            b"}",
        ]
    )
    return b"".join([MAGIC, len(header).to_bytes(4, "little"), header, *buffers])


_HEADER_JSON = json.JSONEncoder(separators=(",", ":"), allow_nan=True)


@users_memo
def _users_json(users: Sequence[str]) -> bytes:
    """The JSON array of ``users``."""
    return _HEADER_JSON.encode(users).encode()


# header bytes -> parsed header: the dates of a calculation mostly share one header (same
# users, columns of fixed-width kinds), so their tables also share one users list object.
# Only headers without str/json values are kept: those values reach per-user code, which
# may change them in place.
_HEADER_MEMO: dict[bytes, Any] = {}
_HEADER_MEMO_SIZE = 8


def _parse_header(raw: bytes) -> Any:
    header = _HEADER_MEMO.get(raw)
    if header is None:
        header = json.loads(raw)
        if all(len(entry) == 4 for entry in header["columns"]):
            if len(_HEADER_MEMO) >= _HEADER_MEMO_SIZE:
                _HEADER_MEMO.pop(next(iter(_HEADER_MEMO)))
            _HEADER_MEMO[raw] = header
    return header


def is_table(raw: bytes) -> bool:
    """Whether ``raw`` (an uncompressed shard) holds a table, not JSON lines."""
    return raw[: len(MAGIC)] == MAGIC


def decode_table(raw: bytes) -> Table:
    """The table ``encode_table`` stored in ``raw``.

    Raises:
        ValueError: ``raw`` is not a stored table.
    """
    if not is_table(raw):
        raise ValueError("not a stored result table (no OCOL1 header)")
    start = len(MAGIC) + 4
    size = int.from_bytes(raw[len(MAGIC) : start], "little")
    header = _parse_header(raw[start : start + size])
    n = header["n"]
    pos = start + size
    view = memoryview(raw)

    def take(nbytes: int, dtype: str) -> np.ndarray:
        nonlocal pos
        arr = np.frombuffer(view[pos : pos + nbytes], dtype=dtype)
        pos += nbytes
        return arr

    columns = {}
    for entry in header["columns"]:
        name, kind, has_valid, has_present = entry[:4]
        if kind == "f8":
            values: Any = take(8 * n, "<f8")
        elif kind == "i8":
            values = take(8 * n, "<i8")
        elif kind == "b1":
            values = take(n, "u1").astype(bool)
        elif kind in ("str", "json"):
            values = entry[4]
        else:
            values = [None] * n
        valid = take(n, "u1").astype(bool) if has_valid else None
        present = take(n, "u1").astype(bool) if has_present else None
        columns[name] = Column(kind, values, valid, present)
    return Table(header["users"], columns)
