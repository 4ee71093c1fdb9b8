"""Alembic environment: takes the engine from the config built by ``gateway.store.db``."""

from __future__ import annotations

from alembic import context

from gateway.store.models import GatewayTable

engine = context.config.attributes["engine"]
with engine.connect() as connection:
    sqlite = connection.dialect.name == "sqlite"
    if sqlite:
        # SQLite alters a table by copying it; with foreign keys enforced, dropping the old
        # copy fails while other tables point at it. The pragma only works outside a
        # transaction, so it is set before Alembic opens one.
        connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
        connection.commit()
    context.configure(
        connection=connection,
        target_metadata=GatewayTable.metadata,
        render_as_batch=sqlite,
        # Its own version table, so the gateway and the CRM may even share one database.
        version_table="gateway_alembic_version",
    )
    with context.begin_transaction():
        context.run_migrations()
    if sqlite:
        connection.exec_driver_sql("PRAGMA foreign_keys=ON")
