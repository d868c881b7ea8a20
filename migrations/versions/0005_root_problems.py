"""Skipped root rows stay visible: the problems found when a dataset was last indexed.

* ``root_sources.problems`` — ``{"skipped": n, "examples": ["file:line: what", ...]}``: the
  rows of the dataset that could be given to no user (a bad date, an empty user, a row of
  the wrong width with no single reading), counted, and the first 20 problems found (those
  rows, and files of a folder that could not be read). Stored with the index because a later
  run whose source digest is unchanged reuses the index without reading the files: without
  it, such a run would say nothing about rows it silently leaves out. NULL on rows indexed
  before this revision: the app then re-indexes that dataset once to fill it in.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

# JSONB on PostgreSQL (as the other JSON columns); plain JSON, without parentheses, on
# SQLite (see 0004 on types with parentheses and generated columns).
JSON = sa.JSON().with_variant(JSONB(), "postgresql")


def upgrade() -> None:
    with op.batch_alter_table("root_sources") as batch:
        batch.add_column(sa.Column("problems", JSON, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("root_sources") as batch:
        batch.drop_column("problems")
