"""The dispatcher: a pure function from (manifest, ledger snapshot, root index, epoch) to a plan.

Every cell (calculation x date) from the earliest data date to the target (catch-up) gets one
of four states with a reason code (SPEC "The dispatcher"):

* IMPOSSIBLE — BEFORE_EARLIEST, NO_DATA (a root dataset has no rows that date), UPSTREAM (a
  dependency is impossible). Impossibility propagates down; the rest of the graph carries on.
* BLOCKED — WAITING_ON_UPSTREAM (an upstream cell runs first in this plan; this one may still
  be skipped by early cutoff), UPSTREAM_FAILED, UPSTREAM_DEAD_LETTER, DEAD_LETTER.
* SKIPPED — UP_TO_DATE, COSMETIC_CHANGE, UPSTREAM_UNCHANGED (an upstream re-ran this run and
  produced the same result hash: the early-cutoff firewall).
* RUNNABLE — NEW, CODE_CHANGED, LAYER_CHANGED, INFRA_CHANGED, EPOCH_CHANGED, UPSTREAM_CHANGED,
  ROOT_DATA_CHANGED, RETRY, ZOMBIE_RECOVERED, CATEGORY_MIGRATED, FORCED.

A cell is up to date iff its stored fingerprint — code, layer and infra hashes, epoch,
category, and the digest of its inputs (upstream result hashes, root data window hashes, own
previous result hash when historical) — equals the current one. ``Decider.decide`` is the one
rule; the planner applies it to every cell in dependency order, and the executor applies it
again to a BLOCKED cell once its upstream has settled, so dry-run and run never disagree.

Nothing here does I/O or reads the clock.
"""

from __future__ import annotations

import bisect
import datetime as dt
import enum
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from orchestrator.fingerprint import digest, inputs_digest
from orchestrator.ledger.store import LedgerCell
from orchestrator.manifest import CalcSpec, Manifest


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
    UP_TO_DATE = "UP_TO_DATE"
    COSMETIC_CHANGE = "COSMETIC_CHANGE"
    UPSTREAM_UNCHANGED = "UPSTREAM_UNCHANGED"
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
        )
    },
    **{
        r: Status.SKIPPED
        for r in (Reason.UP_TO_DATE, Reason.COSMETIC_CHANGE, Reason.UPSTREAM_UNCHANGED)
    },
}
for _r in Reason:
    _STATUS_OF.setdefault(_r, Status.RUNNABLE)

CellKey = tuple[str, dt.date]


@dataclass(frozen=True, slots=True)
class Decision:
    """The dispatcher's verdict on one cell.

    ``result_hash`` is the hash of the currently published result, if any.
    """

    calculation: str
    date: dt.date
    reason: Reason
    detail: str = ""
    result_hash: str | None = None

    @property
    def status(self) -> Status:
        return self.reason.status

    @property
    def key(self) -> CellKey:
        return (self.calculation, self.date)


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


@dataclass(frozen=True, slots=True)
class Plan:
    """A frozen plan: every cell's decision, in execution order (pass, then date).

    Attributes:
        target_date: the last date planned (inclusive).
        dates: the date axis, ascending.
        decisions: cell key -> decision.
        order: cell keys in an order that respects every dependency (dates ascending, passes
            ascending within a date).
    """

    target_date: dt.date
    dates: tuple[dt.date, ...]
    decisions: Mapping[CellKey, Decision]
    order: tuple[CellKey, ...]

    def counts(self) -> dict[str, int]:
        c = Counter(d.status.value for d in self.decisions.values())
        return {s.value: c.get(s.value, 0) for s in Status}

    def reason_counts(self) -> dict[str, int]:
        return dict(sorted(Counter(d.reason.value for d in self.decisions.values()).items()))

    def runnable(self) -> list[Decision]:
        return [self.decisions[k] for k in self.order if self.decisions[k].status is Status.RUNNABLE]


@dataclass(frozen=True, slots=True)
class PlanRequest:
    """Everything the planner needs, all observed beforehand.

    Attributes:
        manifest: the calculations.
        ledger: cell key -> stored cell (a bulk snapshot).
        root: dataset -> available date -> content hash.
        epoch: the system epoch.
        infra_hash: the current infrastructure hash.
        target: last date to plan (inclusive).
        calendar: "data" — dates where some dataset has rows, or "daily" — every day.
        force: calculations forced to re-run (FORCED) on dates in ``force_range``.
        force_range: inclusive (start, end) of forcing; None means every date.
        layer_hashes: calculation -> layer hash (default: the empty-layer hash).
    """

    manifest: Manifest
    ledger: Mapping[CellKey, LedgerCell]
    root: Mapping[str, Mapping[dt.date, str]]
    epoch: int
    infra_hash: str
    target: dt.date
    calendar: str = "data"
    force: frozenset[str] = frozenset()
    force_range: tuple[dt.date, dt.date] | None = None
    layer_hashes: Mapping[str, str] = field(default_factory=dict)


EMPTY_LAYER = digest("layer", {})


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
        self._window_cache: dict[tuple[str, int, dt.date], tuple[str, dict[str, str]]] = {}
        # Possible dates per calculation, in pass order (impossibility propagates down).
        self.impossible: dict[CellKey, Decision] = {}
        self.possible: dict[str, list[dt.date]] = {}
        for name in manifest.order:
            self.possible[name] = self._possible_dates(manifest.calcs[name])
        self._shape = {
            name: digest(
                "shape",
                [list(spec.dependencies), list(spec.root_data), spec.lookback, spec.historical],
            )
            for name, spec in manifest.calcs.items()
        }
        self._layer = {n: request.layer_hashes.get(n, EMPTY_LAYER) for n in manifest.calcs}

    # --- static structure -----------------------------------------------------------------

    @staticmethod
    def _axis(request: PlanRequest) -> tuple[dt.date, ...]:
        used = {ds for spec in request.manifest.calcs.values() for ds in spec.root_data}
        data_dates = {d for ds in used for d in request.root.get(ds, {}) if d <= request.target}
        if not data_dates:
            return ()
        first = min(data_dates)
        if request.calendar == "daily":
            span = (request.target - first).days
            return tuple(first + dt.timedelta(days=i) for i in range(span + 1))
        return tuple(sorted(data_dates | {request.target}))

    def _possible_dates(self, spec: CalcSpec) -> list[dt.date]:
        out = []
        for date in self.dates:
            reason, detail = None, ""
            if spec.earliest_date and date < spec.earliest_date:
                reason, detail = Reason.BEFORE_EARLIEST, f"earliest date is {spec.earliest_date}"
            else:
                missing = [ds for ds in spec.root_data if date not in self.request.root.get(ds, {})]
                if missing:
                    reason, detail = Reason.NO_DATA, f"no {', '.join(missing)} rows on {date}"
                else:
                    gone = [d for d in spec.dependencies if (d, date) in self.impossible]
                    if gone:
                        # Carry the root cause down the chain: "b is impossible: no prices ...".
                        above = self.impossible[(gone[0], date)]
                        cause = above.detail.split(": ", 1)[-1]
                        reason = Reason.UPSTREAM
                        detail = f"{gone[0]} is impossible: {cause}"
            if reason is None:
                out.append(date)
            else:
                self.impossible[(spec.name, date)] = Decision(spec.name, date, reason, detail)
        return out

    def layer_hash(self, name: str) -> str:
        return self._layer[name]

    def previous_date(self, name: str, date: dt.date) -> dt.date | None:
        """The calculation's previous possible date before ``date`` (its history link)."""
        dates = self.possible[name]
        i = bisect.bisect_left(dates, date)
        return dates[i - 1] if i > 0 else None

    def _window(self, dataset: str, lookback: int, date: dt.date) -> tuple[str, dict[str, str]]:
        key = (dataset, lookback, date)
        hit = self._window_cache.get(key)
        if hit is None:
            dates = self._root_dates.get(dataset, [])
            end = bisect.bisect_right(dates, date)
            hashes = self.request.root[dataset]
            window = {d.isoformat(): hashes[d] for d in dates[max(0, end - lookback) : end]}
            hit = self._window_cache[key] = (digest("window", window), window)
        return hit

    def inputs(
        self, spec: CalcSpec, date: dt.date, hash_of: Callable[[CellKey], str | None]
    ) -> CellInputs:
        """The cell's current inputs, given the current published result hash of any cell."""
        upstream = {dep: hash_of((dep, date)) for dep in spec.dependencies}
        windows = [self._window(ds, spec.lookback, date) for ds in spec.root_data]
        prev_date = self.previous_date(spec.name, date) if spec.historical else None
        prev_hash = hash_of((spec.name, prev_date)) if prev_date else None
        parts: list[str | None] = [*upstream.values(), *(w[0] for w in windows)]
        if spec.historical:
            parts.append(prev_hash)
        return CellInputs(
            upstream=upstream,
            root={ds: w[1] for ds, w in zip(spec.root_data, windows)},
            previous_date=prev_date,
            previous_hash=prev_hash,
            digest=inputs_digest(self._shape[spec.name], parts),
        )

    # --- the rule -------------------------------------------------------------------------

    def decide(
        self,
        spec: CalcSpec,
        date: dt.date,
        stored: LedgerCell | None,
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
        key = (spec.name, date)
        gone = self.impossible.get(key)
        if gone is not None:
            return gone
        published = stored.result_hash if stored is not None else None

        upstream_keys = [(dep, date) for dep in spec.dependencies]
        prev_date = self.previous_date(spec.name, date) if spec.historical else None
        if prev_date is not None:
            upstream_keys.append((spec.name, prev_date))
        states = {k: upstream_state(k) for k in upstream_keys}

        for k, (state, _) in states.items():
            if state is Upstream.FAILED:
                return Decision(*key, Reason.UPSTREAM_FAILED, _cell_name(k, spec, "failed"), published)
            if state is Upstream.DEAD:
                return Decision(
                    *key, Reason.UPSTREAM_DEAD_LETTER, _cell_name(k, spec, "is dead-lettered"), published
                )
        if stored is not None and stored.status == "DEAD_LETTER":
            return Decision(*key, Reason.DEAD_LETTER, _first_line(stored.error), published)

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
        return Decision(*key, Reason.UPSTREAM_CHANGED, _upstream_change(spec, stored, current), published)

    def _own_reason(
        self, spec: CalcSpec, date: dt.date, stored: LedgerCell | None
    ) -> tuple[Reason, str] | None:
        req = self.request
        if spec.name in req.force and (
            req.force_range is None or req.force_range[0] <= date <= req.force_range[1]
        ):
            return Reason.FORCED, "forced by backfill --force"
        if stored is None:
            return Reason.NEW, "never computed"
        if stored.status == "FAILED":
            return Reason.RETRY, f"attempt {stored.attempts} failed: {_first_line(stored.error)}"
        if stored.epoch != req.epoch:
            return Reason.EPOCH_CHANGED, f"system epoch {stored.epoch} -> {req.epoch}"
        if stored.infra_hash != req.infra_hash:
            return Reason.INFRA_CHANGED, f"infrastructure {stored.infra_hash[:8]} -> {req.infra_hash[:8]}"
        if stored.code_hash != spec.code_hash:
            return Reason.CODE_CHANGED, f"code {stored.code_hash[:8]} -> {spec.code_hash[:8]}"
        if stored.layer_hash != self._layer[spec.name]:
            return Reason.LAYER_CHANGED, "a helper layer changed"
        if stored.category != spec.category:
            return Reason.CATEGORY_MIGRATED, f"category {stored.category} -> {spec.category}"
        return None

    def _root_change(self, spec: CalcSpec, date: dt.date, stored: LedgerCell) -> str:
        if not spec.root_data:
            return ""
        old = stored.root_hashes
        changes = []
        for ds in spec.root_data:
            _, window = self._window(ds, spec.lookback, date)
            before = old.get(ds, {})
            if window != before:
                days = sorted(d for d in set(window) | set(before) if window.get(d) != before.get(d))
                changes.append(f"{ds} on {', '.join(days[:3])}{' ...' if len(days) > 3 else ''}")
        return "; ".join(f"{c} changed" for c in changes)


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


def make_plan(request: PlanRequest) -> Plan:
    """Decide every cell from the first data date to ``request.target``.

    Cells are decided in dependency order (dates ascending, passes ascending); an upstream cell
    that will run makes its dependents BLOCKED (WAITING_ON_UPSTREAM) unless they must run for
    their own reason. Cost: linear in cells.
    """
    decider = Decider(request)
    manifest = request.manifest
    ledger = request.ledger
    decisions: dict[CellKey, Decision] = {}
    order: list[CellKey] = []

    def upstream_state(key: CellKey) -> tuple[Upstream, str | None]:
        decision = decisions.get(key)
        stored = ledger.get(key)
        if decision is None:  # outside the plan's axis: whatever is published stands
            return (Upstream.READY, stored.result_hash if stored else None)
        status = decision.status
        if status is Status.SKIPPED:
            return (Upstream.READY, decision.result_hash)
        if status is Status.IMPOSSIBLE:
            return (Upstream.IMPOSSIBLE, None)
        if decision.reason in (Reason.UPSTREAM_FAILED,):
            return (Upstream.FAILED, None)
        if decision.reason in (Reason.DEAD_LETTER, Reason.UPSTREAM_DEAD_LETTER):
            return (Upstream.DEAD, None)
        return (Upstream.PENDING, None)

    by_pass = [[manifest.calcs[n] for n in members] for members in manifest.passes]
    for date in decider.dates:
        for specs in by_pass:
            for spec in specs:
                key = (spec.name, date)
                decisions[key] = decider.decide(spec, date, ledger.get(key), upstream_state)
                order.append(key)
    return Plan(
        target_date=request.target,
        dates=decider.dates,
        decisions=decisions,
        order=tuple(order),
    )


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
    "Plan",
    "PlanRequest",
    "Reason",
    "Status",
    "Upstream",
    "decision_json",
    "make_plan",
]
