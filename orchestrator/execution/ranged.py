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
import datetime as dt
from typing import TYPE_CHECKING, Any

from orchestrator import faults, validation
from orchestrator.execution.blocks import (
    BlockOutcome,
    BlockTask,
    RootMatrix,
    UpstreamInput,
)
from orchestrator.execution.record import _CellRun, too_many_failed
from orchestrator.execution.walk import STORED_FAILURES
from orchestrator.ledger.store import CellWrite
from orchestrator.manifest import CalcSpec
from orchestrator.planning import Decision
from orchestrator.results import ShardWriter
from orchestrator.rootdata import Dataset, RootData

if TYPE_CHECKING:
    from orchestrator.execution.executor import Executor


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

    def task(
        self,
        lo: str | None,
        hi: str | None,
        matrices: dict[tuple[str, tuple[dt.date, ...]], RootMatrix],
    ) -> BlockTask | None:
        """The block over the users ``lo <= user < hi``, every input read (its root
        matrices from the store, its upstream and previous results from the ledger); None
        once the block has failed (the other ranges are not computed)."""
        if self.error is not None:
            return None
        x, spec = self.x, self.spec
        calcs = x.manifest.calcs
        upstream = {
            dep: UpstreamInput(
                [
                    x.cache.get((dep, d))
                    if not calcs[dep].is_standard
                    else x.tables.get_range((dep, d), lo, hi)
                    for d in span
                ],
                not calcs[dep].is_standard,
                span,
                rows,
                spec.window(dep),
            )
            for dep, (span, rows) in self.spans.items()
        }
        previous = (
            x.tables.get_range((spec.name, self.prev_date), lo, hi)
            if self.prev_date is not None
            else None
        )
        return BlockTask(
            spec.name,
            spec.cls,
            tuple(self.dates),
            {ds: (self._matrix(ds, lo, hi, matrices), spec.lookback) for ds in spec.root_data},
            upstream,
            previous,
            self.prev_date,
            spec.historical,
            False,
            STORED_FAILURES,
            user_range=(lo, hi),
        )

    def take(
        self, outcome: BlockOutcome, shards: list[tuple[ShardWriter, list[dict[str, Any]]]]
    ) -> None:
        """Add the outcome of the next range (in user order) to the block's dates and their
        shard rows to ``shards``, with their writer: still compressing (the caller settles
        and writes them: invisible until their dates are published)."""
        if self.error is not None:
            return
        x = self.x
        self.users += outcome.users
        if outcome.error is not None:
            self.error = outcome.error
            return
        assert outcome.tables is not None
        self.processed += outcome.processed
        for run, day, stats, fields, kept in zip(
            self.runs, outcome.tables, self.stats, self.fields, self.kept, strict=True
        ):
            for field_name, col in day.table.columns.items():
                fields[field_name] = fields.get(field_name, False) or col.kind in ("str", "json")
            run.processed += day.processed
            run.failures += day.failures
            run.inherited += day.inherited
            for failure in day.failed_users:  # the first of each kind, in user order
                if kept[failure["kind"]] < STORED_FAILURES:
                    kept[failure["kind"]] += 1
                    run.failed_users.append(failure)
            stats.merge(validation.collect_table(day.table))
            x._add_table(run, day.table)
            rows = run.writer.cut(wait=False)  # compressing while the next block computes
            if rows:
                shards.append((run.writer, rows))
                run.flushes += 1
                run.flush_reasons["BATCH_LIMIT"] = run.flush_reasons.get("BATCH_LIMIT", 0) + 1

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
