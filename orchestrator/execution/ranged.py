"""Columnar blocks over root stores, a user range at a time.

A dataset read from its root store has too many users to hold (``App.holds_in_memory``): a
standard calculation in its columnar form then computes each block one user range (a column
part of the store, ``rootstore.PART_USERS`` users) at a time. A range reads its root data from
the store's column parts (``RootMatrix.from_store``), its upstream and previous results from
the shards holding its users (``TableCache.get_range``); its tables are validated (statistics
merged over the ranges), hashed and written as shards of the dates' unpublished generations
at once. So memory follows the range, not the number of users. The dates are then recorded
as ``Executor._compute_block`` records them (circuit breaker, validation, PARTIAL, failures).

Users are independent in a standard calculation (both forms must agree, and the per-user form
sees one user at a time), so the ranges give the results of one block over every user:
``tests/test_streamed_blocks.py`` compares them cell by cell with the in-memory engine.
"""

from __future__ import annotations

import bisect
import dataclasses
import datetime as dt
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from orchestrator import faults, validation
from orchestrator.columns import Table
from orchestrator.execution.blocks import (
    BlockOutcome,
    BlockTask,
    DateOutcome,
    RootMatrix,
    UpstreamInput,
    run_block,
)
from orchestrator.execution.caches import TableCache
from orchestrator.execution.record import _CellRun, too_many_failed
from orchestrator.execution.walk import STORED_FAILURES
from orchestrator.execution.workers import WorkerError
from orchestrator.ledger.store import CellWrite, Ledger
from orchestrator.manifest import CalcSpec
from orchestrator.planning import CellKey, Decision
from orchestrator.results import ShardWriter
from orchestrator.rootdata import Dataset, RootData

if TYPE_CHECKING:
    from orchestrator.execution.executor import Executor


# A range a worker writes numbers its shards from ``index * RANGE_SEQ_SPAN`` (ranges ascend,
# so shard numbers ascend with users). Room for 2,147 ranges in PostgreSQL's integer: 140
# million users at ``rootstore.PART_USERS`` per range.
RANGE_SEQ_SPAN = 1_000_000


def buffer_table(writer: ShardWriter, table: Table, flush_users: int) -> None:
    """Buffer ``table`` (the next users of a cell) in ``writer``, in shards of at most
    ``flush_users`` users."""
    step = max(1, flush_users)
    for lo in range(0, len(table), step):
        writer.add_table(
            table.take(np.arange(lo, min(lo + step, len(table)))) if len(table) > step else table
        )


@dataclass(frozen=True)
class StoreSource:
    """A root store a worker opens itself (its file is on a disk the worker shares with
    this machine: a ``LocalCluster``): its path and the dates a block reads from it."""

    path: str
    span: tuple[dt.date, ...]


@dataclass(frozen=True)
class UpstreamRef:
    """A dependency's results as a worker reads them: a standard one's by cell from the
    ledger (published before the pass: ``Executor._compute_ranged``), a meta one's by value
    (whole and small). Otherwise as ``blocks.UpstreamInput``."""

    keys: tuple[CellKey, ...]
    values: tuple[Any, ...] | None  # meta: the results themselves
    dates: tuple[dt.date, ...]
    rows: np.ndarray
    width: int


@dataclass
class BlockOrder:
    """One block over one user range, described for a worker that reads its inputs from
    the ledger and writes its shards there itself (``compute_written``).

    Attributes:
        name / dates / previous_date / historical / stored_failures: as ``BlockTask``.
        root: dataset -> (a ``StoreSource``, or the matrix itself (detached), lookback).
        upstream: dependency -> ``UpstreamRef``.
        previous: historical: the cell (calculation, ``previous_date``) of the previous
            state, read by user range from the ledger.
        generations: per date, the unpublished generation its shards go to.
        flush_users / shard_bytes: the run's shard limits (``ShardWriter``).
    """

    name: str
    dates: tuple[dt.date, ...]
    root: dict[str, tuple[StoreSource | RootMatrix, int]]
    upstream: dict[str, UpstreamRef]
    previous: CellKey | None
    previous_date: dt.date | None
    historical: bool
    stored_failures: int
    generations: tuple[str, ...]
    flush_users: int
    shard_bytes: int
    # every field of each standard cell read (name -> holds texts), known to the run: a
    # worker reading a range of a cell's shards would otherwise decode all of them to find
    # the fields some shards lack (``TableCache.get_range``), in every range
    fields: dict[CellKey, dict[str, bool]] = dataclasses.field(default_factory=dict)


@dataclass
class RangeOrder:
    """The blocks of a ranged pass over the users ``lo <= user < hi`` (None: unbounded),
    for one worker: the ledger's URL, and the first shard number of the range (``seq``)."""

    url: str = dataclasses.field(repr=False)  # (holds the database password)
    lo: str | None
    hi: str | None
    seq: int
    blocks: list[BlockOrder]


@dataclass
class WrittenDay:
    """One date of a block over a user range as a worker wrote it: its accounting (as
    ``blocks.DateOutcome``), the validation statistics and fields of its table, and the
    counts of the shards written."""

    processed: int
    failures: int
    inherited: int
    failed_users: list[dict[str, str]]
    stats: validation.Stats
    fields: dict[str, bool]
    shards: int
    users: int
    bytes_raw: int
    bytes_compressed: int


@dataclass
class WrittenBlock:
    """A block over a user range as a worker computed and wrote it (``error``: the block
    failed as a whole, nothing was written; ``days`` is then empty)."""

    error: str | None
    users: int
    processed: int
    days: list[WrittenDay]


def block_task(
    order: BlockOrder,
    calculation: type,
    lo: str | None,
    hi: str | None,
    tables: TableCache,
    matrix: Callable[[Any], RootMatrix],
) -> BlockTask:
    """The ``BlockTask`` of ``order`` over ``lo <= user < hi``: standard upstream and
    previous results read by user range through ``tables``, root matrices from ``matrix``."""
    upstream = {
        dep: UpstreamInput(
            list(ref.values)
            if ref.values is not None
            else [tables.get_range(key, lo, hi) for key in ref.keys],
            ref.values is not None,
            ref.dates,
            ref.rows,
            ref.width,
        )
        for dep, ref in order.upstream.items()
    }
    previous = tables.get_range(order.previous, lo, hi) if order.previous is not None else None
    return BlockTask(
        order.name,
        calculation,
        order.dates,
        {ds: (matrix(source), lookback) for ds, (source, lookback) in order.root.items()},
        upstream,
        previous,
        order.previous_date,
        order.historical,
        False,
        order.stored_failures,
        user_range=(lo, hi),
    )


@functools.cache
def _worker_ledger(url: str) -> Ledger:
    """This worker process's connection to the run's ledger (at its head already: the run
    migrated it)."""
    return Ledger.open(url, migrate=False)


@functools.cache
def _worker_store(path: str) -> Any:
    from orchestrator.rootstore import StoredDataset

    return StoredDataset(Path(path))


def compute_written(
    order: RangeOrder, classes: Sequence[type], ledger: Ledger | None = None
) -> list[WrittenBlock]:
    """On a worker: compute the blocks of ``order`` and write their shards to the ledger
    (unpublished: under the dates' new generations, numbered from ``order.seq``), replacing
    any an earlier attempt at the range wrote (``Ledger.write_shard_span``). Returns each
    block's accounting, in order; the run's process absorbs the shards (their payloads
    extend the result hashes, in user order) and publishes.

    Raises:
        StorageError: the ledger cannot be reached or written.
        OverflowError: a range cut more than ``RANGE_SEQ_SPAN`` shards of a date.
    """
    ledger = ledger if ledger is not None else _worker_ledger(order.url)
    tables = TableCache(ledger, capacity=64)  # this range's reads only: never stale
    matrices: dict[tuple[str, tuple[dt.date, ...]], RootMatrix] = {}

    def matrix(source: StoreSource | RootMatrix) -> RootMatrix:
        if not isinstance(source, StoreSource):
            return source
        key = (source.path, source.span)
        if key not in matrices:
            store = _worker_store(source.path)
            matrices[key] = RootMatrix.from_store(store, source.span, order.lo, order.hi)
        return matrices[key]

    span = (order.seq, order.seq + RANGE_SEQ_SPAN)
    written: list[WrittenBlock] = []
    cells: list[tuple[str, dt.date, str]] = []
    rows: list[dict[str, Any]] = []
    for block, calculation in zip(order.blocks, classes, strict=True):
        for key, fields in block.fields.items():
            tables.note_fields(key, fields)
        task = block_task(block, calculation, order.lo, order.hi, tables, matrix)
        outcome = run_block(task)
        days: list[WrittenDay] = []
        if outcome.error is None:
            assert outcome.tables is not None
            for date, generation, day in zip(
                block.dates, block.generations, outcome.tables, strict=True
            ):
                writer = ShardWriter(block.name, date, generation, block.shard_bytes, seq=span[0])
                buffer_table(writer, day.table, block.flush_users)
                rows += writer.cut()
                if writer.seq > span[1]:
                    raise OverflowError(
                        f"{block.name} {date}: a user range cut {writer.shards} shards, more "
                        f"than {RANGE_SEQ_SPAN}"
                    )
                cells.append((block.name, date, generation))
                days.append(
                    WrittenDay(
                        day.processed,
                        day.failures,
                        day.inherited,
                        day.failed_users,
                        validation.collect_table(day.table),
                        _fields(day.table),
                        writer.shards,
                        writer.users,
                        writer.bytes_raw,
                        writer.bytes_compressed,
                    )
                )
        written.append(WrittenBlock(outcome.error, outcome.users, outcome.processed, days))
    ledger.write_shard_span(cells, span, rows)
    return written


def _flushed(run: _CellRun) -> None:
    """Count a range's shards of ``run`` as one flush (the range is the batch)."""
    run.flushes += 1
    run.flush_reasons["BATCH_LIMIT"] = run.flush_reasons.get("BATCH_LIMIT", 0) + 1


def _fields(table: Table) -> dict[str, bool]:
    """A table's fields: name -> whether it holds texts (noted for readers of ranges that
    lack some)."""
    return {name: col.kind in ("str", "json") for name, col in table.columns.items()}


def root_span(data: RootData, dates: list[dt.date], lookback: int) -> tuple[dt.date, ...]:
    """The dataset's dates a block over ``dates`` reads: each date's lookback window, and one
    date past the last (where a date without data finds its position, as in a matrix over
    every date)."""
    lo = bisect.bisect_left(data.dates, dates[0])
    hi = bisect.bisect_right(data.dates, dates[-1])
    return tuple(data.dates[max(0, lo - lookback + 1) : hi + 1])


class RangedBlock:
    """One block (a calculation's runnable dates) computed range by range.

    Args:
        executor: the run (its ledger, caches, decider and recording).
        spec: a standard calculation with a columnar form reading a root store.
        decisions: the block's RUNNABLE decisions, dates ascending.
    """

    def __init__(self, executor: Executor, spec: CalcSpec, decisions: list[Decision]):
        self.x = executor
        self.spec = spec
        self.decisions = decisions
        self.dates = [d.date for d in decisions]
        self.started = executor.clock()
        name, calcs = spec.name, executor.manifest.calcs
        self.prev_date = (
            executor.decider.previous_date(name, self.dates[0]) if spec.historical else None
        )
        self.spans = executor._dependency_spans(spec, self.dates)
        executor.cache.prefetch(  # meta results: whole, small
            [
                (dep, d)
                for dep in spec.dependencies
                if not calcs[dep].is_standard
                for d in self.spans[dep][0]
            ]
        )
        self.data = {ds: executor.dataset(ds) for ds in spec.root_data}
        self.root_spans = {
            ds: root_span(data, self.dates, spec.lookback)
            for ds, data in self.data.items()
            if not isinstance(data, Dataset)
        }
        self.runs = [executor._block_run(spec, d, self.started, 0) for d in decisions]
        # per date: the fields of the ranges' tables (name -> holds texts), noted for readers
        # of ranges that lack some
        self.fields: list[dict[str, bool]] = [{} for _ in decisions]
        self.stats = [validation.Stats() for _ in decisions]
        # per date: the failed users kept so far per kind (the first STORED_FAILURES of each)
        self.kept = [{"own": 0, "upstream": 0} for _ in decisions]
        self.error: str | None = None
        self.users = 0  # the frames' users, over the ranges computed
        self.processed = 0

    def ranges(self) -> list[tuple[str | None, str | None]]:
        """User ranges (lo, hi) covering every user: the column parts of the first root
        store read (None: unbounded)."""
        store: Any = self.data[next(iter(self.root_spans))]
        bounds = list(store.part_bounds[1:])
        return list(zip([None, *bounds], [*bounds, None], strict=True))

    def _matrix(
        self,
        ds: str,
        lo: str | None,
        hi: str | None,
        matrices: dict[tuple[str, tuple[dt.date, ...]], RootMatrix],
    ) -> RootMatrix:
        span = self.root_spans.get(ds)
        if span is None:  # held in memory: the whole matrix, the frame keeps the range
            return self.x._matrix(ds)
        hit = matrices.get((ds, span))
        if hit is None:
            hit = matrices[(ds, span)] = RootMatrix.from_store(self.data[ds], span, lo, hi)
        return hit

    def order(
        self,
        lo: str | None,
        hi: str | None,
        root: Callable[[str], StoreSource | RootMatrix],
    ) -> BlockOrder | None:
        """The block over the users ``lo <= user < hi`` as a ``BlockOrder`` (its inputs
        named, not read), each root dataset as ``root(dataset)`` gives it; None once the
        block has failed (the other ranges are not computed)."""
        if self.error is not None:
            return None
        x, spec = self.x, self.spec
        calcs = x.manifest.calcs
        upstream = {
            dep: UpstreamRef(
                tuple((dep, d) for d in span),
                tuple(x.cache.get((dep, d)) for d in span) if not calcs[dep].is_standard else None,
                span,
                rows,
                spec.window(dep),
            )
            for dep, (span, rows) in self.spans.items()
        }
        return BlockOrder(
            spec.name,
            tuple(self.dates),
            {ds: (root(ds), spec.lookback) for ds in spec.root_data},
            upstream,
            (spec.name, self.prev_date) if self.prev_date is not None else None,
            self.prev_date,
            spec.historical,
            STORED_FAILURES,
            tuple(run.writer.generation for run in self.runs),
            x.flush_users,
            x.shard_bytes,
        )

    def remote_order(
        self,
        lo: str | None,
        hi: str | None,
        local_files: bool,
        matrices: dict[tuple[str, tuple[dt.date, ...]], RootMatrix],
        detached: dict[int, RootMatrix],
    ) -> BlockOrder | None:
        """``order`` for a worker elsewhere: a root store by its file when the worker shares
        this machine's files (``local_files``), else the range's matrix read here (through
        ``matrices``, shared by the pass's blocks) and detached (once: ``detached``); a
        dataset held in memory as its whole matrix, detached once per run."""

        def root(ds: str) -> StoreSource | RootMatrix:
            span = self.root_spans.get(ds)
            if span is not None and local_files:
                store: Any = self.data[ds]  # (a ``rootstore.StoredDataset``)
                return StoreSource(str(Path(store.path).resolve()), span)
            matrix = self._matrix(ds, lo, hi, matrices)
            if id(matrix) not in detached:
                detached[id(matrix)] = (
                    matrix.detached() if span is not None else self.x._detached_matrix(ds)
                )
            return detached[id(matrix)]

        order = self.order(lo, hi, root)
        if order is not None:
            read = [k for ref in order.upstream.values() if ref.values is None for k in ref.keys]
            for key in read + ([order.previous] if order.previous is not None else []):
                fields = self.x.tables.fields(key)
                if fields is not None:
                    order.fields[key] = fields
        return order

    def task(
        self,
        lo: str | None,
        hi: str | None,
        matrices: dict[tuple[str, tuple[dt.date, ...]], RootMatrix],
    ) -> BlockTask | None:
        """The block over the users ``lo <= user < hi``, every input read (its root
        matrices from the store, its upstream and previous results from the ledger); None
        once the block has failed."""
        order = self.order(lo, hi, lambda ds: self._matrix(ds, lo, hi, matrices))
        if order is None:
            return None
        return block_task(order, self.spec.cls, lo, hi, self.x.tables, lambda matrix: matrix)

    def _tally(
        self,
        i: int,
        day: DateOutcome | WrittenDay,
        stats: validation.Stats,
        fields: dict[str, bool],
    ) -> _CellRun:
        """Add one range's accounting of date ``i`` (the next users, in order)."""
        run = self.runs[i]
        for field_name, texts in fields.items():
            self.fields[i][field_name] = self.fields[i].get(field_name, False) or texts
        run.processed += day.processed
        run.failures += day.failures
        run.inherited += day.inherited
        kept = self.kept[i]
        for failure in day.failed_users:  # the first of each kind, in user order
            if kept[failure["kind"]] < STORED_FAILURES:
                kept[failure["kind"]] += 1
                run.failed_users.append(failure)
        self.stats[i].merge(stats)
        return run

    def _counted(self, outcome: BlockOutcome | WrittenBlock) -> bool:
        """Count the next range's users; False when the block has failed (by this range,
        or before it: the rest is not taken)."""
        if self.error is not None:
            return False
        self.users += outcome.users
        if outcome.error is not None:
            self.error = outcome.error
            return False
        self.processed += outcome.processed
        return True

    def take(
        self, outcome: BlockOutcome, shards: list[tuple[ShardWriter, list[dict[str, Any]]]]
    ) -> None:
        """Add the outcome of the next range (in user order) to the block's dates and their
        shard rows to ``shards``, with their writer: still compressing (the caller settles
        and writes them: invisible until their dates are published)."""
        if not self._counted(outcome):
            return
        assert outcome.tables is not None
        for i, day in enumerate(outcome.tables):
            run = self._tally(i, day, validation.collect_table(day.table), _fields(day.table))
            buffer_table(run.writer, day.table, self.x.flush_users)
            rows = run.writer.cut(wait=False)  # compressing while the next block computes
            if rows:
                shards.append((run.writer, rows))
                _flushed(run)

    def take_written(self, written: WrittenBlock, seq: int) -> None:
        """Add the next range (in user order), computed and written by a worker from shard
        number ``seq`` on: its accounting, and its shards' payloads, read back, to the
        dates' result hashes."""
        if not self._counted(written):
            return
        for i, day in enumerate(written.days):
            run = self._tally(i, day, day.stats, day.fields)
            if day.shards:
                before = run.writer.shards
                run.writer.absorb_written(
                    self.x.ledger.unpublished_payloads(
                        self.spec.name,
                        self.dates[i],
                        run.writer.generation,
                        (seq, seq + RANGE_SEQ_SPAN),
                    ),
                    day.users,
                    day.bytes_raw,
                    day.bytes_compressed,
                )
                if run.writer.shards - before != day.shards:
                    raise WorkerError(
                        f"{self.spec.name} {self.dates[i]}: a worker wrote {day.shards} "
                        f"shards of a user range, this run found "
                        f"{run.writer.shards - before} (does the worker reach the same "
                        "database?); nothing of the pass was published"
                    )
                _flushed(run)

    def record(self) -> None:
        """Record every date (``Executor._compute_block``'s rules) and stage the writes."""
        x, spec, name = self.x, self.spec, self.spec.name
        writes: list[CellWrite] = []
        recorded = 0
        for i, decision in enumerate(self.decisions):
            if spec.historical and i and (name, self.dates[i - 1]) in x.failed:
                break  # its state failed: the rest waits on it, as in the per-user form
            run: _CellRun = self.runs[i]
            failed = self.error
            if failed is not None:
                run.processed = self.users
            else:
                failed = too_many_failed(run, None)
            if failed is None:
                found = validation.problems(spec.rules, self.stats[i])
                failed = "VALIDATION: " + "; ".join(found) if found else None
            if failed is not None:
                writes.append(x._failure(spec, decision.date, decision, failed, run))
            else:
                writes.append(x._published(spec, decision, run))
            recorded += 1
        for decision in self.decisions[recorded:]:  # decided again: blocked by the failed date
            key = decision.key
            x.summary.executed.pop(key, None)
            x.decisions[key] = x.decider.decide(
                spec, decision.date, x._stored(key), x._upstream_state
            )
        leased = [(name, d) for d in self.dates[:recorded] if x._stored((name, d))]
        if leased:
            x.ledger.lease(leased, x.run_id, self.started + x.lease)
        x.summary.users_processed += self.processed
        for write, fields in zip(writes, self.fields, strict=False):
            if write.generation is not None:
                x.tables.note_fields((name, write.date), fields)
        x._stage(writes, [])
        faults.reached("block")  # computed, leased and staged; not published yet
