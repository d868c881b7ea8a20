"""Result shards: bounded, zstandard-compressed slices of a cell's result.

A standard cell's result is a ``columns.Table`` (users ascending, typed columns), stored as
consecutive user slices, each ``columns.encode_table`` compressed; its result hash is the
``columns.ColumnHasher`` digest, independent of where the slices were cut. A meta cell's is
the single canonical JSON line ``[null, result]`` (``fingerprint.result_line``), hashed as
stored. So a stored result can always be re-verified against its result hash. Shards of the
previous result format (JSON lines per user) are still read (``_pairs`` sniffs the format).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zstandard

from orchestrator.columns import Table, concat, decode_table, encode_table, is_table
from orchestrator.fingerprint import RESULT_FORMAT, ColumnHasher, ResultHasher

# A failed user's line in a standard cell's result: ``[user, {FAILED_KEY: {"calculation": c,
# "date": iso, "error": last line}}]`` naming the cell where that user failed first. It is part
# of the result hash (fixing the failure changes the hash, so early cutoff lets the heal flow
# downstream and to later dates); the engine intercepts it before user code sees it (the
# user's dependents and historical successors fail for that user too); validation never sees
# it; ``show`` and ``load_result`` present it as a failure. A calculation may not return this
# key itself.
FAILED_KEY = "__failed__"

ZSTD_LEVEL = 3
_compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
_decompressor = zstandard.ZstdDecompressor()
# Shards compressed at once on this many threads (zstandard releases the GIL): compression is
# a third of a columnar block's cost over a million users. One pool per process (a forked
# worker makes its own); a compressor per thread (they are not thread-safe).
COMPRESS_THREADS = 2
_pool: tuple[int, ThreadPoolExecutor] | None = None
_local = threading.local()


def _compress_here(raw: bytes) -> bytes:
    compressor = getattr(_local, "compressor", None)
    if compressor is None:
        compressor = _local.compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
    return compressor.compress(raw)


def compress_many(raws: list[bytes]) -> list[Future[bytes]]:
    """``raws`` being compressed (zstandard, ``ZSTD_LEVEL``), in order: with several, on
    ``COMPRESS_THREADS`` threads, all started at once (the caller works meanwhile)."""
    global _pool
    if len(raws) < 2 or COMPRESS_THREADS < 2:
        done = []
        for raw in raws:
            future: Future[bytes] = Future()
            future.set_result(_compressor.compress(raw))
            done.append(future)
        return done
    if _pool is None or _pool[0] != os.getpid():
        _pool = (os.getpid(), ThreadPoolExecutor(COMPRESS_THREADS, thread_name_prefix="zstd"))
    return [_pool[1].submit(_compress_here, raw) for raw in raws]


def failure_marker(calculation: str, date: dt.date, error: str) -> dict[str, Any]:
    """The stored result of a user who failed in ``calculation`` on ``date`` with ``error``
    (one line: the exception, or the malformed rows' locations)."""
    return {FAILED_KEY: {"calculation": calculation, "date": date.isoformat(), "error": error}}


def failure_of(value: Any) -> dict[str, str] | None:
    """The failure a stored user result records (``failure_marker``'s inner dict), else None."""
    if type(value) is dict:
        return value.get(FAILED_KEY)
    return None


def describe_failure(user: str, origin: dict[str, str]) -> str:
    """One line naming where a user failed first: "rsi failed for user U on D: error"."""
    return f"{origin['calculation']} failed for user {user} on {origin['date']}: {origin['error']}"


def decode_shards(payloads: Iterable[bytes]) -> list[tuple[str | None, Any]]:
    """All ``(user, result)`` pairs of a cell's shards, in stored order."""
    out: list[tuple[str | None, Any]] = []
    for payload in payloads:
        out.extend(_pairs(_decompressor.decompress(payload)))
    return out


def _pairs(raw: bytes) -> list[tuple[str | None, Any]]:
    """The ``(user, result)`` pairs of one shard's raw lines, parsed as one JSON array (a
    line's JSON never holds a raw newline: ``json.dumps`` escapes them), several times faster
    than a ``json.loads`` per line."""
    if is_table(raw):
        return decode_table(raw).pairs()  # type: ignore[return-value]
    body = raw.strip(b"\n")
    if not body:
        return []
    return [(user, result) for user, result in json.loads(b"[" + body.replace(b"\n", b",") + b"]")]


def hash_of_shards(raws: Iterable[bytes]) -> str:
    """The result hash of a cell from its shards' raw (uncompressed) payloads, in order: a
    stored result re-verified against its recorded hash."""
    raws = list(raws)
    # (no shard at all: a standard cell without users; a meta cell always has its line)
    hasher: ColumnHasher | ResultHasher = (
        ColumnHasher(RESULT_FORMAT) if not raws or is_table(raws[0]) else ResultHasher()
    )
    for raw in raws:
        hasher.update(raw)
    return hasher.hexdigest()


def decode_tables(payloads: Iterable[bytes]) -> Table:
    """A standard cell's stored shards as one table (an empty one without shards).

    Raises:
        ValueError: a shard of the previous (JSON lines) format: such cells re-run first.
    """
    tables = [decode_table(_decompressor.decompress(p)) for p in payloads]
    return concat(tables) if tables else Table([], {})


def assemble(pairs: list[tuple[str | None, Any]], kind: str) -> Any:
    """A standard cell's pairs as ``{user: result}``; a meta cell's as its result."""
    if kind == "meta":
        return pairs[0][1] if pairs else None
    return {user: result for user, result in pairs}


class StoredResult:
    """A standard cell's published result, read one shard at a time (never whole).

    ``shards`` lists the cell's shards in order (``Ledger.shard_index``); ``fetch(shard)``
    returns one shard's compressed payload. Memory is one decoded shard, whatever the number of
    users: this is how dependents and ``show --user`` read results too big to hold.
    """

    def __init__(self, shards: list[Any], fetch: Callable[[Any], bytes]):
        self.shards = shards
        self.fetch = fetch

    def _decode(self, shard: Any) -> list[tuple[str, Any]]:
        return _pairs(_decompressor.decompress(self.fetch(shard)))  # type: ignore[return-value]

    def items(self, lo: str | None = None, hi: str | None = None) -> Iterator[tuple[str, Any]]:
        """``(user, result)`` with ``lo <= user < hi``, users ascending; shards wholly outside
        the range are not fetched."""
        for shard in self.shards:
            if lo is not None and shard.last_user is not None and shard.last_user < lo:
                continue
            if hi is not None and shard.first_user is not None and shard.first_user >= hi:
                return
            for user, result in self._decode(shard):
                if (lo is None or user >= lo) and (hi is None or user < hi):
                    yield user, result

    def get(self, user: str) -> Any:
        """One user's result (None if it has none), fetching the one shard that can hold it."""
        for shard in self.shards:
            if shard.first_user is not None and shard.first_user <= user <= shard.last_user:
                return dict(self._decode(shard)).get(user)
        return None


# Estimated stored bytes of one value in a table (9 hashed, about 8 stored, plus overhead):
# shards of dict results are cut by this estimate, so ``max_bytes`` bounds them roughly.
VALUE_BYTES = 10


@dataclass(slots=True)
class ShardWriter:
    """Buffers a cell's result and cuts it into shards of about ``max_bytes`` raw bytes.

    A standard cell (``table`` True) buffers per-user dicts (``add``) or whole tables of the
    columnar form (``add_table``); a meta cell buffers its one canonical line (``add_line``).
    ``cut()`` returns the shard rows ready to insert; the caller decides when they are written
    (mid-cell flushes go to the database at once, the last one rides in the publish
    transaction). The running result hash covers every shard cut so far, in order; read it
    after the last ``cut()``.
    """

    calculation: str
    date: dt.date
    generation: str
    max_bytes: int
    table: bool = True
    hasher: ColumnHasher | ResultHasher = field(init=False)
    seq: int = 0  # of the next shard (a worker starts at its own span)
    shards: int = 0
    users: int = 0
    bytes_raw: int = 0
    bytes_compressed: int = 0
    keep_raw: bool = False  # also keep each shard's uncompressed payload in ``raws``
    raws: list[bytes] = field(default_factory=list)
    _lines: list[bytes] = field(default_factory=list)
    _users: list[str] = field(default_factory=list)
    _results: list[dict[str, Any]] = field(default_factory=list)
    _tables: list[Table] = field(default_factory=list)
    _size: int = 0
    _count: int = 0
    _absorbed: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.hasher = ColumnHasher(RESULT_FORMAT) if self.table else ResultHasher()

    @property
    def pending(self) -> int:
        """Results buffered since the last cut (users, or the meta line)."""
        return self._count

    @property
    def pending_bytes(self) -> int:
        """Estimated raw bytes buffered since the last cut."""
        return self._size

    def add(self, user: str, result: dict[str, Any]) -> None:
        """Buffer one user's result (users ascending across calls)."""
        if self._tables:
            self._tables_to_rows()
        self._users.append(user)
        self._results.append(result)
        self._count += 1
        self._size += len(user) + VALUE_BYTES * (1 + len(result))

    def add_table(self, table: Table) -> None:
        """Buffer a slice of the cell's users (ascending, after everything buffered)."""
        if not len(table):
            return
        if self._users:
            self._tables.append(Table.from_results(self._users, self._results))
            self._users, self._results = [], []
        self._tables.append(table)
        self._count += len(table)
        self._size += len(table) * VALUE_BYTES * (1 + len(table.columns))

    def _tables_to_rows(self) -> None:
        for user, result in concat(self._tables).pairs():
            self._users.append(user)
            self._results.append(result)
        self._tables.clear()

    def add_line(self, line: bytes) -> None:
        """Buffer a meta cell's canonical line."""
        self._lines.append(line)
        self._count += 1
        self._size += len(line)

    def absorb(self, raws: list[bytes], rows: list[dict[str, Any]]) -> None:
        """Take shards another writer of the same generation already cut over the next users
        in order (a worker's range, its rows numbered in the worker's ``seq`` span): their
        payloads ``raws`` extend the result hash; the rows come out of the next ``cut()``."""
        for raw, row in zip(raws, rows, strict=True):
            self.hasher.update(raw)
            self.shards += 1
            self.users += row["users"]
            self.bytes_raw += len(raw)
            self.bytes_compressed += len(row["data"])
            self._absorbed.append(row)

    def absorb_written(
        self, payloads: Iterable[bytes], users: int, bytes_raw: int, bytes_compressed: int
    ) -> None:
        """Take shards another writer of the same generation already wrote over the next users
        in order: their compressed ``payloads`` (read back one at a time) extend the result
        hash; the counts are that writer's."""
        for payload in payloads:
            self.hasher.update(_decompressor.decompress(payload))
            self.shards += 1
        self.users += users
        self.bytes_raw += bytes_raw
        self.bytes_compressed += bytes_compressed

    def _slices(self) -> list[Table]:
        tables = list(self._tables)
        if self._users:
            tables.append(Table.from_results(self._users, self._results))
        out = []
        for t in tables:
            per_row = VALUE_BYTES * (1 + len(t.columns)) + 8
            step = max(1, self.max_bytes // per_row)
            if len(t) <= step:
                out.append(t)
            else:
                for lo in range(0, len(t), step):
                    out.append(t.take(np.arange(lo, min(lo + step, len(t)))))
        return out

    def cut(self, wait: bool = True) -> list[dict[str, Any]]:
        """Empty the buffer into shard rows (none if the buffer is empty). ``wait`` False:
        the rows' ``data`` are futures of the compressed payloads, still compressing: the
        caller hands the rows to ``settle`` before it writes them."""
        rows: list[dict[str, Any]] = self._absorbed
        self._absorbed = []
        pieces: list[tuple[str | None, str | None, int, bytes, Table | None]]
        if self.table:
            pieces = [(t.users[0], t.users[-1], len(t), encode_table(t), t) for t in self._slices()]
        else:
            pieces = [(None, None, 1, line, None) for line in self._lines]
        compressed = compress_many([raw for _, _, _, raw, _ in pieces])
        for (first, last, count, raw, table), future in zip(pieces, compressed, strict=True):
            if table is not None:
                self.hasher.update_table(table)  # type: ignore[union-attr]
            else:
                self.hasher.update(raw)
            if self.keep_raw:
                self.raws.append(raw)
            rows.append(
                {
                    "calculation": self.calculation,
                    "date": self.date,
                    "generation": self.generation,
                    "seq": self.seq,
                    "first_user": first,
                    "last_user": last,
                    "users": count,
                    "raw_bytes": len(raw),
                    "data": future,
                }
            )
            self.seq += 1
            self.shards += 1
            self.users += count
            self.bytes_raw += len(raw)
        self._lines.clear()
        self._users, self._results = [], []
        self._tables.clear()
        self._size = 0
        self._count = 0
        return self.settle(rows) if wait else rows

    def settle(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """``rows`` of ``cut(wait=False)`` with their compressed payloads (waits for them)."""
        for row in rows:
            if isinstance(row["data"], Future):
                data: bytes = row["data"].result()
                row["data"] = data
                self.bytes_compressed += len(data)
        return rows
