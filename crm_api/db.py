"""The CRM's database handle: builds the SQLAlchemy engine for a URL (SQLite in WAL mode with
foreign keys on, or PostgreSQL through psycopg), runs the Alembic migrations programmatically
(no alembic.ini: the Config is built here), and serialises writers on SQLite so that concurrent
requests queue on an asyncio lock instead of spinning in SQLite's busy handler."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from psycopg.types.array import ListBinaryDumper
from sqlalchemy.engine import make_url

from crm_api.settings import ConfigError

MIGRATIONS = Path(__file__).parent / "migrations"


def normalise_url(url: str) -> str:
    """Let ``postgresql://`` mean psycopg 3 (the driver we ship), as users write it."""
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


def is_sqlite(url: str) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


def make_engine(url: str) -> sa.Engine:
    """An engine for ``url``; for a SQLite file, its directory is created and every connection
    gets WAL, ``synchronous=FULL`` (a commit is on disk), foreign keys and a busy timeout."""
    url = normalise_url(url)
    if not is_sqlite(url):
        pg = sa.create_engine(url, pool_size=10, max_overflow=20, pool_pre_ping=True)

        @sa.event.listens_for(pg, "connect")
        def _setup(dbapi_conn: Any, _record: Any) -> None:
            # Lists go as binary arrays: the ingest sends a batch's rows as one array per
            # column (email bodies among them), and the text format escapes every character
            # of every element, in Python (measured: 20x slower for a batch's bodies).
            dbapi_conn.adapters.register_dumper(list, ListBinaryDumper)
            # Email bodies are TOASTed; lz4 compresses them several times faster than the
            # default pglz (measured: a third off each batch's email INSERT). PostgreSQL < 14
            # or a build without lz4 refuses the setting: keep the default then.
            try:
                with dbapi_conn.cursor() as cursor:
                    cursor.execute("SET default_toast_compression = 'lz4'")
                dbapi_conn.commit()
            except Exception:
                dbapi_conn.rollback()

        return pg
    database = make_url(url).database
    if database and database != ":memory:":
        try:
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(
                f"database_url: cannot create {Path(database).parent} ({exc.strerror}); "
                "point database_url at a writable directory"
            ) from None
    # Sessions hop between threadpool threads (dependency, then endpoint), never concurrently.
    engine = sa.create_engine(
        url, connect_args={"check_same_thread": False}, pool_size=10, max_overflow=20
    )

    @sa.event.listens_for(engine, "connect")
    def _pragmas(dbapi_conn: Any, _record: Any) -> None:
        cursor = dbapi_conn.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=10000")
        cursor.close()

    return engine


def alembic_config(connection: sa.Connection | None = None, url: str | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    if url is not None:
        cfg.set_main_option("sqlalchemy.url", normalise_url(url).replace("%", "%%"))
    cfg.attributes["connection"] = connection
    return cfg


def migrate(engine: sa.Engine) -> None:
    """Bring the schema to the newest migration (``alembic upgrade head``)."""
    with engine.begin() as connection:
        command.upgrade(alembic_config(connection), "head")


class Database:
    """The engine plus the SQLite writer lock; one per app, on ``app.state.db``."""

    def __init__(self, url: str) -> None:
        self.url = normalise_url(url)
        self.engine = make_engine(self.url)
        self.sqlite = is_sqlite(self.url)
        # SQLite has one writer at a time. Queuing writers here (in the event loop, holding no
        # thread) avoids the busy handler's sleeps, which wreck tail latency under load.
        self._write_lock = asyncio.Lock() if self.sqlite else None

    @contextlib.asynccontextmanager
    async def writer(self) -> AsyncIterator[None]:
        if self._write_lock is None:
            yield
            return
        async with self._write_lock:
            yield

    def dispose(self) -> None:
        self.engine.dispose()
