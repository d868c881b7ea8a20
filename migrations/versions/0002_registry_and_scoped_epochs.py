"""Code-version registry, scoped epoch bumps, and the scoped epoch of each cell.

* ``code_versions``: per (kind, hash) — kind "code", "layer" or "infra" — the digests of the
  definitions (or the infrastructure parts) that hash was computed from, so a plan can name
  what changed between the version that built a cell and the current one.
* ``epoch_bumps``: every ``epoch bump`` with its reason; ``calculation`` is NULL for the
  global epoch (whose value lives in system_epoch.py), else the bump is scoped to it.
* ``cells.scoped_epoch``: the calculation's scoped epoch the cell was built under.
* ``code_versions.sim_hash``: the simulation hash of a code version (COSMETIC_CHANGE).
* ``run_attempts.flush_reasons``: how many flushes of an attempt had which reason
  (BATCH_LIMIT, MEMORY_PRESSURE, FINAL).
* ``root_sources.schema``: column types of a dataset, inferred when indexed (the
  simulation fabricates rows from them).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

JSON = sa.JSON().with_variant(JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "code_versions",
        sa.Column("kind", sa.String(10), primary_key=True),
        sa.Column("hash", sa.String(32), primary_key=True),
        sa.Column("calculation", sa.String(200), nullable=False),
        sa.Column("parts", JSON, nullable=False),
        sa.Column("sim_hash", sa.String(32), nullable=True),
        sa.Column("created_at", sa.DateTime, nullable=False),
    )
    op.create_table(
        "epoch_bumps",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("calculation", sa.String(200), nullable=True),
        sa.Column("epoch", sa.Integer, nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("bumped_at", sa.DateTime, nullable=False),
    )
    with op.batch_alter_table("cells") as batch:
        batch.add_column(sa.Column("scoped_epoch", sa.Integer, nullable=False, server_default="0"))
    with op.batch_alter_table("root_sources") as batch:
        batch.add_column(sa.Column("schema", JSON, nullable=True))
    with op.batch_alter_table("run_attempts") as batch:
        batch.add_column(sa.Column("flush_reasons", JSON, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("run_attempts") as batch:
        batch.drop_column("flush_reasons")
    with op.batch_alter_table("root_sources") as batch:
        batch.drop_column("schema")
    with op.batch_alter_table("cells") as batch:
        batch.drop_column("scoped_epoch")
    op.drop_table("epoch_bumps")
    op.drop_table("code_versions")
