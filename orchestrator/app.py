"""The façade every command goes through: observe, decide, act.

``Orchestrator.observe`` does the I/O (manifest discovery, root data indexing, one bulk ledger
read), ``planning.make_plan`` decides (pure), and ``Orchestrator.run`` acts on the plan with the
executor. ``plan`` (dry run), the reports and ``run`` consume the same ``Plan``.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import datetime as dt
import logging
import os
import re
import sqlite3
import uuid
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy.exc import SQLAlchemyError

from orchestrator.config import Config, load_config
from orchestrator.errors import ConfigError, DefinitionError, StorageError
from orchestrator.fingerprint import infra_hash
from orchestrator.ledger.digests import CalcDigests
from orchestrator.ledger.store import Ledger, LedgerCell, Snapshot, lock_holder
from orchestrator.lineage import Lineage
from orchestrator.lineage_cache import LineageCache
from orchestrator.manifest import CalcSpec, Manifest, discover
from orchestrator.planning import (
    CellKey,
    Decider,
    Decision,
    MoreObservation,
    Plan,
    PlanRequest,
    RetainedObservation,
    Verdict,
    plan_with,
    provenance,
    row_verifier,
)
from orchestrator.results import StoredResult, assemble, decode_shards
from orchestrator.rootdata import FileSource, RootData

_LOG = logging.getLogger("orchestrator.run")

if TYPE_CHECKING:  # imported where used: a no-op run needs none of them
    from orchestrator.execution import RunSummary  # ``run`` alone: the block engine, workers
    from orchestrator.simulation import Simulation  # code changes judged by simulation

LOCK_TTL = dt.timedelta(minutes=15)
LINEAGE_CACHE = "lineage-cache.json"  # in work_dir: lineages kept across runs


def read_epoch(path: Path) -> int:
    """``SYSTEM_EPOCH`` of an epoch file (0 when the file does not exist).

    Raises:
        ConfigError: the file exists but has no integer ``SYSTEM_EPOCH = N``.
    """
    if not path.exists():
        return 0
    try:
        tree = ast.parse(path.read_text())
    except SyntaxError as e:
        raise ConfigError(f"{path} is not valid Python: {e}") from e
    for stmt in tree.body:
        if (
            isinstance(stmt, ast.Assign)
            and any(isinstance(t, ast.Name) and t.id == "SYSTEM_EPOCH" for t in stmt.targets)
            and isinstance(stmt.value, ast.Constant)
            and type(stmt.value.value) is int
        ):
            return stmt.value.value
    raise ConfigError(f"{path} has no 'SYSTEM_EPOCH = <int>' line; add one (e.g. SYSTEM_EPOCH = 1)")


def bump_epoch(
    path: Path, record: Callable[[int, Callable[[], None]], None] | None = None
) -> tuple[int, int]:
    """Increment ``SYSTEM_EPOCH`` in ``path`` (creating the file if needed).

    With ``record``, file and ledger agree: ``record(new, write)`` records the bump in one
    transaction and calls ``write()`` (which replaces the file) before committing. If
    ``record`` fails — before the write (the insert failed: nothing was written) or after it
    (the commit failed) — the file is put back as it was, and the error propagates.

    Args:
        path: the epoch file.
        record: records the new epoch; None: only the file changes.

    Returns:
        (old, new) epoch.

    Raises:
        ConfigError: the file has no ``SYSTEM_EPOCH = <int>`` or cannot be written.
    """
    old = read_epoch(path)
    new = old + 1
    previous = path.read_text() if path.exists() else None
    if previous is not None:
        text = re.sub(
            r"^SYSTEM_EPOCH\s*=\s*\d+",
            f"SYSTEM_EPOCH = {new}",
            previous,
            count=1,
            flags=re.MULTILINE,
        )
    else:
        text = f'"""Global salt of every cell fingerprint; bump to re-run everything."""\n\nSYSTEM_EPOCH = {new}\n'
    written = False

    def write() -> None:
        nonlocal written
        _replace_file(path, text)
        written = True

    try:
        if record is None:
            write()
        else:
            record(new, write)
    except BaseException:
        if written:  # recorded nowhere: the file goes back to the old epoch
            if previous is None:
                path.unlink(missing_ok=True)
            else:
                _replace_file(path, previous)
        raise
    return old, new


def _replace_file(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically: a crash leaves the old or the new file, never
    half of one.

    Raises:
        ConfigError: the file cannot be written.
    """
    tmp = path.with_suffix(".tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise ConfigError(f"cannot write the epoch file {path}: {e.strerror or e}") from e


# Set to "1" to plan from every stored cell (the planner before ledger digests): slower, the
# same decisions; for comparing the two.
FULL_PLAN_ENV = "ORCHESTRATOR_FULL_PLAN"


@dataclass(frozen=True, slots=True)
class Observation:
    """Everything observed before deciding: the inputs of ``make_plan`` besides the target.

    ``digests`` are the ledger digests of the manifest's calculations; with them, ``ledger``
    starts empty and ``plan_with`` reads only the months the digests do not prove unchanged
    (see ``planning``). Without (``ORCHESTRATOR_FULL_PLAN=1``), ``ledger`` holds every cell.
    """

    ledger: Snapshot
    root: dict[str, dict[dt.date, str]]
    epoch: int
    scoped_epochs: dict[str, tuple[int, str]]
    epoch_reasons: dict[int, str]
    live_runs: frozenset[str]
    complete: dict[str, dt.date] = dataclasses.field(default_factory=dict)
    # dataset -> (rows given to no user, the first 20 problems) as stored with its index
    skipped: dict[str, tuple[int, list[str]]] = dataclasses.field(default_factory=dict)
    digests: Mapping[str, CalcDigests] | None = None


class Orchestrator:
    """One configured project: its manifest, root data and ledger.

    Construct with ``Orchestrator.from_config(path)``. Methods raise ``OrchestratorError``
    subclasses with actionable messages (see ``errors.py``).
    """

    def __init__(self, config: Config, progress: bool = False):
        self.config = config
        self.progress = progress
        self._datasets: dict[str, RootData] = {}
        self._digests: dict[str, str] = {}
        self._root_index: dict[str, dict[dt.date, str]] = {}  # as last indexed (observe_more)
        self._sims: dict[str, Simulation] = {}

    @classmethod
    def from_config(
        cls,
        path: str | os.PathLike[str] | None = None,
        db_url: str | None = None,
        progress: bool = False,
    ) -> Orchestrator:
        return cls(load_config(path, db_url), progress=progress)

    @cached_property
    def manifest(self) -> Manifest:
        cache = LineageCache.load(self.config.work_dir / LINEAGE_CACHE)
        specs = discover(self.config.calculations, self.config.path.parent, cache)
        if self.config.packages is not None:
            specs = [declared_packages(s, self.config.packages) for s in specs]
        manifest = Manifest.build(specs)
        for spec in manifest.calcs.values():
            for ds in spec.root_data:
                if ds not in self.config.root_data:
                    raise DefinitionError(
                        f"calculation '{spec.name}' reads root data '{ds}', which is not "
                        f"configured; add a [root_data.{ds}] table to {self.config.path}"
                    )
        return manifest

    @cached_property
    def ledger(self) -> Ledger:
        ledger = Ledger.open(self.config.database_url)
        ledger.retain = self.config.retain_results
        return ledger

    def close(self) -> None:
        if "ledger" in self.__dict__:
            self.ledger.dispose()

    # --- observe --------------------------------------------------------------------------

    def holds_in_memory(self, name: str) -> bool:
        """Whether dataset ``name`` is parsed into memory rather than streamed from its root
        store: only when a calculation reads history windows from it (``lookback > 1``:
        served from memory with a slice, from the store with a query per user) and its
        files' uncompressed size is at most ``root_memory_mb``."""
        history = any(s.lookback > 1 for s in self.manifest.calcs.values() if name in s.root_data)
        source = FileSource(self.config.root_data[name])
        return history and source.raw_size() <= self.config.root_memory_mb * 2**20

    def _digest(self, name: str) -> str:
        if name not in self._digests:
            self._digests[name] = FileSource(self.config.root_data[name]).digest()
        return self._digests[name]

    def dataset(self, name: str) -> RootData:
        """The dataset, opened at most once per process: parsed into memory, or its root store
        (imported on first use of this version of the source; see ``holds_in_memory``)."""
        if name not in self._datasets:
            config = self.config.root_data[name]
            if self.holds_in_memory(name):
                self._datasets[name] = FileSource(config).load_cached(
                    self.config.work_dir / "parsed", self._digest(name)
                )
            else:
                from orchestrator.rootstore import StoredDataset, build_store, store_path

                folder = self.config.work_dir / "root"
                path = store_path(folder, name, self._digest(name))
                try:
                    self._datasets[name] = StoredDataset(path)
                except (sqlite3.DatabaseError, KeyError):  # missing, or damaged since: rebuild
                    path.unlink(missing_ok=True)
                    build_store(config, self._digest(name), folder, progress=self.progress)
                    self._datasets[name] = StoredDataset(path)
        return self._datasets[name]

    def complete_through(self) -> dict[str, dt.date]:
        """dataset -> last complete date, for the datasets with a completeness marker."""
        out = {}
        for name in sorted({ds for s in self.manifest.calcs.values() for ds in s.root_data}):
            through = FileSource(self.config.root_data[name]).complete_through()
            if through is not None:
                out[name] = through
        return out

    def index_root_data(
        self, now: dt.datetime, complete: Mapping[str, dt.date] | None = None
    ) -> dict[str, dict[dt.date, str]]:
        """dataset -> available date -> content hash, re-reading only changed sources. Dates
        after a dataset's ``complete`` date (its completeness marker) are not available."""
        out = self._index_root_data(now)
        for name, through in (complete or {}).items():
            if name in out:
                out[name] = {d: h for d, h in out[name].items() if d <= through}
        return out

    def _index_root_data(self, now: dt.datetime) -> dict[str, dict[dt.date, str]]:
        used = sorted({ds for s in self.manifest.calcs.values() for ds in s.root_data})
        stored = self.ledger.load_root_sources()
        # An index stored before its problems were (migration 0005) is read again once:
        # reusing it would report its skipped rows as none.
        recorded = self.ledger.load_root_problems()
        out: dict[str, dict[dt.date, str]] = {}
        for name in used:
            digest = self._digest(name)
            if stored.get(name) == digest and name in recorded:
                out[name] = {d: h for d, (n, h) in self.ledger.load_root_index(name).items() if n}
                continue
            dataset = self.dataset(name)
            # What each date's hash was made from (its schemas, a digest of its rows), so a
            # later plan can name a schema change (planning.Decider._root_change). Registered
            # before the index: a crash in between leaves an unused entry, never a hash
            # without one. Known hashes are skipped by the registry.
            schemas = {
                ("rootdate", e.content_hash): (
                    name,
                    {"schemas": [[list(c) for c in s] for s in e.schemas], "rows": e.rows_digest},
                )
                for e in dataset.index.values()
            }
            self.ledger.register_versions(schemas, now)
            self.ledger.replace_root_index(
                name,
                digest,
                {d: (e.row_count, e.content_hash) for d, e in dataset.index.items()},
                dataset.malformed,
                now,
                dataset.schema,
                skipped=dataset.skipped,
                problems=dataset.problems,
            )
            out[name] = {d: e.content_hash for d, e in dataset.index.items()}
        self._root_index = out
        return out

    def simulations(self, names: set[str]) -> dict[str, Simulation]:
        """Simulations of ``names`` (and their upstream) on the fabricated world, once each."""
        from orchestrator.simulation import simulate

        missing = {n for n in names if n not in self._sims}
        if missing:
            schemas = self.ledger.load_root_schemas()
            self._sims.update(simulate(self.manifest, missing, schemas))
        return {n: self._sims[n] for n in names}

    def verdict_rule(self, name: str) -> str:
        """How a code change of ``name`` may be judged cosmetic: its ``cosmetic_verdict``
        attribute, else the config's (default "proof")."""
        return self.manifest.calcs[name].cosmetic_verdict or self.config.cosmetic_verdict

    def cosmetic_verdicts(
        self, stale: Mapping[str, set[str]], registry: Mapping[tuple[str, str], Any]
    ) -> dict[tuple[str, str], Verdict]:
        """For calculations whose stored cells were built by other code (``stale``: name ->
        old code hashes): (name, old hash) -> whether the change is cosmetic, by which rule.

        "proof" (the default) calls a change cosmetic only when the old and new code are
        equal up to a consistent renaming of local variables (``equivalence.py``); it runs no
        user code. "simulation" (opt-in, a heuristic) also accepts an equal simulation hash
        when every new statement ran in the simulation and no literal, operator, comparison
        or called name changed.
        """
        stale = {n: hs for n, hs in stale.items() if hs}
        before = {
            (name, old): registry.get(("code", old)) or {}
            for name, hashes in stale.items()
            for old in hashes
        }
        # Simulate only where the heuristic is opted in and could still say "cosmetic": the
        # proof failed and no literal, operator, comparison or called name changed.
        simulating = {
            name
            for (name, _), parts in before.items()
            if self.verdict_rule(name) == "simulation"
            and (lineage := self.manifest.calcs[name].lineage) is not None
            and parts.get("__proof__") != lineage.proof_hash
            and parts.get("__tokens__") == lineage.tokens_hash
        }
        sims = self.simulations(simulating) if simulating else {}
        verdicts: dict[tuple[str, str], Verdict] = {}
        for (name, old), parts in before.items():
            spec = self.manifest.calcs[name]
            verdicts[(name, old)] = (
                Verdict(False, "proof", "the old code was never registered")
                if spec.lineage is None or not parts
                else _verdict(spec, spec.lineage, parts, self.verdict_rule(name), sims.get(name))
            )
        return verdicts

    def observe(self, now: dt.datetime) -> Observation:
        scoped: dict[str, tuple[int, str]] = {}
        reasons: dict[int, str] = {}
        for bump in self.ledger.epoch_bumps():
            if bump.calculation is None:
                reasons[bump.epoch] = bump.reason
            else:
                scoped[bump.calculation] = (bump.epoch, bump.reason)
        complete = self.complete_through()
        root = self.index_root_data(now, complete)
        problems = self.ledger.load_root_problems()  # after indexing: this run's findings
        full = os.environ.get(FULL_PLAN_ENV) == "1"
        return Observation(
            ledger=self.ledger.load_cells(self.manifest.calcs, slim=True) if full else {},
            digests=None if full else self.ledger.load_digests(self.manifest.calcs),
            root=root,
            epoch=read_epoch(self.config.epoch_file),
            scoped_epochs=scoped,
            epoch_reasons=reasons,
            live_runs=self.ledger.live_runs(now),
            complete=complete,
            skipped={name: problems[name] for name in root if name in problems},
        )

    def observe_more(
        self, names: set[str], months: Collection[tuple[str, int]] | None = None
    ) -> MoreObservation:
        """Full ledger rows of ``names`` (only of these (calculation, month) when given: a
        plan from digests), the registered versions of their stored hashes, and the
        simulation verdicts of their code changes (what ``planning.plan_with`` asks for when
        cells changed; the no-op plan never gets here)."""
        rows = (  # full rows: every cell is a LedgerCell
            self.ledger.load_cells(names)
            if months is None
            else self.ledger.load_buckets(months, slim=False)
        )
        full = [
            c for per_date in rows.values() for c in per_date.values() if isinstance(c, LedgerCell)
        ]
        wanted = {
            (kind, value)
            for cell in full
            for kind, value in (
                ("code", cell.code_hash),
                ("layer", cell.layer_hash),
                ("infra", cell.infra_hash),
            )
        }
        # The schemas of the root data hashes that changed under these cells, then and now,
        # so the plan can say what changed (``planning.Decider._root_change``).
        now_iso = {
            ds: {d.isoformat(): h for d, h in index.items()}
            for ds, index in self._root_index.items()
        }
        for cell in full:
            for ds, window in cell.root_hashes.items():
                current = now_iso.get(ds, {})
                for day, old in window.items():
                    new = current.get(day)
                    if new != old:
                        wanted.add(("rootdate", old))
                        if new is not None:
                            wanted.add(("rootdate", new))
        registry = self.ledger.load_versions(wanted)
        stale = {
            name: {c.code_hash for c in per_date.values() if isinstance(c, LedgerCell)}
            - {self.manifest.calcs[name].code_hash}
            for name, per_date in rows.items()
            if name in self.manifest.calcs
        }
        return MoreObservation(rows, registry, self.cosmetic_verdicts(stale, registry))

    def register_versions(self, manifest: Manifest, now: dt.datetime) -> None:
        """Record what each current code, layer and infra hash is made of (the registry),
        with the simulation hash of each new code version."""
        # Only a new code version judged by simulation needs its simulation hash now; which
        # versions are new the ledger decides below (known ones are skipped).
        simulable = {n for n in manifest.calcs if self.verdict_rule(n) == "simulation"}
        if simulable:
            known = self.ledger.load_versions(
                ("code", manifest.calcs[n].code_hash) for n in simulable
            )
            simulable = {n for n in simulable if ("code", manifest.calcs[n].code_hash) not in known}
        sims = {
            manifest.calcs[n].code_hash: sim.sim_hash
            for n, sim in (self.simulations(simulable) if simulable else {}).items()
            if n in simulable
        }
        entries: dict[tuple[str, str], tuple[str, dict[str, Any]]] = {}
        for name, spec in manifest.calcs.items():
            if spec.lineage is None:
                continue
            parts = spec.lineage.registry_parts()
            entries[("code", spec.code_hash)] = (name, parts["code"])
            entries[("layer", spec.layer_hash)] = (name, parts["layer"])
            entries[("infra", spec.infra_hash)] = (name, spec.lineage.infra_parts)
        self.ledger.register_versions(entries, now, sims)

    # --- decide ---------------------------------------------------------------------------

    def request(
        self,
        observation: Observation,
        target: dt.date,
        manifest: Manifest | None = None,
        force: Iterable[str] = (),
        force_range: tuple[dt.date, dt.date] | None = None,
    ) -> PlanRequest:
        return PlanRequest(
            manifest=manifest or self.manifest,
            ledger=observation.ledger,
            root=observation.root,
            epoch=observation.epoch,
            target=target,
            calendar=self.config.calendar,
            force=frozenset(force),
            force_range=force_range,
            scoped_epochs=observation.scoped_epochs,
            epoch_reasons=observation.epoch_reasons,
            live_runs=observation.live_runs,
            complete=observation.complete,
            skipped=observation.skipped,
            digests=observation.digests,
        )

    def observe_retained(self, request: PlanRequest, cells: list[CellKey]) -> RetainedObservation:
        """The retained results of ``cells`` (the plan's ``reuse_candidates``) that match
        their calculation's current layer, infra and epochs, with the verdicts on their code
        hashes that differ from the current code (cosmetic ones may be reused)."""
        calcs = request.manifest.calcs
        retained = self.ledger.load_retained(
            cells,
            {
                name: (
                    spec.layer_hash,
                    spec.infra_hash,
                    request.epoch,
                    request.scoped_epochs.get(name, (0, ""))[0],
                )
                for name, spec in calcs.items()
            },
        )
        other: dict[str, set[str]] = {}
        for (name, _), found in retained.items():
            for r in found:
                if (
                    r.code_hash != calcs[name].code_hash
                    and (name, r.code_hash) not in request.cosmetic
                ):
                    other.setdefault(name, set()).add(r.code_hash)
        registry = (
            self.ledger.load_versions(("code", h) for hashes in other.values() for h in hashes)
            if other
            else {}
        )
        return RetainedObservation(retained, registry, self.cosmetic_verdicts(other, registry))

    def plan(
        self,
        target: dt.date | None = None,
        now: dt.datetime | None = None,
        selection: frozenset[str] | None = None,
    ) -> Plan:
        """The dry-run plan up to ``target`` (default: yesterday, UTC). Executes nothing.

        ``selection`` (``selection.resolve_selection``): keep only these calculations' cells
        in the plan shown; each is still decided over the whole graph."""
        now = now or dt.datetime.now(dt.UTC)
        target = target or default_target(now)
        request = self.request(self.observe(now), target)
        plan = plan_with(request, self.observe_more, self.ledger, self.observe_retained)[0]
        if selection is None:
            return plan
        return dataclasses.replace(
            plan,
            decisions={k: d for k, d in plan.decisions.items() if k[0] in selection},
            order=[k for k in plan.order if k[0] in selection],
        )

    def status(
        self,
        target: dt.date | None = None,
        now: dt.datetime | None = None,
        selection: frozenset[str] | None = None,
    ) -> Any:
        """The ``status.Status`` of every calculation (``selection``: of these) up to
        ``target`` (default: yesterday, UTC): the dry-run plan, the range's unclean cells and
        the last run. Executes nothing."""
        from orchestrator.status import LastRun, build_status

        plan = self.plan(target, now)
        names = [name for members in self.manifest.passes for name in members]
        unclean = (
            self.ledger.unclean_cells(names, plan.dates[0], plan.target_date) if plan.dates else []
        )
        runs = self.ledger.recent_runs(1)
        last = None
        if runs:
            r = runs[0]
            last = LastRun(r.run_id, r.trigger, r.started_at, r.finished_at, r.status, r.exit_code)
        return build_status(names, plan, unclean, last, selection)

    def saved_plan(
        self,
        target: dt.date | None = None,
        selection: frozenset[str] | None = None,
        now: dt.datetime | None = None,
    ) -> tuple[Plan, Any]:
        """The dry-run plan up to ``target`` and its reviewable form (``saved_plan``), to
        write with ``plan --save`` and run later with ``run --plan``. Executes nothing."""
        from orchestrator import saved_plan

        now = now or dt.datetime.now(dt.UTC)
        target = target or default_target(now)
        plan, request = plan_with(
            self.request(self.observe(now), target),
            self.observe_more,
            self.ledger,
            self.observe_retained,
        )
        return plan, saved_plan.capture(
            request, plan, self.ledger.cell_digests(), selection, _version()
        )

    # --- act ------------------------------------------------------------------------------

    def run(
        self,
        target: dt.date | None = None,
        trigger: str = "manual",
        start: dt.date | None = None,
        calculations: Iterable[str] = (),
        force: bool = False,
        workers: int | None = None,
        selection: frozenset[str] | None = None,
        reviewed: Any = None,
        executor: str | None = None,
        scheduler: str | None = None,
    ) -> RunSummary:
        """Index, plan and execute up to ``target``; the nightly job and backfills.

        Args:
            target: last date (inclusive); default yesterday (UTC).
            trigger: recorded on the run ("cron", "manual", "backfill").
            start: first date that may execute (inclusive); default: no lower bound.
            calculations: restrict to these calculations plus their upstream closure.
            force: with ``calculations`` (or all), re-run even up-to-date cells in range.
            workers: processes for standard cells (default: the config's ``workers``).
            reviewed: a ``saved_plan.SavedPlan`` (``run --plan``): run exactly it, or refuse
                before executing anything when what it was decided from changed.
            selection: execute only these calculations' cells (``--select``); the others are
                outside the scope, and a selected cell whose upstream would have to run first
                waits (BLOCKED) rather than read a stale input.
            executor / scheduler: where blocks are computed (``orchestrator.executors``;
                default: the config's ``executor`` and ``scheduler``).

        Raises:
            RunLockedError: another run is in progress.
            ConfigError: the executor is unknown or unavailable here, or refuses the setting
                (before anything is recorded).
        """
        from orchestrator import executors
        from orchestrator.execution import Executor

        plugin = executors.get(executor or self.config.executor)
        setting = executors.Setting(
            workers=workers or self.config.workers,
            scheduler=scheduler or self.config.scheduler,
            database_url=self.config.database_url,
        )
        plugin.check(setting)

        now = dt.datetime.now(dt.UTC)
        target = target or default_target(now)
        names = list(calculations)
        manifest = self.manifest.slice(names) if names else self.manifest
        run_id = uuid.uuid4().hex
        holder = lock_holder(run_id)
        ledger = self.ledger
        ledger.acquire_lock(holder, now, LOCK_TTL)
        try:
            ledger.collect_orphans()
            # Months the planner cannot trust (written to from outside, or since the rule of
            # inputs digests changed): checked row by row and digested again.
            ledger.repair_digests(row_verifier(self.manifest))
            ledger.start_run(run_id, trigger, target, now)
            observation = self.observe(now)
            forced = (names or list(manifest.calcs)) if force else []
            low = start or dt.date.min
            request = self.request(
                observation, target, manifest, forced, (low, target) if force else None
            )
            plan, request = plan_with(request, self.observe_more, ledger, self.observe_retained)
            if reviewed is not None:
                from orchestrator import saved_plan

                current = saved_plan.capture(
                    request, plan, ledger.cell_digests(), selection, _version()
                )
                changes = saved_plan.compare(reviewed, current)
                if changes:
                    raise saved_plan.StalePlanError(
                        "the saved plan is stale, nothing ran: " + "; ".join(changes)
                    )
            self.register_versions(manifest, now)
            decider = Decider(request)
            last_beat = [dt.datetime.now(dt.UTC)]

            lease = dt.timedelta(seconds=self.config.lease_seconds)

            def heartbeat() -> None:
                t = dt.datetime.now(dt.UTC)
                if t - last_beat[0] > dt.timedelta(seconds=60):
                    ledger.refresh_lock(holder, t, LOCK_TTL)
                    ledger.renew_leases(run_id, t + lease)
                    last_beat[0] = t

            engine = Executor(
                ledger=ledger,
                manifest=manifest,
                decider=decider,
                plan=plan,
                ledger_snapshot=request.ledger,
                dataset=self.dataset,
                run_id=run_id,
                flush_users=self.config.flush_users,
                shard_bytes=self.config.shard_bytes,
                in_scope=_scope(low if start else None, selection),
                progress=self.progress,
                heartbeat=heartbeat,
                workers=plugin.walk_workers(setting),
                block_runner=lambda matrices: plugin.block_runner(setting, matrices, manifest),
                remote_ranges=plugin.submits_ranges,
                max_attempts=self.config.max_attempts,
                lease=lease,
                memory_budget=(
                    int(self.config.memory_budget_mb * 2**20 * self.config.memory_fraction)
                    if self.config.memory_budget_mb
                    else None
                ),
                columnar=self.config.columnar,
                block_dates=self.config.block_dates,
            )
            if _LOG.isEnabledFor(logging.INFO):
                counts = plan.counts()
                _LOG.info(
                    "run %s started: up to %s (%s), %d cells to run or decide again",
                    run_id[:8],
                    target,
                    trigger,
                    counts.get("RUNNABLE", 0) + counts.get("BLOCKED", 0),
                    extra={"run_id": run_id, "date": target, "counts": counts},
                )
            summary = engine.execute()
            summary.started_at, summary.finished_at = now, dt.datetime.now(dt.UTC)
            _log_cells(ledger, run_id, summary)
            # Rows no user can be given to are reported by every run that uses the dataset,
            # from the ledger: a later run reusing the index (source unchanged) reads no file
            # and would otherwise say nothing. They fail nobody (the exit code ignores notes).
            used = {ds for spec in manifest.calcs.values() for ds in spec.root_data}
            for name, (skipped, problems) in sorted(observation.skipped.items()):
                if name in used and (skipped or problems):
                    summary.notes.append(skipped_note(name, skipped, problems))
            for name, dataset in sorted(self._datasets.items()):
                if dataset.bad_count:
                    summary.notes.append(
                        f"{name}: {dataset.bad_count} user-date(s) with malformed rows "
                        "failed those users (see `orchestrator failures`)"
                    )
            for (name, old), verdict in request.cosmetic.items():
                if verdict.cosmetic and name in manifest.calcs:  # equivalent: re-stamp
                    ledger.restamp_code(name, old, manifest.calcs[name].code_hash)
            ledger.finish_run(
                run_id,
                "COMPLETED" if summary.ok else "FAILED",  # FAILED: not complete and clean
                summary.completed,
                len(summary.failed),
                summary.skipped,
                dt.datetime.now(dt.UTC),
                exit_code=summary.exit_code,
                summary=summary.lines(),
            )
            return summary
        except BaseException as e:
            _LOG.error(
                "run %s aborted: %s: %s",
                run_id[:8],
                type(e).__name__,
                str(e).strip().splitlines()[0] if str(e).strip() else "",
                extra={"run_id": run_id, "status": "ABORTED", "echoed": True},
            )
            # The run stopped short (a worker died, storage failed, an interrupt): say so in
            # its record. Its leased cells become zombies, recovered by the next run.
            with contextlib.suppress(Exception):
                ledger.finish_run(run_id, "ABORTED", 0, 0, 0, dt.datetime.now(dt.UTC))
            raise
        finally:
            ledger.release_lock(holder)

    # --- inspect --------------------------------------------------------------------------

    def load_result(self, calculation: str, date: dt.date) -> Any:
        """A published result: standard -> {user: result}; meta -> its dict; None if none.

        Raises:
            DefinitionError: unknown calculation.
        """
        self._known(calculation)
        payloads = self.ledger.shard_payloads(calculation, date)
        if payloads is None:
            return None
        return assemble(decode_shards(payloads), self.manifest.calcs[calculation].kind)

    def load_user_result(self, calculation: str, date: dt.date, user: str) -> Any:
        """One user's published result of a standard cell, reading only the shard that holds
        it (found by each shard's first and last user); None if there is none.

        Raises:
            DefinitionError: unknown calculation, or a meta calculation (no users).
        """
        self._known(calculation)
        if self.manifest.calcs[calculation].kind != "standard":
            raise DefinitionError(f"'{calculation}' is a meta calculation: it has no users")
        shards = self.ledger.shard_index(calculation, date)
        if shards is None:
            return None
        fetch = lambda shard: self.ledger.shard_data(calculation, date, shard)
        return StoredResult(shards, fetch).get(user)

    def _known(self, calculation: str) -> None:
        if calculation not in self.manifest.calcs:
            raise DefinitionError(
                f"unknown calculation '{calculation}'; known: {', '.join(sorted(self.manifest.calcs))}"
            )

    def why(self, calculation: str, date: dt.date) -> tuple[Decision, LedgerCell | None, list[Any]]:
        """A cell's decision, its stored row and every fingerprint part, stored vs current.

        Raises:
            DefinitionError: unknown calculation, or a date outside the plan's dates.
        """
        if calculation not in self.manifest.calcs:
            raise DefinitionError(
                f"unknown calculation '{calculation}'; "
                f"known: {', '.join(sorted(self.manifest.calcs))}"
            )
        now = dt.datetime.now(dt.UTC)
        request = self.request(self.observe(now), date)
        plan, request = plan_with(request, self.observe_more, self.ledger, self.observe_retained)
        decision = plan.decisions.get((calculation, date))
        if decision is None:
            raise DefinitionError(
                f"{date} is not a date of the plan (it runs over dates with root data up to the "
                f"target); pick one of {plan.dates[0] if plan.dates else '-'} .. {date}"
            )
        stored = self.ledger.cell(calculation, date)

        def published(key: tuple[str, dt.date]) -> str | None:
            # (a cell's inputs only: the plan's other decisions are not all needed)
            found = plan.decisions.get(key)
            return found.result_hash if found is not None else None

        parts = provenance(
            Decider(request), self.manifest.calcs[calculation], date, stored, published
        )
        return decision, stored, parts

    def gc(
        self,
        keep: int | None = None,
        older_than_days: float | None = None,
        dry_run: bool = False,
        now: dt.datetime | None = None,
    ) -> Any:
        """Prune retained results (``ledger.retention``) under the run lock, so no run is
        about to re-point a cell to one: per cell all but the ``keep`` newest (default: the
        config's ``retain_results``), and with ``older_than_days`` also those superseded
        longer ago. Never a current result. Returns a ``retention.GcReport``.

        Raises:
            RunLockedError: a run is in progress.
            ConfigError: ``keep`` or ``older_than_days`` negative.
        """
        keep = self.config.retain_results if keep is None else keep
        if keep < 0 or (older_than_days is not None and older_than_days < 0):
            raise ConfigError("--keep and --older-than must be 0 or more")
        now = now or dt.datetime.now(dt.UTC)
        older = None if older_than_days is None else dt.timedelta(days=older_than_days)
        holder = lock_holder(uuid.uuid4().hex)
        ledger = self.ledger
        ledger.acquire_lock(holder, now, LOCK_TTL)
        try:
            return ledger.gc(keep, older, now, dry_run)
        finally:
            ledger.release_lock(holder)

    def bump_epoch(self, calculation: str | None = None, reason: str = "") -> tuple[int, int]:
        """Bump the global epoch (``system_epoch.py``) or one calculation's scoped epoch;
        the reason is stored and shown in the plan's EPOCH_CHANGED details.

        All or nothing: a global bump is recorded in the ledger in the same transaction that
        rewrites the file (see ``bump_epoch``), so if the ledger cannot record it the file
        keeps the old epoch.

        Returns:
            (old, new) epoch.

        Raises:
            DefinitionError: unknown calculation.
            StorageError: the ledger cannot be opened or cannot record the bump (nothing
                changed).
            ConfigError: the epoch file cannot be read or written (nothing changed).
        """
        now = dt.datetime.now(dt.UTC)
        if calculation is not None and calculation not in self.manifest.calcs:
            raise DefinitionError(
                f"unknown calculation '{calculation}'; "
                f"known: {', '.join(sorted(self.manifest.calcs))}"
            )
        ledger = self.ledger  # opened (and migrated) before anything changes
        where = f"{self.config.epoch_file} is unchanged" if calculation is None else "no change"
        try:
            if calculation is None:
                return bump_epoch(
                    self.config.epoch_file,
                    lambda new, write: ledger.record_epoch_bump(
                        None, new, reason, now, before_commit=write
                    ),
                )
            old = max(
                (b.epoch for b in ledger.epoch_bumps() if b.calculation == calculation),
                default=0,
            )
            ledger.record_epoch_bump(calculation, old + 1, reason, now)
            return old, old + 1
        except SQLAlchemyError as e:
            first = (str(getattr(e, "orig", None) or e).strip().splitlines() or [""])[0]
            raise StorageError(
                f"cannot record the epoch bump in the ledger ({type(e).__name__}: {first}); "
                f"{where}; fix the database (`orchestrator db upgrade`?) and bump again"
            ) from e


def _verdict(
    spec: CalcSpec,
    lineage: Lineage,
    before: Mapping[str, Any],
    rule: str,
    sim: Simulation | None,
) -> Verdict:
    """The verdict on one code change of ``spec`` from registered version ``before`` under
    ``rule``; ``sim`` is the current code's simulation, when one was run."""
    if before.get("__proof__") == lineage.proof_hash:
        return Verdict(True, "proof", "proven equivalent: equal up to renamed local variables")
    if rule != "simulation":
        return Verdict(
            False,
            "proof",
            "not proven equivalent"
            if before.get("__proof__")
            else "not proven equivalent: the old code was registered before proofs",
        )
    if before.get("__tokens__") != lineage.tokens_hash:
        return Verdict(
            False, "simulation", "a literal, operator, comparison or called name changed"
        )
    if not before.get("__sim__") or sim is None:
        return Verdict(False, "simulation", "the old version was never simulated")
    if before["__sim__"] != sim.sim_hash:
        return Verdict(False, "simulation", "its simulated behaviour changed")
    now = lineage.digests()["code"]
    changed = {k for k in now if before.get(k) != now[k]}
    from orchestrator.simulation import unverified_changes

    unverified = unverified_changes(spec, changed, sim.lines, before.get("__stmts__") or {})
    if unverified:
        return Verdict(
            False,
            "simulation",
            f"unverified by simulation: {', '.join(unverified)} not executed",
        )
    return Verdict(True, "simulation", "same simulated behaviour (heuristic)")


def declared_packages(spec: CalcSpec, names: Iterable[str]) -> CalcSpec:
    """``spec`` with its infrastructure made of the configured distributions' versions.

    Raises:
        ConfigError: a configured distribution is not installed.
    """
    import importlib.metadata  # here: a no-op run without 'packages' never reads metadata

    versions: dict[str, str] = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError as e:
            raise ConfigError(
                f"configured package '{name}' is not installed; install it or remove it from "
                "'packages'"
            ) from e
    lineage = dataclasses.replace(spec.lineage, packages=versions) if spec.lineage else None
    return dataclasses.replace(
        spec, infra_hash=lineage.infra_hash if lineage else infra_hash(versions), lineage=lineage
    )


SKIPPED_SUFFIX = "; row skipped"


def skipped_note(dataset: str, skipped: int, problems: Iterable[str]) -> str:
    """The run's one note on what a dataset could not read.

    Args:
        dataset: the dataset's name.
        skipped: rows given to no user (no readable date or user, or a wrong width with no
            single reading).
        problems: the stored examples, "file:line: what; row skipped" (at most 20), and
            unreadable files of a folder.

    Returns:
        e.g. ``prices: 2 rows skipped, no user or date can be read from them:
        prices.csv:7: bad date '2024-13-01'; prices.csv:9: missing user`` (the examples'
        "; row skipped" is said once, by the count).
    """
    examples = [p.removesuffix(SKIPPED_SUFFIX) for p in problems]
    shown = sum(1 for p in problems if p.endswith(SKIPPED_SUFFIX))
    parts = []
    if skipped:
        rows = "1 row" if skipped == 1 else f"{skipped} rows"
        more = f" (the first {shown} listed)" if shown < skipped else ""
        parts.append(f"{rows} skipped, no user or date can be read from them{more}")
    if examples:
        parts.append("; ".join(examples))
    return f"{dataset}: {': '.join(parts)}"


def default_target(now: dt.datetime) -> dt.date:
    """Yesterday in UTC: the nightly job computes the day that just ended."""
    return (now.astimezone(dt.UTC) - dt.timedelta(days=1)).date()


def _log_cells(ledger: Ledger, run_id: str, summary: RunSummary) -> None:
    """One INFO record per cell attempt of the run (from the ledger, after the run: what was
    published), the skipped cells' counts at DEBUG, and the run's headline at INFO."""
    log = _LOG
    if log.isEnabledFor(logging.INFO):
        for a in ledger.attempts_of_run(run_id):
            seconds = (a.finished_at - a.started_at).total_seconds()
            failed = f", {a.users_failed} failed" if a.users_failed else ""
            error = f": {a.error.strip().splitlines()[-1]}" if a.error and a.error.strip() else ""
            log.info(
                "%s %s %s (%s) in %.2f s: %d %s%s%s",
                a.calculation,
                a.date,
                a.status,
                a.reason,
                seconds,
                a.users,
                "user" if a.users == 1 else "users",
                failed,
                error,
                extra={
                    "run_id": run_id,
                    "calc": a.calculation,
                    "date": a.date,
                    "status": a.status,
                    "reason": a.reason,
                    "seconds": round(seconds, 4),
                    "users": a.users,
                    "failed_users": a.users_failed,
                },
            )
    skipped = {
        reason: n
        for reason, n in summary.reasons.items()
        if reason in ("UP_TO_DATE", "COSMETIC_CHANGE", "UPSTREAM_UNCHANGED")
    }
    log.debug(
        "run %s skipped %d cells: %s",
        run_id[:8],
        summary.skipped,
        ", ".join(f"{n} {reason}" for reason, n in sorted(skipped.items())) or "none",
        extra={"run_id": run_id, "counts": skipped},
    )
    log.info(
        summary.headline(),
        extra={
            "run_id": run_id,
            "status": "CLEAN" if summary.ok else "NOT_CLEAN",
            "seconds": round(summary.wall_seconds, 4),
            "counts": {
                "computed": summary.completed,
                "failed": len(summary.failed),
                "skipped": summary.skipped,
                "blocked": summary.blocked,
                "impossible": summary.impossible,
            },
        },
    )


def _scope(low: dt.date | None, selection: frozenset[str] | None) -> Callable[[CellKey], bool]:
    """Whether a cell may execute in this run: dated ``low`` or later, of a selected
    calculation (None: no bound)."""
    if low is None and selection is None:
        return lambda key: True
    if selection is None:
        return lambda key: key[1] >= low  # type: ignore[operator]
    if low is None:
        return lambda key: key[0] in selection
    return lambda key: key[1] >= low and key[0] in selection


def _version() -> str:
    from importlib.metadata import version

    return version("orchestrator")
