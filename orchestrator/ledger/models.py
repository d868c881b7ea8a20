"""The ledger's tables as SQLAlchemy Core tables (``METADATA``).

The schema itself changes only through Alembic migrations (``migrations/versions``); these
tables must match the migrations' head, which ``tests/test_migrations.py`` checks. Hash columns
are fixed-length hex strings; JSON is JSONB on PostgreSQL; datetimes are UTC.

Core rather than ORM models: nothing maps rows to objects, and ``sqlalchemy.orm`` with the
declarative classes cost every command ~0.1 s of start-up. ``req`` columns are NOT NULL (what
a non-optional ``Mapped[...]`` annotation gave), ``opt`` columns nullable.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    Computed,
    Date,
    DateTime,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    TypeDecorator,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeEngine

HASH = String(32)


class JSONType(TypeDecorator[Any]):
    """JSON, as JSONB on PostgreSQL (``JSON().with_variant(JSONB(), "postgresql")``, with the
    PostgreSQL dialect imported only when a PostgreSQL ledger is used)."""

    impl = JSON
    cache_ok = True
    # As JSON's own: a Python None is stored as JSON ``null``, not as SQL NULL.
    should_evaluate_none = True
    hashable = False

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "postgresql":
            # (the dialect package costs ~30 ms to import; an SQLite ledger never needs it)
            from sqlalchemy.dialects.postgresql import JSONB

            return dialect.type_descriptor(JSONB())
        return dialect.type_descriptor(JSON())


class UTCDateTime(TypeDecorator[dt.datetime]):
    """Stores naive UTC, returns aware UTC; refuses naive input (time is an explicit input)."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the ledger; pass an aware UTC datetime")
        return value.astimezone(dt.UTC).replace(tzinfo=None)

    def process_result_value(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        return None if value is None else value.replace(tzinfo=dt.UTC)


def req(name: str, type_: Any, *args: Any, **kwargs: Any) -> Column[Any]:
    """A NOT NULL column."""
    return Column(name, type_, *args, nullable=False, **kwargs)


def opt(name: str, type_: Any, *args: Any, **kwargs: Any) -> Column[Any]:
    """A nullable column."""
    return Column(name, type_, *args, nullable=True, **kwargs)


def serial_id() -> Column[Any]:
    return Column("id", Integer, primary_key=True, autoincrement=True)


METADATA = MetaData()
# Indexes of the migrations' head that the tables below do not declare (see ``CELLS``).
UNMODELLED_INDEXES = {"cells": {"ix_cells_unclean"}}

# ``store.build_key`` of a cell's parts, as SQL (SQLite and PostgreSQL alike). The hashes
# have a fixed width, status and epochs hold no "|", and the category comes last, so two
# different part tuples never give the same key.
# A cell that is not complete and clean: failed, dead-lettered, running, or with failed users.
UNCLEAN_EXPRESSION = "status <> 'COMPLETED' OR users_failed > 0"

BUILD_KEY_EXPRESSION = (
    "status || '|' || code_hash || layer_hash || infra_hash || '|' || "
    "CAST(epoch AS VARCHAR) || '.' || CAST(scoped_epoch AS VARCHAR) || '|' || category"
)

# One cell (calculation x date): its state and the fingerprint parts it was built from.
# ``generation`` names the shards of the published result; a new attempt writes shards under
# a fresh generation and switches this column in the publishing transaction (atomic publish).
CELLS = Table(
    "cells",
    METADATA,
    serial_id(),
    req("calculation", String(200)),
    req("date", Date),
    req("status", String(20)),
    req("category", String(200)),
    req("code_hash", HASH),
    req("layer_hash", HASH),
    req("infra_hash", HASH),
    req("epoch", Integer),
    req("scoped_epoch", Integer, server_default="0"),
    req("inputs_digest", HASH),
    req("upstream_hashes", JSONType),
    req("root_hashes", JSONType),
    opt("previous_hash", HASH),
    opt("result_hash", HASH),
    opt("generation", String(32)),
    req("users", Integer, default=0),
    req("attempts", Integer, default=0),
    opt("lease_expires_at", UTCDateTime),
    opt("run_id", String(32)),
    opt("error", Text),
    req("hash_format", Integer),
    req("updated_at", UTCDateTime),
    # Computed and stored by the database on every write (migration 0003), so it is always
    # consistent with its parts: the planner reads it instead of concatenating 365,000 keys.
    opt("build_key", String(400), Computed(BUILD_KEY_EXPRESSION, persisted=True)),
    # Users of the last attempt that failed, their own error or one inherited from upstream.
    req("users_failed", Integer, server_default="0", default=0),
    # The inputs digest the last attempt saw (success or not): a dead letter whose inputs
    # changed since is planned again.
    opt("attempted_digest", HASH),
    Index("ix_cells_calc_date", "calculation", "date", unique=True),
    # Also ``ix_cells_unclean`` (migration 0004): (calculation, date) of the cells that are not
    # complete and clean (WHERE ``UNCLEAN_EXPRESSION``), the run's verdict. Not declared here:
    # its ``postgresql_where`` would import the PostgreSQL dialect into every SQLite command,
    # and no table is ever created from these definitions (``UNMODELLED_INDEXES``).
)

# The sums of one calculation's stored cells in one month (``ledger.digests``): kept by the
# ledger in the transaction of every write to ``cells`` (migration 0006), so the planner
# proves a month of unchanged cells without reading them.
#
# ``bucket`` is ``year * 12 + month - 1``; ``sums`` packs the three sums (inputs, results,
# chain), two unsigned 64-bit lanes each, as six little-endian 64-bit words (one column: half
# the cost of reading six). ``dirty`` is set by database triggers on any write to ``cells``
# and cleared by the ledger's own upkeep: a write from elsewhere leaves its months dirty (with
# NULL ``sums`` when the trigger created the row), never trusted until
# ``Ledger.repair_digests``.
DIGESTS = Table(
    "calc_digests",
    METADATA,
    req("calculation", String(200), primary_key=True),
    req("bucket", Integer, primary_key=True),
    req("cells", Integer, default=0),
    opt("sums", LargeBinary),
    req("dirty", Integer, default=0),
    req("format", Integer, default=0),
)

# One failed user of one attempt: its error (the traceback for an error of its own). At most
# ``execution.STORED_FAILURES`` rows per attempt; ``cells.users_failed`` counts all.
# ``kind`` is ``own`` (the user's calculation raised, or its root rows were malformed) or
# ``upstream`` (an upstream or previous result of that user had failed).
FAILURES = Table(
    "user_failures",
    METADATA,
    serial_id(),
    req("run_id", String(32)),
    req("calculation", String(200)),
    req("date", Date),
    req("user", String(200)),
    req("kind", String(10)),
    req("error", Text),
    Index("ix_user_failures_cell", "calculation", "date"),
    Index("ix_user_failures_run", "run_id"),
)

# A zstandard-compressed slice of a cell's result: canonical JSON lines, users in order.
SHARDS = Table(
    "result_shards",
    METADATA,
    serial_id(),
    req("calculation", String(200)),
    req("date", Date),
    req("generation", String(32)),
    req("seq", Integer),
    opt("first_user", String(200)),
    opt("last_user", String(200)),
    req("users", Integer),
    req("raw_bytes", Integer),
    req("data", LargeBinary),
    Index("ix_shards_cell", "calculation", "date", "generation", "seq", unique=True),
)

# A published result superseded by a later one, kept under its generation (its shards stay)
# with the fingerprint it was computed from (migration 0007): a cell whose current
# fingerprint equals it is re-pointed to it without computing (REUSED). ``computed_at`` is
# when the cell was last written with it, ``retained_at`` when it was superseded; the run that
# computed it is the COMPLETED attempt of its generation (``run_attempts.generation``).
RETAINED = Table(
    "retained_results",
    METADATA,
    serial_id(),
    req("calculation", String(200)),
    req("date", Date),
    req("generation", String(32)),
    req("result_hash", HASH),
    req("inputs_digest", HASH),
    req("code_hash", HASH),
    req("layer_hash", HASH),
    req("infra_hash", HASH),
    req("epoch", Integer),
    req("scoped_epoch", Integer),
    req("users", Integer),
    req("computed_at", UTCDateTime),
    req("retained_at", UTCDateTime),
    Index("ix_retained_cell", "calculation", "date", "generation", unique=True),
)

# What was indexed for a dataset: the digest of its raw files and of its configuration, and
# what it could not read (``problems``: ``{"skipped": rows given to no user, "examples": the
# first 20 "file:line: what"}``; NULL when indexed before migration 0005).
ROOT_SOURCES = Table(
    "root_sources",
    METADATA,
    req("dataset", String(200), primary_key=True),
    req("source_digest", HASH),
    req("rows", Integer),
    req("malformed", Integer),
    req("indexed_at", UTCDateTime),
    opt("schema", JSONType),
    opt("problems", JSONType),
)

# Root data index: per dataset x date, its row count and content hash (available iff rows).
ROOT_INDEX = Table(
    "root_index",
    METADATA,
    req("dataset", String(200), primary_key=True),
    req("date", Date, primary_key=True),
    req("row_count", Integer),
    req("content_hash", HASH),
)

# One invocation of run / backfill.
RUNS = Table(
    "runs",
    METADATA,
    req("run_id", String(32), primary_key=True),
    req("trigger", String(20)),
    opt("target_date", Date),
    req("started_at", UTCDateTime),
    opt("finished_at", UTCDateTime),
    req("status", String(20)),
    req("cells_completed", Integer, default=0),
    req("cells_failed", Integer, default=0),
    req("cells_skipped", Integer, default=0),
    opt("exit_code", Integer),  # what cron saw
    opt("summary", Text),  # its summary lines
)

# One attempt to compute one cell.
ATTEMPTS = Table(
    "run_attempts",
    METADATA,
    serial_id(),
    req("run_id", String(32)),
    req("calculation", String(200)),
    req("date", Date),
    req("reason", String(40)),
    req("worker", String(200)),
    req("started_at", UTCDateTime),
    req("finished_at", UTCDateTime),
    req("status", String(20)),
    req("users", Integer),
    req("users_failed", Integer),
    req("flushes", Integer),
    opt("flush_reasons", JSONType),
    req("shards", Integer),
    req("bytes_raw", BigInteger),
    req("bytes_compressed", BigInteger),
    req("peak_memory", BigInteger),
    opt("error", Text),
    opt("detail", Text),  # the decision's detail (migration 0007)
    opt("generation", String(32)),  # what it published or re-pointed to (migration 0007)
    Index("ix_attempts_cell", "calculation", "date"),
)

# The single run lock: present and unexpired means a run is in progress.
LOCK = Table(
    "run_lock",
    METADATA,
    req("name", String(40), primary_key=True),
    req("holder", String(200)),
    req("expires_at", UTCDateTime),
)

# The code-version registry: what a code, layer or infra hash was computed from.
VERSIONS = Table(
    "code_versions",
    METADATA,
    req("kind", String(10), primary_key=True),
    req("hash", HASH, primary_key=True),
    req("calculation", String(200)),
    req("parts", JSONType),
    opt("sim_hash", HASH),
    req("created_at", UTCDateTime),
)

# One ``epoch bump``: global (calculation NULL) or scoped to one calculation.
BUMPS = Table(
    "epoch_bumps",
    METADATA,
    serial_id(),
    opt("calculation", String(200)),
    req("epoch", Integer),
    req("reason", Text),
    req("bumped_at", UTCDateTime),
)
