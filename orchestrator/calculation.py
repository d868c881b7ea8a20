"""The user-facing calculation API: base classes and the contexts ``process`` receives.

A calculation is a class with metadata as class attributes and a ``process(self, ctx)`` method:

* ``StandardCalculation`` — called once per streamed user (account, instrument) and date;
  returns that user's result (a flat dict of JSON values) or ``None`` for "no result".
* ``MetaCalculation`` — called once per date over whole upstream results and root data;
  returns a dict of JSON values.

Metadata (all optional except ``process``):

``name``           unique name (default: the class name)
``category``       result namespace, e.g. ``"signals"`` (default ``"default"``)
``dependencies``   names of calculations whose same-date results this one reads
``root_data``      names of root datasets (``[root_data.NAME]`` in the config) it reads
``historical``     needs its own result of the previous available date (``ctx.previous``);
                   its dates therefore run in order
``lookback``       number of available dates of root history in ``ctx.history`` (default 1)
``earliest_date``  ISO date string; earlier dates are IMPOSSIBLE (BEFORE_EARLIEST)
``product_lines``  labels used to slice the manifest
``max_failure_rate`` fraction of users allowed to fail before the cell fails (default 0.10);
                   the circuit breaker aborts a cell early once ``breaker_min_users``
                   (default 100) users were processed and more than that fraction failed
``allow_nan``, ``max_null_fraction``, ``nullable``, ``flatline_min_users``, ``flatline_ok``
                   validation before publishing (see ``validation.py``): NaN/Inf rejected,
                   a field null for more than 50 % of users rejected unless ``nullable``, a
                   float field constant across 50+ users rejected unless ``flatline_ok``
``cosmetic_verdict`` how a code change may be judged cosmetic (skipped, not re-run):
                   ``"proof"`` — only when the code is equal up to renamed local variables,
                   proven from the AST without running anything (``equivalence.py``);
                   ``"simulation"`` — also when the simulation on a fabricated world gives
                   the same outputs, every new statement ran there, and no literal,
                   operator, comparison or called name changed: a heuristic, opt-in, as a
                   simulation can show that behaviour changed but never that it did not.
                   Default ``None``: the config's ``cosmetic_verdict`` ("proof").
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

Row = dict[str, Any]
Result = dict[str, Any]


class Calculation:
    """Common metadata of both calculation kinds. Subclass one of the two kinds, not this."""

    name: ClassVar[str] = ""
    category: ClassVar[str] = "default"
    dependencies: ClassVar[Sequence[str]] = ()
    root_data: ClassVar[Sequence[str]] = ()
    historical: ClassVar[bool] = False
    lookback: ClassVar[int] = 1
    earliest_date: ClassVar[str | None] = None
    product_lines: ClassVar[Sequence[str]] = ()
    max_failure_rate: ClassVar[float] = 0.10
    breaker_min_users: ClassVar[int] = 100
    cosmetic_verdict: ClassVar[str | None] = None
    allow_nan: ClassVar[bool] = False
    max_null_fraction: ClassVar[float | None] = 0.5
    nullable: ClassVar[Sequence[str]] = ()
    flatline_min_users: ClassVar[int | None] = 50
    flatline_ok: ClassVar[Sequence[str]] = ()
    kind: ClassVar[str] = ""

    def process(self, ctx: Any) -> Result | None:  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__}.process(ctx) is not implemented")


class StandardCalculation(Calculation):
    """A per-user calculation. ``process(ctx: StandardContext) -> dict | None``."""

    kind = "standard"


class MetaCalculation(Calculation):
    """A per-date calculation. ``process(ctx: MetaContext) -> dict``."""

    kind = "meta"


@dataclass(slots=True)
class StandardContext:
    """What a standard calculation sees for one user on one date.

    Attributes:
        date: the cell's date.
        user: the streamed user's id, as a string.
        root: dataset name -> this user's rows on ``date`` (each a dict column -> value;
            numbers parsed, empty fields ``None``). Empty list when the user has no row.
        history: dataset name -> this user's rows over the last ``lookback`` available dates
            of the dataset up to and including ``date``, oldest first.
        upstream: dependency name -> this user's result of that standard dependency on
            ``date`` (``None`` if it has none); for a meta dependency, its whole result.
        previous: this calculation's own result for the user on the previous available date
            when ``historical``; else ``None``.
    """

    date: dt.date
    user: str
    root: Mapping[str, list[Row]]
    history: Mapping[str, list[Row]]
    upstream: Mapping[str, Any]
    previous: Result | None


@dataclass(slots=True)
class MetaContext:
    """What a meta calculation sees for one date.

    Attributes:
        date: the cell's date.
        root: dataset name -> all rows of ``date``.
        upstream: dependency name -> for a standard dependency, a mapping user -> result;
            for a meta dependency, its result dict.
        previous: own result of the previous available date when ``historical``, else None.
    """

    date: dt.date
    root: Mapping[str, list[Row]]
    upstream: Mapping[str, Any]
    previous: Result | None
