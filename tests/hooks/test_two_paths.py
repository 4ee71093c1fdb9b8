"""Promise 4: an email that reaches the CRM by two paths (submitted through the gateway, then
BCC'd to the capture address) is one email in the CRM, with both account links."""

from __future__ import annotations

import smtplib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.gateway.conftest import REP, REP_PASSWORD, RunningGateway, add_users
from tests.hooks.conftest import Crm, hooked_settings, poll
from tests.servers.ports import free_port


@pytest.fixture
def gateway_with_capture(
    tmp_path: Path, ca: Any, sink: Any, crm_server: Crm
) -> Iterator[RunningGateway]:
    settings = hooked_settings(
        tmp_path,
        ca,
        sink,
        crm_server,
        capture={"enabled": True, "port": free_port(), "domain": "crm.example.test"},
    )
    gateway = RunningGateway(settings)
    gateway.token = add_users(settings.database.url)  # type: ignore[attr-defined]
    gateway.start()
    try:
        yield gateway
    finally:
        gateway.stop()


def test_submitted_then_bcced_is_one_email(
    gateway_with_capture: RunningGateway, crm_server: Crm, ca: Any, sink: Any
) -> None:
    gateway = gateway_with_capture
    crm_server.add_contact("bob@customer.test")
    message = (
        f"From: Rep <{REP}>\r\nTo: bob@customer.test\r\nSubject: two paths\r\n"
        "Message-ID: <two-paths-1@example.test>\r\n\r\nHello Bob\r\n"
    ).encode()
    with smtplib.SMTP("127.0.0.1", gateway.port, timeout=30) as client:
        client.starttls(context=ca.client_context())
        client.login(REP, REP_PASSWORD)
        client.sendmail(REP, ["bob@customer.test"], message)
    relayed = sink.wait_for_rcpt("bob@customer.test", timeout=15)
    poll(lambda: len(crm_server.emails()) == 1, what="the submitted email")

    token = {"Authorization": f"Bearer {gateway.token}"}  # type: ignore[attr-defined]
    secret = httpx.get(f"{gateway.api}/api/v1/capture/addresses/{REP}", headers=token)
    assert secret.status_code == 200, secret.text
    capture_address = secret.json()["address"]
    assert capture_address.endswith("@crm.example.test")
    # The rep's own client also BCCs the capture address: the same bytes arrive there.
    with smtplib.SMTP("127.0.0.1", gateway.settings.capture.port, timeout=30) as inbound:
        inbound.sendmail(REP, [capture_address], relayed.data)

    def linked_twice() -> list[dict[str, Any]] | None:
        emails = crm_server.emails()
        accounts = {a["account_id"] for e in emails for a in e["accounts"]}
        return emails if len(accounts) >= 2 else None

    emails = poll(linked_twice, timeout=20, what="the second account link")
    assert len(emails) == 1
    assert emails[0]["subject"] == "two paths"
    assert {a["account_id"] for a in emails[0]["accounts"]} == {f"user:{REP}", f"capture:{REP}"}
