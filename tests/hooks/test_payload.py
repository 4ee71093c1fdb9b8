"""Payloads built from hostile mail stay valid JSON and valid for the CRM's published models."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from crm_api import events as crm_events
from gateway.sighting import AccountRef, Sighting
from hooks.events import MODELS, envelope, json_schema
from hooks.payload import build_email_logged

CORPUS = Path(__file__).resolve().parents[3] / "shared" / "corpora" / "flanker" / "messages"
ACCOUNT = AccountRef(
    id="user:rep@example.test",
    owner="rep@example.test",
    sharing="custom",
    selected_contacts=("bob@customer.test",),
)


def build(raw: bytes, **kw: object) -> dict[str, object]:
    sighting = Sighting(
        raw=raw,
        account=ACCOUNT,
        direction="outbound",
        source="submission",
        matched=["bob@customer.test"],
    )
    options = {
        "message_row_id": "m1",
        "arrived": 0.0,
        "max_body": 1000,
        "public_url": "http://gw.test",
        "link_secret": "k",
        "link_lifetime": 60,
    }
    options.update(kw)
    return build_email_logged(sighting, **options)  # type: ignore[arg-type]


def roundtrip(data: dict[str, object]) -> dict[str, object]:
    body = envelope("email.logged", data, at=datetime.now(UTC))
    body.encode("ascii")  # 7-bit JSON: nothing can break on the wire
    parsed = json.loads(body)
    crm_events.EmailLoggedEnvelope.model_validate(parsed)  # the CRM accepts it as it is
    result: dict[str, object] = parsed["data"]
    return result


HOSTILE = (
    b'From: "Evil \xff\xfe Name" <bob@customer.test>\r\n'
    b"To: rep@example.test\r\n"
    b"Subject: =?utf-8?b?" + b"8J+Ygg==" + b"?= nul\x00byte and \xed\xa0\x80 surrogate\r\n"
    b"X-Long: " + b"a" * 50_000 + b"\r\n"
    b"Message-ID: <odd@example.test>\r\n"
    b"Content-Type: text/plain; charset=x-unknown-charset\r\n"
    b"\r\n" + b"body \x00 with NUL and \xc3\x28 invalid utf-8 " + b"z" * 5000 + b"\r\n"
)


def test_hostile_mail_makes_valid_json_and_truncates_with_a_flag() -> None:
    data = roundtrip(build(HOSTILE))
    assert data["message_id"] == "odd@example.test"
    assert "\x00" not in str(data["subject"])
    assert str(data["subject"]).startswith("\U0001f602")
    assert data["body_truncated"] is True
    assert 996 < len(str(data["text_body"]).encode()) <= 1000
    assert "\x00" not in str(data["text_body"])
    assert data["account"]["sharing"] == "custom"  # type: ignore[index]
    assert data["matched_contacts"] == ["bob@customer.test"]


def test_missing_message_id_gets_a_stable_content_hash() -> None:
    raw = b"From: bob@customer.test\r\nSubject: x\r\n\r\nhello\r\n"
    first = roundtrip(build(raw))
    assert str(first["message_id"]).startswith("sha256:")
    assert first["message_id"] == roundtrip(build(raw))["message_id"]


@pytest.mark.parametrize("name", sorted(p.name for p in CORPUS.glob("*.eml")))
def test_every_corpus_message_is_accepted_by_the_crm_model(name: str) -> None:
    raw = (CORPUS / name).read_bytes()
    data = roundtrip(build(raw, max_body=256 * 1024))
    assert data["from"]
    datetime.fromisoformat(str(data["date"]))


def test_every_event_model_is_accepted_by_the_crm() -> None:
    samples = {
        "email.deleted": {"message_id": "a@b", "account_id": "imap:1"},
        "email.archived": {"message_id": "a@b", "account_id": "imap:1"},
        "account.status_changed": {
            "account_id": "imap:1",
            "status": "auth_failed",
            "detail": "wrong password",
        },
        "sync.completed": {
            "account_id": "imap:1",
            "folder": "INBOX",
            "fetched": 10,
            "logged": 2,
            "started_at": "2026-01-01T00:00:00+00:00",
            "finished_at": "2026-01-01T00:01:00+00:00",
        },
    }
    crm_models = {
        "email.deleted": crm_events.EmailStatus,
        "email.archived": crm_events.EmailStatus,
        "account.status_changed": crm_events.AccountStatusChanged,
        "sync.completed": crm_events.SyncCompleted,
    }
    for event_type, data in samples.items():
        body = json.loads(envelope(event_type, data, at=datetime.now(UTC)))
        crm_models[event_type].model_validate(body["data"])
    assert set(MODELS) == set(crm_events.EVENT_TYPES)
    schema = json_schema()
    assert {s["properties"]["type"]["const"] for s in schema["oneOf"]} == set(MODELS)
    with pytest.raises(ValueError, match="account_id"):
        envelope("email.deleted", {"message_id": "a@b"}, at=datetime.now(UTC))
