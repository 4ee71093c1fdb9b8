"""Mail submitted through the gateway reaches the real CRM once, linked to the right contacts,
through a CRM outage and a replay."""

from __future__ import annotations

import smtplib
from typing import Any

import httpx

from tests.gateway.conftest import REP, REP_PASSWORD, RunningGateway
from tests.hooks.conftest import Crm, poll


def submit(
    gateway: RunningGateway, ca: Any, *, to: list[str], subject: str, extra: str = ""
) -> None:
    with smtplib.SMTP("127.0.0.1", gateway.port, timeout=30) as client:
        client.starttls(context=ca.client_context())
        client.login(REP, REP_PASSWORD)
        headers = f"From: Rep <{REP}>\r\nTo: {', '.join(to)}\r\nSubject: {subject}\r\n{extra}"
        client.sendmail(REP, to, f"{headers}\r\nHello\r\n".encode())


def test_submitted_mail_is_logged_once_and_linked_to_contacts(
    hooked_gateway: RunningGateway, crm_server: Crm, ca: Any, sink: Any
) -> None:
    contact = crm_server.add_contact("bob@customer.test", "Bob")
    submit(
        hooked_gateway,
        ca,
        to=["bob@customer.test", "stranger@elsewhere.test"],
        subject="offer for Bob",
    )
    submit(hooked_gateway, ca, to=["stranger@elsewhere.test"], subject="not a contact")
    sink.wait_for(2, timeout=15)  # both were relayed, whatever the CRM does
    emails = poll(lambda: crm_server.emails(), what="the email in the CRM")
    events = httpx.get(
        f"{hooked_gateway.api}/api/v1/webhooks",
        headers={"Authorization": f"Bearer {hooked_gateway.token}"},
    ).json()  # type: ignore[attr-defined]
    assert len(events["events"]) == 1  # the mail to no contact made no event at all
    poll(lambda: _delivered(hooked_gateway), what="delivery recorded")
    assert [e["subject"] for e in emails] == ["offer for Bob"]
    email = emails[0]
    assert email["direction"] == "outbound"
    assert email["source"] == "submission"
    assert contact in email["contact_ids"]
    assert email["accounts"][0]["account_id"] == f"user:{REP}"


def _delivered(gateway: RunningGateway) -> bool:
    events = httpx.get(
        f"{gateway.api}/api/v1/webhooks", headers={"Authorization": f"Bearer {gateway.token}"}
    ).json()  # type: ignore[attr-defined]
    return all(e["deliveries"] == {"delivered": 1} for e in events["events"])


def test_crm_outage_then_every_event_arrives_once(
    hooked_gateway: RunningGateway, crm_server: Crm, ca: Any, sink: Any
) -> None:
    crm_server.add_contact("carol@customer.test")
    crm_server.server.kill()
    subjects = [f"while the CRM was down {n}" for n in range(5)]
    for subject in subjects:
        submit(hooked_gateway, ca, to=["carol@customer.test"], subject=subject)
    sink.wait_for(5, timeout=15)  # relaying does not wait for the CRM
    crm_server.server.start()
    emails = poll(
        lambda: (e := crm_server.emails()) and len(e) >= 5 and e, timeout=30, what="all five emails"
    )
    assert sorted(e["subject"] for e in emails) == sorted(subjects)
    poll(lambda: _delivered(hooked_gateway), what="every delivery recorded")


def test_raw_and_attachment_links(hooked_gateway: RunningGateway, crm_server: Crm, ca: Any) -> None:
    crm_server.add_contact("dan@customer.test")
    boundary = "b0undary"
    extra = f"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary={boundary}\r\n"
    body = (
        f"--{boundary}\r\nContent-Type: text/plain\r\n\r\nsee attached\r\n"
        f"--{boundary}\r\nContent-Type: application/pdf\r\n"
        'Content-Disposition: attachment; filename="quote.pdf"\r\n'
        "Content-Transfer-Encoding: base64\r\n\r\nJVBERi0xLjQK\r\n"
        f"--{boundary}--\r\n"
    )
    with smtplib.SMTP("127.0.0.1", hooked_gateway.port, timeout=30) as client:
        client.starttls(context=ca.client_context())
        client.login(REP, REP_PASSWORD)
        client.sendmail(
            REP,
            ["dan@customer.test"],
            (
                f"From: {REP}\r\nTo: dan@customer.test\r\nSubject: quote\r\n{extra}\r\n" + body
            ).encode(),
        )
    token = {"Authorization": f"Bearer {hooked_gateway.token}"}  # type: ignore[attr-defined]
    event_id = poll(
        lambda: httpx.get(f"{hooked_gateway.api}/api/v1/webhooks", headers=token).json()["events"],
        what="an event",
    )[0]["id"]
    payload = httpx.get(f"{hooked_gateway.api}/api/v1/webhooks/{event_id}", headers=token).json()[
        "payload"
    ]["data"]
    [attachment] = payload["attachments"]
    assert attachment["filename"] == "quote.pdf"
    assert attachment["size"] == 9
    fetched = httpx.get(attachment["url"])
    assert fetched.status_code == 200
    assert fetched.content == b"%PDF-1.4\n"
    raw = httpx.get(payload["raw_url"])
    assert raw.status_code == 200
    assert b"Subject: quote" in raw.content
    tampered = httpx.get(attachment["url"].replace("sig=", "sig=0"))
    assert tampered.status_code == 403
    assert "expired" in tampered.json()["detail"]
    path = attachment["url"].split("?")[0]
    assert httpx.get(path).status_code == 401
    assert httpx.get(path, headers=token).status_code == 200
    assert payload["text_body"].strip() == "see attached"


def test_replay_of_a_delivered_event_is_stored_once(
    hooked_gateway: RunningGateway, crm_server: Crm, ca: Any
) -> None:
    crm_server.add_contact("erin@customer.test")
    submit(hooked_gateway, ca, to=["erin@customer.test"], subject="replayed")
    poll(lambda: crm_server.emails(), what="the email")
    poll(lambda: _delivered(hooked_gateway), what="delivered")
    token = {"Authorization": f"Bearer {hooked_gateway.token}"}  # type: ignore[attr-defined]
    [event] = httpx.get(f"{hooked_gateway.api}/api/v1/webhooks", headers=token).json()["events"]
    replayed = httpx.post(
        f"{hooked_gateway.api}/api/v1/webhooks/{event['id']}/replay", headers=token
    )
    assert replayed.json() == {"id": event["id"], "requeued": 1}
    poll(lambda: _delivered(hooked_gateway), what="delivered again")
    shown = httpx.get(f"{hooked_gateway.api}/api/v1/webhooks/{event['id']}", headers=token).json()
    assert shown["deliveries"][0]["attempts"] == 1  # counted afresh after the replay
    assert len(crm_server.emails()) == 1
