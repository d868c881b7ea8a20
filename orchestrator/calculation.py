"""The user-facing calculation API: base classes, the contexts ``process`` receives, and the
``Frame`` a columnar ``compute`` receives.

A calculation is a class with metadata as class attributes and a ``process(self, ctx)`` method
(the per-user form), a ``compute(self, frame)`` method (the columnar form), or both:

* ``StandardCalculation`` — called once per streamed user (account, instrument) and date;
  returns that user's result (a flat dict of JSON values) or ``None`` for "no result".
* ``MetaCalculation`` — called once per date over whole upstream results and root data;
  returns a dict of JSON values.

The columnar form computes a *block* — many dates × many users — in one call with NumPy:
``compute(frame: Frame) -> dict[str, ndarray]``, each output field an array of shape
``(len(frame.dates), len(frame.users))`` (standard) or ``(len(frame.dates),)`` (meta). Where a
calculation defines both, the engine uses ``compute`` (config ``columnar = false`` forces
``process``), and both must give the same results, hence the same result hashes: the code
hash covers both methods, the form does not enter any fingerprint. Users without a row on a
date get no result, exactly as ``process`` is not called for them.

Metadata (all optional except ``process`` or ``compute``):

``name``           unique name (default: the class name)
``category``       result namespace, e.g. ``"signals"`` (default ``"default"``)
``dependencies``   names of calculations whose same-date results this one reads; or a dict
                   name -> window: the number of that dependency's dates, up to and
                   including the cell's, it reads (``{"returns": 20}``: a 20-date window of
                   returns). The cell's fingerprint holds the result hash of every date in
                   the window. Per user, ``ctx.upstream[name]`` is then the user's results
                   on those dates, oldest first (None where it has none); columnar,
                   ``frame.upstream(name, field)`` spans the window (``upstream_rows``)
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
    dependencies: ClassVar[Sequence[str] | Mapping[str, int]] = ()
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


class Frame:
    """What a columnar calculation's ``compute(frame)`` sees: one block of dates × users.

    Arrays are NumPy, users along the last axis, in the order of ``users``. Where a user has
    no value (no row, no upstream result) a float array holds NaN; the ``*_present`` masks
    say where a value exists. Results of upstream calculations and of the own previous date
    are read from their stored columns (``columns.Table``), ints and bools as float64.

    Attributes:
        dates: the block's dates, ascending: the cells to compute (not necessarily
            consecutive dates).
        users: (u,) object array of user ids (str), ascending: every user with a row on a
            block date (root data) or with an upstream result (no root data).
        present: (n, u) bool: whether the user gets a result on block date i (a root row,
            or an upstream result); outputs elsewhere are ignored.
        previous_date: historical calculations: the date of the state ``previous`` returns
            (the calculation's previous date before ``dates[0]``), or None; the block's dates
            are then consecutive dates of the calculation.
    """

    __slots__ = (
        "_called",
        "_previous",
        "_root",
        "_upstream",
        "dates",
        "present",
        "previous_date",
        "users",
    )

    def __init__(
        self,
        dates: tuple[dt.date, ...],
        users: Any,
        present: Any,
        root: Mapping[str, Any],
        upstream: Mapping[str, Any],
        previous: Any,
        previous_date: dt.date | None,
    ):
        self.dates = dates
        self.users = users
        self.present = present
        self._called = present.copy()  # who the per-user form calls (``skip`` keeps them)
        self._root = root
        self._upstream = upstream
        self._previous = previous
        self.previous_date = previous_date

    def skip(self, mask: Any) -> None:
        """Give the users where the (n, u) bool ``mask`` is True no result on those dates,
        as ``process`` returning None does (they are still counted as processed)."""
        self.present = self.present & ~mask

    def root(self, dataset: str, column: str) -> Any:
        """(s, u) values of a root column over the dataset's span of available dates: the
        ``lookback - 1`` dates before the first block date, then through the last one.
        Numbers as float64 (NaN where the user has no row or a null value), other columns as
        object arrays (None). A user's last row of a date counts (a dataset with several
        rows per user and date needs the per-user form).

        Raises:
            KeyError: ``dataset`` is not one of the calculation's ``root_data``, or has no
                such column.
        """
        return self._root[dataset].column(column)

    def root_present(self, dataset: str) -> Any:
        """(s, u) bool: the user has a row on that span date."""
        return self._root[dataset].present

    def rows(self, dataset: str) -> Any:
        """(n,) int: the row of each block date in ``root(dataset, ...)``'s span."""
        return self._root[dataset].rows

    def span(self, dataset: str) -> tuple[dt.date, ...]:
        """The dates of the span rows of ``root(dataset, ...)``, ascending."""
        return self._root[dataset].dates

    def upstream(self, name: str, field: str) -> Any:
        """A dependency's field: (n, u) float64 on the block dates for a standard dependency
        (NaN where the user has no result or a null), (n,) for a meta one; a field holding
        texts or JSON values (a meta result's mapping, say) comes as an object array (None
        where absent). With a window
        (``dependencies = {name: w}``) it spans the window instead: (s, u) / (s,) over
        ``upstream_span(name)``, the ``w - 1`` dependency dates before the first block date
        through the last; ``upstream_rows(name)`` gives the block dates' rows.

        Raises:
            KeyError: ``name`` is not a dependency, or no result of it has ``field``.
        """
        return self._upstream[name].column(field)

    def upstream_present(self, name: str) -> Any:
        """(n, u) bool (with a window: (s, u)): the user has a result of the standard
        dependency on that date."""
        return self._upstream[name].present

    def upstream_rows(self, name: str) -> Any:
        """(n,) int: the row of each block date in ``upstream(name, ...)``."""
        return self._upstream[name].rows

    def upstream_span(self, name: str) -> tuple[dt.date, ...]:
        """The dates of the rows of ``upstream(name, ...)``."""
        return self._upstream[name].dates

    def previous(self, field: str) -> Any:
        """Historical: (u,) float64 of the own result on ``previous_date`` (NaN where the
        user had no result; all NaN without a previous date); (1,) for a meta calculation.
        A text or JSON field comes as an object array (None where absent).

        Raises:
            KeyError: the calculation is not historical, or no result has ``field``.
        """
        if self._previous is None:
            raise KeyError(f"{field}: only a historical calculation has a previous result")
        return self._previous.column(field)

    def previous_present(self) -> Any:
        """(u,) bool: the user had a result on ``previous_date``."""
        if self._previous is None:
            raise KeyError("only a historical calculation has a previous result")
        return self._previous.present
