"""SQL expressions the ledger's modules share."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable

from sqlalchemy import ColumnElement, Table, and_, false, or_


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
