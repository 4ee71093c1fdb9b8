"""Alembic environment: takes the engine from the config built by ``gateway.store.db``."""

from __future__ import annotations

from alembic import context

from gateway.store.models import GatewayTable

engine = context.config.attributes["engine"]
with engine.begin() as connection:
    context.configure(
        connection=connection,
        target_metadata=GatewayTable.metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        # Its own version table, so the gateway and the CRM may even share one database.
        version_table="gateway_alembic_version",
    )
    context.run_migrations()
