"""The ledger's tables as SQLAlchemy 2.0 models.

The schema itself changes only through Alembic migrations (``migrations/versions``); these
models must match the migrations' head, which ``tests/test_migrations.py`` checks. Hash columns
are fixed-length hex strings; JSON is JSONB on PostgreSQL; datetimes are UTC.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Computed,
    Date,
    DateTime,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    TypeDecorator,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

HASH = String(32)
JSONType = JSON().with_variant(JSONB(), "postgresql")


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


class Base(DeclarativeBase):
    pass


# ``store.build_key`` of a cell's parts, as SQL (SQLite and PostgreSQL alike). The hashes
# have a fixed width, status and epochs hold no "|", and the category comes last, so two
# different part tuples never give the same key.
# A cell that is not complete and clean: failed, dead-lettered, running, or with failed users.
UNCLEAN_EXPRESSION = "status <> 'COMPLETED' OR users_failed > 0"

BUILD_KEY_EXPRESSION = (
    "status || '|' || code_hash || layer_hash || infra_hash || '|' || "
    "CAST(epoch AS VARCHAR) || '.' || CAST(scoped_epoch AS VARCHAR) || '|' || category"
)


class CellRow(Base):
    """One cell (calculation x date): its state and the fingerprint parts it was built from.

    ``generation`` names the shards of the published result; a new attempt writes shards under
    a fresh generation and switches this column in the publishing transaction (atomic publish).
    """

    __tablename__ = "cells"
    __table_args__ = (
        Index("ix_cells_calc_date", "calculation", "date", unique=True),
        # The cells that are not complete and clean (migration 0004): the run's verdict.
        Index(
            "ix_cells_unclean",
            "calculation",
            "date",
            sqlite_where=text(UNCLEAN_EXPRESSION),
            postgresql_where=text(UNCLEAN_EXPRESSION),
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    calculation: Mapped[str] = mapped_column(String(200))
    date: Mapped[dt.date] = mapped_column(Date)
    status: Mapped[str] = mapped_column(String(20))
    category: Mapped[str] = mapped_column(String(200))
    code_hash: Mapped[str] = mapped_column(HASH)
    layer_hash: Mapped[str] = mapped_column(HASH)
    infra_hash: Mapped[str] = mapped_column(HASH)
    epoch: Mapped[int] = mapped_column(Integer)
    scoped_epoch: Mapped[int] = mapped_column(Integer, server_default="0")
    inputs_digest: Mapped[str] = mapped_column(HASH)
    upstream_hashes: Mapped[dict[str, Any]] = mapped_column(JSONType)
    root_hashes: Mapped[dict[str, Any]] = mapped_column(JSONType)
    previous_hash: Mapped[str | None] = mapped_column(HASH, nullable=True)
    result_hash: Mapped[str | None] = mapped_column(HASH, nullable=True)
    generation: Mapped[str | None] = mapped_column(String(32), nullable=True)
    users: Mapped[int] = mapped_column(Integer, default=0)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    lease_expires_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)
    run_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    hash_format: Mapped[int] = mapped_column(Integer)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    # Computed and stored by the database on every write (migration 0003), so it is always
    # consistent with its parts: the planner reads it instead of concatenating 365,000 keys.
    build_key: Mapped[str | None] = mapped_column(
        String(400), Computed(BUILD_KEY_EXPRESSION, persisted=True), nullable=True
    )
    # Users of the last attempt that failed, their own error or one inherited from upstream.
    users_failed: Mapped[int] = mapped_column(Integer, server_default="0", default=0)
    # The inputs digest the last attempt saw (success or not): a dead letter whose inputs
    # changed since is planned again.
    attempted_digest: Mapped[str | None] = mapped_column(HASH, nullable=True)


class CalcDigestRow(Base):
    """The sums of one calculation's stored cells in one month (``ledger.digests``): kept by
    the ledger in the transaction of every write to ``cells`` (migration 0006), so the planner
    proves a month of unchanged cells without reading them.

    ``bucket`` is ``year * 12 + month - 1``; ``sums`` packs the three sums (inputs, results,
    chain), two unsigned 64-bit lanes each, as six little-endian 64-bit words (one column:
    half the cost of reading six). ``dirty`` is set by database triggers on any write to
    ``cells`` and cleared by the ledger's own upkeep: a write from elsewhere leaves its months
    dirty (with NULL ``sums`` when the trigger created the row), never trusted until
    ``Ledger.repair_digests``.
    """

    __tablename__ = "calc_digests"

    calculation: Mapped[str] = mapped_column(String(200), primary_key=True)
    bucket: Mapped[int] = mapped_column(Integer, primary_key=True)
    cells: Mapped[int] = mapped_column(Integer, default=0)
    sums: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    dirty: Mapped[int] = mapped_column(Integer, default=0)
    format: Mapped[int] = mapped_column(Integer, default=0)


class UserFailureRow(Base):
    """One failed user of one attempt: its error (the traceback for an error of its own).
    At most ``execution.STORED_FAILURES`` rows per attempt; ``cells.users_failed`` counts all.

    ``kind`` is ``own`` (the user's calculation raised, or its root rows were malformed) or
    ``upstream`` (an upstream or previous result of that user had failed)."""

    __tablename__ = "user_failures"
    __table_args__ = (
        Index("ix_user_failures_cell", "calculation", "date"),
        Index("ix_user_failures_run", "run_id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(String(32))
    calculation: Mapped[str] = mapped_column(String(200))
    date: Mapped[dt.date] = mapped_column(Date)
    user: Mapped[str] = mapped_column(String(200))
    kind: Mapped[str] = mapped_column(String(10))
    error: Mapped[str] = mapped_column(Text)


class ShardRow(Base):
    """A zstandard-compressed slice of a cell's result: canonical JSON lines, users in order."""

    __tablename__ = "result_shards"
    __table_args__ = (
        Index("ix_shards_cell", "calculation", "date", "generation", "seq", unique=True),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    calculation: Mapped[str] = mapped_column(String(200))
    date: Mapped[dt.date] = mapped_column(Date)
    generation: Mapped[str] = mapped_column(String(32))
    seq: Mapped[int] = mapped_column(Integer)
    first_user: Mapped[str | None] = mapped_column(String(200), nullable=True)
    last_user: Mapped[str | None] = mapped_column(String(200), nullable=True)
    users: Mapped[int] = mapped_column(Integer)
    raw_bytes: Mapped[int] = mapped_column(Integer)
    data: Mapped[bytes] = mapped_column(LargeBinary)


class RootSourceRow(Base):
    """What was indexed for a dataset: the digest of its raw files and of its configuration,
    and what it could not read (``problems``: ``{"skipped": rows given to no user,
    "examples": the first 20 "file:line: what"}``; NULL when indexed before migration 0005)."""

    __tablename__ = "root_sources"

    dataset: Mapped[str] = mapped_column(String(200), primary_key=True)
    source_digest: Mapped[str] = mapped_column(HASH)
    rows: Mapped[int] = mapped_column(Integer)
    malformed: Mapped[int] = mapped_column(Integer)
    indexed_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    schema: Mapped[dict[str, Any] | None] = mapped_column(JSONType, nullable=True)
    problems: Mapped[dict[str, Any] | None] = mapped_column(JSONType, nullable=True)


class RootIndexRow(Base):
    """Root data index: per dataset x date, its row count and content hash (available iff rows)."""

    __tablename__ = "root_index"

    dataset: Mapped[str] = mapped_column(String(200), primary_key=True)
    date: Mapped[dt.date] = mapped_column(Date, primary_key=True)
    row_count: Mapped[int] = mapped_column(Integer)
    content_hash: Mapped[str] = mapped_column(HASH)


class RunRow(Base):
    """One invocation of run / backfill."""

    __tablename__ = "runs"

    run_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    trigger: Mapped[str] = mapped_column(String(20))
    target_date: Mapped[dt.date | None] = mapped_column(Date, nullable=True)
    started_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    finished_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)
    status: Mapped[str] = mapped_column(String(20))
    cells_completed: Mapped[int] = mapped_column(Integer, default=0)
    cells_failed: Mapped[int] = mapped_column(Integer, default=0)
    cells_skipped: Mapped[int] = mapped_column(Integer, default=0)
    exit_code: Mapped[int | None] = mapped_column(Integer, nullable=True)  # what cron saw
    summary: Mapped[str | None] = mapped_column(Text, nullable=True)  # its summary lines


class AttemptRow(Base):
    """One attempt to compute one cell."""

    __tablename__ = "run_attempts"
    __table_args__ = (Index("ix_attempts_cell", "calculation", "date"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(String(32))
    calculation: Mapped[str] = mapped_column(String(200))
    date: Mapped[dt.date] = mapped_column(Date)
    reason: Mapped[str] = mapped_column(String(40))
    worker: Mapped[str] = mapped_column(String(200))
    started_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    finished_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    status: Mapped[str] = mapped_column(String(20))
    users: Mapped[int] = mapped_column(Integer)
    users_failed: Mapped[int] = mapped_column(Integer)
    flushes: Mapped[int] = mapped_column(Integer)
    flush_reasons: Mapped[dict[str, Any] | None] = mapped_column(JSONType, nullable=True)
    shards: Mapped[int] = mapped_column(Integer)
    bytes_raw: Mapped[int] = mapped_column(BigInteger)
    bytes_compressed: Mapped[int] = mapped_column(BigInteger)
    peak_memory: Mapped[int] = mapped_column(BigInteger)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)


class RunLockRow(Base):
    """The single run lock: present and unexpired means a run is in progress."""

    __tablename__ = "run_lock"

    name: Mapped[str] = mapped_column(String(40), primary_key=True)
    holder: Mapped[str] = mapped_column(String(200))
    expires_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)


class CodeVersionRow(Base):
    """The code-version registry: what a code, layer or infra hash was computed from."""

    __tablename__ = "code_versions"

    kind: Mapped[str] = mapped_column(String(10), primary_key=True)
    hash: Mapped[str] = mapped_column(HASH, primary_key=True)
    calculation: Mapped[str] = mapped_column(String(200))
    parts: Mapped[dict[str, Any]] = mapped_column(JSONType)
    sim_hash: Mapped[str | None] = mapped_column(HASH, nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)


class EpochBumpRow(Base):
    """One ``epoch bump``: global (calculation NULL) or scoped to one calculation."""

    __tablename__ = "epoch_bumps"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    calculation: Mapped[str | None] = mapped_column(String(200), nullable=True)
    epoch: Mapped[int] = mapped_column(Integer)
    reason: Mapped[str] = mapped_column(Text)
    bumped_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
