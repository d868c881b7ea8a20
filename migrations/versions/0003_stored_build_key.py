"""``cells.build_key``: the cell's build key, computed and stored by the database.

The planner compares every stored cell's build key (status, code, layer and infrastructure
hashes, epochs, category) with the current one. Concatenating it in the query for 365,000
cells cost about 0.45 s of a 2 s plan; a stored generated column is written once per cell
write and read as a plain column. The database computes it, so no write path can forget it.

SQLite cannot add a stored generated column in place: the table is recreated (batch mode).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

BUILD_KEY_EXPRESSION = (  # as orchestrator.ledger.models.BUILD_KEY_EXPRESSION at this revision
    "status || '|' || code_hash || layer_hash || infra_hash || '|' || "
    "CAST(epoch AS VARCHAR) || '.' || CAST(scoped_epoch AS VARCHAR) || '|' || category"
)


def upgrade() -> None:
    with op.batch_alter_table("cells", recreate="auto") as batch:
        batch.add_column(
            sa.Column(
                "build_key",
                sa.String(400),
                sa.Computed(BUILD_KEY_EXPRESSION, persisted=True),
                nullable=True,
            )
        )


def downgrade() -> None:
    with op.batch_alter_table("cells") as batch:
        batch.drop_column("build_key")
