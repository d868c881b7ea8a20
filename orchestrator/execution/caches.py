"""Results of earlier cells kept in memory for their dependents: whole results (``ResultCache``,
the per-user walk and meta cells) and tables (``TableCache``, blocks)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

from orchestrator.columns import Table
from orchestrator.ledger.store import Ledger, ShardInfo
from orchestrator.manifest import Manifest
from orchestrator.planning import CellKey
from orchestrator.results import (
    StoredResult,
    assemble,
    decode_shards,
    decode_tables,
)

# A cell's whole result is kept in memory for its dependents only up to this many users;
# beyond, memory stays bounded by the flush thresholds and dependents read the shards.
KEEP_LIMIT = 20_000


class ResultCache:
    """Recently published results kept in memory for dependents (bounded by cell count)."""

    def __init__(self, ledger: Ledger, manifest: Manifest, capacity: int = 256):
        self.ledger = ledger
        self.manifest = manifest
        self.capacity = capacity
        self._items: OrderedDict[CellKey, Any] = OrderedDict()
        self._big: dict[CellKey, list[Any]] = {}  # shard index of results past KEEP_LIMIT

    def put(self, key: CellKey, value: Any) -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def get(self, key: CellKey) -> Any:
        """The published result of ``key``: a meta result, a standard result as ``{user:
        result}``, or — past ``KEEP_LIMIT`` users — a ``StoredResult`` read shard by shard;
        None if unpublished."""
        if key not in self._items:
            self.prefetch([key])
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        shards = self._big.pop(key)
        return StoredResult(shards, lambda shard: self.ledger.shard_data(*key, shard))

    def discard(self, key: CellKey) -> None:
        """Forget ``key`` (its published result is being replaced)."""
        self._items.pop(key, None)
        self._big.pop(key, None)

    def prefetch(self, keys: Iterable[CellKey]) -> None:
        """Load the published results of ``keys`` not in memory with a few bulk queries (one
        round trip for a cell's inputs, not two per input); results past ``KEEP_LIMIT`` users
        are only indexed, to be read shard by shard."""
        missing = list(dict.fromkeys(k for k in keys if k not in self._items))
        if not missing:
            return
        index = self.ledger.shard_index_many(missing)
        small = [
            key
            for key, shards in index.items()
            if self.manifest.calcs[key[0]].kind == "meta"
            or sum(s.users for s in shards) <= KEEP_LIMIT
        ]
        payloads = self.ledger.shard_payloads_many(small) if small else {}
        for key in missing:
            if key in payloads:
                kind = self.manifest.calcs[key[0]].kind
                self.put(key, assemble(decode_shards(payloads[key]), kind))
            elif key in index:
                self._big[key] = index[key]
            else:
                self.put(key, None)


class TableCache:
    """Standard results as ``columns.Table`` for columnar blocks: this run's block outputs,
    else read from the ledger in bulk (bounded by cell count, least recently used out)."""

    def __init__(self, ledger: Ledger, capacity: int):
        self.ledger = ledger
        self.capacity = capacity
        self._items: OrderedDict[CellKey, Table | None] = OrderedDict()
        # published shard lists of cells read by user range (``get_range``)
        self._index: OrderedDict[CellKey, list[ShardInfo] | None] = OrderedDict()
        # a published cell's fields (name -> holds texts), for ranges lacking some
        self._fields: OrderedDict[CellKey, dict[str, bool]] = OrderedDict()

    def put(self, key: CellKey, table: Table | None) -> None:
        self._items[key] = table
        self._items.move_to_end(key)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def discard(self, key: CellKey) -> None:
        """Forget ``key`` (its published result is being replaced)."""
        self._items.pop(key, None)
        self._index.pop(key, None)
        self._fields.pop(key, None)

    def note_fields(self, key: CellKey, fields: dict[str, bool]) -> None:
        """Remember the fields (name -> holds texts) of ``key``'s result, just published."""
        self._fields[key] = fields
        while len(self._fields) > self.capacity:
            self._fields.popitem(last=False)

    def _fields_of(self, key: CellKey, shards: list[ShardInfo]) -> dict[str, bool]:
        """Every field of ``key``'s published result: noted when published in this run,
        else read once from all its shards (a shard lacks the fields none of its users
        has)."""
        found = self._fields.get(key)
        if found is None:
            found = {}
            for shard in shards:
                table = decode_tables([self.ledger.shard_data(*key, shard)])
                for name, col in table.columns.items():
                    found[name] = found.get(name, False) or col.kind in ("str", "json")
            self.note_fields(key, found)
        return found

    def fields(self, key: CellKey) -> dict[str, bool] | None:
        """Every field of ``key``'s published result (name -> holds texts), read once per
        cell (``_fields_of``); None: nothing published."""
        if key in self._fields:
            return self._fields[key]
        shards = self._shards(key)
        return None if shards is None else self._fields_of(key, shards)

    def _shards(self, key: CellKey) -> list[ShardInfo] | None:
        """``key``'s published shard list (None: nothing published), read once while it
        stays among the ``capacity`` most recent."""
        if key not in self._index:
            self._index[key] = self.ledger.shard_index(*key)
            while len(self._index) > self.capacity:
                self._index.popitem(last=False)
        return self._index[key]

    def get_range(self, key: CellKey, lo: str | None, hi: str | None) -> Table | None:
        """The users ``lo <= user < hi`` (None: unbounded) of ``key``'s published result
        (None: nothing published): sliced from memory, else decoded from only the shards
        that hold such users, so memory follows the range, not the result."""
        if key in self._items:
            table = self._items[key]
            return None if table is None else table.between(lo, hi)
        shards = self._shards(key)
        if shards is None:
            return None
        wanted = [
            s
            for s in shards
            if (hi is None or s.first_user is None or s.first_user < hi)
            and (lo is None or s.last_user is None or s.last_user >= lo)
        ]
        table = decode_tables(self.ledger.shard_data_many(*key, wanted)).between(lo, hi)
        if len(wanted) < len(shards):  # some fields may be in the other shards alone
            table = table.with_fields(self._fields_of(key, shards))
        return table

    def get_many(self, keys: Iterable[CellKey]) -> dict[CellKey, Table | None]:
        """The published results of ``keys`` (None: nothing published), one bulk read for
        those not in memory."""
        keys = list(dict.fromkeys(keys))
        out = {k: self._items[k] for k in keys if k in self._items}
        missing = [k for k in keys if k not in out]
        if missing:
            payloads = self.ledger.shard_payloads_many(missing)
            for key in missing:
                out[key] = decode_tables(payloads[key]) if key in payloads else None
                self.put(key, out[key])
        return out
