"""The root store: a dataset imported once into a local SQLite file and read back as a stream.

Why: a source with a million users must not sit in memory (parsed rows cost about 1 KB each).
``build_store`` reads the files in chunks of ``CHUNK_ROWS`` rows and writes each row's raw text
to a SQLite file kept sorted by (date, user, file, line); ``StoredDataset`` then streams one
date's users in id order (``stream``), so memory depends on the chunk and a user's rows, not on
the number of users. The file is named by the source's digest and written under a temporary
name then renamed, so a crash never leaves a half-built store and an unchanged source is
never imported twice (a re-run after a crash reuses it).

The rows and the per-date index are exactly those of ``FileSource.load`` (the in-memory path):
same typing rules per file, same canonical row texts, same content hash and schemas per date
(``rootdata.DateHasher``), same malformed-row locations; rows of the wrong width wait in a
``pending`` table until every file is read, then go to the one known user their readings
allow, as in ``load``. ``tests/test_rootstore.py`` checks this parity, also on random files.
"""

from __future__ import annotations

import bisect
import csv
import datetime as dt
import gzip
import json
import os
import re
import sqlite3
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import zstandard

from orchestrator import faults
from orchestrator.config import RootDataConfig
from orchestrator.errors import RootDataError
from orchestrator.rootdata import (
    DateEntry,
    DateHasher,
    Row,
    Schema,
    files_of,
    parse_int,
    read_error_types,
    readings,
    skip_problem,
    unowned_problem,
    width_problem,
)

# 2: per-date schemas and rows digests; rows of the wrong width are bad. 3: column parts.
# A store of another format is rebuilt from the source on first use (``App.dataset``) and the
# old file deleted: the source is the truth, a store only a cache of it.
STORE_FORMAT = 3
CHUNK_ROWS = 50_000  # rows parsed and typed at a time while importing
STREAM_BATCH = 2_000  # rows fetched (and their JSON texts decoded) at a time while streaming
# Users per column part: a columnar block over a store reads a user range at a time, so its
# memory is about this many users x the dates it reads, whatever the number of users.
PART_USERS = 65_536
_zstd_compress = zstandard.ZstdCompressor(level=1).compress
_zstd_decompress = zstandard.ZstdDecompressor().decompress


def store_path(folder: Path, name: str, digest: str) -> Path:
    """Where the store of dataset ``name`` at source ``digest`` lives."""
    return folder / f"{name}-{digest[:20]}-v{STORE_FORMAT}.sqlite"


class _ColumnStats:
    """What decides a column's type over a whole file, gathered chunk by chunk (the same rules
    as ``rootdata._type_column``, which sees the whole column at once)."""

    __slots__ = ("all_float", "all_int", "failures", "filled", "integral")

    def __init__(self) -> None:
        self.all_int = True  # every value non-empty and an integer (Python's int reads it)
        self.all_float = True  # every value non-empty and a number
        self.filled = 0
        self.failures = 0
        self.integral = True  # every value that is a number is an integer

    def add(self, values: list[str]) -> list[int]:
        """Fold one chunk's values in; returns the positions of non-empty values that are not
        numbers."""
        if self.all_int:
            try:
                list(map(int, values))
                self.filled += len(values)
                return []
            except ValueError:
                self.all_int = False
        if self.all_float:
            try:
                list(map(float, values))
                self.filled += len(values)
                self.integral = self.integral and all(parse_int(v) is not None for v in values)
                return []
            except ValueError:
                self.all_float = False
        failed = []
        for i, v in enumerate(values):
            if not v:
                continue
            self.filled += 1
            try:
                float(v)
            except ValueError:
                failed.append(i)
                continue
            if self.integral and parse_int(v) is None:
                self.integral = False
        self.failures += len(failed)
        return failed

    def kind(self) -> str:
        """ "int", "float" or "str" (a text column, or no value at all)."""
        if self.filled == 0 or (not self.all_float and self.failures > 0.1 * self.filled):
            return "str"
        if self.all_int:
            return "int"
        if self.all_float:
            return "float"
        return "int" if self.integral else "float"


_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE files (id INTEGER PRIMARY KEY, name TEXT NOT NULL, fast INTEGER NOT NULL,
                    header TEXT NOT NULL, kinds TEXT NOT NULL);
CREATE TABLE staging (date INTEGER, user TEXT, file INTEGER, line INTEGER, text TEXT,
                      fails INTEGER);
CREATE TABLE dates (date INTEGER PRIMARY KEY, row_count INTEGER NOT NULL,
                    content_hash TEXT NOT NULL, schemas TEXT NOT NULL,
                    rows_digest TEXT NOT NULL);
CREATE TABLE bad_rows (date INTEGER, user TEXT, file INTEGER, line INTEGER, location TEXT);
CREATE TABLE pending (file INTEGER, line INTEGER, text TEXT, fields INTEGER, width INTEGER,
                      readings TEXT);
CREATE TABLE resolved (date INTEGER, user TEXT, file INTEGER, line INTEGER, text TEXT);
CREATE TABLE parts (date INTEGER, part INTEGER, first_user TEXT NOT NULL,
                    last_user TEXT NOT NULL, users BLOB NOT NULL, present BLOB NOT NULL,
                    bad BLOB NOT NULL, PRIMARY KEY (date, part));
CREATE TABLE part_columns (date INTEGER, part INTEGER, name TEXT, kind TEXT NOT NULL,
                           data BLOB NOT NULL, PRIMARY KEY (date, part, name));
"""


def build_store(config: RootDataConfig, digest: str, folder: Path, progress: bool = False) -> Path:
    """Import the source's files into a new store (see the module docstring); returns its path.

    Memory is bounded by ``CHUNK_ROWS`` rows and SQLite's page cache, whatever the file size.
    With ``progress``, a bar on stderr counts the rows imported.

    Raises:
        RootDataError: a single-file source cannot be read, or the date or user column is
            missing (an unreadable file of a folder is skipped and reported, as in ``load``).
    """
    folder.mkdir(parents=True, exist_ok=True)
    final = store_path(folder, config.name, digest)
    for stale in folder.glob(f".{config.name}-*.tmp"):  # left by a killed import
        pid = stale.name.rsplit(".", 2)[-2]
        if pid.isdigit() and not psutil.pid_exists(int(pid)):
            stale.unlink(missing_ok=True)
    temporary = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    conn = sqlite3.connect(temporary)
    try:
        conn.executescript(
            "PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF; PRAGMA cache_size=-16384;"
        )
        conn.executescript(_SCHEMA)
        importer = _Importer(config, conn)
        if progress:
            from tqdm import tqdm

            importer.bar = tqdm(unit=" rows", file=sys.stderr, desc=f"import {config.name}")
        files = files_of(config.path)
        for file_id, path in enumerate(files):
            try:
                importer.add_file(file_id, path)
            except RootDataError as e:
                if len(files) == 1:
                    raise
                importer.problems.append(f"{path.name}: unreadable, skipped ({e})")
                conn.execute("DELETE FROM staging WHERE file = ?", (file_id,))
                conn.execute("DELETE FROM pending WHERE file = ?", (file_id,))
                conn.execute("DELETE FROM files WHERE id = ?", (file_id,))
        importer.finish(digest)
        if importer.bar is not None:
            importer.bar.close()
        conn.commit()
        conn.close()
        os.replace(temporary, final)
    except BaseException:
        conn.close()
        temporary.unlink(missing_ok=True)
        raise
    version = re.compile(rf"{re.escape(config.name)}-[0-9a-f]{{20}}-v\d+\.sqlite")
    for old in folder.iterdir():  # earlier versions of this source
        if old != final and version.fullmatch(old.name):
            old.unlink(missing_ok=True)
    return final


class _Importer:
    """Fills one store: rows into ``staging`` chunk by chunk, then the sorted ``rows`` table,
    the per-date index and the metadata (``finish``)."""

    def __init__(self, config: RootDataConfig, conn: sqlite3.Connection):
        self.config = config
        self.conn = conn
        self.malformed = 0
        self.problems: list[str] = []
        self.schema: dict[str, str] = {}
        self._dates: dict[str, int | None] = {}
        self.bar: Any = None  # a tqdm progress bar, when asked for

    def add_file(self, file_id: int, path: Path) -> None:
        fmt = self.config.format or ("parquet" if path.name.endswith(".parquet") else "csv")
        try:
            if fmt == "parquet":
                fast, chunks = False, _parquet_chunks(path)
            else:
                fast = not _needs_csv_reader(path)
                chunks = _csv_chunks(path, fast)
            header = next(chunks, None) or []  # an empty file has no columns: refused below
            assert isinstance(header, list)
            for column in (self.config.date_column, self.config.user_column):
                if column not in header:
                    raise RootDataError(
                        f"{path}: column '{column}' not found (columns: {', '.join(header)}); "
                        f"fix date_column / user_column of [root_data.{self.config.name}]"
                    )
            di = header.index(self.config.date_column)
            ui = header.index(self.config.user_column)
            stats = {c: _ColumnStats() for c in range(len(header)) if c not in (di, ui)}
            for chunk in chunks:
                assert isinstance(chunk, tuple)
                rows, texts, numbers = chunk
                self._add_chunk(file_id, path, rows, texts, numbers, len(header), di, ui, stats)
        except read_error_types as e:
            raise RootDataError(f"cannot read root data file {path}: {e}") from e
        kinds = [
            "date" if c == di else "user" if c == ui else stats[c].kind()
            for c in range(len(header))
        ]
        for name, kind in zip(header, kinds):
            if self.schema.get(name) in (None, "int") or kind == "str":
                self.schema[name] = kind  # across files, the widest type wins
        self.conn.execute(
            "INSERT INTO files VALUES (?, ?, ?, ?, ?)",
            (file_id, path.name, int(fast), json.dumps(header), json.dumps(kinds)),
        )
        # Rows holding a value that is not a number in what turned out a numeric column: the
        # user fails that date, with the first such value's location (as in ``load``).
        numeric = [c for c in stats if kinds[c] != "str"]
        mask = sum(1 << c for c in numeric)
        bad = []
        for rowid, line, text, fails in self.conn.execute(
            "SELECT rowid, line, text, fails FROM staging"
            " WHERE file = ? AND fails > 0 AND fails & ? != 0",  # -1: already bad (width)
            (file_id, mask),
        ):
            fields = _split(text, fast)
            c = next(c for c in numeric if fails & (1 << c))
            value = fields[c]
            bad.append((f"{path.name}:{line}: {header[c]}={value!r} is not a number", rowid))
        self.malformed += len(bad)
        self.conn.executemany(
            "UPDATE staging SET fails = -1 WHERE rowid = ?", [(rowid,) for _, rowid in bad]
        )
        self.conn.executemany(
            "INSERT INTO bad_rows SELECT date, user, file, line, ? FROM staging WHERE rowid = ?",
            bad,
        )

    def _add_chunk(
        self,
        file_id: int,
        path: Path,
        rows: list[list[str]],
        texts: list[str],
        numbers: list[int],
        width: int,
        di: int,
        ui: int,
        stats: dict[int, _ColumnStats],
    ) -> None:
        # Rows with the wrong number of fields are malformed and take no part in typing the
        # columns (as in ``load``): only the fitting ones are folded into the stats.
        fitting = [i for i, r in enumerate(rows) if len(r) == width]
        good = rows if len(fitting) == len(rows) else [rows[i] for i in fitting]
        columns = list(zip(*good)) if good else []
        fails = [0] * len(rows)
        if columns:
            for c, column_stats in stats.items():
                for k in column_stats.add(list(columns[c])):
                    fails[fitting[k]] |= 1 << c
        dates = self._dates
        out = []
        pending = []
        for i, row in enumerate(rows):
            line = numbers[i]
            if len(row) != width:  # given to a user once every file is read (``finish``)
                options = readings(row, di, ui, width)
                pending.append((file_id, line, texts[i], len(row), width, json.dumps(options)))
                continue
            text_date, user = row[di], row[ui]
            if text_date not in dates:
                try:
                    dates[text_date] = dt.date.fromisoformat(text_date).toordinal()
                except ValueError:
                    dates[text_date] = None
            date = dates[text_date]
            if date is None or not user:
                self.malformed += 1
                if len(self.problems) < 20:
                    self.problems.append(skip_problem(path.name, line, text_date, date is not None))
                continue
            out.append((date, user, file_id, line, texts[i], fails[i]))
        self.conn.executemany("INSERT INTO pending VALUES (?, ?, ?, ?, ?, ?)", pending)
        self.conn.executemany("INSERT INTO staging VALUES (?, ?, ?, ?, ?, ?)", out)
        if self.bar is not None:
            self.bar.update(len(rows))
        faults.reached("import")

    def _resolve_pending(self) -> None:
        """Give each row of the wrong width to the one user its readings allow, among the
        users of the rows of the right width (``rootdata.readings``, as ``load``): it is
        then a bad row of that user and date; else it is skipped and reported."""
        conn = self.conn
        if conn.execute("SELECT 1 FROM pending LIMIT 1").fetchone() is None:
            return
        conn.execute("CREATE INDEX rows_by_user ON rows (user)")  # dropped below
        dates = self._dates
        cursor = conn.execute(
            "SELECT p.file, f.name, p.line, p.text, p.fields, p.width, p.readings"
            " FROM pending p JOIN files f ON f.id = p.file ORDER BY p.file, p.line"
        )
        while batch := cursor.fetchmany(500):
            options = [json.loads(r[6]) for r in batch]
            users = sorted({u for found in options for _, u in found})
            known: set[str] = set()
            for k in range(0, len(users), 500):
                part = users[k : k + 500]
                marks = ",".join("?" * len(part))
                known.update(
                    u
                    for (u,) in self.conn.execute(
                        f"SELECT DISTINCT user FROM rows WHERE user IN ({marks})", part
                    )
                )
            resolved, bad = [], []
            for (file_id, name, line, text, n, width, _), found in zip(batch, options):
                self.malformed += 1
                owners = set()
                for text_date, user in found:
                    if user not in known:
                        continue
                    if text_date not in dates:
                        try:
                            dates[text_date] = dt.date.fromisoformat(text_date).toordinal()
                        except ValueError:
                            dates[text_date] = None
                    if dates[text_date] is not None:
                        owners.add((dates[text_date], user))
                if len(owners) != 1:
                    if len(self.problems) < 20:
                        self.problems.append(unowned_problem(name, line, n, width))
                    continue
                ((date, user),) = owners
                resolved.append((date, user, file_id, line, text))
                bad.append((date, user, file_id, line, width_problem(name, line, n, width)))
            self.conn.executemany("INSERT INTO resolved VALUES (?, ?, ?, ?, ?)", resolved)
            self.conn.executemany("INSERT INTO bad_rows VALUES (?, ?, ?, ?, ?)", bad)
        conn.executescript(
            """
            DROP INDEX rows_by_user;
            INSERT INTO rows SELECT date, user, file, line, text, 1 FROM resolved;
            """
        )

    def finish(self, digest: str) -> None:
        conn = self.conn
        conn.executescript(
            """
            CREATE TABLE rows (date INTEGER, user TEXT, file INTEGER, line INTEGER, text TEXT,
                               bad INTEGER, PRIMARY KEY (date, user, file, line)) WITHOUT ROWID;
            INSERT INTO rows SELECT date, user, file, line, text, fails = -1 FROM staging
                ORDER BY date, user, file, line;
            DROP TABLE staging;
            """
        )
        self._resolve_pending()
        conn.execute("CREATE INDEX bad_by_user ON bad_rows (date, user)")
        # The per-date content hash as ``load`` computes it (``rootdata.DateHasher``): each
        # row text goes to its file's schema; the texts come sorted (SQLite's BINARY order on
        # UTF-8 is Python's code point order), so every schema's texts do too.
        file_schemas: dict[int, Schema] = {
            file_id: tuple(zip(json.loads(header), json.loads(kinds)))
            for file_id, header, kinds in conn.execute("SELECT id, header, kinds FROM files")
        }
        locations: dict[int, list[str]] = {}
        for date, where in conn.execute("SELECT date, location FROM bad_rows"):
            locations.setdefault(date, []).append(where)
        schema_ids: dict[Schema, int] = {}
        entries = []

        def close(date: int, hasher: DateHasher) -> None:
            entry = hasher.finish(locations.get(date, ()))
            ids = [schema_ids.setdefault(s, len(schema_ids)) for s in entry.schemas]
            entries.append(
                (date, entry.row_count, entry.content_hash, json.dumps(ids), entry.rows_digest)
            )

        current: int | None = None
        hasher = DateHasher()
        for date, file_id, text in conn.execute(
            "SELECT date, file, text FROM rows ORDER BY date, text"
        ):
            if date != current:
                if current is not None:
                    close(current, hasher)
                current, hasher = date, DateHasher()
            hasher.add(file_schemas[file_id], text)
        if current is not None:
            close(current, hasher)
        conn.executemany("INSERT INTO dates VALUES (?, ?, ?, ?, ?)", entries)
        conn.executescript("DROP TABLE pending; DROP TABLE resolved;")
        meta = {
            "schemas": [[list(c) for c in s] for s in schema_ids],
            "name": self.config.name,
            "digest": digest,
            "malformed": self.malformed,
            "problems": self.problems[:20],
            "schema": self.schema,
        }
        meta["part_bounds"] = _write_parts(conn, self.schema)
        conn.executemany(
            "INSERT INTO meta VALUES (?, ?)", [(k, json.dumps(v)) for k, v in meta.items()]
        )


def _write_parts(conn: sqlite3.Connection, schema: dict[str, str]) -> list[str]:
    """Write every date's column parts (see ``StoredDataset.part``); returns the part bounds:
    the first user of each part, every ``PART_USERS``-th distinct user of the store.

    A part holds, for the users of its bound range with rows on the date (ascending): whether
    each has a well-formed row (``present``) and malformed ones (``bad``), and per column the
    value of the user's last well-formed row (file order), as ``RootMatrix`` takes it: a
    numeric column (schema int or float) as float64 with NaN for no value, when every value
    converts so; any other as a JSON list."""
    users = [u for (u,) in conn.execute("SELECT DISTINCT user FROM rows ORDER BY user")]
    bounds = users[::PART_USERS]
    del users
    files = {
        f: (bool(fast), json.loads(header), [_CONVERT[k] for k in json.loads(kinds)])
        for f, fast, header, kinds in conn.execute("SELECT id, fast, header, kinds FROM files")
    }
    names = sorted(schema)
    # column -> file -> (field position, converter), or None where the file lacks it (the
    # last of equal names wins, as in a row dict)
    fields_of: dict[str, dict[int, tuple[int, Callable[[str], Any]] | None]] = {
        name: {
            f: max(
                ((i, converters[i]) for i, h in enumerate(header) if h == name),
                default=None,
                key=lambda pair: pair[0],
            )
            for f, (_, header, converters) in files.items()
        }
        for name in names
    }
    numeric = {n for n in names if schema[n] in ("int", "float")}
    slow = {f for f, (fast, _, _) in files.items() if not fast}
    dates = [d for (d,) in conn.execute("SELECT date FROM dates ORDER BY date")]
    for date in dates:
        part = -1
        kept: list[str] = []
        rows: list[tuple[int, list[str]] | None] = []  # the user's last well-formed row
        bad: list[bool] = []
        current: str | None = None
        cursor = conn.execute(
            "SELECT user, file, text, bad FROM rows WHERE date = ? ORDER BY user, file, line",
            (date,),
        )
        while batch := cursor.fetchmany(STREAM_BATCH):
            # quoted files' texts are JSON arrays: one decode per batch (``_batches``)
            quoted = [text for _, f, text, b in batch if f in slow and not b]
            decoded = iter(json.loads("[" + ",".join(quoted) + "]") if quoted else ())
            for user, file_id, text, is_bad in batch:
                if user != current:
                    at = bisect.bisect_right(bounds, user) - 1
                    if at != part:
                        _write_part(conn, date, part, kept, rows, bad, fields_of, numeric)
                        part = at
                    current = user
                    kept.append(user)
                    rows.append(None)
                    bad.append(False)
                if is_bad:
                    bad[-1] = True
                else:
                    rows[-1] = (file_id, next(decoded) if file_id in slow else text.split(","))
        _write_part(conn, date, part, kept, rows, bad, fields_of, numeric)
    return bounds


def _user_bounds(
    lo: str | None, hi: str | None, low_column: str, high_column: str
) -> tuple[str, list[Any]]:
    """The SQL suffix and its arguments keeping rows with ``lo <= low_column`` and
    ``high_column < hi`` (a bound that is None is left out): for a user column, both are it;
    for a part, a part overlaps ``[lo, hi)`` when its last user >= lo and its first < hi."""
    sql, args = "", []
    if lo is not None:
        sql += f" AND {low_column} >= ?"
        args.append(lo)
    if hi is not None:
        sql += f" AND {high_column} < ?"
        args.append(hi)
    return sql, args


def _users_blob(users: list[str]) -> bytes:
    """A part's users: b"U", the item size (u32) and a NumPy fixed-width unicode array, read
    back without a parse; b"J" and a JSON list when an id ends in NUL (which such arrays
    strip)."""
    if any(u.endswith("\x00") for u in users):
        return b"J" + json.dumps(users).encode()
    array = np.array(users, dtype=str)
    return b"U" + array.dtype.itemsize.to_bytes(4, "little") + array.tobytes()


def _users_of(blob: bytes) -> tuple[list[str], np.ndarray]:
    """``_users_blob``'s users as a list and a (n,) str array."""
    if blob[:1] == b"J":
        users = json.loads(blob[1:])
        return users, np.array(users, dtype=str)
    size = int.from_bytes(blob[1:5], "little")
    array = np.frombuffer(blob, dtype=f"<U{max(size // 4, 1)}", offset=5)
    return array.tolist(), array


def _write_part(
    conn: sqlite3.Connection,
    date: int,
    part: int,
    kept: list[str],
    rows: list[tuple[int, list[str]] | None],
    bad: list[bool],
    fields_of: dict[str, dict[int, tuple[int, Callable[[str], Any]] | None]],
    numeric: set[str],
) -> None:
    """Insert one column part (``_write_parts``) and empty the buffers."""
    if not kept:
        return
    present = np.array([r is not None for r in rows], dtype=bool)
    conn.execute(
        "INSERT INTO parts VALUES (?, ?, ?, ?, ?, ?, ?)",
        (
            date,
            part,
            kept[0],
            kept[-1],
            _zstd_compress(_users_blob(kept)),
            _zstd_compress(present.tobytes()),
            _zstd_compress(np.array(bad, dtype=bool).tobytes()),
        ),
    )
    columns = []
    for name, where in fields_of.items():
        values: list[Any] = []
        for row in rows:
            found = None if row is None else where[row[0]]
            values.append(None if found is None else found[1](row[1][found[0]]))  # type: ignore[index]
        kind, data = "json", b""
        if name in numeric:
            try:
                array = np.array([np.nan if v is None else v for v in values], dtype=np.float64)
                kind, data = "f8", array.tobytes()
            except (TypeError, ValueError, OverflowError):
                pass  # read back as RootMatrix converts it (and fails as it does)
        if kind == "json":
            data = json.dumps(values).encode()
        columns.append((date, part, name, kind, _zstd_compress(data)))
    conn.executemany("INSERT INTO part_columns VALUES (?, ?, ?, ?, ?)", columns)
    kept.clear()
    rows.clear()
    bad.clear()


def _needs_csv_reader(path: Path) -> bool:
    """Whether the file has quoting or carriage returns (else a line is a row and its text is
    its canonical form: ``load``'s fast path). Scans the bytes, cheaply."""
    opener: Callable[..., Any] = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as f:
        while chunk := f.read(1 << 20):
            if b'"' in chunk or b"\r" in chunk:
                return True
    return False


def _split(text: str, fast: bool) -> list[str]:
    return text.split(",") if fast else json.loads(text)


Chunk = tuple[list[list[str]], list[str], list[int]]


def _csv_chunks(path: Path, fast: bool) -> Iterator[list[str] | Chunk]:
    """The header, then chunks of (rows of raw fields — as many as each row has —, canonical
    row texts, line numbers), as ``rootdata._read_csv`` reads them."""
    opener: Callable[..., Any] = gzip.open if path.name.endswith(".gz") else open
    rows: list[list[str]] = []
    texts: list[str] = []
    numbers: list[int] = []
    with opener(path, "rt", newline="", encoding="utf-8") as f:
        if fast:
            first = f.readline()
            if not first.strip():
                return
            yield first.rstrip("\n").split(",")
            for number, line in enumerate(f, 2):
                text = line.removesuffix("\n")
                if not text:  # a blank line is no row (but counts as a line)
                    continue
                rows.append(text.split(","))
                texts.append(text)
                numbers.append(number)
                if len(rows) >= CHUNK_ROWS:
                    yield rows, texts, numbers
                    rows, texts, numbers = [], [], []
            if rows:
                yield rows, texts, numbers
            return
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            return
        yield header
        start = reader.line_num + 1  # a quoted field may span lines: a row starts after the last
        for fields in reader:
            if fields:
                texts.append(json.dumps(fields))
                rows.append(fields)
                numbers.append(start)
            start = reader.line_num + 1
            if len(rows) >= CHUNK_ROWS:
                yield rows, texts, numbers
                rows, texts, numbers = [], [], []
        if rows:
            yield rows, texts, numbers


def _parquet_chunks(path: Path) -> Iterator[list[str] | Chunk]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise RootDataError(
            f"{path} is Parquet; install the parquet extra: pip install 'orchestrator[parquet]'"
        ) from e
    parquet = pq.ParquetFile(path)
    yield list(parquet.schema_arrow.names)
    seen = 0
    for batch in parquet.iter_batches(batch_size=CHUNK_ROWS):
        columns = [
            [
                "" if v is None else (v.isoformat() if isinstance(v, dt.date) else str(v))
                for v in batch.column(i).to_pylist()
            ]
            for i in range(batch.num_columns)
        ]
        rows = [list(r) for r in zip(*columns)]
        # A Parquet "line" is the row's position counted as in a CSV file (header: line 1).
        yield rows, [json.dumps(r) for r in rows], list(range(seen + 2, seen + 2 + len(rows)))
        seen += len(rows)


_CONVERT: dict[str, Callable[[str], Any]] = {
    "int": lambda v: int(v) if v else None,
    "float": lambda v: float(v) if v else None,
    "str": lambda v: v if v else None,
    "date": lambda v: v,
    "user": lambda v: v,
}


class StoredDataset:
    """A dataset read from its root store (see the module docstring).

    Attributes (as ``rootdata.Dataset``): ``name``, ``dates`` (ascending), ``index`` (date ->
    DateEntry), ``malformed``, ``problems``, ``schema``; ``bad_count`` counts user-dates with
    malformed rows, ``skipped`` the rows given to no user. Rows are dicts typed per file
    (``rootdata`` module docstring).

    Connections are per process (a forked worker opens its own) and read-only.
    """

    def __init__(self, path: Path):
        """Open the store at ``path``.

        Raises:
            sqlite3.DatabaseError: no store there, or a damaged one (the caller rebuilds it).
        """
        if not path.is_file():
            raise sqlite3.DatabaseError(f"no root store at {path}")
        self.path = path
        self._conn: sqlite3.Connection | None = None
        self._pid = -1
        self._bad_users: frozenset[str] | None = None
        conn = self._db()
        meta = {k: json.loads(v) for k, v in conn.execute("SELECT key, value FROM meta")}
        self.name: str = meta["name"]
        self.malformed: int = meta["malformed"]
        self.problems: list[str] = meta["problems"]
        self.schema: dict[str, str] = meta["schema"]
        # the first user of each column part (``_write_parts``): user ranges for blocks
        self.part_bounds: list[str] = meta["part_bounds"]
        schemas: list[Schema] = [tuple((name, kind) for name, kind in s) for s in meta["schemas"]]
        self.index = {
            dt.date.fromordinal(d): DateEntry(n, h, tuple(schemas[i] for i in json.loads(ids)), r)
            for d, n, h, ids, r in conn.execute(
                "SELECT date, row_count, content_hash, schemas, rows_digest FROM dates"
            )
        }
        self.dates = sorted(self.index)
        self.bad_count: int = conn.execute(
            "SELECT COUNT(*) FROM (SELECT DISTINCT date, user FROM bad_rows)"
        ).fetchone()[0]
        # Rows given to no user: the malformed rows that are not some user's bad rows.
        bad_rows = conn.execute("SELECT COUNT(*) FROM bad_rows").fetchone()[0]
        self.skipped: int = self.malformed - bad_rows
        self._files: dict[int, tuple[bool, list[str], list[Callable[[str], Any]]]] = {}
        for file_id, fast, header, kinds in conn.execute(
            "SELECT id, fast, header, kinds FROM files"
        ):
            self._files[file_id] = (
                bool(fast),
                json.loads(header),
                [_CONVERT[k] for k in json.loads(kinds)],
            )

    def _db(self) -> sqlite3.Connection:
        if self._conn is None or self._pid != os.getpid():
            # immutable: the file never changes once renamed into place (no locks needed)
            self._conn = sqlite3.connect(
                f"file:{self.path}?mode=ro&immutable=1", uri=True, check_same_thread=False
            )
            self._pid = os.getpid()
        return self._conn

    def _row(self, file_id: int, text: str) -> Row:
        return self._typed(file_id, _split(text, self._files[file_id][0]))

    def _typed(self, file_id: int, fields: list[str]) -> Row:
        _, header, converters = self._files[file_id]  # bad rows (wrong widths) never come here
        return {h: conv(v) for h, conv, v in zip(header, converters, fields)}

    def _batches(self, cursor: sqlite3.Cursor) -> Iterator[list[tuple[str, int, list[str], int]]]:
        """Rows of ``cursor`` (user, file, line, text, bad) as (user, file, fields, bad), a
        batch at a time: the texts of quoted files (JSON arrays) are decoded with one
        ``json.loads`` per batch, several times faster than one per row."""
        slow = {f for f, (fast, _, _) in self._files.items() if not fast}
        while batch := cursor.fetchmany(STREAM_BATCH):
            quoted = [text for _, f, _, text, _ in batch if f in slow]
            decoded = iter(json.loads("[" + ",".join(quoted) + "]") if quoted else ())
            yield [
                (user, f, next(decoded) if f in slow else text.split(","), bad)
                for user, f, _, text, bad in batch
            ]

    def stream(
        self, date: dt.date, lo: str | None = None, hi: str | None = None
    ) -> Iterator[tuple[str, tuple[list[Row], list[str]]]]:
        """``(user, (rows, bad))`` for every user with rows on ``date`` with ``lo <= user < hi``,
        users ascending; ``rows`` in file order; ``bad`` lists the locations of the user's
        malformed rows (the user then fails that date; ``rows`` excludes them)."""
        bounds, args = _user_bounds(lo, hi, "user", "user")
        query = f"SELECT user, file, line, text, bad FROM rows WHERE date = ?{bounds}"
        query += " ORDER BY user, file, line"
        args.insert(0, date.toordinal())
        conn = self._db()
        current: str | None = None
        rows: list[Row] = []
        bad = False
        for batch in self._batches(conn.execute(query, args)):
            for user, file_id, fields, is_bad in batch:
                if user != current:
                    if current is not None:
                        yield current, (rows, self._bad(date, current) if bad else [])
                    current, rows, bad = user, [], False
                if is_bad:
                    bad = True
                else:
                    rows.append(self._typed(file_id, fields))
        if current is not None:
            yield current, (rows, self._bad(date, current) if bad else [])

    def _bad(self, date: dt.date, user: str) -> list[str]:
        return [
            where
            for (where,) in self._db().execute(
                "SELECT location FROM bad_rows WHERE date = ? AND user = ? ORDER BY file, line",
                (date.toordinal(), user),
            )
        ]

    def parts(
        self, dates: Sequence[dt.date], lo: str | None, hi: str | None
    ) -> list[tuple[int, int, list[str], np.ndarray, np.ndarray, np.ndarray]]:
        """The column parts of ``dates`` holding users ``lo <= user < hi`` (None: unbounded),
        as (date ordinal, part, users ascending (a list and a (n,) str array), (n,) bool
        present, (n,) bool bad), dates then users ascending; the users are those of the
        part, some maybe out of range."""
        if not dates:
            return []
        ordinals = [d.toordinal() for d in dates]
        out = []
        for k in range(0, len(ordinals), 500):
            chunk = ordinals[k : k + 500]
            bounds, args = _user_bounds(lo, hi, "last_user", "first_user")
            query = (
                "SELECT date, part, users, present, bad FROM parts"
                f" WHERE date IN ({','.join('?' * len(chunk))}){bounds} ORDER BY date, part"
            )
            for date, part, users, present, bad in self._db().execute(query, [*chunk, *args]):
                out.append(
                    (
                        date,
                        part,
                        *_users_of(_zstd_decompress(users)),
                        np.frombuffer(_zstd_decompress(present), dtype=bool),
                        np.frombuffer(_zstd_decompress(bad), dtype=bool),
                    )
                )
        return out

    def part_column(self, date: int, part: int, name: str) -> np.ndarray | list[Any]:
        """Column ``name`` of one part (``parts``): (n,) float64 (NaN: no value) for a
        numeric column, else the values as a list (None: no value).

        Raises:
            KeyError: the store has no such column.
        """
        found = (
            self._db()
            .execute(
                "SELECT kind, data FROM part_columns WHERE date = ? AND part = ? AND name = ?",
                (date, part, name),
            )
            .fetchone()
        )
        if found is None:
            raise KeyError(f"{self.name} has no column {name!r}")
        kind, data = found
        raw = _zstd_decompress(data)
        return np.frombuffer(raw, dtype=np.float64) if kind == "f8" else json.loads(raw)

    def bad_locations(self, date: dt.date, user: str) -> list[str]:
        """Locations of the user's malformed rows on ``date`` (file order)."""
        return self._bad(date, user)

    def rows_on(self, date: dt.date) -> list[Row]:
        """Every well-formed row of ``date`` (users ascending, then file order)."""
        return [row for _, (rows, _) in self.stream(date) for row in rows]

    def history(self, user: str, date: dt.date, lookback: int) -> list[Row]:
        """The user's rows over the last ``lookback`` available dates up to ``date`` (oldest
        first), one seek per date of the window on the (date, user) key.

        Every call is a query: calculations that read their history on every date are faster
        on a dataset held in memory (``root_memory_mb``)."""
        end = bisect.bisect_right(self.dates, date)
        window = [d.toordinal() for d in self.dates[max(0, end - lookback) : end]]
        if not window:
            return []
        marks = ",".join("?" * len(window))
        return [
            self._row(file_id, text)
            for file_id, text in self._db().execute(
                f"SELECT file, text FROM rows WHERE date IN ({marks}) AND user = ? AND bad = 0"
                " ORDER BY date, file, line",
                (*window, user),
            )
        ]

    def window_problems(self, user: str, date: dt.date, lookback: int) -> list[str]:
        """Locations of the user's malformed rows in its history window (the last
        ``lookback`` available dates up to ``date``, as ``history``) before ``date`` itself,
        whose problems ``stream`` reports. Users without any malformed row (nearly all)
        cost a set lookup: their ids are read once."""
        if lookback < 2:
            return []
        if self._bad_users is None:
            self._bad_users = frozenset(
                u for (u,) in self._db().execute("SELECT DISTINCT user FROM bad_rows")
            )
        if user not in self._bad_users:
            return []
        end = bisect.bisect_right(self.dates, date)
        if not end:
            return []
        first = self.dates[max(0, end - lookback)]
        return [
            where
            for (where,) in self._db().execute(
                "SELECT location FROM bad_rows WHERE user = ? AND date >= ? AND date < ?"
                " ORDER BY date, file, line",
                (user, first.toordinal(), date.toordinal()),
            )
        ]

    def user_sample(self, limit: int = 10_000) -> list[str]:
        """Up to about ``limit`` distinct users, evenly spaced in id order (for partitions)."""
        total = self._db().execute("SELECT COUNT(DISTINCT user) FROM rows").fetchone()[0]
        step = max(1, total // limit)
        return [
            u
            for (u,) in self._db().execute(
                "SELECT user FROM (SELECT user, row_number() OVER (ORDER BY user) AS n FROM "
                "(SELECT DISTINCT user FROM rows)) WHERE (n - 1) % ? = 0",
                (step,),
            )
        ]


__all__ = ["CHUNK_ROWS", "StoredDataset", "build_store", "store_path"]
