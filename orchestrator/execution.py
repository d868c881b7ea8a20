"""The executor: acts on a plan, cell by cell, in dependency order.

Order: dates ascending, passes ascending within a date, so every same-date dependency and
every historical predecessor is settled before a cell is considered. A cell the plan left
BLOCKED (waiting on upstream) is decided again with the same ``Decider.decide`` once its
upstream settled: it runs (UPSTREAM_CHANGED) or is skipped by early cutoff
(UPSTREAM_UNCHANGED).

Streaming: the standard cells of one pass and date share one walk over the users (sorted by
id), each user's root rows read once. Root rows, upstream results and previous results are
sorted streams read in step with the walk (root stores, shards past ``KEEP_LIMIT`` users), so
memory is flat in the number of users. Each cell's canonical result lines are buffered and
flushed as compressed shards every ``flush_users`` users or ``shard_bytes`` bytes; shards are
written under a fresh generation no reader looks at, and the cell is published (its generation
switched) in one transaction only after every user succeeded or the failure rate stayed under
the cell's ``max_failure_rate``. A failure records the traceback; dependents are BLOCKED.

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
import datetime as dt
import json
import os
import socket
import sys
import time
import traceback
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import psutil

from orchestrator import faults, validation
from orchestrator.blocks import (
    BlockTask,
    LazyHistory,
    RootMatrix,
    UpstreamInput,
    checked_result,
    inherited_failure,
    run_block,
)
from orchestrator.calculation import MetaContext, StandardContext
from orchestrator.columns import Table
from orchestrator.fingerprint import result_line
from orchestrator.ledger.store import CellWrite, Ledger, LedgerCell, SlimCell, Snapshot, build_key
from orchestrator.manifest import CalcSpec, Manifest
from orchestrator.parallel import WorkerPool
from orchestrator.planning import CellKey, Decider, Decision, Plan, Reason, Status, Upstream
from orchestrator.results import (
    FAILED_KEY,
    ShardWriter,
    StoredResult,
    assemble,
    decode_shards,
    decode_tables,
    describe_failure,
    failure_marker,
    failure_of,
)
from orchestrator.rootdata import Dataset, RootData, Row

MEMORY_CHECK_EVERY = 1000  # users between two looks at the process's memory
# A cell's whole result is kept in memory for its dependents only up to this many users;
# beyond, memory stays bounded by the flush thresholds and dependents read the shards.
KEEP_LIMIT = 20_000
# A worker hands a cell's shards to the parent in memory up to this many raw bytes; beyond, it
# writes them itself (the parent reads them back, one at a time, for the result hash).
WORKER_INLINE_BYTES = 8 * 2**20
_PROCESS = psutil.Process()
# Failed users stored per attempt of a cell, of each kind (own / upstream), with their error;
# the cell's ``users_failed`` counts them all.
STORED_FAILURES = 20
# Dates per chunk of the run (see ``Executor._walk_dates``): a columnar block computes at
# most this many dates at once, so its arrays are bounded by dates × users × fields.
BLOCK_DATES = 256
# Value types a result holds without a closer look (anything else must be JSON-encodable).


@dataclass(slots=True)
class RunSummary:
    """What a run did, and whether the range it covered is complete and clean.

    ``failed`` lists (calculation, date, error's last line) of the cells this run could not
    publish; ``executed`` maps every cell that ran (successfully or not) to the reason it ran;
    ``reasons`` counts final reasons; ``notes`` are problems of the root data this run uses
    (skipped rows and unreadable files, as stored with each dataset's index, whether or not
    this run re-read it; users failed by malformed rows), each with its location.

    The verdict covers the whole range after the run, not only what ran: ``users_failed``
    lists (calculation, date, status, failed users) of the published cells whose last attempt
    had failed users (status PARTIAL: errors of their own; COMPLETED: failures inherited from
    upstream or from the previous date); ``dead_letters`` the dead-lettered
    cells; ``blocked_by_failure`` the cells blocked by a failure, each with the failed or dead-lettered
    cell at the top of its chain. ``ok`` (exit code 0) only when all of these are empty.
    """

    run_id: str
    completed: int = 0
    skipped: int = 0
    failed: list[tuple[str, dt.date, str]] = field(default_factory=list)
    blocked: int = 0
    impossible: int = 0
    not_in_scope: int = 0
    users_processed: int = 0
    seconds: float = 0.0
    peak_memory: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    executed: dict[tuple[str, dt.date], str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    users_failed: list[tuple[str, dt.date, str, int]] = field(default_factory=list)
    dead_letters: list[tuple[str, dt.date]] = field(default_factory=list)
    blocked_by_failure: list[tuple[tuple[str, dt.date], tuple[str, dt.date]]] = field(
        default_factory=list
    )

    @property
    def ok(self) -> bool:
        """Every cell of the range is complete and clean."""
        return not (
            self.failed or self.users_failed or self.dead_letters or self.blocked_by_failure
        )

    @property
    def exit_code(self) -> int:
        """What ``run`` exits with: 0 when ``ok``, else 1 (see the CLI's exit-code table)."""
        return 0 if self.ok else 1

    def lines(self) -> list[str]:
        """One line per kind of problem, each naming the command that shows more."""
        out = []
        if self.failed:
            out.append(
                f"{_count(len(self.failed), 'cell')} failed: {_cells([(c, d) for c, d, _ in self.failed])}"
                " (orchestrator runs --run ID)"
            )
        own = [f for f in self.users_failed if f[2] != "COMPLETED"]
        inherited = [f for f in self.users_failed if f[2] == "COMPLETED"]
        if own:
            out.append(
                f"{_count(sum(f[3] for f in own), 'user')} failed in {_count(len(own), 'cell')}: "
                f"{_cells([(c, d) for c, d, _, _ in own])} (orchestrator failures)"
            )
        if inherited:
            out.append(
                f"{_count(sum(f[3] for f in inherited), 'user')} failed upstream or on an "
                f"earlier date in {_count(len(inherited), 'more cell')}: "
                f"{_cells([(c, d) for c, d, _, _ in inherited])} (orchestrator failures)"
            )
        if self.dead_letters:
            out.append(
                f"{_count(len(self.dead_letters), 'dead letter')}: {_cells(self.dead_letters)}"
                " (orchestrator dlq list)"
            )
        if self.blocked_by_failure:
            causes = list(dict.fromkeys(cause for _, cause in self.blocked_by_failure))
            out.append(
                f"{_count(len(self.blocked_by_failure), 'cell')} blocked by a failure upstream, caused by "
                f"{_cells(causes)} (orchestrator plan)"
            )
        return out


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _cells(keys: list[tuple[str, dt.date]], limit: int = 3) -> str:
    shown = ", ".join(f"{c} {d}" for c, d in keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


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


@dataclass(slots=True)
class _Window:
    """A windowed dependency's results on its window dates (oldest first), for a cell."""

    results: list[Any]
    dates: list[dt.date]


def _none(user: str) -> None:
    return None


def _window_lookup(gets: list[Callable[[str], Any]]) -> Callable[[str], list[Any]]:
    """A user's results over a window, from one lookup per window date."""

    def lookup(user: str) -> list[Any]:
        return [get(user) for get in gets]

    return lookup


def _today(value: Any) -> Any:
    """A standard upstream value as the user-driving rule sees it: the result of the cell's
    own date (a window's last entry; the engine only drives users by same-date results)."""
    return value[-1] if type(value) is list and value else None if type(value) is list else value


def _failure_in(value: Any) -> dict[str, str] | None:
    """The first failure marker of an upstream value (a window: its oldest failure)."""
    if type(value) is list:
        return next((o for v in value if (o := failure_of(v)) is not None), None)
    return failure_of(value)


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

    def put(self, key: CellKey, table: Table | None) -> None:
        self._items[key] = table
        self._items.move_to_end(key)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def discard(self, key: CellKey) -> None:
        """Forget ``key`` (its published result is being replaced)."""
        self._items.pop(key, None)

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


class Executor:
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
        workers: processes for standard cells (users partitioned, see ``parallel.py``).
        max_attempts: consecutive failed attempts after which a cell is a dead letter.
        lease: how long the lease of a RUNNING cell lasts (renewed by ``heartbeat``).
        memory_budget: bytes of resident memory past which buffers are flushed early
            (MEMORY_PRESSURE); None: flush on thresholds only.
        columnar: run calculations that have a columnar form (``compute``) in it, in blocks;
            False: every calculation in its per-user form.
        block_dates: dates per chunk: the most dates one block computes at once.
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
        # Room for a chunk's results of a few calculations: a block's upstream is often the
        # block just computed (blocks over fewer dates than the chunk re-read less).
        self.tables = TableCache(ledger, capacity=max(256, 4 * block_dates))
        self._matrices: dict[str, RootMatrix] = {}
        self.pool: WorkerPool | None = None
        self.in_worker = False
        self.decisions: dict[CellKey, Decision] = dict(plan.decisions)
        self.hashes: dict[CellKey, str | None] = {}  # published during this run
        self.ran: set[CellKey] = set()
        self.migrated: set[CellKey] = set()
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

    def _stored(self, key: CellKey) -> LedgerCell | SlimCell | None:
        return self.stored.get(key[0], {}).get(key[1])

    def _hash(self, key: CellKey) -> str | None:
        """The result hash published for ``key``: this run's, else the snapshot's."""
        if key in self.hashes:
            return self.hashes[key]
        stored = self._stored(key)
        return stored.result_hash if stored is not None else None

    def _upstream_state(self, key: CellKey) -> tuple[Upstream, str | None]:
        if key in self.ran:
            return (Upstream.RAN, self._hash(key))
        if key in self.failed:
            return (Upstream.FAILED, None)
        if key in self.migrated:
            return (Upstream.READY, self._hash(key))
        decision = self.decisions.get(key)
        if decision is None:
            return (Upstream.READY, self._hash(key))
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
        work = [
            k
            for k in self.plan.order
            if self.decisions[k].status in (Status.RUNNABLE, Status.BLOCKED) and self.in_scope(k)
        ]
        # Workers walk per-user standard cells; columnar blocks run in this process, so a
        # run of columnar calculations only forks no pool (it would only cost memory).
        standard = {
            k[0] for k in work if self.manifest.calcs[k[0]].is_standard and not self._blocked(k[0])
        }
        if self.workers <= 1 or not standard:
            return self._execute()
        # The users a cell walks come from its root data or, for a cell without root data,
        # from its standard upstream results, whose users came from root data further up:
        # sample the root data of the whole standard upstream closure, so a run that
        # re-runs only upstream-driven cells still splits its users evenly.
        calcs, sources, stack = self.manifest.calcs, set(), list(standard)
        while stack:
            name = stack.pop()
            if name not in sources:
                sources.add(name)
                stack.extend(d for d in calcs[name].dependencies if calcs[d].is_standard)
        users: set[str] = set()
        for ds in {ds for name in sources for ds in calcs[name].root_data}:
            # opened before the fork: held in memory it is shared copy-on-write
            users.update(self.dataset(ds).user_sample())
        with WorkerPool(self, self.workers, users) as pool:
            self.pool = pool
            try:
                return self._execute()
            finally:
                self.pool = None

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
            if self.decisions[key].reason in blocking and key not in dead and self.in_scope(key):
                s.blocked_by_failure.append((key, self.decider.root_cause(key)))

    def _publish(self) -> None:
        """Publish the cells finished since the last call, in one transaction: a date's
        passes share it (one commit per date, not per pass). Within the date, later passes
        read their upstream from memory — this process's cache, or the results handed to the
        workers with their task — never from the not yet published ledger."""
        writes, shard_rows = self._unpublished
        if writes:
            self.ledger.publish_with_shards(writes, shard_rows, self.clock())
        self._unpublished = ([], [])

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
                for name in blocked:
                    self._run_columnar(name, chunk)
                self._publish()
                self.heartbeat()
            if bar is not None:
                bar.update(len(chunk))
                bar.set_postfix_str(f"{chunk[-1]} done={len(self.ran)}")
        if bar is not None:
            bar.close()

    def _work_left(self, key: CellKey) -> bool:
        """Whether ``key`` still has to be decided again and maybe run in this walk: RUNNABLE
        or BLOCKED, in scope, neither run nor migrated yet."""
        return (
            self.decisions[key].status in (Status.RUNNABLE, Status.BLOCKED)
            and self.in_scope(key)
            and key not in self.ran
            and key not in self.migrated
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
        elif key in self.failed:
            pass
        elif status is Status.SKIPPED:
            s.skipped += 1
        elif status is Status.IMPOSSIBLE:
            s.impossible += 1
        elif status is Status.BLOCKED:
            s.blocked += 1
        else:
            s.not_in_scope += 1
        s.reasons[decision.reason.value] = s.reasons.get(decision.reason.value, 0) + 1

    def _migrate(self, cells: list[tuple[CalcSpec, Decision]]) -> None:
        """Move unchanged results to their calculation's new category, without recomputing
        (CATEGORY_MIGRATED). Results are stored per calculation, so the move is the cell's
        category (its namespace) switching in one transaction; dependents see the same hash."""
        now = self.clock()
        self.ledger.migrate_categories(
            [(spec.name, d.date, spec.category) for spec, d in cells],
            [
                {
                    "run_id": self.run_id,
                    "calculation": spec.name,
                    "date": d.date,
                    "reason": d.reason.value,
                    "worker": self.worker,
                    "started_at": now,
                    "finished_at": now,
                    "status": "MIGRATED",
                    "users": 0,
                    "users_failed": 0,
                    "flushes": 0,
                    "shards": 0,
                    "bytes_raw": 0,
                    "bytes_compressed": 0,
                    "peak_memory": self.peak_rss,
                    "error": None,
                }
                for spec, d in cells
            ],
        )
        for spec, d in cells:
            key = (spec.name, d.date)
            old = self._stored(key)
            if isinstance(old, LedgerCell):
                self.stored[spec.name][d.date] = _with(old, category=spec.category)
            self.migrated.add(key)

    def _run_pass(self, date: dt.date, members: tuple[str, ...]) -> None:
        to_run: list[tuple[CalcSpec, Decision]] = []
        migrations: list[tuple[CalcSpec, Decision]] = []
        for name in members:
            key = (name, date)
            if not self._work_left(key):
                continue
            spec = self.manifest.calcs[name]
            decision = self.decider.decide(spec, date, self._stored(key), self._upstream_state)
            self.decisions[key] = decision
            if decision.reason is Reason.CATEGORY_MIGRATED:
                migrations.append((spec, decision))
                self.summary.executed[key] = decision.reason.value
            elif decision.status is Status.RUNNABLE:
                to_run.append((spec, decision))
                self.summary.executed[key] = decision.reason.value
        if migrations:
            self._migrate(migrations)
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

    def _run_columnar(self, name: str, dates: list[dt.date]) -> None:
        """Decide the calculation's cells of ``dates`` again and compute the runnable ones in
        blocks. A historical calculation's block is a run of consecutive dates: a cell
        waiting only on its own previous date (BLOCKED) closes the block, which is computed
        first, and is then decided on the result (early cutoff)."""
        spec = self.manifest.calcs[name]
        pending: list[Decision] = []
        migrations: list[tuple[CalcSpec, Decision]] = []

        def compute() -> None:
            if pending:
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
            if decision.reason is Reason.CATEGORY_MIGRATED:
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

    def _compute_block(self, spec: CalcSpec, decisions: list[Decision]) -> None:
        """Compute one block of ``spec``'s cells (dates ascending) and stage their writes."""
        name, calcs = spec.name, self.manifest.calcs
        dates = [d.date for d in decisions]
        started = self.clock()
        prev_date = self.decider.previous_date(name, dates[0]) if spec.historical else None
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
        outcome = run_block(
            BlockTask(
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
        )
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
        error = aborted
        if error is None and run.processed and run.failures / run.processed > spec.max_failure_rate:
            error = (
                f"{run.failures} of {run.processed} users failed "
                f"({run.failures / run.processed:.0%} > {spec.max_failure_rate:.0%})"
            )
        if error is not None:
            own = [
                f"user {f['user']}: {f['error']}" for f in run.failed_users if f["kind"] == "own"
            ]
            error = error + "\n" + "\n".join(own[:5])
            return self._failure(spec, date, decision, error, run), []
        found = validation.problems(spec.rules, validation.collect_table(table))
        if found:
            return self._failure(spec, date, decision, "VALIDATION: " + "; ".join(found), run), []
        step = max(1, self.flush_users)  # a shard holds at most ``flush_users`` users
        for lo in range(0, len(table), step):
            run.writer.add_table(
                table.take(np.arange(lo, min(lo + step, len(table))))
                if len(table) > step
                else table
            )
        rows = run.writer.cut()
        run.flushes = len(rows)
        run.flush_reasons = {"FINAL": 1} if rows else {}
        if run.failures:
            first = next(f for f in run.failed_users if f["kind"] == "own")
            last = first["error"].strip().splitlines()[-1]
            error = (
                f"{run.failures} of {run.processed} users failed; first: {first['user']}: {last}"
            )
            write = self._partial(spec, date, decision, error, run)
        else:
            write = self._success(spec, date, decision, run.writer, run)
        self.tables.put((spec.name, date), table)
        return write, rows

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

    def _stage(self, writes: list[CellWrite], shard_rows: list[dict[str, Any]]) -> None:
        """Queue finished cells for the next publish; later decisions see them at once."""
        for write in writes:
            key = (write.calculation, write.date)
            self.stored.setdefault(write.calculation, {})[write.date] = _as_ledger_cell(
                write, self._stored(key)
            )
        self._unpublished[0].extend(writes)
        self._unpublished[1].extend(shard_rows)

    # --- standard cells -------------------------------------------------------------------

    def _inputs_for(self, spec: CalcSpec, date: dt.date) -> tuple[dict[str, Any], Any]:
        """Upstream results of the date and the own previous result (historical only).

        For a standard calculation the previous result is a mapping user -> result (empty when
        there is none); for a meta calculation it is the previous result dict or None.
        """
        upstream: dict[str, Any] = {}
        for dep, key_date in self.decider.upstream_keys(spec, date):
            result = self.cache.get((dep, key_date))
            if not spec.is_standard and isinstance(result, StoredResult):
                result = dict(result.items())  # a meta calculation reads its upstream whole
            if spec.window(dep) == 1:
                upstream[dep] = result
            else:
                window = upstream.setdefault(dep, _Window([], []))
                window.results.append(result)
                window.dates.append(key_date)
        if not spec.is_standard:
            upstream = {
                dep: list(res.results) if isinstance(res, _Window) else res
                for dep, res in upstream.items()
            }
        previous = None
        if spec.historical:
            prev_date = self.decider.previous_date(spec.name, date)
            if prev_date is not None:
                previous = self.cache.get((spec.name, prev_date))
        if spec.is_standard:
            previous = previous or {}
        return upstream, previous

    def _prepare(
        self, date: dt.date, cells: list[tuple[CalcSpec, Decision]], inputs: bool = True
    ) -> list[_CellRun]:
        """In-flight state per standard cell; with ``inputs``, its upstream and previous
        results (a parallel run's parent leaves those to the workers)."""
        now = self.clock()
        runs = []
        if inputs:
            wanted = [k for spec, _ in cells for k in self.decider.upstream_keys(spec, date)]
            for spec, _ in cells:
                if spec.historical and (prev := self.decider.previous_date(spec.name, date)):
                    wanted.append((spec.name, prev))
            self.cache.prefetch(wanted)
        for spec, decision in cells:
            upstream, previous = self._inputs_for(spec, date) if inputs else ({}, {})
            runs.append(
                _CellRun(
                    spec=spec,
                    decision=decision,
                    instance=spec.cls(),
                    writer=ShardWriter(spec.name, date, uuid.uuid4().hex, self.shard_bytes),
                    upstream=upstream,
                    previous=previous,
                    by_upstream=not spec.root_data,
                    keep={},
                    started=now,
                )
            )
        return runs

    def _run_standard(
        self, date: dt.date, cells: list[tuple[CalcSpec, Decision]]
    ) -> tuple[list[CellWrite], list[dict[str, Any]]]:
        if self.pool is not None:
            runs = self._prepare(date, cells, inputs=False)
            self.pool.compute(date, runs, self)
        else:
            runs = self._prepare(date, cells)
            self._walk(date, runs)
        self._sample_memory()
        writes = []
        shard_rows: list[dict[str, Any]] = []
        for run in runs:
            write, rows = self._finish(run, date)
            writes.append(write)
            shard_rows += rows
        return writes, shard_rows

    def hand_over(self, run: _CellRun, rows: list[dict[str, Any]]) -> None:
        """In a worker: keep the cell's shards for the parent (with their raw payloads, for the
        result hash) up to ``WORKER_INLINE_BYTES``; past that, write them under the cell's
        generation now and from then on (``run.written``), so a worker's memory stays bounded.
        Written shards stay invisible until the parent publishes the generation."""
        run.pending.extend(rows)
        run.pending_bytes += sum(row["raw_bytes"] for row in rows)
        if run.written or run.pending_bytes > WORKER_INLINE_BYTES:
            self.ledger.write_shards(run.pending)
            run.pending.clear()
            run.writer.raws.clear()
            run.written = True

    def flush(self, run: _CellRun, reason: str) -> None:
        """Cut the cell's buffer into shards and write them (a worker hands them over, see
        ``hand_over``). ``reason`` is BATCH_LIMIT, MEMORY_PRESSURE or FINAL, counted on the
        attempt."""
        writer = run.writer
        if not writer.pending:
            return
        if run.stats is None:
            run.stats = validation.Stats()
        run.stats.merge(validation.collect(run.recent))  # validation, without keeping results
        run.recent.clear()
        run.flushes += 1
        run.flush_reasons[reason] = run.flush_reasons.get(reason, 0) + 1
        if self.in_worker:
            self.hand_over(run, writer.cut())
        else:
            self.ledger.write_shards(writer.cut())
            faults.reached("flush")
        self._sample_memory()

    def under_pressure(self) -> bool:
        """Whether this process's memory passed ``memory_fraction`` of ``memory_budget``."""
        rss = _PROCESS.memory_info().rss
        self.peak_rss = max(self.peak_rss, rss)
        return self.memory_budget is not None and rss > self.memory_budget

    def _walk(
        self,
        date: dt.date,
        runs: list[_CellRun],
        span: tuple[str | None, str | None] = (None, None),
    ) -> None:
        """One walk over the users in id order, each user's root rows read once and passed to
        every cell of the group.

        Every per-user input is a sorted stream read in step with the walk — root data
        (``RootData.stream``), standard upstream results and the own previous result (dicts,
        or ``StoredResult`` shards) — so memory does not grow with the number of users.
        ``span`` = (lo, hi) keeps a worker's users ``lo <= user < hi``. Shards are flushed as
        thresholds are reached."""
        lo, hi = span
        names = sorted({ds for run in runs if not run.by_upstream for ds in run.spec.root_data})
        datasets = {ds: self.dataset(ds) for run in runs for ds in run.spec.root_data}
        roots = {ds: _Cursor(datasets[ds].stream(date, lo, hi)) for ds in names}
        calcs = self.manifest.calcs
        cursors: dict[int, _Cursor] = {}  # one per StoredResult, shared by the cells reading it

        def stored(result: StoredResult) -> _Cursor:
            if id(result) not in cursors:
                cursors[id(result)] = _Cursor(result.items(lo, hi))
            return cursors[id(result)]

        drivers: list[_Cursor] = list(roots.values())
        keyed: set[str] = set()  # users of in-memory upstream results of upstream-driven cells
        plans = []
        for run in runs:
            lookups: list[tuple[str, Callable[[str], Any]]] = []
            whole = {}
            for dep, res in run.upstream.items():
                if isinstance(res, _Window):
                    if not calcs[dep].is_standard:
                        whole[dep] = list(res.results)
                        continue
                    gets: list[Callable[[str], Any]] = [
                        r.get if isinstance(r, dict) else stored(r).get if r is not None else _none
                        for r in res.results
                    ]
                    lookups.append((dep, _window_lookup(gets)))
                    last = res.results[-1] if res.dates and res.dates[-1] == date else None
                    if run.by_upstream and isinstance(last, dict):
                        keyed.update(last)
                    elif run.by_upstream and last is not None:
                        drivers.append(stored(last))
                    continue
                if not calcs[dep].is_standard or res is None:
                    whole[dep] = res
                elif isinstance(res, dict):
                    lookups.append((dep, res.get))
                    if run.by_upstream:
                        keyed.update(res)
                else:
                    cursor = stored(res)
                    lookups.append((dep, cursor.get))
                    if run.by_upstream:
                        drivers.append(cursor)
            previous = (
                run.previous.get if isinstance(run.previous, Mapping) else stored(run.previous).get
            )
            plans.append((run, run.spec.root_data, lookups, whole, previous, run.spec.lookback))
        if keyed:
            drivers.append(_Cursor(((u, None) for u in sorted(keyed)), lo, hi))
        drivers = list({id(c): c for c in drivers}.values())  # a shared upstream drives once
        no_rows: list[Row] = []
        flush_users, shard_bytes = self.flush_users, self.shard_bytes
        lone = drivers[0] if len(drivers) == 1 else None
        walked = 0
        while True:
            if lone is not None:
                user = lone.key
            else:
                user = min([c.key for c in drivers if c.key is not None], default=None)
            if user is None:
                break
            walked += 1
            faults.reached("user")
            if walked % MEMORY_CHECK_EVERY == 0 and self.under_pressure():
                for run in runs:  # adaptive flushing: free the buffers before the budget
                    self.flush(run, "MEMORY_PRESSURE")
            today: dict[str, list[Row]] = {}
            malformed: dict[str, list[str]] | None = None
            for ds, cursor in roots.items():
                entry = cursor.get(user)
                if entry is None:
                    today[ds] = no_rows
                else:
                    today[ds] = entry[0]
                    if entry[1]:
                        malformed = malformed or {}
                        malformed[ds] = entry[1]
            shared: dict[tuple[str, ...], dict[str, list[Row]]] = {}
            for run, root_names, lookups, whole, previous, lookback in plans:
                if run.aborted:
                    continue
                upstream = dict(whole)
                for dep, lookup in lookups:
                    upstream[dep] = lookup(user)
                if not run.by_upstream:
                    if malformed is not None and any(ds in malformed for ds in root_names):
                        # malformed root rows that date: a failed user, with the locations
                        bad = [where for ds in root_names for where in malformed.get(ds, ())]
                        run.processed += 1
                        error = f"malformed root data: {'; '.join(bad)}"
                        _user_failed(run, user, date, error, error)
                        self._flush_if_full(run)
                        continue
                    root = shared.get(root_names)
                    if root is None:
                        root = shared[root_names] = {ds: today[ds] for ds in root_names}
                    if not any(root.values()):
                        continue
                    if lookback > 1:
                        # A malformed row earlier in the window: the window is not the
                        # user's history, so the user fails this date too (until fixed).
                        bad = [
                            where
                            for ds in root_names
                            for where in datasets[ds].window_problems(user, date, lookback)
                        ]
                        if bad:
                            run.processed += 1
                            error = f"malformed root data in its history window: {'; '.join(bad)}"
                            _user_failed(run, user, date, error, error)
                            self._flush_if_full(run)
                            continue
                    history: Mapping[str, list[Any]] = (
                        LazyHistory(datasets, root_names, user, date, lookback)
                        if lookback > 1
                        else root
                    )
                elif all(_today(upstream[dep]) is None for dep, _ in lookups):
                    continue
                else:
                    root = history = {}
                before = previous(user)
                # A failed upstream or previous result of this user: the user fails here too
                # (never computed from "no result" or from an empty state), naming its origin.
                origin = failure_of(before)
                for dep, _ in lookups:
                    origin = origin or _failure_in(upstream[dep])
                if origin is not None:
                    run.processed += 1
                    _user_inherited(run, user, origin)
                    self._flush_if_full(run)
                    continue
                ctx = StandardContext(date, user, root, history, upstream, before)
                run.processed += 1
                try:
                    result = run.instance.process(ctx)
                    if result is not None:
                        run.writer.add(user, checked_result(user, result))
                        run.recent.append(result)
                        if run.keep is not None:
                            run.keep[user] = result
                            if len(run.keep) > KEEP_LIMIT:  # too big to cache: readers stream it
                                run.keep = None
                                run.spilled = True
                except Exception as e:  # noqa: BLE001 - user code: a per-user failure
                    last = traceback.format_exception_only(e)[-1].strip()
                    _user_failed(run, user, date, traceback.format_exc(), last)
                writer = run.writer  # a flush threshold reached (checked per user and cell)
                if writer.pending >= flush_users or writer.pending_bytes >= shard_bytes:
                    self.flush(run, "BATCH_LIMIT")
            self.summary.users_processed += 1
            for cursor in drivers:
                if cursor.key == user:
                    cursor.step()

    def _flush_if_full(self, run: _CellRun) -> None:
        writer = run.writer
        if writer.pending >= self.flush_users or writer.pending_bytes >= self.shard_bytes:
            self.flush(run, "BATCH_LIMIT")

    def _finish(self, run: _CellRun, date: dt.date) -> tuple[CellWrite, list[dict[str, Any]]]:
        spec = run.spec
        error = run.aborted
        if error is None and run.processed and run.failures / run.processed > spec.max_failure_rate:
            error = (
                f"{run.failures} of {run.processed} users failed "
                f"({run.failures / run.processed:.0%} > {spec.max_failure_rate:.0%})"
            )
        if error is not None:
            own = [
                f"user {f['user']}: {f['error']}" for f in run.failed_users if f["kind"] == "own"
            ]
            error = error + "\n" + "\n".join(own[:5])
            return self._failure(spec, date, run.decision, error, run), []
        if run.stats is None:
            run.stats = validation.Stats()
        run.stats.merge(validation.collect(run.recent))
        run.recent.clear()
        stats = run.stats
        found = validation.problems(spec.rules, stats)
        if found:  # nothing of this attempt is published; the previous result stays
            run.writer.cut()
            error = "VALIDATION: " + "; ".join(found)
            return self._failure(spec, date, run.decision, error, run), []
        rows = run.writer.cut()
        if rows and self.pool is None:
            run.flushes += 1
            run.flush_reasons["FINAL"] = run.flush_reasons.get("FINAL", 0) + 1
        if run.keep is not None:
            self.cache.put((spec.name, date), run.keep)
        elif run.spilled:
            self._uncached = True
            self.cache.discard((spec.name, date))  # an older result may be cached
        if run.failures:  # published without the failed users' results: retried later
            first = next(f for f in run.failed_users if f["kind"] == "own")
            last = first["error"].strip().splitlines()[-1]
            error = (
                f"{run.failures} of {run.processed} users failed; first: {first['user']}: {last}"
            )
            return self._partial(spec, date, run.decision, error, run), rows
        return self._success(spec, date, run.decision, run.writer, run), rows

    # --- meta cells -----------------------------------------------------------------------

    def _run_meta(
        self, date: dt.date, spec: CalcSpec, decision: Decision
    ) -> tuple[CellWrite, list[dict[str, Any]]]:
        now = self.clock()
        upstream, previous = self._inputs_for(spec, date)
        run = _CellRun(
            spec=spec,
            decision=decision,
            instance=spec.cls(),
            writer=ShardWriter(spec.name, date, uuid.uuid4().hex, self.shard_bytes, table=False),
            upstream=upstream,
            previous={},
            by_upstream=False,
            keep={},
            started=now,
        )
        # A meta calculation aggregates whole results: it never runs without a failed user's
        # result (a silently different aggregate); it fails, naming the users.
        for dep in spec.dependencies:
            res = upstream.get(dep)
            if not self.manifest.calcs[dep].is_standard or not isinstance(res, dict):
                continue
            failed = [(u, o) for u, v in res.items() if (o := failure_of(v)) is not None]
            if failed:
                run.inherited = len(failed)
                run.failed_users = [
                    {"user": u, "kind": "upstream", "error": "upstream " + describe_failure(u, o)}
                    for u, o in failed[:STORED_FAILURES]
                ]
                names = ", ".join(u for u, _ in failed[:10])
                more = f" and {len(failed) - 10} more" if len(failed) > 10 else ""
                error = (
                    f"upstream {dep} failed for {len(failed)} user(s) on {date}: {names}{more} "
                    "(orchestrator failures)"
                )
                return self._failure(spec, date, decision, error, run), []
        ctx = MetaContext(
            date=date,
            root={ds: self.dataset(ds).rows_on(date) for ds in spec.root_data},
            upstream=upstream,
            previous=previous,
        )
        run.processed = 1
        try:
            result = run.instance.process(ctx)
            if result is not None and not isinstance(result, dict):
                raise TypeError(
                    f"process() must return a dict or None, not {type(result).__name__}"
                )
            run.writer.add_line(result_line(None, result))
        except Exception:  # noqa: BLE001 - user code: any error fails the cell
            run.failures = 1
            return self._failure(spec, date, decision, traceback.format_exc(), run), []
        found = validation.problems(spec.rules, validation.collect([result]), per_user=False)
        if found:
            error = "VALIDATION: " + "; ".join(found)
            return self._failure(spec, date, decision, error, run), []
        rows = run.writer.cut()
        run.flushes = 1
        self.cache.put((spec.name, date), result)
        return self._success(spec, date, decision, run.writer, run), rows

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
            result_hash=writer.hasher.hexdigest() if published else None,
            generation=writer.generation if published else None,
            users=writer.users,
            run_id=self.run_id,
            error=error,
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
            },
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


class _Cursor:
    """A sorted ``(user, value)`` stream looked up in ascending user order: ``get(user)``
    skips the users before ``user`` and never moves past it (several cells may ask for the
    same user); ``key`` is the next user not yet passed (None at the end). Optional bounds
    ``lo <= user < hi`` filter the stream."""

    __slots__ = ("_hi", "_items", "key", "value")

    def __init__(
        self, items: Iterator[tuple[str, Any]], lo: str | None = None, hi: str | None = None
    ):
        if lo is not None:
            items = (item for item in items if item[0] >= lo)
        self._items = items
        self._hi = hi
        self.key: str | None = None
        self.value: Any = None
        self.step()

    def step(self) -> None:
        self.key, self.value = next(self._items, (None, None))
        if self._hi is not None and self.key is not None and self.key >= self._hi:
            self.key = self.value = None

    def get(self, user: str) -> Any:
        while self.key is not None and self.key < user:
            self.step()
        return self.value if self.key == user else None


def _user_failed(run: _CellRun, user: str, date: dt.date, error: str, last: str) -> None:
    """A user failed with an error of its own (``error``: the traceback, or the malformed
    rows' locations; ``last``: its one-line form). Its result is a failure marker; trip the
    circuit breaker once ``breaker_min_users`` users were processed and more than
    ``max_failure_rate`` of them failed (seed 004, StandardExecutor)."""
    run.failures += 1
    if run.failures <= STORED_FAILURES:
        run.failed_users.append({"user": user, "kind": "own", "error": error})
    _add_marker(run, user, failure_marker(run.spec.name, date, last))
    spec = run.spec
    if run.processed >= spec.breaker_min_users and run.failures / run.processed > (
        spec.max_failure_rate
    ):
        run.aborted = (
            f"circuit breaker: {run.failures} of {run.processed} users failed "
            f"({run.failures / run.processed:.0%} > {spec.max_failure_rate:.0%})"
        )


def _user_inherited(run: _CellRun, user: str, origin: dict[str, str]) -> None:
    """A user whose upstream (or previous) result is a failure marker fails here too: its
    result is the same marker, naming the cell where it failed first. Not counted by the
    circuit breaker (the failure is not this calculation's) nor retried for itself: it heals
    when the origin does, its inputs then changing."""
    run.inherited += 1
    if run.inherited <= STORED_FAILURES:
        run.failed_users.append(inherited_failure(run.spec.name, user, origin))
    _add_marker(run, user, {FAILED_KEY: origin})


def _add_marker(run: _CellRun, user: str, marker: dict[str, Any]) -> None:
    run.writer.add(user, marker)
    if run.keep is not None:
        run.keep[user] = marker
        if len(run.keep) > KEEP_LIMIT:
            run.keep = None
            run.spilled = True


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
