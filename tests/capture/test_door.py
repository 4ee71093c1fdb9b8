"""The capture door with real SMTP clients: what it takes, what it refuses, and what it logs.

Each test starts the door (on a free port, with its own database and the session's NSD) and
talks to it with smtplib; accepted messages are then claimed from the store and put through
``identify-owner`` and ``unwrap-forward``, whose Sighting is what the CRM would get.
"""

from __future__ import annotations

import smtplib
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import Session

from gateway import users
from gateway.capture import quarantine
from gateway.capture.steps import IdentifyOwner, UnwrapForward
from gateway.dkim import DkimKey
from gateway.metrics import Metrics
from gateway.settings import RelaySettings, WorkerSettings
from gateway.sighting import Sighting
from gateway.store.db import make_engine
from gateway.store.models import Source
from gateway.store.queue import QueuedMessage
from gateway.worker import Worker
from tests.capture.conftest import CAPTURE_DOMAIN, OTHER_REP, REP, REP_ALIAS, RunningDoor, sign
from tests.servers.ports import free_port

FORWARDS = Path(__file__).parent / "data" / "forwards"
LOG = f"log@{CAPTURE_DOMAIN}"
BCC = (
    b"From: Rita Rep <rita@company.test>\r\nTo: Carla <carla@customer.test>\r\n"
    b"Cc: Bob <bob@customer.test>\r\nSubject: Offer\r\n"
    b"Date: Mon, 8 Jan 2024 10:00:00 +0000\r\nMessage-ID: <offer-1@company.test>\r\n"
    b"Authentication-Results: gw.example.test; dkim=pass header.d=company.test (forged)\r\n"
    b"\r\nHello Carla,\r\nhere is our offer.\r\n"
)


def send(
    door: RunningDoor, raw: bytes, *, rcpt: str = LOG, sender: str = "rita@company.test"
) -> Any:
    """DATA's reply (code, text); raises SMTPRecipientsRefused like smtplib does."""
    with smtplib.SMTP("127.0.0.1", door.port, timeout=30) as client:
        client.ehlo("mail.company.test")
        code, text = client.mail(sender)
        assert code == 250, text
        code, text = client.rcpt(rcpt)
        if code != 250:
            return code, text
        return client.data(raw)


def queued_id(reply: tuple[int, bytes]) -> str:
    code, text = reply
    assert code == 250, text
    return text.decode().rsplit(" ", 1)[1]


class Recorder:
    """Stands where the hooks' match-contacts and emit will: keeps the sighting it gets."""

    name = "record-sighting"
    durable = False

    def __init__(self) -> None:
        self.sightings: list[Sighting] = []

    async def __call__(self, item: QueuedMessage) -> None:
        assert isinstance(item.sighting, Sighting)
        self.sightings.append(item.sighting)


def process(door: RunningDoor, message_id: str, *, on_unverified: str = "reject") -> dict[str, Any]:
    """Run the capture pipeline on the message with the real worker; its row afterwards, with
    the sighting (or None) under ``"sighting"``."""
    settings = door.settings.capture.model_copy(update={"on_unverified": on_unverified})
    recorder = Recorder()
    pipeline = (
        IdentifyOwner(store=door.store, settings=settings),
        UnwrapForward(settings=settings),
        recorder,
    )
    worker = Worker(
        store=door.store,
        pipelines={Source.CAPTURE.value: pipeline},
        settings=WorkerSettings(),
        relay_settings=RelaySettings(),
        hostname="gw.example.test",
        metrics=Metrics(),
    )
    door.call(worker.process(door.claim(message_id)))
    row = door.call(door.store.get_message(message_id))
    assert row is not None
    row["sighting"] = recorder.sightings[0] if recorder.sightings else None
    return row  # type: ignore[no-any-return]


def logged(door: RunningDoor, message_id: str, **kw: Any) -> Sighting:
    row = process(door, message_id, **kw)
    assert row["state"] == "done", row["last_error"]
    assert isinstance(row["sighting"], Sighting)
    return row["sighting"]  # type: ignore[no-any-return]


def dropped(door: RunningDoor, message_id: str, **kw: Any) -> str:
    row = process(door, message_id, **kw)
    assert row["state"] == "discarded"
    assert row["sighting"] is None
    return str(row["last_error"])


def test_only_capture_addresses_are_taken(door_factory: Any) -> None:
    door, secret = door_factory()
    with smtplib.SMTP("127.0.0.1", door.port, timeout=30) as client:
        code, features = client.ehlo("mail.example.net")
        assert code == 250
        assert b"AUTH" not in features  # nobody logs in here
        client.mail("someone@example.net")
        for address in (
            "someone@example.net",
            f"log@other.{CAPTURE_DOMAIN}",
            f"sales@{CAPTURE_DOMAIN}",
            f"log+{'a' * 24}@{CAPTURE_DOMAIN}",
            "@relay.test:log@crm.test",
        ):
            code, text = client.rcpt(address)
            assert code in (550, 553), (address, text)
        code, text = client.rcpt(f"NOBODY@{CAPTURE_DOMAIN}")
        assert (code, text[:9]) == (550, b"5.1.1 No ")
        assert client.rcpt(f"LOG@{CAPTURE_DOMAIN.upper()}")[0] == 250
        assert client.rcpt(secret[REP])[0] == 250
        code, text = client.docmd("AUTH", "PLAIN AGFiYwBkZWY=")
        assert code >= 500


def test_bcc_with_aligned_dkim_is_logged_as_the_rep(door_factory: Any, rep_key: DkimKey) -> None:
    door, _ = door_factory()
    signed = sign(BCC, rep_key)  # once: a second signature would carry another t= second
    message_id = queued_id(send(door, signed))
    assert door.accepted == [message_id]
    stored = door.call(door.store.get_message(message_id, with_raw=True))
    assert stored["raw"] == signed  # the bytes as received, nothing added
    assert stored["meta"]["authentication"]["aligned"] == ["dkim"]
    assert stored["meta"]["capture"]["owner"] == REP
    sighting = logged(door, message_id)
    assert sighting.account.owner == REP
    assert sighting.account.id == f"capture:{REP}"
    assert sighting.direction == "outbound"
    assert sighting.source == "capture"
    assert sighting.authentication == {
        "spf": "fail",
        "dkim": "pass",
        "dmarc": "pass",
        "arc": "none",
    }
    assert sighting.own_addresses == {REP, REP_ALIAS}
    # Our Authentication-Results on top; the forged one claiming our name is gone.
    assert sighting.raw.startswith(b"Authentication-Results: gw.example.test;\r\n\tspf=fail")
    assert b"(forged)" not in sighting.raw


@pytest.mark.parametrize(
    ("raw", "reply"),
    [
        (
            b"From: a@company.test\r\nFrom: rita@company.test\r\n\r\nx\r\n",
            b"5.7.1 Message refused: it has more than one From",
        ),
        (
            b"From: rita@company.test, otto@company.test\r\n\r\nx\r\n",
            b"5.7.1 Message refused: its From header names more",
        ),
        (b"To: log@crm.test\r\n\r\nno From\r\n", b"5.7.1 Message refused: it has no From"),
        (
            b'From: "rita@company.test" <mallory@evil.test>\r\n\r\nx\r\n',
            b"5.7.1 Message refused: the From address is not a user",
        ),
        (
            b"From: rita@company.test <mallory@evil.test>\r\n\r\nx\r\n",
            b"5.7.1 Message refused: its From header names more",
        ),
        (
            b"From: Rita <rita@company.test>\r\nSubject: unsigned\r\n\r\nx\r\n",
            b"5.7.1 Message refused: nothing proves",
        ),
        (b"From: rita@company.test\r\n\r\nbare\nLF\r\n", b"5.6.0 Message rejected: bare CR or LF"),
    ],
    ids=[
        "two-from",
        "two-addresses",
        "no-from",
        "display-name",
        "unquoted-display-name",
        "spoofed",
        "bare-lf",
    ],
)
def test_spoofing_is_refused_at_data(door_factory: Any, raw: bytes, reply: bytes) -> None:
    door, _ = door_factory()
    code, text = send(door, raw)
    assert code == 550
    assert text.startswith(reply), text
    assert door.accepted == []


def test_unaligned_signature_is_refused(
    door_factory: Any, capture_dns: Any, tmp_path: Path
) -> None:
    from gateway.dkim import generate_key
    from tests.servers.dns import txt_record

    evil = generate_key(tmp_path / "k", "evil.test", selector="e2")
    capture_dns.publish(
        "evil.test",
        [txt_record("e2._domainkey", evil.record_value), '@ IN TXT "v=spf1 ip4:127.0.0.1 -all"'],
    )
    door, _ = door_factory()
    code, text = send(door, sign(BCC, evil), sender="bounce@evil.test")
    assert (code, text[:27]) == (550, b"5.7.1 Message refused: noth")


def test_secret_address_proves_the_rep_without_dkim(door_factory: Any) -> None:
    door, secret = door_factory()
    raw = BCC.replace(b"rita@company.test", b"rita.private@mail.example.net")
    message_id = queued_id(
        send(door, raw, rcpt=secret[REP], sender="rita.private@mail.example.net")
    )
    sighting = logged(door, message_id)
    assert sighting.account.owner == REP
    stored = door.call(door.store.get_message(message_id))
    assert stored["meta"]["capture"]["via"] == "token"


def test_rotated_secret_address_stops_working(door_factory: Any) -> None:
    from gateway.capture.directory import capture_address

    door, secret = door_factory()
    engine = make_engine(door.settings.database.url)
    with Session(engine) as session:
        new = capture_address(session, email=REP, settings=door.settings.capture, rotate=True)
        session.commit()
    engine.dispose()
    assert new != secret[REP]
    with smtplib.SMTP("127.0.0.1", door.port, timeout=30) as client:
        client.ehlo("x.example.net")
        client.mail("someone@example.net")
        assert client.rcpt(secret[REP])[0] == 550
        assert client.rcpt(new)[0] == 250


def test_dns_failure_is_a_temporary_refusal(tmp_path: Path, company_zone: Any) -> None:
    from tests.capture.conftest import add_reps, capture_settings

    settings = capture_settings(tmp_path, company_zone)
    # A name server where nothing answers: every lookup times out.
    settings = settings.model_copy(
        update={
            "dns": settings.dns.model_copy(update={"port": free_port(), "timeout_seconds": 0.3})
        }
    )
    add_reps(settings.database.url, settings)
    door = RunningDoor(settings).start()
    try:
        code, text = send(door, BCC)
        assert (code, text[:6]) == (451, b"4.4.3 ")
        assert door.accepted == []
    finally:
        door.stop()


def test_servfail_for_the_key_is_a_temporary_refusal(
    door_factory: Any, capture_dns: Any, rep_key: DkimKey
) -> None:
    status, output = capture_dns._control("addzone", "broken.test", "test")
    assert status == 0, output
    door, _ = door_factory()
    engine = make_engine(door.settings.database.url)
    with Session(engine) as session:
        users.add_address(
            session, user=users.get_user(session, OTHER_REP), address="otto@broken.test"
        )
        session.commit()
    engine.dispose()
    raw = BCC.replace(b"rita@company.test", b"otto@broken.test")
    code, text = send(door, raw, sender="otto@broken.test")
    assert (code, text[:6]) == (451, b"4.4.3 ")


@pytest.mark.parametrize(
    ("fixture", "sender", "direction", "subject"),
    [
        ("gmail.eml", "carla@customer.test", "inbound", "Pricing for 2024"),
        ("outlook.eml", "oscar@partner.test", "inbound", "Contract draft"),
        ("apple.eml", "quentin@customer.test", "inbound", "Order 4711"),
        ("attached.eml", "ines@customer.test", "inbound", "Invoice question"),
    ],
)
def test_forwards_log_the_original(
    door_factory: Any, rep_key: DkimKey, fixture: str, sender: str, direction: str, subject: str
) -> None:
    door, _ = door_factory()
    raw = (FORWARDS / fixture).read_bytes().replace(b"@crm.test", b"@" + CAPTURE_DOMAIN.encode())
    message_id = queued_id(send(door, sign(raw, rep_key), sender=REP))
    sighting = logged(door, message_id)
    original = sighting.raw.decode()
    assert sender in original.split("\r\n\r\n")[0].split("From: ", 1)[1].split("\r\n")[0]
    assert f"Subject: {subject}" in original
    assert sighting.direction == direction
    assert sighting.account.owner == REP
    assert sighting.authentication == {}  # nothing was checked about the original's author


def test_auto_replies_and_bounces_are_not_logged(door_factory: Any, rep_key: DkimKey) -> None:
    door, _ = door_factory()
    auto = BCC.replace(b"Subject: Offer", b"Subject: Out of office\r\nAuto-Submitted: auto-replied")
    message_id = queued_id(send(door, sign(auto, rep_key)))
    assert "Auto-Submitted: auto-replied" in dropped(door, message_id)
    bounce_id = queued_id(send(door, sign(BCC, rep_key), sender=""))
    assert "envelope sender is null" in dropped(door, bounce_id)


def test_quarantine_hold_release_and_delete(door_factory: Any) -> None:
    door, _ = door_factory(on_unverified="quarantine")
    unsigned = BCC.replace(b"Subject: Offer", b"Subject: Offer (sent via a list)")
    held_id = queued_id(send(door, unsigned))
    other_id = queued_id(send(door, BCC.replace(b"offer-1", b"offer-2")))
    for message_id in (held_id, other_id):
        reason = dropped(door, message_id, on_unverified="quarantine")
        assert reason.startswith("quarantined: no SPF or DKIM pass aligned with company.test")
    listed = door.call(quarantine.held(door.store))
    assert [row["id"] for row in listed] == [held_id, other_id]
    assert listed[0]["claimed_owner"] == REP
    assert listed[0]["subject"] == "Offer (sent via a list)"
    woken: list[str] = []
    owner = door.call(
        quarantine.release(door.store, held_id, admin="admin@company.test", wake=woken.append)
    )
    assert (owner, woken) == (REP, [held_id])
    sighting = logged(door, held_id, on_unverified="quarantine")
    assert sighting.account.owner == REP
    door.call(quarantine.delete(door.store, other_id))
    assert door.call(door.store.get_message(other_id)) is None
    assert door.call(quarantine.held(door.store)) == []
    with pytest.raises(quarantine.QuarantineError, match="no quarantined message"):
        door.call(quarantine.delete(door.store, held_id))


def test_step_recheck_drops_a_user_disabled_since(door_factory: Any, rep_key: DkimKey) -> None:
    door, _ = door_factory()
    message_id = queued_id(send(door, sign(BCC, rep_key)))
    engine = make_engine(door.settings.database.url)
    with Session(engine) as session:
        users.set_disabled(session, email=REP, disabled=True)
        session.commit()
    engine.dispose()
    assert "not a user" in dropped(door, message_id)
