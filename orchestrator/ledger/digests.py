"""Ledger digests: what the stored cells of a calculation say, summed per month.

The no-op plan must not read 365,000 cells to find that none changed. So the ledger keeps,
for every calculation and *bucket* (a calendar month), three order-independent sums over its
stored rows, updated in the transaction of every write to ``cells`` (``store.Ledger``):

* ``inputs`` — per row, its date bound to what the row was built from: its build key (status,
  category, code/layer/infra hashes, epochs), each upstream result hash it consumed (by
  dependency name), each root (dataset, day, content hash) of its windows, its own previous
  result hash;
* ``results`` — per row, its date bound to its result hash;
* ``chain`` — per pair of consecutive stored rows (p, s), the date of s bound to the result
  hash of p (placed in the bucket of s): what a historical cell's previous hash must be.

A sum is two 64-bit lanes (arithmetic mod 2**64 each, so 128 bits in all). A term is a
product of odd pseudo-random *atoms* (xxh3 of a tag and its parts, low bit set): the date's,
the part's tag, and the value's. Products make the sums bilinear, which is what lets the
planner compute the sum it *expects* without the rows: ``sum_d a(d) * K`` is ``K * sum_d
a(d)``, the upstream part of a calculation is ``w(dep) * results(dep)``, and the root part is
a sum over windows of prefix sums over the root index (``planning``). Equal sums mean equal
multisets of (date, part, value) terms except with probability about 2**-126 per comparison
— the same kind of guarantee as the 128-bit hashes the fingerprints already compare.

What the sums rely on: a row's ``inputs_digest`` is ``fingerprint.inputs_digest`` of its
calculation's shape and of the input values stored with it (the executor writes both from one
``CellInputs``; a failed attempt keeps both), and a shape change is a code change (the shape
is made of class attributes, which the code hash covers). So equal stored and current input
values mean an equal inputs digest, and the planner compares values instead of re-hashing
each cell. That relation is not taken on trust where it could fail: digests are stamped with
a canary of the current rule (``current_format``), so a change of the rule makes every month
untrusted; and a month is trusted again — after a write from outside the ledger's methods,
after such a change, after migration 0006 — only once every row in it has been checked
against the current rule (``Ledger.repair_digests`` with ``planning.row_verifier``, run by
every ``orchestrator run``). Until then its cells are decided one by one, by the full rule.
"""

from __future__ import annotations

import datetime as dt
import json
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import xxhash

# Bumped whenever a term below changes: rows of another format are never trusted.
DIGEST_FORMAT = 1
MASK = (1 << 64) - 1
Lanes = tuple[int, int]
ZERO: Lanes = (0, 0)


@lru_cache(maxsize=1)
def current_format() -> int:
    """The format stamped on the digests this code keeps: ``DIGEST_FORMAT`` and the current
    rule of inputs digests (``planning.formula_canary``), as a positive 30-bit integer. A
    month of another format is never trusted: its rows may hold inputs digests of another
    rule, which their stored values no longer stand for."""
    from orchestrator.planning import formula_canary  # (planning imports this module)

    mixed = xxhash.xxh3_64_intdigest(f"{DIGEST_FORMAT}:{formula_canary()}".encode())
    return (mixed & 0x3FFFFFFF) | 1


def bucket_of(date: dt.date) -> int:
    """The month a date falls in, as months since year 0 (``year * 12 + month - 1``)."""
    return date.year * 12 + date.month - 1


def bucket_bounds(bucket: int) -> tuple[dt.date, dt.date]:
    """First and last day (inclusive) of a bucket."""
    year, month0 = divmod(bucket, 12)
    first = dt.date(year, month0 + 1, 1)
    nxt = dt.date(year + (month0 + 1) // 12, (month0 + 1) % 12 + 1, 1)
    return first, nxt - dt.timedelta(days=1)


@lru_cache(maxsize=1 << 17)
def atom(*parts: str) -> Lanes:
    """Two odd pseudo-random 64-bit lanes of a tag and its parts (xxh3-128)."""
    h = xxhash.xxh3_128_intdigest("\x1f".join(parts).encode())
    return ((h & MASK) | 1, (h >> 64) | 1)


def value(h: str | None) -> Lanes:
    """The atom of a stored hash (a result hash, a root content hash); None has its own."""
    return NONE if h is None else atom("v", h)


NONE = atom("none")
TAU_BUILD = atom("tag", "build")
TAU_PREVIOUS = atom("tag", "previous")
TAU_UPSTREAM = atom("tag", "upstream")
TAU_ROOT = atom("tag", "root")


def date_atom(iso: str) -> Lanes:
    return atom("date", iso)


@lru_cache(maxsize=1 << 12)
def build_term(build: str) -> Lanes:
    """``TAU_BUILD * atom(build key)``."""
    k = atom("build", build)
    return ((TAU_BUILD[0] * k[0]) & MASK, (TAU_BUILD[1] * k[1]) & MASK)


@lru_cache(maxsize=1 << 12)
def dependency_weight(key: str) -> Lanes:
    """``TAU_UPSTREAM * atom(dependency key)``: a stored upstream entry's weight."""
    w = atom("dep", key)
    return ((TAU_UPSTREAM[0] * w[0]) & MASK, (TAU_UPSTREAM[1] * w[1]) & MASK)


@lru_cache(maxsize=1 << 17)
def root_weight(dataset: str, day: str) -> Lanes:
    """``TAU_ROOT * atom(dataset, day)``: the weight of one root day of a window."""
    b = atom("root", dataset, day)
    return ((TAU_ROOT[0] * b[0]) & MASK, (TAU_ROOT[1] * b[1]) & MASK)


@lru_cache(maxsize=1 << 18)
def root_term(dataset: str, day: str, h: str) -> Lanes:
    """``root_weight(dataset, day) * value(h)``: one root day of a window, as summed (a day
    is in ``lookback`` windows of every calculation reading it: computed once)."""
    w, v = root_weight(dataset, day), value(h)
    return ((w[0] * v[0]) & MASK, (w[1] * v[1]) & MASK)


def row_inputs(
    iso: str,
    build: str,
    upstream: Mapping[str, str | None],
    root: Mapping[str, Mapping[str, str]],
    previous: str | None,
) -> Lanes:
    """A row's term of ``inputs``: ``a(date) * (build + previous + upstream + root parts)``."""
    b = build_term(build)
    p = value(previous)
    lo = b[0] + TAU_PREVIOUS[0] * p[0]
    hi = b[1] + TAU_PREVIOUS[1] * p[1]
    for key, h in upstream.items():
        w, v = dependency_weight(key), value(h)
        lo += w[0] * v[0]
        hi += w[1] * v[1]
    for dataset, window in root.items():
        for day, h in window.items():
            t = root_term(dataset, day, h)
            lo += t[0]
            hi += t[1]
    a = date_atom(iso)
    return ((a[0] * lo) & MASK, (a[1] * hi) & MASK)


def row_inputs_json(
    iso: str, build: str, upstream_json: str | None, root_json: str | None, previous: str | None
) -> Lanes:
    """``row_inputs`` of a row as stored (JSON text columns)."""
    return row_inputs(
        iso,
        build,
        json.loads(upstream_json) if upstream_json else {},
        json.loads(root_json) if root_json else {},
        previous,
    )


def rebuild_term(iso: str, old_build: str, new_build: str) -> Lanes:
    """How a row's ``inputs`` term moves when only its build key changes (a lease, a status,
    a category or a re-stamped code hash): ``a(date) * (build_term(new) - build_term(old))``."""
    if old_build == new_build:
        return ZERO
    a, n, o = date_atom(iso), build_term(new_build), build_term(old_build)
    return ((a[0] * (n[0] - o[0])) & MASK, (a[1] * (n[1] - o[1])) & MASK)


def bound(iso: str, h: str | None) -> Lanes:
    """``a(date) * value(h)``: a row's ``results`` term, or a ``chain`` link into ``iso``."""
    a, v = date_atom(iso), value(h)
    return ((a[0] * v[0]) & MASK, (a[1] * v[1]) & MASK)


def add(x: Lanes, y: Lanes, sign: int = 1) -> Lanes:
    return ((x[0] + sign * y[0]) & MASK, (x[1] + sign * y[1]) & MASK)


class Sums:
    """One bucket's sums while they are being computed or moved: [cells, inputs, results,
    chain] with two lanes each (plain ints mod 2**64)."""

    __slots__ = ("cells", "chain", "inputs", "results")

    def __init__(
        self, cells: int = 0, inputs: Lanes = ZERO, results: Lanes = ZERO, chain: Lanes = ZERO
    ):
        self.cells = cells
        self.inputs = inputs
        self.results = results
        self.chain = chain

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sums) and self.astuple() == other.astuple()

    def __repr__(self) -> str:
        return f"Sums{self.astuple()}"

    def astuple(self) -> tuple[int, Lanes, Lanes, Lanes]:
        return (self.cells, self.inputs, self.results, self.chain)

    def merged(self, other: Sums) -> Sums:
        return Sums(
            self.cells + other.cells,
            add(self.inputs, other.inputs),
            add(self.results, other.results),
            add(self.chain, other.chain),
        )


def calc_sums(rows: Sequence[Sequence[Any]]) -> dict[int, Sums]:
    """The sums of one calculation's rows, per bucket, from scratch.

    Args:
        rows: ``(date, build key, upstream JSON or mapping, root JSON or mapping, previous
            hash, result hash)`` per stored row, dates ascending and distinct.

    Returns:
        bucket -> ``Sums`` (buckets without rows are absent).
    """
    out: dict[int, Sums] = {}
    last: str | None = None
    has_last = False
    for date, build, upstream, root, previous, result in rows:
        iso = date.isoformat()
        s = out.get(bucket_of(date))
        if s is None:
            s = out[bucket_of(date)] = Sums()
        if isinstance(upstream, str) or upstream is None or isinstance(root, str):
            term = row_inputs_json(iso, build, upstream, root, previous)  # type: ignore[arg-type]
        else:
            term = row_inputs(iso, build, upstream, root, previous)
        s.cells += 1
        s.inputs = add(s.inputs, term)
        s.results = add(s.results, bound(iso, result))
        if has_last:
            s.chain = add(s.chain, bound(iso, last))
        last, has_last = result, True
    return out


_PACKED = struct.Struct("<6Q")
PACKED_BYTES = _PACKED.size


def pack(s: Sums) -> bytes:
    """The three sums of ``s`` as stored (``calc_digests.sums``)."""
    return _PACKED.pack(*s.inputs, *s.results, *s.chain)


def unpack(cells: int, raw: bytes | None) -> Sums:
    """``Sums`` from a stored row (NULL sums: a month only a trigger has seen, all zero)."""
    if raw is None:
        return Sums(cells)
    w = _PACKED.unpack(raw)
    return Sums(cells, (w[0], w[1]), (w[2], w[3]), (w[4], w[5]))


@dataclass(frozen=True, slots=True)
class CalcDigests:
    """One calculation's stored digests as arrays, one entry per bucket that has a row.

    Attributes:
        buckets: int64, ascending (``bucket_of``).
        cells: int64, rows per bucket.
        inputs / results / chain: uint64 of shape (n, 2), the two lanes of each sum.
        clean: bool; False where a write outside the ledger's methods marked the bucket
            dirty, or where it holds another format (``current_format``): never trusted.
    """

    buckets: np.ndarray
    cells: np.ndarray
    inputs: np.ndarray
    results: np.ndarray
    chain: np.ndarray
    clean: np.ndarray

    @classmethod
    def of(cls, entries: Iterable[tuple[int, Sums, bool]]) -> CalcDigests:
        """From (bucket, sums, clean) entries (any order)."""
        rows = sorted(entries, key=lambda e: e[0])
        n = len(rows)
        return cls(
            buckets=np.array([r[0] for r in rows], dtype=np.int64),
            cells=np.array([r[1].cells for r in rows], dtype=np.int64),
            inputs=np.array([r[1].inputs for r in rows], dtype=np.uint64).reshape(n, 2),
            results=np.array([r[1].results for r in rows], dtype=np.uint64).reshape(n, 2),
            chain=np.array([r[1].chain for r in rows], dtype=np.uint64).reshape(n, 2),
            clean=np.array([r[2] for r in rows], dtype=bool),
        )


def digests_of(snapshot: Mapping[str, Mapping[dt.date, Any]]) -> dict[str, CalcDigests]:
    """The digests a ledger holding ``snapshot`` keeps (every row a ``LedgerCell``): what the
    ledger's incremental upkeep must always equal, and how tests and benchmarks make them."""
    out: dict[str, CalcDigests] = {}
    for name, per_date in snapshot.items():
        rows = [
            (d, c.build, c.upstream_json, c.root_json, c.previous_hash, c.result_hash)
            for d, c in sorted(per_date.items())
        ]
        sums = calc_sums(rows)
        out[name] = CalcDigests.of((b, s, True) for b, s in sums.items())
    return out
