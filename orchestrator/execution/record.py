"""Recording finished cells: the writes of a run, staged and published in one transaction per
pass, mirrored in memory for the decisions that follow (``Recorder``, a base of the
``Executor``)."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import psutil

from orchestrator import validation
from orchestrator.ledger.store import CellWrite, Ledger, LedgerCell, SlimCell, Snapshot, build_key
from orchestrator.manifest import CalcSpec, Manifest
from orchestrator.planning import CellInputs, CellKey, Decider, Decision
from orchestrator.results import ShardWriter, StoredResult
from orchestrator.rootdata import RootData

if TYPE_CHECKING:  # (they import this module)
    from orchestrator.execution.caches import ResultCache, TableCache
    from orchestrator.execution.summary import RunSummary
    from orchestrator.execution.workers import WorkerPool

_PROCESS = psutil.Process()


@dataclass(slots=True)
class _CellRun:
    """The in-flight state of one standard cell inside a shared user walk."""

    spec: CalcSpec
    decision: Decision
    instance: Any
    writer: ShardWriter
    upstream: dict[str, Any]
    previous: Mapping[str, Any] | StoredResult
    by_upstream: bool  # no root data: it walks the users of its standard upstream results
    keep: dict[str, Any] | None  # whole result, for the cache; None if the parent lacks it
    started: dt.datetime
    failures: int = 0  # users that failed with an error of their own
    inherited: int = 0  # users whose upstream or previous result had failed
    processed: int = 0
    flushes: int = 0
    # Stored failed users, ``STORED_FAILURES`` of each kind: {"user", "kind", "error"}.
    failed_users: list[dict[str, str]] = field(default_factory=list)
    aborted: str | None = None
    pending: list[dict[str, Any]] = field(default_factory=list)  # shards cut in a worker
    pending_bytes: int = 0
    written: bool = False  # a worker wrote this cell's shards itself (see ``hand_over``)
    stats: validation.Stats | None = None  # merged from workers (else computed from keep)
    flush_reasons: dict[str, int] = field(default_factory=dict)
    recent: list[Any] = field(default_factory=list)  # results since the last flush
    spilled: bool = False  # more than KEEP_LIMIT results: not kept in memory


def too_many_failed(run: _CellRun, aborted: str | None) -> str | None:
    """Why the cell fails as a whole — the circuit breaker tripped (``aborted``) or more
    than ``max_failure_rate`` of its processed users failed — with its first own failures;
    None when it may be published."""
    spec, error = run.spec, aborted
    if error is None and run.processed and run.failures / run.processed > spec.max_failure_rate:
        error = (
            f"{run.failures} of {run.processed} users failed "
            f"({run.failures / run.processed:.0%} > {spec.max_failure_rate:.0%})"
        )
    if error is None:
        return None
    own = [f"user {f['user']}: {f['error']}" for f in run.failed_users if f["kind"] == "own"]
    return error + "\n" + "\n".join(own[:5])


class RunState:
    """The state of a run the ``Executor``'s parts share (set by ``Executor.__init__``)."""

    ledger: Ledger
    manifest: Manifest
    decider: Decider
    stored: Snapshot  # the ledger's cells, updated in place as cells finish
    dataset: Callable[[str], RootData]
    run_id: str
    worker: str
    flush_users: int
    shard_bytes: int
    clock: Callable[[], dt.datetime]
    max_attempts: int
    memory_budget: int | None
    pool: WorkerPool | None
    in_worker: bool
    cache: ResultCache
    tables: TableCache
    decisions: dict[CellKey, Decision]
    hashes: dict[CellKey, str | None]
    ran: set[CellKey]
    migrated: set[CellKey]
    reused: set[CellKey]
    staged_reuses: dict[CellKey, str | None]
    dead: set[CellKey]
    failed: set[CellKey]
    summary: RunSummary
    peak_rss: int
    _unpublished: tuple[list[CellWrite], list[dict[str, Any]]]
    _uncached: bool

    def _stored(self, key: CellKey) -> LedgerCell | SlimCell | None:
        return self.stored.get(key[0], {}).get(key[1])

    def _hash(self, key: CellKey) -> str | None:
        """The result hash published for ``key``: this run's, else the snapshot's."""
        if key in self.hashes:
            return self.hashes[key]
        stored = self._stored(key)
        return stored.result_hash if stored is not None else None


class Recorder(RunState):
    """Stages, publishes and records the cells of a run (see ``Executor`` for the state)."""

    def _publish(self) -> None:
        """Publish the cells finished since the last call, in one transaction: a date's
        passes share it (one commit per date, not per pass). Within the date, later passes
        read their upstream from memory — this process's cache, or the results handed to the
        workers with their task — never from the not yet published ledger."""
        writes, shard_rows = self._unpublished
        if writes:
            self.ledger.publish_with_shards(writes, shard_rows, self.clock())
        self._unpublished = ([], [])

    def _migrate(self, cells: list[tuple[CalcSpec, Decision]]) -> None:
        """Move unchanged results to their calculation's new category, without recomputing
        (CATEGORY_MIGRATED). Results are stored per calculation, so the move is the cell's
        category (its namespace) switching in one transaction; dependents see the same hash."""
        now = self.clock()
        self.ledger.migrate_categories(
            [(spec.name, d.date, spec.category) for spec, d in cells],
            [self._instant_attempt(spec, d, "MIGRATED", now, 0) for spec, d in cells],
        )
        for spec, d in cells:
            key = (spec.name, d.date)
            old = self._stored(key)
            if isinstance(old, LedgerCell):
                self.stored[spec.name][d.date] = _with(old, category=spec.category)
            self.migrated.add(key)

    def _reuse(self, cells: list[tuple[CalcSpec, Decision]]) -> None:
        """Re-point cells to retained results of their current fingerprint, without
        computing (REUSED), in one transaction (``Ledger.publish``: the result each replaces
        is retained in turn). Published before anything reads them: a block's first previous
        state and the next pass read the ledger."""
        if not cells:
            return
        now = self.clock()
        writes = []
        for spec, d in cells:
            key = (spec.name, d.date)
            self.staged_reuses.pop(key, None)
            # (in date order: a historical cell's previous, re-pointed just before, is read
            # from ``hashes``)
            inputs = self.decider.inputs(spec, d.date, self._hash)
            found = next(
                (
                    r
                    for r in self.decider.request.retained.get(key, ())
                    if r.result_hash == d.result_hash and r.inputs_digest == inputs.digest
                ),
                None,
            )
            if found is None:  # the decider found it a moment ago, from the same state
                raise RuntimeError(f"{spec.name} on {d.date}: its reused result is gone")
            writes.append(
                self._cell_write(
                    spec,
                    d.date,
                    inputs,
                    "COMPLETED",
                    found.result_hash,
                    found.generation,
                    found.users,
                    None,
                    self._instant_attempt(spec, d, "REUSED", now, found.users, found.generation),
                    reused=True,
                )
            )
            self.hashes[key] = found.result_hash
        self.ledger.publish(writes, now)
        for w in writes:
            key = (w.calculation, w.date)
            self.stored.setdefault(w.calculation, {})[w.date] = _as_ledger_cell(
                w, self._stored(key)
            )
            self.hashes[key] = w.result_hash
            self.tables.discard(key)
            self.cache.discard(key)
            self.reused.add(key)

    def _instant_attempt(
        self,
        spec: CalcSpec,
        d: Decision,
        status: str,
        now: dt.datetime,
        users: int,
        generation: str | None = None,
    ) -> dict[str, Any]:
        """The attempt row of a cell settled without computing (MIGRATED, REUSED)."""
        return {
            "run_id": self.run_id,
            "calculation": spec.name,
            "date": d.date,
            "reason": d.reason.value,
            "worker": self.worker,
            "started_at": now,
            "finished_at": now,
            "status": status,
            "users": users,
            "users_failed": 0,
            "flushes": 0,
            "shards": 0,
            "bytes_raw": 0,
            "bytes_compressed": 0,
            "peak_memory": self.peak_rss,
            "error": None,
            "detail": d.detail or None,
            "generation": generation,
        }

    def _stage(self, writes: list[CellWrite], shard_rows: list[dict[str, Any]]) -> None:
        """Queue finished cells for the next publish; later decisions see them at once."""
        for write in writes:
            key = (write.calculation, write.date)
            self.stored.setdefault(write.calculation, {})[write.date] = _as_ledger_cell(
                write, self._stored(key)
            )
        self._unpublished[0].extend(writes)
        self._unpublished[1].extend(shard_rows)

    # --- recording ------------------------------------------------------------------------

    def _write(
        self,
        spec: CalcSpec,
        date: dt.date,
        decision: Decision,
        status: str,
        writer: ShardWriter,
        run: _CellRun,
        error: str | None,
        published: bool,
    ) -> CellWrite:
        inputs = self.decider.inputs(spec, date, self._hash)
        finished = self.clock()
        return self._cell_write(
            spec,
            date,
            inputs,
            status,
            writer.hasher.hexdigest() if published else None,
            writer.generation if published else None,
            writer.users,
            error,
            users_failed=run.failures + run.inherited,
            failures=sorted(run.failed_users, key=lambda f: (f["kind"], f["user"])),
            attempt={
                "run_id": self.run_id,
                "calculation": spec.name,
                "date": date,
                "reason": decision.reason.value,
                "worker": self.worker,
                "started_at": run.started,
                "finished_at": finished,
                "status": status,
                "users": run.processed,
                "users_failed": run.failures + run.inherited,
                "flushes": run.flushes,
                "flush_reasons": dict(run.flush_reasons),
                "shards": writer.shards,
                "bytes_raw": writer.bytes_raw,
                "bytes_compressed": writer.bytes_compressed,
                "peak_memory": self.peak_rss,
                "error": error,
                "detail": decision.detail or None,
                "generation": writer.generation if published else None,
            },
        )

    def _cell_write(
        self,
        spec: CalcSpec,
        date: dt.date,
        inputs: CellInputs,
        status: str,
        result_hash: str | None,
        generation: str | None,
        users: int,
        error: str | None,
        attempt: Mapping[str, Any],
        **rest: Any,
    ) -> CellWrite:
        """The write of one cell of ``spec`` with the current parts and ``inputs``."""
        return CellWrite(
            calculation=spec.name,
            date=date,
            status=status,
            category=spec.category,
            code_hash=spec.code_hash,
            layer_hash=spec.layer_hash,
            infra_hash=spec.infra_hash,
            epoch=self.decider.request.epoch,
            scoped_epoch=self.decider.scoped_epoch(spec.name),
            inputs_digest=inputs.digest,
            upstream_hashes=inputs.upstream,
            root_hashes=inputs.root,
            previous_hash=inputs.previous_hash,
            result_hash=result_hash,
            generation=generation,
            users=users,
            run_id=self.run_id,
            error=error,
            attempt=attempt,
            **rest,
        )

    def _success(
        self, spec: CalcSpec, date: dt.date, decision: Decision, writer: ShardWriter, run: _CellRun
    ) -> CellWrite:
        key = (spec.name, date)
        self.ran.add(key)
        self.tables.discard(key)
        write = self._write(spec, date, decision, "COMPLETED", writer, run, None, True)
        self.hashes[key] = write.result_hash
        return write

    def _partial(
        self, spec: CalcSpec, date: dt.date, decision: Decision, error: str, run: _CellRun
    ) -> CellWrite:
        """Publish a cell some of whose users failed with errors of their own (their results
        are failure markers): dependents run on it now, and later runs retry it (RETRY) until
        it is clean, or until it is a dead letter after ``max_attempts`` (still published)."""
        key = (spec.name, date)
        self.ran.add(key)
        self.tables.discard(key)
        stored = self._stored(key)
        attempts = (stored.attempts if isinstance(stored, LedgerCell) else 0) + 1
        status = "DEAD_LETTER" if attempts >= self.max_attempts else "PARTIAL"
        write = self._write(spec, date, decision, status, run.writer, run, error, True)
        self.hashes[key] = write.result_hash
        return write

    def _failure(
        self, spec: CalcSpec, date: dt.date, decision: Decision, error: str, run: _CellRun
    ) -> CellWrite:
        key = (spec.name, date)
        self.failed.add(key)
        self.summary.failed.append((spec.name, date, error.strip().splitlines()[-1]))
        stored = self._stored(key)
        attempts = (stored.attempts if isinstance(stored, LedgerCell) else 0) + 1
        status = "FAILED"
        if attempts >= self.max_attempts:
            status = "DEAD_LETTER"
            self.dead.add(key)
        return self._write(spec, date, decision, status, run.writer, run, error, False)

    def _sample_memory(self) -> None:
        rss = _PROCESS.memory_info().rss
        self.peak_rss = max(self.peak_rss, rss)


def _with(cell: LedgerCell, **changes: Any) -> LedgerCell:
    """``cell`` with some fields changed and its build key recomputed from them."""
    new = cell._replace(**changes)
    return new._replace(
        build=build_key(
            new.status,
            new.category,
            new.code_hash,
            new.layer_hash,
            new.infra_hash,
            new.epoch,
            new.scoped_epoch,
        )
    )


def _as_ledger_cell(w: CellWrite, old: LedgerCell | SlimCell | None) -> LedgerCell:
    """The ledger row a write leaves behind, mirrored in memory for later decisions (as
    ``Ledger._publish`` writes it)."""
    old_attempts = old.attempts if isinstance(old, LedgerCell) else 0
    attempts = old_attempts + 1 if w.status != "COMPLETED" else 0
    if w.generation is None and isinstance(old, LedgerCell):
        return _with(
            old,
            status=w.status,
            attempts=attempts,
            error=w.error,
            attempted_digest=w.inputs_digest,
            users_failed=w.users_failed,
        )
    return LedgerCell(
        calculation=w.calculation,
        date=w.date,
        build=build_key(
            w.status, w.category, w.code_hash, w.layer_hash, w.infra_hash, w.epoch, w.scoped_epoch
        ),
        inputs_digest=w.inputs_digest,
        result_hash=w.result_hash
        if w.generation is not None
        else (old.result_hash if old else None),
        status=w.status,
        category=w.category,
        code_hash=w.code_hash,
        layer_hash=w.layer_hash,
        infra_hash=w.infra_hash,
        epoch=w.epoch,
        scoped_epoch=w.scoped_epoch,
        upstream_json=json.dumps(dict(w.upstream_hashes)),
        root_json=json.dumps({k: dict(v) for k, v in w.root_hashes.items()}),
        previous_hash=w.previous_hash,
        attempts=attempts,
        error=w.error,
        attempted_digest=w.inputs_digest,
        users_failed=w.users_failed,
    )
