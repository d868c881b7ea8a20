"""Failed users are seen: per-cell failure counts, stored tracebacks, run verdicts.

* ``cells.users_failed`` — users of the cell's last attempt that failed (their own error, or
  a failure inherited from an upstream / previous result); 0 for a clean cell.
* ``cells.attempted_digest`` — the inputs digest the last attempt saw, success or not. A
  dead letter whose current inputs differ from it (root data fixed, upstream changed) is
  planned again instead of staying dead.
* ``user_failures`` — the first tracebacks of each attempt's failed users (bounded per cell).
* ``runs.exit_code`` and ``runs.summary`` — what the run told cron, kept for ``runs --run``.
* ``ix_cells_unclean`` — a partial index over the cells that are not complete and clean, so
  the end-of-run verdict reads only those.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-27
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

UNCLEAN = "status <> 'COMPLETED' OR users_failed > 0"


def upgrade() -> None:
    # SQLite appends added columns to the CREATE statement on the line of the generated
    # build_key, and SQLAlchemy's reflection reads that column's expression up to the last
    # ")" of the line: a parenthesis in an added column's type (VARCHAR(32)) would corrupt it
    # for every later batch migration. SQLite ignores lengths anyway.
    digest = sa.String(32).with_variant(sa.String(), "sqlite")
    with op.batch_alter_table("cells") as batch:
        batch.add_column(
            sa.Column("users_failed", sa.Integer(), nullable=False, server_default="0")
        )
        batch.add_column(sa.Column("attempted_digest", digest, nullable=True))
    op.create_index(
        "ix_cells_unclean",
        "cells",
        ["calculation", "date"],
        sqlite_where=sa.text(UNCLEAN),
        postgresql_where=sa.text(UNCLEAN),
    )
    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column("exit_code", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("summary", sa.Text(), nullable=True))
    op.create_table(
        "user_failures",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("run_id", sa.String(32), nullable=False),
        sa.Column("calculation", sa.String(200), nullable=False),
        sa.Column("date", sa.Date(), nullable=False),
        sa.Column("user", sa.String(200), nullable=False),
        sa.Column("kind", sa.String(10), nullable=False),
        sa.Column("error", sa.Text(), nullable=False),
    )
    op.create_index("ix_user_failures_cell", "user_failures", ["calculation", "date"])
    op.create_index("ix_user_failures_run", "user_failures", ["run_id"])


def downgrade() -> None:
    op.drop_index("ix_user_failures_run", table_name="user_failures")
    op.drop_index("ix_user_failures_cell", table_name="user_failures")
    op.drop_table("user_failures")
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("summary")
        batch.drop_column("exit_code")
    op.drop_index("ix_cells_unclean", table_name="cells")
    # Plain ALTER TABLE DROP COLUMN (SQLite 3.35+) on both: a batch copy of the table would
    # try to copy the generated build_key, which SQLite refuses.
    op.drop_column("cells", "attempted_digest")
    op.drop_column("cells", "users_failed")
