"""Alembic's entry point: runs the migrations on the connection `Database.upgrade` passes in
(`config.attributes["connection"]`); there is no alembic.ini, the database URL is never read
from a file here."""

from alembic import context

from controlplane.models import Base

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=connection.dialect.name == "sqlite",  # SQLite alters tables by copying them
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
