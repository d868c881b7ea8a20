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
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import xxhash

from orchestrator.config import RootDataConfig
from orchestrator.errors import RootDataError
from orchestrator.fingerprint import digest, encode
from orchestrator.memory import paused_gc

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
PARSED_FORMAT = 1


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
        update = group[1].update
        for text in texts:
            update(text.encode() + b"\n")

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


@dataclass(slots=True)
class FileRows:
    """One file's rows given to users, as typed columns (``_type_columns``).

    Attributes:
        header: column names.
        columns: per column, the typed values of the file's well-formed rows.
        kept: positions (into ``columns``) of the rows given to a user, file order.
        dates / users: each kept row's date and user.
    """

    header: list[str]
    columns: list[list[Any]]
    kept: list[int]
    dates: list[dt.date]
    users: list[str]


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
                header, columns = part.header, part.columns
                for j, date, user in zip(part.kept, part.dates, part.users, strict=True):
                    per_user = by_date[date]
                    rows = per_user.get(user)
                    if rows is None:
                        rows = per_user[user] = []
                    rows.append(dict(zip(header, [column[j] for column in columns])))
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
        users = sorted({u for per_user in self.by_date.values() for u in per_user})
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
        texts: dict[dt.date, dict[Schema, list[str]]] = {}  # row texts to hash, per schema
        locations: dict[dt.date, list[str]] = {}
        malformed = 0
        problems: list[str] = []
        schema: dict[str, str] = {}
        # (date, user) -> (file number, line, location) of that user's malformed rows
        bad: dict[tuple[dt.date, str], list[tuple[int, int, str]]] = {}
        known: set[str] = set()  # users of the rows of the right width
        # Rows of the wrong width, given to a user once every file is read (``readings``).
        pending: list[tuple[int, Schema, str, str, int, int, int, list[tuple[str, str]]]] = []
        parsed_dates: dict[str, dt.date | None] = {}
        files_rows: list[FileRows] = []

        def parse_date(text: str) -> dt.date | None:
            if text not in parsed_dates:
                try:
                    parsed_dates[text] = dt.date.fromisoformat(text)
                except ValueError:
                    parsed_dates[text] = None
            return parsed_dates[text]

        def add_text(date: dt.date, file_schema: Schema, text: str) -> None:
            per_schema = texts.get(date)
            if per_schema is None:
                per_schema = texts[date] = {}
            group = per_schema.get(file_schema)
            if group is None:
                group = per_schema[file_schema] = []
            group.append(text)  # every row counts: a corrected row changes the hash

        def add_bad(date: dt.date, user: str, f: int, line: int, where: str) -> None:
            bad.setdefault((date, user), []).append((f, line, where))
            locations.setdefault(date, []).append(where)

        files = files_of(self.config.path)
        for f, path in enumerate(files):
            try:
                header, raw_rows, row_texts, numbers = self._read(path)
            except RootDataError as e:
                if len(files) == 1:
                    raise
                # One unreadable file of a folder: its dates are simply unavailable (NO_DATA)
                # and the reason is reported; the other files still count.
                problems.append(f"{path.name}: unreadable, skipped ({e})")
                continue
            for column in (self.config.date_column, self.config.user_column):
                if column not in header:
                    raise RootDataError(
                        f"{path}: column '{column}' not found (columns: {', '.join(header)}); "
                        f"fix date_column / user_column of [root_data.{self.config.name}]"
                    )
            width = len(header)
            di = header.index(self.config.date_column)
            ui = header.index(self.config.user_column)
            # Rows with the wrong number of fields are malformed, never padded or cut: they
            # take no part in typing the columns (their fields may be shifted).
            fitting = [i for i, r in enumerate(raw_rows) if len(r) == width]
            wrong = (
                [
                    (i, len(raw_rows[i]), readings(raw_rows[i], di, ui, width))
                    for i in sorted(set(range(len(raw_rows))) - set(fitting))
                ]
                if len(fitting) != len(raw_rows)
                else []
            )
            good = raw_rows if not wrong else [raw_rows[i] for i in fitting]
            columns = [list(c) for c in zip(*good)] if good else [[] for _ in header]
            # The raw rows are not needed past this point: freeing them before typing halves
            # the parse's peak memory (the typed columns replace them).
            del good, raw_rows
            bad_cells = _type_columns(header, columns, (di, ui), path, numbers, fitting)
            kinds = [
                "date" if c == di else "user" if c == ui else _kind(columns[c])
                for c in range(width)
            ]
            for name, kind in zip(header, kinds):
                if schema.get(name) in (None, "int") or kind == "str":
                    schema[name] = kind  # across files, the widest type wins
            file_schema: Schema = tuple(zip(header, kinds))
            pending.extend(
                (f, file_schema, row_texts[i], path.name, numbers[i], n, width, options)
                for i, n, options in wrong
            )
            # The rows given to users, kept as columns (``FileRows``): ``by_date`` builds
            # dicts from them only when a per-user calculation asks.
            part = FileRows(list(header), columns, [], [], [])
            files_rows.append(part)
            date_texts, user_texts = columns[di], columns[ui]  # both columns keep their text
            # Column-wise (C-level map and NumPy), as the parse runs over every row.
            parsed = {t: parse_date(t) for t in set(date_texts)}
            row_dates = list(map(parsed.__getitem__, date_texts))
            skipped: set[int] = set()
            if None in parsed.values() or not all(user_texts):
                for j, (date, user) in enumerate(zip(row_dates, user_texts)):
                    if date is None or not user:
                        skipped.add(j)
                        malformed += 1
                        if len(problems) < 20:
                            problems.append(
                                skip_problem(
                                    path.name, numbers[fitting[j]], date_texts[j], date is not None
                                )
                            )
            valid = [j for j in range(len(fitting)) if j not in skipped] if skipped else None
            known.update(user_texts if valid is None else (user_texts[j] for j in valid))
            texts_here = row_texts if not wrong else [row_texts[i] for i in fitting]
            if texts_here:
                dates_in = list(parsed)
                code_of = {t: k for k, t in enumerate(dates_in)}
                codes = np.fromiter(map(code_of.__getitem__, date_texts), np.int64, len(fitting))
                if valid is not None:
                    keep = np.ones(len(fitting), dtype=bool)
                    keep[list(skipped)] = False
                    codes = np.where(keep, codes, -1)
                order = np.argsort(codes, kind="stable")
                ordered = codes[order]
                bounds = (np.flatnonzero(np.diff(ordered)) + 1).tolist()
                text_array = np.array(texts_here, dtype=object)[order]
                starts = [0, *bounds]
                for start, stop in zip(starts, [*bounds, len(ordered)], strict=True):
                    code = int(ordered[start])
                    if code < 0:
                        continue  # skipped rows: no date to hash them under
                    group_date = parsed[dates_in[code]]
                    assert group_date is not None
                    per_schema = texts.setdefault(group_date, {})
                    per_schema.setdefault(file_schema, []).extend(text_array[start:stop].tolist())
            position = {i: j for j, i in enumerate(fitting)} if wrong else None
            failed_rows: set[int] = set()
            for i in sorted(bad_cells):  # the user fails that date, with the row's location
                j = i if position is None else position[i]
                if j in skipped:
                    continue
                malformed += 1
                failed_rows.add(j)
                add_bad(row_dates[j], user_texts[j], f, numbers[i], bad_cells[i])  # type: ignore[arg-type]
            if valid is None and not failed_rows:
                part.kept = list(range(len(fitting)))
                part.dates = row_dates  # type: ignore[assignment]
                part.users = list(user_texts)
            else:
                rows_in = valid if valid is not None else range(len(fitting))
                kept = [j for j in rows_in if j not in failed_rows]
                part.kept = kept
                part.dates = [row_dates[j] for j in kept]  # type: ignore[misc]
                part.users = [user_texts[j] for j in kept]
        for f, file_schema, text, name, line, n, width, options in pending:
            malformed += 1
            owners = {
                (date, user)
                for text_date, user in options
                if user in known and (date := parse_date(text_date)) is not None
            }
            if len(owners) != 1:
                if len(problems) < 20:
                    problems.append(unowned_problem(name, line, n, width))
                continue
            ((date, user),) = owners
            add_text(date, file_schema, text)
            add_bad(date, user, f, line, width_problem(name, line, n, width))
        index = {}
        for date, per_schema in texts.items():
            hasher = DateHasher()
            for group_schema, group in per_schema.items():
                group.sort()
                hasher.extend(group_schema, group)
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

    def _read(self, path: Path) -> tuple[list[str], list[list[str]], list[str], list[int]]:
        """Header, rows of raw field text (as many fields as the row has), one canonical text
        per row for hashing, and each row's line number in the file."""
        fmt = self.config.format or ("parquet" if path.name.endswith(".parquet") else "csv")
        try:
            if fmt == "parquet":
                return _read_parquet(path)
            return _read_csv(path)
        except read_error_types as e:
            raise RootDataError(f"cannot read root data file {path}: {e}") from e


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


def _kind(values: list[Any]) -> str:
    """The type name of a typed column: that of its first non-empty value."""
    for value in values:
        if value is not None:
            return "int" if type(value) is int else "float" if type(value) is float else "str"
    return "str"


def _to_float(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _type_columns(
    header: list[str],
    columns: list[list[Any]],
    keep: tuple[int, ...],
    path: Path,
    numbers: list[int],
    rows: list[int],
) -> dict[int, str]:
    """Type the columns in place (except ``keep``), by the module docstring's rules.

    ``columns`` hold the rows numbered ``rows`` (indexes into ``numbers``, the line numbers).
    A column is numeric when at least 90 % of its non-empty values parse as numbers (a text
    column parses almost never); the others are malformed values. Returns row index ->
    "file:line: column='value' is not a number" for each row holding one.
    """
    bad: dict[int, str] = {}
    for c, name in enumerate(header):
        if c in keep:
            continue
        values = columns[c]
        try:  # fast paths: every value an integer, or every value a number
            columns[c] = list(map(int, values))
            continue
        except ValueError:
            pass
        try:
            columns[c] = list(map(float, values))
            continue
        except ValueError:
            pass  # empty fields or text: the careful path below
        parsed = [_to_float(v) if v else None for v in values]
        filled = sum(1 for v in values if v)
        failures = [i for i, (v, p) in enumerate(zip(values, parsed)) if v and p is None]
        if filled == 0 or len(failures) > 0.1 * filled:
            columns[c] = [v if v else None for v in values]  # a text column
            continue
        if all(parse_int(v) is not None for v, p in zip(values, parsed) if p is not None):
            parsed = [None if p is None else int(v) for v, p in zip(values, parsed)]
        columns[c] = parsed
        for i in failures:
            row = rows[i]
            bad.setdefault(row, f"{path.name}:{numbers[row]}: {name}={values[i]!r} is not a number")
    return bad


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
