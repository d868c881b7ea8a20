"""Planning in proportion to change (issue 9): a plan from ledger digests is the full plan.

* **exact, as a property**: for random projects (dependencies, historical calculations,
  lookbacks, dependency windows, two datasets with gaps, earliest dates) over dates spanning
  several months, built by a simulated run, then edited at random — code and category edits,
  root data corrected or removed on one date, a new date, a cell re-run or re-published with
  another result, failed / partial / dead-lettered / leased (live or zombie) cells, removed
  rows, forcing, global and scoped epoch bumps, an earlier target — the plan made from the
  digests (reading only the months they do not prove) equals, decision for decision, the
  plan made from every row (``make_plan`` over the full snapshot);
* **proportional**: a no-op reads no row; a new date reads its month; a change on one date
  reads the months that hold it and its dependents;
* **kept exactly**: the digests the ledger keeps incrementally through every write method
  equal digests rebuilt from the rows (a property over random write sequences, SQLite and
  PostgreSQL); a write from outside marks its month dirty, which is never trusted until
  repaired; migration 0006 digests existing cells;
* **end to end**: ``Orchestrator.plan``, ``why`` and ``run`` give the same decisions from the
  digests as from every cell (``ORCHESTRATOR_FULL_PLAN=1``) after each kind of change.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import inspect, select, text

from orchestrator.fingerprint import digest
from orchestrator.ledger.digests import CalcDigests, bucket_of, current_format, digests_of
from orchestrator.ledger.store import (
    CELLS,
    DIGESTS,
    CellWrite,
    Ledger,
    LedgerCell,
    build_key,
    downgrade,
    make_engine,
    upgrade,
)
from orchestrator.manifest import CalcSpec, Manifest
from orchestrator.planning import (
    Decider,
    DigestDecisions,
    MemoryRows,
    MoreObservation,
    Plan,
    PlanRequest,
    Reason,
    formula_canary,
    make_plan,
    plan_with,
    row_verifier,
)
from orchestrator.reporting import render
from tests.conftest import Project, price_rows, weekdays

EPOCH = 1


# --- a pure world: manifest, root data, and the ledger a run of it leaves -------------------


def spec(
    name: str,
    deps: tuple[str, ...] = (),
    roots: tuple[str, ...] = (),
    historical: bool = False,
    lookback: int = 1,
    earliest: dt.date | None = None,
    windows: tuple[tuple[str, int], ...] = (),
    code: str = "0" * 32,
    category: str = "cat",
) -> CalcSpec:
    return CalcSpec(
        name=name,
        kind="standard",
        category=category,
        dependencies=deps,
        root_data=roots,
        historical=historical,
        lookback=lookback,
        earliest_date=earliest,
        product_lines=(),
        max_failure_rate=0.1,
        code_hash=code,
        cls=object,  # type: ignore[arg-type]
        windows=windows,
    )


def build(request: PlanRequest, ledger: dict[str, dict[dt.date, LedgerCell]]) -> None:
    """Publish every possible cell of ``request`` into ``ledger`` as a run would: in
    dependency order, each from the current inputs, its result a digest of its inputs (so a
    change of inputs changes the result)."""
    decider = Decider(request)
    hashes = {
        (name, date): cell.result_hash for name, per in ledger.items() for date, cell in per.items()
    }
    for date in decider.dates:
        for name in request.manifest.order:
            if (name, date) not in decider.impossible:
                publish(request, decider, ledger, hashes, name, date)


def publish(
    request: PlanRequest,
    decider: Decider,
    ledger: dict[str, dict[dt.date, LedgerCell]],
    hashes: dict[tuple[str, dt.date], str | None],
    name: str,
    date: dt.date,
) -> None:
    """Store one COMPLETED cell computed from the current inputs (what the executor writes)."""
    s = request.manifest.calcs[name]
    inputs = decider.inputs(s, date, hashes.get)
    result = digest("result", [name, date.isoformat(), inputs.digest])
    hashes[(name, date)] = result
    scoped = decider.scoped_epoch(name)
    ledger.setdefault(name, {})[date] = LedgerCell(
        name,
        date,
        build_key(
            "COMPLETED", s.category, s.code_hash, s.layer_hash, s.infra_hash, request.epoch, scoped
        ),
        inputs.digest,
        result,
        "COMPLETED",
        s.category,
        s.code_hash,
        s.layer_hash,
        s.infra_hash,
        request.epoch,
        scoped,
        json.dumps(inputs.upstream),
        json.dumps(inputs.root),
        inputs.previous_hash,
        0,
        None,
        "run0",
        None,
        inputs.digest,
        0,
    )


def digest_plan(request: PlanRequest) -> tuple[Plan, MemoryRows]:
    """The plan ``Orchestrator.plan`` makes: from the digests of ``request.ledger``'s rows,
    reading rows (slim, then full where needed) only of the months not proven."""
    source = MemoryRows(request.ledger)

    def more(names: set[str], months: Any = None) -> MoreObservation:
        return MoreObservation(source.load_buckets(months, slim=False), {}, {})

    start = dataclasses.replace(request, ledger={}, digests=digests_of(request.ledger))
    plan, _ = plan_with(start, more, source)
    return plan, source


def assert_same_plan(request: PlanRequest) -> Plan:
    """The digest plan of ``request`` equals the full plan, decision for decision."""
    full = make_plan(request)
    plan, _ = digest_plan(request)
    assert not plan.needs_full and not plan.needs_rows
    assert plan.dates == full.dates
    ours, theirs = dict(plan.decisions.items()), dict(full.decisions.items())
    assert ours.keys() == theirs.keys()
    differing = {k: (ours[k], theirs[k]) for k in theirs if ours[k] != theirs[k]}
    assert not differing, differing
    assert list(plan.order) == list(full.order)
    assert plan.counts() == full.counts()
    assert plan.reason_counts() == full.reason_counts()
    assert plan.runnable() == full.runnable()
    reasons = {k: d.reason for k, d in theirs.items()}
    assert dict(plan.cell_reasons()) == reasons == dict(full.cell_reasons())
    return plan


# Weekdays from mid-January over three months: several months, gaps at weekends.
AXIS = weekdays(dt.date(2024, 1, 15), 45)
EXTRA = weekdays(AXIS[-1] + dt.timedelta(days=1), 1)[0]


@st.composite
def worlds(draw: st.DrawFn) -> tuple[Manifest, dict[str, dict[dt.date, str]]]:
    n = draw(st.integers(2, 6))
    specs: list[CalcSpec] = []
    for i in range(n):
        name = f"c{i}"
        earlier = [s.name for s in specs]
        deps = (
            tuple(sorted(set(draw(st.lists(st.sampled_from(earlier), max_size=2)))))
            if earlier
            else ()
        )
        roots: tuple[str, ...] = ("p",) if not deps else ()
        if draw(st.booleans()):
            roots = tuple(sorted({*roots, draw(st.sampled_from(["p", "q"]))}))
        windows: tuple[tuple[str, int], ...] = ()
        if deps and draw(st.integers(0, 5)) == 0:
            windows = ((deps[0], draw(st.integers(2, 4))),)
        specs.append(
            spec(
                name,
                deps,
                roots,
                historical=draw(st.integers(0, 2)) == 0,
                lookback=draw(st.integers(1, 4)) if roots else 1,
                earliest=draw(st.sampled_from([None, None, None, AXIS[7], AXIS[30]])),
                windows=windows,
            )
        )
    gaps = draw(st.sets(st.sampled_from(AXIS[1:]), max_size=3))
    q_days = draw(st.sets(st.sampled_from(AXIS), min_size=1))
    root = {
        "p": {d: digest("p", d.isoformat()) for d in AXIS if d not in gaps},
        "q": {d: digest("q", d.isoformat()) for d in sorted(q_days)},
    }
    return Manifest.build(specs), root


EDITS = st.one_of(
    st.tuples(st.just("code"), st.integers(0, 5)),
    st.tuples(st.just("category"), st.integers(0, 5)),
    st.tuples(st.just("root"), st.sampled_from(["p", "q"]), st.integers(0, len(AXIS) - 1)),
    st.tuples(st.just("drop_root"), st.sampled_from(["p", "q"]), st.integers(0, len(AXIS) - 1)),
    st.tuples(st.just("new_date")),
    st.tuples(st.just("force"), st.integers(0, 5), st.booleans(), st.integers(0, len(AXIS) - 1)),
    st.tuples(st.just("epoch")),
    st.tuples(st.just("scoped"), st.integers(0, 5)),
    st.tuples(
        st.just("status"),
        st.integers(0, 5),
        st.integers(0, len(AXIS) - 1),
        st.sampled_from(["FAILED", "PARTIAL", "DEAD_LETTER", "RUNNING", "RUNNING_LIVE"]),
    ),
    st.tuples(st.just("rerun"), st.integers(0, 5), st.integers(0, len(AXIS) - 1)),
    st.tuples(st.just("result"), st.integers(0, 5), st.integers(0, len(AXIS) - 1)),
    st.tuples(st.just("delete"), st.integers(0, 5), st.integers(0, len(AXIS) - 1)),
    st.tuples(st.just("target"), st.integers(0, len(AXIS) - 1)),
)


def edited(
    manifest: Manifest,
    root: dict[str, dict[dt.date, str]],
    edits: list[tuple[Any, ...]],
    axis: list[dt.date] = AXIS,
) -> PlanRequest:
    """Build the world, then apply ``edits`` (to code, data, ledger rows or the request);
    dates are indices into ``axis``."""
    AXIS = axis
    EXTRA = weekdays(axis[-1] + dt.timedelta(days=1), 1)[0]
    request = PlanRequest(manifest=manifest, ledger={}, root=root, epoch=EPOCH, target=AXIS[-1])
    ledger: dict[str, dict[dt.date, LedgerCell]] = {}
    build(request, ledger)
    names = list(manifest.order)
    calcs = dict(manifest.calcs)
    root = {ds: dict(days) for ds, days in root.items()}
    kw: dict[str, Any] = {}
    live: set[str] = set()
    scoped: dict[str, tuple[int, str]] = {}
    for edit in edits:
        kind = edit[0]
        name = names[edit[1] % len(names)] if len(edit) > 1 and isinstance(edit[1], int) else ""
        if kind == "code":
            calcs[name] = dataclasses.replace(
                calcs[name], code_hash=digest("code", [name, str(edits)])
            )
        elif kind == "category":
            calcs[name] = dataclasses.replace(calcs[name], category="moved")
        elif kind == "root":
            day = AXIS[edit[2]]
            if day in root[edit[1]]:
                root[edit[1]][day] = digest("fixed", [edit[1], day.isoformat()])
        elif kind == "drop_root":
            root[edit[1]].pop(AXIS[edit[2]], None)
        elif kind == "new_date":
            root["p"][EXTRA] = digest("p", EXTRA.isoformat())
            kw["target"] = EXTRA
        elif kind == "force":
            kw["force"] = frozenset({name})
            kw["force_range"] = (
                (AXIS[edit[3]], AXIS[min(edit[3] + 3, len(AXIS) - 1)]) if edit[2] else None
            )
        elif kind == "epoch":
            kw["epoch"] = EPOCH + 1
        elif kind == "scoped":
            scoped[name] = (scoped.get(name, (0, ""))[0] + 1, "test")
        elif kind in ("status", "result", "delete", "rerun"):
            day = AXIS[edit[2]]
            cell = ledger.get(name, {}).get(day)
            if cell is None:
                continue
            if kind == "delete":
                del ledger[name][day]
            elif kind == "result":
                ledger[name][day] = cell._replace(
                    result_hash=digest("other", [name, day.isoformat()])
                )
            elif kind == "rerun":
                req = PlanRequest(
                    manifest=Manifest.build(list(calcs.values())),
                    ledger=ledger,  # type: ignore[arg-type]
                    root=root,
                    epoch=kw.get("epoch", EPOCH),
                    target=kw.get("target", AXIS[-1]),
                    scoped_epochs=dict(scoped),
                )
                decider = Decider(req)
                if (name, day) not in decider.impossible and day in decider.dates:
                    hashes = {
                        (n, d): c.result_hash for n, per in ledger.items() for d, c in per.items()
                    }
                    publish(req, decider, ledger, hashes, name, day)
            else:
                status = edit[3]
                run_id = "live" if status == "RUNNING_LIVE" else "dead"
                status = status.removesuffix("_LIVE")
                if run_id == "live":
                    live.add("live")
                s = calcs[name]
                ledger[name][day] = cell._replace(
                    status=status,
                    build=build_key(
                        status,
                        cell.category,
                        cell.code_hash,
                        cell.layer_hash,
                        cell.infra_hash,
                        cell.epoch,
                        cell.scoped_epoch,
                    ),
                    attempts=1,
                    error="Traceback\nValueError: boom",
                    run_id=run_id,
                    attempted_digest=digest("attempt", [s.name])
                    if status == "DEAD_LETTER"
                    else cell.inputs_digest,
                )
        elif kind == "target":
            kw["target"] = AXIS[edit[1]]
    return PlanRequest(
        manifest=Manifest.build(list(calcs.values())),
        ledger=ledger,  # type: ignore[arg-type]
        root=root,
        epoch=kw.get("epoch", EPOCH),
        target=kw.get("target", AXIS[-1]),
        force=kw.get("force", frozenset()),
        force_range=kw.get("force_range"),
        scoped_epochs=scoped,
        live_runs=frozenset(live),
    )


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(world=worlds(), edits=st.lists(EDITS, max_size=4))
def test_the_digest_plan_is_the_full_plan_after_any_edits(world: Any, edits: list[Any]) -> None:
    manifest, root = world
    assert_same_plan(edited(manifest, root, edits))


# --- proportional: what a plan reads ----------------------------------------------------


def bench_like() -> tuple[PlanRequest, dict[str, dict[dt.date, LedgerCell]]]:
    """Eight calculations over 120 consecutive days (four months), built."""
    days = [dt.date(2024, 1, 1) + dt.timedelta(days=i) for i in range(120)]
    specs = [
        spec("a", roots=("p",), lookback=5),
        spec("b", roots=("p",), historical=True),
        spec("c", deps=("a", "b")),
        spec("d", deps=("c",), historical=True),
        spec("e", deps=("a",), roots=("p",), lookback=2),
        spec("f", deps=("d", "e")),
        spec("g", deps=("f",), historical=True),
        spec("h", deps=("g", "a")),
    ]
    root = {"p": {d: digest("p", d.isoformat()) for d in days}}
    request = PlanRequest(
        manifest=Manifest.build(specs), ledger={}, root=root, epoch=EPOCH, target=days[-1]
    )
    ledger: dict[str, dict[dt.date, LedgerCell]] = {}
    build(request, ledger)
    return dataclasses.replace(request, ledger=ledger), ledger  # type: ignore[arg-type]


def explicit(plan: Plan) -> int:
    assert isinstance(plan.decisions, DigestDecisions)
    return len(plan.decisions.explicit)


def test_a_noop_plan_reads_no_cell() -> None:
    request, _ = bench_like()
    plan, source = digest_plan(request)
    assert source.rows_read == 0 and explicit(plan) == 0
    assert plan.counts()["SKIPPED"] == 8 * 120
    assert_same_plan(request)


def test_a_plan_read_key_by_key_reads_all_hashes_at_once_after_a_few_months() -> None:
    request, _ = bench_like()
    plan, source = digest_plan(request)
    full = make_plan(request)
    assert plan.decisions[("d", dt.date(2024, 2, 3))] == full.decisions[("d", dt.date(2024, 2, 3))]
    assert source.rows_read == 29  # one month of d
    for key in full.order:  # as ``render(plan, "json")`` walks it
        assert plan.decisions[key] == full.decisions[key]
    # 64 months one by one, then every hash in one read (not 8 x 4 months of queries)
    assert source.rows_read <= 29 + 64 * 31 + 8 * 120


def test_a_new_date_reads_its_month_only() -> None:
    request, _ = bench_like()
    new = request.target + dt.timedelta(days=1)  # 2024-04-30: April has 29 stored days
    root = {"p": {**request.root["p"], new: digest("p", new.isoformat())}}
    grown = dataclasses.replace(request, root=root, target=new)
    plan, source = digest_plan(grown)
    april, march = 30, 31
    assert explicit(plan) == 8 * april
    # April's stored rows (the new cells have none), and for the historical b, d and g the
    # month of their April 1 cell's previous cell (rows are read a month at a time)
    assert source.rows_read == 8 * (april - 1) + 3 * march
    assert plan.reason_counts() == {"NEW": 8, "UP_TO_DATE": 8 * 120}
    assert_same_plan(grown)


def test_a_root_change_reads_the_months_that_hold_it_and_their_dependents() -> None:
    request, _ = bench_like()
    day = dt.date(2024, 2, 10)
    root = {"p": {**request.root["p"], day: digest("fixed", day.isoformat())}}
    changed = dataclasses.replace(request, root=root)
    plan, _ = digest_plan(changed)
    decided = plan.decisions.explicit  # type: ignore[attr-defined]
    months = {(k[0], bucket_of(k[1])) for k in decided}
    feb, mar, apr = bucket_of(day), bucket_of(day) + 1, bucket_of(day) + 2
    # a and e read the window; b, d, g are historical (the change runs on through their
    # chain, so their later months are decided one by one, and so are their dependents').
    assert {m for m in months if m[0] in "ae"} == {("a", feb), ("e", feb)}
    assert ("b", apr) in months and ("c", mar) in months
    assert all(bucket_of(k[1]) >= feb for k in decided)
    assert_same_plan(changed)


@pytest.mark.parametrize(
    "edit",
    [
        ("code", 3),
        ("status", 2, 40, "FAILED"),
        ("status", 1, 70, "RUNNING_LIVE"),
        ("status", 1, 70, "RUNNING"),
        ("status", 6, 100, "DEAD_LETTER"),
        ("status", 4, 10, "PARTIAL"),
        ("force", 3, True, 50),
        ("force", 0, False, 0),
        ("epoch",),
        ("scoped", 5),
        ("rerun", 0, 33),
        ("result", 1, 60),
        ("delete", 2, 80),
        ("target", 64),
        ("category", 0),
    ],
)
def test_each_kind_of_change_plans_exactly(edit: tuple[Any, ...]) -> None:
    request, _ = bench_like()
    changed = edited(request.manifest, request.root, [edit], sorted(request.root["p"]))
    assert_same_plan(changed)


# --- the ledger keeps its digests exactly --------------------------------------------------


NOW = dt.datetime(2024, 6, 1, tzinfo=dt.UTC)
DAYS = [dt.date(2024, 1, 25) + dt.timedelta(days=3 * i) for i in range(16)]  # Jan .. Mar


def write(
    calc: str,
    date: dt.date,
    status: str = "COMPLETED",
    result: str | None = "r",
    previous: str | None = None,
    published: bool = True,
    code: str = "c" * 32,
) -> CellWrite:
    return CellWrite(
        calculation=calc,
        date=date,
        status=status,
        category="cat",
        code_hash=code,
        layer_hash="l" * 32,
        infra_hash="i" * 32,
        epoch=0,
        scoped_epoch=0,
        inputs_digest=digest("in", [calc, date.isoformat(), result]),
        upstream_hashes={"up": digest("up", [date.isoformat()])},
        root_hashes={"p": {date.isoformat(): digest("p", [date.isoformat()])}},
        previous_hash=previous,
        result_hash=None if result is None else digest("res", [result]),
        generation=(digest("gen", [calc, date.isoformat(), result]) if published else None),
        users=3,
        run_id="run1",
        error=None if status == "COMPLETED" else "boom",
        attempt={},
    )


def stored_digests(ledger: Ledger) -> dict[tuple[str, int], tuple[Any, ...]]:
    with ledger.engine.connect() as conn:
        rows = conn.execute(select(DIGESTS)).all()
    return {
        (r.calculation, r.bucket): (r.cells, bytes(r.sums or b""), r.dirty, r.format) for r in rows
    }


def rebuilt(ledger: Ledger) -> dict[tuple[str, int], tuple[Any, ...]]:
    """The digests of the ledger's rows computed from scratch (the rows are not touched)."""
    with ledger.engine.begin() as conn:
        before = {tuple(r) for r in conn.execute(select(DIGESTS))}
        conn.execute(DIGESTS.delete())
        from orchestrator.ledger.store import _digest_calculations

        _digest_calculations(conn, None)
        out = {
            (r.calculation, r.bucket): (r.cells, bytes(r.sums or b""), r.dirty, r.format)
            for r in conn.execute(select(DIGESTS))
        }
        conn.execute(DIGESTS.delete())
        if before:
            conn.execute(
                DIGESTS.insert(), [dict(zip(DIGESTS.c.keys(), r, strict=True)) for r in before]
            )
    return out


def reset(ledger: Ledger) -> None:
    with ledger.engine.begin() as conn:
        conn.execute(CELLS.delete())
        conn.execute(DIGESTS.delete())


OPS = st.one_of(
    st.tuples(
        st.just("publish"),
        st.lists(
            st.tuples(
                st.sampled_from(["a", "b"]),
                st.integers(0, len(DAYS) - 1),
                st.sampled_from(["COMPLETED", "FAILED", "PARTIAL", "DEAD_LETTER"]),
                st.sampled_from(["r1", "r2", None]),
                st.booleans(),
            ),
            min_size=1,
            max_size=5,
            unique_by=lambda t: (t[0], t[1]),
        ),
    ),
    st.tuples(st.just("lease"), st.sampled_from(["a", "b"]), st.integers(0, len(DAYS) - 1)),
    st.tuples(st.just("migrate"), st.sampled_from(["a", "b"]), st.integers(0, len(DAYS) - 1)),
    st.tuples(st.just("retry"), st.sampled_from([None, "a"])),
    st.tuples(st.just("restamp"), st.sampled_from(["a", "b"])),
)


def apply(ledger: Ledger, op: tuple[Any, ...]) -> None:
    kind = op[0]
    if kind == "publish":
        writes = [
            write(calc, DAYS[i], status, result, previous=result, published=published)
            for calc, i, status, result, published in op[1]
        ]
        ledger.publish_with_shards(writes, [], NOW)
    elif kind == "lease":
        ledger.lease([(op[1], DAYS[op[2]])], "run2", NOW)
    elif kind == "migrate":
        ledger.migrate_categories([(op[1], DAYS[op[2]], "elsewhere")], [])
    elif kind == "retry":
        ledger.retry_dead_letters(op[1])
    elif kind == "restamp":
        ledger.restamp_code(op[1], "c" * 32, "e" * 32)


@pytest.fixture
def ledger(db_url: str) -> Iterator[Ledger]:
    opened = Ledger.open(db_url)
    yield opened
    opened.dispose()


def test_the_kept_digests_equal_digests_rebuilt_from_the_rows(ledger: Ledger) -> None:
    @settings(
        max_examples=30,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )
    @given(ops=st.lists(OPS, min_size=1, max_size=8))
    def check(ops: list[tuple[Any, ...]]) -> None:
        reset(ledger)
        for op in ops:
            apply(ledger, op)
            kept = stored_digests(ledger)
            assert kept == rebuilt(ledger), op
            assert all(v[2] == 0 for v in kept.values())  # the upkeep's own writes: clean

    check()


def test_a_write_from_elsewhere_is_never_trusted_until_repaired(ledger: Ledger) -> None:
    ledger.publish_with_shards([write("a", d) for d in DAYS], [], NOW)
    assert all(v[2] == 0 for v in stored_digests(ledger).values())
    with ledger.engine.begin() as conn:  # a hand-made fix, outside the ledger's methods
        conn.execute(
            text("UPDATE cells SET result_hash = :h WHERE date = :d"),
            {"h": "f" * 32, "d": DAYS[7]},
        )
    kept = stored_digests(ledger)
    dirty = {k for k, v in kept.items() if v[2]}
    assert dirty == {("a", bucket_of(DAYS[7]))}
    loaded = ledger.load_digests()["a"]
    assert not loaded.clean[list(loaded.buckets).index(bucket_of(DAYS[7]))]
    # renewing leases touches none of the digested columns: nothing dirtied
    ledger.renew_leases("run1", NOW)
    assert {k for k, v in stored_digests(ledger).items() if v[2]} == dirty
    # a repair trusts a month again only if every row of it passes the check
    assert ledger.repair_digests(lambda cell: cell.date != DAYS[7]) == 1
    assert {k for k, v in stored_digests(ledger).items() if v[2]} == dirty
    assert ledger.repair_digests(lambda cell: True) == 1
    assert stored_digests(ledger) == rebuilt(ledger)
    assert all(v[2] == 0 for v in stored_digests(ledger).values())
    assert ledger.repair_digests(lambda cell: True) == 0


def test_a_month_made_by_a_trigger_alone_is_dirty(ledger: Ledger) -> None:
    with ledger.engine.begin() as conn:
        conn.execute(
            CELLS.insert(),
            [
                {
                    "calculation": "x",
                    "date": DAYS[0],
                    "status": "COMPLETED",
                    "category": "cat",
                    "code_hash": "c" * 32,
                    "layer_hash": "l" * 32,
                    "infra_hash": "i" * 32,
                    "epoch": 0,
                    "inputs_digest": "d" * 32,
                    "upstream_hashes": {},
                    "root_hashes": {},
                    "users": 0,
                    "attempts": 0,
                    "hash_format": 1,
                    "updated_at": NOW,
                }
            ],
        )
    assert stored_digests(ledger) == {("x", bucket_of(DAYS[0])): (0, b"", 1, 0)}
    loaded = ledger.load_digests()["x"]
    assert loaded.clean.tolist() == [False]
    ledger.repair_digests(lambda cell: True)
    assert stored_digests(ledger) == rebuilt(ledger)


def test_a_month_of_another_format_is_never_trusted(ledger: Ledger) -> None:
    ledger.publish_with_shards([write("a", d) for d in DAYS], [], NOW)
    assert ledger.load_digests()["a"].clean.all()
    with ledger.engine.begin() as conn:  # as written by a rule of inputs digests since changed
        conn.execute(text("UPDATE calc_digests SET format = 12345"))
    assert not ledger.load_digests()["a"].clean.any()
    ledger.publish_with_shards([write("a", DAYS[0], result="r9")], [], NOW)  # still not
    assert not ledger.load_digests()["a"].clean.any()
    assert ledger.repair_digests(lambda cell: True) == 1
    assert ledger.load_digests()["a"].clean.all()


def test_head_has_the_dirty_triggers(db_url: str) -> None:
    engine = make_engine(db_url)
    upgrade(engine)
    with engine.connect() as conn:
        if engine.dialect.name == "sqlite":
            names = set(
                conn.execute(text("SELECT name FROM sqlite_master WHERE type = 'trigger'"))
                .scalars()
                .all()
            )
            assert {"calc_digests_insert", "calc_digests_update", "calc_digests_delete"} <= names
        else:
            names = set(
                conn.execute(
                    text(
                        "SELECT tgname FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid "
                        "WHERE c.relname = 'cells' AND c.relnamespace = "
                        "(SELECT oid FROM pg_namespace WHERE nspname = current_schema())"
                    )
                )
                .scalars()
                .all()
            )
            assert "calc_digests_mark" in names
    assert "calc_digests" in inspect(engine).get_table_names()
    engine.dispose()


def test_0006_records_existing_months_unverified_and_a_run_checks_their_rows(
    db_url: str,
) -> None:
    engine = make_engine(db_url)
    upgrade(engine, "0005")
    a = spec("a", deps=("u",), roots=("p",), historical=True)
    decider = Decider(PlanRequest(Manifest.build([spec("u"), a]), {}, {}, 0, DAYS[-1]))
    rows = []
    for calc in ("a", "b"):
        for i, day in enumerate(DAYS):
            row = {
                "calculation": calc,
                "date": day,
                "status": "COMPLETED" if i % 5 else "FAILED",
                "category": "cat",
                "code_hash": "c" * 32,
                "layer_hash": "l" * 32,
                "infra_hash": "i" * 32,
                "epoch": 0,
                "scoped_epoch": 0,
                "inputs_digest": "d" * 32,
                "upstream_hashes": json.dumps({"u": digest("u", [i])}),
                "root_hashes": json.dumps({"p": {day.isoformat(): digest("p", [i])}}),
                "previous_hash": digest("r", [calc, i - 1]) if i else None,
                "result_hash": digest("r", [calc, i]),
                "users": 0,
                "attempts": 0,
                "hash_format": 1,
                "updated_at": dt.datetime(2024, 6, 1),
            }
            if calc == "a":  # a's rows were written by the current rule; b's by no rule
                cell = LedgerCell(
                    "a", day, "", "", None, "", "", "", "", "", 0, 0,
                    row["upstream_hashes"], row["root_hashes"], row["previous_hash"], 0, None,
                )  # fmt: skip
                row["inputs_digest"] = decider.stored_digest(a, cell)
            rows.append(row)
    with engine.begin() as conn:
        columns = ", ".join(rows[0])
        values = ", ".join(f":{k}" for k in rows[0])
        conn.execute(text(f"INSERT INTO cells ({columns}) VALUES ({values})"), rows)
    upgrade(engine)
    engine.dispose()
    opened = Ledger.open(db_url)
    try:
        months = {bucket_of(d) for d in DAYS}
        kept = stored_digests(opened)
        assert set(kept) == {(c, m) for c in "ab" for m in months}
        assert all(v[2] == 1 for v in kept.values())  # unverified
        assert sum(v[0] for v in kept.values()) == 2 * len(DAYS)
        assert not any(d.clean.any() for d in opened.load_digests().values())
        assert opened.repair_digests(row_verifier(Manifest.build([spec("u"), a]))) == 2
        loaded = opened.load_digests()
        assert loaded["a"].clean.all() and not loaded["b"].clean.any()
        assert_digests_equal(loaded["a"], digests_of(opened.load_cells(["a"]))["a"])
    finally:
        opened.dispose()
    engine = make_engine(db_url)
    downgrade(engine, "0005")
    assert "calc_digests" not in inspect(engine).get_table_names()
    engine.dispose()


def test_the_formula_canary_is_stable_and_stamped() -> None:
    assert formula_canary() == formula_canary()
    assert current_format() == current_format() > 0


def assert_digests_equal(a: CalcDigests, b: CalcDigests) -> None:
    for field in ("buckets", "cells", "inputs", "results", "chain", "clean"):
        assert getattr(a, field).tolist() == getattr(b, field).tolist(), field


# --- end to end: plan, why and run, from the digests and from every cell ------------------

CALCS = """
from orchestrator import MetaCalculation, StandardCalculation


class PriceExtractor(StandardCalculation):
    name = "price_extractor"
    category = "prices"
    root_data = ["prices"]

    def process(self, ctx):
        return {"close": ctx.root["prices"][0]["close"]}


class Mean(StandardCalculation):
    name = "mean"
    category = "signals"
    root_data = ["prices"]
    lookback = 3

    def process(self, ctx):
        closes = [r["close"] for r in ctx.root["prices"]]
        return {"mean": sum(closes) / len(closes)}


class Trend(StandardCalculation):
    name = "trend"
    category = "signals"
    dependencies = ["price_extractor"]
    historical = True

    def process(self, ctx):
        prev = ctx.previous or {"ups": 0, "last": None}
        now = ctx.upstream["price_extractor"]["close"]
        up = prev["last"] is not None and now > prev["last"]
        return {"ups": prev["ups"] + int(up), "last": now}


class Board(MetaCalculation):
    name = "board"
    category = "market"
    dependencies = ["trend", "mean"]

    def process(self, ctx):
        return {"n": len(ctx.upstream["trend"]), "m": len(ctx.upstream["mean"])}
"""
NAMES = ["price_extractor", "mean", "trend", "board"]
SYMBOLS = ["AAA", "BBB"]
E2E_DATES = weekdays(dt.date(2024, 1, 24), 14)  # late January .. February
NEXT = weekdays(E2E_DATES[-1] + dt.timedelta(days=1), 1)[0]


@contextmanager
def full_plan() -> Iterator[None]:
    old = os.environ.get("ORCHESTRATOR_FULL_PLAN")
    os.environ["ORCHESTRATOR_FULL_PLAN"] = "1"
    try:
        yield
    finally:
        if old is None:
            del os.environ["ORCHESTRATOR_FULL_PLAN"]
        else:
            os.environ["ORCHESTRATOR_FULL_PLAN"] = old


def both(project: Project, target: dt.date, **kw: Any) -> tuple[Plan, Plan]:
    """The plan of ``Orchestrator`` from its digests and from every cell, same sitting."""
    plans = []
    for full in (False, True):
        orch = project.orchestrator()
        try:
            with full_plan() if full else nullcontext():
                now = dt.datetime.now(dt.UTC)
                request = orch.request(orch.observe(now), target, **kw)
                plan, _ = plan_with(request, orch.observe_more, orch.ledger)
                if not full:
                    dict(plan.decisions.items())  # read its hashes while the ledger is open
                plans.append(plan)
        finally:
            orch.close()
    return plans[0], plans[1]


def assert_both_agree(project: Project, target: dt.date, **kw: Any) -> Plan:
    ours, theirs = both(project, target, **kw)
    assert isinstance(ours.decisions, DigestDecisions)
    assert not isinstance(theirs.decisions, DigestDecisions)
    assert dict(ours.decisions.items()) == dict(theirs.decisions.items())
    assert ours.counts() == theirs.counts() and list(ours.order) == list(theirs.order)
    for fmt in ("json", "text"):
        assert render(ours, fmt) == render(theirs, fmt)
    return ours


def why_both(project: Project, calc: str, date: dt.date) -> None:
    results = []
    for full in (False, True):
        orch = project.orchestrator()
        try:
            with full_plan() if full else nullcontext():
                decision, stored, parts = orch.why(calc, date)
                results.append((decision, stored, parts))
        finally:
            orch.close()
    assert results[0] == results[1]


def test_plan_why_and_run_agree_with_the_full_path_after_each_change(project: Project) -> None:
    rows = price_rows(SYMBOLS, E2E_DATES)
    project.write_prices(rows)
    project.write_calcs(CALCS)
    target = E2E_DATES[-1]
    assert project.run(target).ok

    # the no-op: nothing read, all up to date
    plan = assert_both_agree(project, target)
    assert plan.counts()["SKIPPED"] == 4 * len(E2E_DATES)
    why_both(project, "trend", E2E_DATES[5])

    # a new date: its month decided cell by cell, the rest proven
    grown = price_rows(SYMBOLS, [*E2E_DATES, NEXT])
    project.write_prices(grown)
    plan = assert_both_agree(project, NEXT)
    assert plan.reason_counts() == {"NEW": 4, "UP_TO_DATE": 4 * len(E2E_DATES)}
    assert project.run(NEXT).ok
    assert_both_agree(project, NEXT)

    # root data corrected on one date
    fixed = [dict(r) for r in grown]
    fixed[3]["close"] = float(fixed[3]["close"]) + 5
    project.write_prices(fixed)
    plan = assert_both_agree(project, NEXT)
    assert plan.reason_counts().get("ROOT_DATA_CHANGED")
    why_both(project, "mean", dt.date.fromisoformat(fixed[3]["date"]))
    assert project.run(NEXT).ok
    assert_both_agree(project, NEXT)

    # a code edit
    project.write_calcs(CALCS.replace("now > prev", "now >= prev"))
    plan = assert_both_agree(project, NEXT)
    assert plan.reason_counts().get("CODE_CHANGED") == len(E2E_DATES) + 1
    assert project.run(NEXT).ok

    # forcing a range, a scoped and a global epoch bump
    assert_both_agree(project, NEXT, force=["mean"], force_range=(E2E_DATES[4], E2E_DATES[6]))
    orch = project.orchestrator()
    orch.bump_epoch("mean", "recompute")
    orch.close()
    assert assert_both_agree(project, NEXT).reason_counts()["EPOCH_CHANGED"] == len(E2E_DATES) + 1
    (project.root / "system_epoch.py").write_text("SYSTEM_EPOCH = 7\n")
    assert assert_both_agree(project, NEXT).reason_counts()["EPOCH_CHANGED"] == 4 * (
        len(E2E_DATES) + 1
    )
    assert project.run(NEXT).ok
    assert_both_agree(project, NEXT)

    # a lease left by a dead run (a zombie), then a failed cell
    orch = project.orchestrator()
    orch.ledger.lease([("trend", E2E_DATES[8])], "deadbeef" * 4, dt.datetime.now(dt.UTC))
    orch.close()
    plan = assert_both_agree(project, NEXT)
    assert plan.decisions[("trend", E2E_DATES[8])].reason is Reason.ZOMBIE_RECOVERED
    assert project.run(NEXT).ok
    broken = [dict(r) for r in fixed]
    broken[9]["close"] = "not a number"
    project.write_prices(broken)
    assert not project.run(NEXT).ok
    project.write_prices(fixed)
    assert_both_agree(project, NEXT)
    why_both(project, "board", E2E_DATES[4])
    assert project.run(NEXT).ok
    plan = assert_both_agree(project, NEXT)
    assert plan.counts()["SKIPPED"] == 4 * (len(E2E_DATES) + 1)

    # digests stamped by another rule of inputs digests: nothing trusted, the same plan;
    # the next run checks every row and trusts the months again
    orch = project.orchestrator()
    with orch.ledger.engine.begin() as conn:
        conn.execute(text("UPDATE calc_digests SET format = 12345"))
    orch.close()
    plan = assert_both_agree(project, NEXT)
    assert len(plan.decisions.explicit) == 4 * (len(E2E_DATES) + 1)  # type: ignore[attr-defined]
    assert project.run(NEXT).ok
    orch = project.orchestrator()
    assert all(d.clean.all() for d in orch.ledger.load_digests().values())
    # a hand-made edit of an inputs digest: its month is checked and stays untrusted until
    # the cell is computed again (the full rule sees the digest differ)
    with orch.ledger.engine.begin() as conn:
        conn.execute(
            text("UPDATE cells SET inputs_digest = :d WHERE calculation = 'mean' AND date = :day"),
            {"d": "0" * 32, "day": E2E_DATES[2]},
        )
    orch.close()
    plan = assert_both_agree(project, NEXT)
    assert plan.decisions[("mean", E2E_DATES[2])].reason is Reason.UPSTREAM_CHANGED
    assert project.run(NEXT).ok
    assert assert_both_agree(project, NEXT).counts()["RUNNABLE"] == 0
    assert project.run(NEXT).ok  # checks the rewritten month and trusts it again
    orch = project.orchestrator()
    assert all(d.clean.all() for d in orch.ledger.load_digests().values())
    orch.close()

    # an earlier target (what ``why`` plans): the month holding it is read
    assert_both_agree(project, E2E_DATES[6])


def test_an_empty_date_axis_has_no_months() -> None:
    from orchestrator.planning import _Axis

    axis = _Axis([])
    assert axis.nb == 0 and axis.bounds == [] and axis.month_of == []
