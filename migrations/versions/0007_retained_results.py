"""Reverts are free: superseded results are retained by fingerprint.

* ``retained_results`` — a published result superseded by a later one, kept (its shards
  stay, under their generation) with the fingerprint it was computed from: the cell's own
  parts (code, layer and infra hashes, system and scoped epoch) and its inputs digest. When
  a cell's current fingerprint equals a retained one (a reverted code change, data
  correction or epoch), the planner re-points the cell to that result without computing
  (``REUSED``). Only clean results are retained (no failed users, last attempt clean);
  ``orchestrator gc`` prunes them, and each cell keeps at most ``retain_results``.
* ``run_attempts.detail`` — the decision's detail for the attempt (what changed, or which
  retained result a REUSED attempt re-pointed to), for ``why`` and the logs.
* ``run_attempts.generation`` — the generation the attempt published (or re-pointed to):
  which run computed a retained result, and when.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "retained_results",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("calculation", sa.String(200), nullable=False),
        sa.Column("date", sa.Date(), nullable=False),
        sa.Column("generation", sa.String(32), nullable=False),
        sa.Column("result_hash", sa.String(32), nullable=False),
        sa.Column("inputs_digest", sa.String(32), nullable=False),
        sa.Column("code_hash", sa.String(32), nullable=False),
        sa.Column("layer_hash", sa.String(32), nullable=False),
        sa.Column("infra_hash", sa.String(32), nullable=False),
        sa.Column("epoch", sa.Integer(), nullable=False),
        sa.Column("scoped_epoch", sa.Integer(), nullable=False),
        sa.Column("users", sa.Integer(), nullable=False),
        sa.Column("computed_at", sa.DateTime(), nullable=False),
        sa.Column("retained_at", sa.DateTime(), nullable=False),
    )
    op.create_index(
        "ix_retained_cell",
        "retained_results",
        ["calculation", "date", "generation"],
        unique=True,
    )
    op.add_column("run_attempts", sa.Column("detail", sa.Text(), nullable=True))
    op.add_column("run_attempts", sa.Column("generation", sa.String(32), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("run_attempts") as batch:
        batch.drop_column("generation")
        batch.drop_column("detail")
    op.drop_index("ix_retained_cell", table_name="retained_results")
    op.drop_table("retained_results")
