"""Fixtures for the gateway's tests: a database URL on each backend, and a running gateway."""

from __future__ import annotations

import asyncio
import smtplib
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import Session

from gateway import users
from gateway.app import Mailgate
from gateway.settings import Settings
from gateway.store.db import make_engine, migrate
from tests.servers.ports import free_port


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database on SQLite and on the throwaway PostgreSQL cluster."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'mailgate.db'}"
    else:
        yield request.getfixturevalue("postgres").new_database()


# -- a gateway running in this process, on its own event loop in a thread -----------------------


REP = "rep@example.test"
REP_PASSWORD = "correct horse battery"
ADMIN = "admin@example.test"


class RunningGateway:
    """``Mailgate`` started on a private loop in a thread; ``stop()`` shuts it down cleanly."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.app = Mailgate(settings)
        self.loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._main, name="gateway", daemon=True)
        self._started: Future[None] = Future()
        self._done: Future[None] = Future()

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._run())
        except BaseException as exc:
            if not self._started.done():
                self._started.set_exception(exc)
            self._done.set_exception(exc)
        else:
            self._done.set_result(None)
        finally:
            self.loop.close()

    async def _run(self) -> None:
        self._stop = asyncio.Event()
        await self.app.start()
        self._started.set_result(None)
        try:
            await self._stop.wait()
        finally:
            await self.app.stop()

    def start(self) -> RunningGateway:
        self._thread.start()
        self._started.result(timeout=30)
        return self

    def stop(self) -> None:
        if self._stop is not None and not self._done.done():
            self.loop.call_soon_threadsafe(self._stop.set)
        self._done.result(timeout=60)
        self._thread.join(timeout=10)

    def call(self, coroutine: Any) -> Any:
        """Run a coroutine on the gateway's loop (e.g. a store query) and return its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout=30)

    @property
    def port(self) -> int:
        return self.settings.submission.port

    @property
    def tls_port(self) -> int:
        return self.settings.submission.tls_port

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.settings.api.port}"


def gateway_settings(tmp_path: Path, ca: Any, **sections: dict[str, Any]) -> Settings:
    """Settings for a test gateway: everything under ``tmp_path``, free loopback ports."""
    base: dict[str, dict[str, Any]] = {
        "server": {"hostname": "gw.example.test", "data_dir": str(tmp_path)},
        "database": {"url": f"sqlite:///{tmp_path / 'mailgate.db'}"},
        "submission": {
            "port": free_port(),
            "tls_port": free_port(),
            "cert_file": str(ca.server.cert),
            "key_file": str(ca.server.key),
        },
        "relay": {"ca_file": str(ca.ca_file), "retry_schedule_seconds": [1.0]},
        "dkim": {"key_dir": str(tmp_path / "dkim")},
        "api": {"port": free_port()},
        "worker": {"poll_interval_seconds": 0.2},
        "crm": {"embedded": False},
        "hooks": {"enabled": False},  # the hooks tests turn them on, with a real CRM
    }
    for name, values in sections.items():
        base.setdefault(name, {}).update(values)
    return Settings(**base)


def add_users(url: str) -> str:
    """The rep who sends, and an admin; returns the admin's API token."""
    engine = make_engine(url)
    migrate(engine)
    with Session(engine) as session:
        users.add_user(
            session, email=REP, password=REP_PASSWORD, aliases=["rep.alias@example.test"]
        )
        users.add_user(session, email=ADMIN, password=REP_PASSWORD, is_admin=True)
        token = users.create_token(session, email=ADMIN)
        session.commit()
    engine.dispose()
    return token


def start_gateway_process(config: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    """``mailgate serve`` as a real process (so it can be SIGKILLed); returns once SMTP answers."""
    process = subprocess.Popen(
        [sys.executable, "-m", "gateway", "--config", str(config), "serve"],
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with smtplib.SMTP("127.0.0.1", port, timeout=2) as probe:
                probe.noop()
            return process
        except OSError:
            if process.poll() is not None:
                raise AssertionError(f"gateway exited: {log.read_text()}") from None
            time.sleep(0.05)
    process.kill()
    raise AssertionError("gateway did not start listening")
