"""Planning in proportion to change: per-calculation, per-month digests of the stored cells.

* ``calc_digests`` — per calculation and month (``bucket = year * 12 + month - 1``): the
  number of stored cells and three order-independent sums over them (``ledger.digests``:
  what the cells were built from, their result hashes, the links between consecutive cells),
  two 64-bit lanes each, packed in ``sums`` (48 bytes). The ledger updates them in the transaction of every write
  to ``cells``; the planner compares them with the sums it expects, and reads the cells of a
  month only when they differ.
* Triggers on ``cells`` (insert, delete, and update of any column the digests or the
  decision read) set ``calc_digests.dirty`` for the months they touch; the ledger's own
  upkeep clears it in the same transaction. A write from anywhere else (SQL by hand, a tool)
  therefore leaves its months dirty: the planner reads their cells, and
  ``Ledger.repair_digests`` recomputes them.
* The months already holding cells are recorded unverified (dirty): the first run after
  the upgrade checks each of their rows against the current rule and digests them.

On SQLite the triggers live on ``cells``: a later batch migration of ``cells`` (which
recreates the table) must create them again; ``tests/test_plan_digest.py`` checks that head
has them.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-08
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

# What the digests and the decision read of a cell (``build_key`` is generated from the
# first seven and cannot be listed). ``lease_expires_at``, ``attempts``, ``error`` and the
# other bookkeeping columns are not among them: renewing a lease dirties nothing.
WATCHED = (
    "calculation, date, status, category, code_hash, layer_hash, infra_hash, epoch, "
    "scoped_epoch, inputs_digest, upstream_hashes, root_hashes, previous_hash, result_hash"
)
COLUMNS = "calculation, bucket, cells, sums, dirty, format"


def _sqlite_bucket(row: str) -> str:
    return (
        f"(CAST(substr({row}.date, 1, 4) AS INTEGER) * 12 "
        f"+ CAST(substr({row}.date, 6, 2) AS INTEGER) - 1)"
    )


def _sqlite_mark(row: str) -> str:
    return (
        f"INSERT INTO calc_digests ({COLUMNS}) VALUES ({row}.calculation, "
        f"{_sqlite_bucket(row)}, 0, NULL, 1, 0) "
        "ON CONFLICT (calculation, bucket) DO UPDATE SET dirty = 1;"
    )


PG_BUCKET = (
    "(EXTRACT(YEAR FROM {row}.date)::integer * 12 + EXTRACT(MONTH FROM {row}.date)::integer - 1)"
)


def _pg_mark(row: str) -> str:
    return (
        f"INSERT INTO calc_digests ({COLUMNS}) VALUES ({row}.calculation, "
        f"{PG_BUCKET.format(row=row)}, 0, NULL, 1, 0) "
        "ON CONFLICT (calculation, bucket) DO UPDATE SET dirty = 1;"
    )


def create_triggers(dialect: str) -> list[str]:
    """The DDL of the dirty-marking triggers for ``dialect`` ("sqlite" or "postgresql")."""
    if dialect == "sqlite":
        insert = f"CREATE TRIGGER calc_digests_insert AFTER INSERT ON cells BEGIN {_sqlite_mark('NEW')} END"
        update = (
            f"CREATE TRIGGER calc_digests_update AFTER UPDATE OF {WATCHED} ON cells BEGIN "
            f"{_sqlite_mark('NEW')} {_sqlite_mark('OLD')} END"
        )
        delete = f"CREATE TRIGGER calc_digests_delete AFTER DELETE ON cells BEGIN {_sqlite_mark('OLD')} END"
        return [insert, update, delete]
    function = (
        "CREATE FUNCTION calc_digests_mark() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        f"IF TG_OP <> 'DELETE' THEN {_pg_mark('NEW')} END IF; "
        f"IF TG_OP <> 'INSERT' THEN {_pg_mark('OLD')} END IF; "
        "RETURN NULL; END $$"
    )
    trigger = (
        f"CREATE TRIGGER calc_digests_mark AFTER INSERT OR DELETE OR UPDATE OF {WATCHED} "
        "ON cells FOR EACH ROW EXECUTE FUNCTION calc_digests_mark()"
    )
    return [function, trigger]


def drop_triggers(dialect: str) -> list[str]:
    if dialect == "sqlite":
        return [
            "DROP TRIGGER IF EXISTS calc_digests_insert",
            "DROP TRIGGER IF EXISTS calc_digests_update",
            "DROP TRIGGER IF EXISTS calc_digests_delete",
        ]
    return [
        "DROP TRIGGER IF EXISTS calc_digests_mark ON cells",
        "DROP FUNCTION IF EXISTS calc_digests_mark()",
    ]


def upgrade() -> None:
    op.create_table(
        "calc_digests",
        sa.Column("calculation", sa.String(200), primary_key=True),
        sa.Column("bucket", sa.Integer(), primary_key=True),
        sa.Column("cells", sa.Integer(), nullable=False),
        sa.Column("sums", sa.LargeBinary(), nullable=True),
        sa.Column("dirty", sa.Integer(), nullable=False),
        sa.Column("format", sa.Integer(), nullable=False),
    )
    dialect = op.get_bind().dialect.name
    # The months that already hold cells, unverified: the first ``orchestrator run`` checks
    # each row against the current rule and digests them (``Ledger.repair_digests``); until
    # then their cells are planned one by one, as before this revision.
    bucket = (
        "(CAST(substr(date, 1, 4) AS INTEGER) * 12 + CAST(substr(date, 6, 2) AS INTEGER) - 1)"
        if dialect == "sqlite"
        else "(EXTRACT(YEAR FROM date)::integer * 12 + EXTRACT(MONTH FROM date)::integer - 1)"
    )
    op.execute(
        f"INSERT INTO calc_digests ({COLUMNS}) SELECT calculation, {bucket}, COUNT(*), NULL, 1, 0 "
        f"FROM cells GROUP BY calculation, {bucket}"
    )
    for statement in create_triggers(dialect):
        op.execute(statement)


def downgrade() -> None:
    for statement in drop_triggers(op.get_bind().dialect.name):
        op.execute(statement)
    op.drop_table("calc_digests")
