"""Mail sent from the CRM (``POST /api/v1/messages``): relayed, logged back once, and copied into
the mailbox's Sent folder in both sync modes. The whole gateway runs (worker, relay to the sink,
hooks to the bundled CRM under uvicorn, IMAP sync against the real Dovecot)."""

from __future__ import annotations

import base64
import email
import json
import smtplib
from collections.abc import Iterator
from email import policy
from pathlib import Path
from typing import Any

import httpx
import pytest
from imapclient import IMAPClient
from sqlalchemy import text

from gateway.store.db import make_engine
from tests.gateway.conftest import REP, REP_PASSWORD, RunningGateway
from tests.hooks import conftest as hooks_fixtures
from tests.hooks.conftest import Crm, poll
from tests.imap.conftest import start_gateway
from tests.servers.certs import TestCA
from tests.servers.dovecot import DovecotServer
from tests.servers.postfix import PostfixRelay

# The bundled CRM under uvicorn, as the hooks tests use it.
crm_server = hooks_fixtures.crm_server


@pytest.fixture
def gateway(
    tmp_path: Path, ca: TestCA, sink: Any, crm_server: Crm, dovecot: DovecotServer
) -> Iterator[RunningGateway]:
    running = start_gateway(
        tmp_path, ca, sink, crm_server, submission={"max_message_size": 200_000}
    )
    try:
        yield running
    finally:
        running.stop()


def _client(gateway: RunningGateway) -> httpx.Client:
    token = gateway.token  # type: ignore[attr-defined]
    return httpx.Client(
        base_url=gateway.api, headers={"Authorization": f"Bearer {token}"}, timeout=30
    )


def connect_mailbox(
    api: httpx.Client, dovecot: DovecotServer, prefix: str, **choices: Any
) -> tuple[str, str, str]:
    """A new Dovecot user connected over implicit TLS; (address, password, account id)."""
    mailbox, password = dovecot.new_user(prefix)
    body = {
        "email": mailbox,
        "password": password,
        "imap_host": "localhost",
        "imap_port": dovecot.imaps_port,
        "imap_security": "ssl",
        **choices,
    }
    created = api.post("/api/v1/accounts", json=body)
    assert created.status_code == 201, created.text
    return mailbox, password, str(created.json()["id"])


def _sent_folder(dovecot: DovecotServer, ca: TestCA, user: str, password: str) -> list[Any]:
    """(flags, parsed message) of each message in Sent, read with PEEK."""
    assert dovecot.imaps_port is not None
    with IMAPClient(
        "localhost", port=dovecot.imaps_port, ssl=True, ssl_context=ca.client_context()
    ) as imap:
        imap.login(user, password)
        imap.select_folder("Sent", readonly=True)
        uids = imap.search("ALL")
        fetched = imap.fetch(uids, ["FLAGS", "BODY.PEEK[]"]) if uids else {}
        return [
            (data[b"FLAGS"], email.message_from_bytes(data[b"BODY[]"], policy=policy.default))
            for _uid, data in sorted(fetched.items())
        ]


def _queue_rows(gateway: RunningGateway, header_message_id: str) -> list[dict[str, Any]]:
    engine = make_engine(gateway.settings.database.url)
    try:
        with engine.connect() as connection:
            rows = connection.execute(
                text(
                    "SELECT id, source, state, steps_done, meta FROM message "
                    "WHERE header_message_id = :mid"
                ),
                {"mid": header_message_id},
            )
            return [dict(r._mapping) for r in rows]
    finally:
        engine.dispose()


def test_crm_mail_is_relayed_logged_once_and_copied_to_sent_in_both_modes(
    gateway: RunningGateway, crm_server: Crm, sink: Any, dovecot: DovecotServer, ca: TestCA
) -> None:
    api = _client(gateway)
    crm_server.add_contact("bob@customer.test")
    mailbox, password, account = connect_mailbox(api, dovecot, "sender", owner=REP, primary=True)
    poll(
        lambda: api.get(f"/api/v1/accounts/{account}").json()["status"] == "live",
        timeout=30,
        what="the account going live",
    )

    # The rep's primary mailbox is the sender; the blind copy is never a header upstream.
    sent = api.post(
        "/api/v1/messages",
        json={
            "user": REP,
            "from_name": "Rép Rep",
            "to": ["bob@customer.test"],
            "cc": ["carol@elsewhere.test"],
            "bcc": ["boss@example.test"],
            "subject": "Quote for Q4",
            "text": "Hello Bob,\nthe quote is attached.\n",
            "html": "<p>Hello Bob,</p><p>the quote is attached.</p>",
            "attachments": [
                {
                    "filename": "quote.pdf",
                    "content_type": "application/pdf",
                    "content_base64": base64.b64encode(b"%PDF-1.4 quote").decode(),
                }
            ],
            "in_reply_to": "<question-1@customer.test>",
            "references": ["<question-0@customer.test>"],
        },
    )
    assert sent.status_code == 202, sent.text
    answer = sent.json()
    assert answer["from"] == mailbox and answer["account_id"] == account
    assert answer["recipients"] == 3 and answer["message_id"].endswith("@example.test>")

    relayed = sink.wait_for_rcpt("bob@customer.test", timeout=15)
    assert sorted(relayed.rcpt_tos) == sorted(
        ["bob@customer.test", "carol@elsewhere.test", "boss@example.test"]
    )
    assert relayed.mail_from == mailbox
    upstream = email.message_from_bytes(relayed.data, policy=policy.default)
    assert upstream["Bcc"] is None and b"boss@example.test" not in relayed.data
    assert upstream["From"].addresses[0].display_name == "Rép Rep"
    assert upstream["Message-ID"] == answer["message_id"]
    assert upstream["In-Reply-To"] == "<question-1@customer.test>"
    assert upstream["References"] == "<question-0@customer.test> <question-1@customer.test>"
    attachment = next(upstream.iter_attachments())
    assert attachment.get_filename() == "quote.pdf"
    assert attachment.get_content() == b"%PDF-1.4 quote"

    copies = poll(
        lambda: _sent_folder(dovecot, ca, mailbox, password) or None, what="the Sent copy"
    )
    assert len(copies) == 1
    flags, copy = copies[0]
    assert b"\\Seen" in flags
    assert copy["Message-ID"] == answer["message_id"] and copy["Bcc"] == "boss@example.test"

    # Logged back once under the mailbox's account, even after the sync has read the Sent copy.
    mid = answer["message_id"].strip("<>")
    poll(
        lambda: any(
            r["source"] == "imap" and r["state"] == "done" for r in _queue_rows(gateway, mid)
        ),
        timeout=30,
        what="the sync reading the Sent copy",
    )
    emails = poll(lambda: crm_server.emails() or None, what="the email in the CRM")
    assert len(emails) == 1
    logged = emails[0]
    assert logged["subject"] == "Quote for Q4" and logged["direction"] == "outbound"
    assert {a["account_id"] for a in logged["accounts"]} == {account}
    api_row = next(r for r in _queue_rows(gateway, mid) if r["source"] == "api")
    assert api_row["state"] == "done"
    assert "append-sent" in (
        json.loads(api_row["steps_done"])
        if isinstance(api_row["steps_done"], str)
        else api_row["steps_done"]
    )

    # One-way: incoming mail is not synced, but mail sent from the CRM still goes to Sent.
    changed = api.patch(f"/api/v1/accounts/{account}", json={"sync_mode": "one_way"})
    assert changed.status_code == 200, changed.text
    again = api.post(
        "/api/v1/messages",
        json={"account": account, "to": ["bob@customer.test"], "subject": "one-way", "text": "x"},
    )
    assert again.status_code == 202, again.text
    poll(
        lambda: len(_sent_folder(dovecot, ca, mailbox, password)) == 2,
        what="the second Sent copy",
    )
    subjects = {
        e["subject"]
        for e in poll(
            lambda: crm_server.emails() if len(crm_server.emails()) == 2 else None,
            what="the second email",
        )
    }
    assert subjects == {"Quote for Q4", "one-way"}


def test_a_rep_without_a_mailbox_sends_as_themselves(
    gateway: RunningGateway, crm_server: Crm, sink: Any
) -> None:
    api = _client(gateway)
    crm_server.add_contact("dana@customer.test")
    sent = api.post(
        "/api/v1/messages",
        json={"user": REP, "to": ["dana@customer.test"], "subject": "hi", "html": "<b>hi</b>"},
    )
    assert sent.status_code == 202, sent.text
    assert sent.json()["from"] == REP and sent.json()["account_id"] is None
    relayed = sink.wait_for_rcpt("dana@customer.test", timeout=15)
    assert relayed.mail_from == REP
    assert email.message_from_bytes(relayed.data)["Content-Type"].startswith("text/html")
    emails = poll(lambda: crm_server.emails() or None, what="the email in the CRM")
    assert {a["account_id"] for a in emails[0]["accounts"]} == {f"user:{REP}"}


def test_refusals_are_4xx_with_a_sentence_and_queue_nothing(
    gateway: RunningGateway, sink: Any
) -> None:
    api = _client(gateway)
    base = {"user": REP, "to": ["x@customer.test"], "subject": "s", "text": "t"}
    cases: list[tuple[dict[str, Any], int, str]] = [
        ({**base, "user": None}, 400, "exactly one of"),
        ({**base, "account": "acct_nope"}, 400, "exactly one of"),
        ({**base, "user": None, "account": "acct_nope"}, 404, "no account acct_nope"),
        ({**base, "user": "nobody@example.test"}, 404, "no user nobody@example.test"),
        ({**base, "to": []}, 400, "no recipients"),
        ({**base, "to": ["not an address"]}, 422, "is not an e-mail address"),
        ({**base, "subject": "a\r\nBcc: evil@x.test"}, 422, "subject"),
        ({**base, "from_name": "x\nTo: y@z.test"}, 422, "from_name"),
        ({**base, "in_reply_to": "no brackets or at"}, 422, "in_reply_to"),
        ({**base, "surprise": 1}, 422, "surprise"),
        (
            {**base, "attachments": [{"filename": "a.bin", "content_base64": "!!!"}]},
            422,
            "not base64",
        ),
        (
            {
                **base,
                "attachments": [
                    {
                        "filename": "big.bin",
                        "content_base64": base64.b64encode(b"x" * 300_000).decode(),
                    }
                ],
            },
            413,
            "the limit is 200,000",
        ),
    ]
    for body, status, words in cases:
        answer = api.post("/api/v1/messages", json=body)
        assert answer.status_code == status, (body, answer.text)
        assert words in answer.json()["detail"], (body, answer.text)
    unauthenticated = httpx.post(f"{gateway.api}/api/v1/messages", json=base)
    assert unauthenticated.status_code == 401
    engine = make_engine(gateway.settings.database.url)
    with engine.connect() as connection:
        queued = connection.execute(text("SELECT count(*) FROM message")).scalar_one()
    engine.dispose()
    assert queued == 0 and sink.messages == []


def test_mail_from_a_mailbox_with_smtp_leaves_through_its_own_server(
    gateway: RunningGateway,
    crm_server: Crm,
    sink: Any,
    dovecot: DovecotServer,
    ca: TestCA,
    postfix_auth: PostfixRelay,
) -> None:
    api = _client(gateway)
    crm_server.add_contact("erin@customer.test")
    # The mailbox's own submission server: Postfix relaying only after AUTH as this user.
    mailbox, password, account = connect_mailbox(
        api,
        dovecot,
        "smtp",
        smtp_host="localhost",
        smtp_port=postfix_auth.port,
        smtp_security="starttls",
        kind="shared",
    )
    sent = api.post(
        "/api/v1/messages",
        json={"account": account, "to": ["erin@customer.test"], "subject": "own", "text": "x"},
    )
    assert sent.status_code == 202, sent.text
    assert sent.json()["route"] == "account"
    relayed = postfix_auth.sink.wait_for_rcpt("erin@customer.test", timeout=30)
    assert relayed.mail_from == mailbox
    assert email.message_from_bytes(relayed.data)["Subject"] == "own"
    assert not [m for m in sink.messages if "erin@customer.test" in m.rcpt_tos]
    poll(lambda: _sent_folder(dovecot, ca, mailbox, password) or None, what="the Sent copy")
    emails = poll(lambda: crm_server.emails() or None, what="the email in the CRM")
    assert {a["account_id"] for a in emails[0]["accounts"]} == {account}


def test_providers_that_file_smtp_mail_in_sent_get_no_second_copy() -> None:
    from gateway.imap.presets import load_providers
    from gateway.outgoing import Sender, queue_meta

    saves = frozenset(k for k, p in load_providers().items() if p.saves_sent)
    assert {"gmail", "microsoft365", "outlook"} <= saves
    ref = {"id": "acct_1", "owner": REP}

    def meta(via: bool, provider: str) -> dict[str, Any]:
        sender = Sender("a@x.test", REP, ref, frozenset(), via_account=via, provider=provider)
        return queue_meta(sender, bcc=["b@x.test"], saves_sent=saves, requested_by="admin")

    assert "sent_copy" not in meta(True, "gmail") and meta(True, "gmail")["via_account"]
    assert meta(False, "gmail")["sent_copy"] == {"account_id": "acct_1", "bcc": ["b@x.test"]}
    assert "sent_copy" in meta(True, "custom") and "via_account" not in meta(False, "custom")


def test_submitted_mail_of_a_rep_with_a_primary_mailbox_is_logged_under_it(
    gateway: RunningGateway, crm_server: Crm, sink: Any, dovecot: DovecotServer, ca: TestCA
) -> None:
    api = _client(gateway)
    crm_server.add_contact("fay@customer.test")
    _mailbox, _password, account = connect_mailbox(
        api, dovecot, "primary", owner=REP, primary=True, sharing="private"
    )
    with smtplib.SMTP("127.0.0.1", gateway.port, timeout=30) as client:
        client.starttls(context=ca.client_context())
        client.login(REP, REP_PASSWORD)
        client.sendmail(
            REP,
            ["fay@customer.test"],
            f"From: {REP}\r\nTo: fay@customer.test\r\nSubject: submitted\r\n\r\nhi\r\n".encode(),
        )
    sink.wait_for_rcpt("fay@customer.test", timeout=15)
    emails = poll(lambda: crm_server.emails() or None, what="the email in the CRM")
    assert [(a["account_id"], a["sharing"]) for a in emails[0]["accounts"]] == [
        (account, "private")
    ]


def test_a_repeated_request_with_the_same_message_id_is_not_sent_twice(
    gateway: RunningGateway, sink: Any
) -> None:
    api = _client(gateway)
    body = {
        "user": REP,
        "to": ["jo@customer.test"],
        "subject": "once",
        "text": "x",
        "message_id": "<crm-42@example.test>",
    }
    first = api.post("/api/v1/messages", json=body)
    assert first.status_code == 202, first.text
    assert first.json()["repeated"] is False
    again = api.post("/api/v1/messages", json=body)  # the CRM retrying after a timeout
    assert again.status_code == 200, again.text
    assert again.json()["repeated"] is True and again.json()["id"] == first.json()["id"]
    relayed = sink.wait_for_rcpt("jo@customer.test", timeout=15)
    assert email.message_from_bytes(relayed.data)["Message-ID"] == "<crm-42@example.test>"
    assert len(_queue_rows(gateway, "crm-42@example.test")) == 1
    # Another message reusing that Message-ID is refused, not taken for a repeat and dropped.
    other = api.post("/api/v1/messages", json={**body, "to": ["kim@customer.test"]})
    assert other.status_code == 409, other.text
    assert "already used for a different message" in other.json()["detail"]
    assert len(_queue_rows(gateway, "crm-42@example.test")) == 1
