"""All hashing of the audit chain: canonical encoding, code hash, result hash, fingerprints.

Design:

* ``encode(value)`` is the one canonical encoder for structured values: type-tagged and
  length-prefixed, mappings sorted by encoded key, floats by their IEEE-754 bits (``-0.0``
  folded into ``0.0``, every NaN into one NaN), unknown types rejected with ``TypeError``.
  ``digest(tag, value)`` hashes ``tag`` plus the encoding with xxh3-128, so two domains never
  collide by construction.
* Results are JSON by contract; they are stored and hashed as JSON lines in one canonical form
  (``result_line``: sorted keys, no whitespace, shortest round-trip floats). ``json`` escapes
  newlines, so a ``\\n`` terminator makes the concatenation unambiguous, and one C-speed
  serialisation serves storage and hashing alike (the shards hold the very bytes hashed).
* ``normalise`` gives the canonical text of a definition through the AST: comments,
  docstrings, formatting and line numbers do not count. ``lineage.trace`` uses it to collect
  the definitions a calculation is built from (code, layers, packages).

Changing any rule here changes stored fingerprints: bump ``HASH_FORMAT`` and say so in the
migration notes.
"""

from __future__ import annotations

import ast
import json
import math
import struct
import sys
import textwrap
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import xxhash

HASH_FORMAT = 1
RESULT_FORMAT = 2  # 2: standard results as typed columns (columns.py)
_NAN = struct.pack(">d", math.nan)


def encode(value: Any) -> bytes:
    """Canonical bytes of ``value`` (None, bool, int, float, str, bytes, list/tuple, dict, set).

    Raises:
        TypeError: for any other type (never silently ``str()`` it).
    """
    out = bytearray()
    _encode_into(value, out)
    return bytes(out)


def _encode_into(value: Any, out: bytearray) -> None:
    # bool before int: bool is an int subclass and True must not equal 1.
    if value is None:
        out += b"N"
    elif value is True:
        out += b"T"
    elif value is False:
        out += b"F"
    elif isinstance(value, int):
        raw = str(value).encode()
        out += b"i" + len(raw).to_bytes(4, "big") + raw
    elif isinstance(value, float):
        if math.isnan(value):
            out += b"f" + _NAN
        else:
            out += b"f" + struct.pack(">d", value + 0.0)
    elif isinstance(value, str):
        raw = value.encode()
        out += b"s" + len(raw).to_bytes(4, "big") + raw
    elif isinstance(value, bytes):
        out += b"b" + len(value).to_bytes(4, "big") + value
    elif isinstance(value, (list, tuple)):
        out += b"l" + len(value).to_bytes(4, "big")
        for item in value:
            _encode_into(item, out)
    elif isinstance(value, Mapping):
        items = sorted((encode(k), v) for k, v in value.items())
        out += b"d" + len(items).to_bytes(4, "big")
        for key, item in items:
            out += key
            _encode_into(item, out)
    elif isinstance(value, (set, frozenset)):
        members = sorted(encode(v) for v in value)
        out += b"S" + len(members).to_bytes(4, "big")
        for member in members:
            out += member
    else:
        raise TypeError(f"cannot canonically encode a value of type {type(value).__name__}")


def digest(tag: str, value: Any) -> str:
    """xxh3-128 hex digest (32 chars) of ``tag`` and the canonical encoding of ``value``."""
    return xxhash.xxh3_128_hexdigest(encode(tag) + encode(value))


# --- results ------------------------------------------------------------------------------


_JSON = json.JSONEncoder(sort_keys=True, separators=(",", ":"), allow_nan=True)
try:  # the C encoder called directly: half the cost of json.dumps per line, same output
    from json.encoder import (  # type: ignore[attr-defined]
        c_make_encoder,
        encode_basestring_ascii,
    )

    _c_encode = c_make_encoder(
        None, _JSON.default, encode_basestring_ascii, None, ":", ",", True, False, True
    )

    def _canonical_json(value: Any) -> str:
        return "".join(_c_encode(value, 0))

except (ImportError, TypeError):  # pragma: no cover - interpreters without the C accelerator
    _canonical_json = _JSON.encode  # type: ignore[assignment]


def result_line(user: str | None, result: Any) -> bytes:
    """One canonical JSON line ``[user, result]\\n`` (``user`` None for a meta result).

    Canonical: keys sorted, no whitespace, ASCII-escaped strings, shortest round-trip floats.

    Raises:
        TypeError: the result holds a value JSON cannot represent (e.g. a numpy int64).
    """
    return (_canonical_json([user, result]) + "\n").encode()


class ResultHasher:
    """Incremental result hash over the canonical lines of a cell, fed in user order."""

    __slots__ = ("_h",)

    def __init__(self) -> None:
        self._h = xxhash.xxh3_128()
        self._h.update(encode("result") + encode(RESULT_FORMAT))

    def update(self, lines: bytes) -> None:
        self._h.update(lines)

    def hexdigest(self) -> str:
        return self._h.hexdigest()


def result_hash_of(lines: Iterable[bytes]) -> str:
    """Result hash of a whole cell given its canonical lines in user order."""
    hasher = ResultHasher()
    for line in lines:
        hasher.update(line)
    return hasher.hexdigest()


# --- columnar results (format 2: ``columns.py``) -------------------------------------------

_RECORD = np.dtype([("t", "u1"), ("v", "<u8")])  # packed: 9 bytes per value
_N, _M, _F, _I, _B, _S, _J = (ord(c) for c in "NMfibsj")
_I64_MIN, _I64_MAX = -(2**63), 2**63 - 1


def _str_records(values: Sequence[str | None]) -> tuple[np.ndarray, bytes]:
    rec = np.zeros(len(values), dtype=_RECORD)
    texts = [v for v in values if v is not None]
    joined = "".join(texts)
    side = joined.encode()
    if len(texts) == len(values):
        rec["t"] = _S
        if len(side) == len(joined):  # ASCII: character counts are byte counts
            rec["v"] = np.fromiter(map(len, texts), dtype=np.uint64, count=len(texts))
        else:
            rec["v"] = [len(t.encode()) for t in texts]
        return rec, side
    for i, v in enumerate(values):
        if v is None:
            rec[i] = (_N, 0)
        else:
            rec[i] = (_S, len(v.encode()))
    return rec, side


def _json_records(values: Sequence[Any]) -> tuple[np.ndarray, bytes]:
    rec = np.zeros(len(values), dtype=_RECORD)
    side = []
    for i, v in enumerate(values):
        t = type(v)
        if v is None:
            rec[i] = (_N, 0)
        elif t is bool or isinstance(v, np.bool_):
            rec[i] = (_B, int(v))
        elif (t is int or isinstance(v, (int, np.integer))) and _I64_MIN <= v <= _I64_MAX:
            rec[i] = (_I, int(v) & 0xFFFFFFFFFFFFFFFF)
        elif isinstance(v, (float, np.floating)):
            rec[i] = (_N, 0) if math.isnan(v) else (_F, _float_bits(float(v)))
        elif t is str:
            raw = v.encode()
            rec[i] = (_S, len(raw))
            side.append(raw)
        else:
            raw = _JSON.encode(v).encode()
            rec[i] = (_J, len(raw))
            side.append(raw)
    return rec, b"".join(side)


def _float_bits(x: float) -> int:
    return int(np.array([x + 0.0], dtype="<f8").view("<u8")[0])


def records(col: Any) -> tuple[bytes, bytes]:
    """The canonical value records and side stream of a column (module docstring)."""
    n = len(col)
    side = b""
    if col.kind == "f8":
        rec = np.zeros(n, dtype=_RECORD)
        v = np.asarray(col.values, dtype=np.float64)
        nan = np.isnan(v)
        rec["t"] = np.where(nan, _N, _F)
        bits = (v + 0.0).view(np.uint64).copy()  # + 0.0 folds -0.0 into 0.0
        bits[nan] = 0
        rec["v"] = bits
    elif col.kind in ("i8", "b1"):
        rec = np.zeros(n, dtype=_RECORD)
        rec["t"] = _I if col.kind == "i8" else _B
        rec["v"] = np.asarray(col.values).astype(np.int64).view(np.uint64)
        if col.valid is not None:
            rec["t"][~col.valid] = _N
            rec["v"][~col.valid] = 0
    elif col.kind in ("str", "json"):
        values = col.values
        if col.present is not None:  # a missing key's stored value is no value at all
            values = [v if here else None for v, here in zip(values, col.present.tolist())]
        rec, side = (_str_records if col.kind == "str" else _json_records)(values)
    else:
        rec = np.zeros(n, dtype=_RECORD)
        rec["t"] = _N
    if col.present is not None:
        rec["t"][~col.present] = _M
        rec["v"][~col.present] = 0
    return rec.tobytes(), side


# Users lists whose encodings ``users_memo`` keeps: the shards of one user range of the
# calculations of a pass hold the same users (a range is ~13 shards of 5,000 users).
MEMO_LISTS = 64


def users_memo(fn: Callable[[Sequence[str]], Any]) -> Callable[[Sequence[str]], Any]:
    """``fn`` memoised on a users list's content, for the last ``MEMO_LISTS`` lists.

    A block's dates share one list object, and so do the shards of the calculations of one
    user range (``columns.Table.take`` shares slices): an identity check, no copy. Other
    lists with the same users hit on a tuple of the list (its strings' hashes are cached, so
    the key costs a few ns per user, against ~100 ns per user to encode). Tables never change
    their users in place."""
    memo: dict[tuple[str, ...], Any] = {}  # oldest first (a tuple's hash is not cached)
    # id -> (the list, its length, the value): held, so an id is not reused meanwhile
    seen: dict[int, tuple[Sequence[str], int, Any]] = {}

    def cached(users: Sequence[str]) -> Any:
        found = seen.get(id(users))
        if found is not None and found[0] is users and found[1] == len(users):
            return found[2]
        key = tuple(users)
        hit = memo.get(key)
        if hit is None:
            hit = memo[key] = fn(users)
            if len(memo) > MEMO_LISTS:
                del memo[next(iter(memo))]
        seen[id(users)] = (users, len(users), hit)
        if len(seen) > MEMO_LISTS:
            del seen[next(iter(seen))]
        return hit

    return cached


@users_memo
def _users_records(users: Sequence[str]) -> tuple[bytes, bytes]:
    """``_str_records`` of a table's users, as bytes."""
    rec, side = _str_records(users)
    return rec.tobytes(), side


_MISSING_RECORD = np.array([(_M, 0)], dtype=_RECORD).tobytes()


class ColumnHasher:
    """Incremental result hash of a standard cell, fed consecutive ``columns.Table`` slices
    in user order (``update_table``, or stored shard bytes through ``update``). Independent
    of where the slices are cut and of their columns' storage kinds (``columns.py`` defines
    the records; ``RESULT_FORMAT`` versions them)."""

    __slots__ = ("_cols", "_format", "_n", "_users")

    def __init__(self, result_format: int = RESULT_FORMAT) -> None:
        self._format = result_format
        self._n = 0
        self._users = (xxhash.xxh3_128(), xxhash.xxh3_128())  # records, side
        # name -> (records hash, side hash, users fed)
        self._cols: dict[str, list[Any]] = {}

    def update(self, raw: bytes) -> None:
        """Feed one stored shard's raw (uncompressed) bytes."""
        from orchestrator.columns import decode_table  # columns builds on this module

        self.update_table(decode_table(raw))

    def update_table(self, table: Any) -> None:
        """Feed the next users' slice."""
        n = len(table)
        if not n:
            return
        rec, side = _users_records(table.users)
        self._users[0].update(rec)
        self._users[1].update(side)
        for name, col in table.columns.items():
            state = self._cols.get(name)
            if state is None:
                state = self._cols[name] = [xxhash.xxh3_128(), xxhash.xxh3_128(), 0]
            self._pad(state, self._n)
            r, s = records(col)
            state[0].update(r)
            state[1].update(s)
            state[2] = self._n + n
        self._n += n

    @staticmethod
    def _pad(state: list[Any], upto: int) -> None:
        if state[2] < upto:
            state[0].update(_MISSING_RECORD * (upto - state[2]))
            state[2] = upto

    def hexdigest(self) -> str:
        """The result hash of everything fed so far (32 hex chars)."""
        parts = []
        for name in sorted(self._cols):
            state = self._cols[name]
            self._pad(state, self._n)
            parts.append([name, state[0].hexdigest(), state[1].hexdigest()])
        body = encode("result") + encode(self._format)
        body += encode([self._n, [h.hexdigest() for h in self._users], parts])
        return xxhash.xxh3_128_hexdigest(body)


def table_hash(tables: Iterable[Any], result_format: int = RESULT_FORMAT) -> str:
    """The result hash of a cell given its slices in user order."""
    hasher = ColumnHasher(result_format)
    for table in tables:
        hasher.update_table(table)
    return hasher.hexdigest()


# --- code ---------------------------------------------------------------------------------


class _Normaliser(ast.NodeTransformer):
    """Drops docstrings; ``ast.dump`` without attributes already drops positions and comments."""

    def _strip_docstring(self, node: ast.AST) -> ast.AST:
        body = getattr(node, "body", None)
        if (
            body
            and isinstance(body[0], ast.Expr)
            and isinstance(body[0].value, ast.Constant)
            and isinstance(body[0].value.value, str)
        ):
            node.body = body[1:] or [ast.Pass()]  # type: ignore[attr-defined]
        self.generic_visit(node)
        return node

    visit_FunctionDef = _strip_docstring
    visit_AsyncFunctionDef = _strip_docstring
    visit_ClassDef = _strip_docstring
    visit_Module = _strip_docstring


def normalised_source(source: str) -> str:
    """The canonical text of Python ``source``: its AST without docstrings and positions.

    Raises:
        SyntaxError: the source does not parse (never hashed as "unchanged").
    """
    tree = _Normaliser().visit(ast.parse(textwrap.dedent(source)))
    return ast.dump(tree, annotate_fields=True, include_attributes=False)


def normalise(node: ast.AST) -> str:
    """The canonical text of a parsed definition: its AST without docstrings or positions."""
    return ast.dump(_Normaliser().visit(node), include_attributes=False)


def infra_parts(packages: Mapping[str, str] | None = None) -> dict[str, Any]:
    """What an infrastructure hash covers: Python version, our storage formats, and the
    versions of the distributions a calculation imports (``lineage.trace``)."""
    return {
        "python": f"{sys.version_info.major}.{sys.version_info.minor}",
        "result_format": RESULT_FORMAT,
        "hash_format": HASH_FORMAT,
        "packages": dict(packages or {}),
    }


def infra_hash(packages: Mapping[str, str] | None = None) -> str:
    return digest("infra", infra_parts(packages))


ABSENT_HASH = "-" * 32  # stands for a missing hash in inputs_digest


def inputs_digest(shape: str, hashes: list[str | None]) -> str:
    """Digest of everything a cell consumed besides its own code.

    Args:
        shape: ``digest("shape", ...)`` of the calculation's input names (dependencies, root
            datasets, lookback, historical), so the fixed-width part below is unambiguous.
        hashes: 32-hex digests in the order the shape fixes (upstream result hashes, root
            window digests, own previous result hash), ``None`` where absent.

    Each item is exactly 32 bytes, so concatenation is a canonical encoding; this keeps the
    per-cell cost of planning at one short xxh3 call.
    """
    return xxhash.xxh3_128_hexdigest(
        (shape + "".join([ABSENT_HASH if h is None else h for h in hashes])).encode()
    )
