"""Fixtures for the CRM's tests: the CRM served by a real uvicorn subprocess on a free loopback
port, once per session and per backend (SQLite file, throwaway PostgreSQL database), with three
users (an admin and two reps) whose tokens the tests use through httpx, and a helper that signs
and posts gateway webhooks exactly as the gateway does.

The PostgreSQL cluster is the shared session ``postgres`` fixture (``tests/conftest.py``), asked
for only when a PostgreSQL test runs; uvicorn is ``tests/servers/uvicorn.py``'s UvicornServer."""

from __future__ import annotations

import base64
import itertools
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlmodel import Session

from crm_api import crud
from crm_api.db import Database, migrate
from crm_api.models import Role, UserCreate
from crm_api.signatures import sign
from tests.servers.uvicorn import UvicornServer

REPO = Path(__file__).resolve().parents[2]
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
OLD_SECRET = "whsec_" + base64.b64encode(b"an-older-secret-still-valid-0123").decode()
COMPANY = "acme.test"
_counter = itertools.count(1)


def unique(prefix: str = "x") -> str:
    """A name no other test (or earlier run on the same database) has used."""
    return f"{prefix}{next(_counter)}t{time.monotonic_ns() % 10**9}"


# --- the CRM under uvicorn ----------------------------------------------------------------------


@dataclass
class CRM:
    """A running CRM and what tests need to talk to it."""

    backend: str
    url: str
    database_url: str
    tokens: dict[str, str]
    emails: dict[str, str]
    clients: dict[str, httpx.Client] = field(default_factory=dict)

    def client(self, who: str) -> httpx.Client:
        """``admin``, ``ann`` or ``bob`` (both reps), or ``anon`` (no token)."""
        if who not in self.clients:
            headers = {"Authorization": f"Bearer {self.tokens[who]}"} if who != "anon" else {}
            self.clients[who] = httpx.Client(base_url=self.url, headers=headers, timeout=30)
        return self.clients[who]

    def webhook(
        self,
        event_type: str,
        data: dict[str, Any],
        *,
        webhook_id: str | None = None,
        secret: str = SECRET,
        timestamp: int | None = None,
    ) -> httpx.Response:
        body = json.dumps(
            {"type": event_type, "timestamp": datetime.now(UTC).isoformat(), "data": data}
        ).encode()
        return self.post_signed(body, webhook_id=webhook_id, secret=secret, timestamp=timestamp)

    def post_signed(
        self,
        body: bytes,
        *,
        webhook_id: str | None = None,
        secret: str = SECRET,
        timestamp: int | None = None,
    ) -> httpx.Response:
        msg_id = webhook_id or unique("msg_")
        ts = int(time.time()) if timestamp is None else timestamp
        key = base64.b64decode(secret.removeprefix("whsec_"))
        headers = {
            "webhook-id": msg_id,
            "webhook-timestamp": str(ts),
            "webhook-signature": sign(key, msg_id, ts, body),
            "content-type": "application/json",
        }
        return self.client("anon").post("/api/v1/webhooks/gateway", content=body, headers=headers)

    def log_email(self, **kwargs: Any) -> dict[str, Any]:
        """Post an ``email.logged`` and return the stored email as ``admin`` sees it."""
        data = email_data(**kwargs)
        response = self.webhook("email.logged", data)
        assert response.status_code == 200, response.text
        assert response.json()["status"] == "stored"
        found = self.client("admin").get(
            "/api/v1/emails", params={"q": data["subject"], "limit": 200}
        )
        mid = data["message_id"].strip("<>").lower()
        return next(e for e in found.json()["data"] if e["message_id"] == mid)


def email_data(
    *,
    owner: str,
    to: list[str],
    sharing: str = "public",
    account_id: str | None = None,
    direction: str = "outbound",
    sender: str | None = None,
    subject: str | None = None,
    message_id: str | None = None,
    in_reply_to: str | None = None,
    references: list[str] | None = None,
    selected: list[str] | None = None,
    cc: list[str] | None = None,
    bcc: list[str] | None = None,
    date: str | None = None,
    attachments: int = 1,
    text: str = "Hello there",
) -> dict[str, Any]:
    """An ``email.logged`` payload as the gateway sends it."""
    return {
        "message_id": message_id or f"<{unique('m')}@{COMPANY}>",
        "in_reply_to": in_reply_to,
        "references": references or [],
        "direction": direction,
        "source": "submission" if direction == "outbound" else "imap",
        "account": {
            "id": account_id or f"acct-{owner}-{sharing}",
            "owner": owner,
            "kind": "personal",
            "sharing": sharing,
            "selected_contacts": selected or [],
        },
        "from": [{"name": "Sender", "address": sender or owner}],
        "to": [{"name": "", "address": a} for a in to],
        "cc": [{"name": "", "address": a} for a in cc or []],
        "bcc": [{"name": "", "address": a} for a in bcc or []],
        "subject": subject or unique("Subject "),
        "date": date or datetime.now(UTC).isoformat(),
        "text_body": text,
        "html_body": f"<p>{text}</p>",
        "body_truncated": False,
        "attachments": [
            {
                "filename": f"file{i}.pdf",
                "content_type": "application/pdf",
                "size": 1234,
                "url": f"https://gateway.{COMPANY}/api/v1/attachments/{unique('a')}",
            }
            for i in range(attachments)
        ],
        "authentication": {"spf": "pass", "dkim": "pass", "dmarc": "pass"},
        "matched_contacts": [],
        "raw_url": f"https://gateway.{COMPANY}/api/v1/raw/{unique('r')}?sig=abc",
    }


def _seed_users(database_url: str) -> tuple[dict[str, str], dict[str, str]]:
    db = Database(database_url)
    migrate(db.engine)
    tokens, emails = {}, {}
    with Session(db.engine) as session:
        for who, role in (("admin", Role.admin), ("ann", Role.rep), ("bob", Role.rep)):
            email = f"{who}@{COMPANY}"
            user = crud.create_user(session=session, user_in=UserCreate(email=email, role=role))
            tokens[who] = crud.create_token(session=session, user=user)
            emails[who] = email
        session.commit()
    db.dispose()
    return tokens, emails


@pytest.fixture(
    scope="session", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def crm(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CRM]:
    backend: str = request.param
    workdir = tmp_path_factory.mktemp(f"crm-{backend}")
    if backend == "sqlite":
        database_url = f"sqlite:///{workdir / 'crm.db'}"
    else:
        database_url = request.getfixturevalue("postgres").new_database("crm")
    config = workdir / "crm.toml"
    # The secrets and policy come from a config file, the database from the environment: both
    # paths of the settings loader are exercised by every test.
    config.write_text(
        f'[webhooks]\nsecrets = ["{SECRET}", "{OLD_SECRET}"]\n'
        f'[policy]\ncompany_domains = ["{COMPANY}"]\nauto_create = "none"\n'
        'excluded_domains = ["gmail.com"]\n'
    )
    tokens, emails = _seed_users(database_url)
    server = UvicornServer(
        "crm_api.main:create_app_from_env",
        {
            "MAILGATE_CRM_CONFIG": str(config),
            "MAILGATE_CRM_DATABASE_URL": database_url,
            "MAILGATE_CRM_MAX_BODY_BYTES": str(1024 * 1024),
        },
    ).start()
    crm = CRM(backend, server.url, database_url, tokens, emails)
    try:
        yield crm
    finally:
        for client in crm.clients.values():
            client.close()
        server.cleanup()
        if backend == "postgres":
            request.getfixturevalue("postgres").drop_database(database_url)


@pytest.fixture
def policy(crm: CRM) -> Iterator[Any]:
    """Change the organisation's settings for one test and restore them afterwards."""
    admin = crm.client("admin")
    before = admin.get("/api/v1/settings").json()["organisation"]

    def set_policy(**changes: Any) -> dict[str, Any]:
        response = admin.patch("/api/v1/settings", json=changes)
        assert response.status_code == 200, response.text
        result: dict[str, Any] = response.json()
        return result

    yield set_policy
    assert admin.patch("/api/v1/settings", json=before).status_code == 200
