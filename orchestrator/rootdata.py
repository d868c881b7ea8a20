"""Root data: external raw inputs per date, read once per run and indexed.

A source is a file or a folder of CSV, gzipped CSV or Parquet files with a date column and a
user column. ``FileSource.digest()`` hashes the raw bytes (cheap: no parsing), so an unchanged
source reuses the stored root index and is never parsed by a run that executes nothing.
``FileSource.load()`` parses everything once into a ``Dataset``: rows grouped by date and user,
and per date a row count and a content hash (below). A source too big to hold, or read without
history windows, is streamed from its root store instead (``rootstore.py``: the same rows and
hashes); both serve ``RootData``.

The content hash of a date (``DateHasher``, format ``ROOT_HASH_FORMAT``) covers everything a
calculation can see of that date, so that two sources with equal hashes parse to equal rows:

* the date's *rows*: every row whose date and user are readable, malformed ones included (a
  corrected row changes the hash), each as its canonical text — the raw line of an unquoted
  CSV file, else the JSON array of its raw fields — grouped by the *schema* of the file it
  came from; within a group the texts are sorted, so row order and the split into files do
  not matter;
* each group's schema: the file's column names in header order, each with its parsed type
  (``int``, ``float``, ``str``; ``date`` and ``user`` for those two columns). Renaming or
  swapping header columns, or a column turning from ``int`` to ``float``, changes the hash;
* the locations (``file:line: what``) of its malformed rows, which the failed users' stored
  results name: a malformed row moving to another line re-runs the date.

``DateEntry`` also keeps the schemas and a digest of the rows alone, so a plan can say what
changed ("columns open, close swapped" or only rows; ``planning.Decider._root_change``).

Parsing rules (documented for calculation authors):
* a column is numeric when at least 90 % of its non-empty values parse as numbers (Python's
  ``float``); it is ``int`` when every such value is an integer as Python's ``int`` reads it
  (``-1``, ``+3`` and ``007`` included), else ``float`` (a column mixing ``1`` and ``1.5`` is
  ``float``); empty fields become ``None``; other columns stay strings; the date and user
  columns keep their text. Types are decided per file.
* a row holding a non-number in a numeric column, or with more or fewer fields than the
  header (a short or long row: never padded nor truncated), is malformed: its user counts as
  a failed user, with the row's file and line, in every cell that reads the dataset that
  date (``Dataset.bad_rows``), and on the later dates whose history window holds the row.
* a row whose date is not a date or whose user field is empty or missing cannot be given to
  a user: it is skipped, counted in ``malformed`` and listed (the first 20, ``file:line:
  what``) in ``problems``, which the run prints among its notes.
"""

from __future__ import annotations

import bisect
import csv
import datetime as dt
import gzip
import io
import json
import os
import pickle
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import xxhash

from orchestrator.config import RootDataConfig
from orchestrator.errors import RootDataError
from orchestrator.fingerprint import digest, encode
from orchestrator.memory import paused_gc

if TYPE_CHECKING:
    # Imported by the functions that parse a file (``FileSource.load``): pyarrow costs
    # ~75 ms to import, and a run reusing the stored index or the parsed copy reads no file.
    import pyarrow as pa

Row = dict[str, Any]
# A file's columns in header order, each with its parsed type ("int", "float", "str", "date"
# or "user"): part of the content hash of every date with rows from that file.
Schema = tuple[tuple[str, str], ...]
SUFFIXES = (".csv", ".csv.gz", ".parquet")
# What reading a damaged or misencoded file raises (the file is then unreadable, not a crash).
read_error_types = (OSError, UnicodeDecodeError, csv.Error, EOFError, gzip.BadGzipFile)
# The rules of the per-date content hash (``DateHasher``). It is folded into
# ``FileSource.digest()``, so a root index stored by other rules is re-read, never reused:
# after an upgrade every cell reading root data re-runs once (ROOT_DATA_CHANGED), which is
# the price of never keeping a hash made by other rules. 2: the hash covers the schema and
# the malformed rows' locations.
ROOT_HASH_FORMAT = 2
# Version of the parsed copy ``FileSource.load_cached`` keeps (the ``Dataset`` layout).
PARSED_FORMAT = 2


@dataclass(frozen=True, slots=True)
class DateEntry:
    """The root index of one dataset on one date (available iff ``row_count > 0``).

    Attributes:
        row_count: rows of the date whose date and user are readable (malformed ones too).
        content_hash: the date's content hash (module docstring).
        schemas: the distinct schemas of the files the date's rows came from, in the order
            the hash takes them.
        rows_digest: a digest of the rows alone (the hash without schemas and locations):
            tells a schema change with unchanged rows from one that changed rows too.
    """

    row_count: int
    content_hash: str
    schemas: tuple[Schema, ...] = ()
    rows_digest: str = ""


class DateHasher:
    """Computes one date's ``DateEntry``: fed row texts per schema, then ``finish``ed.

    The texts of one schema must come in ascending order (code point order, which is also
    SQLite's BINARY order on UTF-8: the root store sorts them in SQL). Each schema's texts are
    hashed into a group digest (texts hold no newline, so "text\n" per row is unambiguous);
    the content hash is ``digest("rootdate", [ROOT_HASH_FORMAT, [[schema, count, group
    digest] ... in the order of the schemas' canonical encodings], sorted locations])``.
    """

    __slots__ = ("_groups",)

    def __init__(self) -> None:
        self._groups: dict[Schema, list[Any]] = {}

    def add(self, schema: Schema, text: str) -> None:
        """Feed one row text of a file with ``schema``."""
        group = self._groups.get(schema)
        if group is None:
            group = self._groups[schema] = [0, xxhash.xxh3_128()]
        group[0] += 1
        group[1].update(text.encode() + b"\n")

    def extend(self, schema: Schema, texts: list[str]) -> None:
        """Feed row texts of a file with ``schema`` (ascending, as for ``add``)."""
        group = self._groups.get(schema)
        if group is None:
            group = self._groups[schema] = [0, xxhash.xxh3_128()]
        group[0] += len(texts)
        if texts:  # one update of the joined texts: the same bytes as one update per text
            group[1].update("\n".join(texts).encode() + b"\n")

    def extend_encoded(self, schema: Schema, texts: list[bytes]) -> None:
        """``extend`` with the texts already UTF-8 encoded (ascending byte order, which is
        code point order)."""
        group = self._groups.get(schema)
        if group is None:
            group = self._groups[schema] = [0, xxhash.xxh3_128()]
        group[0] += len(texts)
        if texts:
            group[1].update(b"\n".join(texts))
            group[1].update(b"\n")

    def finish(self, locations: Iterable[str]) -> DateEntry:
        """The date's entry, given the locations of its malformed rows (any order)."""
        groups = sorted(
            (encode(_schema_value(schema)), schema, count, h.hexdigest())
            for schema, (count, h) in self._groups.items()
        )
        content = digest(
            "rootdate",
            [
                ROOT_HASH_FORMAT,
                [[_schema_value(s), n, g] for _, s, n, g in groups],
                sorted(locations),
            ],
        )
        rows = digest("rootrows", sorted([n, g] for _, _, n, g in groups))
        return DateEntry(
            sum(n for _, _, n, _ in groups), content, tuple(s for _, s, _, _ in groups), rows
        )


def _schema_value(schema: Schema) -> list[list[str]]:
    return [list(column) for column in schema]


def schema_change(
    old: Sequence[Sequence[Sequence[str]]], new: Sequence[Sequence[Sequence[str]]]
) -> str:
    """What changed between two dates' schemas (``DateEntry.schemas``, or their JSON form),
    in words: "columns open, close swapped", "column close renamed to Close", "column volume
    int -> float", "column x added" ...; "" when they are equal."""
    before = [tuple((name, kind) for name, kind in s) for s in old]
    after = [tuple((name, kind) for name, kind in s) for s in new]
    if before == after:
        return ""
    gone = [s for s in before if s not in after]
    came = [s for s in after if s not in before]
    if len(gone) == len(came) == 1:
        return _columns_change(gone[0], came[0])
    return f"file schemas {_show(gone)} -> {_show(came)}"


def _show(schemas: list[Schema]) -> str:
    return "; ".join(", ".join(f"{n}:{k}" for n, k in s) for s in schemas) or "none"


def _columns_change(old: Schema, new: Schema) -> str:
    old_names = [n for n, _ in old]
    new_names = [n for n, _ in new]
    old_kinds, new_kinds = dict(old), dict(new)
    removed = [n for n in old_names if n not in new_kinds]
    added = [n for n in new_names if n not in old_kinds]
    renamed: dict[str, str] = {}
    if len(old_names) == len(new_names):  # a new name where an old one was: a rename
        renamed = {o: n for o, n in zip(old_names, new_names) if o in removed and n in added}
        removed = [n for n in removed if n not in renamed]
        added = [n for n in added if n not in renamed.values()]
    words = []
    for o, n in renamed.items():
        kinds = f" ({old_kinds[o]} -> {new_kinds[n]})" if old_kinds[o] != new_kinds[n] else ""
        words.append(f"column {o} renamed to {n}{kinds}")
    before = [renamed.get(n, n) for n in old_names if n not in removed]
    after = [n for n in new_names if n not in added]
    if before != after:
        moved = [i for i, (a, b) in enumerate(zip(before, after)) if a != b]
        i, j = (moved + [0, 0])[:2]
        if len(moved) == 2 and (before[i], before[j]) == (after[j], after[i]):
            words.append(f"columns {before[i]}, {before[j]} swapped")
        else:
            words.append(f"columns reordered: {', '.join(before)} -> {', '.join(after)}")
    words += [f"column {n} removed" for n in removed]
    words += [f"column {n} added" for n in added]
    words += [
        f"column {n} {old_kinds[n]} -> {new_kinds[n]}"
        for n in after
        if n in old_kinds and old_kinds[n] != new_kinds[n]
    ]
    return ", ".join(words)


def width_problem(name: str, line: int, fields: int, width: int) -> str:
    """The location of a row with the wrong number of fields: "p.csv:7: 6 fields, the
    header has 7"."""
    return f"{name}:{line}: {_fields(fields, width)}"


def _fields(fields: int, width: int) -> str:
    return f"{fields} field{'' if fields == 1 else 's'}, the header has {width}"


def skip_problem(name: str, line: int, text_date: str, has_date: bool) -> str:
    """Why a row of the right width that cannot be given to a user (its date is not a date,
    or its user is empty) is skipped, with its location."""
    what = "missing user" if has_date else f"bad date {text_date!r}"
    return f"{name}:{line}: {what}; row skipped"


def unowned_problem(name: str, line: int, fields: int, width: int) -> str:
    """Why a row of the wrong width that cannot be given to one user is skipped."""
    return (
        f"{name}:{line}: {_fields(fields, width)}, and no single known user and date can be "
        "read from it; row skipped"
    )


def readings(fields: list[str], di: int, ui: int, width: int) -> list[tuple[str, str]]:
    """The (date text, user) a row of the wrong width may hold: its fields read from the
    left, from the right, or the lower-indexed of the two columns from the left and the
    other from the right (the missing or extra fields lie between them). Only readings with
    both fields present and a non-empty user; the caller keeps those with a valid date and
    a known user and gives the row to the user when exactly one (date, user) remains."""
    shift = len(fields) - width
    lo = min(di, ui)
    out = []
    for d, u in (
        (di, ui),
        (di + shift, ui + shift),
        (di if di == lo else di + shift, ui if ui == lo else ui + shift),
    ):
        if 0 <= d < len(fields) and 0 <= u < len(fields) and fields[u]:
            out.append((fields[d], fields[u]))
    return out


def parse_int(text: str) -> int | None:
    """``text`` as an integer by Python's ``int`` (signs, surrounding blanks, ``_``
    separators), else None."""
    try:
        return int(text)
    except ValueError:
        return None


@dataclass(frozen=True, slots=True)
class TypedColumn:
    """One column of a file's well-formed rows, typed by the module docstring's rules, held
    without a Python object per value.

    Attributes:
        kind: "int", "float" or "str" (the schema's kind; the date and user columns are "str"
            here: they keep their text).
        values: ``int``: int64, ``float``: float64 (0 where ``missing``); ``str``: int32 codes
            into ``labels``; or an object array of the final values (``None`` included), for
            integers beyond int64.
        missing: bool, True where the value is None (an empty field or a malformed value);
            None when no value is missing or ``values`` is an object / code array.
        labels: ``str`` only: the distinct values (``None`` for an empty field), object array.
    """

    kind: str
    values: np.ndarray
    missing: np.ndarray | None = None
    labels: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.values)

    def tolist(self) -> list[Any]:
        """The values as the per-user rows hold them: Python ``int`` / ``float`` / ``str`` or
        ``None``, one per row (a new list each call)."""
        if self.labels is not None:
            return self.labels[self.values].tolist()  # type: ignore[no-any-return]
        if self.missing is None:
            return self.values.tolist()  # type: ignore[no-any-return]
        out = self.values.astype(object)  # Python int / float, exactly as tolist() gives
        out[self.missing] = None
        return out.tolist()  # type: ignore[no-any-return]

    def objects(self) -> np.ndarray:
        """The values of ``tolist`` as an object array."""
        if self.labels is not None:
            return self.labels[self.values]  # type: ignore[no-any-return]
        if self.values.dtype == object:
            return self.values
        return _objects(self.tolist())

    def floats(self) -> np.ndarray:
        """A numeric column as float64, NaN where the value is None (for vectorised readers).

        Raises:
            TypeError: a ``str`` column.
        """
        if self.kind == "str":
            raise TypeError("a str column has no float values")
        if self.values.dtype == object:
            return np.array([np.nan if v is None else v for v in self.values], dtype=np.float64)
        out = self.values.astype(np.float64)
        if self.missing is not None:
            out[self.missing] = np.nan
        return out


class _ColumnLists(Sequence[list[Any]]):
    """``FileRows.columns``: column ``c`` as a list of Python values, built on each access
    (read a column once, then index the list; ``FileRows.typed`` has the arrays)."""

    __slots__ = ("_typed",)

    def __init__(self, typed: list[TypedColumn]) -> None:
        self._typed = typed

    def __len__(self) -> int:
        return len(self._typed)

    def __getitem__(self, c: int) -> list[Any]:  # type: ignore[override]
        return self._typed[c].tolist()


class FileRows:
    """One file's rows given to users, as typed columns (``TypedColumn``).

    Attributes:
        header: column names.
        typed: per column, the typed values of the file's well-formed rows (the rows with as
            many fields as the header, skipped and malformed ones included).
        kept_positions: int64 positions (into ``typed``) of the rows given to a user, file
            order; None when every well-formed row is given.
        date_codes / user_codes: int32, per kept row, its date's index into ``date_values``
            and its user's into ``user_values``.
        date_values / user_values: the file's distinct dates (``datetime.date``, None for a
            text that is not a date: no kept row has it) and user ids.

    Views (built on each access, for readers that want Python objects): ``columns`` (per
    column a list of values), ``kept`` (positions), ``dates`` and ``users`` (per kept row).
    """

    __slots__ = (
        "date_codes",
        "date_values",
        "header",
        "kept_positions",
        "typed",
        "user_codes",
        "user_values",
    )

    def __init__(
        self,
        header: list[str],
        typed: list[TypedColumn],
        kept_positions: np.ndarray | None,
        date_codes: np.ndarray,
        date_values: list[dt.date | None],
        user_codes: np.ndarray,
        user_values: list[str],
    ) -> None:
        self.header = header
        self.typed = typed
        self.kept_positions = kept_positions
        self.date_codes = date_codes
        self.date_values = date_values
        self.user_codes = user_codes
        self.user_values = user_values

    def __getstate__(self) -> tuple[Any, ...]:
        return tuple(getattr(self, name) for name in self.__slots__)

    def __setstate__(self, state: tuple[Any, ...]) -> None:
        for name, value in zip(self.__slots__, state, strict=True):
            setattr(self, name, value)

    @property
    def columns(self) -> Sequence[list[Any]]:
        """Per column, its values as a list (``TypedColumn.tolist``), built on each access."""
        return _ColumnLists(self.typed)

    @property
    def kept(self) -> Sequence[int]:
        """Positions (into the columns) of the rows given to a user, file order."""
        if self.kept_positions is None:
            return range(len(self.date_codes))
        return self.kept_positions.tolist()  # type: ignore[no-any-return]

    @property
    def dates(self) -> list[dt.date]:
        """Each kept row's date."""
        return _objects(self.date_values)[self.date_codes].tolist()  # type: ignore[no-any-return]

    @property
    def users(self) -> list[str]:
        """Each kept row's user."""
        return _objects(self.user_values)[self.user_codes].tolist()  # type: ignore[no-any-return]

    def kept_users(self) -> list[str]:
        """The distinct users of the kept rows."""
        return [self.user_values[k] for k in np.unique(self.user_codes).tolist()]


def _objects(values: Sequence[Any]) -> np.ndarray:
    """``values`` as a 1-D object array (never a 2-D one, whatever the values are)."""
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


@dataclass(slots=True)
class Dataset:
    """A parsed dataset: rows by date and user, and the per-date index.

    Attributes:
        name: the dataset's config name.
        dates: available dates, ascending.
        files: the rows given to users, per file as typed columns (``FileRows``).
        by_date: (property, built on first use) date -> user -> rows of that user on that
            date (file order).
        index: date -> DateEntry.
        malformed: number of skipped rows plus values that could not be parsed.
        problems: up to 20 examples, "file:line: what".
        schema: column -> "int" | "float" | "str" | "date" | "user", as parsed (the
            simulation fabricates rows from it).
        bad_rows: (date, user) -> locations of that user's malformed rows that date (a value
            that is not a number in a numeric column). The user fails every cell reading the
            dataset that date — with these locations — instead of being computed from
            partial rows.
    """

    name: str
    dates: list[dt.date]
    files: list[FileRows]
    index: dict[dt.date, DateEntry]
    malformed: int = 0
    problems: list[str] = field(default_factory=list)
    schema: dict[str, str] = field(default_factory=dict)
    bad_rows: dict[tuple[dt.date, str], list[str]] = field(default_factory=dict)
    _series: dict[str, tuple[list[int], list[int], list[Row]]] | None = None
    _span: tuple[str | None, str | None] = (None, None)

    _bad_users: dict[dt.date, dict[str, list[str]]] | None = None
    _bad_by_user: dict[str, list[tuple[dt.date, list[str]]]] | None = None
    _by_date: dict[dt.date, dict[str, list[Row]]] | None = None

    @property
    def by_date(self) -> dict[dt.date, dict[str, list[Row]]]:
        """date -> user (ascending) -> that user's rows that date, in file order. Built on
        first use: a columnar calculation reads ``files`` as arrays and never needs it."""
        if self._by_date is None:
            by_date: dict[dt.date, dict[str, list[Row]]] = {d: {} for d in self.dates}
            for part in self.files:
                header = part.header
                columns = [column.tolist() for column in part.typed]  # each column once
                if part.kept_positions is not None:
                    keep = part.kept_positions.tolist()
                    columns = [[column[j] for j in keep] for column in columns]
                for values, date, user in zip(zip(*columns), part.dates, part.users, strict=True):
                    per_user = by_date[date]
                    rows = per_user.get(user)
                    if rows is None:
                        rows = per_user[user] = []
                    rows.append(dict(zip(header, values)))
            self._by_date = {d: dict(sorted(by_date[d].items())) for d in self.dates}
        return self._by_date

    @property
    def bad_count(self) -> int:
        """User-dates with malformed rows."""
        return len(self.bad_rows)

    @property
    def skipped(self) -> int:
        """Rows given to no user (the malformed rows that are not some user's bad rows)."""
        return self.malformed - sum(len(found) for found in self.bad_rows.values())

    def kept_rows(self) -> tuple[np.ndarray, list[str], np.ndarray]:
        """Every row given to a user (files in order, each in file order), vectorised:
        ``(date_pos, users, user_pos)``: int64 position of the row's date in ``dates``, the
        distinct users of those rows (ascending), int64 position of the row's user in them.
        Same rows and order as ``FileRows.dates`` / ``users`` of ``files`` one after another.
        """
        position = {d: i for i, d in enumerate(self.dates)}
        users = sorted({u for part in self.files for u in part.kept_users()})
        user_position = {u: i for i, u in enumerate(users)}
        date_pos, user_pos = [], []
        for part in self.files:
            # a date or user of the file's other rows (skipped ones) gets -1: no kept row has it
            of_date = np.array(
                [-1 if d is None else position.get(d, -1) for d in part.date_values], np.int64
            )
            of_user = np.array([user_position.get(u, -1) for u in part.user_values], np.int64)
            date_pos.append(of_date[part.date_codes])
            user_pos.append(of_user[part.user_codes])
        empty = np.zeros(0, dtype=np.int64)
        return (
            np.concatenate(date_pos) if date_pos else empty,
            users,
            np.concatenate(user_pos) if user_pos else empty,
        )

    def kept_values(self, name: str) -> np.ndarray:
        """Column ``name`` of every row given to a user, in ``kept_rows`` order: float64 with
        NaN for None when the schema's kind of ``name`` is ``int`` or ``float``, else an
        object array of the values (None where a file has no such column).

        Raises:
            KeyError: no file has a column ``name``.
        """
        kind = self.schema[name]
        numeric = kind in ("int", "float")
        parts = []
        for part in self.files:
            count = len(part.date_codes)
            if name not in part.header:
                parts.append(np.full(count, np.nan) if numeric else np.full(count, None, object))
                continue
            column = part.typed[part.header.index(name)]
            values = column.floats() if numeric else column.objects()
            parts.append(values if part.kept_positions is None else values[part.kept_positions])
        if not parts:
            return np.zeros(0, dtype=np.float64 if numeric else object)
        return np.concatenate(parts)

    def stream(
        self, date: dt.date, lo: str | None = None, hi: str | None = None
    ) -> Iterator[tuple[str, tuple[list[Row], list[str]]]]:
        """``(user, (rows, bad))`` for every user with rows on ``date`` with ``lo <= user < hi``,
        users ascending; ``bad`` lists the locations of the user's malformed rows (the user
        then fails that date; ``rows`` excludes them). Same contract as
        ``StoredDataset.stream``."""
        if self._bad_users is None:
            self._bad_users = {}
            for (d, user), where in self.bad_rows.items():
                self._bad_users.setdefault(d, {})[user] = where
        per_user = self.by_date.get(date, {})
        bad = self._bad_users.get(date, {})
        no_rows: list[Row] = []
        no_problems: list[str] = []
        if not bad and lo is None and hi is None:  # the nightly case: no filtering at all
            return ((user, (rows, no_problems)) for user, rows in per_user.items())
        users: Iterable[str] = sorted({*per_user, *bad}) if bad else per_user  # sorted dict
        users = [u for u in users if (lo is None or u >= lo) and (hi is None or u < hi)]
        return ((user, (per_user.get(user, no_rows), bad.get(user, no_problems))) for user in users)

    def rows_on(self, date: dt.date) -> list[Row]:
        """Every well-formed row of ``date`` (users ascending, then file order)."""
        return [row for rows in self.by_date.get(date, {}).values() for row in rows]

    def user_sample(self, limit: int = 10_000) -> list[str]:
        """Up to about ``limit`` distinct users, evenly spaced in id order (for partitions)."""
        # From the files' user codes: a columnar run never builds ``by_date``.
        users = sorted({u for part in self.files for u in part.kept_users()})
        return users[:: max(1, len(users) // limit)]

    def history(self, user: str, date: dt.date, lookback: int) -> list[Row]:
        """The user's rows over the last ``lookback`` available dates up to and including
        ``date`` (oldest first). ``date`` itself need not be available."""
        first, stop = self._span
        if (first is not None and user < first) or (stop is not None and user >= stop):
            self.focus(None, None)  # outside this process's users after all: index them all
        if self._series is None:
            self._build_series()
        assert self._series is not None
        series = self._series.get(user)
        if series is None:
            return []
        end = bisect.bisect_right(self.dates, date)  # dates[:end] are <= date
        positions, starts, rows = series
        lo = bisect.bisect_left(positions, end - lookback)
        hi = bisect.bisect_left(positions, end)
        return rows[starts[lo] : starts[hi]]

    def history_reader(self, date: dt.date, lookback: int) -> Callable[[str], list[Row]]:
        """``user -> history(user, date, lookback)``, the date's position found once (a block
        reads one date's history for each of its users)."""
        if self._series is None:
            self._build_series()
        assert self._series is not None
        series, (first, stop) = self._series, self._span
        end = bisect.bisect_right(self.dates, date)  # dates[:end] are <= date
        start, left = end - lookback, bisect.bisect_left

        def read(user: str) -> list[Row]:
            if (first is not None and user < first) or (stop is not None and user >= stop):
                return self.history(user, date, lookback)  # re-indexes every user
            found = series.get(user)
            if found is None:
                return []
            positions, starts, rows = found
            return rows[starts[left(positions, start)] : starts[left(positions, end)]]

        return read

    def window_problems(self, user: str, date: dt.date, lookback: int) -> list[str]:
        """Locations of the user's malformed rows in its history window (the last
        ``lookback`` available dates up to ``date``, as ``history``) before ``date`` itself,
        whose problems ``stream`` reports: a window missing a malformed row is not the user's history, so
        the user fails that date too. Same contract as ``StoredDataset.window_problems``."""
        if not self.bad_rows or lookback < 2:
            return []
        if self._bad_by_user is None:
            self._bad_by_user = {}
            for (d, u), where in sorted(self.bad_rows.items()):
                self._bad_by_user.setdefault(u, []).append((d, where))
        bad = self._bad_by_user.get(user)
        if not bad:
            return []
        end = bisect.bisect_right(self.dates, date)  # dates[:end] are <= date
        if not end:
            return []
        first = self.dates[max(0, end - lookback)]
        return [w for d, where in bad if first <= d < date for w in where]

    def focus(self, lo: str | None, hi: str | None) -> None:
        """Declare that this process reads the history of users ``lo <= user < hi`` only (a
        worker's span), so the history index covers just them."""
        if (lo, hi) != self._span:
            self._span = (lo, hi)
            self._series = None

    def _build_series(self) -> None:
        # Per user: the date positions it has rows on, where each date's rows start in one
        # flat list (plus an end sentinel), so a history window is a single slice.
        series: dict[str, tuple[list[int], list[int], list[Row]]] = {}
        lo, hi = self._span
        for pos, date in enumerate(self.dates):
            per_user: Iterable[tuple[str, list[Row]]] = self.by_date[date].items()
            if lo is not None or hi is not None:
                per_user = [
                    (u, r)
                    for u, r in per_user
                    if (lo is None or u >= lo) and (hi is None or u < hi)
                ]
            for user, rows in per_user:
                entry = series.get(user)
                if entry is None:
                    entry = series[user] = ([], [0], [])
                entry[0].append(pos)
                entry[2].extend(rows)
                entry[1].append(len(entry[2]))
        self._series = series


class RootData(Protocol):
    """What the executor reads from a root dataset, held in memory (``Dataset``) or streamed
    from its root store (``rootstore.StoredDataset``)."""

    name: str
    dates: list[dt.date]
    index: dict[dt.date, DateEntry]
    malformed: int
    problems: list[str]
    schema: dict[str, str]

    @property
    def bad_count(self) -> int: ...

    @property
    def skipped(self) -> int: ...

    def stream(
        self, date: dt.date, lo: str | None = None, hi: str | None = None
    ) -> Iterator[tuple[str, tuple[list[Row], list[str]]]]: ...

    def rows_on(self, date: dt.date) -> list[Row]: ...

    def history(self, user: str, date: dt.date, lookback: int) -> list[Row]: ...

    def window_problems(self, user: str, date: dt.date, lookback: int) -> list[str]: ...

    def user_sample(self, limit: int = 10_000) -> list[str]: ...


def files_of(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(SUFFIXES))
    raise RootDataError(f"root data path {path} does not exist; fix its 'path' in the config")


class FileSource:
    """The built-in source: a file or folder of CSV / gzipped CSV / Parquet files."""

    def __init__(self, config: RootDataConfig):
        self.config = config

    def digest(self) -> str:
        """Digest of the raw bytes of every file plus the parsing settings (no parsing).

        Raises:
            RootDataError: the path does not exist or holds no readable file, or a
                single-file source cannot be read.
        """
        files = files_of(self.config.path)
        if not files:
            raise RootDataError(
                f"root data folder {self.config.path} holds no .csv, .csv.gz or .parquet file"
            )
        h = xxhash.xxh3_128()
        # ROOT_HASH_FORMAT: a stored root index made by other hashing rules must not be
        # reused (app.Orchestrator._index_root_data re-reads a source whose digest changed).
        h.update(
            encode(
                [
                    "source",
                    1,
                    ROOT_HASH_FORMAT,
                    self.config.date_column,
                    self.config.user_column,
                ]
            )
        )
        for path in files:
            h.update(encode(path.name))
            try:
                with path.open("rb") as f:
                    while chunk := f.read(1 << 20):
                        h.update(chunk)
            except OSError as e:
                if len(files) == 1:
                    raise RootDataError(
                        f"cannot read root data file {path}: {e.strerror or e}"
                    ) from e
                # A folder's unreadable file is skipped by the reader and reported; its
                # becoming readable later must change the digest.
                h.update(encode(["unreadable", path.name]))
        return h.hexdigest()

    def complete_through(self) -> dt.date | None:
        """The last complete date by the source's completeness marker (``complete_marker``):
        None without a marker configured; ``date.min`` while the marker file does not exist
        (nothing is complete yet).

        Raises:
            RootDataError: the marker does not hold a YYYY-MM-DD date.
        """
        marker = self.config.complete_marker
        if marker is None:
            return None
        try:
            text = marker.read_text().strip()
        except FileNotFoundError:
            return dt.date.min
        except OSError as e:
            raise RootDataError(f"cannot read the completeness marker {marker}: {e}") from e
        try:
            return dt.date.fromisoformat(text)
        except ValueError:
            raise RootDataError(
                f"completeness marker {marker} holds {text[:40]!r}, not a YYYY-MM-DD date; "
                f"write the last complete date of [root_data.{self.config.name}] into it"
            ) from None

    def raw_size(self) -> int:
        """Uncompressed bytes of the source's files (a gzip file's size is read from its
        trailer, modulo 4 GiB; a Parquet file counts its stored size)."""
        total = 0
        for path in files_of(self.config.path):
            size = path.stat().st_size
            if path.name.endswith(".gz") and size >= 4:
                with path.open("rb") as f:
                    f.seek(-4, 2)
                    size = max(size, int.from_bytes(f.read(4), "little"))
            total += size
        return total

    def load_cached(self, folder: Path, digest: str) -> Dataset:
        """``load()``, through a parsed copy in ``folder`` keyed by the source's ``digest``
        (its bytes and parsing settings): a run that computes from an unchanged source reads
        the copy (a fraction of a parse) instead of parsing every file again. The copy is
        written atomically (a crash leaves none or a whole one); an unreadable copy is
        replaced; copies of other versions of the same source are removed.

        Raises:
            RootDataError: as ``load``.
        """
        name = f"{self.config.name}-{digest}-r{ROOT_HASH_FORMAT}p{PARSED_FORMAT}.pickle"
        path = folder / name
        try:
            with path.open("rb") as f, paused_gc(freeze=True):
                found = pickle.load(f)  # our own working file (work_dir), never user input
            if isinstance(found, Dataset):
                return found
        except FileNotFoundError:
            pass
        except Exception:  # noqa: BLE001 - damaged or from another version: parse again
            path.unlink(missing_ok=True)
        dataset = self.load()
        try:
            folder.mkdir(parents=True, exist_ok=True)
            tmp = folder / f".{name}.{os.getpid()}.tmp"
            with tmp.open("wb") as f:
                pickle.dump(dataset, f, protocol=5)
            os.replace(tmp, path)
            for old in folder.glob(f"{self.config.name}-*.pickle"):
                if old != path and old.name.count("-") == name.count("-"):
                    old.unlink(missing_ok=True)
        except OSError:
            pass  # a cache that cannot be written is only slower
        return dataset

    def load(self) -> Dataset:
        """Parse every file into a ``Dataset``.

        Raises:
            RootDataError: a file cannot be read, or the date or user column is missing.
        """
        with paused_gc(freeze=True):  # the rows live as long as the run: see memory.py
            return self._load()

    def _load(self) -> Dataset:
        texts: dict[dt.date, dict[Schema, list[bytes]]] = {}  # row texts to hash, per schema
        locations: dict[dt.date, list[str]] = {}
        malformed = 0
        problems: list[str] = []
        schema: dict[str, str] = {}
        # (date, user) -> (file number, line, location) of that user's malformed rows
        bad: dict[tuple[dt.date, str], list[tuple[int, int, str]]] = {}
        known: set[str] = set()  # users of the rows of the right width
        # Rows of the wrong width, given to a user once every file is read (``readings``).
        pending: list[tuple[int, Schema, bytes, str, int, int, int, list[tuple[str, str]]]] = []
        parsed_dates: dict[str, dt.date | None] = {}
        files_rows: list[FileRows] = []

        def parse_date(text: str) -> dt.date | None:
            if text not in parsed_dates:
                try:
                    parsed_dates[text] = dt.date.fromisoformat(text)
                except ValueError:
                    parsed_dates[text] = None
            return parsed_dates[text]

        def add_bad(date: dt.date, user: str, f: int, line: int, where: str) -> None:
            bad.setdefault((date, user), []).append((f, line, where))
            locations.setdefault(date, []).append(where)

        files = files_of(self.config.path)
        for f, path in enumerate(files):
            try:
                raw = self._read(path)
            except RootDataError as e:
                if len(files) == 1:
                    raise
                # One unreadable file of a folder: its dates are simply unavailable (NO_DATA)
                # and the reason is reported; the other files still count.
                problems.append(f"{path.name}: unreadable, skipped ({e})")
                continue
            header = raw.header
            for column in (self.config.date_column, self.config.user_column):
                if column not in header:
                    raise RootDataError(
                        f"{path}: column '{column}' not found (columns: {', '.join(header)}); "
                        f"fix date_column / user_column of [root_data.{self.config.name}]"
                    )
            width = len(header)
            di = header.index(self.config.date_column)
            ui = header.index(self.config.user_column)
            lines = raw.lines
            n = len(lines)
            # The date and user columns keep their text: their distinct values, and per row
            # the index of its value.
            date_codes, date_texts = _encode(raw.columns[di])
            user_codes, user_values = _encode(raw.columns[ui])
            date_values = [parse_date(t) for t in date_texts]
            skip = np.zeros(n, dtype=bool)
            if None in date_values:
                skip |= np.array([d is None for d in date_values], dtype=bool)[date_codes]
            if "" in user_values:
                skip |= np.array([not u for u in user_values], dtype=bool)[user_codes]
            skipped = np.flatnonzero(skip).tolist()
            malformed += len(skipped)
            for j in skipped[: max(0, 20 - len(problems))]:
                date_text = date_texts[date_codes[j]]
                problems.append(
                    skip_problem(path.name, lines[j], date_text, parse_date(date_text) is not None)
                )
            typed: list[TypedColumn] = []
            kinds: list[str] = []
            bad_cells: dict[int, str] = {}  # row -> its first malformed value, header order
            for c, name in enumerate(header):
                if c in (di, ui):  # their text as it is, "" included
                    codes, labels = (
                        (date_codes, date_texts) if c == di else (user_codes, user_values)
                    )
                    typed.append(TypedColumn("str", codes, labels=_objects(labels)))
                    kinds.append("date" if c == di else "user")
                else:
                    typed_column, failures = _type_column(raw.columns[c])
                    typed.append(typed_column)
                    kinds.append(typed_column.kind)
                    for j, value in failures:
                        if j not in bad_cells:
                            bad_cells[j] = (
                                f"{path.name}:{lines[j]}: {name}={value!r} is not a number"
                            )
                raw.columns[c] = None  # type: ignore[call-overload]  # freed as typed
            for name, kind in zip(header, kinds):
                if schema.get(name) in (None, "int") or kind == "str":
                    schema[name] = kind  # across files, the widest type wins
            file_schema: Schema = tuple(zip(header, kinds))
            pending.extend(
                (
                    f,
                    file_schema,
                    text,
                    path.name,
                    line,
                    len(fields),
                    width,
                    readings(fields, di, ui, width),
                )
                for fields, text, line in raw.wrong
            )
            valid = np.flatnonzero(~skip) if skipped else None
            known.update(
                user_values[k]
                for k in np.unique(user_codes if valid is None else user_codes[valid]).tolist()
            )
            # Every row whose date and user are readable is hashed (a corrected row changes
            # the hash), grouped by date: one stable sort of the rows by date code.
            codes = np.where(skip, -1, date_codes) if skipped else date_codes
            order = np.argsort(codes, kind="stable")
            ordered = codes[order]
            bounds = (np.flatnonzero(np.diff(ordered)) + 1).tolist()
            text_array = _objects(raw.texts)
            raw.texts = []
            for start, stop in zip([0, *bounds], [*bounds, n], strict=True):
                if start == stop:
                    continue
                code = int(ordered[start])
                if code < 0:
                    continue  # skipped rows: no date to hash them under
                group_date = date_values[code]
                assert group_date is not None
                per_schema = texts.setdefault(group_date, {})
                per_schema.setdefault(file_schema, []).extend(
                    text_array[order[start:stop]].tolist()
                )
            del text_array, order, ordered, codes
            failed = np.zeros(n, dtype=bool)
            for j in sorted(bad_cells):  # the user fails that date, with the row's location
                if skip[j]:
                    continue
                malformed += 1
                failed[j] = True
                date = date_values[date_codes[j]]
                assert date is not None
                add_bad(date, user_values[user_codes[j]], f, lines[j], bad_cells[j])
            given = ~(skip | failed)
            kept = None if given.all() else np.flatnonzero(given)
            files_rows.append(
                FileRows(
                    list(header),
                    typed,
                    kept,
                    date_codes if kept is None else date_codes[kept],
                    date_values,
                    user_codes if kept is None else user_codes[kept],
                    user_values,
                )
            )
        for f, file_schema, text, name, line, n_fields, width, options in pending:
            malformed += 1
            owners = {
                (date, user)
                for text_date, user in options
                if user in known and (date := parse_date(text_date)) is not None
            }
            if len(owners) != 1:
                if len(problems) < 20:
                    problems.append(unowned_problem(name, line, n_fields, width))
                continue
            ((date, user),) = owners
            texts.setdefault(date, {}).setdefault(file_schema, []).append(text)
            add_bad(date, user, f, line, width_problem(name, line, n_fields, width))
        index = {}
        for date, per_schema in texts.items():
            hasher = DateHasher()
            for group_schema, group in per_schema.items():
                group.sort()  # UTF-8 byte order is code point order
                hasher.extend_encoded(group_schema, group)
            index[date] = hasher.finish(locations.get(date, ()))
        dates = sorted(texts)
        return Dataset(
            name=self.config.name,
            dates=dates,
            files=files_rows,
            index=index,
            malformed=malformed,
            problems=problems[:20],
            schema=schema,
            bad_rows={key: [w for *_, w in sorted(found)] for key, found in bad.items()},
        )

    def _read(self, path: Path) -> _RawFile:
        """The file's fields and row texts (``_RawFile``).

        Raises:
            RootDataError: the file cannot be read (or decoded as UTF-8).
        """
        fmt = self.config.format or ("parquet" if path.name.endswith(".parquet") else "csv")
        try:
            if fmt == "parquet":
                return _raw_file(*_read_parquet(path))
            found = _read_plain_csv(path, (self.config.date_column, self.config.user_column))
            return found if found is not None else _raw_file(*_read_csv(path))
        except read_error_types as e:
            raise RootDataError(f"cannot read root data file {path}: {e}") from e


@dataclass(slots=True)
class _RawFile:
    """A file as read, before typing.

    Attributes:
        header: column names.
        columns: per column, the field texts of the rows with as many fields as the header
            (the *well-formed* rows), as Arrow large strings.
        texts: each well-formed row's canonical text (module docstring), UTF-8.
        lines: each well-formed row's line number.
        wrong: the other rows: (fields, canonical text, line number), file order.
    """

    header: list[str]
    columns: list[pa.Array]
    texts: list[bytes]
    lines: Sequence[int]
    wrong: list[tuple[list[str], bytes, int]]


def _raw_file(
    header: list[str], rows: list[list[str]], texts: list[str], numbers: list[int]
) -> _RawFile:
    """A ``_RawFile`` from rows of fields (as ``_read_csv`` gives them)."""
    import pyarrow as pa  # (only parsing needs Arrow: see the imports)

    width = len(header)
    fitting = [i for i, r in enumerate(rows) if len(r) == width]
    wrong = [(r, texts[i].encode(), numbers[i]) for i, r in enumerate(rows) if len(r) != width]
    good = rows if not wrong else [rows[i] for i in fitting]
    fields = list(zip(*good)) if good else [()] * width
    columns = [pa.array(list(c), type=pa.large_string()) for c in fields]
    return _RawFile(
        list(header),
        columns,
        [texts[i].encode() for i in fitting],
        [numbers[i] for i in fitting],
        wrong,
    )


def _read_plain_csv(path: Path, needed: tuple[str, str]) -> _RawFile | None:
    """A *plain* CSV file read fast (Arrow splits the fields, in C++, on several threads), or
    None when the file is not plain: then ``_read_csv`` reads it, by the same rules.

    Plain means: UTF-8, no quote and no carriage return anywhere, no blank line, a header
    holding the ``needed`` columns and at least two names, and every row with as many fields
    as the header. Then a line is a row, its fields are its text split at every comma, and
    its canonical text is the line itself (what ``_read_csv``'s own fast path does): Arrow
    with quoting, escapes and newlines in values off splits exactly so. The row count is
    checked against the lines so that any other reading falls back rather than differs.
    """
    import pyarrow as pa  # (only parsing needs Arrow: see the imports)
    import pyarrow.csv as pa_csv

    try:
        if path.name.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                data = f.read()
        else:
            data = path.read_bytes()
    except read_error_types:
        return None  # ``_read_csv`` raises the error, with its usual message
    if b'"' in data or b"\r" in data:
        return None
    if not data.isascii():
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            return None
    lines = data.split(b"\n")
    if lines[-1] == b"":
        lines.pop()  # the newline ending the last line
    if not lines or b"" in lines:
        return None  # an empty file, or a blank line (Arrow would read it as a row of empty fields)
    header = lines[0].decode("utf-8").split(",")
    width = len(header)
    if width < 2 or any(column not in header for column in needed):
        return None
    names = [f"c{i}" for i in range(width)]
    irregular: list[Any] = []

    def wrong_width(row: Any) -> str:
        irregular.append(row)
        return "skip"

    try:
        table = pa_csv.read_csv(
            pa.py_buffer(data),
            read_options=pa_csv.ReadOptions(
                column_names=names,
                skip_rows=1,
                use_threads=True,
                # A few big blocks, not Arrow's 1 MiB ones: as parallel on this machine's
                # cores, and far fewer chunks to join and fresh pages to fault in.
                block_size=min(max(len(data) // 4 + 1, 1 << 20), 1 << 30),
            ),
            parse_options=pa_csv.ParseOptions(
                delimiter=",",
                quote_char=False,
                double_quote=False,
                escape_char=False,
                newlines_in_values=False,
                ignore_empty_lines=False,
                invalid_row_handler=wrong_width,
            ),
            convert_options=pa_csv.ConvertOptions(
                # 32-bit offsets (half the memory) while no column can reach 2 GiB
                column_types=dict.fromkeys(
                    names, pa.string() if len(data) < 2**31 else pa.large_string()
                ),
                strings_can_be_null=False,
                quoted_strings_can_be_null=False,
                check_utf8=False,
            ),
        )
    except (pa.ArrowException, ValueError):
        return None
    del data
    rows = len(lines) - 1
    if irregular or table.num_rows != rows or table.num_columns != width:
        return None
    columns = [
        chunks.chunk(0) if chunks.num_chunks == 1 else chunks.combine_chunks()
        for chunks in table.columns
    ]
    del table
    return _RawFile(header, columns, lines[1:], range(2, rows + 2), [])


def _read_csv(path: Path) -> tuple[list[str], list[list[str]], list[str], list[int]]:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", newline="", encoding="utf-8") as f:  # type: ignore[operator]
        text = f.read()
    if not text.strip():
        return [], [], [], []
    rows: list[list[str]] = []
    texts: list[str]
    numbers: list[int] = []
    if '"' not in text and "\r" not in text:
        # Fast path: no quoting, so a line is a row and its text is its canonical form.
        lines = text.split("\n")
        header = lines[0].split(",")
        texts = []
        for number, line in enumerate(lines[1:], 2):
            if line:  # blank lines are no rows (but count as lines)
                rows.append(line.split(","))
                texts.append(line)
                numbers.append(number)
        return header, rows, texts, numbers
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader)
    start = reader.line_num + 1  # a quoted field may span lines: a row starts after the last
    for fields in reader:
        if fields:
            rows.append(fields)
            numbers.append(start)
        start = reader.line_num + 1
    return header, rows, [json.dumps(r) for r in rows], numbers


def _read_parquet(path: Path) -> tuple[list[str], list[list[str]], list[str], list[int]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise RootDataError(
            f"{path} is Parquet; install the parquet extra: pip install 'orchestrator[parquet]'"
        ) from e
    table = pq.read_table(path)
    columns = []
    for name in table.column_names:
        values = table.column(name).to_pylist()
        columns.append(
            [
                "" if v is None else (v.isoformat() if isinstance(v, dt.date) else str(v))
                for v in values
            ]
        )
    rows = [list(r) for r in zip(*columns)]
    # A Parquet "line" is the row's position, counted as in a CSV file (the header is line 1).
    return (
        list(table.column_names),
        rows,
        [json.dumps(r) for r in rows],
        list(range(2, len(rows) + 2)),
    )


def _to_float(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


# Field shapes that Python's ``int`` / ``float`` read exactly as Arrow's casts do, so those
# fields are converted in C++ and only the rest go through Python one by one. RE2 classes
# are ASCII and ``$`` is the end of the text (no trailing newline allowance).
# An integer of at most 18 digits fits int64; Arrow's cast reads it (after a "+" is dropped)
# as ``int`` does, leading zeros and "-0" included.
_INT64 = r"^[+-]?[0-9]{1,18}$"
# Every such text is what ``int`` reads; the others of ``_NUMBER`` hold "." or an exponent.
_INT = r"^[+-]?[0-9]+$"
# A plain decimal number, small enough that it neither overflows nor underflows a double
# (below 1e120, above 1e-120 unless 0): Python's ``float`` and Arrow's cast (fast_float)
# both round it correctly, so to the same double.
_NUMBER = r"^[+-]?([0-9]{1,20}\.?[0-9]{0,20}|\.[0-9]{1,20})([eE][+-]?[0-9]{1,2})?$"


# NumPy types of the Arrow arrays ``_numpy`` converts, by Arrow type name.
_NUMPY_TYPES = {"int32": np.int32, "int64": np.int64, "double": np.float64}


def _numpy(values: pa.Array) -> np.ndarray:
    """A null-free Arrow array of booleans or numbers as a NumPy array, read from its buffers
    (pyarrow's own ``to_numpy`` imports pandas: a third of a second of a run's start)."""
    import pyarrow as pa  # (only parsing needs Arrow: see the imports)

    if values.null_count:
        raise ValueError("an Arrow array with nulls")  # never: no field text is null
    n, buffer = len(values), values.buffers()[1]
    if pa.types.is_boolean(values.type):
        bits = np.unpackbits(np.frombuffer(buffer, np.uint8), bitorder="little")
        return bits[values.offset : values.offset + n].view(bool)
    dtype = np.dtype(_NUMPY_TYPES[str(values.type)])
    return np.frombuffer(buffer, dtype, n, values.offset * dtype.itemsize)


def _arrow(positions: np.ndarray) -> pa.Array:
    """int64 positions as an Arrow array, for ``take`` (from the buffer, as ``_numpy``)."""
    import pyarrow as pa  # (only parsing needs Arrow: see the imports)

    positions = np.ascontiguousarray(positions, dtype=np.int64)
    return pa.Array.from_buffers(pa.int64(), len(positions), [None, pa.py_buffer(positions)])


def _matches(values: pa.Array, pattern: str) -> np.ndarray:
    import pyarrow.compute as pc  # (only parsing needs Arrow: see the imports)

    return _numpy(pc.match_substring_regex(values, pattern))


def _encode(values: pa.Array) -> tuple[np.ndarray, list[str]]:
    """Dictionary-encode field texts: (int32 code per value, distinct texts)."""
    import pyarrow.compute as pc  # (only parsing needs Arrow: see the imports)

    encoded = pc.dictionary_encode(values)
    return (
        _numpy(encoded.indices).astype(np.int32, copy=False),
        encoded.dictionary.to_pylist(),
    )


def _text_column(values: pa.Array) -> TypedColumn:
    """A text column: each value its field's text, None for an empty field."""
    codes, distinct = _encode(values)
    return TypedColumn("str", codes, labels=_objects([t if t else None for t in distinct]))


def _type_column(values: pa.Array) -> tuple[TypedColumn, list[tuple[int, str]]]:
    """Type one column of field texts by the module docstring's rules.

    A column is numeric when at least 90 % of its non-empty values parse as numbers
    (Python's ``float``; a text column parses almost never); ``int`` when every such value is
    an integer as Python's ``int`` reads it, else ``float``; empty fields and the malformed
    values become None. Returns the column and, for a numeric one, (row, text) of each
    malformed value (a non-empty text that is not a number), rows ascending.
    """
    import pyarrow as pa  # (only parsing needs Arrow: see the imports)
    import pyarrow.compute as pc

    n = len(values)
    lengths = _numpy(pc.binary_length(values))
    empty = lengths == 0
    filled = n - int(np.count_nonzero(empty))
    if filled == 0:
        return _text_column(values), []
    plain = _plain_column(values, lengths, empty)
    if plain is not None:
        return plain, []
    # Integers only (the common case): a look at the first values tells a column that is
    # not, without scanning it all.
    head = min(n, 64)
    if (_matches(values.slice(0, head), _INT64) | empty[:head]).all():
        short = _matches(values, _INT64)
        if (short | empty).all():
            return _int_column(values, short, empty, [], []), []
    number = _matches(values, _NUMBER)
    # The fields Python reads, one by one: text, blanks, "nan", "1_000", long digit runs ...
    others = np.flatnonzero(~(number | empty))
    other_texts: list[str] = values.take(_arrow(others)).to_pylist() if len(others) else []
    other_floats = [_to_float(t) for t in other_texts]
    failures = [(j, t) for j, t, p in zip(others.tolist(), other_texts, other_floats) if p is None]
    if len(failures) > 0.1 * filled:
        return _text_column(values), []
    parsed = [
        (j, t, p) for j, t, p in zip(others.tolist(), other_texts, other_floats) if p is not None
    ]
    missing = empty.copy()
    missing[[j for j, _ in failures]] = True
    if all(parse_int(t) is not None for _, t, _ in parsed) and _all_integers(values, number):
        short = _matches(values, _INT64) if number.any() else number
        # The other integers (19 digits and more, or read by Python): ``int`` of the text.
        rows = [j for j, _ in _texts_at(values, number & ~short)] + [j for j, _, _ in parsed]
        ints = [int(t) for _, t in _texts_at(values, number & ~short)] + [
            int(t) for _, t, _ in parsed
        ]
        return _int_column(values, short, missing, rows, ints), failures
    out = np.zeros(n, dtype=np.float64)
    if number.any():
        out[number] = _cast(values, number, pa.float64())
    if parsed:
        out[[j for j, _, _ in parsed]] = [p for _, _, p in parsed]
    return TypedColumn("float", out, missing if missing.any() else None), failures


# The bytes of a *plain* number: digits, "-" and ".".
_PLAIN_BYTES = np.zeros(256, dtype=bool)
_PLAIN_BYTES[list(b"0123456789-.")] = True


def _plain_column(values: pa.Array, lengths: np.ndarray, empty: np.ndarray) -> TypedColumn | None:
    """The column when its non-empty fields are all *plain* numbers, by one Arrow cast, else
    None (``_type_column`` then looks at each shape).

    Plain: at most 40 bytes, each a digit, "-" or "." (no blank, "+", exponent, "nan" ...: so
    no overflow nor underflow either), and the cast succeeds. Over these bytes Arrow's casts
    accept exactly the texts Python's ``int`` / ``float`` accept (tests/test_parse_equivalence
    tries every text of up to 6 such bytes) and give the same value: an integer exactly, a
    decimal correctly rounded by both. Without a "." anywhere (and at most 18 bytes, within
    int64) the column is ``int``; with one, a value is not an integer, so it is ``float``.
    """
    import pyarrow as pa  # (only parsing needs Arrow: see the imports)
    import pyarrow.compute as pc

    if int(lengths.max()) > 40:
        return None
    width = 8 if pa.types.is_large_string(values.type) else 4
    offsets = np.frombuffer(
        values.buffers()[1], f"<i{width}", len(values) + 1, values.offset * width
    )
    data = np.frombuffer(values.buffers()[2], np.uint8)[int(offsets[0]) : int(offsets[-1])]
    if not _PLAIN_BYTES[data].all():
        return None
    dot = bool((data == ord(".")).any())
    if not dot and int(lengths.max()) > 18:
        return None
    chosen = values.take(_arrow(np.flatnonzero(~empty))) if empty.any() else values
    try:
        cast = _numpy(pc.cast(chosen, pa.float64() if dot else pa.int64()))
    except pa.ArrowInvalid:
        return None  # "1-2", "1.2.3", "-", "." ...: not all numbers
    if not empty.any():
        return TypedColumn("float" if dot else "int", cast)
    out = np.zeros(len(values), dtype=cast.dtype)
    out[~empty] = cast
    return TypedColumn("float" if dot else "int", out, empty)


def _all_integers(values: pa.Array, number: np.ndarray) -> bool:
    """Whether every ``number`` field is an integer (as ``int`` reads it): a float column is
    usually told by its first values, so those are looked at first."""
    where = np.flatnonzero(number)
    for part in (where[:64], where[64:]):
        if len(part) and not _matches(values.take(_arrow(part)), _INT).all():
            return False
    return True


def _texts_at(values: pa.Array, mask: np.ndarray) -> list[tuple[int, str]]:
    where = np.flatnonzero(mask)
    if not len(where):
        return []
    return list(zip(where.tolist(), values.take(_arrow(where)).to_pylist(), strict=True))


def _cast(values: pa.Array, mask: np.ndarray, to: pa.DataType) -> np.ndarray:
    """The ``mask`` fields of ``values`` cast to ``to`` by Arrow (a "+" sign dropped first,
    which Arrow's integer parser does not take)."""
    import pyarrow as pa  # (only parsing needs Arrow: see the imports)
    import pyarrow.compute as pc

    chosen = values if mask.all() else values.take(_arrow(np.flatnonzero(mask)))
    if pa.types.is_integer(to) and pc.any(pc.starts_with(chosen, "+")).as_py():
        chosen = pc.utf8_ltrim(chosen, characters="+")  # one "+" at most: ``_INT64``
    return _numpy(pc.cast(chosen, to))


def _int_column(
    values: pa.Array,
    short: np.ndarray,
    missing: np.ndarray,
    rows: Sequence[int],
    ints: Sequence[int],
) -> TypedColumn:
    """An ``int`` column: the ``short`` fields cast by Arrow, ``ints`` (Python's ``int`` of
    the other numbers) at ``rows``; int64 when every value fits, else Python ints."""
    import pyarrow as pa  # (only parsing needs Arrow: see the imports)

    n = len(values)
    out = np.zeros(n, dtype=np.int64)
    if short.any():
        out[short] = _cast(values, short, pa.int64())
    if ints:
        if all(-(2**63) <= v < 2**63 for v in ints):
            out[list(rows)] = ints
        else:  # beyond int64: the values themselves
            objects = out.astype(object)
            objects[list(rows)] = list(ints)
            objects[missing] = None
            return TypedColumn("int", objects)
    return TypedColumn("int", out, missing if missing.any() else None)


__all__ = [
    "ROOT_HASH_FORMAT",
    "Dataset",
    "DateEntry",
    "DateHasher",
    "FileSource",
    "RootData",
    "Schema",
    "files_of",
]
