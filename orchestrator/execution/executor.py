"""The executor: acts on a plan, cell by cell, in dependency order.

Order: dates ascending in chunks of ``block_dates``, passes ascending within a chunk, so every
same-date dependency and every historical predecessor is settled before a cell is considered.
A cell the plan left BLOCKED (waiting on upstream) is decided again with the same
``Decider.decide`` once its upstream settled: it runs (UPSTREAM_CHANGED) or is skipped by
early cutoff (UPSTREAM_UNCHANGED). The runnable cells of one calculation in a chunk form a
block (``blocks.run_block``); per-user cells over a root store are walked (``walk.py``).

Failed users: a user whose calculation raised, or whose root rows were malformed, gets a
failure marker as its result (``results.failure_marker``: part of the result hash) and its
traceback stored (``STORED_FAILURES`` per cell); the cell is published PARTIAL, retried by
later runs until clean or dead-lettered. A user whose upstream or previous result is a marker
fails the same way in the dependent (the marker names where it failed first) without user
code seeing it, and a meta calculation over markers fails naming the users. So a failure is
never read as "no result" or "empty state", and fixing it changes hashes that re-run whatever
consumed it. After the run, ``_verdict`` reads the ledger for the range: failed users, dead
letters and cells blocked by a failure make the run not clean (exit code 1).
"""

from __future__ import annotations

import bisect
import collections
import datetime as dt
import os
import socket
import sys
import time
import uuid
from collections.abc import Callable
from contextlib import AbstractContextManager, ExitStack
from typing import Any

import numpy as np

from orchestrator import faults, validation
from orchestrator.columns import Table
from orchestrator.execution.blockpool import BlockPool
from orchestrator.execution.blocks import (
    BlockTask,
    RootMatrix,
    UpstreamInput,
    run_block,
)
from orchestrator.execution.caches import ResultCache, TableCache
from orchestrator.execution.ranged import RANGE_SEQ_SPAN, RangedBlock, RangeOrder, buffer_table
from orchestrator.execution.record import _PROCESS, _CellRun, too_many_failed
from orchestrator.execution.summary import RunSummary
from orchestrator.execution.walk import STORED_FAILURES, UserWalk
from orchestrator.execution.workers import WorkerPool
from orchestrator.fingerprint import result_line
from orchestrator.ledger.store import CellWrite, Ledger, Snapshot
from orchestrator.manifest import CalcSpec, Manifest
from orchestrator.planning import CellKey, Decider, Decision, Plan, Reason, Status, Upstream
from orchestrator.results import (
    ShardWriter,
    describe_failure,
)
from orchestrator.rootdata import Dataset, RootData

# Given the root matrices a run's blocks may read: the runner of its blocks, or None.
BlockRunnerFactory = Callable[[dict[str, RootMatrix]], AbstractContextManager[Any] | None]

# Dates per chunk of the run (see ``Executor._walk_dates``): a columnar block computes at
# most this many dates at once, so its arrays are bounded by dates × users × fields.
BLOCK_DATES = 256


class Executor(UserWalk):
    """Runs the RUNNABLE (and re-decided BLOCKED) cells of a plan.

    Args:
        ledger: where results and cell states are written.
        manifest: the calculations.
        decider: the plan's decision rule (same instance the plan was made with).
        plan: the plan to act on.
        ledger_snapshot: the ledger rows the plan was made from.
        dataset: loads a root dataset by name (parsed once, cached by the caller).
        run_id: this run's id.
        flush_users / shard_bytes: flush thresholds.
        in_scope: which cells may execute (backfill ranges); others are left as planned.
        clock: returns the current UTC time (timestamps only; never part of a decision).
        progress: show a progress bar on stderr.
        heartbeat: called after each date (renews the run lock).
        workers: processes for standard cells (users partitioned, see ``workers.py``).
        max_attempts: consecutive failed attempts after which a cell is a dead letter.
        lease: how long the lease of a RUNNING cell lasts (renewed by ``heartbeat``).
        memory_budget: bytes of resident memory past which buffers are flushed early
            (MEMORY_PRESSURE); None: flush on thresholds only.
        columnar: run calculations that have a columnar form (``compute``) in it, in blocks;
            False: every calculation in its per-user form.
        block_dates: dates per chunk: the most dates one block computes at once.
        block_runner: given the root matrices a block may read, the runner of the run's
            per-user blocks (``executors.ExecutorPlugin.block_runner``), or None: none. By
            default the forked ``BlockPool`` when ``workers`` > 1.
        remote_ranges: the runner also computes the ranges of columnar blocks over root
            stores (``_compute_ranges_on``), so it is started for them too.
    """

    def __init__(
        self,
        ledger: Ledger,
        manifest: Manifest,
        decider: Decider,
        plan: Plan,
        ledger_snapshot: Snapshot,
        dataset: Callable[[str], RootData],
        run_id: str,
        flush_users: int,
        shard_bytes: int,
        in_scope: Callable[[CellKey], bool] = lambda key: True,
        clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
        progress: bool = False,
        heartbeat: Callable[[], None] = lambda: None,
        workers: int = 1,
        max_attempts: int = 3,
        lease: dt.timedelta = dt.timedelta(minutes=10),
        memory_budget: int | None = None,
        columnar: bool = True,
        block_dates: int = BLOCK_DATES,
        block_runner: BlockRunnerFactory | None = None,
        remote_ranges: bool = False,
    ):
        self.ledger = ledger
        self.manifest = manifest
        self.decider = decider
        self.plan = plan
        self.stored: Snapshot = ledger_snapshot  # updated in place as cells finish
        self.dataset = dataset
        self.run_id = run_id
        self.flush_users = flush_users
        self.shard_bytes = shard_bytes
        self.in_scope = in_scope
        self.clock = clock
        self.progress = progress
        self.heartbeat = heartbeat
        self.workers = workers
        self.max_attempts = max_attempts
        self.lease = lease
        self.memory_budget = memory_budget
        self.columnar = columnar
        self.block_dates = block_dates
        self.block_runner = block_runner
        self.remote_ranges = remote_ranges
        # Room for a chunk's results of a few calculations: a block's upstream is often the
        # block just computed (blocks over fewer dates than the chunk re-read less).
        self.tables = TableCache(ledger, capacity=max(256, 4 * block_dates))
        self._matrices: dict[str, RootMatrix] = {}
        self._detached: dict[str, RootMatrix] = {}
        self.pool: WorkerPool | None = None
        self.block_pool: Any = None  # a BlockRunner (``executors``) while the run lasts
        self.in_worker = False
        self.decisions: dict[CellKey, Decision] = dict(plan.decisions)
        self.hashes: dict[CellKey, str | None] = {}  # published during this run
        self.ran: set[CellKey] = set()
        self.migrated: set[CellKey] = set()
        self.reused: set[CellKey] = set()  # re-pointed to a retained result (REUSED)
        self.staged_reuses: dict[CellKey, str | None] = {}  # to re-point: their result hash
        self.dead: set[CellKey] = set()  # failed past max_attempts: dead letters
        self._unpublished: tuple[list[CellWrite], list[dict[str, Any]]] = ([], [])
        self._uncached = False  # a result of this pass is not in memory (see KEEP_LIMIT)
        self.failed: set[CellKey] = set()
        # Room for every result of a date and of the one before (historical), at least.
        self.cache = ResultCache(ledger, manifest, capacity=max(256, 3 * len(manifest.calcs)))
        self.worker = f"{socket.gethostname()}:{os.getpid()}"
        self.summary = RunSummary(run_id=run_id)
        self.peak_rss = _PROCESS.memory_info().rss

    # --- decisions during the run ---------------------------------------------------------

    def _upstream_state(self, key: CellKey) -> tuple[Upstream, str | None]:
        if key in self.ran:
            return (Upstream.RAN, self._hash(key))
        if key in self.failed:
            return (Upstream.FAILED, None)
        if key in self.migrated or key in self.reused:
            return (Upstream.READY, self._hash(key))
        staged = self.staged_reuses.get(key)
        if staged is not None:  # re-pointed before anything computes (``_run_columnar``)
            return (Upstream.READY, staged)
        decision = self.decisions.get(key)
        if decision is None:
            return (Upstream.READY, self._hash(key))
        if decision.reason is Reason.REUSED:
            # Not re-pointed yet (outside the run's dates or selection): what is published
            # is not what the plan settled on, so its dependents wait for it.
            return (Upstream.PENDING, None)
        status = decision.status
        if status is Status.SKIPPED:
            return (Upstream.READY, self._hash(key))
        if status is Status.IMPOSSIBLE:
            return (Upstream.IMPOSSIBLE, None)
        if decision.reason is Reason.UPSTREAM_FAILED:
            return (Upstream.FAILED, None)
        if decision.reason in (Reason.DEAD_LETTER, Reason.UPSTREAM_DEAD_LETTER):
            return (Upstream.DEAD, None)
        return (Upstream.PENDING, None)

    def execute(self) -> RunSummary:
        """Act on the plan. Never raises for a failing calculation: failures are recorded.

        Raises:
            WorkerError: a worker process died (nothing of its pass was published).
        """
        work = [k for k in self.plan.order if _to_act_on(self.decisions[k]) and self.in_scope(k)]
        if self.workers <= 1 and self.block_runner is None:
            return self._execute()
        with ExitStack() as stack:
            # The walk's workers are forked first: before a dask client starts its event
            # loop thread (forking a process with such a thread may deadlock the child).
            self._start_walk_pool(work, stack)
            self._start_block_pool(work, stack)
            try:
                return self._execute()
            finally:
                self.block_pool = None
                self.pool = None

    def _start_block_pool(self, work: list[CellKey], stack: ExitStack) -> None:
        """Fork the block workers when per-user standard cells of the work run in blocks
        (columnar ones stay here: ``BlockPool.takes``); the matrices are built first, so the
        workers share them."""
        calcs = self.manifest.calcs
        # (a cell to re-point to a retained result computes nothing: a revert starts no
        # workers, no cluster)
        work = [k for k in work if self.decisions[k].reason is not Reason.REUSED]
        blocked = {
            k[0]
            for k in work
            if calcs[k[0]].is_standard and self._blocked(k[0]) and not self._columnar(k[0])
        }
        ranged = self.remote_ranges and any(self._ranged(calcs[k[0]]) for k in work)
        if not blocked and not ranged:
            return
        # (a block over a root store streams its users in this process)
        held = {
            ds
            for name in blocked
            for ds in calcs[name].root_data
            if isinstance(self.dataset(ds), Dataset)
        }
        matrices = {ds: self._matrix(ds) for ds in sorted(held)}
        if self.block_runner is not None:
            runner = self.block_runner(matrices)
        else:
            runner = BlockPool(matrices, self.manifest, self.workers) if self.workers > 1 else None
        if runner is not None:
            self.block_pool = stack.enter_context(runner)

    def _start_walk_pool(self, work: list[CellKey], stack: ExitStack) -> None:
        """Fork the walk's worker pool (``workers.WorkerPool``) when per-user standard cells
        of the work are walked over root stores and ``workers`` > 1."""
        # Workers walk per-user standard cells over root stores; blocks have their own pool
        # (or none), so a run without walked cells forks no walk pool.
        standard = {
            k[0] for k in work if self.manifest.calcs[k[0]].is_standard and not self._blocked(k[0])
        }
        if not standard or self.workers <= 1:
            return
        # The users a cell walks come from its root data or, for a cell without root data,
        # from its standard upstream results, whose users came from root data further up:
        # sample the root data of the whole standard upstream closure, so a run that
        # re-runs only upstream-driven cells still splits its users evenly.
        calcs, sources, todo = self.manifest.calcs, set(), list(standard)
        while todo:
            name = todo.pop()
            if name not in sources:
                sources.add(name)
                todo.extend(d for d in calcs[name].dependencies if calcs[d].is_standard)
        users: set[str] = set()
        for ds in {ds for name in sources for ds in calcs[name].root_data}:
            # opened before the fork: held in memory it is shared copy-on-write
            users.update(self.dataset(ds).user_sample())
        self.pool = stack.enter_context(WorkerPool(self, self.workers, users))

    def _execute(self) -> RunSummary:
        started = time.perf_counter()
        self._walk_dates("run")
        # Reconciliation: failed cells get one more attempt in this run (and their blocked
        # dependents a chance to run); what still fails waits for the next run or, past
        # ``max_attempts``, goes to the dead letters.
        retry = [k for k in self.plan.order if k in self.failed and k not in self.dead]
        if retry:
            for key in retry:
                self.failed.discard(key)
                self.decisions[key] = Decision(*key, Reason.RETRY, "reconciliation")
            self.summary.failed = [f for f in self.summary.failed if (f[0], f[1]) not in retry]
            self._walk_dates("reconcile")
        for key in self.plan.order:
            self._count(self.decisions[key], key)
        self._verdict()
        self.summary.seconds = time.perf_counter() - started
        self.summary.peak_memory = self.peak_rss
        return self.summary

    def _verdict(self) -> None:
        """Whether the range is complete and clean after the run, from the ledger (failed
        users and dead letters, whenever they happened: a cell skipped as up to date may still
        carry a failed user) and from the final decisions (cells blocked by a failure, each
        with the failed or dead-lettered cell at the top of its chain)."""
        s = self.summary
        if not self.plan.dates:
            return
        dead = set()
        for row in self.ledger.unclean_cells(
            self.manifest.calcs, self.plan.dates[0], self.plan.target_date
        ):
            key = (row.calculation, row.date)
            if not self.in_scope(key) or key not in self.decisions:
                continue
            if row.status == "DEAD_LETTER":
                s.dead_letters.append(key)
                dead.add(key)
            if row.users_failed and row.status in ("PARTIAL", "COMPLETED"):
                # (FAILED and DEAD_LETTER cells have their own lines)
                s.users_failed.append((*key, row.status, row.users_failed))
        blocking = (Reason.UPSTREAM_FAILED, Reason.UPSTREAM_DEAD_LETTER)
        for key in self.plan.order:
            reason = self.decisions[key].reason
            if reason in blocking and key not in dead and self.in_scope(key):
                s.blocked_by_failure.append((key, self.decider.root_cause(key)))
            elif reason is Reason.WAITING_ON_UPSTREAM and self.in_scope(key):
                # (only a selection leaves one: its upstream is outside and must run first)
                s.waiting.append(key)

    def _walk_dates(self, label: str) -> None:
        """Run every date with work, with a progress bar when asked.

        Dates go in chunks of ``block_dates``; within a chunk, passes in order, and within a
        pass the columnar calculations in blocks over the chunk's dates and the per-user ones
        date by date (a shared user walk per date). Each pass of a chunk is published in one
        transaction before the next pass reads it. Every same-date dependency, window and
        previous date of a cell is therefore settled before the cell is decided again."""
        dates = sorted({k[1] for k in self.plan.order if self._work_left(k)})
        bar = None
        if self.progress and dates:
            from tqdm import tqdm

            bar = tqdm(total=len(dates), unit="date", file=sys.stderr, desc=label)
        step = max(1, self.block_dates)
        for start in range(0, len(dates), step):
            chunk = dates[start : start + step]
            for members in self.manifest.passes:
                blocked = [n for n in members if self._blocked(n)]
                walked = tuple(n for n in members if n not in blocked)
                if walked:
                    for date in chunk:
                        self._run_pass(date, walked)
                ranged: list[tuple[CalcSpec, list[Decision]]] = []
                for name in blocked:
                    spec = self.manifest.calcs[name]
                    # blocks over root stores: computed together, a user range at a time
                    together = self._ranged(spec) and not spec.historical
                    self._run_columnar(name, chunk, ranged if together else None)
                if ranged:
                    self._compute_ranged(ranged)
                self._publish()
                self.heartbeat()
            if bar is not None:
                bar.update(len(chunk))
                bar.set_postfix_str(f"{chunk[-1]} done={len(self.ran)}")
        if bar is not None:
            bar.close()

    def _work_left(self, key: CellKey) -> bool:
        """Whether ``key`` still has to be decided again and maybe run in this walk: RUNNABLE
        or BLOCKED (or REUSED: to re-point), in scope, neither run, migrated nor re-pointed
        yet."""
        return (
            _to_act_on(self.decisions[key])
            and self.in_scope(key)
            and key not in self.ran
            and key not in self.migrated
            and key not in self.reused
        )

    def _columnar(self, name: str) -> bool:
        """Whether ``name`` runs in its columnar form (it has one, and it is not disabled)."""
        return self.columnar and self.manifest.calcs[name].columnar

    def _blocked(self, name: str) -> bool:
        """Whether ``name``'s cells run in blocks: its columnar form, or a standard
        calculation's per-user form when the root data of it and of its standard upstream
        closure are held in memory. Users of a dataset read from its root store are streamed
        instead (``_walk``), so memory stays flat in the number of users."""
        if self._columnar(name):
            return True
        calcs = self.manifest.calcs
        if not calcs[name].is_standard:
            return False
        seen, stack = set(), [name]
        while stack:
            spec = calcs[stack.pop()]
            if spec.name in seen:
                continue
            seen.add(spec.name)
            if not all(isinstance(self.dataset(ds), Dataset) for ds in spec.root_data):
                return False
            stack.extend(d for d in spec.dependencies if calcs[d].is_standard)
        return True

    def _count(self, decision: Decision, key: CellKey) -> None:
        s = self.summary
        status = decision.status
        if key in self.ran or key in self.migrated:
            s.completed += 1
        elif key in self.reused:
            s.reused += 1
        elif key in self.failed:
            pass
        elif decision.reason is Reason.REUSED:  # not re-pointed: outside the run's scope
            s.not_in_scope += 1
        elif status is Status.SKIPPED:
            s.skipped += 1
        elif status is Status.IMPOSSIBLE:
            s.impossible += 1
        elif status is Status.BLOCKED and self.in_scope(key):
            s.blocked += 1
        else:  # RUNNABLE or BLOCKED, outside the run's dates or selection
            s.not_in_scope += 1
        s.reasons[decision.reason.value] = s.reasons.get(decision.reason.value, 0) + 1

    def _run_pass(self, date: dt.date, members: tuple[str, ...]) -> None:
        to_run: list[tuple[CalcSpec, Decision]] = []
        migrations: list[tuple[CalcSpec, Decision]] = []
        reuses: list[tuple[CalcSpec, Decision]] = []
        for name in members:
            key = (name, date)
            if not self._work_left(key):
                continue
            spec = self.manifest.calcs[name]
            decision = self.decider.decide(spec, date, self._stored(key), self._upstream_state)
            self.decisions[key] = decision
            if decision.reason is Reason.REUSED:
                reuses.append((spec, decision))
            elif decision.reason is Reason.CATEGORY_MIGRATED:
                migrations.append((spec, decision))
                self.summary.executed[key] = decision.reason.value
            elif decision.status is Status.RUNNABLE:
                to_run.append((spec, decision))
                self.summary.executed[key] = decision.reason.value
        if migrations:
            self._migrate(migrations)
        self._reuse(reuses)
        leased = [(spec.name, date) for spec, _ in to_run if self._stored((spec.name, date))]
        if leased:
            self.ledger.lease(leased, self.run_id, self.clock() + self.lease)
        standard = [(s, d) for s, d in to_run if s.is_standard]
        writes: list[CellWrite] = []
        shard_rows: list[dict[str, Any]] = []
        if standard:
            std_writes, rows = self._run_standard(date, standard)
            writes += std_writes
            shard_rows += rows
        for spec, decision in to_run:
            if not spec.is_standard:
                meta_write, rows = self._run_meta(date, spec, decision)
                writes.append(meta_write)
                shard_rows += rows
        self._stage(writes, shard_rows)
        if self._uncached:  # a result too big to keep in memory: dependents read the ledger
            self._publish()
            self._uncached = False

    # --- columnar blocks ------------------------------------------------------------------

    def _run_columnar(
        self,
        name: str,
        dates: list[dt.date],
        later: list[tuple[CalcSpec, list[Decision]]] | None = None,
    ) -> None:
        """Decide the calculation's cells of ``dates`` again and compute the runnable ones in
        blocks. A historical calculation's block is a run of consecutive dates: a cell
        waiting only on its own previous date (BLOCKED) closes the block, which is computed
        first, and is then decided on the result (early cutoff). ``later``: collect the
        blocks there instead of computing them (not for a historical calculation)."""
        spec = self.manifest.calcs[name]
        pending: list[Decision] = []
        migrations: list[tuple[CalcSpec, Decision]] = []
        reuses: list[tuple[CalcSpec, Decision]] = []

        def compute() -> None:
            # (a block may read a re-pointed cell as its first previous state)
            self._reuse(reuses)
            reuses.clear()
            if pending:
                if later is not None:
                    later.append((spec, list(pending)))
                else:
                    self._compute_block(spec, list(pending))
                pending.clear()

        for date in dates:
            key = (name, date)
            if not self._work_left(key):
                continue
            prev = self.decider.previous_date(name, date) if spec.historical else None
            if spec.historical and pending and prev != pending[-1].date:
                compute()  # not consecutive: the next block starts from a stored state
            decision = self.decider.decide(spec, date, self._stored(key), self._upstream_state)
            if decision.status is Status.BLOCKED and pending and prev == pending[-1].date:
                compute()
                decision = self.decider.decide(spec, date, self._stored(key), self._upstream_state)
            self.decisions[key] = decision
            if decision.reason is Reason.REUSED:
                reuses.append((spec, decision))
                self.staged_reuses[key] = decision.result_hash
            elif decision.reason is Reason.CATEGORY_MIGRATED:
                compute()
                migrations.append((spec, decision))
                self.summary.executed[key] = decision.reason.value
            elif decision.status is Status.RUNNABLE:
                if len(pending) >= self.block_dates:
                    compute()
                pending.append(decision)
                self.summary.executed[key] = decision.reason.value
        compute()
        if migrations:
            self._migrate(migrations)

    def _matrix(self, dataset: str) -> RootMatrix:
        """The dataset as dense matrices over all its dates (built once per run)."""
        hit = self._matrices.get(dataset)
        if hit is None:
            data = self.dataset(dataset)
            hit = self._matrices[dataset] = RootMatrix.build(data, data.dates)  # type: ignore[attr-defined]
        return hit

    def _detached_matrix(self, dataset: str) -> RootMatrix:
        """``_matrix(dataset)`` detached (every column read, no dataset behind it), what
        travels to a worker elsewhere (built once per run)."""
        hit = self._detached.get(dataset)
        if hit is None:
            hit = self._detached[dataset] = self._matrix(dataset).detached()
        return hit

    def _dependency_spans(
        self, spec: CalcSpec, dates: list[dt.date]
    ) -> dict[str, tuple[tuple[dt.date, ...], np.ndarray]]:
        """dependency -> (its dates a block over ``dates`` reads, the row of each block date
        among them): the block's dates, or with a window from the first block date's window
        through the last."""
        spans: dict[str, tuple[tuple[dt.date, ...], np.ndarray]] = {}
        for dep in spec.dependencies:
            width = spec.window(dep)
            if width == 1:
                spans[dep] = (tuple(dates), np.arange(len(dates)))
                continue
            # the dependency's dates from the first block date's window through the last
            possible = self.decider.possible[dep]
            lo = bisect.bisect_left(possible, dates[0])
            span = tuple(
                possible[max(0, lo - width + 1) : bisect.bisect_right(possible, dates[-1])]
            )
            index = {d: i for i, d in enumerate(span)}
            spans[dep] = (span, np.array([index[d] for d in dates], dtype=np.int64))
        return spans

    def _compute_block(self, spec: CalcSpec, decisions: list[Decision]) -> None:
        """Compute one block of ``spec``'s cells (dates ascending) and stage their writes."""
        if self._ranged(spec):
            self._compute_ranged([(spec, decisions)])
            return
        name, calcs = spec.name, self.manifest.calcs
        dates = [d.date for d in decisions]
        started = self.clock()
        prev_date = self.decider.previous_date(name, dates[0]) if spec.historical else None
        spans = self._dependency_spans(spec, dates)
        wanted = [
            (dep, d) for dep in spec.dependencies if calcs[dep].is_standard for d in spans[dep][0]
        ]
        if prev_date is not None and spec.is_standard:
            wanted.append((name, prev_date))
        tables = self.tables.get_many(wanted)
        self.cache.prefetch(  # meta results: one bulk read, not two queries per date
            [
                (dep, d)
                for dep in spec.dependencies
                if not calcs[dep].is_standard
                for d in spans[dep][0]
            ]
            + ([(name, prev_date)] if prev_date is not None and not spec.is_standard else [])
        )
        upstream: dict[str, UpstreamInput] = {}
        for dep in spec.dependencies:
            span, span_rows = spans[dep]
            meta = not calcs[dep].is_standard
            results = (
                [self.cache.get((dep, d)) for d in span]
                if meta
                else [tables[(dep, d)] for d in span]
            )
            upstream[dep] = UpstreamInput(results, meta, span, span_rows, spec.window(dep))
        previous: Any = None
        if prev_date is not None:
            previous = (
                tables[(name, prev_date)] if spec.is_standard else self.cache.get((name, prev_date))
            )
        task = BlockTask(
            name,
            spec.cls,
            tuple(dates),
            {ds: (self._matrix(ds), spec.lookback) for ds in spec.root_data},
            upstream,
            previous,
            prev_date,
            spec.historical,
            not spec.is_standard,
            STORED_FAILURES,
            per_user=not self._columnar(name),
        )
        if self.block_pool is not None and self.block_pool.takes(task):
            breaker = (spec.cls.breaker_min_users, spec.cls.max_failure_rate)
            outcome = self.block_pool.run(task, breaker if task.per_user else None)
        else:
            outcome = run_block(task)
        writes: list[CellWrite] = []
        shard_rows: list[dict[str, Any]] = []
        rows: list[dict[str, Any]]
        recorded = 0
        for i, decision in enumerate(decisions):
            if spec.historical and i and (name, dates[i - 1]) in self.failed:
                break  # its state failed: the rest waits on it, as in the per-user form
            if outcome.error is not None:
                run = self._block_run(spec, decision, started, outcome.users)
                write, rows = self._failure(spec, decision.date, decision, outcome.error, run), []
            elif outcome.tables is not None:
                day = outcome.tables[i]
                run = self._block_run(spec, decision, started, day.processed)
                run.failures, run.inherited = day.failures, day.inherited
                run.failed_users = day.failed_users
                write, rows = self._finish_block(spec, decision, run, day.table, day.aborted)
            else:
                assert outcome.results is not None and outcome.upstream_failed is not None
                run = self._block_run(spec, decision, started, 0)
                write, rows = self._finish_meta(
                    spec, decision, run, outcome.results[i], outcome.upstream_failed[i]
                )
            writes.append(write)
            shard_rows += rows
            recorded += 1
        for decision in decisions[recorded:]:  # decided again: blocked by the failed date
            key = decision.key
            self.summary.executed.pop(key, None)
            self.decisions[key] = self.decider.decide(
                spec, decision.date, self._stored(key), self._upstream_state
            )
        # Leased once computed (a crash while computing leaves the cells as they were, to be
        # decided again by their fingerprints), before their writes are staged for publish.
        leased = [(name, d) for d in dates[:recorded] if self._stored((name, d))]
        if leased:
            self.ledger.lease(leased, self.run_id, started + self.lease)
        self.summary.users_processed += outcome.processed
        self._sample_memory()
        self._stage(writes, shard_rows)
        faults.reached("block")  # computed, leased and staged; not published yet

    def _block_run(
        self, spec: CalcSpec, decision: Decision, started: dt.datetime, processed: int
    ) -> _CellRun:
        """The bookkeeping of one block date, as a per-user walk keeps it."""
        writer = ShardWriter(
            spec.name, decision.date, uuid.uuid4().hex, self.shard_bytes, table=spec.is_standard
        )
        run = _CellRun(
            spec=spec,
            decision=decision,
            instance=None,
            writer=writer,
            upstream={},
            previous={},
            by_upstream=not spec.root_data,
            keep=None,
            started=started,
        )
        run.processed = processed
        return run

    def _finish_block(
        self,
        spec: CalcSpec,
        decision: Decision,
        run: _CellRun,
        table: Table,
        aborted: str | None = None,
    ) -> tuple[CellWrite, list[dict[str, Any]]]:
        """Validate and record one standard block date (``_finish``'s rules; ``aborted``: the
        circuit breaker's error)."""
        date = decision.date
        error = too_many_failed(run, aborted)
        if error is not None:
            return self._failure(spec, date, decision, error, run), []
        found = validation.problems(spec.rules, validation.collect_table(table))
        if found:
            return self._failure(spec, date, decision, "VALIDATION: " + "; ".join(found), run), []
        buffer_table(run.writer, table, self.flush_users)
        rows = run.writer.cut()
        run.flushes = len(rows)
        run.flush_reasons = {"FINAL": 1} if rows else {}
        write = self._published(spec, decision, run)
        self.tables.put((spec.name, date), table)
        return write, rows

    def _published(self, spec: CalcSpec, decision: Decision, run: _CellRun) -> CellWrite:
        """The write publishing a validated standard block date: PARTIAL when users failed
        with errors of their own, else COMPLETED."""
        if run.failures:
            first = next(f for f in run.failed_users if f["kind"] == "own")
            last = first["error"].strip().splitlines()[-1]
            error = (
                f"{run.failures} of {run.processed} users failed; first: {first['user']}: {last}"
            )
            return self._partial(spec, decision.date, decision, error, run)
        return self._success(spec, decision.date, decision, run.writer, run)

    # --- columnar blocks over a root store, a user range at a time ------------------------

    def _ranged(self, spec: CalcSpec) -> bool:
        """Whether ``spec``'s blocks run a user range at a time: a standard calculation in
        its columnar form reading a dataset from its root store (too many users to hold)."""
        return (
            spec.is_standard
            and self._columnar(spec.name)
            and any(not isinstance(self.dataset(ds), Dataset) for ds in spec.root_data)
        )

    def _compute_ranged(self, blocks: list[tuple[CalcSpec, list[Decision]]]) -> None:
        """Compute blocks of one pass's calculations that read root stores, a user range at
        a time (``ranged.RangedBlock``): range by range, every block computes the range's
        users, sharing the root matrices it reads; then each block's dates are recorded and
        published at once (their dependents read them by user range from the ledger)."""
        ranged = [RangedBlock(self, spec, decisions) for spec, decisions in blocks]
        remote = self.remote_ranges and self.block_pool is not None
        self._compute_ranges_on(self.block_pool if remote else _HERE, ranged)
        for block in ranged:
            block.record()
        self._publish()

    def _compute_ranges_on(self, runner: Any, ranged: list[RangedBlock]) -> None:
        """``_compute_ranged``'s ranges computed by ``runner``, keeping at most
        ``runner.in_flight`` ranges out and taking them back in user order (result hashes
        stream in that order). So memory here follows the ranges in flight.

        ``_HERE`` (in this process): this process reads each range's inputs, computes its
        blocks and writes their shards. An ``executors.RangeRunner`` (dask's): each range
        goes out as a ``ranged.RangeOrder``; its worker reads the inputs from the ledger
        (and the root stores, when it shares this machine's files; else the range's root
        matrices are read here and travel) and writes the shards itself; this process reads
        the shards' payloads back for the result hashes. Either way the shards belong to
        unpublished generations: invisible until ``record`` and ``_publish``."""
        writes = runner is not _HERE
        url = self.ledger.url() if writes else ""
        in_flight: collections.deque[tuple[list[RangedBlock], int, Any]] = collections.deque()

        def take_oldest() -> None:
            blocks, seq, handle = in_flight.popleft()
            if writes:
                for block, written in zip(blocks, runner.result(handle), strict=True):
                    block.take_written(written, seq)
            else:
                shards: list[tuple[ShardWriter, list[dict[str, Any]]]] = []
                for block, outcome in zip(blocks, runner.result(handle), strict=True):
                    block.take(outcome, shards)
                self.ledger.write_shards([row for w, rows in shards for row in w.settle(rows)])
            self._sample_memory()

        for index, (lo, hi) in enumerate(ranged[0].ranges()):
            matrices: dict[tuple[str, tuple[dt.date, ...]], RootMatrix] = {}
            seq = index * RANGE_SEQ_SPAN
            if writes:
                detached: dict[int, RootMatrix] = {}  # a matrix the blocks share travels once
                orders = [
                    (block, block.remote_order(lo, hi, runner.local_files, matrices, detached))
                    for block in ranged
                ]
                live: list[tuple[RangedBlock, Any]] = [(b, o) for b, o in orders if o is not None]
                if live:
                    order = RangeOrder(url, lo, hi, seq, [o for _, o in live])
                    handle = runner.submit(order)
            else:
                tasks = [(block, block.task(lo, hi, matrices)) for block in ranged]
                live = [(b, t) for b, t in tasks if t is not None]
                if live:
                    handle = runner.submit([t for _, t in live])
            if not live:
                continue
            in_flight.append(([b for b, _ in live], seq, handle))
            while len(in_flight) > runner.in_flight:
                take_oldest()
        while in_flight:
            take_oldest()

    def _finish_meta(
        self,
        spec: CalcSpec,
        decision: Decision,
        run: _CellRun,
        result: dict[str, Any],
        failed: tuple[str, list[tuple[str, dict[str, str]]]] | None,
    ) -> tuple[CellWrite, list[dict[str, Any]]]:
        """Validate and record one meta block date (``_run_meta``'s rules): it fails when a
        standard dependency has failed users that date (``failed``), naming them."""
        date = decision.date
        if failed is not None:
            dep, origins = failed
            users = [u for u, _ in origins]
            run.inherited = len(users)
            run.failed_users = [
                {"user": u, "kind": "upstream", "error": "upstream " + describe_failure(u, o)}
                for u, o in origins[:STORED_FAILURES]
            ]
            names = ", ".join(users[:10])
            more = f" and {len(users) - 10} more" if len(users) > 10 else ""
            error = (
                f"upstream {dep} failed for {len(users)} user(s) on {date}: {names}{more} "
                "(orchestrator failures)"
            )
            return self._failure(spec, date, decision, error, run), []
        run.processed = 1  # (as ``_run_meta``: counted once the calculation ran)
        found = validation.problems(spec.rules, validation.collect([result]), per_user=False)
        if found:
            return self._failure(spec, date, decision, "VALIDATION: " + "; ".join(found), run), []
        run.writer.add_line(result_line(None, result))
        rows = run.writer.cut()
        run.flushes = 1
        self.cache.put((spec.name, date), result)
        return self._success(spec, date, decision, run.writer, run), rows


def _to_act_on(decision: Decision) -> bool:
    """Whether the executor decides a planned cell again when its turn comes: it may run
    (RUNNABLE, or BLOCKED until its upstream settles) or it is to be re-pointed (REUSED)."""
    return decision.status in (Status.RUNNABLE, Status.BLOCKED) or (
        decision.reason is Reason.REUSED
    )


class _InProcess:
    """The ranges of columnar blocks over root stores computed right here, one at a time
    (a ``RangeRunner`` with nothing in flight)."""

    in_flight = 0

    def submit(self, tasks: list[BlockTask]) -> list[Any]:
        return [run_block(task) for task in tasks]

    def result(self, handle: list[Any]) -> list[Any]:
        return handle


_HERE = _InProcess()
