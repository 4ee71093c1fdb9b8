"""Fixtures for the hooks' tests: a real bundled CRM under uvicorn, and a gateway logging to it."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlmodel import Session

from crm_api import crud
from crm_api.db import Database, migrate
from crm_api.models import Role, UserCreate
from tests.gateway.conftest import REP, RunningGateway, add_users, gateway_settings
from tests.servers.uvicorn import UvicornServer

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


@dataclass
class Crm:
    server: UvicornServer
    admin_token: str
    gateway_token: str

    @property
    def url(self) -> str:
        return self.server.url

    def api(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {self.admin_token}"}, timeout=30
        )

    def add_contact(self, address: str, name: str = "") -> int:
        with self.api() as api:
            response = api.post(
                "/api/v1/contacts",
                json={"name": name or address, "primary_address": address, "owner": REP},
            )
            assert response.status_code == 201, response.text
            return int(response.json()["id"])

    def emails(self) -> list[dict[str, Any]]:
        with self.api() as api:
            response = api.get("/api/v1/emails", params={"limit": 200})
            assert response.status_code == 200, response.text
            return list(response.json()["data"])


@pytest.fixture
def crm_server(tmp_path: Path) -> Iterator[Crm]:
    """A fresh CRM on SQLite: auto-creation off, so only real contacts match."""
    url = f"sqlite:///{tmp_path / 'crm.db'}"
    config = tmp_path / "crm.toml"
    config.write_text(
        f'[webhooks]\nsecrets = ["{SECRET}"]\n'
        '[policy]\ncompany_domains = ["example.test"]\nauto_create = "none"\n'
    )
    db = Database(url)
    migrate(db.engine)
    with Session(db.engine) as session:
        admin = crud.create_user(
            session=session, user_in=UserCreate(email="admin@example.test", role=Role.admin)
        )
        crud.create_user(session=session, user_in=UserCreate(email=REP, role=Role.rep))
        admin_token = crud.create_token(session=session, user=admin)
        gateway_token = crud.create_token(session=session, user=admin)
        session.commit()
    db.dispose()
    server = UvicornServer(
        "crm_api.main:create_app_from_env",
        {"MAILGATE_CRM_CONFIG": str(config), "MAILGATE_CRM_DATABASE_URL": url},
    ).start()
    try:
        yield Crm(server, admin_token, gateway_token)
    finally:
        server.cleanup()


def hooked_settings(
    tmp_path: Path, ca: Any, sink: Any, crm: Crm, **sections: dict[str, Any]
) -> Any:
    values: dict[str, dict[str, Any]] = {
        "relay": {"host": "127.0.0.1", "port": sink.port, "security": "none", "require_tls": False},
        "crm": {"embedded": False, "url": crm.url},
        "hooks": {
            "enabled": True,
            "crm_token": crm.gateway_token,
            "webhook_secrets": [SECRET],
            "link_secret": "test-link-secret",
            "retry_schedule_seconds": [0.3, 0.3, 0.3, 0.3, 0.3, 0.3],
            "match_cache_seconds": 0,
        },
    }
    for name, extra in sections.items():
        values.setdefault(name, {}).update(extra)
    settings = gateway_settings(tmp_path, ca, **values)
    settings = settings.model_copy(
        update={
            "hooks": settings.hooks.model_copy(
                update={"public_url": f"http://127.0.0.1:{settings.api.port}"}
            )
        }
    )
    return settings


@pytest.fixture
def hooked_gateway(tmp_path: Path, ca: Any, sink: Any, crm_server: Crm) -> Iterator[RunningGateway]:
    settings = hooked_settings(tmp_path, ca, sink, crm_server)
    token = add_users(settings.database.url)
    gateway = RunningGateway(settings).start()
    gateway.token = token  # type: ignore[attr-defined]
    try:
        yield gateway
    finally:
        gateway.stop()


def poll(predicate: Callable[[], Any], timeout: float = 15.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")
