"""The dispatcher: a pure function from (manifest, ledger snapshot, root index, epoch) to a plan.

Every cell (calculation x date) from the earliest data date to the target (catch-up) gets one
of four states with a reason code (SPEC "The dispatcher"):

* IMPOSSIBLE — BEFORE_EARLIEST, NO_DATA (a root dataset has no rows that date), UPSTREAM (a
  dependency is impossible). Impossibility propagates down; the rest of the graph carries on.
* BLOCKED — WAITING_ON_UPSTREAM (an upstream cell runs first in this plan; this one may still
  be skipped by early cutoff), UPSTREAM_FAILED, UPSTREAM_DEAD_LETTER, DEAD_LETTER,
  IN_PROGRESS (a live run holds its lease; seen by a dry run during a run).
* SKIPPED — UP_TO_DATE, COSMETIC_CHANGE, UPSTREAM_UNCHANGED (an upstream re-ran this run and
  produced the same result hash: the early-cutoff firewall).
* RUNNABLE — NEW, CODE_CHANGED, LAYER_CHANGED, INFRA_CHANGED, EPOCH_CHANGED, UPSTREAM_CHANGED,
  ROOT_DATA_CHANGED, RETRY, ZOMBIE_RECOVERED, CATEGORY_MIGRATED, FORCED.

A cell is up to date iff its stored fingerprint — code, layer and infra hashes, epoch,
category, and the digest of its inputs (upstream result hashes, root data window hashes, own
previous result hash when historical) — equals the current one. ``Decider.decide`` is the one
rule; the planner applies it to every cell in dependency order, and the executor applies it
again to a BLOCKED cell once its upstream has settled, so dry-run and run never disagree.

Nothing here does I/O or reads the clock, except through a ``RowSource`` the caller hands to
``plan_with``: a plan made from ledger digests reads the stored rows it needs through it, and
its decisions read proven cells' result hashes through it when asked for (see "planning from
ledger digests" below).
"""

from __future__ import annotations

import bisect
import dataclasses
import datetime as dt
import enum
import functools
from collections import Counter
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol, overload

import numpy as np
import xxhash

from orchestrator.fingerprint import ABSENT_HASH, digest, encode, inputs_digest
from orchestrator.ledger import digests as ledger_digests
from orchestrator.ledger.digests import CalcDigests, bucket_of
from orchestrator.ledger.retention import Retained
from orchestrator.ledger.store import LedgerCell, SlimCell, Snapshot, build_key
from orchestrator.manifest import CalcSpec, Manifest
from orchestrator.memory import paused_gc
from orchestrator.rootdata import schema_change


class Status(enum.Enum):
    """The dispatcher's four states of a cell."""

    RUNNABLE = "RUNNABLE"
    SKIPPED = "SKIPPED"
    BLOCKED = "BLOCKED"
    IMPOSSIBLE = "IMPOSSIBLE"


class Reason(enum.Enum):
    """Why a cell has its state; ``reason.status`` is the state it implies."""

    BEFORE_EARLIEST = "BEFORE_EARLIEST"
    NO_DATA = "NO_DATA"
    UPSTREAM = "UPSTREAM"
    WAITING_ON_UPSTREAM = "WAITING_ON_UPSTREAM"
    UPSTREAM_FAILED = "UPSTREAM_FAILED"
    UPSTREAM_DEAD_LETTER = "UPSTREAM_DEAD_LETTER"
    DEAD_LETTER = "DEAD_LETTER"
    IN_PROGRESS = "IN_PROGRESS"
    UP_TO_DATE = "UP_TO_DATE"
    COSMETIC_CHANGE = "COSMETIC_CHANGE"
    UPSTREAM_UNCHANGED = "UPSTREAM_UNCHANGED"
    REUSED = "REUSED"
    NEW = "NEW"
    CODE_CHANGED = "CODE_CHANGED"
    LAYER_CHANGED = "LAYER_CHANGED"
    INFRA_CHANGED = "INFRA_CHANGED"
    EPOCH_CHANGED = "EPOCH_CHANGED"
    UPSTREAM_CHANGED = "UPSTREAM_CHANGED"
    ROOT_DATA_CHANGED = "ROOT_DATA_CHANGED"
    RETRY = "RETRY"
    ZOMBIE_RECOVERED = "ZOMBIE_RECOVERED"
    CATEGORY_MIGRATED = "CATEGORY_MIGRATED"
    FORCED = "FORCED"

    @property
    def status(self) -> Status:
        return _STATUS_OF[self]


_STATUS_OF = {
    **{r: Status.IMPOSSIBLE for r in (Reason.BEFORE_EARLIEST, Reason.NO_DATA, Reason.UPSTREAM)},
    **{
        r: Status.BLOCKED
        for r in (
            Reason.WAITING_ON_UPSTREAM,
            Reason.UPSTREAM_FAILED,
            Reason.UPSTREAM_DEAD_LETTER,
            Reason.DEAD_LETTER,
            Reason.IN_PROGRESS,
        )
    },
    **{
        r: Status.SKIPPED
        for r in (
            Reason.UP_TO_DATE,
            Reason.COSMETIC_CHANGE,
            Reason.UPSTREAM_UNCHANGED,
            Reason.REUSED,
        )
    },
}
for _r in Reason:
    _STATUS_OF.setdefault(_r, Status.RUNNABLE)

CellKey = tuple[str, dt.date]


class Decision(NamedTuple):
    """The dispatcher's verdict on one cell.

    ``result_hash`` is the hash of the currently published result, if any. A named tuple
    (immutable, and cheap to build: a plan holds one per cell, hundreds of thousands).
    """

    calculation: str
    date: dt.date
    reason: Reason
    detail: str = ""
    result_hash: str | None = None

    @property
    def status(self) -> Status:
        return _STATUS_OF[self.reason]

    @property
    def key(self) -> CellKey:
        return (self.calculation, self.date)


class NeedsFullRow(Exception):
    """``decide`` met a ``SlimCell`` where it needs every fingerprint part."""


class Upstream(enum.Enum):
    """How an upstream cell looks to its dependent at decision time."""

    READY = "READY"  # published, not re-run in this run
    RAN = "RAN"  # re-ran in this run and published
    PENDING = "PENDING"  # will run (or may run) before the dependent
    FAILED = "FAILED"
    DEAD = "DEAD"
    IMPOSSIBLE = "IMPOSSIBLE"


class CellInputs(NamedTuple):
    """What a cell consumes: upstream result hashes, root window hashes, previous hash."""

    upstream: dict[str, str | None]
    root: dict[str, dict[str, str]]
    previous_date: dt.date | None
    previous_hash: str | None
    digest: str


class RootSummary(NamedTuple):
    """A dataset's available dates as the plan saw them, its completeness marker's date
    (None: no marker; ``date.min``: no marker file yet), and the rows it skipped (given to
    no user) with the first problems found ("file:line: what")."""

    dates: int
    first: dt.date | None
    last: dt.date | None
    complete_through: dt.date | None
    skipped: int = 0
    problems: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Plan:
    """A frozen plan: every cell's decision, in execution order (pass, then date).

    Attributes:
        target_date: the last date planned (inclusive).
        dates: the date axis, ascending.
        decisions: cell key -> decision.
        order: cell keys in an order that respects every dependency (dates ascending, passes
            ascending within a date).
        needs_full: calculations with cells a slim snapshot could not decide; when not empty
            the plan is provisional (see ``plan_with``).
        root: dataset -> ``RootSummary`` of its available dates (for the report).
        needs_rows: (calculation, month) whose stored rows a plan from ledger digests needs
            and did not have; when not empty the plan is provisional (see ``plan_with``).

    A plan made from ledger digests (``PlanRequest.digests``) holds its decisions as a
    ``DigestDecisions`` mapping and its order as a ``PlanOrder`` sequence: the cells its
    digests proved up to date are made on demand, not stored.
    """

    target_date: dt.date
    dates: tuple[dt.date, ...]
    decisions: Mapping[CellKey, Decision]
    order: Sequence[CellKey]
    needs_full: frozenset[str] = frozenset()
    root: Mapping[str, RootSummary] = field(default_factory=dict)
    needs_rows: frozenset[tuple[str, int]] = frozenset()

    def _reasons(self) -> Counter[Reason]:
        if isinstance(self.decisions, DigestDecisions):
            return self.decisions.reason_counter()
        return Counter(d.reason for d in self.decisions.values())

    def counts(self) -> dict[str, int]:
        c: Counter[str] = Counter()
        for reason, n in self._reasons().items():
            c[reason.status.value] += n
        return {s.value: c.get(s.value, 0) for s in Status}

    def reason_counts(self) -> dict[str, int]:
        return dict(sorted((r.value, n) for r, n in self._reasons().items() if n))

    def cell_reasons(self) -> Iterator[tuple[CellKey, Reason]]:
        """Every cell's reason, without its result hash (a digest plan's proven cells are not
        made, and their stored result hashes not read)."""
        if isinstance(self.decisions, DigestDecisions):
            yield from self.decisions.cell_reasons()
            return
        for key, decision in self.decisions.items():
            yield key, decision.reason

    def runnable(self) -> list[Decision]:
        if isinstance(self.decisions, DigestDecisions):
            return self.decisions.runnable()
        return [
            self.decisions[k] for k in self.order if self.decisions[k].status is Status.RUNNABLE
        ]


class Verdict(NamedTuple):
    """The verdict on a code change: is it cosmetic (recorded, not re-run)?

    Attributes:
        cosmetic: True only when the rule proved (or, for the opt-in heuristic, judged) the
            old and new code to behave the same.
        rule: "proof" (normalised AST equal up to renamed locals; ``equivalence.py``) or
            "simulation" (the opt-in heuristic of ``simulation.py``).
        detail: why, in words, shown in the plan.
    """

    cosmetic: bool
    rule: str
    detail: str


@dataclass(frozen=True, slots=True)
class PlanRequest:
    """Everything the planner needs, all observed beforehand.

    Attributes:
        manifest: the calculations.
        ledger: calculation -> date -> stored cell (a bulk snapshot).
        root: dataset -> available date -> content hash.
        epoch: the system epoch.
        target: last date to plan (inclusive).
        calendar: "data" — dates where some dataset has rows, or "daily" — every day.
        force: calculations forced to re-run (FORCED) on dates in ``force_range``.
        force_range: inclusive (start, end) of forcing; None means every date.
        scoped_epochs: calculation -> (its scoped epoch, reason of the last bump).
        epoch_reasons: global epoch -> reason it was bumped to.
        registry: (kind, hash) -> registered parts, to name what changed since a stored hash.
        cosmetic: (calculation, stored code hash) -> the verdict on the change from that
            code to the current code: cosmetic or not, by which rule, and why (see
            ``App.cosmetic_verdicts``). A code change without a verdict is CODE_CHANGED.
        live_runs: ids of runs alive now; a RUNNING cell of any other run is a zombie.
        complete: dataset -> its last complete date by its completeness marker (``date.min``:
            none yet); later dates are absent from ``root`` and NO_DATA says why.
        skipped: dataset -> (rows given to no user, the first 20 problems "file:line:
            what"), as stored with its index; only reported.
        digests: calculation -> its stored ledger digests (``Ledger.load_digests``), or None.
            With digests, ``ledger`` holds only the rows of the months in ``loaded``: the
            planner proves the other months unchanged from their digests, and names the
            months it must read (``Plan.needs_rows``; ``plan_with`` reads them).
        loaded: (calculation, month) whose stored rows are all in ``ledger`` (with digests).
        retained: (calculation, date) -> the cell's retained results
            (``Ledger.load_retained``: superseded clean results with the fingerprint each was
            computed from). A cell that must run but whose current fingerprint equals one of
            them is REUSED instead: re-pointed to that result, not computed.
    """

    manifest: Manifest
    ledger: Snapshot
    root: Mapping[str, Mapping[dt.date, str]]
    epoch: int
    target: dt.date
    calendar: str = "data"
    force: frozenset[str] = frozenset()
    force_range: tuple[dt.date, dt.date] | None = None
    scoped_epochs: Mapping[str, tuple[int, str]] = field(default_factory=dict)
    epoch_reasons: Mapping[int, str] = field(default_factory=dict)
    registry: Mapping[tuple[str, str], Mapping[str, Any]] = field(default_factory=dict)
    cosmetic: Mapping[tuple[str, str], Verdict] = field(default_factory=dict)
    live_runs: frozenset[str] = frozenset()
    complete: Mapping[str, dt.date] = field(default_factory=dict)
    skipped: Mapping[str, tuple[int, Sequence[str]]] = field(default_factory=dict)
    digests: Mapping[str, CalcDigests] | None = None
    loaded: frozenset[tuple[str, int]] = frozenset()
    retained: Mapping[CellKey, tuple[Retained, ...]] = field(default_factory=dict)


_WINDOW_TAG = encode("window")


class _PreviousDates(dict[str, dict[dt.date, dt.date | None]]):
    """calculation -> possible date -> the possible date before it (None for the first),
    built per calculation on first use: most plans never look at most calculations' history.
    """

    def __init__(self, possible: Mapping[str, list[dt.date]]):
        super().__init__()
        self._possible = possible

    def __missing__(self, name: str) -> dict[dt.date, dt.date | None]:
        possible = self._possible[name]
        built = self[name] = dict(zip(possible, [None, *possible[:-1]], strict=True))
        return built


class Decider:
    """The decision rule with everything precomputed that does not depend on other cells.

    Construct once per plan; ``decide`` is called once per cell by the planner and again by the
    executor for cells whose upstream settled during the run.
    """

    def __init__(self, request: PlanRequest):
        self.request = request
        manifest = request.manifest
        self.dates = self._axis(request)
        self._root_dates = {n: sorted(d) for n, d in request.root.items()}
        self._root_pos = {n: {d: i for i, d in enumerate(ds)} for n, ds in self._root_dates.items()}
        self._pairs: dict[str, list[bytes]] = {}
        # Blocked cell -> the failed / dead-lettered cell at the top of its chain, as last
        # decided (the planner and the executor decide in dependency order, so an upstream's
        # entry is current when a dependent asks). A memo, not a decision input.
        self._causes: dict[CellKey, CellKey] = {}
        self._window_cache: dict[tuple[str, int, dt.date], str] = {}
        # (kind, stored hash, calculation) -> ``_definitions_change`` text: the same for every
        # cell of a calculation stored with that hash (a code change re-decides them all).
        self._definition_changes: dict[tuple[str, str, str], str] = {}
        self._window_columns: dict[tuple[str, int], list[str]] = {}
        # Possible dates per calculation, in pass order (impossibility propagates down).
        self.impossible: dict[CellKey, Decision] = {}
        self._impossible_of: dict[str, dict[dt.date, Decision]] = {}
        self.possible: dict[str, list[dt.date]] = {}
        # Per dataset, the axis dates without its rows (computed once, not per calculation:
        # a plan over 1,000,000 cells must not loop over them to build its static structure).
        self._all_dates = list(self.dates)
        self._no_rows: dict[str, set[dt.date]] = {}
        for name in manifest.order:
            self.possible[name] = self._possible_dates(manifest.calcs[name])
        # A calculation's previous possible date per possible date, built on first use.
        self._previous = _PreviousDates(self.possible)
        self._shape = {
            name: digest(
                "shape",
                [list(spec.dependencies), list(spec.root_data), spec.lookback, spec.historical]
                + ([[list(w) for w in spec.windows]] if spec.windows else []),
            )
            for name, spec in manifest.calcs.items()
        }
        # The build key (ledger.store.build_key) an unchanged, completed cell has stored.
        self._fresh = {
            name: build_key(
                "COMPLETED",
                spec.category,
                spec.code_hash,
                spec.layer_hash,
                spec.infra_hash,
                request.epoch,
                self.scoped_epoch(name),
            )
            for name, spec in manifest.calcs.items()
        }

    # --- static structure -----------------------------------------------------------------

    @staticmethod
    def _axis(request: PlanRequest) -> tuple[dt.date, ...]:
        used = {ds for spec in request.manifest.calcs.values() for ds in spec.root_data}
        data_dates = {d for ds in used for d in request.root.get(ds, {}) if d <= request.target}
        if not data_dates:  # nothing available yet: the target alone, to say why (NO_DATA)
            return (request.target,) if used else ()
        first = min(data_dates)
        if request.calendar == "daily":
            span = (request.target - first).days
            return tuple(first + dt.timedelta(days=i) for i in range(span + 1))
        return tuple(sorted(data_dates | {request.target}))

    def _no_data(self, missing: list[str], date: dt.date) -> str:
        detail = f"no {', '.join(missing)} rows on {date}"
        held = [ds for ds in missing if date > self.request.complete.get(ds, dt.date.max)]
        for ds in held:
            through = self.request.complete[ds]
            detail += (
                f" ({ds} has no completeness marker yet)"
                if through == dt.date.min
                else f" ({ds} is complete through {through} by its marker)"
            )
        return detail

    def _possible_dates(self, spec: CalcSpec) -> list[dt.date]:
        """The calculation's possible dates; records the impossible ones with their reason.

        The list is shared by the calculations that have every date of the axis: read-only.
        """
        bad: dict[dt.date, Decision] = {}
        name = spec.name
        if spec.earliest_date:
            detail = f"earliest date is {spec.earliest_date}"
            for date in self.dates:
                if date >= spec.earliest_date:
                    break
                bad[date] = Decision(name, date, Reason.BEFORE_EARLIEST, detail)
        gaps: dict[str, set[dt.date]] = {}
        for ds in spec.root_data:
            if ds not in self._no_rows:
                available = self.request.root.get(ds, {})
                self._no_rows[ds] = {d for d in self.dates if d not in available}
            gaps[ds] = self._no_rows[ds]
        for date in sorted(set().union(*gaps.values())) if gaps else ():
            if date in bad:
                continue
            missing = [ds for ds in spec.root_data if date in gaps[ds]]
            bad[date] = Decision(name, date, Reason.NO_DATA, self._no_data(missing, date))
        for dep in spec.dependencies:
            for date, above in self._impossible_of[dep].items():
                if date not in bad:
                    # Carry the root cause down the chain: "b is impossible: no prices ...".
                    cause = above.detail.split(": ", 1)[-1]
                    bad[date] = Decision(
                        name, date, Reason.UPSTREAM, f"{dep} is impossible: {cause}"
                    )
        self._impossible_of[name] = bad
        for date, decision in bad.items():
            self.impossible[(name, date)] = decision
        if not bad:
            return self._all_dates
        return [d for d in self.dates if d not in bad]

    def root_cause(self, key: CellKey) -> CellKey:
        """The failed or dead-lettered cell that ``key`` is blocked by (``key`` itself when it
        failed or is dead-lettered on its own), as last decided."""
        return self._causes.get(key, key)

    def previous_date(self, name: str, date: dt.date) -> dt.date | None:
        """The calculation's previous possible date before ``date`` (its history link)."""
        known = self._previous[name]
        if date in known:
            return known[date]
        dates = self.possible[name]
        i = bisect.bisect_left(dates, date)
        return dates[i - 1] if i > 0 else None

    def window(self, dataset: str, lookback: int, date: dt.date) -> dict[str, str]:
        """ISO date -> content hash of the last ``lookback`` available dates <= ``date``."""
        dates = self._root_dates.get(dataset, [])
        end = bisect.bisect_right(dates, date)
        hashes = self.request.root[dataset]
        return {d.isoformat(): hashes[d] for d in dates[max(0, end - lookback) : end]}

    def _window_digest(self, dataset: str, lookback: int, date: dt.date) -> str:
        """``digest("window", self.window(...))``, from pre-encoded (date, hash) pairs.

        Equal by construction: the canonical encoding of a mapping is its entries sorted by
        encoded key, and equal-length ISO dates sort like the dates, so the entries of a
        window are a contiguous run of the dataset's pairs (a test pins the equality).
        """
        key = (dataset, lookback, date)
        hit = self._window_cache.get(key)
        if hit is None:
            pairs = self._pairs.get(dataset)
            if pairs is None:
                hashes = self.request.root[dataset]
                pairs = self._pairs[dataset] = [
                    encode(d.isoformat()) + encode(hashes[d]) for d in self._root_dates[dataset]
                ]
            pos = self._root_pos[dataset]
            end = (
                pos[date] + 1
                if date in pos
                else bisect.bisect_right(self._root_dates[dataset], date)
            )
            start = max(0, end - lookback)
            body = b"d" + (end - start).to_bytes(4, "big") + b"".join(pairs[start:end])
            hit = self._window_cache[key] = xxhash.xxh3_128_hexdigest(_WINDOW_TAG + body)
        return hit

    def upstream_keys(self, spec: CalcSpec, date: dt.date) -> list[CellKey]:
        """The upstream cells a cell reads, in fingerprint order: per dependency its cell of
        ``date``, or with a window the dependency's last ``window`` possible dates up to and
        including ``date`` (oldest first; fewer near its first date)."""
        if not spec.windows:
            return [(dep, date) for dep in spec.dependencies]
        keys: list[CellKey] = []
        for dep in spec.dependencies:
            width = spec.window(dep)
            if width == 1:
                keys.append((dep, date))
                continue
            dates = self.possible[dep]
            end = bisect.bisect_right(dates, date)
            keys.extend((dep, d) for d in dates[max(0, end - width) : end])
        return keys

    def _upstream_parts(
        self, spec: CalcSpec, keys: list[CellKey], hashes: list[str | None]
    ) -> list[str | None]:
        """One 32-hex part per dependency: its result hash, or for a window the digest of
        its (date, result hash) pairs (so the parts stay fixed-width whatever the window's
        length near the start)."""
        if not spec.windows:
            return hashes
        parts: list[str | None] = []
        grouped: dict[str, list[tuple[str, str | None]]] = {}
        for (dep, d), h in zip(keys, hashes, strict=True):
            grouped.setdefault(dep, []).append((d.isoformat(), h))
        for dep in spec.dependencies:
            entries = grouped.get(dep, [])
            if spec.window(dep) == 1:
                parts.append(entries[0][1] if entries else None)
            else:
                parts.append(digest("upstream-window", [[d, h] for d, h in entries]))
        return parts

    def stored_digest(self, spec: CalcSpec, stored: LedgerCell) -> str:
        """The inputs digest of the input values a stored row holds (its upstream hashes,
        root windows and previous hash), by the current rule: equal to the row's own
        ``inputs_digest`` for every row the executor wrote with this code. Ledger digests
        compare those values instead of re-hashing each cell, so a month is trusted only
        once each of its rows passes this check (``Ledger.repair_digests``)."""
        upstream = stored.upstream_hashes
        keys: list[CellKey] = []
        hashes: list[str | None] = []
        for dep in spec.dependencies:
            if spec.window(dep) == 1:
                keys.append((dep, stored.date))
                hashes.append(upstream.get(dep))
                continue
            entries = sorted(
                (k.split("@", 1)[1], h) for k, h in upstream.items() if k.startswith(f"{dep}@")
            )
            for iso, h in entries:
                keys.append((dep, dt.date.fromisoformat(iso)))
                hashes.append(h)
        root = stored.root_hashes
        parts = [
            *self._upstream_parts(spec, keys, hashes),
            *(digest("window", root.get(ds, {})) for ds in spec.root_data),
        ]
        if spec.historical:
            parts.append(stored.previous_hash)
        return inputs_digest(self._shape[spec.name], parts)

    def _digest(
        self,
        spec: CalcSpec,
        date: dt.date,
        upstream: list[str | None],
        previous: str | None,
        keys: list[CellKey] | None = None,
    ) -> str:
        if spec.windows:
            keys = keys if keys is not None else self.upstream_keys(spec, date)
            upstream = self._upstream_parts(spec, keys, upstream)
        parts = [
            *upstream,
            *(self._window_digest(ds, spec.lookback, date) for ds in spec.root_data),
        ]
        if spec.historical:
            parts.append(previous)
        return inputs_digest(self._shape[spec.name], parts)

    def inputs(
        self, spec: CalcSpec, date: dt.date, hash_of: Callable[[CellKey], str | None]
    ) -> CellInputs:
        """The cell's current inputs, given the current published result hash of any cell.

        ``upstream`` maps a dependency to its result hash; a windowed one contributes an
        entry ``"name@YYYY-MM-DD"`` per date of its window."""
        keys = self.upstream_keys(spec, date)
        hashes = [hash_of(k) for k in keys]
        upstream = {
            (dep if spec.window(dep) == 1 else f"{dep}@{d.isoformat()}"): h
            for (dep, d), h in zip(keys, hashes, strict=True)
        }
        prev_date = self.previous_date(spec.name, date) if spec.historical else None
        prev_hash = hash_of((spec.name, prev_date)) if prev_date else None
        return CellInputs(
            upstream=upstream,
            root={ds: self.window(ds, spec.lookback, date) for ds in spec.root_data},
            previous_date=prev_date,
            previous_hash=prev_hash,
            digest=self._digest(spec, date, hashes, prev_hash, keys),
        )

    # --- the rule -------------------------------------------------------------------------

    def decide(
        self,
        spec: CalcSpec,
        date: dt.date,
        stored: LedgerCell | SlimCell | None,
        upstream_state: Callable[[CellKey], tuple[Upstream, str | None]],
    ) -> Decision:
        """Decide one cell.

        Args:
            spec: the calculation.
            date: the cell's date.
            stored: its ledger row, or None if never computed.
            upstream_state: cell key -> (how it looks now, its published result hash).

        Returns:
            The decision; never raises for a valid manifest.
        """
        name = spec.name
        gone = self.impossible.get((name, date))
        if gone is not None:
            return gone
        upstream_keys = self.upstream_keys(spec, date)
        dep_keys = len(upstream_keys)
        prev_date = self._previous[name][date] if spec.historical else None
        if prev_date is not None:
            upstream_keys.append((name, prev_date))
        states = [upstream_state(k) for k in upstream_keys]

        # The common case first: nothing of its own changed and every input is settled and
        # equal to what the cell was built from.
        if (
            stored is not None
            and stored.build == self._fresh[name]
            and all(state is Upstream.READY for state, _ in states)
        ):
            hashes = [h for _, h in states]
            previous = hashes.pop() if prev_date is not None else None
            if self.unchanged(spec, date, stored, hashes, previous, upstream_keys[:dep_keys]):
                return Decision(name, date, Reason.UP_TO_DATE, "", stored.result_hash)
        if isinstance(stored, SlimCell):
            raise NeedsFullRow(name)
        return self._decide_slowly(spec, date, stored, dict(zip(upstream_keys, states)))

    def shape(self, name: str) -> str:
        return self._shape[name]

    def impossible_dates(self, name: str) -> Mapping[dt.date, Decision]:
        return self._impossible_of[name]

    def window_column(self, dataset: str, lookback: int) -> list[str]:
        """Window digests of ``dataset`` for every date of the axis (see ``_window_digest``)."""
        key = (dataset, lookback)
        column = self._window_columns.get(key)
        if column is None:
            column = self._window_columns[key] = [
                self._window_digest(dataset, lookback, d) for d in self.dates
            ]
        return column

    def previous_positions(self, name: str) -> list[int]:
        """Per axis position, the axis position of the calculation's previous possible date;
        -1 when it has none (its first date), -2 on its impossible dates."""
        position = {d: i for i, d in enumerate(self.dates)}
        out = [-2] * len(self.dates)
        last = -1
        for date in self.possible[name]:
            out[position[date]] = last
            last = position[date]
        return out

    def scoped_epoch(self, name: str) -> int:
        return self.request.scoped_epochs.get(name, (0, ""))[0]

    def fresh_key(self, name: str) -> str:
        """The build key a COMPLETED, unchanged cell of ``name`` has stored."""
        return self._fresh[name]

    def unchanged(
        self,
        spec: CalcSpec,
        date: dt.date,
        stored: LedgerCell | SlimCell,
        upstream: list[str | None],
        previous: str | None,
        keys: list[CellKey] | None = None,
    ) -> bool:
        """Whether a cell whose own parts are unchanged (``fresh_key``) and whose upstream are
        all settled (result hashes ``upstream`` of ``keys``, the ``upstream_keys``; own
        previous result hash ``previous``) is up to date: not forced, and its inputs digest
        equals the stored one."""
        return not self._forced(spec.name, date) and (
            self._digest(spec, date, upstream, previous, keys) == stored.inputs_digest
        )

    def _cosmetic(self, spec: CalcSpec, stored: LedgerCell) -> bool:
        """The stored cell's code differs from the current code only cosmetically."""
        if stored.code_hash == spec.code_hash:
            return False
        verdict = self.request.cosmetic.get((spec.name, stored.code_hash))
        return verdict is not None and verdict.cosmetic

    def _forced(self, name: str, date: dt.date) -> bool:
        req = self.request
        return name in req.force and (
            req.force_range is None or req.force_range[0] <= date <= req.force_range[1]
        )

    def _decide_slowly(
        self,
        spec: CalcSpec,
        date: dt.date,
        stored: LedgerCell | None,
        states: dict[CellKey, tuple[Upstream, str | None]],
    ) -> Decision:
        decision = self._decide_by_rule(spec, date, stored, states)
        if (
            decision.status is Status.RUNNABLE
            and decision.reason not in _NOT_REUSED
            and decision.key in self.request.retained
        ):
            found = self.reusable(spec, date, states)
            if found is not None:
                return Decision(
                    spec.name,
                    date,
                    Reason.REUSED,
                    _reused_detail(found, decision),
                    found.result_hash,
                )
        return decision

    def reusable(
        self, spec: CalcSpec, date: dt.date, states: Mapping[CellKey, tuple[Upstream, str | None]]
    ) -> Retained | None:
        """The newest retained result of the cell whose fingerprint equals its current one
        — own parts (code, or code cosmetically equal to it; layer and infra hashes; system
        and scoped epoch) and inputs digest —
        once every input is settled (``states``: each upstream key's state and published
        hash); None if there is none, or while an input is still to run."""
        candidates = self.request.retained.get((spec.name, date), ())
        if not candidates or any(
            state is not Upstream.READY and state is not Upstream.RAN
            for state, _ in states.values()
        ):
            return None
        own = (spec.layer_hash, spec.infra_hash, self.request.epoch, self.scoped_epoch(spec.name))
        current = self.inputs(spec, date, lambda k: states[k][1] if k in states else None)
        for found in candidates:
            if (
                (found.layer_hash, found.infra_hash, found.epoch, found.scoped_epoch) == own
                and found.inputs_digest == current.digest
                and self._same_code(spec, found.code_hash)
            ):
                return found
        return None

    def _same_code(self, spec: CalcSpec, code_hash: str) -> bool:
        """``code_hash`` is the current code's, or differs from it only cosmetically."""
        if code_hash == spec.code_hash:
            return True
        verdict = self.request.cosmetic.get((spec.name, code_hash))
        return verdict is not None and verdict.cosmetic

    def _decide_by_rule(
        self,
        spec: CalcSpec,
        date: dt.date,
        stored: LedgerCell | None,
        states: dict[CellKey, tuple[Upstream, str | None]],
    ) -> Decision:
        key = (spec.name, date)
        self._causes.pop(key, None)
        published = stored.result_hash if stored is not None else None
        for k, (state, _) in states.items():
            if state is Upstream.FAILED or state is Upstream.DEAD:
                # Name the top of the chain, not the nearest blocked cell: a dead letter two
                # levels up is what to fix (``dlq list``), its dependents only wait.
                cause = self._causes[key] = self.root_cause(k)
                failed = state is Upstream.FAILED
                what = "failed" if failed else "is dead-lettered"
                detail = _cell_name(k, spec, what)
                if cause != k:
                    via = _cell_name(k, spec, "")
                    detail = f"{cause[0]} on {cause[1]} {what} (via {via.strip()})"
                reason = Reason.UPSTREAM_FAILED if failed else Reason.UPSTREAM_DEAD_LETTER
                return Decision(*key, reason, detail, published)
        if stored is not None and stored.status == "DEAD_LETTER":
            revived = self._revived(spec, date, stored, states)
            if revived is None:
                return Decision(*key, Reason.DEAD_LETTER, _first_line(stored.error), published)
            return Decision(*key, revived[0], revived[1], published)
        if (
            stored is not None
            and stored.status == "RUNNING"
            and stored.run_id in self.request.live_runs
        ):
            return Decision(
                *key,
                Reason.IN_PROGRESS,
                f"leased by run {stored.run_id[:8]} until {stored.lease_expires_at}",
                published,
            )

        own = self._own_reason(spec, date, stored)
        if own is not None:
            return Decision(*key, own[0], own[1], published)
        assert stored is not None  # _own_reason returns NEW otherwise

        pending = [k for k, (state, _) in states.items() if state is Upstream.PENDING]
        if pending:
            root_change = self._root_change(spec, date, stored)
            if root_change:
                return Decision(*key, Reason.ROOT_DATA_CHANGED, root_change, published)
            return Decision(
                *key,
                Reason.WAITING_ON_UPSTREAM,
                ", ".join(_cell_name(k, spec, "runs first") for k in pending),
                published,
            )

        current = self.inputs(spec, date, lambda k: states[k][1] if k in states else None)
        ran = any(state is Upstream.RAN for state, _ in states.values())
        if current.digest == stored.inputs_digest and stored.category != spec.category:
            # Same code, same inputs, same result: only the namespace moves (no recompute).
            return Decision(
                *key,
                Reason.CATEGORY_MIGRATED,
                f"category {stored.category} -> {spec.category}",
                published,
            )
        if current.digest == stored.inputs_digest and self._cosmetic(spec, stored):
            verdict = self.request.cosmetic[(spec.name, stored.code_hash)]
            what = self._changed_definitions(spec, "code", stored.code_hash)
            return Decision(
                *key,
                Reason.COSMETIC_CHANGE,
                f"{verdict.rule}: {verdict.detail}: {what or 'code edited'}",
                published,
            )
        if current.digest == stored.inputs_digest:
            return Decision(
                *key,
                Reason.UPSTREAM_UNCHANGED if ran else Reason.UP_TO_DATE,
                "upstream re-ran with identical results" if ran else "",
                published,
            )
        root_change = self._root_change(spec, date, stored)
        if root_change:
            return Decision(*key, Reason.ROOT_DATA_CHANGED, root_change, published)
        return Decision(
            *key, Reason.UPSTREAM_CHANGED, _upstream_change(spec, stored, current), published
        )

    def _revived(
        self,
        spec: CalcSpec,
        date: dt.date,
        stored: LedgerCell,
        states: dict[CellKey, tuple[Upstream, str | None]],
    ) -> tuple[Reason, str] | None:
        """A dead letter whose inputs changed since its last attempt (its root data was fixed,
        an upstream result changed) gets one more attempt: (reason, detail). None while it
        stays dead: same inputs, or an upstream still to run (the executor decides it again
        once that upstream settled)."""
        if stored.attempted_digest is None or any(
            state is not Upstream.READY and state is not Upstream.RAN
            for state, _ in states.values()
        ):
            return None
        current = self.inputs(spec, date, lambda k: states[k][1] if k in states else None)
        if current.digest == stored.attempted_digest:
            return None
        why = f"inputs changed since it was dead-lettered ({_first_line(stored.error)})"
        root_change = self._root_change(spec, date, stored)
        if root_change:
            return Reason.ROOT_DATA_CHANGED, f"{root_change}; {why}"
        return Reason.UPSTREAM_CHANGED, f"{_upstream_change(spec, stored, current)}; {why}"

    def _changed_definitions(self, spec: CalcSpec, kind: str, stored_hash: str) -> str:
        """``_definitions_change`` from the registered ``kind`` version ``stored_hash`` to
        ``spec``'s, computed once per (kind, hash, calculation): it digests every definition
        of the lineage, and every cell stored with that hash asks the same."""
        key = (kind, stored_hash, spec.name)
        text = self._definition_changes.get(key)
        if text is None:
            before = self.request.registry.get((kind, stored_hash))
            text = self._definition_changes[key] = _definitions_change(before, spec, kind)
        return text

    def _own_reason(
        self, spec: CalcSpec, date: dt.date, stored: LedgerCell | None
    ) -> tuple[Reason, str] | None:
        req = self.request
        if self._forced(spec.name, date):
            return Reason.FORCED, "forced by backfill --force"
        if stored is None:
            return Reason.NEW, "never computed"
        if stored.status in ("FAILED", "PARTIAL"):
            # Stored root hashes are this attempt's when it published (PARTIAL) or when no
            # result was ever published; then a changed window names the fix.
            if stored.status == "PARTIAL" or stored.result_hash is None:
                root_change = self._root_change(spec, date, stored)
                if root_change:
                    return Reason.ROOT_DATA_CHANGED, root_change
            if stored.status == "PARTIAL":  # published without its failed users' results
                return Reason.RETRY, f"attempt {stored.attempts}: {_first_line(stored.error)}"
            return Reason.RETRY, f"attempt {stored.attempts} failed: {_first_line(stored.error)}"
        if stored.status == "RUNNING":  # its run is not alive (else IN_PROGRESS, above)
            return Reason.ZOMBIE_RECOVERED, (
                f"run {(stored.run_id or '?')[:8]} died while computing it"
            )
        if stored.epoch != req.epoch:
            why = req.epoch_reasons.get(req.epoch)
            return Reason.EPOCH_CHANGED, f"system epoch {stored.epoch} -> {req.epoch}" + (
                f": {why}" if why else ""
            )
        scoped = self.scoped_epoch(spec.name)
        if stored.scoped_epoch != scoped:
            why = req.scoped_epochs.get(spec.name, (0, ""))[1]
            return (
                Reason.EPOCH_CHANGED,
                f"epoch of {spec.name} {stored.scoped_epoch} -> {scoped}"
                + (f": {why}" if why else ""),
            )
        if stored.infra_hash != spec.infra_hash:
            before = req.registry.get(("infra", stored.infra_hash))
            return Reason.INFRA_CHANGED, _infra_change(before, spec) or (
                f"infrastructure {stored.infra_hash[:8]} -> {spec.infra_hash[:8]}"
            )
        if stored.code_hash != spec.code_hash and not self._cosmetic(spec, stored):
            what = self._changed_definitions(spec, "code", stored.code_hash) or (
                f"code {stored.code_hash[:8]} -> {spec.code_hash[:8]}"
            )
            verdict = req.cosmetic.get((spec.name, stored.code_hash))
            return Reason.CODE_CHANGED, what + (
                f" ({verdict.rule}: {verdict.detail})" if verdict else ""
            )
        if stored.layer_hash != spec.layer_hash:
            what = self._changed_definitions(spec, "layer", stored.layer_hash)
            return Reason.LAYER_CHANGED, what or (
                f"helper layers {stored.layer_hash[:8]} -> {spec.layer_hash[:8]}"
            )
        return None

    def _root_change(self, spec: CalcSpec, date: dt.date, stored: LedgerCell) -> str:
        """Which root data of the cell's window changed, on which dates: "prices on
        2024-01-02 changed" (rows), or what changed in the schema, "prices: columns open,
        close swapped on 2024-01-02, 2024-01-03 ...", when the registry holds the schemas
        both hashes were made from (``("rootdate", hash)`` entries, registered when a
        source is indexed; a hash of an older format has none and reads as rows)."""
        if not spec.root_data:
            return ""
        old = stored.root_hashes
        registry = self.request.registry
        changes = []
        for ds in spec.root_data:
            window = self.window(ds, spec.lookback, date)
            before = old.get(ds, {})
            if window == before:
                continue
            by_change: dict[str, list[str]] = {}  # what changed -> on which days
            for day in sorted(set(window) | set(before)):
                if window.get(day) == before.get(day):
                    continue
                was = registry.get(("rootdate", before.get(day) or ""))
                now = registry.get(("rootdate", window.get(day) or ""))
                what = ""
                if was is not None and now is not None:
                    what = schema_change(was["schemas"], now["schemas"])
                    if what and was["rows"] != now["rows"]:
                        what += ", rows changed"
                by_change.setdefault(what, []).append(day)
            for what, days in by_change.items():
                on = f"{', '.join(days[:3])}{' ...' if len(days) > 3 else ''}"
                changes.append(f"{ds}: {what} on {on}" if what else f"{ds} on {on} changed")
        return "; ".join(changes)


def _definitions_change(before: Mapping[str, str] | None, spec: CalcSpec, kind: str) -> str:
    """Which definitions changed between a registered version and the current one, by name:
    "changed Rsi14, _seed_bars; added _clip". Empty if the old version is not registered."""
    if before is None or spec.lineage is None:
        return ""
    now = spec.lineage.digests()[kind]
    before = {k: v for k, v in before.items() if not k.startswith("__")}  # e.g. "__sim__"
    changed = sorted(n for n in now if n in before and before[n] != now[n])
    added = sorted(set(now) - set(before))
    removed = sorted(set(before) - set(now))
    words = [
        f"{label} {', '.join(names)}"
        for label, names in (("changed", changed), ("added", added), ("removed", removed))
        if names
    ]
    return "; ".join(words)


def _infra_change(before: Mapping[str, object] | None, spec: CalcSpec) -> str:
    """ "numpy 1.26.4 -> 2.0.0; python 3.11 -> 3.12" from registered infrastructure parts."""
    if before is None or spec.lineage is None:
        return ""
    now = spec.lineage.infra_parts
    old_packages = dict(before.get("packages") or {})  # type: ignore[call-overload]
    new_packages = dict(now.get("packages") or {})  # type: ignore[call-overload]
    words = [
        f"{name} {old_packages.get(name, 'absent')} -> {new_packages.get(name, 'absent')}"
        for name in sorted(set(old_packages) | set(new_packages))
        if old_packages.get(name) != new_packages.get(name)
    ]
    words += [
        f"{key} {before.get(key)} -> {now.get(key)}"
        for key in sorted(k for k in now if k != "packages")
        if before.get(key) != now.get(key)
    ]
    return "; ".join(words)


# Runnable reasons a retained result never replaces: a forced re-run is asked for by name, and
# a category migration moves the current result without computing anyway.
_NOT_REUSED = frozenset({Reason.FORCED, Reason.CATEGORY_MIGRATED})


def _reused_detail(found: Retained, instead: Decision) -> str:
    """ "result 1a2b3c4d of run 5e6f7a8b (computed 2026-12-01 22:00 UTC) has the current
    fingerprint; else CODE_CHANGED: changed Rsi14" """
    run = f" of run {found.run_id[:8]}" if found.run_id else ""
    when = found.computed_at.astimezone(dt.UTC)
    why = f"{instead.reason.value}: {instead.detail}" if instead.detail else instead.reason.value
    return (
        f"result {found.result_hash[:8]}{run} (computed {when:%Y-%m-%d %H:%M} UTC) has the "
        f"current fingerprint; else {why}"
    )


def _first_line(text: str | None) -> str:
    return (text or "").strip().splitlines()[-1:][0] if (text or "").strip() else ""


def _cell_name(key: CellKey, spec: CalcSpec, what: str) -> str:
    calc, date = key
    if calc == spec.name:
        return f"own previous cell ({date}) {what}"
    return f"{calc} {what}"


def _upstream_change(spec: CalcSpec, stored: LedgerCell, current: CellInputs) -> str:
    before = stored.upstream_hashes
    changed = [
        f"{dep} {(before.get(dep) or 'none')[:8]} -> {(now or 'none')[:8]}"
        for dep, now in current.upstream.items()
        if before.get(dep) != now
    ]
    if spec.historical and stored.previous_hash != current.previous_hash:
        changed.append(f"own previous result ({current.previous_date}) changed")
    return "; ".join(changed) or "inputs changed"


# How a decided upstream cell looks to its dependents while planning.
_PLAN_VIEW = {
    reason: (
        Upstream.READY
        if reason.status is Status.SKIPPED
        else Upstream.IMPOSSIBLE
        if reason.status is Status.IMPOSSIBLE
        else Upstream.FAILED
        if reason is Reason.UPSTREAM_FAILED
        else Upstream.DEAD
        if reason in (Reason.DEAD_LETTER, Reason.UPSTREAM_DEAD_LETTER)
        else Upstream.PENDING
    )
    for reason in Reason
}


def make_plan(request: PlanRequest) -> Plan:
    """Decide every cell from the first data date to ``request.target``.

    Cells are decided in dependency order (dates ascending, passes ascending); an upstream cell
    that will run makes its dependents BLOCKED (WAITING_ON_UPSTREAM) unless they must run for
    their own reason. Cost: linear in cells; with ``request.digests``, linear in calculations
    x months plus the cells of the months the digests do not prove unchanged.
    """
    with paused_gc(freeze=True):  # see memory.py: one decision per cell, alive to the end
        if request.digests is not None:
            return _make_digest_plan(request)
        return _make_plan(request)


def _make_plan(request: PlanRequest) -> Plan:
    decider = Decider(request)
    manifest = request.manifest
    ledger = request.ledger
    decisions: dict[CellKey, Decision] = {}

    def upstream_state(key: CellKey) -> tuple[Upstream, str | None]:
        decision = decisions.get(key)
        if decision is None:  # outside the plan's axis: whatever is published stands
            stored = ledger.get(key[0], {}).get(key[1])
            return (Upstream.READY, stored.result_hash if stored else None)
        view = _PLAN_VIEW[decision.reason]
        return (view, decision.result_hash if view is Upstream.READY else None)

    # The no-op nightly is the hot case: hundreds of thousands of unchanged cells. They are
    # settled calculation by calculation over the whole date axis (columns, not cells), by the
    # same test ``Decider.unchanged`` applies: own parts fresh, not forced, every upstream cell
    # UP_TO_DATE, inputs digest equal. Everything else goes through ``Decider.decide``.
    up_to_date = Reason.UP_TO_DATE
    dates = decider.dates
    settled: dict[str, list[str | None]] = {}  # per calculation and date: hash if UP_TO_DATE
    needs_full: set[str] = set()
    for name in manifest.order:
        spec = manifest.calcs[name]
        fresh = decider.fresh_key(name)
        # (a calculation with dependency windows takes the rule itself: ``Decider.decide``)
        may_skip = name not in request.force and not spec.windows
        shape = decider.shape(name)
        dep_columns = [settled[dep] for dep in spec.dependencies]
        window_columns = [decider.window_column(ds, spec.lookback) for ds in spec.root_data]
        previous = decider.previous_positions(name) if spec.historical else None
        impossible = decider.impossible_dates(name)
        column: list[str | None] = [None] * len(dates)
        get = ledger.get(name, {}).get
        make = tuple.__new__
        for i, date in enumerate(dates):
            key = (name, date)
            stored = get(date)
            if (
                may_skip
                and stored is not None
                and stored[2] == fresh  # the build key
                and (not impossible or date not in impossible)
            ):
                parts = [shape]
                for upstream in dep_columns:
                    if upstream[i] is None:
                        break
                    parts.append(upstream[i])  # type: ignore[arg-type]
                else:
                    parts.extend(w[i] for w in window_columns)
                    j = previous[i] if previous is not None else -2
                    if j >= 0:
                        parts.append(column[j])  # type: ignore[arg-type]
                    elif j == -1:
                        parts.append(ABSENT_HASH)
                    if None not in parts and (
                        xxhash.xxh3_128_hexdigest("".join(parts).encode()) == stored.inputs_digest
                    ):
                        decisions[key] = make(
                            Decision, (name, date, up_to_date, "", stored.result_hash)
                        )
                        column[i] = stored.result_hash
                        continue
            try:
                decision = decider.decide(spec, date, stored, upstream_state)
            except NeedsFullRow:
                # A slim snapshot cannot explain this cell; the caller reloads full rows for
                # this calculation and its dependents and plans again. Meanwhile it waits.
                needs_full.add(name)
                decision = Decision(name, date, Reason.WAITING_ON_UPSTREAM, "needs its full row")
            decisions[key] = decision
            if decision.reason is up_to_date:
                column[i] = decision.result_hash
        settled[name] = column
    order = [(name, date) for date in dates for name in manifest.order]
    return Plan(
        target_date=request.target,
        dates=decider.dates,
        decisions=decisions,
        order=tuple(order),
        needs_full=frozenset(needs_full),
        root=_root_summaries(request),
    )


def _root_summaries(request: PlanRequest) -> dict[str, RootSummary]:
    return {
        name: RootSummary(
            len(available),
            min(available, default=None),
            max(available, default=None),
            request.complete.get(name),
            request.skipped.get(name, (0, ()))[0],
            tuple(request.skipped.get(name, (0, ()))[1]),
        )
        for name, available in sorted(request.root.items())
    }


# --- planning from ledger digests: the cost of what changed -----------------------------
#
# With ``PlanRequest.digests`` the planner does not read the ledger's cells. For each
# calculation and month (``digests.bucket_of``) it computes the digest sums the month's rows
# would have if every possible cell there were up to date — built by the current code and
# epochs, from the current root windows and the current upstream and previous results — and
# compares them with the stored sums (``ledger.digests`` says why equal sums mean equal rows).
# A month that matches is *proven*: each of its cells is UP_TO_DATE with its stored result
# hash, exactly what ``Decider.decide`` would say (its fast path: build key fresh, not forced,
# every upstream READY, inputs digest equal). Every other month is decided cell by cell by
# the same code as ``_make_plan``, from its stored rows, which ``plan_with`` reads: a month
# written to since (a new date, a failure, a lease), a month whose inputs moved (root data,
# an upstream that will run), a forced one, one of a calculation with dependency windows.

_LANE = np.uint64


def _lanes(x: tuple[int, int]) -> np.ndarray:
    return np.array(x, dtype=_LANE)


_TAU_PREVIOUS_NONE = _lanes(
    (
        ledger_digests.TAU_PREVIOUS[0] * ledger_digests.NONE[0] & ledger_digests.MASK,
        ledger_digests.TAU_PREVIOUS[1] * ledger_digests.NONE[1] & ledger_digests.MASK,
    )
)
_TAU_PREVIOUS = _lanes(ledger_digests.TAU_PREVIOUS)


@functools.cache
def formula_canary() -> str:
    """A digest of the inputs digests the current rule gives a fixed little world (a root
    window, a dependency, a history link, a dependency window): it changes whenever the rule
    does. Ledger digests are stamped with it (``digests.current_format``), so that a change
    of the rule makes every stored month untrusted until its rows are checked again."""
    days = [dt.date(2000, 1, 3), dt.date(2000, 1, 4), dt.date(2000, 1, 5)]

    def calc(name: str, **kw: Any) -> CalcSpec:
        fields: dict[str, Any] = {
            "dependencies": (),
            "root_data": (),
            "historical": False,
            "lookback": 1,
            **kw,
        }
        return CalcSpec(
            name=name,
            kind="standard",
            category="c",
            earliest_date=None,
            product_lines=(),
            max_failure_rate=0.0,
            code_hash="0" * 32,
            cls=object,  # type: ignore[arg-type]
            **fields,
        )

    specs = [
        calc("a", root_data=("p",), lookback=2),
        calc("b", dependencies=("a",), historical=True),
        calc("c", dependencies=("a", "b"), windows=(("b", 2),)),
    ]
    root = {"p": {d: digest("canary-root", d.isoformat()) for d in days}}
    decider = Decider(PlanRequest(Manifest.build(specs), {}, root, 0, days[-1]))

    def hash_of(key: CellKey) -> str:
        return digest("canary-result", [key[0], key[1].isoformat()])

    return digest(
        "canary", [decider.inputs(spec, day, hash_of).digest for spec in specs for day in days]
    )


def row_verifier(manifest: Manifest) -> Callable[[LedgerCell], bool]:
    """Whether a stored row of ``manifest``'s calculations holds an inputs digest equal to
    the current rule applied to its stored input values (``Decider.stored_digest``); rows of
    other calculations cannot be checked (False). For ``Ledger.repair_digests``."""
    decider = Decider(PlanRequest(manifest, {}, {}, 0, dt.date.min))

    def verify(cell: LedgerCell) -> bool:
        spec = manifest.calcs.get(cell.calculation)
        if spec is None:
            return False
        try:
            return decider.stored_digest(spec, cell) == cell.inputs_digest
        except (ValueError, TypeError, KeyError, AttributeError):  # a row no rule wrote
            return False

    return verify


class NeedsRows(Exception):
    """A cell needs a stored row (an upstream's or its own previous result hash) of a month
    whose rows were not read."""

    def __init__(self, bucket: tuple[str, int]):
        super().__init__(bucket)
        self.bucket = bucket


class RowSource(Protocol):
    """Where a digest plan reads the stored rows it needs (``Ledger`` is one)."""

    def load_buckets(self, buckets: Collection[tuple[str, int]], slim: bool = True) -> Snapshot:
        """The stored cells of these (calculation, month), as ``Ledger.load_cells``."""
        ...

    def load_result_hashes(
        self, calculations: Collection[str]
    ) -> dict[str, dict[dt.date, str | None]]:
        """calculation -> date -> stored result hash, every cell of ``calculations``."""
        ...


class MemoryRows:
    """A ``RowSource`` over an in-memory snapshot of full rows (tests, benchmarks): what a
    ledger holding exactly ``snapshot`` returns. Counts the rows it hands out."""

    def __init__(self, snapshot: Snapshot):
        self.snapshot = snapshot
        self.rows_read = 0

    def load_buckets(self, buckets: Collection[tuple[str, int]], slim: bool = True) -> Snapshot:
        wanted: dict[str, set[int]] = {}
        for calc, bucket in buckets:
            wanted.setdefault(calc, set()).add(bucket)
        out: Snapshot = {}
        for calc, months in wanted.items():
            for date, cell in self.snapshot.get(calc, {}).items():
                if bucket_of(date) in months:
                    out.setdefault(calc, {})[date] = (
                        SlimCell(*cell[:5]) if slim else cell  # type: ignore[arg-type]
                    )
                    self.rows_read += 1
        return out

    def load_result_hashes(
        self, calculations: Collection[str]
    ) -> dict[str, dict[dt.date, str | None]]:
        out = {
            calc: {d: c.result_hash for d, c in self.snapshot.get(calc, {}).items()}
            for calc in calculations
        }
        self.rows_read += sum(len(v) for v in out.values())
        return out


class _Axis:
    """The plan's dates grouped into months, with the per-date atoms of the digest sums."""

    def __init__(self, dates: Sequence[dt.date]):
        n = len(dates)
        self.dates = dates
        self.pos = {d: i for i, d in enumerate(dates)}
        months = np.array([bucket_of(d) for d in dates], dtype=np.int64)
        if n:
            self.starts = np.flatnonzero(np.r_[True, months[1:] != months[:-1]])
        else:
            self.starts = np.zeros(0, dtype=np.int64)
        self.ids = months[self.starts]
        self.nb = len(self.starts)
        # (no dates: no months either, not one empty month)
        ends = np.r_[self.starts[1:], n].astype(np.int64) if n else np.zeros(0, dtype=np.int64)
        self.bounds = list(zip(self.starts.tolist(), ends.tolist(), strict=True))
        self.month_of = np.repeat(np.arange(self.nb), ends - self.starts).tolist()
        self.index = {int(b): i for i, b in enumerate(self.ids)}
        self.atoms = np.array(
            [ledger_digests.date_atom(d.isoformat()) for d in dates], dtype=_LANE
        ).reshape(n, 2)
        self.ordinals = np.array([d.toordinal() for d in dates], dtype=np.int64)

    def per_month(self, x: np.ndarray) -> np.ndarray:
        """Sums of a per-date array over each month (wrapping, for lanes)."""
        if not self.nb:
            return np.zeros((0, *x.shape[1:]), dtype=x.dtype)
        return np.add.reduceat(x, self.starts, axis=0)


class _Possible(NamedTuple):
    """One set of possible dates on the axis: mask, count and atom sum per month."""

    mask: np.ndarray  # bool per date
    counts: np.ndarray  # int64 per month
    atoms: np.ndarray  # (months, 2) lanes: sum of the date atoms per month


class _Expect:
    """The digest sums the planner expects, by calculation: the static parts (possible
    dates, root windows), cached across calculations that share them."""

    def __init__(self, decider: Decider, axis: _Axis):
        self.decider = decider
        self.axis = axis
        self._possible: dict[frozenset[dt.date], _Possible] = {}
        self._prefixes: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._windows: dict[tuple[str, int], np.ndarray] = {}
        self._root: dict[tuple[str, int, frozenset[dt.date]], np.ndarray] = {}

    def possible(self, name: str) -> tuple[frozenset[dt.date], _Possible]:
        gone = frozenset(self.decider.impossible_dates(name))
        hit = self._possible.get(gone)
        if hit is None:
            axis = self.axis
            mask = np.ones(len(axis.dates), dtype=bool)
            for date in gone:
                mask[axis.pos[date]] = False
            atoms = np.where(mask[:, None], axis.atoms, _LANE(0))
            hit = self._possible[gone] = _Possible(
                mask, axis.per_month(mask.astype(np.int64)), axis.per_month(atoms)
            )
        return gone, hit

    def _prefix(self, dataset: str) -> tuple[np.ndarray, np.ndarray]:
        """Prefix sums over the dataset's available dates (ascending) of
        ``root_weight(dataset, day) * value(hash)``, and those dates' axis end positions."""
        hit = self._prefixes.get(dataset)
        if hit is None:
            days = self.decider._root_dates.get(dataset, [])
            hashes = self.decider.request.root.get(dataset, {})
            terms = np.zeros((len(days) + 1, 2), dtype=_LANE)
            if days:
                term = ledger_digests.root_term
                terms[1:] = np.array(
                    [term(dataset, day.isoformat(), hashes[day]) for day in days], dtype=_LANE
                )
            ordinals = np.array([d.toordinal() for d in days], dtype=np.int64)
            ends = np.searchsorted(ordinals, self.axis.ordinals, side="right")
            hit = self._prefixes[dataset] = (np.cumsum(terms, axis=0, dtype=_LANE), ends)
        return hit

    def window(self, dataset: str, lookback: int) -> np.ndarray:
        """Per axis date, the root part of a cell's inputs sum for this window, before the
        date atom: the sum over the window's days of ``root_weight(dataset, day) *
        value(hash)``, a difference of two prefix sums."""
        key = (dataset, lookback)
        hit = self._windows.get(key)
        if hit is None:
            prefix, ends = self._prefix(dataset)
            hit = self._windows[key] = prefix[ends] - prefix[np.maximum(ends - lookback, 0)]
        return hit

    def root(self, spec: CalcSpec, gone: frozenset[dt.date], possible: _Possible) -> np.ndarray:
        total = np.zeros((self.axis.nb, 2), dtype=_LANE)
        for ds in spec.root_data:
            key = (ds, spec.lookback, gone)
            hit = self._root.get(key)
            if hit is None:
                bound = self.axis.atoms * self.window(ds, spec.lookback)
                hit = self._root[key] = self.axis.per_month(
                    np.where(possible.mask[:, None], bound, _LANE(0))
                )
            total += hit
        return total


class _Stored(NamedTuple):
    """A calculation's stored digests aligned with the axis months (zero where none)."""

    cells: np.ndarray
    inputs: np.ndarray
    results: np.ndarray
    chain: np.ndarray
    clean: np.ndarray


def _aligned(axis: _Axis, stored: CalcDigests | None) -> _Stored:
    nb = axis.nb
    out = _Stored(
        np.zeros(nb, dtype=np.int64),
        np.zeros((nb, 2), dtype=_LANE),
        np.zeros((nb, 2), dtype=_LANE),
        np.zeros((nb, 2), dtype=_LANE),
        np.ones(nb, dtype=bool),
    )
    if stored is None or not len(stored.buckets) or not nb:
        return out
    at = np.searchsorted(axis.ids, stored.buckets)
    inside = at < nb
    inside[inside] &= axis.ids[at[inside]] == stored.buckets[inside]
    at = at[inside]
    out.cells[at] = stored.cells[inside]
    out.inputs[at] = stored.inputs[inside]
    out.results[at] = stored.results[inside]
    out.chain[at] = stored.chain[inside]
    out.clean[at] = stored.clean[inside]
    return out


_MISSING = object()  # a proven cell's result hash whose row was not read
_MONTH_READS = 64  # months read one by one before a digest plan's decisions read all hashes


class PlanOrder(Sequence[CellKey]):
    """The plan's cell keys in execution order — dates ascending, passes (manifest order)
    within a date — made on demand rather than stored (``Plan.order``)."""

    def __init__(self, dates: Sequence[dt.date], names: Sequence[str]):
        self._dates = tuple(dates)
        self._names = tuple(names)
        self._name_index = {n: i for i, n in enumerate(self._names)}
        self._date_index = {d: i for i, d in enumerate(self._dates)}

    def __len__(self) -> int:
        return len(self._dates) * len(self._names)

    @overload
    def __getitem__(self, i: int) -> CellKey: ...
    @overload
    def __getitem__(self, i: slice) -> Sequence[CellKey]: ...
    def __getitem__(self, i: int | slice) -> CellKey | Sequence[CellKey]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        d, n = divmod(i, len(self._names))
        return (self._names[n], self._dates[d])

    def __iter__(self) -> Iterator[CellKey]:
        names = self._names
        for date in self._dates:
            for name in names:
                yield (name, date)

    def __contains__(self, key: object) -> bool:
        return (
            isinstance(key, tuple)
            and len(key) == 2
            and key[0] in self._name_index
            and key[1] in self._date_index
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))

    __hash__ = None  # type: ignore[assignment]

    def position(self, key: CellKey) -> int:
        """Where ``key`` comes in the order."""
        return self._date_index[key[1]] * len(self._names) + self._name_index[key[0]]


class LazyCells(dict[dt.date, LedgerCell | SlimCell]):
    """One calculation's stored rows in a ``LazySnapshot``: the rows read so far, and any
    other month's rows read from the ledger on first access (``get``, ``[]``, ``in``).
    Iterating reads every month the calculation has rows in first."""

    def __init__(
        self, name: str, rows: Mapping[dt.date, LedgerCell | SlimCell], owner: LazySnapshot
    ):
        super().__init__(rows)
        self._name = name
        self._owner = owner

    def _load(self, date: dt.date) -> None:
        self._owner.ensure(self._name, bucket_of(date))

    def get(self, date: dt.date, default: Any = None) -> Any:  # type: ignore[override]
        if dict.__contains__(self, date):
            return dict.__getitem__(self, date)
        self._load(date)
        return dict.get(self, date, default)

    def __missing__(self, date: dt.date) -> LedgerCell | SlimCell:
        self._load(date)
        if dict.__contains__(self, date):
            return dict.__getitem__(self, date)
        raise KeyError(date)

    def __contains__(self, date: object) -> bool:
        if dict.__contains__(self, date):
            return True
        if not isinstance(date, dt.date):
            return False
        self._load(date)
        return dict.__contains__(self, date)

    def _everything(self) -> None:
        self._owner.ensure_all(self._name)

    def __iter__(self) -> Iterator[dt.date]:
        self._everything()
        return dict.__iter__(self)

    def __len__(self) -> int:
        self._everything()
        return dict.__len__(self)

    def keys(self) -> Any:
        self._everything()
        return dict.keys(self)

    def values(self) -> Any:
        self._everything()
        return dict.values(self)

    def items(self) -> Any:
        self._everything()
        return dict.items(self)


class LazySnapshot(dict[str, dict[dt.date, LedgerCell | SlimCell]]):
    """The ledger snapshot of a digest plan (``PlanRequest.ledger`` after ``plan_with``): the
    rows the plan read, and every other stored row read on demand, a month at a time, from
    its ``RowSource`` (the executor asks for the result hash of an unchanged upstream).
    Rows written into it (the executor's staged cells) are never overwritten by a read."""

    def __init__(
        self,
        rows: Snapshot,
        loaded: Collection[tuple[str, int]],
        digests: Mapping[str, CalcDigests],
        names: Collection[str],
        source: RowSource | None,
    ):
        super().__init__()
        self._loaded = set(loaded)
        self._digests = digests
        self._source = source
        for name in {*names, *rows}:
            dict.__setitem__(self, name, LazyCells(name, rows.get(name, {}), self))

    def get(self, name: str, default: Any = None) -> Any:  # type: ignore[override]
        return dict.get(self, name, default)

    def loaded(self, name: str, bucket: int) -> bool:
        return (name, bucket) in self._loaded

    def ensure(self, name: str, bucket: int) -> None:
        self.ensure_many([(name, bucket)])

    def ensure_many(self, buckets: Collection[tuple[str, int]]) -> None:
        """Read the rows of these months unless read already."""
        missing = {b for b in buckets if b not in self._loaded}
        if not missing:
            return
        if self._source is None:
            raise LookupError(
                f"rows of {sorted(missing)[:3]} were not read and the plan has no row source"
            )
        got = self._source.load_buckets(missing, slim=True)
        for name, rows in got.items():
            cells = dict.get(self, name)
            if cells is None:
                cells = LazyCells(name, {}, self)
                dict.__setitem__(self, name, cells)
            for date, cell in rows.items():
                if not dict.__contains__(cells, date):
                    dict.__setitem__(cells, date, cell)
        self._loaded |= missing

    def ensure_all(self, name: str) -> None:
        stored = self._digests.get(name)
        if stored is not None:
            self.ensure_many(
                [(name, int(b)) for b, n in zip(stored.buckets, stored.cells, strict=True) if n]
            )


class DigestDecisions(Mapping[CellKey, Decision]):
    """The decisions of a digest plan: those made cell by cell, and UP_TO_DATE (or the
    impossible decision) for every cell of a proven month, made when asked for. A proven
    cell's result hash is its stored one: read from the snapshot's rows, or — when the whole
    mapping is iterated (``values``, ``items``, ``dict(...)``) — from one read of every
    result hash (``RowSource.load_result_hashes``)."""

    def __init__(
        self,
        explicit: dict[CellKey, Decision],
        proven: Mapping[str, list[bool]],
        proven_cells: int,
        axis: _Axis,
        order: PlanOrder,
        impossible: Mapping[CellKey, Decision],
        snapshot: Snapshot,
    ):
        self._explicit = explicit
        self._proven = proven
        self._proven_cells = proven_cells
        self._axis = axis
        self._order = order
        self._impossible = impossible
        self._snapshot: Snapshot = snapshot
        self._source: RowSource | None = None
        self._hashes: dict[str, dict[dt.date, str | None]] = {}
        self._misses = 0

    def attach(self, snapshot: Snapshot, source: RowSource | None) -> None:
        """Serve proven cells' result hashes from ``snapshot`` and ``source`` from now on."""
        self._snapshot = snapshot
        self._source = source

    @property
    def explicit(self) -> Mapping[CellKey, Decision]:
        """The decisions made cell by cell (every cell of the months not proven)."""
        return self._explicit

    def proven_months(self, name: str) -> list[int]:
        """The months (``bucket_of``) of the axis in which every cell of ``name`` is proven."""
        flags = self._proven.get(name, [])
        return [int(self._axis.ids[i]) for i, ok in enumerate(flags) if ok]

    def __len__(self) -> int:
        return len(self._order)

    def __iter__(self) -> Iterator[CellKey]:
        for name in self._order._names:
            for date in self._axis.dates:
                yield (name, date)

    def __contains__(self, key: object) -> bool:
        return key in self._order

    def __getitem__(self, key: CellKey) -> Decision:
        hit = self._explicit.get(key)
        if hit is not None:
            return hit
        gone = self._impossible.get(key)
        if gone is not None:
            return gone
        name, date = key
        i = self._axis.pos[date]  # KeyError: not a date of the plan
        if not self._proven[name][self._axis.month_of[i]]:  # KeyError: unknown calculation
            raise KeyError(key)
        return tuple.__new__(Decision, (name, date, Reason.UP_TO_DATE, "", self._hash(name, date)))

    def cell_reasons(self) -> Iterator[tuple[CellKey, Reason]]:
        """(cell, reason) of every cell, as ``__getitem__`` decides them, without making the
        proven cells' decisions (whose result hashes would have to be read)."""
        explicit, impossible = self._explicit, self._impossible
        month_of = self._axis.month_of
        for name in self._order._names:
            flags = self._proven.get(name)
            for i, date in enumerate(self._axis.dates):
                key = (name, date)
                found = explicit.get(key) or impossible.get(key)
                if found is not None:
                    yield key, found.reason
                elif flags is not None and flags[month_of[i]]:
                    yield key, Reason.UP_TO_DATE
                else:
                    raise KeyError(key)

    def _hash(self, name: str, date: dt.date) -> str | None:
        hashes = self._hashes.get(name)
        if hashes is not None:
            return hashes.get(date)
        cells = self._snapshot.get(name)
        month = bucket_of(date)
        if isinstance(self._snapshot, LazySnapshot) and not self._snapshot.loaded(name, month):
            # Sparse reads (``why``, the executor's upstream) read a month each; a caller
            # walking the whole plan key by key reads everything at once after a few.
            self._misses += 1
            if self._misses > _MONTH_READS and self._source is not None:
                self.materialize()
                if name in self._hashes:
                    return self._hashes[name].get(date)
            self._snapshot.ensure(name, month)
        cell = None if cells is None else dict.get(cells, date)
        if cell is None:
            raise LookupError(f"the stored row of {name} on {date} was not read")
        return cell.result_hash

    def materialize(self) -> None:
        """Read the result hash of every proven cell whose row is not in the snapshot, in one
        read: a whole plan is about to be listed."""
        wanted = []
        for name, flags in self._proven.items():
            if name in self._hashes or not any(flags):
                continue
            snapshot = self._snapshot
            if isinstance(snapshot, LazySnapshot) and all(
                not ok or snapshot.loaded(name, int(self._axis.ids[i]))
                for i, ok in enumerate(flags)
            ):
                continue
            wanted.append(name)
        if wanted and self._source is not None:
            self._hashes.update(self._source.load_result_hashes(wanted))

    def keys(self) -> Any:
        self.materialize()
        return super().keys()

    def values(self) -> Any:
        self.materialize()
        return super().values()

    def items(self) -> Any:
        self.materialize()
        return super().items()

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Mapping):
            return NotImplemented
        return len(self) == len(other) and dict(self.items()) == dict(other.items())

    __hash__ = None  # type: ignore[assignment]

    def reason_counter(self) -> Counter[Reason]:
        """How many cells have each reason, without making the proven cells' decisions."""
        c = Counter(d.reason for d in self._explicit.values())
        c[Reason.UP_TO_DATE] += self._proven_cells
        for key, d in self._impossible.items():
            if key not in self._explicit and key[0] in self._proven:
                c[d.reason] += 1
        return c

    def runnable(self) -> list[Decision]:
        """The RUNNABLE decisions in plan order (only cells decided one by one can be)."""
        found = [d for d in self._explicit.values() if d.status is Status.RUNNABLE]
        return sorted(found, key=lambda d: self._order.position(d.key))


def _make_digest_plan(request: PlanRequest) -> Plan:
    assert request.digests is not None
    decider = Decider(request)
    manifest = request.manifest
    ledger = request.ledger
    loaded = request.loaded
    dates = decider.dates
    axis = _Axis(dates)
    expect = _Expect(decider, axis)
    nb = axis.nb
    month_of = axis.month_of
    decisions: dict[CellKey, Decision] = {}
    needs_full: set[str] = set()
    needs_rows: set[tuple[str, int]] = set()
    proven_of: dict[str, list[bool]] = {}
    counts_of: dict[str, np.ndarray] = {}
    # Per calculation and month, its results sum as dependents must see it (stored, for a
    # proven month; from its decisions, for a month decided cell by cell whose cells are all
    # READY), and whether it is known.
    results_of: dict[str, np.ndarray] = {}
    known_of: dict[str, np.ndarray] = {}
    columns: dict[str, dict[int, str | None]] = {}  # explicit cells: hash if UP_TO_DATE
    up_to_date = Reason.UP_TO_DATE
    proven_cells = 0

    def stored_row(name: str, date: dt.date) -> LedgerCell | SlimCell | None:
        bucket = (name, bucket_of(date))
        if bucket not in loaded:
            raise NeedsRows(bucket)
        return ledger.get(name, {}).get(date)

    def proven_hash(name: str, i: int) -> Any:
        date = dates[i]
        if (name, int(axis.ids[month_of[i]])) not in loaded:
            return _MISSING
        row = ledger.get(name, {}).get(date)
        if row is None:
            raise RuntimeError(
                f"the ledger digests of {name} claim a stored row on {date} that its rows do "
                "not have; repair them (Ledger.repair_digests)"
            )
        return row.result_hash

    def value(name: str, i: int) -> Any:
        """What the columnar fast path reads of an upstream or previous cell: its hash if
        it is UP_TO_DATE, None if not, ``_MISSING`` if its row was not read."""
        if proven_of[name][month_of[i]]:
            if dates[i] in decider.impossible_dates(name):
                return None
            return proven_hash(name, i)
        return columns[name].get(i)

    def upstream_state(key: CellKey) -> tuple[Upstream, str | None]:
        decision = decisions.get(key)
        if decision is not None:
            view = _PLAN_VIEW[decision.reason]
            return (view, decision.result_hash if view is Upstream.READY else None)
        name, date = key
        i = axis.pos.get(date)
        if i is None or name not in proven_of:  # outside the plan: whatever is published
            stored = stored_row(name, date)
            return (Upstream.READY, stored.result_hash if stored else None)
        if key in decider.impossible:
            return (Upstream.IMPOSSIBLE, None)
        if not proven_of[name][month_of[i]]:
            raise RuntimeError(f"{key} is read before it is decided")
        found = proven_hash(name, i)
        if found is _MISSING:
            raise NeedsRows((name, int(axis.ids[month_of[i]])))
        return (Upstream.READY, found)

    for name in manifest.order:
        spec = manifest.calcs[name]
        gone, possible = expect.possible(name)
        n = possible.counts
        counts_of[name] = n
        stored = _aligned(axis, request.digests.get(name))
        fresh = decider.fresh_key(name)

        # The sums every month would hold if all its possible cells were up to date.
        expected = possible.atoms * _lanes(ledger_digests.build_term(fresh))
        expected += expect.root(spec, gone, possible)
        ok = stored.clean & (stored.cells == n)
        for dep in spec.dependencies:
            expected += results_of[dep] * _lanes(ledger_digests.dependency_weight(dep))
            ok &= known_of[dep] & (counts_of[dep] == n)
        if spec.historical:
            expected += stored.chain * _TAU_PREVIOUS
            first = decider.possible[name][:1]
            if first:
                i = axis.pos[first[0]]
                expected[month_of[i]] += axis.atoms[i] * _TAU_PREVIOUS_NONE
        else:
            expected += possible.atoms * _TAU_PREVIOUS_NONE
        ok &= (stored.inputs == expected).all(axis=1)
        if spec.windows:  # upstream windows: decided cell by cell
            ok[:] = False
        if name in request.force:
            low, high = request.force_range or (dt.date.min, dt.date.max)
            forced = possible.mask & np.array([low <= d <= high for d in dates], dtype=bool)
            ok &= axis.per_month(forced.astype(np.int64)) == 0
        proven = (ok | (n == 0)).tolist()
        if spec.historical:
            # A month's first cell reads the last cell of the month before: proven months
            # chain from the first, and a month with stray rows breaks the chain.
            clean_before = True
            for b in range(nb):
                if n[b] == 0:
                    if stored.cells[b] or not stored.clean[b]:
                        clean_before = False
                    continue
                proven[b] = bool(ok[b]) and clean_before
                clean_before = proven[b]
        proven_of[name] = proven
        results = np.where(np.array(proven)[:, None], stored.results, _LANE(0))
        known = np.array(proven, dtype=bool)
        column: dict[int, str | None] = {}
        columns[name] = column

        # Months not proven: every cell through the same test as ``_make_plan``.
        may_skip = name not in request.force and not spec.windows
        shape = decider.shape(name)
        previous: list[int] | None = None
        make = tuple.__new__
        for b in range(nb):
            if proven[b]:
                proven_cells += int(n[b])
                continue
            if spec.historical and previous is None:
                previous = decider.previous_positions(name)
            lo, hi = axis.bounds[b]
            month = (name, int(axis.ids[b]))
            if month not in loaded:
                needs_rows.add(month)
                _predict(needs_rows, decider, spec, dates[lo], proven_of, axis, loaded)
                for i in range(lo, hi):
                    key = (name, dates[i])
                    decisions[key] = decider.impossible.get(key) or Decision(
                        name, dates[i], Reason.WAITING_ON_UPSTREAM, "needs its stored rows"
                    )
                known[b] = False
                continue
            rows = ledger.get(name, {})
            all_ready = True
            sums = [0, 0]
            for i in range(lo, hi):
                date = dates[i]
                key = (name, date)
                stored_cell = rows.get(date)
                if (
                    may_skip
                    and stored_cell is not None
                    and stored_cell[2] == fresh
                    and date not in gone
                ):
                    parts: list[Any] = [shape]
                    for dep in spec.dependencies:
                        got = value(dep, i)
                        if got is None or got is _MISSING:
                            break
                        parts.append(got)
                    else:
                        parts.extend(
                            decider._window_digest(ds, spec.lookback, date) for ds in spec.root_data
                        )
                        j = previous[i] if previous is not None else -2
                        if j >= 0:
                            parts.append(value(name, j))
                        elif j == -1:
                            parts.append(ABSENT_HASH)
                        if all(isinstance(p, str) for p in parts) and (
                            xxhash.xxh3_128_hexdigest("".join(parts).encode())
                            == stored_cell.inputs_digest
                        ):
                            decision = make(
                                Decision, (name, date, up_to_date, "", stored_cell.result_hash)
                            )
                            decisions[key] = decision
                            column[i] = stored_cell.result_hash
                            if all_ready:
                                t = ledger_digests.bound(date.isoformat(), stored_cell.result_hash)
                                sums[0] += t[0]
                                sums[1] += t[1]
                            continue
                try:
                    decision = decider.decide(spec, date, stored_cell, upstream_state)
                except NeedsFullRow:
                    needs_full.add(name)
                    decision = Decision(
                        name, date, Reason.WAITING_ON_UPSTREAM, "needs its full row"
                    )
                except NeedsRows as e:
                    needs_rows.add(e.bucket)
                    decision = Decision(name, date, Reason.WAITING_ON_UPSTREAM, "needs stored rows")
                decisions[key] = decision
                if decision.reason is up_to_date:
                    column[i] = decision.result_hash
                if decision.status is Status.IMPOSSIBLE:
                    continue
                if _PLAN_VIEW[decision.reason] is Upstream.READY and all_ready:
                    t = ledger_digests.bound(date.isoformat(), decision.result_hash)
                    sums[0] += t[0]
                    sums[1] += t[1]
                else:
                    all_ready = False
            if all_ready:
                results[b] = (sums[0] & ledger_digests.MASK, sums[1] & ledger_digests.MASK)
                known[b] = True
            else:
                known[b] = False
        results_of[name] = results
        known_of[name] = known

    order = PlanOrder(dates, manifest.order)
    return Plan(
        target_date=request.target,
        dates=decider.dates,
        decisions=DigestDecisions(
            decisions, proven_of, proven_cells, axis, order, decider.impossible, ledger
        ),
        order=order,
        needs_full=frozenset(needs_full),
        root=_root_summaries(request),
        needs_rows=frozenset(needs_rows),
    )


def _predict(
    needs: set[tuple[str, int]],
    decider: Decider,
    spec: CalcSpec,
    first: dt.date,
    proven_of: Mapping[str, list[bool]],
    axis: _Axis,
    loaded: Collection[tuple[str, int]],
) -> None:
    """The months of other cells a month decided cell by cell will read from proven months:
    its dependencies' cells of that month, their window dates and its own previous cell, as
    seen from its first date (later dates look no further back)."""
    keys = [*decider.upstream_keys(spec, first), *((dep, first) for dep in spec.dependencies)]
    if spec.historical:
        prev = decider.previous_date(spec.name, first)
        if prev is not None:
            keys.append((spec.name, prev))
    month = bucket_of(first)
    for name, date in keys:
        flags = proven_of.get(name)
        for b in {bucket_of(date), month}:
            i = axis.index.get(b)
            if flags is not None and i is not None and flags[i] and (name, b) not in loaded:
                needs.add((name, b))


Registry = Mapping[tuple[str, str], Mapping[str, Any]]


class MoreObservation(NamedTuple):
    """What ``plan_with`` asks the caller to observe for calculations with changed cells."""

    rows: Snapshot  # their full ledger rows
    registry: Registry  # registered versions of the hashes those rows were built with
    cosmetic: Mapping[tuple[str, str], Verdict]  # verdicts on their code changes


class RetainedObservation(NamedTuple):
    """What ``plan_with`` asks the caller to observe for cells that must run: their retained
    results (``Ledger.load_retained``), with the registered versions of those results' code
    hashes and the verdicts on them (a result of code cosmetically equal to the current code
    may be reused as the stored result may be kept)."""

    retained: Mapping[CellKey, tuple[Retained, ...]]
    registry: Registry
    cosmetic: Mapping[tuple[str, str], Verdict]


def reuse_candidates(plan: Plan) -> list[CellKey]:
    """The cells of a plan a retained result could settle: those that must run for a reason
    a retained result may answer (not FORCED, not CATEGORY_MIGRATED), and those waiting on an
    upstream that must run (which may itself be reused, or come out as before). The no-op
    plan has none."""
    decisions = (
        plan.decisions.explicit.values()
        if isinstance(plan.decisions, DigestDecisions)
        else plan.decisions.values()
    )
    return [
        d.key
        for d in decisions
        if (d.status is Status.RUNNABLE and d.reason not in _NOT_REUSED)
        or d.reason is Reason.WAITING_ON_UPSTREAM
    ]


def plan_with(
    request: PlanRequest,
    observe_more: Callable[..., MoreObservation],
    rows: RowSource | None = None,
    observe_retained: Callable[[PlanRequest, list[CellKey]], RetainedObservation] | None = None,
) -> tuple[Plan, PlanRequest]:
    """Plan from a slim snapshot, observing more only where a cell needs explaining.

    The no-op nightly settles every cell from ``SlimCell`` rows (build key, inputs digest,
    result hash). Cells that changed need every stored part to be decided and explained: for
    their calculations and everything downstream, ``observe_more(names)`` (I/O and simulation,
    done by the caller) returns full rows, the registered versions of their hashes and the
    cosmetic verdicts of their code changes, and the plan is made again. Both plans are pure.

    With ledger digests (``request.digests``) the plan starts from no rows at all: each round
    reads, from ``rows``, the slim rows of the months the last plan could not prove unchanged
    (``Plan.needs_rows``), and full rows through ``observe_more(names, months)`` — only of
    those months — where cells need explaining. The final plan's decisions and the returned
    request's ledger (a ``LazySnapshot``) read any other stored row from ``rows`` on demand.

    With ``observe_retained``, cells the plan must run (and those waiting on them) are
    looked up among retained results (``reuse_candidates``); when some have any, the plan is
    made again with them (``PlanRequest.retained``) and a cell whose current fingerprint
    equals a retained one is REUSED.

    Returns:
        The final plan and the request it was made from.
    """
    plan, settled = _settle(request, observe_more, rows)
    if observe_retained is not None and not request.retained:
        keys = reuse_candidates(plan)
        more = observe_retained(settled, keys) if keys else None
        if more is not None and more.retained:
            settled = dataclasses.replace(
                settled,
                retained=more.retained,
                registry={**settled.registry, **more.registry},
                cosmetic={**settled.cosmetic, **more.cosmetic},
            )
            plan, settled = _settle(settled, observe_more, rows)
    if request.digests is None:
        return plan, settled
    snapshot = LazySnapshot(
        settled.ledger, settled.loaded, settled.digests or {}, settled.manifest.calcs, rows
    )
    assert isinstance(plan.decisions, DigestDecisions)
    plan.decisions.attach(snapshot, rows)
    return plan, dataclasses.replace(settled, ledger=snapshot)


def _settle(
    request: PlanRequest,
    observe_more: Callable[..., MoreObservation],
    rows: RowSource | None,
) -> tuple[Plan, PlanRequest]:
    """Plan until the plan needs nothing more: the rows and full rows it asks for read."""
    if request.digests is not None:
        return _settle_digests(request, observe_more, rows)
    plan = make_plan(request)
    if not plan.needs_full:
        return plan, request
    names = request.manifest.downstream(plan.needs_full)
    more = observe_more(names)
    request = dataclasses.replace(
        request,
        ledger={**request.ledger, **more.rows},
        registry={**request.registry, **more.registry},
        cosmetic={**request.cosmetic, **more.cosmetic},
    )
    plan = make_plan(request)
    assert not plan.needs_full, "full rows were loaded for every calculation that needs them"
    return plan, request


_MAX_ROUNDS = 16


def _merged(ledger: Snapshot, more: Snapshot) -> Snapshot:
    """``ledger`` with the rows of ``more`` added (replacing the same cells' rows)."""
    out = dict(ledger)
    for name, rows in more.items():
        out[name] = {**ledger.get(name, {}), **rows}
    return out


def _settle_digests(
    request: PlanRequest,
    observe_more: Callable[..., MoreObservation],
    rows: RowSource | None,
) -> tuple[Plan, PlanRequest]:
    assert request.digests is not None
    for _ in range(_MAX_ROUNDS):
        plan = make_plan(request)
        if plan.needs_rows:
            fresh = plan.needs_rows - request.loaded
            if rows is None:
                raise LookupError("a plan from ledger digests needs rows and has no row source")
            assert fresh, "the plan asked again for rows it was given"
            request = dataclasses.replace(
                request,
                ledger=_merged(request.ledger, rows.load_buckets(fresh, slim=True)),
                loaded=request.loaded | fresh,
            )
            continue
        if plan.needs_full:
            names = request.manifest.downstream(plan.needs_full)
            months = {m for m in request.loaded if m[0] in names}
            more = observe_more(names, months)
            request = dataclasses.replace(
                request,
                ledger=_merged(request.ledger, more.rows),
                registry={**request.registry, **more.registry},
                cosmetic={**request.cosmetic, **more.cosmetic},
            )
            continue
        break
    else:  # pragma: no cover - each round reads strictly more
        raise RuntimeError(f"the plan did not settle in {_MAX_ROUNDS} rounds")
    return plan, request


class PartComparison(NamedTuple):
    """One fingerprint part of a cell: what it was built from versus what it is now."""

    part: str
    stored: str | None
    current: str | None

    @property
    def same(self) -> bool:
        return self.stored == self.current


def provenance(
    decider: Decider,
    spec: CalcSpec,
    date: dt.date,
    stored: LedgerCell | None,
    hash_of: Callable[[CellKey], str | None],
) -> list[PartComparison]:
    """Every fingerprint part of a cell, stored versus current (``orchestrator why``).

    ``hash_of`` gives the currently published result hash of a cell (upstream and previous).
    """
    req = decider.request
    now = decider.inputs(spec, date, hash_of)

    def old(attr: str) -> str | None:
        return None if stored is None else str(getattr(stored, attr))

    parts = [
        PartComparison("code hash", old("code_hash"), spec.code_hash),
        PartComparison("layer hash", old("layer_hash"), spec.layer_hash),
        PartComparison("infra hash", old("infra_hash"), spec.infra_hash),
        PartComparison("system epoch", old("epoch"), str(req.epoch)),
        PartComparison("scoped epoch", old("scoped_epoch"), str(decider.scoped_epoch(spec.name))),
        PartComparison("category", old("category"), spec.category),
    ]
    before_up = stored.upstream_hashes if stored is not None else {}
    for dep, value in now.upstream.items():
        parts.append(PartComparison(f"upstream {dep}", before_up.get(dep), value))
    before_root = stored.root_hashes if stored is not None else {}
    for ds, window in now.root.items():
        old_window = before_root.get(ds, {})
        for day in sorted(set(window) | set(old_window)):
            parts.append(PartComparison(f"root {ds} {day}", old_window.get(day), window.get(day)))
    if spec.historical:
        parts.append(
            PartComparison(
                f"own previous ({now.previous_date})",
                stored.previous_hash if stored is not None else None,
                now.previous_hash,
            )
        )
    parts.append(PartComparison("inputs digest", old("inputs_digest"), now.digest))
    return parts


def decision_json(d: Decision) -> dict[str, object]:
    """The JSON form of a decision used by ``plan --format json``."""
    return {
        "calculation": d.calculation,
        "date": d.date.isoformat(),
        "status": d.status.value,
        "reason": d.reason.value,
        "detail": d.detail,
        "result_hash": d.result_hash,
    }


__all__ = [
    "CellInputs",
    "CellKey",
    "Decider",
    "Decision",
    "DigestDecisions",
    "LazySnapshot",
    "MemoryRows",
    "Plan",
    "PlanOrder",
    "PlanRequest",
    "Reason",
    "RowSource",
    "Status",
    "Upstream",
    "decision_json",
    "formula_canary",
    "make_plan",
    "row_verifier",
]
