"""Root data: external raw inputs per date, read once per run and indexed.

A source is a file or a folder of CSV, gzipped CSV or Parquet files with a date column and a
user column. ``FileSource.digest()`` hashes the raw bytes (cheap: no parsing), so an unchanged
source reuses the stored root index and is never parsed by a run that executes nothing.
``FileSource.load()`` parses everything once into a ``Dataset``: rows grouped by date and user,
and per date a row count and a content hash (xxh3-128 over the date's rows, each as the JSON of
its raw field values, sorted — so the file's row order does not matter). A source too big to
hold, or read without history windows, is streamed from its root store instead
(``rootstore.py``: the same rows and hashes); both serve ``RootData``.

Parsing rules (documented for calculation authors):
* numeric columns become ``int`` (all values integral) or ``float``; empty fields become ``None``;
  other columns stay strings; the date and user columns keep their text.
* a column is numeric when at least 90 % of its non-empty values parse; a row holding one of
  the others is malformed: its user counts as a failed user, with the row's file and line, in
  every cell that reads the dataset that date (``Dataset.bad_rows``).
* a row without a user or with a date that is not ``YYYY-MM-DD`` is skipped and counted.
"""

from __future__ import annotations

import bisect
import csv
import datetime as dt
import gzip
import io
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import xxhash

from orchestrator.config import RootDataConfig
from orchestrator.errors import RootDataError
from orchestrator.fingerprint import encode
from orchestrator.memory import paused_gc

Row = dict[str, Any]
SUFFIXES = (".csv", ".csv.gz", ".parquet")
# What reading a damaged or misencoded file raises (the file is then unreadable, not a crash).
read_error_types = (OSError, UnicodeDecodeError, csv.Error, EOFError, gzip.BadGzipFile)


@dataclass(frozen=True, slots=True)
class DateEntry:
    """The root index of one dataset on one date (available iff ``row_count > 0``)."""

    row_count: int
    content_hash: str


@dataclass(slots=True)
class Dataset:
    """A parsed dataset: rows by date and user, and the per-date index.

    Attributes:
        name: the dataset's config name.
        dates: available dates, ascending.
        by_date: date -> user -> rows of that user on that date (file order).
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
    by_date: dict[dt.date, dict[str, list[Row]]]
    index: dict[dt.date, DateEntry]
    malformed: int = 0
    problems: list[str] = field(default_factory=list)
    schema: dict[str, str] = field(default_factory=dict)
    bad_rows: dict[tuple[dt.date, str], list[str]] = field(default_factory=dict)
    _series: dict[str, tuple[list[int], list[int], list[Row]]] | None = None
    _span: tuple[str | None, str | None] = (None, None)

    _bad_users: dict[dt.date, dict[str, list[str]]] | None = None
    _bad_by_user: dict[str, list[tuple[dt.date, list[str]]]] | None = None

    @property
    def bad_count(self) -> int:
        """User-dates with malformed rows."""
        return len(self.bad_rows)

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
        h.update(encode(["source", 1, self.config.date_column, self.config.user_column]))
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

    def load(self) -> Dataset:
        """Parse every file into a ``Dataset``.

        Raises:
            RootDataError: a file cannot be read, or the date or user column is missing.
        """
        with paused_gc(freeze=True):  # the rows live as long as the run: see memory.py
            return self._load()

    def _load(self) -> Dataset:
        by_date: dict[dt.date, dict[str, list[Row]]] = {}
        lines_by_date: dict[dt.date, list[str]] = {}
        malformed = 0
        problems: list[str] = []
        schema: dict[str, str] = {}
        bad_rows: dict[tuple[dt.date, str], list[str]] = {}
        files = files_of(self.config.path)
        for path in files:
            try:
                header, raw_rows, row_texts = self._read(path)
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
            columns = [list(c) for c in zip(*raw_rows)] if raw_rows else [[] for _ in header]
            del raw_rows
            di = header.index(self.config.date_column)
            ui = header.index(self.config.user_column)
            dates_raw, users = columns[di], columns[ui]
            bad_cells = _type_columns(header, columns, (di, ui), path)
            for c, name in enumerate(header):
                kind = "date" if c == di else "user" if c == ui else _kind(columns[c])
                if schema.get(name) in (None, "int") or kind == "str":
                    schema[name] = kind  # across files, the widest type wins
            parsed_dates: dict[str, dt.date | None] = {}
            for text in set(dates_raw):
                try:
                    parsed_dates[text] = dt.date.fromisoformat(text)
                except (TypeError, ValueError):
                    parsed_dates[text] = None
            for i, row_values in enumerate(zip(*columns)):
                date = parsed_dates[dates_raw[i]]
                user = users[i]
                if date is None or not user:
                    malformed += 1
                    if len(problems) < 20:
                        what = f"bad date {dates_raw[i]!r}" if date is None else "missing user"
                        problems.append(f"{path.name}:{i + 2}: {what}; row skipped")
                    continue
                per_user = by_date.get(date)
                if per_user is None:
                    per_user = by_date[date] = {}
                    lines_by_date[date] = []
                lines_by_date[date].append(row_texts[i])  # a corrected row changes the hash
                if i in bad_cells:  # the user fails that date, with the row's location
                    malformed += 1
                    bad_rows.setdefault((date, user), []).append(bad_cells[i])
                    continue
                rows = per_user.get(user)
                if rows is None:
                    rows = per_user[user] = []
                rows.append(dict(zip(header, row_values)))
        index = {}
        for date, texts in lines_by_date.items():
            texts.sort()
            h = xxhash.xxh3_128()
            h.update(encode("rootdate"))
            for text in texts:
                h.update(text.encode() + b"\n")
            index[date] = DateEntry(len(texts), h.hexdigest())
        dates = sorted(by_date)
        return Dataset(
            name=self.config.name,
            dates=dates,
            by_date={d: dict(sorted(by_date[d].items())) for d in dates},
            index=index,
            malformed=malformed,
            problems=problems[:20],
            schema=schema,
            bad_rows=bad_rows,
        )

    def _read(self, path: Path) -> tuple[list[str], list[list[str]], list[str]]:
        """Header, rows of raw field text, and one canonical text per row for hashing."""
        fmt = self.config.format or ("parquet" if path.name.endswith(".parquet") else "csv")
        try:
            if fmt == "parquet":
                return _read_parquet(path)
            return _read_csv(path)
        except read_error_types as e:
            raise RootDataError(f"cannot read root data file {path}: {e}") from e


def _read_csv(path: Path) -> tuple[list[str], list[list[str]], list[str]]:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", newline="", encoding="utf-8") as f:  # type: ignore[operator]
        text = f.read()
    if not text.strip():
        return [], [], []
    if '"' not in text and "\r" not in text:
        # Fast path: no quoting, so a line is a row and its text is its canonical form.
        lines = text.split("\n")
        header = lines[0].split(",")
        body = [line for line in lines[1:] if line]
        rows = [line.split(",") for line in body]
        texts = body
    else:
        reader = csv.reader(io.StringIO(text, newline=""))
        header = next(reader)
        rows = [r for r in reader if r]
        texts = [json.dumps(r) for r in rows]
    width = len(header)
    if any(len(r) != width for r in rows):
        rows = [r if len(r) == width else (r + [""] * width)[:width] for r in rows]
    return header, rows, texts


def _read_parquet(path: Path) -> tuple[list[str], list[list[str]], list[str]]:
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
    return list(table.column_names), rows, [json.dumps(r) for r in rows]


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
    header: list[str], columns: list[list[Any]], keep: tuple[int, ...], path: Path
) -> dict[int, str]:
    """Type the columns in place (except ``keep``).

    A column is numeric when at least 90 % of its non-empty values parse as numbers (a text
    column parses almost never); the others are malformed values. Returns row index -> "file:line: column='value' is not a
    number" for each row holding one.
    """
    bad: dict[int, str] = {}
    for c, name in enumerate(header):
        if c in keep:
            continue
        values = columns[c]
        try:
            if all(map(str.isdigit, values)):
                columns[c] = list(map(int, values))
            else:
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
        if all(v.lstrip("+-").isdigit() for v, p in zip(values, parsed) if p is not None):
            parsed = [None if p is None else int(v) for v, p in zip(values, parsed)]
        columns[c] = parsed
        for i in failures:
            bad.setdefault(i, f"{path.name}:{i + 2}: {name}={values[i]!r} is not a number")
    return bad


__all__ = ["Dataset", "DateEntry", "FileSource", "RootData", "files_of"]
