"""The ledger: every read and write of cells, shards, the root index, runs and the run lock.

Reads for planning are bulk (one query per table, never one per cell). Writes are small explicit
transactions. A cell's result becomes visible in one transaction (``publish``): its shards were
written earlier under a fresh *generation* that no reader looks at, and publishing switches the
cell's generation and deletes the old shards together. A crash before that leaves only orphan
shards, which ``collect_orphans`` removes at the start of the next run.

The schema is created and upgraded only by the Alembic migrations in ``migrations/``;
``Ledger.open`` applies them on first use and refuses a database newer than this code. A ledger
already at ``SCHEMA_HEAD`` (the usual case) is opened without importing Alembic at all; a new
migration must bump that constant (``tests/test_migrations.py`` fails until it does).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import itertools
import json
import socket
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import psutil
from sqlalchemy import (
    ColumnElement,
    Connection,
    Engine,
    Select,
    String,
    and_,
    bindparam,
    cast,
    create_engine,
    delete,
    event,
    exists,
    func,
    insert,
    inspect,
    or_,
    select,
    text,
    tuple_,
    update,
)
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import ExceptionContext, make_url
from sqlalchemy.exc import IntegrityError, OperationalError, SQLAlchemyError

from orchestrator import faults
from orchestrator.errors import RunLockedError, StorageError
from orchestrator.ledger import digests, retention
from orchestrator.ledger.digests import CalcDigests, Sums, bucket_bounds, bucket_of
from orchestrator.ledger.models import (
    ATTEMPTS,
    BUMPS,
    CELLS,
    DIGESTS,
    FAILURES,
    LOCK,
    RETAINED,
    ROOT_INDEX,
    ROOT_SOURCES,
    RUNS,
    SHARDS,
    UNCLEAN_EXPRESSION,
    VERSIONS,
)
from orchestrator.ledger.sql import DELETE_SHARDS_OF, same_generation
from orchestrator.ledger.sql import cells_in as _cells_in
from orchestrator.memory import paused_gc


class ShardInfo(NamedTuple):
    """Where one shard of a published result sits and which users it holds (in order)."""

    generation: str
    seq: int
    first_user: str | None
    last_user: str | None
    users: int


MIGRATIONS = Path(__file__).resolve().parents[2] / "migrations"
# The head revision of ``migrations/versions``: a ledger stored at it opens without Alembic
# (whose import and script scan cost a no-op run ~0.15 s); any other revision goes through
# Alembic. Bump it with every new migration (``tests/test_migrations.py`` checks it).
SCHEMA_HEAD = "0007"


def build_key(
    status: str, category: str, code: str, layer: str, infra: str, epoch: int, scoped: int = 0
) -> str:
    """One comparable string of a cell's own parts:
    ``status|code layer infra|epoch.scoped_epoch|category``.

    A comparison key, not a hash: the three hashes have a fixed width, status and the epochs
    hold no ``|``, and the category comes last, so two different part tuples never give the
    same key. The database stores the same string as ``cells.build_key``
    (``models.BUILD_KEY_EXPRESSION``).
    """
    return f"{status}|{code}{layer}{infra}|{epoch}.{scoped}|{category}"


class SlimCell(NamedTuple):
    """What the no-op plan needs of a stored cell: its build key, inputs digest and result."""

    calculation: str
    date: dt.date
    build: str
    inputs_digest: str
    result_hash: str | None


class LedgerCell(NamedTuple):
    """A cell's whole stored state: the ``SlimCell`` fields, then every fingerprint part.

    Named tuples rather than dataclasses: the planner loads hundreds of thousands at once.
    JSON parts stay text until an explanation needs them.
    """

    calculation: str
    date: dt.date
    build: str
    inputs_digest: str
    result_hash: str | None
    status: str
    category: str
    code_hash: str
    layer_hash: str
    infra_hash: str
    epoch: int
    scoped_epoch: int
    upstream_json: str
    root_json: str
    previous_hash: str | None
    attempts: int
    error: str | None
    run_id: str | None = None  # the run that last wrote it (holds its lease while RUNNING)
    lease_expires_at: dt.datetime | None = None
    attempted_digest: str | None = None  # inputs digest of the last attempt, success or not
    users_failed: int = 0  # users of the last attempt that failed (own or inherited)

    @property
    def upstream_hashes(self) -> dict[str, str | None]:
        return json.loads(self.upstream_json)

    @property
    def root_hashes(self) -> dict[str, dict[str, str]]:
        return json.loads(self.root_json)


_SLIM_COLUMNS = (
    CELLS.c.calculation,
    CELLS.c.date,
    CELLS.c.build_key,
    CELLS.c.inputs_digest,
    CELLS.c.result_hash,
)
_FULL_COLUMNS = (
    *_SLIM_COLUMNS,
    CELLS.c.status,
    CELLS.c.category,
    CELLS.c.code_hash,
    CELLS.c.layer_hash,
    CELLS.c.infra_hash,
    CELLS.c.epoch,
    CELLS.c.scoped_epoch,
    cast(CELLS.c.upstream_hashes, String),
    cast(CELLS.c.root_hashes, String),
    CELLS.c.previous_hash,
    CELLS.c.attempts,
    CELLS.c.error,
    CELLS.c.run_id,
    CELLS.c.lease_expires_at,
    CELLS.c.attempted_digest,
    CELLS.c.users_failed,
)


# The ledger as the planner reads it: calculation -> date -> cell. Nested rather than keyed by
# (calculation, date) because lookups then hash a date in a per-calculation dict.
Snapshot = dict[str, dict[dt.date, LedgerCell | SlimCell]]


@dataclass(frozen=True, slots=True)
class CellWrite:
    """Everything written when a cell's attempt ends.

    ``generation`` set: the attempt's result is published — COMPLETED (clean, or with users
    whose failure was inherited from upstream), PARTIAL (some users failed with an error of
    their own: retried by later runs) or DEAD_LETTER (PARTIAL for the last allowed time).
    ``generation`` None: nothing is published (FAILED, or DEAD_LETTER); the previous result
    stays. ``failures`` are the stored failed users (user, kind, error), at most
    ``STORED_FAILURES``; ``users_failed`` counts them all.
    """

    calculation: str
    date: dt.date
    status: str
    category: str
    code_hash: str
    layer_hash: str
    infra_hash: str
    epoch: int
    scoped_epoch: int
    inputs_digest: str
    upstream_hashes: Mapping[str, str | None]
    root_hashes: Mapping[str, Mapping[str, str]]
    previous_hash: str | None
    result_hash: str | None
    generation: str | None
    users: int
    run_id: str
    error: str | None
    attempt: Mapping[str, Any]
    users_failed: int = 0
    failures: Sequence[Mapping[str, str]] = ()
    # ``generation`` is a retained result's, re-pointed to without computing (REUSED): its
    # shards exist already and its retained row goes (``retention.record``).
    reused: bool = False


# How long a command waits for a database held by another process (an SQLite write lock, the
# schema migration lock) before it gives up with a one-line error (exit 2). Long enough for a
# run's publish transaction or another process's migration; short enough that a stuck or
# forgotten process is reported to cron instead of hanging it.
LOCK_WAIT_SECONDS = 30.0

# The PostgreSQL advisory lock that serialises schema migrations: two keys, this fixed one
# ("orch" in ASCII) and a hash of the schema being migrated, so that ledgers in different
# schemas of one database (projects, tests) never wait for each other.
MIGRATION_LOCK_KEY = 0x6F726368
MIGRATION_LOCK_SCOPE = "hashtext(current_schema())"


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    # First, so that the pragmas below wait for a lock too (switching a fresh file to WAL
    # needs one).
    cur.execute(f"PRAGMA busy_timeout={int(LOCK_WAIT_SECONDS * 1000)}")
    # WAL lets readers (show, plan) work during a run; NORMAL keeps commits cheap and is still
    # durable across process crashes (only an OS crash can lose the last transactions).
    # Switching a fresh file to WAL can fail at once with "database is locked" while another
    # process opens it, without calling the busy handler (seen 1 in 4 on four simultaneous
    # first opens, SQLite 3.40): so it is retried here, within the same wait.
    deadline = time.monotonic() + LOCK_WAIT_SECONDS
    while True:
        try:
            cur.execute("PRAGMA journal_mode=WAL")
            break
        except sqlite3.OperationalError as error:
            if "locked" not in str(error) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def _sqlite_path(url: str) -> Path | None:
    """The database file of an SQLite URL; None for an in-memory database."""
    database = make_url(url).database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database)


def _sqlite_errors(path: Path | None) -> Callable[[ExceptionContext], None]:
    """A ``handle_error`` hook turning SQLite's "database is locked" (a write lock held by
    another process past the busy timeout) and "unable to open database file" into one-line
    ``StorageError``s naming the file."""

    def handle(context: ExceptionContext) -> None:
        error = context.original_exception
        if not isinstance(error, sqlite3.OperationalError):
            return
        where = path or "(in memory)"
        if "locked" in str(error):
            raise StorageError(
                f"the ledger database {where} is locked by another process (waited "
                f"{LOCK_WAIT_SECONDS:g} s); is another orchestrator command running? "
                "Try again when it has finished"
            ) from error
        if "unable to open" in str(error):
            raise StorageError(
                f"cannot open or create the SQLite ledger {where}: {error}; check that its "
                "folder is writable and that the path is not a folder"
            ) from error

    return handle


def make_engine(url: str) -> Engine:
    """An engine for ``url`` with our SQLite settings.

    Raises:
        StorageError: the URL is malformed or its driver is missing; an SQLite file's folder
            does not exist (a typo would otherwise start an empty ledger silently).
    """
    try:
        if url.startswith("sqlite"):
            path = _sqlite_path(url)
            if path is not None and not path.parent.is_dir():
                raise StorageError(
                    f"cannot create the SQLite ledger {path}: its folder {path.parent} does not "
                    "exist (or is not a folder); create it, or fix database_url "
                    "(or --db / ORCHESTRATOR_DB_URL)"
                )
            engine = create_engine(url)
            event.listen(engine, "connect", _sqlite_pragmas)
            event.listen(engine, "handle_error", _sqlite_errors(path))
            return engine
        if url.startswith("postgresql://"):
            url = "postgresql+psycopg://" + url[len("postgresql://") :]
        return create_engine(url, pool_pre_ping=True)
    except (SQLAlchemyError, ImportError, ValueError) as e:
        raise StorageError(f"cannot use database URL {url!r}: {e}") from e


def _alembic_config(connection: Connection) -> Any:
    from alembic.config import Config as AlembicConfig

    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection"] = connection
    return cfg


def schema_heads() -> tuple[str, ...]:
    from alembic.script import ScriptDirectory

    return tuple(ScriptDirectory(str(MIGRATIONS)).get_heads())


def current_revision(engine: Engine) -> str | None:
    from alembic.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def at_schema_head(engine: Engine) -> bool:
    """Whether the ledger's ``alembic_version`` holds exactly ``SCHEMA_HEAD`` (read without
    Alembic: the table Alembic keeps, in the connection's default schema as Alembic's own).

    Raises:
        OperationalError: the database cannot be reached.
    """
    with engine.connect() as conn:
        if not inspect(conn).has_table("alembic_version"):
            return False
        versions = conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all()
    return versions == [SCHEMA_HEAD]


@contextlib.contextmanager
def _migrating(engine: Engine) -> Iterator[Connection]:
    """One transaction holding the schema migration lock, so that two processes opening an
    empty database at once do not both create the schema: the second waits (at most
    ``LOCK_WAIT_SECONDS``) and then finds the schema at head, a no-op for Alembic.

    PostgreSQL: a transaction-level advisory lock on ``MIGRATION_LOCK_KEY`` and the schema
    (released by the commit, with the migration's transactional DDL). SQLite: ``BEGIN EXCLUSIVE`` — the
    database's own write lock, waited for through the busy timeout — which also makes the
    whole migration one atomic transaction.

    Raises:
        StorageError: another process held the lock past ``LOCK_WAIT_SECONDS``.
    """
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            deadline = time.monotonic() + LOCK_WAIT_SECONDS
            while not conn.execute(
                text(f"SELECT pg_try_advisory_xact_lock(:key, {MIGRATION_LOCK_SCOPE})"),
                {"key": MIGRATION_LOCK_KEY},
            ).scalar():
                if time.monotonic() > deadline:
                    raise StorageError(
                        "another process is migrating the ledger schema (PostgreSQL advisory "
                        f"lock {MIGRATION_LOCK_KEY} of this schema; waited "
                        f"{LOCK_WAIT_SECONDS:g} s); try "
                        "again when it has finished"
                    )
                time.sleep(0.05)
        elif engine.dialect.name == "sqlite":
            conn.exec_driver_sql("BEGIN EXCLUSIVE")
        yield conn


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Apply Alembic migrations up to ``revision``, under the migration lock (``_migrating``):
    at most one process migrates at a time, the others then find nothing to do.

    Raises:
        StorageError: another process held the migration lock past ``LOCK_WAIT_SECONDS``.
    """
    from alembic import command

    with _migrating(engine) as conn:
        command.upgrade(_alembic_config(conn), revision)


def downgrade(engine: Engine, revision: str) -> None:
    """Revert Alembic migrations down to ``revision`` (``"base"`` drops every table), under
    the migration lock."""
    from alembic import command

    with _migrating(engine) as conn:
        command.downgrade(_alembic_config(conn), revision)


def lock_holder(run_id: str) -> str:
    """``host:pid:process start time:run`` — enough to tell later whether the holder died."""
    me = psutil.Process()
    return f"{socket.gethostname()}:{me.pid}:{int(me.create_time())}:{run_id}"


def holder_is_dead(holder: str) -> bool:
    """True only when ``holder`` names a process of this machine that is gone (or whose pid
    now belongs to a younger process). Holders of other machines are presumed alive."""
    parts = holder.split(":")
    if len(parts) != 4 or parts[0] != socket.gethostname():
        return False
    try:
        pid, started = int(parts[1]), int(parts[2])
    except ValueError:
        return False
    try:
        return int(psutil.Process(pid).create_time()) != started
    except psutil.NoSuchProcess:
        return True


def _safe(url: str) -> str:
    """``url`` without its password, for messages."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except (SQLAlchemyError, ValueError):
        return "(unparsable URL)"


def _first(error: object) -> str:
    return (str(error).strip().splitlines() or [""])[0]


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


# --- ledger digests: their upkeep (see ``ledger.digests``) ---------------------------------

BucketKey = tuple[str, int]  # (calculation, bucket)

# The parts of a stored row its build key is made of, for a write that changes only some.
_BUILD_PARTS = (
    CELLS.c.status,
    CELLS.c.category,
    CELLS.c.code_hash,
    CELLS.c.layer_hash,
    CELLS.c.infra_hash,
    CELLS.c.epoch,
    CELLS.c.scoped_epoch,
)


def _build_of(row: Any, **changed: Any) -> str:
    """``build_key`` of a row selected with ``_BUILD_PARTS``, with some parts replaced."""
    parts = {c.name: getattr(row, c.name) for c in _BUILD_PARTS} | changed
    return build_key(
        parts["status"],
        parts["category"],
        parts["code_hash"],
        parts["layer_hash"],
        parts["infra_hash"],
        parts["epoch"],
        parts["scoped_epoch"],
    )


def _date_param(conn: Connection, date: dt.date) -> Any:
    """A date as a textual statement's parameter (SQLite stores dates as ISO text)."""
    return date.isoformat() if conn.dialect.name == "sqlite" else date


@functools.lru_cache(maxsize=256)
def _neighbourhoods(n: int) -> Any:
    """For ``n`` (calculation ``c{i}``, first date ``lo{i}``, last date ``hi{i}``): the
    (i, date, result hash) of each calculation's stored rows from the one before ``lo{i}``
    through the one after ``hi{i}``. Textual and cached per ``n``: built as expressions, this
    statement cost more than the rest of a publish."""
    branches = [
        f"SELECT {i} AS k, date, result_hash FROM cells WHERE calculation = :c{i} "
        f"AND date >= COALESCE((SELECT MAX(date) FROM cells WHERE calculation = :c{i} "
        f"AND date < :lo{i}), :lo{i}) "
        f"AND date <= COALESCE((SELECT MIN(date) FROM cells WHERE calculation = :c{i} "
        f"AND date > :hi{i}), :hi{i})"
        for i in range(n)
    ]
    return text(" UNION ALL ".join(branches))


@functools.lru_cache(maxsize=256)
def _digest_rows(n: int, lock: bool) -> Any:
    """The digest rows of ``n`` (calculation ``c{i}``, bucket ``b{i}``) pairs (an OR of
    equalities: each one an index search), locked on PostgreSQL."""
    where = " OR ".join(f"(calculation = :c{i} AND bucket = :b{i})" for i in range(n))
    return text(
        "SELECT calculation, bucket, cells, sums, dirty, format FROM calc_digests "
        f"WHERE {where}" + (" FOR UPDATE" if lock else "")
    )


class _Upkeep:
    """The moves of one transaction's writes on the digests of the months they touch.

    Used in three steps around the writes to ``cells`` (so that the sums move in the same
    transaction): note every change (``row``, ``rebuild``, ``relink``), ``lock`` the digest
    rows before writing cells (their ``dirty`` flag then tells a write from elsewhere since
    the last upkeep, not the triggers of this transaction's own writes), ``commit`` after.
    """

    def __init__(self) -> None:
        self.moves: dict[BucketKey, Sums] = {}
        self.before: dict[BucketKey, tuple[Sums, bool]] = {}
        # calculation -> date -> (row existed, its old result hash, its new result hash)
        self.relinks: dict[str, dict[dt.date, tuple[bool, str | None, str | None]]] = {}

    def _sums(self, calc: str, date: dt.date) -> Sums:
        key = (calc, bucket_of(date))
        s = self.moves.get(key)
        if s is None:
            s = self.moves[key] = Sums()
        return s

    def row(
        self,
        calc: str,
        date: dt.date,
        build: str,
        upstream: Any,
        root: Any,
        previous: str | None,
        result: str | None,
        sign: int,
    ) -> None:
        """A row appears (+1) or disappears (-1) with these parts (mappings or JSON text)."""
        iso = date.isoformat()
        if isinstance(upstream, str) or isinstance(root, str):
            term = digests.row_inputs_json(iso, build, upstream, root, previous)
        else:
            term = digests.row_inputs(iso, build, upstream, root, previous)
        s = self._sums(calc, date)
        s.cells += sign
        s.inputs = digests.add(s.inputs, term, sign)
        s.results = digests.add(s.results, digests.bound(iso, result), sign)

    def rebuild(self, calc: str, date: dt.date, old_build: str, new_build: str) -> None:
        """A row's build key changes, nothing else of what the digests hold. (Noted even when
        it does not change: the write still fires the triggers, and the month must be stamped
        clean again.)"""
        s = self._sums(calc, date)
        if old_build != new_build:
            s.inputs = digests.add(
                s.inputs, digests.rebuild_term(date.isoformat(), old_build, new_build)
            )

    def relink(
        self, calc: str, date: dt.date, existed: bool, old: str | None, new: str | None
    ) -> None:
        """A row is inserted (``existed`` False) or its result hash may change: the links to
        and from it move (``links``, before ``lock``)."""
        if not existed or old != new:
            self.relinks.setdefault(calc, {})[date] = (existed, old, new)

    def links(self, conn: Connection) -> None:
        """Move the ``chain`` sums of the relinked rows: read each run of them with its stored
        neighbours (one statement for all), and replace the old links by the new ones."""
        # One neighbourhood per calculation, from the row before its first changed date to
        # the row after its last: neighbourhoods of one calculation must not overlap (each
        # would replace the same old link). A transaction writes a chunk of dates, so it is
        # a few rows; dates far apart read the rows between (date and hash only).
        clusters = [(calc, sorted(changes)) for calc, changes in self.relinks.items()]
        for chunk in _chunks(clusters, 100):
            params: dict[str, Any] = {}
            for i, (calc, run) in enumerate(chunk):
                params[f"c{i}"] = calc
                params[f"lo{i}"] = _date_param(conn, run[0])
                params[f"hi{i}"] = _date_param(conn, run[-1])
            stored: dict[int, dict[dt.date, str | None]] = {i: {} for i in range(len(chunk))}
            for k, date, result in conn.execute(_neighbourhoods(len(chunk)), params):
                day = date if isinstance(date, dt.date) else dt.date.fromisoformat(str(date))
                stored[k][day] = result
            for i, (calc, run) in enumerate(chunk):
                old = stored[i]
                new = dict(old)
                for date in run:
                    new[date] = self.relinks[calc][date][2]
                for chain, sign in ((old, -1), (new, 1)):
                    days = sorted(chain)
                    for p, q in itertools.pairwise(days):
                        s = self._sums(calc, q)
                        s.chain = digests.add(s.chain, digests.bound(q.isoformat(), chain[p]), sign)

    def lock(self, conn: Connection) -> None:
        """Read (on PostgreSQL: lock) the digest rows the moves touch; call before the writes."""
        if self.relinks:
            self.links(conn)
        keys = sorted(self.moves)
        current = digests.current_format()
        lock = conn.dialect.name == "postgresql"
        for chunk in _chunks(keys, 200):
            params = {f"c{i}": c for i, (c, _) in enumerate(chunk)} | {
                f"b{i}": b for i, (_, b) in enumerate(chunk)
            }
            for calc, bucket, cells, sums, dirty, format_ in conn.execute(
                _digest_rows(len(chunk), lock), params
            ):
                clean = not dirty and format_ == current
                self.before[(calc, bucket)] = (digests.unpack(cells, sums), clean)

    def commit(self, conn: Connection) -> None:
        """Write the moved sums; a month stays dirty if it was before this transaction (or
        held another format: its other rows are not known to match the current rule)."""
        current = digests.current_format()
        rows = []
        for key, move in self.moves.items():
            base, clean = self.before.get(key, (Sums(), True))
            s = base.merged(move)
            rows.append(
                {
                    "calculation": key[0],
                    "bucket": key[1],
                    "cells": s.cells,
                    "sums": digests.pack(s),
                    "dirty": 0 if clean else 1,
                    "format": current,
                }
            )
        if rows:
            _upsert_digests(conn, rows)


def _rebuilds(
    conn: Connection,
    where: ColumnElement[bool],
    change: Callable[[Any], Mapping[str, Any]],
) -> _Upkeep:
    """The upkeep of a write that changes only build-key parts of the rows ``where`` selects
    (``change(row)`` gives the new parts), read and locked before the write; commit after."""
    upkeep = _Upkeep()
    rows = conn.execute(
        select(CELLS.c.calculation, CELLS.c.date, CELLS.c.build_key, *_BUILD_PARTS).where(where)
    )
    for row in rows:
        upkeep.rebuild(row.calculation, row.date, row.build_key, _build_of(row, **change(row)))
    upkeep.lock(conn)
    return upkeep


@functools.lru_cache(maxsize=4)
def _digest_upsert(dialect: str) -> Any:
    make: Any = sqlite_insert
    if dialect == "postgresql":
        # (imported here: the PostgreSQL dialect package costs an SQLite ledger ~30 ms)
        from sqlalchemy.dialects.postgresql import insert as make
    stmt = make(DIGESTS)
    return stmt.on_conflict_do_update(
        index_elements=[DIGESTS.c.calculation, DIGESTS.c.bucket],
        set_={c: stmt.excluded[c] for c in ("cells", "sums", "dirty", "format")},
    )


def _upsert_digests(conn: Connection, rows: list[dict[str, Any]]) -> None:
    stmt = _digest_upsert(conn.dialect.name)
    for chunk in _chunks(rows, 1000):
        conn.execute(stmt, list(chunk))


# Cached statements of ``Ledger._publish``'s executemany groups (the SET clause of the
# update comes from the keys of its parameter rows; ``b_``: names no column has).
_UPDATE_BY_ID = update(CELLS).where(CELLS.c.id == bindparam("b_id"))


def _digest_calculations(
    conn: Connection,
    calculations: Iterable[str] | None,
    verify: Callable[[LedgerCell], bool] | None = None,
) -> int:
    """Recompute the digests of ``calculations`` (None: all) from their rows, replacing what
    was stored. A month is clean (trusted) when ``verify`` accepts each of its rows, or with
    no ``verify`` (rows known to be written by this code: benchmarks, tests). Returns the
    number of months written."""
    names = None if calculations is None else sorted(set(calculations))
    query = select(*_FULL_COLUMNS).order_by(CELLS.c.calculation, CELLS.c.date)
    if names is not None:
        query = query.where(CELLS.c.calculation.in_(names))
        conn.execute(delete(DIGESTS).where(DIGESTS.c.calculation.in_(names)))
    else:
        conn.execute(delete(DIGESTS))
    by_calc: dict[str, list[LedgerCell]] = {}
    for row in conn.execute(query):
        by_calc.setdefault(row[0], []).append(LedgerCell._make(row))
    current = digests.current_format()
    rows = []
    for calc, cells in by_calc.items():
        sums = digests.calc_sums(
            [
                (c.date, c.build, c.upstream_json, c.root_json, c.previous_hash, c.result_hash)
                for c in cells
            ]
        )
        trusted: dict[int, bool] = {}
        for c in cells:
            month = bucket_of(c.date)
            trusted[month] = trusted.get(month, True) and (verify is None or verify(c))
        for bucket, s in sums.items():
            rows.append(
                {
                    "calculation": calc,
                    "bucket": bucket,
                    "cells": s.cells,
                    "sums": digests.pack(s),
                    "dirty": 0 if trusted[bucket] else 1,
                    "format": current,
                }
            )
    if rows:
        _upsert_digests(conn, rows)
    return len(rows)


class Ledger:
    """Access to one ledger database. Construct with ``Ledger.open(url)``."""

    def __init__(self, engine: Engine, retain: int = retention.DEFAULT_KEEP):
        self.engine = engine
        # Superseded clean results kept per cell (``retention``); 0 deletes them at once.
        self.retain = retain

    @classmethod
    def open(cls, url: str, migrate: bool = True) -> Ledger:
        """Connect, check the schema version and apply pending migrations.

        Raises:
            StorageError: unreachable database, or a schema newer than this code knows.
        """
        engine = make_engine(url)
        try:
            if at_schema_head(engine):  # the usual case: nothing to check further
                return cls(engine)
            revision = current_revision(engine)
        except OperationalError as e:
            raise StorageError(
                f"cannot connect to the ledger database {_safe(url)}: {_first(e.orig)}"
            ) from e
        heads = schema_heads()
        from alembic.script import ScriptDirectory

        known = {s.revision for s in ScriptDirectory(str(MIGRATIONS)).walk_revisions()}
        if revision is not None and revision not in known:
            raise StorageError(
                f"the ledger schema is at revision {revision}, newer than this orchestrator "
                f"knows ({', '.join(heads)}); upgrade orchestrator before using this database"
            )
        if revision not in heads:
            if not migrate:
                raise StorageError(
                    f"the ledger schema is at {revision or 'nothing'}, expected {heads[0]}; "
                    "run `orchestrator db upgrade`"
                )
            # (another process may be migrating right now: upgrade waits for its lock, then
            # finds the schema at head)
            upgrade(engine)
        return cls(engine)

    def dispose(self) -> None:
        self.engine.dispose()

    # --- cells: bulk reads -----------------------------------------------------------------

    def load_cells(self, calculations: Iterable[str] | None = None, slim: bool = False) -> Snapshot:
        """Every stored cell (optionally of some calculations), in one query, as
        calculation -> date -> ``LedgerCell`` (``SlimCell`` with ``slim``).

        Rows are read without SQLAlchemy's per-row processing (the planner's hot path:
        365,000 rows); dates arrive as ``date`` objects from psycopg and as ISO text from
        SQLite, converted once per distinct date.
        """
        query = select(*(_SLIM_COLUMNS if slim else _FULL_COLUMNS))
        # Filtered here, not in SQL: an IN list makes SQLite walk the index row by row, which
        # is slower than the plain scan when (as usual) nearly every row is wanted.
        return self._fetch_cells([query], slim, None if calculations is None else set(calculations))

    def _fetch_cells(
        self,
        queries: Sequence[Select[Any]],
        slim: bool,
        calculations: set[str] | None = None,
        months: Mapping[str, set[int]] | None = None,
    ) -> Snapshot:
        """Run cell queries (``_SLIM_COLUMNS`` or ``_FULL_COLUMNS``) on the raw DBAPI cursor,
        keeping the rows of ``calculations`` (None: all) and, with ``months``, only those of
        the listed months of each calculation; as calculation -> date -> cell."""
        kind = SlimCell if slim else LedgerCell
        out: Snapshot = {}
        with self.engine.connect() as conn, paused_gc(freeze=True):
            cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
            try:
                dates: dict[Any, dt.date] = {}
                make = tuple.__new__
                for query in queries:
                    sql = str(query.compile(conn, compile_kwargs={"literal_binds": True}))
                    cursor.execute(sql)
                    rows = cursor.fetchall()
                    for row in rows:
                        if calculations is not None and row[0] not in calculations:
                            continue
                        raw = row[1]
                        date = dates.get(raw)
                        if date is None:
                            date = dates[raw] = (
                                raw if isinstance(raw, dt.date) else dt.date.fromisoformat(raw)
                            )
                        if months is not None and bucket_of(date) not in months.get(row[0], ()):
                            continue
                        per_date = out.get(row[0])
                        if per_date is None:
                            per_date = out[row[0]] = {}
                        per_date[date] = make(kind, (row[0], date, *row[2:]))  # type: ignore[assignment,call-overload]
            finally:
                cursor.close()
        return out

    def load_buckets(self, buckets: Iterable[tuple[str, int]], slim: bool = True) -> Snapshot:
        """The stored cells of some months of some calculations (``digests.bucket_of``), as
        ``load_cells`` returns them: what the planner reads where digests do not prove the
        cells unchanged. Consecutive months are read as one date range (an index range scan
        per range); when most months of the ledger are asked for, one plain scan."""
        wanted: dict[str, set[int]] = {}
        for calc, bucket in buckets:
            wanted.setdefault(calc, set()).add(bucket)
        if not wanted:
            return {}
        columns = _SLIM_COLUMNS if slim else _FULL_COLUMNS
        asked = sum(len(b) for b in wanted.values())
        with self.engine.connect() as conn:
            stored = conn.execute(select(func.count()).select_from(DIGESTS)).scalar_one()
        if asked * 2 >= stored:
            return self._fetch_cells([select(*columns)], slim, set(wanted), wanted)
        ranges: list[ColumnElement[bool]] = []
        for calc, months in sorted(wanted.items()):
            ordered = sorted(months)
            start = previous = ordered[0]
            for month in [*ordered[1:], None]:
                if month is not None and month == previous + 1:
                    previous = month
                    continue
                lo, hi = bucket_bounds(start)[0], bucket_bounds(previous)[1]
                ranges.append(
                    and_(CELLS.c.calculation == calc, CELLS.c.date >= lo, CELLS.c.date <= hi)
                )
                if month is not None:
                    start = previous = month
        queries = [select(*columns).where(or_(*chunk)) for chunk in _chunks(ranges, 200)]
        return self._fetch_cells(queries, slim, set(wanted), wanted)

    def load_result_hashes(
        self, calculations: Iterable[str]
    ) -> dict[str, dict[dt.date, str | None]]:
        """calculation -> date -> stored result hash, of every cell of ``calculations`` (one
        scan): what a whole plan's decisions carry, read only when all of them are asked for."""
        wanted = set(calculations)
        out: dict[str, dict[dt.date, str | None]] = {}
        query = select(CELLS.c.calculation, CELLS.c.date, CELLS.c.result_hash)
        if len(wanted) <= 8:  # a few: through the index (a scan reads every calculation)
            query = query.where(CELLS.c.calculation.in_(sorted(wanted)))
        with self.engine.connect() as conn, paused_gc(freeze=True):
            sql = str(query.compile(conn, compile_kwargs={"literal_binds": True}))
            cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
            try:
                cursor.execute(sql)
                rows = cursor.fetchall()
            finally:
                cursor.close()
        dates: dict[Any, dt.date] = {}
        for calc, raw, result in rows:
            if calc not in wanted:
                continue
            date = dates.get(raw)
            if date is None:
                date = dates[raw] = raw if isinstance(raw, dt.date) else dt.date.fromisoformat(raw)
            per_date = out.get(calc)
            if per_date is None:
                per_date = out[calc] = {}
            per_date[date] = result
        return out

    def load_digests(self, calculations: Iterable[str] | None = None) -> dict[str, CalcDigests]:
        """The stored digests (``ledger.digests``) of ``calculations`` (None: all), one query
        on the raw cursor (a month is one row: 33,000 rows for a 1,000,000-cell ledger)."""
        wanted = None if calculations is None else set(calculations)
        query = select(
            DIGESTS.c.calculation,
            DIGESTS.c.bucket,
            DIGESTS.c.cells,
            DIGESTS.c.sums,
            DIGESTS.c.dirty,
            DIGESTS.c.format,
        ).order_by(DIGESTS.c.calculation, DIGESTS.c.bucket)
        with self.engine.connect() as conn:
            sql = str(query.compile(conn))
            cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
            try:
                cursor.execute(sql)
                rows = cursor.fetchall()
            finally:
                cursor.close()
        out: dict[str, CalcDigests] = {}
        zero = bytes(digests.PACKED_BYTES)
        current = digests.current_format()
        start = 0
        for end in range(1, len(rows) + 1):
            if end < len(rows) and rows[end][0] == rows[start][0]:
                continue
            calc = rows[start][0]
            if wanted is None or calc in wanted:
                block = rows[start:end]
                n = len(block)
                words = np.frombuffer(
                    b"".join(zero if r[3] is None else bytes(r[3]) for r in block),
                    dtype="<u8",
                ).reshape(n, 6)
                out[calc] = CalcDigests(
                    buckets=np.array([r[1] for r in block], dtype=np.int64),
                    cells=np.array([r[2] for r in block], dtype=np.int64),
                    inputs=words[:, 0:2].astype(np.uint64),
                    results=words[:, 2:4].astype(np.uint64),
                    chain=words[:, 4:6].astype(np.uint64),
                    clean=np.array([not r[4] and r[5] == current for r in block], dtype=bool),
                )
            start = end
        return out

    def repair_digests(self, verify: Callable[[LedgerCell], bool]) -> int:
        """Recompute the digests of every calculation with an untrusted month — written to
        outside the ledger's methods (dirty), or of another format (``digests.current_format``:
        another rule of inputs digests, or not checked since migration 0006) — and trust each
        month again only if ``verify`` accepts every row in it (``planning.row_verifier``: its
        inputs digest is the current rule applied to its stored values). Returns how many
        calculations were recomputed (0 when all were sound: one small query)."""
        with self.engine.begin() as conn:
            names = (
                conn.execute(
                    select(DIGESTS.c.calculation)
                    .where(or_(DIGESTS.c.dirty != 0, DIGESTS.c.format != digests.current_format()))
                    .distinct()
                )
                .scalars()
                .all()
            )
            if names:
                _digest_calculations(conn, names, verify)
        return len(names)

    def rebuild_digests(self) -> int:
        """Recompute every digest from the stored cells, trusting every row (for ledgers
        written by this code, e.g. a benchmark's). Returns the months written."""
        with self.engine.begin() as conn:
            return _digest_calculations(conn, None)

    def cell(self, calculation: str, date: dt.date) -> LedgerCell | None:
        """One stored cell, every part (one indexed query)."""
        query = select(*_FULL_COLUMNS).where(
            CELLS.c.calculation == calculation, CELLS.c.date == date
        )
        cell = self._fetch_cells([query], False).get(calculation, {}).get(date)
        return cell if isinstance(cell, LedgerCell) else None

    # --- cells: writes --------------------------------------------------------------------

    def write_shards(self, shards: Sequence[Mapping[str, Any]]) -> None:
        """Insert shard rows (invisible until their cell is published with their generation)."""
        if shards:
            with self.engine.begin() as conn:
                conn.execute(insert(SHARDS), list(shards))

    def write_shard_span(
        self,
        cells: Sequence[tuple[str, dt.date, str]],
        seqs: tuple[int, int],
        shards: Sequence[Mapping[str, Any]],
    ) -> None:
        """Replace the shards numbered ``seqs[0] <= seq < seqs[1]`` of each unpublished
        generation ``cells`` (calculation, date, generation) with ``shards``, in one
        transaction: what a worker writes for its user range, so that the range computed
        again (a retried task) replaces its first attempt's shards instead of colliding.
        Nothing is written once any of ``cells`` is published or retained: the write of an
        attempt presumed lost that finished late, after the run took its retry's shards."""
        if not cells:
            return

        def of(table: Any) -> ColumnElement[bool]:  # rows of ``table`` of those generations
            return or_(
                *(
                    and_(
                        table.c.calculation == calculation,
                        table.c.date == date,
                        table.c.generation == generation,
                    )
                    for calculation, date, generation in cells
                )
            )

        with self.engine.begin() as conn:
            if self.engine.dialect.name == "postgresql":
                # Two attempts at one range at once (a task presumed lost, and its retry):
                # the second waits here, then its DELETE sees the first one's rows. (SQLite
                # serialises writers itself.)
                conn.execute(
                    text("SELECT pg_advisory_xact_lock(hashtext(:g), :s)"),
                    {"g": cells[0][2], "s": seqs[0]},
                )
            for table in (CELLS, RETAINED):
                if conn.execute(select(table.c.id).where(of(table)).limit(1)).first():
                    return  # a late attempt: the run already published these shards
            conn.execute(
                delete(SHARDS).where(of(SHARDS), SHARDS.c.seq >= seqs[0], SHARDS.c.seq < seqs[1])
            )
            if shards:
                conn.execute(insert(SHARDS), list(shards))

    def url(self) -> str:
        """The database URL another process opens this ledger with (its password included;
        an SQLite file's path made absolute, for workers started elsewhere)."""
        url = self.engine.url
        if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
            url = url.set(database=str(Path(url.database).resolve()))
        return url.render_as_string(hide_password=False)

    def publish_with_shards(
        self, writes: Sequence[CellWrite], shards: Sequence[Mapping[str, Any]], now: dt.datetime
    ) -> None:
        """Insert the last shards of some cells and publish them, all in one transaction.

        A COMPLETED write switches the cell to its new generation and deletes the old shards;
        a FAILED write keeps the previously published result (generation, result hash and
        fingerprint parts) readable and only records the failure.
        """
        if not writes:
            return
        with self.engine.begin() as conn:
            if shards:
                conn.execute(insert(SHARDS), list(shards))
            self._publish(conn, writes, now)
            faults.reached("publish")  # inside the transaction, before its commit

    def publish(self, writes: Sequence[CellWrite], now: dt.datetime) -> None:
        """Record finished cells in one transaction (see ``publish_with_shards``)."""
        if writes:
            with self.engine.begin() as conn:
                self._publish(conn, writes, now)

    def _publish(self, conn: Connection, writes: Sequence[CellWrite], now: dt.datetime) -> None:
        """Upsert the cells of ``writes`` on an open transaction.

        A COMPLETED write switches the cell to its new generation and deletes the old shards;
        a FAILED write keeps the previously published result (generation, result hash and
        fingerprint parts) readable and only records the failure.
        """
        keys = [(w.calculation, w.date) for w in writes]
        existing = {
            (r.calculation, r.date): r
            for r in conn.execute(
                select(
                    CELLS.c.id,
                    CELLS.c.calculation,
                    CELLS.c.date,
                    CELLS.c.generation,
                    CELLS.c.attempts,
                    CELLS.c.build_key,
                    *_BUILD_PARTS,
                    cast(CELLS.c.upstream_hashes, String).label("upstream_json"),
                    cast(CELLS.c.root_hashes, String).label("root_json"),
                    CELLS.c.previous_hash,
                    CELLS.c.result_hash,
                    CELLS.c.inputs_digest,
                    CELLS.c.users,
                    CELLS.c.users_failed,
                    CELLS.c.updated_at,
                ).where(_cells_in(CELLS, keys))
            )
        }
        upkeep = _Upkeep()
        for w in writes:
            old = existing.get((w.calculation, w.date))
            if w.generation is None and old is not None:  # (as below: only the status moves)
                upkeep.rebuild(
                    w.calculation, w.date, old.build_key, _build_of(old, status=w.status)
                )
                continue
            if old is not None:
                upkeep.row(
                    w.calculation,
                    w.date,
                    old.build_key,
                    old.upstream_json,
                    old.root_json,
                    old.previous_hash,
                    old.result_hash,
                    -1,
                )
            new_build = build_key(
                w.status,
                w.category,
                w.code_hash,
                w.layer_hash,
                w.infra_hash,
                w.epoch,
                w.scoped_epoch,
            )
            upkeep.row(
                w.calculation,
                w.date,
                new_build,
                w.upstream_hashes,
                w.root_hashes,
                w.previous_hash,
                w.result_hash,
                1,
            )
            upkeep.relink(
                w.calculation,
                w.date,
                old is not None,
                old.result_hash if old is not None else None,
                w.result_hash,
            )
        upkeep.lock(conn)
        inserts: list[dict[str, Any]] = []
        updates: list[dict[str, Any]] = []
        kept: list[dict[str, Any]] = []
        superseded: list[dict[str, Any]] = []
        retained: list[dict[str, Any]] = []
        reclaimed: list[dict[str, Any]] = []
        failures: list[dict[str, Any]] = []
        for w in writes:
            old = existing.get((w.calculation, w.date))
            # Every attempt that is not clean counts towards the dead letter; a clean one (or
            # one whose failed users all inherited their failure) resets the count.
            attempts = (old.attempts if old else 0) + 1 if w.status != "COMPLETED" else 0
            failures += [
                {"run_id": w.run_id, "calculation": w.calculation, "date": w.date, **f}
                for f in w.failures
            ]
            if w.generation is None and old is not None:  # nothing published: keep the old
                kept.append(
                    {
                        "b_id": old.id,
                        "status": w.status,
                        "attempts": attempts,
                        "error": w.error,
                        "run_id": w.run_id,
                        "users_failed": w.users_failed,
                        "attempted_digest": w.inputs_digest,
                        "updated_at": now,
                    }
                )
                continue
            values = {
                "calculation": w.calculation,
                "date": w.date,
                "status": w.status,
                "category": w.category,
                "code_hash": w.code_hash,
                "layer_hash": w.layer_hash,
                "infra_hash": w.infra_hash,
                "epoch": w.epoch,
                "scoped_epoch": w.scoped_epoch,
                "inputs_digest": w.inputs_digest,
                "upstream_hashes": dict(w.upstream_hashes),
                "root_hashes": {k: dict(v) for k, v in w.root_hashes.items()},
                "previous_hash": w.previous_hash,
                "result_hash": w.result_hash,
                "generation": w.generation,
                "users": w.users,
                "attempts": attempts,
                "lease_expires_at": None,
                "run_id": w.run_id,
                "error": w.error,
                "hash_format": 1,
                "updated_at": now,
                "users_failed": w.users_failed,
                "attempted_digest": w.inputs_digest,
            }
            if w.reused:
                reclaimed.append({"b_calc": w.calculation, "b_date": w.date, "b_gen": w.generation})
            if old is None:
                inserts.append(values)
                continue
            updates.append({"b_id": old.id, **values})
            if old.generation and old.generation != w.generation:
                if self.retain > 0 and retention.retainable(old):
                    retained.append(retention.retained_row(old, now))
                else:
                    superseded.append(
                        {"b_calc": w.calculation, "b_date": w.date, "b_gen": old.generation}
                    )
        # One executemany per statement shape (a statement per cell cost more than the rest
        # of a re-run's publish): every row of a group has the same keys, which SQLAlchemy
        # turns into the SET clause. Still one transaction: a crash leaves nothing visible.
        if updates:
            conn.execute(_UPDATE_BY_ID, updates)
        if kept:
            conn.execute(_UPDATE_BY_ID, kept)
        if superseded:
            conn.execute(DELETE_SHARDS_OF, superseded)
        retention.record(conn, retained, reclaimed, self.retain)
        if inserts:
            conn.execute(insert(CELLS), inserts)
        attempts_rows = [dict(w.attempt) for w in writes if w.attempt]
        if attempts_rows:
            conn.execute(insert(ATTEMPTS), attempts_rows)
        retried = [(w.calculation, w.date) for w in writes]
        # A cell retried within one run (reconciliation) keeps only its last attempt's users.
        for run_id in sorted({w.run_id for w in writes}):
            conn.execute(
                delete(FAILURES).where(FAILURES.c.run_id == run_id, _cells_in(FAILURES, retried))
            )
        if failures:
            conn.execute(insert(FAILURES), failures)
        upkeep.commit(conn)

    def lease(
        self, cells: Sequence[tuple[str, dt.date]], run_id: str, expires: dt.datetime
    ) -> None:
        """Mark stored cells RUNNING under ``run_id``'s lease, in one statement; their
        published results stay published. (A cell never computed has no row to lease: if the
        run dies, it is simply still NEW.)"""
        if cells:
            with self.engine.begin() as conn:
                upkeep = _rebuilds(conn, _cells_in(CELLS, cells), lambda row: {"status": "RUNNING"})
                conn.execute(
                    update(CELLS)
                    .where(_cells_in(CELLS, cells))
                    .values(status="RUNNING", run_id=run_id, lease_expires_at=expires)
                )
                upkeep.commit(conn)

    def renew_leases(self, run_id: str, expires: dt.datetime) -> None:
        """The heartbeat: extend the leases of this run's RUNNING cells."""
        with self.engine.begin() as conn:
            conn.execute(
                update(CELLS)
                .where(CELLS.c.run_id == run_id, CELLS.c.status == "RUNNING")
                .values(lease_expires_at=expires)
            )

    def migrate_categories(
        self, moves: Sequence[tuple[str, dt.date, str]], attempts: Sequence[Mapping[str, Any]]
    ) -> None:
        """Switch cells (calculation, date) to a new category, and record the attempts, in one
        transaction: the published result itself does not change."""
        with self.engine.begin() as conn:
            to = {(calculation, date): category for calculation, date, category in moves}
            upkeep = _rebuilds(
                conn,
                _cells_in(CELLS, list(to)),
                lambda row: {"category": to[(row.calculation, row.date)]},
            )
            for calculation, date, category in moves:
                conn.execute(
                    update(CELLS)
                    .where(CELLS.c.calculation == calculation, CELLS.c.date == date)
                    .values(category=category)
                )
            upkeep.commit(conn)
            if attempts:
                conn.execute(insert(ATTEMPTS), [dict(a) for a in attempts])

    def dead_letters(self) -> list[Any]:
        """Cells in the dead-letter state (calculation, date, attempts, error), in order."""
        with self.engine.connect() as conn:
            return list(
                conn.execute(
                    select(CELLS.c.calculation, CELLS.c.date, CELLS.c.attempts, CELLS.c.error)
                    .where(CELLS.c.status == "DEAD_LETTER")
                    .order_by(CELLS.c.calculation, CELLS.c.date)
                ).all()
            )

    def retry_dead_letters(
        self, calculation: str | None = None, date: dt.date | None = None
    ) -> int:
        """Put dead letters (optionally of one calculation / date) back in the loop: the next
        run retries them (RETRY) with a fresh attempt count. Returns how many."""
        where = [CELLS.c.status == "DEAD_LETTER"]
        if calculation is not None:
            where.append(CELLS.c.calculation == calculation)
        if date is not None:
            where.append(CELLS.c.date == date)
        with self.engine.begin() as conn:
            upkeep = _rebuilds(conn, and_(*where), lambda row: {"status": "FAILED"})
            count = (
                conn.execute(
                    update(CELLS).where(*where).values(status="FAILED", attempts=0)
                ).rowcount
                or 0
            )
            upkeep.commit(conn)
            return count

    def collect_orphans(self) -> int:
        """Delete shards no published cell points at and no retained result holds (left by
        a crashed attempt)."""
        s = SHARDS.alias("s")
        published = or_(
            exists().where(same_generation(CELLS, s)),
            exists().where(same_generation(RETAINED, s)),
        )
        with self.engine.begin() as conn:
            # Found first, on the shards' covering index: a DELETE of the same condition scans
            # the table itself, every shard's data (most of the database), on every run.
            orphans = conn.execute(select(s.c.id).where(~published)).scalars().all()
            deleted = 0
            for chunk in _chunks(orphans, 500):
                result = conn.execute(delete(s).where(s.c.id.in_(chunk), ~published))  # type: ignore[arg-type]
                deleted += result.rowcount or 0
            return deleted

    # --- retained results (``retention``) ---------------------------------------------------

    def load_retained(
        self, cells: Iterable[tuple[str, dt.date]], parts: Mapping[str, retention.OwnParts]
    ) -> dict[tuple[str, dt.date], tuple[retention.Retained, ...]]:
        """The retained results ``cells`` could be re-pointed to now: those whose own parts
        but code equal their calculation's current ``parts`` (layer and infra hashes, system
        and scoped epoch), as (calculation, date) -> results, newest first."""
        with self.engine.connect() as conn:
            return retention.load(conn, cells, parts)

    def retained_shards(self) -> int:
        """How many shards retained results hold (the rest belong to published cells, or
        to an attempt in progress or crashed)."""
        r, s = RETAINED, SHARDS
        with self.engine.connect() as conn:
            return int(
                conn.execute(
                    select(func.count()).select_from(s).join(r, same_generation(r, s))
                ).scalar_one()
            )

    def gc(
        self,
        keep: int,
        older_than: dt.timedelta | None,
        now: dt.datetime,
        dry_run: bool = False,
    ) -> retention.GcReport:
        """Prune retained results past the policy (``retention.prunable``: per cell all but
        the ``keep`` newest, and with ``older_than`` those retained longer ago), with their
        shards, and orphaned shards; in one transaction. A current result is never pruned.

        Raises:
            ValueError: ``keep`` negative.
        """
        with self.engine.begin() as conn:
            chosen, size, kept = retention.gc(conn, keep, older_than, now, dry_run)
        orphans = 0 if dry_run else self.collect_orphans()
        return retention.GcReport(len(chosen), size, kept, orphans, dry_run)

    # --- results --------------------------------------------------------------------------

    def shard_payloads(self, calculation: str, date: dt.date) -> list[bytes] | None:
        """The compressed shards of a cell's published result, in order; None if unpublished."""
        return self.shard_payloads_many([(calculation, date)]).get((calculation, date))

    def shard_index(self, calculation: str, date: dt.date) -> list[ShardInfo] | None:
        """The shards of a cell's published result (without their data), in order; None if
        the cell has no published result."""
        return self.shard_index_many([(calculation, date)]).get((calculation, date))

    def shard_index_many(
        self, cells: Sequence[tuple[str, dt.date]]
    ) -> dict[tuple[str, dt.date], list[ShardInfo]]:
        """``shard_index`` of many cells, two queries per 500 cells; cells without a
        published result are absent."""
        columns = (SHARDS.c.generation, SHARDS.c.seq, SHARDS.c.first_user, SHARDS.c.last_user)
        rows = self._published_shards(cells, (*columns, SHARDS.c.users))
        return {key: [ShardInfo(*row) for row in shards] for key, shards in rows.items()}

    def _published_shards(
        self, cells: Sequence[tuple[str, dt.date]], columns: Sequence[Any]
    ) -> dict[tuple[str, dt.date], list[Sequence[Any]]]:
        """``columns`` of the published shards of ``cells``, in order, per cell (an empty list
        for a published cell without shards; an unpublished cell is absent)."""
        out: dict[tuple[str, dt.date], list[Sequence[Any]]] = {}
        for chunk in _chunks(list(cells), 500):
            query = (
                select(SHARDS.c.calculation, SHARDS.c.date, *columns)
                .join(
                    CELLS,
                    and_(
                        CELLS.c.calculation == SHARDS.c.calculation,
                        CELLS.c.date == SHARDS.c.date,
                        CELLS.c.generation == SHARDS.c.generation,
                    ),
                )
                .where(_cells_in(CELLS, chunk))
                .order_by(SHARDS.c.calculation, SHARDS.c.date, SHARDS.c.seq)
            )
            with self.engine.connect() as conn:
                for calc, date in conn.execute(
                    select(CELLS.c.calculation, CELLS.c.date).where(
                        _cells_in(CELLS, chunk), CELLS.c.generation.is_not(None)
                    )
                ):
                    out[(calc, date)] = []
                for calc, date, *row in conn.execute(query):
                    out[(calc, date)].append(row)
        return out

    def shard_data(self, calculation: str, date: dt.date, shard: ShardInfo) -> bytes:
        """One shard's compressed payload.

        Raises:
            StorageError: the shard is gone (its cell was re-published since it was listed).
        """
        return self.shard_data_many(calculation, date, [shard])[0]

    def shard_data_many(
        self, calculation: str, date: dt.date, shards: Sequence[ShardInfo]
    ) -> list[bytes]:
        """The compressed payloads of ``shards`` (from ``shard_index``) of one cell, in the
        given order, one query per 500 shards.

        Raises:
            StorageError: a shard is gone (its cell was re-published since it was listed).
        """
        found: dict[tuple[str, int], bytes] = {}
        with self.engine.connect() as conn:
            for chunk in _chunks(list(shards), 500):
                found.update(
                    ((generation, seq), bytes(data))
                    for generation, seq, data in conn.execute(
                        select(SHARDS.c.generation, SHARDS.c.seq, SHARDS.c.data).where(
                            SHARDS.c.calculation == calculation,
                            SHARDS.c.date == date,
                            tuple_(SHARDS.c.generation, SHARDS.c.seq).in_(
                                [(s.generation, s.seq) for s in chunk]
                            ),
                        )
                    )
                )
        out = []
        for shard in shards:
            data = found.get((shard.generation, shard.seq))
            if data is None:
                raise StorageError(
                    f"shard {shard.seq} of {calculation} on {date} vanished while being read "
                    "(the cell was re-published meanwhile); read it again"
                )
            out.append(data)
        return out

    def unpublished_payloads(
        self, calculation: str, date: dt.date, generation: str, seqs: tuple[int, int]
    ) -> Iterator[bytes]:
        """The compressed payloads of a generation's shards with ``seqs[0] <= seq < seqs[1]``,
        in order, fetched one at a time (whether or not the generation is published)."""
        where = (
            SHARDS.c.calculation == calculation,
            SHARDS.c.date == date,
            SHARDS.c.generation == generation,
        )
        with self.engine.connect() as conn:
            numbers = (
                conn.execute(
                    select(SHARDS.c.seq)
                    .where(*where, SHARDS.c.seq >= seqs[0], SHARDS.c.seq < seqs[1])
                    .order_by(SHARDS.c.seq)
                )
                .scalars()
                .all()
            )
        for seq in numbers:
            with self.engine.connect() as conn:
                yield bytes(
                    conn.execute(
                        select(SHARDS.c.data).where(*where, SHARDS.c.seq == seq)
                    ).scalar_one()
                )

    def shard_payloads_many(
        self, cells: Sequence[tuple[str, dt.date]]
    ) -> dict[tuple[str, dt.date], list[bytes]]:
        """Published shards of many cells, two queries per 500 cells."""
        rows = self._published_shards(cells, (SHARDS.c.data,))
        return {key: [row[0] for row in shards] for key, shards in rows.items()}

    # --- code-version registry and epoch bumps --------------------------------------------

    def register_versions(
        self,
        entries: Mapping[tuple[str, str], tuple[str, Mapping[str, Any]]],
        now: dt.datetime,
        sim_hashes: Mapping[str, str] | None = None,
    ) -> None:
        """Record (kind, hash) -> (calculation, parts) for the hashes not yet registered;
        ``sim_hashes`` gives code hash -> simulation hash for code versions."""
        if not entries:
            return
        with self.engine.begin() as conn:
            known: set[tuple[str, str]] = set()
            for chunk in _chunks(sorted(entries), 500):  # bounded IN lists, one transaction
                known.update(
                    conn.execute(
                        select(VERSIONS.c.kind, VERSIONS.c.hash).where(
                            tuple_(VERSIONS.c.kind, VERSIONS.c.hash).in_(list(chunk))
                        )
                    ).all()
                )
            sims = sim_hashes or {}
            rows = [
                {
                    "kind": k,
                    "hash": h,
                    "calculation": c,
                    "parts": dict(p),
                    "sim_hash": sims.get(h) if k == "code" else None,
                    "created_at": now,
                }
                for (k, h), (c, p) in sorted(entries.items())
                if (k, h) not in known
            ]
            if rows:
                conn.execute(insert(VERSIONS), rows)

    def load_versions(
        self, keys: Iterable[tuple[str, str]]
    ) -> dict[tuple[str, str], dict[str, Any]]:
        """(kind, hash) -> parts, for those of ``keys`` that are registered."""
        keys = sorted(set(keys))
        out: dict[tuple[str, str], dict[str, Any]] = {}
        with self.engine.connect() as conn:
            for chunk in _chunks(keys, 500):
                query = select(
                    VERSIONS.c.kind, VERSIONS.c.hash, VERSIONS.c.parts, VERSIONS.c.sim_hash
                ).where(tuple_(VERSIONS.c.kind, VERSIONS.c.hash).in_(list(chunk)))
                for k, h, parts, sim in conn.execute(query):
                    out[(k, h)] = {**parts, "__sim__": sim} if k == "code" else parts
        return out

    def record_epoch_bump(
        self,
        calculation: str | None,
        epoch: int,
        reason: str,
        now: dt.datetime,
        before_commit: Callable[[], None] | None = None,
    ) -> None:
        """Record an epoch bump; ``before_commit`` (the epoch file's rewrite) runs inside the
        transaction, after the insert: if it raises, nothing is recorded."""
        with self.engine.begin() as conn:
            conn.execute(
                insert(BUMPS).values(
                    calculation=calculation, epoch=epoch, reason=reason, bumped_at=now
                )
            )
            if before_commit is not None:
                before_commit()

    def restamp_code(self, calculation: str, old: str, new: str) -> int:
        """Record a proven-cosmetic code change: cells built by ``old`` now carry ``new``."""
        where = and_(CELLS.c.calculation == calculation, CELLS.c.code_hash == old)
        with self.engine.begin() as conn:
            upkeep = _rebuilds(conn, where, lambda row: {"code_hash": new})
            count = conn.execute(update(CELLS).where(where).values(code_hash=new)).rowcount or 0
            upkeep.commit(conn)
            return count

    def epoch_bumps(self) -> list[Any]:
        """Every bump, oldest first."""
        with self.engine.connect() as conn:
            return list(conn.execute(select(BUMPS).order_by(BUMPS.c.id)).all())

    # --- root data index ------------------------------------------------------------------

    def load_root_schemas(self) -> dict[str, dict[str, str]]:
        """dataset -> column types recorded when it was last indexed."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(ROOT_SOURCES.c.dataset, ROOT_SOURCES.c.schema)).all()
        return {d: s for d, s in rows if s}

    def load_root_sources(self) -> dict[str, str]:
        """dataset -> digest of the raw files last indexed."""
        with self.engine.connect() as conn:
            return dict(
                conn.execute(select(ROOT_SOURCES.c.dataset, ROOT_SOURCES.c.source_digest)).all()
            )

    def load_root_index(self, dataset: str) -> dict[dt.date, tuple[int, str]]:
        """date -> (row count, content hash) of one dataset."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(ROOT_INDEX.c.date, ROOT_INDEX.c.row_count, ROOT_INDEX.c.content_hash).where(
                    ROOT_INDEX.c.dataset == dataset
                )
            ).all()
        return {r[0]: (r[1], r[2]) for r in rows}

    def replace_root_index(
        self,
        dataset: str,
        source_digest: str,
        entries: Mapping[dt.date, tuple[int, str]],
        malformed: int,
        now: dt.datetime,
        schema: Mapping[str, str] | None = None,
        skipped: int = 0,
        problems: Sequence[str] = (),
    ) -> None:
        """Replace a dataset's index (date -> (rows, hash)), its source digest and what it
        could not read, atomically.

        Args:
            dataset: the dataset's config name.
            source_digest: digest of its raw files and configuration.
            entries: date -> (row count, content hash).
            malformed: skipped rows plus rows whose values could not be parsed.
            now: when it was indexed (UTC).
            schema: column -> parsed type.
            skipped: rows given to no user (a bad date, an empty user, a row of the wrong
                width with no single reading); later runs that reuse the index report them.
            problems: the problems found, "file:line: what"; the first 20 are kept.
        """
        with self.engine.begin() as conn:
            conn.execute(delete(ROOT_INDEX).where(ROOT_INDEX.c.dataset == dataset))
            conn.execute(delete(ROOT_SOURCES).where(ROOT_SOURCES.c.dataset == dataset))
            if entries:
                conn.execute(
                    insert(ROOT_INDEX),
                    [
                        {"dataset": dataset, "date": d, "row_count": n, "content_hash": h}
                        for d, (n, h) in sorted(entries.items())
                    ],
                )
            conn.execute(
                insert(ROOT_SOURCES).values(
                    dataset=dataset,
                    source_digest=source_digest,
                    rows=sum(n for n, _ in entries.values()),
                    malformed=malformed,
                    indexed_at=now,
                    schema=dict(schema) if schema is not None else None,
                    problems={"skipped": skipped, "examples": list(problems[:20])},
                )
            )

    def load_root_problems(self) -> dict[str, tuple[int, list[str]]]:
        """What each indexed dataset could not read, in one query.

        Returns:
            dataset -> (rows skipped, the first 20 problems "file:line: what"), for every
            dataset indexed since migration 0005 (clean ones included, as ``(0, [])``); a
            dataset indexed before it is absent: its problems were never recorded.
        """
        with self.engine.connect() as conn:
            rows = conn.execute(select(ROOT_SOURCES.c.dataset, ROOT_SOURCES.c.problems)).all()
        return {
            name: (int(found["skipped"]), list(found["examples"]))
            for name, found in rows
            if found is not None
        }

    # --- runs and the run lock ------------------------------------------------------------

    def acquire_lock(self, holder: str, now: dt.datetime, ttl: dt.timedelta) -> None:
        """Take the run lock, or fail if a live holder has it. A lock expires after ``ttl``
        without a heartbeat, and at once when its holder (``lock_holder()``) was a process
        of this machine that no longer runs (a crash or kill -9: no need to wait).

        Raises:
            RunLockedError: another run holds the lock; the message names it and its expiry.
        """
        with self.engine.begin() as conn:
            row = conn.execute(select(LOCK).where(LOCK.c.name == "run")).first()
            if row is not None and row.expires_at > now and not holder_is_dead(row.holder):
                raise RunLockedError(
                    f"another run ({row.holder}) is in progress until "
                    f"{row.expires_at:%Y-%m-%d %H:%M:%S} UTC; wait for it to finish"
                )
            if row is not None:
                conn.execute(delete(LOCK).where(LOCK.c.name == "run", LOCK.c.holder == row.holder))
            try:
                conn.execute(insert(LOCK).values(name="run", holder=holder, expires_at=now + ttl))
            except IntegrityError as e:  # another process took it between our read and insert
                raise RunLockedError("another run took the run lock just now; try later") from e

    def live_runs(self, now: dt.datetime) -> frozenset[str]:
        """Ids of runs alive now: the run lock's holder, unless expired or dead."""
        with self.engine.connect() as conn:
            row = conn.execute(select(LOCK).where(LOCK.c.name == "run")).first()
        if row is None or row.expires_at <= now or holder_is_dead(row.holder):
            return frozenset()
        return frozenset({row.holder.rsplit(":", 1)[-1]})

    def refresh_lock(self, holder: str, now: dt.datetime, ttl: dt.timedelta) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                update(LOCK)
                .where(LOCK.c.name == "run", LOCK.c.holder == holder)
                .values(expires_at=now + ttl)
            )

    def release_lock(self, holder: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(delete(LOCK).where(LOCK.c.name == "run", LOCK.c.holder == holder))

    def start_run(
        self, run_id: str, trigger: str, target: dt.date | None, now: dt.datetime
    ) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                insert(RUNS).values(
                    run_id=run_id,
                    trigger=trigger,
                    target_date=target,
                    started_at=now,
                    status="RUNNING",
                    cells_completed=0,
                    cells_failed=0,
                    cells_skipped=0,
                )
            )

    def finish_run(
        self,
        run_id: str,
        status: str,
        completed: int,
        failed: int,
        skipped: int,
        now: dt.datetime,
        exit_code: int | None = None,
        summary: Sequence[str] = (),
    ) -> None:
        """Close a run's record: its status, counts, exit code and summary lines."""
        with self.engine.begin() as conn:
            conn.execute(
                update(RUNS)
                .where(RUNS.c.run_id == run_id)
                .values(
                    status=status,
                    finished_at=now,
                    cells_completed=completed,
                    cells_failed=failed,
                    cells_skipped=skipped,
                    exit_code=exit_code,
                    summary="\n".join(summary) if summary else None,
                )
            )

    def run(self, run_id: str) -> Any:
        """The run whose id starts with ``run_id`` (the newest of several), or None."""
        with self.engine.connect() as conn:
            return conn.execute(
                select(RUNS)
                .where(RUNS.c.run_id.startswith(run_id))
                .order_by(RUNS.c.started_at.desc())
                .limit(1)
            ).first()

    def unclean_cells(self, calculations: Iterable[str], low: dt.date, high: dt.date) -> list[Any]:
        """Cells of ``calculations`` dated ``low <= date <= high`` (inclusive) that are not
        complete and clean — status other than COMPLETED, or failed users — as rows
        (calculation, date, status, users_failed, error), in order. Reads the partial index
        ``ix_cells_unclean``: the cost is the number of unclean cells, not of cells."""
        wanted = set(calculations)
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(
                    CELLS.c.calculation,
                    CELLS.c.date,
                    CELLS.c.status,
                    CELLS.c.users_failed,
                    CELLS.c.error,
                )
                # (in parentheses: its OR must not take the date range's ANDs, and the
                # partial index is used only for the expression as a whole)
                .where(text(f"({UNCLEAN_EXPRESSION})"), CELLS.c.date >= low, CELLS.c.date <= high)
                .order_by(CELLS.c.date, CELLS.c.calculation)
            ).all()
        return [r for r in rows if r.calculation in wanted]

    def user_failures(
        self,
        calculation: str | None = None,
        date: dt.date | None = None,
        run_id: str | None = None,
    ) -> list[Any]:
        """Stored failed users (run_id, calculation, date, user, kind, error), in order.

        With ``run_id`` (an id prefix): those of that run's attempts. Without: the current
        ones — of each cell's last attempt, for cells whose last attempt had failed users —
        optionally of one calculation and/or date.
        """
        columns = (
            FAILURES.c.run_id,
            FAILURES.c.calculation,
            FAILURES.c.date,
            FAILURES.c.user,
            FAILURES.c.kind,
            FAILURES.c.error,
        )
        query = select(*columns)
        if run_id is not None:
            query = query.where(FAILURES.c.run_id.startswith(run_id))
        else:
            query = query.join(
                CELLS,
                and_(
                    CELLS.c.calculation == FAILURES.c.calculation,
                    CELLS.c.date == FAILURES.c.date,
                    CELLS.c.run_id == FAILURES.c.run_id,
                ),
            ).where(CELLS.c.users_failed > 0)
        if calculation is not None:
            query = query.where(FAILURES.c.calculation == calculation)
        if date is not None:
            query = query.where(FAILURES.c.date == date)
        query = query.order_by(FAILURES.c.date, FAILURES.c.calculation, FAILURES.c.id)
        with self.engine.connect() as conn:
            return list(conn.execute(query).all())

    def failure_counts(
        self, calculation: str | None = None, date: dt.date | None = None
    ) -> list[Any]:
        """Cells whose last attempt had failed users: (calculation, date, status,
        users_failed), in order; optionally of one calculation and/or date."""
        query = select(
            CELLS.c.calculation, CELLS.c.date, CELLS.c.status, CELLS.c.users_failed
        ).where(CELLS.c.users_failed > 0)
        if calculation is not None:
            query = query.where(CELLS.c.calculation == calculation)
        if date is not None:
            query = query.where(CELLS.c.date == date)
        with self.engine.connect() as conn:
            return list(conn.execute(query.order_by(CELLS.c.date, CELLS.c.calculation)).all())

    def cell_digests(self) -> dict[str, str]:
        """Per calculation, a digest of every stored cell's state (date, status and
        fingerprint parts as ``build_key``, inputs digest, result hash, generation, attempts,
        attempted digest, failed users), in date order: any write to a cell changes it; and,
        for a calculation with retained results (``retention``), of those too (which a plan
        may re-point cells to: ``gc`` changes it). Streamed queries (a saved plan's ledger
        check: ``saved_plan``)."""
        import xxhash

        from orchestrator.fingerprint import encode

        out: dict[str, str] = {}
        hasher = None
        current = None
        columns = (
            CELLS.c.calculation,
            CELLS.c.date,
            CELLS.c.build_key,
            CELLS.c.inputs_digest,
            CELLS.c.result_hash,
            CELLS.c.generation,
            CELLS.c.attempts,
            CELLS.c.attempted_digest,
            CELLS.c.users_failed,
        )
        with self.engine.connect() as conn:
            rows = conn.execution_options(stream_results=True).execute(
                select(*columns).order_by(CELLS.c.calculation, CELLS.c.date)
            )
            for calc, date, *parts in rows:
                if calc != current:
                    if hasher is not None:
                        out[current] = hasher.hexdigest()  # type: ignore[index]
                    current, hasher = calc, xxhash.xxh3_128(encode("cells"))
                assert hasher is not None
                hasher.update(encode([date.isoformat(), *parts]))
        if hasher is not None:
            out[current] = hasher.hexdigest()  # type: ignore[index]
        kept: dict[str, Any] = {}
        with self.engine.connect() as conn:
            rows = conn.execution_options(stream_results=True).execute(
                select(
                    RETAINED.c.calculation,
                    RETAINED.c.date,
                    RETAINED.c.generation,
                    RETAINED.c.result_hash,
                    RETAINED.c.inputs_digest,
                ).order_by(RETAINED.c.calculation, RETAINED.c.date, RETAINED.c.generation)
            )
            for calc, date, *parts in rows:
                if calc not in kept:
                    kept[calc] = xxhash.xxh3_128(encode(["retained", out.get(calc)]))
                kept[calc].update(encode([date.isoformat(), *parts]))
        # (a calculation without retained results keeps its digest of cells alone)
        out.update({calc: h.hexdigest() for calc, h in kept.items()})
        return out

    def recent_runs(self, limit: int = 20) -> list[Any]:
        with self.engine.connect() as conn:
            return list(
                conn.execute(select(RUNS).order_by(RUNS.c.started_at.desc()).limit(limit)).all()
            )

    def attempts_of_run(self, run_id: str) -> list[Any]:
        """Every attempt of the run whose id starts with ``run_id``, in order."""
        with self.engine.connect() as conn:
            return list(
                conn.execute(
                    select(ATTEMPTS)
                    .where(ATTEMPTS.c.run_id.startswith(run_id))
                    .order_by(ATTEMPTS.c.id)
                ).all()
            )

    def attempts(self, calculation: str, date: dt.date) -> list[Any]:
        with self.engine.connect() as conn:
            return list(
                conn.execute(
                    select(ATTEMPTS)
                    .where(ATTEMPTS.c.calculation == calculation, ATTEMPTS.c.date == date)
                    .order_by(ATTEMPTS.c.id)
                ).all()
            )

    def count(self, table: str) -> int:
        with self.engine.connect() as conn:
            return conn.execute(text(f"SELECT COUNT(*) FROM {table}")).scalar_one()
