"""Blocks: the columnar form's unit of work — one calculation over many dates × users.

The block runner's contract is ``run_block(BlockTask) -> BlockOutcome``: value types only
(no ledger, no decider, no executor), so any executor can run a block where the task can
travel — this process, a forked worker, a distributed one. Root data comes as dense matrices
(``RootMatrix``), results as ``columns.Table`` per date (a meta calculation's as dicts). ``frame_for`` builds the ``calculation.Frame`` a
block's ``compute`` reads, with the masks the engine needs around it (malformed root rows,
failures inherited from upstream or from the previous date); ``block_tables`` turns the
returned arrays back into one ``Table`` per date (failure markers included), and
``meta_results`` into one dict per date for a meta calculation.

The per-user rules hold cell by cell, so both forms publish the same results: a user gets a
result on a date when it has a root row there (or, without root data, a result of a standard
dependency); a malformed root row on the date or in the lookback window fails the user; a
failure marker upstream or on the previous date (historical) fails it too, naming the origin.
"""

from __future__ import annotations

import bisect
import dataclasses
import datetime as dt
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from orchestrator import faults
from orchestrator.calculation import Frame, StandardContext
from orchestrator.columns import Column, Table, column_of
from orchestrator.fingerprint import result_line
from orchestrator.results import FAILED_KEY, describe_failure, failure_marker, failure_of
from orchestrator.rootdata import Dataset, RootData

NUMERIC = ("int", "float")


class BlockError(TypeError):
    """A columnar ``compute`` returned something other than one array per field of the
    block's shape (the block's cells fail with this message)."""


@dataclass(frozen=True)
class Detached:
    """What a detached ``RootMatrix`` keeps of its dataset: its name and column kinds."""

    name: str
    schema: dict[str, str]


@dataclass
class RootMatrix:
    """A root dataset as dense (dates × users) arrays: each user's last row of a date.

    Built from ``RootData.stream`` one date at a time, for the dataset's dates
    ``dates[start:stop]`` (all of them for a dataset held in memory). Columns are built on
    first use; numbers as float64 (NaN: no row or a null), other columns as object arrays.

    Attributes:
        dates: the dataset's available dates covered, ascending.
        users: (U,) str array of the users with a row on any of them, ascending.
        present: (D, U) bool: the user has a (well-formed) row that date.
        bad: (D, U) bool: the user has a malformed row that date.
        where: (date position, user position) -> locations of the malformed rows.
    """

    dataset: RootData
    dates: list[dt.date]
    users: np.ndarray
    present: np.ndarray
    bad: np.ndarray
    where: dict[tuple[int, int], list[str]]
    _rows: list[list[tuple[int, dict[str, Any]]]]
    _columns: dict[str, np.ndarray] = field(default_factory=dict)
    # from a dataset's typed columns: (date position, user position, row) of each kept row
    _cells: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
    # from a root store's column parts: (date position, date ordinal, part, user positions,
    # the part's slice in range) of each part read
    _parts: list[tuple[int, int, int, np.ndarray, slice]] | None = None
    _objects: np.ndarray | None = None  # ``users`` as Python strings (``user_objects``)
    _list: list[str] | None = None

    def detached(self) -> RootMatrix:
        """This matrix with every column read and no dataset behind it (a root store's
        parts hold an open database): what travels to another process. Enough for the
        columnar form; the per-user form reads rows from the dataset."""
        for name in self.dataset.schema:
            self.column(name)
        alone: Any = Detached(self.dataset.name, dict(self.dataset.schema))
        return dataclasses.replace(self, dataset=alone, _rows=[], _cells=None, _parts=None)

    def user_objects(self) -> np.ndarray:
        """(U,) object array of ``users`` as Python strings, built once: frames of the
        matrix's users share them (their tables' users lists hold the same strings)."""
        if self._objects is None:
            self._objects = self.users.astype(object)
        return self._objects

    def user_list(self) -> list[str]:
        """``users`` as one list of Python strings, built once: the tables of every
        calculation over the matrix's users share it (and so the users' encodings)."""
        if self._list is None:
            self._list = self.user_objects().tolist()
        return self._list

    @classmethod
    def build(cls, dataset: RootData, dates: Sequence[dt.date]) -> RootMatrix:
        """Read ``dates`` of ``dataset``: from its typed columns when it is held in memory
        (vectorised), else a stream per date."""
        if isinstance(dataset, Dataset) and list(dates) == dataset.dates:
            return cls._from_files(dataset)
        return cls._from_stream(dataset, dates)

    @classmethod
    def from_store(
        cls, dataset: Any, dates: Sequence[dt.date], lo: str | None, hi: str | None
    ) -> RootMatrix:
        """Read the users ``lo <= user < hi`` (None: unbounded) of ``dates`` from a root
        store's column parts (``rootstore.StoredDataset.parts``): the same matrix as a
        stream of those dates restricted to the range, in memory in proportion to the
        range's users, at NumPy speed (columns are read on first use)."""
        position = {d.toordinal(): i for i, d in enumerate(dates)}
        picked = []
        texts: list[np.ndarray] = []
        for ordinal, part, users, array, present, bad in dataset.parts(dates, lo, hi):
            a = 0 if lo is None else bisect.bisect_left(users, lo)
            b = len(users) if hi is None else bisect.bisect_left(users, hi)
            picked.append((position[ordinal], ordinal, part, users[a:b], present, bad, a, b))
            texts.append(array[a:b])
        distinct: list[list[str]] = []
        first_text: np.ndarray | None = None
        for (*_, users, _, _, a, b), text in zip(picked, texts, strict=True):
            if not distinct or users != distinct[-1]:
                distinct.append(users)
                first_text = text if first_text is None else first_text
        objects = None
        listed: list[str] | None = None
        if len(distinct) == 1:  # mostly: the same users on every date of the range
            assert first_text is not None
            everyone = first_text
            objects = np.empty(len(distinct[0]), dtype=object)
            objects[:] = distinct[0]
            listed = distinct[0]
        elif distinct:
            everyone = np.unique(np.concatenate([np.array(u, dtype=str) for u in distinct]))
        else:
            everyone = np.zeros(0, dtype=str)
        shape = (len(dates), len(everyone))
        present = np.zeros(shape, dtype=bool)
        bad = np.zeros(shape, dtype=bool)
        parts: list[tuple[int, int, int, np.ndarray, slice]] = []
        for d, ordinal, part, users, here, broken, a, b in picked:
            if len(distinct) == 1:
                idx = np.arange(len(users))
            else:
                idx = np.searchsorted(everyone, np.array(users, dtype=str))
            present[d, idx] = here[a:b]
            bad[d, idx] = broken[a:b]
            parts.append((d, ordinal, part, idx, slice(a, b)))
        where = {
            (d, u): dataset.bad_locations(dates[d], str(everyone[u]))
            for d, u in zip(*np.nonzero(bad), strict=True)
        }
        return cls(
            dataset,
            list(dates),
            everyone,
            present,
            bad,
            where,
            [],
            _parts=parts,
            _objects=objects,
            _list=listed,
        )

    @classmethod
    def _from_files(cls, dataset: Dataset) -> RootMatrix:
        dates = dataset.dates
        position = {d: i for i, d in enumerate(dates)}
        # vectorised: per kept row its date position and its user's position in ``names``
        d_idx, names, kept_user = dataset.kept_rows()
        bad_keys = sorted(dataset.bad_rows)
        everyone = np.array(names + [u for _, u in bad_keys], dtype=str)
        users, inverse = np.unique(everyone, return_inverse=True)
        u_idx = inverse[: len(names)][kept_user]
        shape = (len(dates), len(users))
        # A user's last row of a date wins: the last occurrence of each (date, user).
        key = d_idx * max(len(users), 1) + u_idx
        _, last = np.unique(key[::-1], return_index=True)
        chosen = np.sort(len(key) - 1 - last)
        present = np.zeros(shape, dtype=bool)
        present[d_idx[chosen], u_idx[chosen]] = True
        bad = np.zeros(shape, dtype=bool)
        where: dict[tuple[int, int], list[str]] = {}
        for (date, _user), u in zip(bad_keys, inverse[len(names) :].tolist(), strict=True):
            d = position[date]
            bad[d, u] = True
            where[(d, u)] = list(dataset.bad_rows[(date, _user)])
        matrix = cls(dataset, list(dates), users, present, bad, where, [])
        matrix._cells = (d_idx[chosen], u_idx[chosen], chosen)
        return matrix

    @classmethod
    def _from_stream(cls, dataset: RootData, dates: Sequence[dt.date]) -> RootMatrix:
        per_date: list[list[tuple[str, dict[str, Any] | None, list[str]]]] = []
        users: set[str] = set()
        for date in dates:
            entries = []
            for user, (found, problems) in dataset.stream(date):
                entries.append((user, found[-1] if found else None, problems))
            per_date.append(entries)
            users.update(u for u, _, _ in entries)
        ordered = np.array(sorted(users), dtype=str)
        pos = {u: i for i, u in enumerate(ordered.tolist())}
        present = np.zeros((len(dates), len(ordered)), dtype=bool)
        bad = np.zeros_like(present)
        where: dict[tuple[int, int], list[str]] = {}
        rows: list[list[tuple[int, dict[str, Any]]]] = []
        for d, entries in enumerate(per_date):
            kept = []
            for user, row, locations in entries:
                u = pos[user]
                if locations:
                    bad[d, u] = True
                    where[(d, u)] = list(locations)
                if row is not None:
                    present[d, u] = True
                    kept.append((u, row))
            rows.append(kept)
        return cls(dataset, list(dates), ordered, present, bad, where, rows)

    def column(self, name: str) -> np.ndarray:
        """(D, U) values of column ``name``.

        Raises:
            KeyError: the dataset has no such column.
        """
        hit = self._columns.get(name)
        if hit is not None:
            return hit
        kind = self.dataset.schema.get(name)
        if kind is None:
            raise KeyError(f"{self.dataset.name} has no column {name!r}")
        shape = self.present.shape
        if self._cells is not None or self._parts is not None:
            if self._cells is not None:
                out = self._column_from_files(name, kind, shape)
            else:
                out = self._column_from_parts(name, kind, shape)
            self._columns[name] = out
            return out
        if kind in NUMERIC:
            out = np.full(shape, np.nan)
            for d, kept in enumerate(self._rows):
                if kept:
                    us = [u for u, _ in kept]
                    vals = [row.get(name) for _, row in kept]
                    out[d, us] = np.array(
                        [np.nan if v is None else v for v in vals], dtype=np.float64
                    )
        else:
            out = np.full(shape, None, dtype=object)
            for d, kept in enumerate(self._rows):
                for u, row in kept:
                    value = row.get(name)
                    out[d, u] = value.isoformat() if isinstance(value, dt.date) else value
        self._columns[name] = out
        return out

    def _column_from_parts(self, name: str, kind: str, shape: tuple[int, int]) -> np.ndarray:
        assert self._parts is not None
        store: Any = self.dataset  # a rootstore.StoredDataset
        numeric = kind in NUMERIC
        out = np.full(shape, np.nan) if numeric else np.full(shape, None, dtype=object)
        for d, ordinal, part, idx, span in self._parts:
            values = store.part_column(ordinal, part, name)
            if isinstance(values, np.ndarray):
                out[d, idx] = values[span]
                continue
            values = values[span]
            if numeric:  # a value no float holds: fails as the stream's matrix does
                here = self.present[d, idx]
                kept = [v for v, h in zip(values, here.tolist(), strict=True) if h]
                out[d, idx[here]] = np.array(
                    [np.nan if v is None else v for v in kept], dtype=np.float64
                )
            else:
                out[d, idx] = np.array(values, dtype=object) if values else values
        return out

    def _column_from_files(self, name: str, kind: str, shape: tuple[int, int]) -> np.ndarray:
        assert isinstance(self.dataset, Dataset) and self._cells is not None
        values = self.dataset.kept_values(name)  # NaN for None when numeric
        d, u, chosen = self._cells
        if kind in NUMERIC:
            out = np.full(shape, np.nan)
            out[d, u] = values[chosen]
            return out
        out = np.full(shape, None, dtype=object)
        out[d, u] = values[chosen]  # texts (a CSV / Parquet value is never a date object)
        return out


class RootView:
    """A frame's window on one root dataset: rows of a span, columns of the frame's users."""

    __slots__ = ("_cols", "_matrix", "_rows", "_users", "dates", "present", "rows")

    def __init__(self, matrix: RootMatrix, lo: int, hi: int, rows: np.ndarray, users: np.ndarray):
        self._matrix = matrix
        self._rows = slice(lo, hi)
        self._users = users  # positions in the matrix's users (-1: not in this dataset)
        self._cols: dict[str, np.ndarray] = {}
        self.dates = tuple(matrix.dates[lo:hi])
        self.rows = rows
        self.present = self._take(matrix.present, False)

    def _take(self, full: np.ndarray, fill: Any) -> np.ndarray:
        part = full[self._rows][:, np.maximum(self._users, 0)]
        if (self._users < 0).any():
            part = part.copy()
            part[:, self._users < 0] = fill
        return part

    def column(self, name: str) -> np.ndarray:
        hit = self._cols.get(name)
        if hit is None:
            full = self._matrix.column(name)
            hit = self._cols[name] = self._take(full, np.nan if full.dtype.kind == "f" else None)
        return hit


class ResultView:
    """A frame's view of a calculation's results on some dates: per date a ``Table``
    (standard), a dict (meta) or None, aligned on the frame's users."""

    __slots__ = (
        "_cols",
        "_index",
        "_meta",
        "_results",
        "_users",
        "dates",
        "failed",
        "present",
        "rows",
    )

    def __init__(self, results: Sequence[Any], users: np.ndarray, meta: bool):
        self._results = results
        self._users = users
        self._meta = meta
        self._cols: dict[str, np.ndarray] = {}
        self._index: list[tuple[np.ndarray, np.ndarray]] = []
        self.rows = np.arange(len(results))
        self.dates: tuple[dt.date, ...] = ()
        n = len(results)
        if meta:
            self.present = np.array([r is not None for r in results], dtype=bool)
            self.failed = np.zeros((n, len(users)), dtype=bool)
            return
        self.present = np.zeros((n, len(users)), dtype=bool)
        self.failed = np.zeros_like(self.present)
        frame_list = users.tolist()
        last: tuple[list[str], tuple[np.ndarray, np.ndarray]] | None = None
        for i, table in enumerate(results):
            table_users = table.users if table is not None else []
            # dates of a dependency mostly share their users: align each distinct list once
            if last is not None and (table_users is last[0] or table_users == last[0]):
                idx, ok = last[1]
            else:
                idx, ok = _align(table_users, users, frame_list)
                last = (table_users, (idx, ok))
            self._index.append((idx, ok))
            if table is None or not len(table):
                continue
            self.present[i, idx[ok]] = True
            marker = table.columns.get(FAILED_KEY)
            if marker is not None:
                failed = (
                    np.ones(len(table), dtype=bool) if marker.present is None else marker.present
                )
                self.failed[i, idx[ok & failed]] = True
        self.present &= ~self.failed

    def column(self, name: str) -> np.ndarray:
        hit = self._cols.get(name)
        if hit is not None:
            return hit
        n = len(self._results)
        if self._meta:
            if all(r is None or name not in r for r in self._results):
                raise KeyError(name)
            vals = [None if r is None else r.get(name) for r in self._results]
            numeric = all(
                v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in vals
            )
            if numeric:
                hit = np.array([np.nan if v is None else v for v in vals], dtype=np.float64)
            else:  # texts, mappings, lists: as they are (None where absent)
                hit = np.empty(n, dtype=object)
                hit[:] = vals
        else:
            cols = [None if t is None else t.columns.get(name) for t in self._results]
            if all(c is None for c in cols) and any(
                t is not None and len(t) for t in self._results
            ):
                raise KeyError(name)
            texts = any(c is not None and c.kind in ("str", "json") for c in cols)
            hit = np.full(
                (n, len(self._users)),
                None if texts else np.nan,
                dtype=object if texts else np.float64,
            )
            for i, col in enumerate(cols):
                if col is None:
                    continue
                idx, ok = self._index[i]
                if texts:
                    values = col.python()
                    present = col.present
                    for k, v, here, j in zip(idx.tolist(), values, ok.tolist(), range(len(values))):
                        if here and (present is None or present[j]):
                            hit[i, k] = v
                else:
                    hit[i, idx[ok]] = col.floats()[ok]
        self._cols[name] = hit
        return hit


def _align(
    users: list[str], frame_users: np.ndarray, frame_list: list[str] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Positions of ``users`` among ``frame_users`` (sorted; ``frame_list``: the same as a
    list, if at hand), and which are there."""
    if not users:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=bool)
    if len(users) == len(frame_users) and users == (
        frame_list if frame_list is not None else frame_users.tolist()
    ):
        return np.arange(len(users)), np.ones(len(users), dtype=bool)
    arr = np.array(users, dtype=str)
    idx = np.searchsorted(frame_users, arr)
    clipped = np.minimum(idx, max(len(frame_users) - 1, 0))
    ok = (
        (idx < len(frame_users)) & (frame_users[clipped] == arr)
        if len(frame_users)
        else (np.zeros(len(users), dtype=bool))
    )
    return clipped, ok


@dataclass
class Block:
    """A block's frame and the engine's masks around it (all (n, u) bool).

    Attributes:
        frame: what ``compute`` reads.
        bad: users failed by malformed root rows (date or window), with ``bad_where``.
        inherited: users whose upstream result (or previous result) is a failure marker, with
            the marker (``origin``) to copy.
        users_list: the frame's users as a list shared with the root matrix, if it has them
            all (``RootMatrix.user_list``); else None.
    """

    frame: Frame
    bad: np.ndarray
    bad_where: dict[tuple[int, int], str]
    inherited: np.ndarray
    origin: dict[tuple[int, int], dict[str, str]]
    users_list: list[str] | None = None


class UpstreamInput(NamedTuple):
    """A dependency's results as a block reads them.

    Attributes:
        results: per date of ``dates``: a Table (standard), a dict (meta) or None.
        meta: the dependency is a meta calculation.
        dates: its dates read: the block's dates, or with a window its span of dates (the
            ``width - 1`` dates of it before the first block date, then through the last).
        rows: (n,) int: the row of each block date in ``dates``.
        width: the window (1: same date only).
    """

    results: Sequence[Any]
    meta: bool
    dates: tuple[dt.date, ...]
    rows: np.ndarray
    width: int


def frame_for(
    name: str,
    dates: Sequence[dt.date],
    root: Mapping[str, tuple[RootMatrix, int]],
    upstream: Mapping[str, UpstreamInput],
    previous: Table | dict[str, Any] | None,
    previous_date: dt.date | None,
    historical: bool,
    meta: bool,
    user_range: tuple[str | None, str | None] = (None, None),
) -> Block:
    """The frame of a block over ``dates``.

    Args:
        name: the calculation's name (failure markers name it).
        dates: the block's dates, ascending (consecutive dates of the calculation when
            ``historical``).
        root: dataset -> (its matrix, the calculation's lookback).
        upstream: dependency -> its results (``UpstreamInput``).
        previous: the own result on ``previous_date`` (historical only).
        meta: a meta calculation (users: those of its standard dependencies).
        user_range: only the users ``lo <= user < hi`` (None: unbounded), for a standard
            calculation split over workers.
    """
    n = len(dates)
    spans: dict[str, tuple[RootMatrix, int, int, np.ndarray]] = {}
    user_sets: list[np.ndarray] = []
    for ds, (matrix, lookback) in root.items():
        positions = np.searchsorted(
            np.array(matrix.dates, dtype="datetime64[D]"), np.array(dates, dtype="datetime64[D]")
        )
        lo = max(0, int(positions[0]) - lookback + 1)
        hi = int(positions[-1]) + 1
        spans[ds] = (matrix, lo, hi, positions)
        on_dates = (matrix.present[positions] | matrix.bad[positions]).any(axis=0)
        user_sets.append(matrix.users if on_dates.all() else matrix.users[on_dates])
    std = {dep: up for dep, up in upstream.items() if not up.meta}
    if not root:  # users with a same-date result of a standard dependency
        distinct: list[list[str]] = []
        for up in std.values():
            for r in up.rows.tolist():
                table = up.results[r]
                # mostly the same users date after date: each distinct list once
                if (
                    table is not None
                    and len(table)
                    and not any(table.users is d or table.users == d for d in distinct[-2:])
                ):
                    distinct.append(table.users)
        user_sets = [np.array(d, dtype=str) for d in distinct]
    if len(user_sets) == 1:
        users = user_sets[0]  # a matrix's or a table's users: sorted and unique already
    elif user_sets:
        users = np.unique(np.concatenate(user_sets))
    else:
        users = np.zeros(0, dtype=str)
    lo_user, hi_user = user_range
    if lo_user is not None or hi_user is not None:
        a = 0 if lo_user is None else int(np.searchsorted(users, lo_user, "left"))
        b = len(users) if hi_user is None else int(np.searchsorted(users, hi_user, "left"))
        if (a, b) != (0, len(users)):
            users = users[a:b]
    # the frame's users are one matrix's users (one dataset, every user on the dates): its
    # Python strings and positions as they are, nothing aligned
    whole = (
        next((m for m, *_ in spans.values() if m.users is users), None) if len(spans) == 1 else None
    )
    objects = whole.user_objects() if whole is not None else users.astype(object)
    views = {dep: ResultView(up.results, users, up.meta) for dep, up in upstream.items()}
    for dep, view in views.items():
        view.rows, view.dates = upstream[dep].rows, upstream[dep].dates
    bad = np.zeros((n, len(users)), dtype=bool)
    bad_where: dict[tuple[int, int], str] = {}
    roots: dict[str, RootView] = {}
    present = np.zeros((n, len(users)), dtype=bool)
    if root:
        on_date: dict[tuple[int, int], list[str]] = {}
        in_window: dict[tuple[int, int], list[str]] = {}
        for ds, (matrix, lo, hi, positions) in spans.items():
            if matrix is whole:
                idx, ok = np.arange(len(users)), np.ones(len(users), dtype=bool)
            else:
                idx, ok = _align(objects.tolist(), matrix.users)
            rview = roots[ds] = RootView(matrix, lo, hi, positions - lo, np.where(ok, idx, -1))
            present |= rview.present[rview.rows]
            lookback = root[ds][1]
            for (d, u), locs in sorted(matrix.where.items()):
                k = int(np.searchsorted(users, matrix.users[u]))
                if k == len(users) or users[k] != matrix.users[u]:
                    continue  # a user without rows on the block's dates is not in it
                for i, p in enumerate(positions.tolist()):
                    if d == p:
                        on_date.setdefault((i, k), []).extend(locs)
                    elif lookback > 1 and p - lookback < d < p:
                        in_window.setdefault((i, k), []).extend(locs)
        # The per-user form's rules: a malformed row on the date fails the user; one earlier
        # in the window fails a user that has rows on the date.
        for (i, k), locs in on_date.items():
            bad[i, k] = True
            bad_where[(i, k)] = f"malformed root data: {'; '.join(locs)}"
        for (i, k), locs in in_window.items():
            if not bad[i, k] and present[i, k]:
                bad[i, k] = True
                bad_where[(i, k)] = f"malformed root data in its history window: {'; '.join(locs)}"
        present &= ~bad  # a failed user has no result, only its failure
    else:
        for dep, view in views.items():
            if not view._meta:
                rows = upstream[dep].rows
                present |= view.present[rows] | view.failed[rows]
    inherited = np.zeros((n, len(users)), dtype=bool)
    origin: dict[tuple[int, int], dict[str, str]] = {}
    for dep, view in views.items():  # the first failed dependency names the origin
        if view._meta or not view.failed.any():
            continue
        up = upstream[dep]
        for i, row in enumerate(up.rows.tolist()):
            # a window's oldest failure first, as the per-user form reads the window
            for r in range(max(0, row - up.width + 1), row + 1):
                hit = view.failed[r] & present[i]
                for k in np.flatnonzero(hit).tolist():
                    origin.setdefault((i, k), _marker_of(up.results[r], str(users[k])))
                inherited[i] |= hit
    prev_view = None
    if historical:
        prev_view = PreviousView(ResultView([previous], users, meta))
        if not meta:
            # A failed state fails the user on its next present date, and so on until a
            # date the user has no result (the per-user form's previous is then None).
            carried = prev_view.view.failed[0]
            for i in range(n):
                hit = carried & present[i]  # the previous result's failure comes first
                for k in np.flatnonzero(hit).tolist():
                    if i == 0:
                        origin[(i, k)] = _marker_of(previous, str(users[k]))
                    elif bad[i - 1, k]:
                        origin[(i, k)] = {
                            "calculation": name,
                            "date": dates[i - 1].isoformat(),
                            "error": bad_where[(i - 1, k)],
                        }
                    else:
                        origin[(i, k)] = origin[(i - 1, k)]
                inherited[i] |= hit
                carried = inherited[i] | bad[i]
    frame = Frame(
        tuple(dates),
        objects,
        present & ~inherited,
        roots,
        views,
        prev_view,
        previous_date,
    )
    return Block(
        frame, bad, bad_where, inherited, origin, whole.user_list() if whole is not None else None
    )


class PreviousView:
    """The own result on the date before a historical block: (u,) per field."""

    __slots__ = ("present", "view")

    def __init__(self, view: ResultView):
        self.view = view
        self.present = view.present[0] if view.present.ndim == 2 else view.present

    def column(self, name: str) -> np.ndarray:
        return self.view.column(name)[0] if not self.view._meta else self.view.column(name)


def _marker_of(table: Any, user: str) -> dict[str, str]:
    """The origin a user's stored failure marker names (``results.failure_marker``)."""
    if table is None:
        return {}
    col = table.columns[FAILED_KEY]
    return dict(col.values[table.users.index(user)])


def check_outputs(outputs: Any, shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    """``compute``'s return value, checked: a dict of field name -> array of ``shape``.

    Raises:
        BlockError: anything else (the block's cells fail with this message).
    """
    if not isinstance(outputs, dict):
        raise BlockError(f"compute() must return a dict of arrays, not {type(outputs).__name__}")
    out = {}
    for name, value in outputs.items():
        if not isinstance(name, str):
            raise BlockError(f"compute() returned a field named {name!r}: names are str")
        if name == FAILED_KEY:
            raise BlockError(f"{FAILED_KEY!r} is a reserved result key")
        arr = value if isinstance(value, np.ma.MaskedArray) else np.asarray(value)
        if arr.shape != shape:
            raise BlockError(
                f"compute() returned {name!r} of shape {arr.shape}; the block's is {shape}"
                " (dates × users, or dates for a meta calculation)"
            )
        if arr.dtype.kind not in "fiubOU":
            raise BlockError(f"compute() returned {name!r} of dtype {arr.dtype}")
        out[name] = arr
    return out


@dataclass
class DateOutcome:
    """One block date's result and its per-user accounting (as the per-user walk keeps).

    ``failed_users`` holds the first ``limit`` own and inherited failures, user order."""

    table: Table
    processed: int
    failures: int
    inherited: int
    failed_users: list[dict[str, str]]
    aborted: str | None = None  # the circuit breaker tripped: the date fails with this
    # per-user form: (processed, failures, inherited, len(failed_users)) after each own
    # failure, in user order: where the circuit breaker would trip over merged user ranges
    events: list[tuple[int, int, int, int]] = field(default_factory=list)


def inherited_failure(name: str, user: str, origin: dict[str, str]) -> dict[str, str]:
    """The stored failed-user entry of ``user``, whose upstream or previous result (of
    ``name`` itself: "previous") is the failure marker ``origin``."""
    kind = "previous" if origin.get("calculation") == name else "upstream"
    return {"user": user, "kind": "upstream", "error": f"{kind} " + describe_failure(user, origin)}


def block_tables(
    name: str, block: Block, outputs: Mapping[str, np.ndarray], limit: int
) -> list[DateOutcome]:
    """One ``Table`` per block date from ``compute``'s (n, u) arrays, with failure markers
    for the users failed by malformed rows or inherited failures."""
    frame = block.frame
    users = frame.users
    # one list object for every date holding all of the frame's users, so the users'
    # encodings (stored header, result hash) are built once per block, not once per date
    all_users: list[str] = block.users_list if block.users_list is not None else users.tolist()
    out = []
    for i, date in enumerate(frame.dates):
        ok_all = frame.present[i]
        failed_all = block.bad[i] | block.inherited[i]
        entries = np.flatnonzero(ok_all | failed_all)
        ok = ok_all[entries]
        columns: dict[str, Column] = {}
        if ok.any():
            for field_name in sorted(outputs):
                values = outputs[field_name][i, entries]
                col = column_of(values if values.dtype.kind != "O" else values.tolist())
                if col.kind == "f8" and not ok.all():
                    col.values = np.where(ok, col.values, np.nan)
                col.present = None if ok.all() else ok.copy()
                columns[field_name] = col
        failed_users: list[dict[str, str]] = []
        own = inherited = 0
        if failed_all.any():
            markers: list[Any] = []
            for k in entries.tolist():
                user = all_users[k]
                if block.bad[i, k]:
                    error = block.bad_where[(i, k)]
                    markers.append({"calculation": name, "date": date.isoformat(), "error": error})
                    own += 1
                    if own <= limit:
                        failed_users.append({"user": user, "kind": "own", "error": error})
                elif block.inherited[i, k]:
                    origin = block.origin[(i, k)]
                    markers.append(origin)
                    inherited += 1
                    if inherited <= limit:
                        failed_users.append(inherited_failure(name, user, origin))
                else:
                    markers.append(None)
            marker = column_of(markers)
            marker.present = ~ok
            columns[FAILED_KEY] = marker
        if len(entries) == len(all_users):
            table_users = all_users
        else:
            table_users = [all_users[k] for k in entries.tolist()]
        table = Table(table_users, columns)
        out.append(DateOutcome(table, len(entries), own, inherited, failed_users))
    return out


def meta_results(outputs: Mapping[str, np.ndarray], n: int) -> list[dict[str, Any]]:
    """One result dict per block date from a meta ``compute``'s (n,) arrays: Python scalars,
    NaN as None (the float null, as in a standard result)."""
    lists = {}
    for field_name, arr in outputs.items():
        values = arr.tolist()
        if arr.dtype.kind == "f":
            values = [None if v != v else v for v in values]  # noqa: PLR0124 - NaN test
        lists[field_name] = values
    return [{k: v[i] for k, v in sorted(lists.items())} for i in range(n)]


@dataclass
class BlockTask:
    """One block to compute, with every input it reads (the runner does no I/O).

    Attributes:
        name: the calculation's name.
        calculation: its class (instantiated once per block; ``compute(frame)`` is called).
        dates: the block's dates, ascending (consecutive dates of the calculation when
            ``historical``).
        root: dataset -> (its matrix, the calculation's lookback).
        upstream: dependency -> its results (``UpstreamInput``).
        previous: historical: the own result on ``previous_date`` (Table, dict or None).
        previous_date: the calculation's date before ``dates[0]``, or None.
        historical / meta: the calculation's kind.
        stored_failures: failed users kept per kind and date (the rest are counted).
        per_user: run the per-user form, ``process(ctx)`` once per user and date of the
            block (standard calculations only); else ``compute(frame)``.
        user_range: standard only: compute the users ``lo <= user < hi`` alone (None:
            unbounded). A standard calculation treats users independently, so the ranges
            of a partition give the whole block's results when concatenated
            (``blockpool.merge_outcomes``); ``upstream`` and ``previous`` may then hold
            only the range's users.
        breaker: the per-user form stops a date at the circuit breaker; False leaves that
            to whoever merges the ranges (``DateOutcome.events``).
    """

    name: str
    calculation: type
    dates: tuple[dt.date, ...]
    root: Mapping[str, tuple[RootMatrix, int]]
    upstream: Mapping[str, UpstreamInput]
    previous: Any
    previous_date: dt.date | None
    historical: bool
    meta: bool
    stored_failures: int = 20
    per_user: bool = False
    user_range: tuple[str | None, str | None] = (None, None)
    breaker: bool = True


@dataclass
class BlockOutcome:
    """What a block produced.

    Attributes:
        error: the block failed as a whole (``compute`` raised, or returned something else
            than one array per field of the block's shape): every date fails with it.
        users: the frame's users.
        processed: user-dates with a result or a failure.
        tables: standard: one ``DateOutcome`` per date.
        results: meta: one result dict per date.
        upstream_failed: meta: per date, (dependency, its failed users with the origin their
            marker names) when a standard dependency has failed users that date (the date
            then fails, naming them).
    """

    error: str | None
    users: int
    processed: int = 0
    tables: list[DateOutcome] | None = None
    results: list[dict[str, Any]] | None = None
    upstream_failed: list[tuple[str, list[tuple[str, dict[str, str]]]] | None] | None = None


def run_block(task: BlockTask) -> BlockOutcome:
    """Compute one block: build its frame, call ``compute`` (or ``process`` per user, see
    ``BlockTask.per_user``), check and split the outputs per date, with the failure markers
    the per-user rules give. Never raises for user code."""
    if task.per_user:
        return _run_users(task)
    block = frame_for(
        task.name,
        task.dates,
        task.root,
        task.upstream,
        task.previous,
        task.previous_date,
        task.historical,
        task.meta,
        task.user_range,
    )
    frame = block.frame
    n = len(task.dates)
    shape = (n,) if task.meta else (n, len(frame.users))
    try:
        outputs = check_outputs(task.calculation().compute(frame), shape)
    except Exception as e:  # noqa: BLE001 - user code: any error fails the block's cells
        error = str(e) if isinstance(e, BlockError) else traceback.format_exc()
        return BlockOutcome(error, len(frame.users))
    processed = int((frame._called | block.bad | block.inherited).sum())
    if not task.meta:
        tables = block_tables(task.name, block, outputs, task.stored_failures)
        return BlockOutcome(None, len(frame.users), processed, tables=tables)
    failed: list[tuple[str, list[tuple[str, dict[str, str]]]] | None] = []
    for i in range(n):
        found = None
        for dep, view in frame._upstream.items():
            row = int(view.rows[i])
            if not view._meta and view.failed[row].any():
                table = task.upstream[dep].results[row]
                users = [str(u) for u in frame.users[view.failed[row]]]
                found = (dep, [(u, _marker_of(table, u)) for u in users])
                break
        failed.append(found)
    return BlockOutcome(
        None, len(frame.users), processed, results=meta_results(outputs, n), upstream_failed=failed
    )


# Value types a per-user result may hold without a closer look (others: ``result_line``).
PLAIN = frozenset({float, int, str, bool, type(None)})


class LazyHistory(Mapping[str, list[Any]]):
    """``ctx.history``, read only when a calculation asks for it: historical calculations
    usually carry their state in ``ctx.previous`` and touch their history only to re-seed."""

    __slots__ = ("_datasets", "_date", "_lookback", "_names", "_user")

    def __init__(
        self,
        datasets: Mapping[str, RootData],
        names: tuple[str, ...],
        user: str,
        date: dt.date,
        lookback: int,
    ):
        self._datasets = datasets
        self._names = names
        self._user = user
        self._date = date
        self._lookback = lookback

    def __getitem__(self, name: str) -> list[Any]:
        if name not in self._names:
            raise KeyError(name)
        return self._datasets[name].history(self._user, self._date, self._lookback)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def checked_result(user: str, result: Any) -> dict[str, Any]:
    """A per-user ``process`` return value that is not None, checked.

    Raises:
        TypeError: not a dict, or a value JSON cannot hold.
        ValueError: it uses the reserved failure key.
    """
    if type(result) is not dict:
        raise TypeError(f"process() must return a dict or None, not {type(result).__name__}")
    if FAILED_KEY in result:
        raise ValueError(f"{FAILED_KEY!r} is a reserved result key")
    if not PLAIN.issuperset(map(type, result.values())):
        result_line(user, result)  # TypeError: a value JSON cannot hold
    return result


def _aligned(
    results: Sequence[Any], index: list[tuple[np.ndarray, np.ndarray]], n: int
) -> list[list[Any]]:
    """Per date: a standard dependency's result dict of each frame user (None: no result),
    as the per-user form reads it (failure markers as ``{FAILED_KEY: origin}``).

    Args:
        results: per date a ``Table`` or None (``UpstreamInput.results``).
        index: per date the (positions, found) of its users among the frame's n users
            (``ResultView._index``).
    """
    out: list[list[Any]] = []
    for table, (idx, ok) in zip(results, index, strict=True):
        if table is None or not len(table):
            out.append([None] * n)
            continue
        values = [r for _, r in table.pairs()]
        # unique sorted users, all among the frame's and as many: they are the frame's users
        if len(values) == n and ok.all():
            out.append(values)
            continue
        row: list[Any] = [None] * n
        for j, k in zip(np.flatnonzero(ok).tolist(), idx[ok].tolist(), strict=True):
            row[k] = values[j]
        out.append(row)
    return out


class _ReadHistory(Mapping[str, list[Any]]):
    """A historical calculation's ``ctx.history`` in a block: ``LazyHistory`` over readers
    made once per date (``Dataset.history_reader``)."""

    __slots__ = ("_readers", "_user")

    def __init__(self, readers: dict[str, Callable[[str], list[Any]]], user: str):
        self._readers = readers
        self._user = user

    def __getitem__(self, name: str) -> list[Any]:
        return self._readers[name](self._user)  # KeyError: not a dataset it reads

    def __iter__(self) -> Iterator[str]:
        return iter(self._readers)

    def __len__(self) -> int:
        return len(self._readers)


def _history_reader(dataset: RootData, date: dt.date, lookback: int) -> Callable[[str], list[Any]]:
    """``user -> dataset.history(user, date, lookback)``."""
    if isinstance(dataset, Dataset):
        return dataset.history_reader(date, lookback)
    return lambda user: dataset.history(user, date, lookback)


def _rows_on(dataset: RootData, date: dt.date) -> Mapping[str, list[Any]]:
    """user -> its well-formed rows on ``date`` (a user missing: none), as ``stream`` gives
    them. A dataset held in memory: its own per-date index, read as it is."""
    if isinstance(dataset, Dataset):
        return dataset.by_date.get(date, {})
    return {user: rows for user, (rows, _) in dataset.stream(date)}


def _run_users(task: BlockTask) -> BlockOutcome:
    """The per-user form over a block: ``process(ctx)`` for each user of each date, in
    date then user order, with the per-user walk's rules (``execution``): a malformed root
    row fails the user; a failed previous result, then a failed upstream result, is
    inherited; an exception, a non-dict or a value JSON cannot hold fails the user alone; the
    circuit breaker fails the date once ``breaker_min_users`` users were processed and more
    than ``max_failure_rate`` of them failed. A historical user's previous result is its
    result of the block's previous date (``task.previous`` before the first)."""
    cls: Any = task.calculation
    name, limit = task.name, task.stored_failures
    # Previous-date failures are followed here, date by date, as results come out.
    block = frame_for(
        name,
        task.dates,
        task.root,
        task.upstream,
        None,
        None,
        historical=False,
        meta=False,
        user_range=task.user_range,
    )
    frame = block.frame
    users = frame.users.tolist()
    datasets = {ds: matrix.dataset for ds, (matrix, _) in task.root.items()}
    names = tuple(task.root)
    lookback = max((lb for _, lb in task.root.values()), default=1)
    # Each standard dependency aligned on the frame's users once for the block (a dict per
    # date looked up per user, and for a window per date of it, cost more than the
    # calculations); a window is then one slice of the user's results over the dates.
    deps: list[tuple[str, UpstreamInput, list[Any]]] = []
    for dep, up in task.upstream.items():
        if up.meta:
            deps.append((dep, up, list(up.results)))
            continue
        aligned = _aligned(up.results, frame._upstream[dep]._index, len(users))
        if up.width > 1:  # per user: its results over the dependency's dates
            aligned = [list(t) for t in zip(*aligned)] if aligned else [[] for _ in users]
        deps.append((dep, up, aligned))
    previous: dict[str, Any] = (
        dict(task.previous.pairs()) if isinstance(task.previous, Table) else {}
    )
    min_users, max_rate = cls.breaker_min_users, cls.max_failure_rate
    historical, armed, breaker = task.historical, faults.armed("user"), task.breaker
    outcomes: list[DateOutcome] = []
    processed_all = 0
    for i, date in enumerate(task.dates):
        instance = cls()  # one per cell, as the per-user walk makes
        rows_today = {ds: _rows_on(datasets[ds], date) for ds in names}
        whole: dict[str, Any] = {}
        # dependency, its results by user (a < 0) or by user over its dates [a:b] (a window)
        lookups: list[tuple[str, list[Any], int, int]] = []
        for dep, up, per_date in deps:
            row = int(up.rows[i])
            lo = max(0, row - up.width + 1)
            if up.meta:
                picked = per_date[lo : row + 1]
                whole[dep] = picked if up.width > 1 else picked[-1]
            elif up.width > 1:
                lookups.append((dep, per_date, lo, row + 1))
            else:
                lookups.append((dep, per_date[row], -1, 0))
        entries = np.flatnonzero(frame.present[i] | block.bad[i] | block.inherited[i])
        bad, heir = block.bad[i].tolist(), block.inherited[i].tolist()
        one = rows_today[names[0]] if len(names) == 1 else None
        readers = (
            {ds: _history_reader(datasets[ds], date, lookback) for ds in names}
            if lookback > 1
            else {}
        )
        read_one = readers[names[0]] if len(readers) == 1 else None
        done_users: list[str] = []
        done: list[dict[str, Any]] = []
        failed_users: list[dict[str, str]] = []
        processed = failures = inherited = 0
        aborted = None
        events: list[tuple[int, int, int, int]] = []
        for k in entries.tolist():
            user = users[k]
            processed += 1
            if armed:
                faults.reached("user")
            marker: dict[str, Any] | None = None
            before = previous.get(user) if historical else None
            origin = failure_of(before) if before is not None else None
            if bad[k]:
                error = block.bad_where[(i, k)]
                origin = None
                failures += 1
                if failures <= limit:
                    failed_users.append({"user": user, "kind": "own", "error": error})
                marker = failure_marker(name, date, error)
            elif origin is not None or heir[k]:
                origin = origin or block.origin[(i, k)]
                inherited += 1
                if inherited <= limit:
                    failed_users.append(inherited_failure(name, user, origin))
                marker = {FAILED_KEY: origin}
            else:
                upstream = dict(whole)
                for dep, got, a, b in lookups:
                    upstream[dep] = got[k] if a < 0 else got[k][a:b]
                if one is not None:
                    root = {names[0]: one.get(user, [])}
                else:
                    root = {ds: rows_today[ds].get(user, []) for ds in names}
                # Read when asked by a historical calculation (its state is in ctx.previous),
                # at once by the others: they read their history (one call, not two).
                if not readers:
                    history: Mapping[str, list[Any]] = root
                elif historical:
                    history = _ReadHistory(readers, user)
                elif read_one is not None:
                    history = {names[0]: read_one(user)}
                else:
                    history = {ds: read(user) for ds, read in readers.items()}
                ctx = StandardContext(date, user, root, history, upstream, before)
                try:
                    result = instance.process(ctx)
                    if result is not None:
                        if not (
                            type(result) is dict
                            and FAILED_KEY not in result
                            and PLAIN.issuperset(map(type, result.values()))
                        ):
                            checked_result(user, result)  # raises with the reason
                        done_users.append(user)
                        done.append(result)
                except Exception as e:  # noqa: BLE001 - user code: a per-user failure
                    failures += 1
                    if failures <= limit:
                        failed_users.append(
                            {"user": user, "kind": "own", "error": traceback.format_exc()}
                        )
                    last = traceback.format_exception_only(e)[-1].strip()
                    marker = failure_marker(name, date, last)
            if marker is not None:
                done_users.append(user)
                done.append(marker)
                own = origin is None  # inherited failures do not count for the breaker
                if own:
                    events.append((processed, failures, inherited, len(failed_users)))
                if own and breaker and processed >= min_users and failures / processed > max_rate:
                    aborted = (
                        f"circuit breaker: {failures} of {processed} users failed "
                        f"({failures / processed:.0%} > {max_rate:.0%})"
                    )
                    break
        processed_all += processed
        table = Table.from_results(done_users, done)
        outcomes.append(
            DateOutcome(table, processed, failures, inherited, failed_users, aborted, events)
        )
        if historical:
            previous = dict(zip(done_users, done))
    return BlockOutcome(None, len(users), processed_all, tables=outcomes)
