"""Alembic environment of the ledger.

Run through ``orchestrator db upgrade`` (or automatically on first use), which passes an open
connection in ``config.attributes["connection"]``. ``render_as_batch`` lets SQLite alter tables.
Migrations are self-contained: they never import the live models.
"""

from alembic import context
from sqlalchemy import create_engine

config = context.config


def run_migrations() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        context.configure(connection=connection, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = create_engine(config.get_main_option("sqlalchemy.url"))
    with engine.connect() as conn:
        context.configure(connection=conn, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()


if context.is_offline_mode():
    context.configure(url=config.get_main_option("sqlalchemy.url"), render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    run_migrations()
