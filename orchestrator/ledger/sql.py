"""SQL expressions the ledger's modules share."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from typing import Any

from sqlalchemy import ColumnElement, Table, and_, bindparam, delete, false, or_

from orchestrator.ledger.models import SHARDS


def cells_in(table: Table, cells: Iterable[tuple[str, dt.date]]) -> ColumnElement[bool]:
    """``(calculation, date) IN cells`` written as an OR over calculations of ``date IN
    (...)``: SQLite uses no index for a row-value IN list (it scans the table, measured: a
    catch-up re-run 40 s slower), but searches its index for each term of this form."""
    by_calc: dict[str, list[dt.date]] = {}
    for calc, date in cells:
        by_calc.setdefault(calc, []).append(date)
    if not by_calc:
        return false()
    return or_(
        *(
            and_(table.c.calculation == calc, table.c.date.in_(dates))
            for calc, dates in by_calc.items()
        )
    )


def same_generation(a: Any, b: Any) -> ColumnElement[bool]:
    """Rows of ``a`` and ``b`` (tables or aliases) naming the same generation of the same cell (calculation,
    date, generation): a shard and the published cell or retained result it belongs to."""
    return and_(
        a.c.calculation == b.c.calculation,
        a.c.date == b.c.date,
        a.c.generation == b.c.generation,
    )


# The shards of one generation of a cell (executemany parameters b_calc, b_date, b_gen).
DELETE_SHARDS_OF = delete(SHARDS).where(
    SHARDS.c.calculation == bindparam("b_calc"),
    SHARDS.c.date == bindparam("b_date"),
    SHARDS.c.generation == bindparam("b_gen"),
)
