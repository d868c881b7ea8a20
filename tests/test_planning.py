"""The planner as a pure function: fast path versus the rule, window digests, slim snapshots.

These tests need no database: the ledger snapshot is built in memory, exactly as
``Ledger.load_cells`` returns it.
"""

from __future__ import annotations

import datetime as dt
import json

import pytest

from orchestrator.fingerprint import digest
from orchestrator.ledger.store import LedgerCell, SlimCell, build_key
from orchestrator.manifest import CalcSpec, Manifest
from orchestrator.planning import (
    Decider,
    MoreObservation,
    PlanRequest,
    Reason,
    Status,
    Upstream,
    make_plan,
    plan_with,
)

DAYS = [dt.date(2024, 1, 1) + dt.timedelta(days=i) for i in range(30)]


def spec(
    name: str,
    deps: tuple[str, ...] = (),
    roots: tuple[str, ...] = (),
    historical=False,
    lookback: int = 1,
    code: str = "c" * 32,
) -> CalcSpec:
    return CalcSpec(
        name=name,
        kind="standard",
        category="cat",
        dependencies=deps,
        root_data=roots,
        historical=historical,
        lookback=lookback,
        earliest_date=None,
        product_lines=(),
        max_failure_rate=0.1,
        code_hash=code,
        cls=object,  # type: ignore[arg-type]
    )


MANIFEST = Manifest.build(
    [
        spec("a", roots=("p",), lookback=3),
        spec("b", deps=("a",), historical=True),
        spec("c", deps=("a", "b"), roots=("p",)),
    ]
)
ROOT = {"p": {d: digest("day", d.isoformat()) for d in DAYS if d.weekday() < 5}}


def request(ledger, **kw) -> PlanRequest:
    return PlanRequest(
        manifest=kw.pop("manifest", MANIFEST),
        ledger=ledger,
        root=kw.pop("root", ROOT),
        epoch=1,
        target=DAYS[-1],
        **kw,
    )


def completed_ledger(req: PlanRequest, slim: bool) -> dict:
    """The ledger a successful run of ``req`` leaves: every cell COMPLETED, fake results."""
    decider = Decider(req)
    out: dict = {}
    hashes: dict = {}
    for key in make_plan(req).order:
        name, date = key
        if key in decider.impossible:
            continue
        s = MANIFEST.calcs[name]
        inputs = decider.inputs(s, date, hashes.get)
        result = digest("fake", [name, date.isoformat()])
        hashes[key] = result
        build = build_key("COMPLETED", s.category, s.code_hash, s.layer_hash, s.infra_hash, 1)
        cell = (
            SlimCell(name, date, build, inputs.digest, result)
            if slim
            else LedgerCell(
                name,
                date,
                build,
                inputs.digest,
                result,
                "COMPLETED",
                s.category,
                s.code_hash,
                s.layer_hash,
                s.infra_hash,
                1,
                0,
                json.dumps(inputs.upstream),
                json.dumps(inputs.root),
                inputs.previous_hash,
                0,
                None,
            )
        )
        out.setdefault(name, {})[date] = cell
    return out


def slow_plan(req: PlanRequest) -> dict:
    """Every cell through ``Decider.decide`` alone: the reference for the columnar fast path."""
    decider = Decider(req)
    decisions: dict = {}

    def state(key):
        d = decisions.get(key)
        if d is None:
            stored = req.ledger.get(key[0], {}).get(key[1])
            return (Upstream.READY, stored.result_hash if stored else None)
        if d.status is Status.SKIPPED:
            return (Upstream.READY, d.result_hash)
        if d.status is Status.IMPOSSIBLE:
            return (Upstream.IMPOSSIBLE, None)
        return (Upstream.PENDING, None)

    for date in decider.dates:
        for name in MANIFEST.order:
            stored = req.ledger.get(name, {}).get(date)
            decisions[(name, date)] = decider.decide(MANIFEST.calcs[name], date, stored, state)
    return decisions


def test_unchanged_ledger_plans_all_up_to_date_and_matches_the_rule() -> None:
    ledger = completed_ledger(request({}), slim=False)
    req = request(ledger)
    plan = make_plan(req)
    reasons = {d.reason for d in plan.decisions.values()}
    assert reasons == {Reason.UP_TO_DATE}  # the "data" calendar has no weekends
    assert plan.counts()["SKIPPED"] == 3 * len(ROOT["p"])
    assert plan.decisions == slow_plan(req)


@pytest.mark.parametrize("change", ["root", "code", "force"])
def test_fast_path_agrees_with_the_rule_after_a_change(change: str) -> None:
    ledger = completed_ledger(request({}), slim=False)
    kwargs: dict = {}
    if change == "root":
        root = {"p": dict(ROOT["p"])}
        root["p"][DAYS[10]] = digest("day", "corrected")
        kwargs["root"] = root
    elif change == "code":
        kwargs["manifest"] = Manifest.build(
            [
                s if s.name != "a" else spec("a", roots=("p",), lookback=3, code="d" * 32)
                for s in MANIFEST.calcs.values()
            ]
        )
    else:
        kwargs["force"] = frozenset({"b"})
        kwargs["force_range"] = (DAYS[5], DAYS[8])
    req = request(ledger, **kwargs)
    if change == "code":  # slow_plan reads MANIFEST; compare reasons where it applies
        plan = make_plan(req)
        assert {plan.decisions[("a", d)].reason for d in ROOT["p"]} == {Reason.CODE_CHANGED}
        assert {plan.decisions[("b", d)].reason for d in ROOT["p"]} == {Reason.WAITING_ON_UPSTREAM}
        return
    plan = make_plan(req)
    assert plan.decisions == slow_plan(req)
    if change == "root":
        # a reads a 3-date window: the corrected date and the next two available dates.
        changed = sorted(
            d
            for (n, d), x in plan.decisions.items()
            if n == "a" and x.reason is Reason.ROOT_DATA_CHANGED
        )
        assert changed == sorted(ROOT["p"])[sorted(ROOT["p"]).index(DAYS[10]) :][:3]
    else:
        forced = sorted(d for (n, d), x in plan.decisions.items() if x.reason is Reason.FORCED)
        assert forced == [d for d in sorted(ROOT["p"]) if DAYS[5] <= d <= DAYS[8]]


def test_window_digest_equals_the_digest_of_the_window_mapping() -> None:
    decider = Decider(request({}))
    for lookback in (1, 3, 7):
        for date in DAYS:
            assert decider._window_digest("p", lookback, date) == digest(
                "window", decider.window("p", lookback, date)
            )


def test_slim_snapshot_plans_the_noop_alone_and_reloads_only_what_changed() -> None:
    full = completed_ledger(request({}), slim=False)
    slim = completed_ledger(request({}), slim=True)
    plan, _ = plan_with(request(slim), lambda names: pytest.fail("no reload needed"))
    assert plan.counts()["RUNNABLE"] == 0 and not plan.needs_full

    root = {"p": dict(ROOT["p"])}
    root["p"][DAYS[15]] = digest("day", "corrected")
    asked: list[set[str]] = []

    def full_rows(names: set[str]) -> MoreObservation:
        asked.append(set(names))
        return MoreObservation({n: full[n] for n in names}, {}, {})

    plan, _ = plan_with(request(slim, root=root), full_rows)
    assert asked == [{"a", "b", "c"}]
    assert plan.decisions == make_plan(request(full, root=root)).decisions
    assert any(d.reason is Reason.ROOT_DATA_CHANGED for d in plan.decisions.values())
