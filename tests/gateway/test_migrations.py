"""The schema is Alembic's: migrations build exactly the tables the models describe, on SQLite and
PostgreSQL, and existing data survives each step."""

from __future__ import annotations

import importlib

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import text

from gateway.store.db import alembic_config, make_engine, migrate
from gateway.store.models import GatewayTable


def test_migrations_match_the_models(db_url: str) -> None:
    for package in ("gateway.capture.models", "gateway.imap.models"):
        importlib.import_module(package)  # every feature's tables are on the same MetaData
    engine = make_engine(db_url)
    migrate(engine)
    with engine.connect() as connection:
        context = MigrationContext.configure(
            connection, opts={"version_table": "gateway_alembic_version"}
        )
        differences = compare_metadata(context, GatewayTable.metadata)
    engine.dispose()
    assert differences == [], "models and migrations differ: write a migration"


def test_bodies_move_to_their_own_table_with_the_data(db_url: str) -> None:
    engine = make_engine(db_url)
    config = alembic_config(engine)
    command.upgrade(config, "0004")
    with engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO message (id, source, state, mail_from, rcpt_tos, raw, prepend, size, "
                "steps_done, attempts, created_at, updated_at, next_attempt_at, meta) VALUES "
                "('m1', 'submission', 'queued', 'a@b.test', '[]', :raw, :empty, 3, '[]', "
                "0, 1, 1, 1, "
                "'{}')"
            ),
            {"raw": b"abc", "empty": b""},
        )
        connection.execute(
            text(
                "INSERT INTO delivery (message_id, recipient, state, attempts, updated_at) "
                "VALUES ('m1', 'c@d.test', 'pending', 0, 1)"
            )
        )
    command.upgrade(config, "head")
    with engine.connect() as connection:
        assert (
            connection.execute(text("SELECT raw FROM message_body WHERE id = 'm1'")).scalar_one()
            == b"abc"
        )
        assert connection.execute(text("SELECT COUNT(*) FROM delivery")).scalar_one() == 1
    command.downgrade(config, "0004")
    with engine.connect() as connection:
        assert (
            connection.execute(text("SELECT raw FROM message WHERE id = 'm1'")).scalar_one()
            == b"abc"
        )
    engine.dispose()
