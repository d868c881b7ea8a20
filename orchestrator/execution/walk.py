"""The per-user walk: the standard cells of one pass and date share one walk over the users
(sorted by id), each user's root rows read once; meta cells of the date in one call.

Used for root data read from a root store (memory flat in the number of users: every input is
a sorted stream read in step with the walk) and by the forked workers (``workers.py``); root
data held in memory runs in blocks instead (``blocks.py``), with the same rules and results
(``tests/test_block_walk.py``).

Streaming: the standard cells of one pass and date share one walk over the users (sorted by
id), each user's root rows read once. Root rows, upstream results and previous results are
sorted streams read in step with the walk (root stores, shards past ``KEEP_LIMIT`` users), so
memory is flat in the number of users. Each cell's canonical result lines are buffered and
flushed as compressed shards every ``flush_users`` users or ``shard_bytes`` bytes; shards are
written under a fresh generation no reader looks at, and the cell is published (its generation
switched) in one transaction only after every user succeeded or the failure rate stayed under
the cell's ``max_failure_rate``. A failure records the traceback; dependents are BLOCKED.
"""

from __future__ import annotations

import datetime as dt
import traceback
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from orchestrator import faults, validation
from orchestrator.calculation import MetaContext, StandardContext
from orchestrator.execution import caches
from orchestrator.execution.blocks import (
    LazyHistory,
    checked_result,
    inherited_failure,
)
from orchestrator.execution.record import _PROCESS, Recorder, _CellRun, too_many_failed
from orchestrator.fingerprint import result_line
from orchestrator.ledger.store import CellWrite
from orchestrator.manifest import CalcSpec
from orchestrator.planning import Decision
from orchestrator.results import (
    FAILED_KEY,
    ShardWriter,
    StoredResult,
    describe_failure,
    failure_marker,
    failure_of,
)
from orchestrator.rootdata import Row

MEMORY_CHECK_EVERY = 1000  # users between two looks at the process's memory
# A worker hands a cell's shards to the parent in memory up to this many raw bytes; beyond, it
# writes them itself (the parent reads them back, one at a time, for the result hash).
WORKER_INLINE_BYTES = 8 * 2**20
# Failed users stored per attempt of a cell, of each kind (own / upstream), with their error;
# the cell's ``users_failed`` counts them all.
STORED_FAILURES = 20


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


class UserWalk(Recorder):
    """The per-user walk's part of the ``Executor``."""

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
                            if (
                                len(run.keep) > caches.KEEP_LIMIT
                            ):  # too big to cache: readers stream it
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
        error = too_many_failed(run, run.aborted)
        if error is not None:
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
        if len(run.keep) > caches.KEEP_LIMIT:
            run.keep = None
            run.spilled = True
