"""A throwaway PostgreSQL cluster on loopback, for tests of the PostgreSQL store.

:class:`PostgresCluster` runs ``initdb`` and ``pg_ctl`` from Debian's newest installed
``/usr/lib/postgresql/<version>/bin`` as the ``postgres`` user (initdb refuses root), with the
data directory and unix socket under a temp dir and TCP on 127.0.0.1 on a free port with trust
authentication. It is stopped by the postmaster's PID. :meth:`~PostgresCluster.new_database`
creates an empty database with a unique name and returns its SQLAlchemy URL.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import shutil
import signal
import subprocess
import uuid
from pathlib import Path

import psycopg

from tests.servers._process import (
    INSTALL_HINT,
    ServerFailed,
    ServerUnavailable,
    make_temp_dir,
    read_text,
    register_cleanup,
    stop_pid,
    unregister_cleanup,
    wait_until,
)
from tests.servers.ports import free_port

_IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


def find_bin_dir() -> Path:
    """The ``bin`` directory of the newest PostgreSQL under /usr/lib/postgresql ($PG_BIN wins)."""
    override = os.environ.get("PG_BIN")
    if override:
        return Path(override)
    candidates = [
        p.parent
        for p in Path("/usr/lib/postgresql").glob("*/bin/initdb")
        if p.parent.parent.name.isdigit()
    ]
    if not candidates:
        raise ServerUnavailable(
            f"PostgreSQL not found under /usr/lib/postgresql (Debian package postgresql): "
            f"{INSTALL_HINT}"
        )
    return max(candidates, key=lambda p: int(p.parent.name))


class PostgresCluster:
    """A private PostgreSQL cluster.

    ``durable=False`` (the default) turns fsync off: the data is throwaway, and that makes
    ``CREATE DATABASE`` and commits fast. Benchmarks that compare commit costs pass True.
    """

    def __init__(self, *, directory: Path | None = None, durable: bool = False) -> None:
        self.bin_dir = find_bin_dir()
        self.durable = durable
        self._own_dir = directory is None
        self.directory = directory if directory is not None else make_temp_dir("pg")
        self.data_dir = self.directory / "data"
        self.socket_dir = self.directory / "run"
        self.log_file = self.directory / "postgres.log"
        self.host = "127.0.0.1"
        self.port = free_port()
        self.user = "postgres"
        self.pid: int | None = None
        self._names = itertools.count(1)
        # initdb refuses to run as root; as root run everything as the postgres user.
        self._as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []

    def _run(self, *argv: str, timeout: float) -> None:
        result = subprocess.run(
            [*self._as_postgres, *argv],
            capture_output=True,
            timeout=timeout,
            check=False,
            cwd=self.directory,
        )
        if result.returncode != 0:
            raise ServerFailed(
                f"{Path(argv[0]).name} failed ({result.returncode}):\n"
                f"{(result.stdout + result.stderr).decode(errors='replace')}\n{self.log_text()}"
            )

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self, timeout: float = 60.0) -> PostgresCluster:
        self.socket_dir.mkdir(exist_ok=True)
        if self._as_postgres:
            for path in (self.directory, self.socket_dir):
                shutil.chown(path, "postgres", "postgres")
        if not (self.data_dir / "PG_VERSION").exists():
            self._run(
                str(self.bin_dir / "initdb"),
                "-D", str(self.data_dir),
                "-A", "trust",
                "-U", self.user,
                "-E", "UTF8",
                "--locale=C.UTF-8",
                "--no-sync",
                timeout=timeout,
            )  # fmt: skip
        options = [
            f"-k {self.socket_dir}",
            "-c listen_addresses=127.0.0.1",
            f"-p {self.port}",
            "-c max_connections=200",
        ]
        if not self.durable:
            options += ["-c fsync=off", "-c full_page_writes=off"]
        self._run(
            str(self.bin_dir / "pg_ctl"),
            "-D", str(self.data_dir),
            "-l", str(self.log_file),
            "-o", " ".join(options),
            "-w", "-t", str(int(timeout)),
            "start",
            timeout=timeout + 5,
        )  # fmt: skip
        pid_file = self.data_dir / "postmaster.pid"
        self.pid = int(pid_file.read_text().split()[0])
        register_cleanup(self)
        wait_until(
            self._accepts_connections,
            timeout=timeout,
            what=f"postgres on {self.host}:{self.port}",
            log=self.log_text,
        )
        return self

    def _accepts_connections(self) -> bool:
        try:
            with psycopg.connect(self.dsn(), connect_timeout=2):
                return True
        except psycopg.OperationalError:
            return False

    def stop(self, timeout: float = 30.0) -> None:
        """Fast shutdown (SIGINT to the postmaster's PID); SIGKILL if it will not stop."""
        pid_file = self.data_dir / "postmaster.pid"
        if self.pid is None and pid_file.exists():
            # A start that failed half-way (pg_ctl timed out) may have left a postmaster.
            with contextlib.suppress(OSError, ValueError, IndexError):
                self.pid = int(pid_file.read_text().split()[0])
        if self.pid is not None:
            stop_pid(self.pid, timeout=timeout, sig=signal.SIGINT)
            self.pid = None
        unregister_cleanup(self)

    def cleanup(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> PostgresCluster:
        try:
            return self.start()
        except BaseException:
            self.cleanup()
            raise

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    # -- databases ------------------------------------------------------------------------------

    def dsn(self, dbname: str = "postgres") -> str:
        """A libpq connection string (for psycopg) to ``dbname``."""
        return f"host={self.host} port={self.port} user={self.user} dbname={dbname}"

    def url(self, dbname: str = "postgres") -> str:
        """A SQLAlchemy URL (psycopg 3 driver) for ``dbname``."""
        return f"postgresql+psycopg://{self.user}@{self.host}:{self.port}/{dbname}"

    def create_database(self, name: str) -> str:
        """Create an empty database ``name``; return its SQLAlchemy URL."""
        if not _IDENTIFIER.match(name):
            raise ValueError(f"not a plain lower-case SQL identifier: {name!r}")
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def new_database(self, prefix: str = "test") -> str:
        """Create a database with a name unique in this cluster; return its SQLAlchemy URL."""
        name = f"{prefix}_{next(self._names)}_{uuid.uuid4().hex[:8]}"
        return self.create_database(name)

    def drop_database(self, name_or_url: str) -> None:
        """Drop a database (by name or URL), disconnecting anyone still connected to it."""
        name = name_or_url.rsplit("/", 1)[-1]
        if not _IDENTIFIER.match(name):
            raise ValueError(f"not a plain lower-case SQL identifier: {name!r}")
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def log_text(self) -> str:
        with contextlib.suppress(PermissionError):
            return read_text(self.log_file)
        return ""
