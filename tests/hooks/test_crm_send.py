"""The loop closed: a rep writes mail in the bundled CRM, the CRM hands it to the gateway
(``POST /api/v1/emails/send`` → ``POST /api/v1/messages``), the gateway relays it and logs it
back by webhook; a reply from the CRM lands in the same thread."""

from __future__ import annotations

import email
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlmodel import Session

from crm_api import crud
from crm_api.db import Database, migrate
from crm_api.models import Role, UserCreate
from tests.crm_api.conftest import CRM
from tests.gateway.conftest import REP, RunningGateway, add_users
from tests.hooks.conftest import SECRET, Crm, hooked_settings, poll
from tests.servers.ports import free_port
from tests.servers.uvicorn import UvicornServer


@dataclass
class Linked:
    crm: Crm
    rep_token: str
    gateway: RunningGateway
    database_url: str

    def as_rep(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.crm.url, headers={"Authorization": f"Bearer {self.rep_token}"}, timeout=30
        )

    def other_reps_private_email(self) -> int:
        """The id of an email logged from another rep's private mailbox (the admin sees it)."""
        tokens = {"admin": self.crm.admin_token}
        crm = CRM("sqlite", self.crm.url, self.database_url, tokens, emails={})
        try:
            stored = crm.log_email(
                owner="boss@example.test", to=["ida@customer.test"], sharing="private"
            )
        finally:
            crm.client("admin").close()
        return int(stored["id"])


@pytest.fixture
def linked(tmp_path: Path, ca: Any, sink: Any) -> Iterator[Linked]:
    """The CRM and the gateway, each configured with the other's address and a token."""
    url = f"sqlite:///{tmp_path / 'crm.db'}"
    db = Database(url)
    migrate(db.engine)
    with Session(db.engine) as session:
        admin = crud.create_user(
            session=session, user_in=UserCreate(email="admin@example.test", role=Role.admin)
        )
        rep = crud.create_user(session=session, user_in=UserCreate(email=REP, role=Role.rep))
        admin_token = crud.create_token(session=session, user=admin)
        gateway_token = crud.create_token(session=session, user=admin)
        rep_token = crud.create_token(session=session, user=rep)
        session.commit()
    db.dispose()
    config = tmp_path / "crm.toml"
    server = UvicornServer(
        "crm_api.main:create_app_from_env",
        {"MAILGATE_CRM_CONFIG": str(config), "MAILGATE_CRM_DATABASE_URL": url},
        port=free_port(),
    )
    crm = Crm(server, admin_token, gateway_token)
    api_port = free_port()
    settings = hooked_settings(tmp_path, ca, sink, crm, api={"port": api_port})
    token = add_users(settings.database.url)
    config.write_text(
        f'[webhooks]\nsecrets = ["{SECRET}"]\n'
        f'[gateway]\nurl = "http://127.0.0.1:{api_port}"\ntoken = "{token}"\n'
        '[policy]\ncompany_domains = ["example.test"]\nauto_create = "none"\n'
    )
    server.start()
    gateway = RunningGateway(settings).start()
    try:
        yield Linked(crm, rep_token, gateway, url)
    finally:
        gateway.stop()
        server.cleanup()


def test_a_rep_sends_and_replies_from_the_crm(linked: Linked, sink: Any) -> None:
    linked.crm.add_contact("ida@customer.test")
    with linked.as_rep() as crm:
        sent = crm.post(
            "/api/v1/emails/send",
            json={"to": ["ida@customer.test"], "subject": "Proposal", "text": "Here it is."},
        )
        assert sent.status_code == 202, sent.text
        first_id = sent.json()["message_id"]
        relayed = sink.wait_for_rcpt("ida@customer.test", timeout=15)
        assert relayed.mail_from == REP
        assert email.message_from_bytes(relayed.data)["Message-ID"] == first_id

        # Logged back by webhook, as outbound mail of the rep.
        logged = poll(
            lambda: crm.get("/api/v1/emails").json()["data"] or None,
            what="the sent email in the CRM",
        )
        assert logged[0]["subject"] == "Proposal" and logged[0]["direction"] == "outbound"

        reply = crm.post(
            "/api/v1/emails/send",
            json={
                "to": ["ida@customer.test"],
                "subject": "Re: Proposal",
                "text": "One more thing.",
                "reply_to_email_id": logged[0]["id"],
            },
        )
        assert reply.status_code == 202, reply.text
        second = sink.wait_for(2, timeout=15)[-1]
        assert email.message_from_bytes(second.data)["In-Reply-To"] == first_id

        def listed() -> list[dict[str, Any]]:
            return list(crm.get("/api/v1/emails").json()["data"])

        both = poll(lambda: (found := listed()) and len(found) == 2 and found, what="the reply")
        assert len({e["thread_id"] for e in both}) == 1

        # A rep sends only as themselves; a reply only to mail they may read.
        other = crm.post(
            "/api/v1/emails/send",
            json={"to": ["ida@customer.test"], "text": "x", "account": "sales@example.test"},
        )
        assert other.status_code == 403 and "only an admin" in other.json()["detail"]
        unseen = crm.post(
            "/api/v1/emails/send",
            json={"to": ["ida@customer.test"], "text": "x", "reply_to_email_id": 999999},
        )
        assert unseen.status_code == 404
        # An email that exists but is another rep's private mail answers the same 404.
        private = linked.other_reps_private_email()
        hidden = crm.post(
            "/api/v1/emails/send",
            json={"to": ["ida@customer.test"], "text": "x", "reply_to_email_id": private},
        )
        assert hidden.status_code == 404, hidden.text
        # The gateway's refusal comes back as the CRM's 4xx, with its sentence.
        bad = crm.post("/api/v1/emails/send", json={"to": ["not-an-address"], "text": "x"})
        assert bad.status_code == 422
        assert "the gateway refused the message" in bad.json()["detail"]
        assert "not an e-mail address" in bad.json()["detail"]
    assert len(sink.messages) == 2
