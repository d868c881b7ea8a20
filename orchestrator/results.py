"""Result shards: bounded, zstandard-compressed slices of a cell's canonical JSON lines.

A standard cell's result is one line ``[user, result]`` per user with a result, users in
ascending order; a meta cell's is the single line ``[null, result]``. The very bytes that are
hashed (``fingerprint.result_line``) are the bytes compressed into shards, so a stored result
can always be re-verified against its result hash.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import zstandard

from orchestrator.fingerprint import ResultHasher

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
    body = raw.strip(b"\n")
    if not body:
        return []
    return [(user, result) for user, result in json.loads(b"[" + body.replace(b"\n", b",") + b"]")]


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


@dataclass(slots=True)
class ShardWriter:
    """Buffers a cell's lines and cuts them into shards of at most ``max_bytes`` raw bytes.

    ``cut()`` returns the shard rows ready to insert; the caller decides when they are written
    (mid-cell flushes go to the database at once, the last one rides in the publish
    transaction). The running result hash covers every line cut so far, in order; read it
    after the last ``cut()``.
    """

    calculation: str
    date: dt.date
    generation: str
    max_bytes: int
    hasher: ResultHasher = field(default_factory=ResultHasher)
    seq: int = 0  # of the next shard (a worker starts at its own span)
    shards: int = 0
    users: int = 0
    bytes_raw: int = 0
    bytes_compressed: int = 0
    keep_raw: bool = False  # also keep each shard's uncompressed payload in ``raws``
    raws: list[bytes] = field(default_factory=list)
    _lines: list[bytes] = field(default_factory=list)
    _users: list[str | None] = field(default_factory=list)
    _size: int = 0
    _absorbed: list[dict[str, Any]] = field(default_factory=list)

    def add(self, user: str | None, line: bytes) -> None:
        self._lines.append(line)
        self._users.append(user)
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

    def cut(self) -> list[dict[str, Any]]:
        """Empty the buffer into shard rows (none if the buffer is empty)."""
        rows: list[dict[str, Any]] = self._absorbed
        self._absorbed = []
        start = 0
        while start < len(self._lines):
            end, size = start, 0
            while end < len(self._lines) and (
                end == start or size + len(self._lines[end]) <= self.max_bytes
            ):
                size += len(self._lines[end])
                end += 1
            raw = b"".join(self._lines[start:end])
            self.hasher.update(raw)  # xxh3 streams: hashing per shard equals hashing per line
            if self.keep_raw:
                self.raws.append(raw)
            data = _compressor.compress(raw)
            rows.append(
                {
                    "calculation": self.calculation,
                    "date": self.date,
                    "generation": self.generation,
                    "seq": self.seq,
                    "first_user": self._users[start],
                    "last_user": self._users[end - 1],
                    "users": end - start,
                    "raw_bytes": len(raw),
                    "data": data,
                }
            )
            self.seq += 1
            self.shards += 1
            self.users += end - start
            self.bytes_raw += len(raw)
            self.bytes_compressed += len(data)
            start = end
        self._lines.clear()
        self._users.clear()
        self._size = 0
        return rows
