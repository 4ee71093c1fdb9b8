"""Fixtures for IMAP sync tests: the bundled CRM under uvicorn, and an ImapService harness.

Everything real: Dovecot (session fixture, TLS with the test CA), the bundled CRM as a separate
uvicorn process (its ``/api/v1/contacts/match`` answers from contacts the tests create through
its API), SQLite for the gateway's store, the hooks' Outbox. :class:`Harness` runs the service
on its own event loop in a thread, as ``mailgate serve`` would, and offers blocking helpers that
read the gateway's database and poll it with deadlines (never a sleep).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from cryptography.fernet import Fernet
from imapclient import IMAPClient
from sqlalchemy import Engine, text
from sqlmodel import Session

from crm_api import crud
from crm_api.db import Database
from crm_api.db import migrate as crm_migrate
from crm_api.models import Role, UserCreate
from gateway import users
from gateway.imap.accounts import AccountCreate, AccountPublic
from gateway.imap.service import ImapService
from gateway.imap.settings import ImapSettings
from gateway.metrics import Metrics
from gateway.settings import Settings
from gateway.store.db import make_engine, migrate
from gateway.store.queue import GroupCommitter, Store
from hooks.crm_client import CrmClient
from hooks.webhooks import Outbox
from tests.servers.certs import TestCA
from tests.servers.dovecot import DovecotServer
from tests.servers.uvicorn import UvicornServer

T = TypeVar("T")
COMPANY = "corp.test"
SECRET_KEY = Fernet.generate_key().decode()
_unique = itertools.count(1)


def unique(prefix: str) -> str:
    return f"{prefix}{next(_unique)}x{time.monotonic_ns() % 10**8}"


def wait_for(
    check: Callable[[], T],
    *,
    timeout: float = 20.0,
    what: str = "condition",
    state: Callable[[], object] | None = None,
) -> T:
    """Poll ``check`` until it returns something truthy; fail after ``timeout`` seconds
    (showing ``state()`` in the failure, so a timeout says what was going on)."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            seen = f"; state: {state()!r}" if state is not None else ""
            pytest.fail(
                f"timed out after {timeout:.0f}s waiting for {what} (last: {value!r}){seen}"
            )
        time.sleep(0.02)


# -- the bundled CRM ---------------------------------------------------------------------------


@dataclass
class Crm:
    url: str
    token: str
    client: httpx.Client

    def add_contacts(self, addresses: list[str]) -> None:
        for address in addresses:
            reply = self.client.post(
                "/api/v1/contacts", json={"name": address, "primary_address": address}
            )
            assert reply.status_code == 201, reply.text


@pytest.fixture(scope="session")
def crm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Crm]:
    """The bundled CRM (policy: auto-create none, corp.test is the company's own domain)."""
    workdir = tmp_path_factory.mktemp("imap-crm")
    database_url = f"sqlite:///{workdir / 'crm.db'}"
    config = workdir / "crm.toml"
    config.write_text(f'[policy]\ncompany_domains = ["{COMPANY}"]\nauto_create = "none"\n')
    db = Database(database_url)
    crm_migrate(db.engine)
    with Session(db.engine) as session:
        user = crud.create_user(
            session=session, user_in=UserCreate(email=f"admin@{COMPANY}", role=Role.admin)
        )
        token = crud.create_token(session=session, user=user)
        session.commit()
    db.dispose()
    server = UvicornServer(
        "crm_api.main:create_app_from_env",
        {"MAILGATE_CRM_CONFIG": str(config), "MAILGATE_CRM_DATABASE_URL": database_url},
    ).start()
    client = httpx.Client(
        base_url=server.url, headers={"Authorization": f"Bearer {token}"}, timeout=30
    )
    try:
        yield Crm(server.url, token, client)
    finally:
        client.close()
        server.cleanup()


# -- the service under test --------------------------------------------------------------------


class Harness:
    """An :class:`ImapService` with a real store, CRM client and outbox, on a loop in a thread."""

    def __init__(
        self,
        tmp_path: Path,
        *,
        dovecot: DovecotServer,
        ca: TestCA,
        crm: Crm,
        url: str | None = None,
        **imap: Any,
    ) -> None:
        self.dovecot = dovecot
        self.ca = ca
        self.crm = crm
        self.url = url or f"sqlite:///{tmp_path / 'mailgate.db'}"
        options: dict[str, Any] = {
            "secret_key": SECRET_KEY,
            "ca_file": ca.ca_file,
            "poll_interval_seconds": 0.3,
            "retry_schedule_seconds": [0.1, 0.2],
            "throttle_seconds": 0.2,
            "reload_interval_seconds": 0.5,
            "command_timeout_seconds": 10.0,
            "connect_timeout_seconds": 5.0,
        }
        options.update(imap)
        self.settings = Settings(
            database={"url": self.url},  # type: ignore[arg-type]
            imap=ImapSettings(**options),
        )
        self.db: Engine = make_engine(self.url)
        migrate(self.db)
        self.accepted_ids: list[str] = []
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.service: ImapService | None = None
        self.running = False

    def call(self, coroutine: Any, timeout: float = 60) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout=timeout)

    def start(self) -> Harness:
        self.call(self._start())
        return self

    async def _start(self) -> None:
        self.committer = GroupCommitter(self.db)
        await self.committer.start()
        self.store = Store(self.db, self.committer, lease_seconds=60)
        self.http = httpx.AsyncClient(timeout=10)
        self.crm_client = CrmClient(
            self.http, base_url=self.crm.url, token=self.crm.token, cache_seconds=0.5
        )
        self.service = ImapService(
            settings=self.settings,
            store=self.store,
            engine=self.db,
            crm=self.crm_client,
            outbox=Outbox(),
            metrics=Metrics(),
            on_accepted=self.accepted_ids.append,
        )
        await self.service.start()
        self.running = True

    def stop(self) -> None:
        if self.running:
            self.call(self._stop())
            self.running = False

    async def _stop(self) -> None:
        if self.service is not None:
            await self.service.stop()
            self.service = None
        await self.http.aclose()
        await self.committer.stop()

    def close(self) -> None:
        self.stop()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()
        self.db.dispose()

    # -- set-up helpers ----------------------------------------------------------------------

    def add_user(self, email: str) -> None:
        with Session(self.db) as session:
            users.add_user(session, email=email, password="a long password 123")
            session.commit()

    def account_data(self, user: str, password: str, **choices: Any) -> AccountCreate:
        assert self.dovecot.imaps_port is not None
        fields: dict[str, Any] = {
            "email": user,
            "password": password,
            "provider": "custom",
            "imap_host": "localhost",
            "imap_port": self.dovecot.imaps_port,
            "imap_security": "ssl",
            "kind": "shared",
        }
        fields.update(choices)
        return AccountCreate(**fields)

    def add_account(self, user: str, password: str, **choices: Any) -> AccountPublic:
        assert self.service is not None
        data = self.account_data(user, password, **choices)
        result: AccountPublic = self.call(self.service.add_account(data))
        return result

    # -- reading the gateway's state ---------------------------------------------------------

    def rows(self, sql: str, **params: Any) -> list[dict[str, Any]]:
        with self.db.connect() as connection:
            return [dict(r._mapping) for r in connection.execute(text(sql), params)]

    def accepted(self, account_id: str | None = None) -> list[dict[str, Any]]:
        rows = self.rows(
            "SELECT id, mail_from, header_message_id, meta FROM message WHERE source = 'imap'"
        )
        for row in rows:
            row["meta"] = json.loads(row["meta"]) if isinstance(row["meta"], str) else row["meta"]
        if account_id is not None:
            rows = [r for r in rows if r["meta"]["account"]["id"] == account_id]
        return rows

    def events(self, event_type: str) -> list[dict[str, Any]]:
        rows = self.rows(
            "SELECT payload FROM outbox WHERE event_type = :t ORDER BY created_at", t=event_type
        )
        return [json.loads(r["payload"])["data"] for r in rows]

    def account(self, account_id: str) -> dict[str, Any]:
        return self.rows("SELECT * FROM mail_account WHERE id = :i", i=account_id)[0]

    def wait_status(self, account_id: str, status: str, timeout: float = 20.0) -> dict[str, Any]:
        return wait_for(
            lambda: (a := self.account(account_id))["status"] == status and a,
            timeout=timeout,
            what=f"account {account_id} to be {status}",
        )


@pytest.fixture
def harness(
    request: pytest.FixtureRequest, tmp_path: Path, dovecot: DovecotServer, ca: TestCA, crm: Crm
) -> Iterator[Callable[..., Harness]]:
    """Build (and later stop) harnesses: ``harness(**imap_settings)``; ``harness(postgres=True)``
    puts the gateway's store on a fresh database of the throwaway PostgreSQL cluster."""
    made: list[Harness] = []

    def make(*, postgres: bool = False, **imap: Any) -> Harness:
        url = request.getfixturevalue("pg_url") if postgres else None
        h = Harness(tmp_path / f"h{len(made)}", dovecot=dovecot, ca=ca, crm=crm, url=url, **imap)
        made.append(h)
        return h.start()

    try:
        yield make
    finally:
        for h in made:
            h.close()


# -- looking at the mailbox from outside -------------------------------------------------------


@dataclass
class Mailbox:
    """A direct imapclient view of a test user's mailbox (the test's own eyes)."""

    dovecot: DovecotServer
    ca: TestCA
    user: str
    password: str
    _clients: list[IMAPClient] = field(default_factory=list)

    def client(self) -> IMAPClient:
        assert self.dovecot.imaps_port is not None
        client = IMAPClient(
            "localhost",
            self.dovecot.imaps_port,
            ssl=True,
            ssl_context=self.ca.client_context(),
            timeout=10,
        )
        client.login(self.user, self.password)
        self._clients.append(client)
        return client

    def flags(self, folder: str = "INBOX") -> dict[int, tuple[bytes, ...]]:
        client = self.client()
        try:
            info = client.select_folder(folder, readonly=True)
            if not info[b"EXISTS"]:
                return {}
            uids = client.search(["ALL"])
            result: dict[int, tuple[bytes, ...]] = {}
            for start in range(0, len(uids), 500):
                fetched = client.fetch(uids[start : start + 500], ["FLAGS"])
                result.update({uid: tuple(sorted(d[b"FLAGS"])) for uid, d in fetched.items()})
            return result
        finally:
            client.logout()
            self._clients.remove(client)


# -- a TCP proxy that can play dead ------------------------------------------------------------


class FreezingProxy:
    """Forwards loopback TCP connections to ``port``; :meth:`freeze` makes the ones open so far
    go silent without closing (a peer that vanished, a NAT that forgot us), while new
    connections still work. Threads and sockets are closed by :meth:`close`."""

    def __init__(self, port: int) -> None:
        self.target = port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.frozen: set[int] = set()
        self.sockets: list[socket.socket] = []
        self.generation = 0
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            self.sockets += [client, upstream]
            generation = self.generation
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b, generation), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, generation: int) -> None:
        while True:
            try:
                data = source.recv(65536)
            except OSError:
                return
            if not data:
                with contextlib.suppress(OSError):
                    sink.shutdown(socket.SHUT_WR)
                return
            if generation in self.frozen:
                continue  # swallowed: the other side hears nothing, and no FIN either
            with contextlib.suppress(OSError):
                sink.sendall(data)

    def freeze(self) -> None:
        self.frozen.add(self.generation)
        self.generation += 1

    def close(self) -> None:
        self._closed = True
        self.listener.close()
        for sock in self.sockets:
            with contextlib.suppress(OSError):
                sock.close()


# -- the whole gateway, IMAP sync on -------------------------------------------------------------


def start_gateway(
    tmp_path: Path,
    ca: TestCA,
    sink: Any,
    crm: Any,
    *,
    api_port: int | None = None,
    submission: dict[str, Any] | None = None,
    **imap: Any,
) -> Any:
    """``Mailgate`` with IMAP sync and hooks to the bundled CRM (``tests.hooks``' ``crm_server``),
    relaying to ``sink``; started, with an admin API token as ``.token``."""
    from tests.gateway.conftest import RunningGateway, add_users
    from tests.hooks.conftest import hooked_settings

    sections: dict[str, dict[str, Any]] = {
        "imap": {
            "enabled": True,
            "secret_key": SECRET_KEY,
            "ca_file": str(ca.ca_file),
            "poll_interval_seconds": 0.3,
            "reload_interval_seconds": 0.5,
            "retry_schedule_seconds": [0.2, 0.5],
            **imap,
        }
    }
    if api_port is not None:
        sections["api"] = {"port": api_port}
    if submission is not None:
        sections["submission"] = submission
    settings = hooked_settings(tmp_path, ca, sink, crm, **sections)
    token = add_users(settings.database.url)
    gateway = RunningGateway(settings).start()
    gateway.token = token
    return gateway
