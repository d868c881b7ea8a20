"""Retained results: published results kept by fingerprint after a later one superseded them.

A build system with *constructive traces* (Mokhov, Mitchell and Peyton Jones, "Build
Systems à la Carte", 2018, section 4.3) stores every result under the fingerprint it was
built from, not only the last one, so that returning to an earlier state (a reverted code
change, data correction or epoch) finds its result instead of recomputing it. Here the
fingerprint of a cell's result is its own parts (code, layer and infra hashes, system and
scoped epoch) and its inputs digest (upstream results, root windows, previous result);
the result itself is the shards of one generation.

When ``Ledger._publish`` supersedes a clean result, it keeps that result's shards and
records a ``retained_results`` row (``retained_row``) instead of deleting them; each cell
keeps at most ``keep`` of them, newest first (``record``). The planner re-points a cell
whose current fingerprint equals a retained one (``planning.Reason.REUSED``); the publish
that re-points it retains the result it replaces in turn. ``orchestrator gc`` prunes by
count and age (``prunable``), never a current result.

Only clean results are retained — the last attempt clean, no failed users — so a reused
result is exactly what computing the cell again would publish.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from sqlalchemy import Connection, and_, bindparam, delete, func, insert, or_, select, true

from orchestrator.ledger.models import ATTEMPTS, CELLS, RETAINED, SHARDS
from orchestrator.ledger.sql import DELETE_SHARDS_OF, cells_in, same_generation

# The default number of retained results per cell (config ``retain_results``).
DEFAULT_KEEP = 3
# Up to this many dates of one calculation are looked up by date (``load``).
_DATES_IN_SQL = 500


class Retained(NamedTuple):
    """One retained result of a cell and the fingerprint it was computed from.

    Attributes:
        generation: names its shards (``result_shards.generation``).
        result_hash: its hash (32 hex), what dependents' inputs digests are made of.
        inputs_digest / code_hash / layer_hash / infra_hash / epoch / scoped_epoch: the
            fingerprint; a cell is re-pointed to it only when all six equal the current ones
            (the code hash, or a code hash the proof calls cosmetically equal to it).
        users: users in the result.
        run_id: the run that computed it (None if unknown).
        computed_at / retained_at: when it was published / superseded (UTC).
    """

    generation: str
    result_hash: str
    inputs_digest: str
    code_hash: str
    layer_hash: str
    infra_hash: str
    epoch: int
    scoped_epoch: int
    users: int
    run_id: str | None
    computed_at: dt.datetime
    retained_at: dt.datetime


# A calculation's own fingerprint parts now but its code (which may differ cosmetically):
# layer and infra hashes, system epoch, scoped epoch.
OwnParts = tuple[str, str, int, int]


def retainable(row: Any) -> bool:
    """Whether a stored cell row's published result may be retained when superseded: it has
    one, and it is clean (its last attempt clean — ``attempts`` 0 — with no failed users).
    ``row`` has the ``cells`` columns generation, result_hash, attempts, users_failed."""
    return bool(
        row.generation
        and row.result_hash is not None
        and row.attempts == 0
        and not row.users_failed
    )


def retained_row(row: Any, now: dt.datetime) -> dict[str, Any]:
    """The ``retained_results`` row of a stored cell's published result superseded at
    ``now`` (``row``: the ``cells`` columns of ``Retained`` plus calculation, date and
    updated_at)."""
    return {
        "calculation": row.calculation,
        "date": row.date,
        "generation": row.generation,
        "result_hash": row.result_hash,
        "inputs_digest": row.inputs_digest,
        "code_hash": row.code_hash,
        "layer_hash": row.layer_hash,
        "infra_hash": row.infra_hash,
        "epoch": row.epoch,
        "scoped_epoch": row.scoped_epoch,
        "users": row.users,
        "computed_at": row.updated_at,
        "retained_at": now,
    }


class Entry(NamedTuple):
    """What the retention policy looks at of one retained result."""

    id: int
    calculation: str
    date: dt.date
    generation: str
    retained_at: dt.datetime


def prunable(
    entries: Iterable[Entry],
    keep: int,
    older_than: dt.timedelta | None = None,
    now: dt.datetime | None = None,
) -> list[Entry]:
    """The retained results the policy lets go: per cell, all but its ``keep`` newest
    (by ``retained_at``, then id), and with ``older_than`` also those retained longer ago
    than that before ``now``. In id order.

    Raises:
        ValueError: ``keep`` negative, or ``older_than`` without ``now``.
    """
    if keep < 0:
        raise ValueError(f"keep must be 0 or more, not {keep}")
    if older_than is not None and now is None:
        raise ValueError("older_than needs now")
    by_cell: dict[tuple[str, dt.date], list[Entry]] = {}
    for e in entries:
        by_cell.setdefault((e.calculation, e.date), []).append(e)
    out = []
    for cell in by_cell.values():
        cell.sort(key=lambda e: (e.retained_at, e.id), reverse=True)
        for rank, e in enumerate(cell):
            if rank >= keep or (
                older_than is not None and now is not None and now - e.retained_at > older_than
            ):
                out.append(e)
    return sorted(out)


_DELETE_RETAINED_OF = delete(RETAINED).where(
    RETAINED.c.calculation == bindparam("b_calc"),
    RETAINED.c.date == bindparam("b_date"),
    RETAINED.c.generation == bindparam("b_gen"),
)


def _entries(conn: Connection, where: Any) -> list[Entry]:
    return [
        Entry(*row)
        for row in conn.execute(
            select(
                RETAINED.c.id,
                RETAINED.c.calculation,
                RETAINED.c.date,
                RETAINED.c.generation,
                RETAINED.c.retained_at,
            ).where(where)
        )
    ]


def drop(conn: Connection, entries: Sequence[Entry]) -> None:
    """Delete retained results, rows and shards, on an open transaction."""
    if not entries:
        return
    params = [{"b_calc": e.calculation, "b_date": e.date, "b_gen": e.generation} for e in entries]
    conn.execute(_DELETE_RETAINED_OF, params)
    conn.execute(DELETE_SHARDS_OF, params)


def record(
    conn: Connection,
    retained: Sequence[Mapping[str, Any]],
    reclaimed: Sequence[Mapping[str, Any]],
    keep: int,
) -> None:
    """On ``_publish``'s transaction: forget the retained rows of results made current
    again (``reclaimed``: b_calc, b_date, b_gen; their shards stay, now published), record
    the superseded results ``retained``, and drop what each of their cells holds past its
    ``keep`` newest."""
    if reclaimed:
        conn.execute(_DELETE_RETAINED_OF, list(reclaimed))
    if not retained:
        return
    conn.execute(insert(RETAINED), list(retained))
    cells = {(r["calculation"], r["date"]) for r in retained}
    held = _entries(conn, cells_in(RETAINED, cells))
    drop(conn, prunable(held, keep))


def load(
    conn: Connection,
    cells: Iterable[tuple[str, dt.date]],
    parts: Mapping[str, OwnParts],
) -> dict[tuple[str, dt.date], tuple[Retained, ...]]:
    """The retained results of ``cells`` whose own parts but code equal their calculation's
    current ``parts`` (the only ones a cell could be re-pointed to; the code is compared by
    the planner, which knows which old code is cosmetically equal), as (calculation, date)
    -> results, newest first. One query."""
    wanted: dict[str, set[dt.date]] = {}
    for name, date in cells:
        if name in parts:
            wanted.setdefault(name, set()).add(date)
    if not wanted:
        return {}
    where = or_(
        *(
            and_(
                RETAINED.c.calculation == name,
                RETAINED.c.layer_hash == parts[name][0],
                RETAINED.c.infra_hash == parts[name][1],
                RETAINED.c.epoch == parts[name][2],
                RETAINED.c.scoped_epoch == parts[name][3],
                # A few dates (a nightly's new date): searched on the index; many (a
                # catch-up, a re-run): the calculation's rows, dates filtered below.
                RETAINED.c.date.in_(sorted(dates)) if len(dates) <= _DATES_IN_SQL else true(),
            )
            for name, dates in wanted.items()
        )
    )
    out: dict[tuple[str, dt.date], list[Retained]] = {}
    # The run that computed it: the COMPLETED attempt that published its generation (none
    # for a result published before migration 0007).
    computing = and_(same_generation(ATTEMPTS, RETAINED), ATTEMPTS.c.status == "COMPLETED")
    columns = [
        RETAINED.c[name]
        for name in Retained._fields
        if name not in ("run_id", "computed_at", "retained_at")
    ]
    rows = conn.execute(
        select(
            RETAINED.c.calculation,
            RETAINED.c.date,
            *columns,
            ATTEMPTS.c.run_id,
            func.coalesce(ATTEMPTS.c.finished_at, RETAINED.c.computed_at),
            RETAINED.c.retained_at,
        )
        .select_from(RETAINED.outerjoin(ATTEMPTS, computing))
        .where(where)
        .order_by(RETAINED.c.retained_at.desc(), RETAINED.c.id.desc())
    )
    for row in rows:
        if row[1] in wanted[row[0]]:
            out.setdefault((row[0], row[1]), []).append(Retained._make(row[2:]))
    return {key: tuple(found) for key, found in out.items()}


@dataclass(frozen=True, slots=True)
class GcReport:
    """What ``gc`` pruned (or would, with ``dry_run``): retained results and their shards'
    compressed bytes; what stays retained; orphaned shards removed (of crashed attempts)."""

    pruned: int
    pruned_bytes: int
    kept: int
    orphans: int
    dry_run: bool


def gc(
    conn: Connection,
    keep: int,
    older_than: dt.timedelta | None,
    now: dt.datetime,
    dry_run: bool,
) -> tuple[list[Entry], int, int]:
    """On an open transaction: the retained results ``prunable`` lets go, their shards'
    compressed bytes and how many stay; deleted unless ``dry_run``. A retained row whose
    generation is its cell's current one (never written so; by hand only) is kept and its
    row alone dropped: a current result is never pruned."""
    current = same_generation(CELLS, RETAINED)
    if not dry_run:
        conn.execute(delete(RETAINED).where(select(CELLS.c.id).where(current).exists()))
    entries = _entries(conn, ~select(CELLS.c.id).where(current).exists())
    chosen = prunable(entries, keep, older_than, now)
    size = 0
    for start in range(0, len(chosen), 200):
        part = chosen[start : start + 200]
        size += int(
            conn.execute(
                select(func.coalesce(func.sum(func.length(SHARDS.c.data)), 0)).where(
                    or_(
                        *(
                            and_(
                                SHARDS.c.calculation == e.calculation,
                                SHARDS.c.date == e.date,
                                SHARDS.c.generation == e.generation,
                            )
                            for e in part
                        )
                    )
                )
            ).scalar_one()
        )
    if not dry_run:
        drop(conn, chosen)
    return chosen, size, len(entries) - len(chosen)
