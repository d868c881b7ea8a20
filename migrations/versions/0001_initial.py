"""The initial ledger: cells, result shards, root data index, runs, attempts, run lock.

Revision ID: 0001
Revises:
Create Date: 2026-11-25
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

HASH = sa.String(32)
JSON = sa.JSON().with_variant(JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "cells",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("calculation", sa.String(200), nullable=False),
        sa.Column("date", sa.Date, nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("category", sa.String(200), nullable=False),
        sa.Column("code_hash", HASH, nullable=False),
        sa.Column("layer_hash", HASH, nullable=False),
        sa.Column("infra_hash", HASH, nullable=False),
        sa.Column("epoch", sa.Integer, nullable=False),
        sa.Column("inputs_digest", HASH, nullable=False),
        sa.Column("upstream_hashes", JSON, nullable=False),
        sa.Column("root_hashes", JSON, nullable=False),
        sa.Column("previous_hash", HASH, nullable=True),
        sa.Column("result_hash", HASH, nullable=True),
        sa.Column("generation", sa.String(32), nullable=True),
        sa.Column("users", sa.Integer, nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("lease_expires_at", sa.DateTime, nullable=True),
        sa.Column("run_id", sa.String(32), nullable=True),
        sa.Column("error", sa.Text, nullable=True),
        sa.Column("hash_format", sa.Integer, nullable=False),
        sa.Column("updated_at", sa.DateTime, nullable=False),
    )
    op.create_index("ix_cells_calc_date", "cells", ["calculation", "date"], unique=True)
    op.create_table(
        "result_shards",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("calculation", sa.String(200), nullable=False),
        sa.Column("date", sa.Date, nullable=False),
        sa.Column("generation", sa.String(32), nullable=False),
        sa.Column("seq", sa.Integer, nullable=False),
        sa.Column("first_user", sa.String(200), nullable=True),
        sa.Column("last_user", sa.String(200), nullable=True),
        sa.Column("users", sa.Integer, nullable=False),
        sa.Column("raw_bytes", sa.Integer, nullable=False),
        sa.Column("data", sa.LargeBinary, nullable=False),
    )
    op.create_index(
        "ix_shards_cell", "result_shards", ["calculation", "date", "generation", "seq"], unique=True
    )
    op.create_table(
        "root_sources",
        sa.Column("dataset", sa.String(200), primary_key=True),
        sa.Column("source_digest", HASH, nullable=False),
        sa.Column("rows", sa.Integer, nullable=False),
        sa.Column("malformed", sa.Integer, nullable=False),
        sa.Column("indexed_at", sa.DateTime, nullable=False),
    )
    op.create_table(
        "root_index",
        sa.Column("dataset", sa.String(200), primary_key=True),
        sa.Column("date", sa.Date, primary_key=True),
        sa.Column("row_count", sa.Integer, nullable=False),
        sa.Column("content_hash", HASH, nullable=False),
    )
    op.create_table(
        "runs",
        sa.Column("run_id", sa.String(32), primary_key=True),
        sa.Column("trigger", sa.String(20), nullable=False),
        sa.Column("target_date", sa.Date, nullable=True),
        sa.Column("started_at", sa.DateTime, nullable=False),
        sa.Column("finished_at", sa.DateTime, nullable=True),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("cells_completed", sa.Integer, nullable=False),
        sa.Column("cells_failed", sa.Integer, nullable=False),
        sa.Column("cells_skipped", sa.Integer, nullable=False),
    )
    op.create_table(
        "run_attempts",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("run_id", sa.String(32), nullable=False),
        sa.Column("calculation", sa.String(200), nullable=False),
        sa.Column("date", sa.Date, nullable=False),
        sa.Column("reason", sa.String(40), nullable=False),
        sa.Column("worker", sa.String(200), nullable=False),
        sa.Column("started_at", sa.DateTime, nullable=False),
        sa.Column("finished_at", sa.DateTime, nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("users", sa.Integer, nullable=False),
        sa.Column("users_failed", sa.Integer, nullable=False),
        sa.Column("flushes", sa.Integer, nullable=False),
        sa.Column("shards", sa.Integer, nullable=False),
        sa.Column("bytes_raw", sa.BigInteger, nullable=False),
        sa.Column("bytes_compressed", sa.BigInteger, nullable=False),
        sa.Column("peak_memory", sa.BigInteger, nullable=False),
        sa.Column("error", sa.Text, nullable=True),
    )
    op.create_index("ix_attempts_cell", "run_attempts", ["calculation", "date"])
    op.create_table(
        "run_lock",
        sa.Column("name", sa.String(40), primary_key=True),
        sa.Column("holder", sa.String(200), nullable=False),
        sa.Column("expires_at", sa.DateTime, nullable=False),
    )


def downgrade() -> None:
    for table in ("run_lock", "run_attempts", "runs", "root_index", "root_sources"):
        op.drop_table(table)
    op.drop_index("ix_shards_cell", table_name="result_shards")
    op.drop_table("result_shards")
    op.drop_index("ix_cells_calc_date", table_name="cells")
    op.drop_table("cells")
