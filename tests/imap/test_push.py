"""Server push: a Dovecot with the push_notification ``ox`` driver tells the gateway of new mail
at delivery, so the mailbox is synced at once rather than after Dovecot's IDLE delay. The gateway
registers itself by METADATA on connect; the push route refuses strangers."""

from __future__ import annotations

import re
import smtplib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.gateway.conftest import RunningGateway
from tests.hooks import conftest as hooks_fixtures
from tests.hooks.conftest import Crm, poll
from tests.imap.conftest import start_gateway
from tests.imap.test_send import _queue_rows
from tests.servers.certs import TestCA
from tests.servers.dovecot import DovecotServer
from tests.servers.ports import free_port

PUSH_SECRET = "push-secret-for-tests"

# The bundled CRM under uvicorn, as the hooks tests use it.
crm_server = hooks_fixtures.crm_server


@pytest.fixture
def pushed(
    tmp_path: Path, ca: TestCA, sink: Any, crm_server: Crm
) -> Iterator[tuple[RunningGateway, DovecotServer]]:
    api_port = free_port()
    url = f"http://dovecot:{PUSH_SECRET}@127.0.0.1:{api_port}/api/v1/imap/push"
    dovecot = DovecotServer(push_url=url).start()
    # Polling far away: only IDLE or the push can bring news.
    gateway = start_gateway(
        tmp_path,
        ca,
        sink,
        crm_server,
        api_port=api_port,
        push_secret=PUSH_SECRET,
        poll_interval_seconds=600,
    )
    try:
        yield gateway, dovecot
    finally:
        gateway.stop()
        dovecot.cleanup()


def _pushes(gateway: RunningGateway, result: str) -> float:
    metrics = httpx.get(f"{gateway.api}/metrics").text
    found = re.search(rf'^mailgate_imap_pushes_total{{result="{result}"}} (\S+)$', metrics, re.M)
    return float(found.group(1)) if found else 0.0


def test_delivery_is_pushed_and_synced(
    pushed: tuple[RunningGateway, DovecotServer], crm_server: Crm
) -> None:
    gateway, dovecot = pushed
    crm_server.add_contact("carol@customer.test")
    user, password = dovecot.new_user("pushed")
    api = httpx.Client(
        base_url=gateway.api,
        headers={"Authorization": f"Bearer {gateway.token}"},  # type: ignore[attr-defined]
        timeout=30,
    )
    created = api.post(
        "/api/v1/accounts",
        json={
            "email": user,
            "password": password,
            "imap_host": "127.0.0.1",
            "imap_port": dovecot.port,
            "imap_security": "none",
            "kind": "shared",
            "folders": ["INBOX"],
        },
    )
    assert created.status_code == 201, created.text
    account = created.json()["id"]
    poll(
        lambda: api.get(f"/api/v1/accounts/{account}").json()["status"] == "live",
        timeout=30,
        what="live",
    )
    # The gateway registered itself for this mailbox's news (RFC 5464 server metadata).
    key = "/private/vendor/vendor.dovecot/http-notify"
    registered = dovecot.doveadm("mailbox", "metadata", "get", "-u", user, "-s", "", key)
    assert registered.strip() == f"user={account}"

    raw = (
        f"From: carol@customer.test\r\nTo: {user}\r\nSubject: pushed\r\n"
        "Message-ID: <pushed-1@customer.test>\r\n\r\nHello.\r\n"
    ).encode()
    with smtplib.LMTP(dovecot.host, dovecot.lmtp_port) as lmtp:
        lmtp.sendmail("carol@customer.test", [user], raw)
    poll(lambda: _pushes(gateway, "nudged") >= 1, what="Dovecot's push")
    poll(lambda: _queue_rows(gateway, "pushed-1@customer.test"), what="the pushed mail accepted")
    emails = poll(lambda: crm_server.emails() or None, what="the email in the CRM")
    assert [e["subject"] for e in emails] == ["pushed"]

    # Disconnecting withdraws the registration: the server stops pushing news of this mailbox.
    assert api.delete(f"/api/v1/accounts/{account}").status_code == 200
    assert not dovecot.doveadm("mailbox", "metadata", "get", "-u", user, "-s", "", key).strip()


def test_the_push_route_refuses_strangers_and_nonsense(
    pushed: tuple[RunningGateway, DovecotServer],
) -> None:
    gateway, _dovecot = pushed
    url = f"{gateway.api}/api/v1/imap/push"
    news = {"user": "acct_unknown", "folder": "INBOX", "event": "messageNew"}
    assert httpx.put(url, json=news).status_code == 401
    assert httpx.put(url, json=news, auth=("dovecot", "wrong")).status_code == 401
    assert httpx.put(url, json=news, headers={"Authorization": "Basic !!"}).status_code == 401
    bad = httpx.put(url, content=b"not json", auth=("dovecot", PUSH_SECRET))
    assert bad.status_code == 400 and "user" in bad.json()["detail"]
    unknown = httpx.put(url, json=news, auth=("dovecot", PUSH_SECRET))
    assert unknown.status_code == 202 and unknown.json() == {"nudged": 0}
    bearer = httpx.post(url, json=news, headers={"Authorization": f"Bearer {PUSH_SECRET}"})
    assert bearer.status_code == 202
    assert _pushes(gateway, "unknown") == 2
