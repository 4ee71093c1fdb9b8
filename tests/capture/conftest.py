"""Fixtures of the capture tests: a private NSD, a database with users, a running capture door."""

from __future__ import annotations

import asyncio
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import Session

from gateway import users
from gateway.capture.directory import capture_address
from gateway.capture.door import CaptureListener, build_capture_listener
from gateway.dkim import DkimKey, DkimSigner, KeyRing, generate_key
from gateway.metrics import Metrics
from gateway.settings import Settings
from gateway.store.db import make_engine, migrate
from gateway.store.queue import GroupCommitter, QueuedMessage, Store
from tests.servers.dns import AuthoritativeDns, txt_record
from tests.servers.ports import free_port

REP = "rep@company.test"
REP_ALIAS = "rita@company.test"
OTHER_REP = "otto@company.test"
CAPTURE_DOMAIN = "crm.test"


def zone_string(value: bytes) -> str:
    """One zone-file character-string: printable ASCII as is, everything else as \\DDD."""
    out = []
    for byte in value:
        if 0x20 <= byte < 0x7F and byte not in (0x22, 0x5C):
            out.append(chr(byte))
        else:
            out.append(f"\\{byte:03d}")
    return '"' + "".join(out) + '"'


@pytest.fixture(scope="session")
def capture_dns() -> Iterator[AuthoritativeDns]:
    """An NSD of the capture tests' own (they publish example.com, which others may use)."""
    with AuthoritativeDns() as server:
        yield server


@pytest.fixture(scope="session")
def rep_key(tmp_path_factory: pytest.TempPathFactory) -> DkimKey:
    return generate_key(tmp_path_factory.mktemp("dkim"), "company.test", selector="s1")


@pytest.fixture(scope="session")
def company_zone(capture_dns: AuthoritativeDns, rep_key: DkimKey) -> AuthoritativeDns:
    """company.test: SPF allows only 192.0.2.1 (not loopback), DKIM key s1, DMARC p=reject."""
    capture_dns.publish(
        "company.test",
        [
            '@ IN TXT "v=spf1 ip4:192.0.2.1 -all"',
            txt_record("s1._domainkey", rep_key.record_value),
            txt_record("_dmarc", "v=DMARC1; p=reject; adkim=r; aspf=r"),
            "mail IN A 192.0.2.1",
        ],
    )
    capture_dns.publish(
        "evil.test",
        ['@ IN TXT "v=spf1 ip4:127.0.0.0/8 -all"', txt_record("_dmarc", "v=DMARC1; p=none")],
    )
    return capture_dns


def sign(raw: bytes, key: DkimKey) -> bytes:
    """``raw`` with a DKIM signature of ``key`` on top (our own signer, relaxed/relaxed)."""
    return (
        DkimSigner(KeyRing([key]), ["from", "to", "cc", "subject", "date", "message-id"]).sign(
            raw, domain=key.domain
        )
        + raw
    )


def capture_settings(tmp_path: Path, dns: AuthoritativeDns, **capture: Any) -> Settings:
    return Settings(
        server={"hostname": "gw.example.test", "data_dir": str(tmp_path)},
        database={"url": f"sqlite:///{tmp_path / 'mailgate.db'}"},
        dns={"nameservers": [dns.host], "port": dns.port, "timeout_seconds": 2.0},
        capture={
            "enabled": True,
            "port": free_port(),
            "domain": CAPTURE_DOMAIN,
            "directory_cache_seconds": 0,
            "dns_cache_seconds": 0,
            "verify_timeout_seconds": 10,
            **capture,
        },
    )


def add_reps(url: str, settings: Settings) -> dict[str, str]:
    """Two reps (one with an alias) and an admin; returns each rep's secret address."""
    engine = make_engine(url)
    migrate(engine)
    with Session(engine) as session:
        users.add_user(session, email=REP, password="x" * 12, aliases=[REP_ALIAS])
        users.add_user(session, email=OTHER_REP, password="x" * 12)
        users.add_user(session, email="admin@company.test", password="x" * 12, is_admin=True)
        session.flush()
        secret = {
            REP: capture_address(session, email=REP, settings=settings.capture),
            OTHER_REP: capture_address(session, email=OTHER_REP, settings=settings.capture),
        }
        session.commit()
    engine.dispose()
    return secret


class RunningDoor:
    """The capture door and a store on a private event loop in a thread (no worker)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.loop = asyncio.new_event_loop()
        self.accepted: list[str] = []
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def start(self) -> RunningDoor:
        self._thread.start()
        self.call(self._start())
        return self

    async def _start(self) -> None:
        self.engine = make_engine(self.settings.database.url)
        migrate(self.engine)
        self.committer = GroupCommitter(self.engine)
        await self.committer.start()
        self.store = Store(self.engine, self.committer, lease_seconds=60)
        self.listener: CaptureListener = build_capture_listener(
            self.settings, self.store, self.engine, Metrics(), self.accepted.append, None
        )
        await self.listener.start()

    @property
    def port(self) -> int:
        return self.listener.ports[0]

    def call(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout=60)

    def claim(self, message_id: str) -> QueuedMessage:
        items = self.call(self.store.claim(1, [message_id]))
        assert items, f"{message_id} is not claimable"
        return items[0]  # type: ignore[no-any-return]

    def stop(self) -> None:
        async def stop() -> None:
            await self.listener.stop()
            await self.committer.stop()
            self.engine.dispose()

        self.call(stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()


@pytest.fixture(scope="session")
def template_db(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """A migrated database with the reps, made once (Argon2 hashing is slow on purpose)."""
    path = tmp_path_factory.mktemp("template") / "mailgate.db"
    settings = Settings(capture={"domain": CAPTURE_DOMAIN})
    return path, add_reps(f"sqlite:///{path}", settings)


@pytest.fixture
def door_factory(
    tmp_path: Path, company_zone: AuthoritativeDns, template_db: tuple[Path, dict[str, str]]
) -> Iterator[Any]:
    started: list[RunningDoor] = []

    def make(**capture: Any) -> tuple[RunningDoor, dict[str, str]]:
        settings = capture_settings(tmp_path, company_zone, **capture)
        shutil.copyfile(template_db[0], tmp_path / "mailgate.db")
        secret = template_db[1]
        door = RunningDoor(settings).start()
        started.append(door)
        return door, secret

    yield make
    for door in started:
        door.stop()
