"""The webhook receiver over HTTP: signatures (rotation, window, integer timestamps), storing each
event once and each Message-ID once, account links and status events, 400/401 (never 500) for
bad requests, threading, the timeline's order and contact auto-creation per policy."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from tests.crm_api.conftest import COMPANY, CRM, OLD_SECRET, email_data, unique


def emails_with(crm: CRM, subject: str) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = (
        crm.client("admin")
        .get("/api/v1/emails", params={"q": subject, "limit": 200})
        .json()["data"]
    )
    return found


def test_signed_event_is_stored_once_and_replays_are_acknowledged(crm: CRM) -> None:
    data = email_data(owner=crm.emails["ann"], to=[f"{unique('r')}@client.example"])
    webhook_id = unique("msg_")
    first = crm.webhook("email.logged", data, webhook_id=webhook_id)
    assert first.status_code == 200
    assert first.json() == {"status": "stored", "type": "email.logged"}
    again = crm.webhook("email.logged", data, webhook_id=webhook_id)
    assert again.status_code == 200
    assert again.json()["status"] == "duplicate"
    # Signed with the older of the two configured secrets (rotation): also accepted.
    rotated = crm.webhook("email.logged", data, webhook_id=webhook_id, secret=OLD_SECRET)
    assert rotated.json()["status"] == "duplicate"
    assert len(emails_with(crm, data["subject"])) == 1


def test_one_email_per_message_id_with_a_link_per_account(crm: CRM) -> None:
    contact = f"{unique('both')}@client.example"
    mid = f"<{unique('Shared')}@Client.Example>"
    sent = email_data(owner=crm.emails["ann"], to=[contact, crm.emails["bob"]], message_id=mid)
    crm.webhook("email.logged", sent)
    seen_by_bob = {
        **sent,
        "message_id": f"  {mid.lower()} ",
        "direction": "inbound",
        "account": {**sent["account"], "id": unique("bob-acct"), "owner": crm.emails["bob"]},
    }
    response = crm.webhook("email.logged", seen_by_bob)
    assert response.json()["status"] == "stored"  # a new event, but not a new email
    found = emails_with(crm, sent["subject"])
    assert len(found) == 1
    assert found[0]["message_id"] == mid.strip("<>").lower()
    assert sorted(a["owner"] for a in found[0]["accounts"]) == sorted(
        [crm.emails["ann"], crm.emails["bob"]]
    )


def test_every_field_is_kept(crm: CRM) -> None:
    data = email_data(
        owner=crm.emails["ann"],
        to=["To@Client.Example"],
        cc=["cc@client.example"],
        bcc=["bcc@client.example"],
        in_reply_to="<Parent@X>",
        references=["<A@x>"],
    )
    data["from"] = [{"name": "Ann A.", "address": crm.emails["ann"]}]
    data["body_truncated"] = True
    data["authentication"] = {"spf": "pass", "dkim": "fail", "dmarc": "none"}
    response = crm.webhook("email.logged", data)
    assert response.status_code == 200
    email = emails_with(crm, data["subject"])[0]
    assert email["from"] == [{"name": "Ann A.", "address": crm.emails["ann"], "contact_id": None}]
    assert [p["address"] for p in email["to"]] == ["to@client.example"]
    assert [p["address"] for p in email["cc"]] == ["cc@client.example"]
    assert [p["address"] for p in email["bcc"]] == ["bcc@client.example"]  # admin sees bcc
    assert email["in_reply_to"] == "parent@x" and email["references"] == ["a@x"]
    assert email["body_truncated"] is True and email["text_body"] == data["text_body"]
    assert email["html_body"] == data["html_body"] and email["raw_url"] == data["raw_url"]
    assert email["authentication"] == {"spf": "pass", "dkim": "fail", "dmarc": "none"}
    assert email["direction"] == "outbound" and email["source"] == "submission"
    assert email["attachments"][0]["url"] == data["attachments"][0]["url"]
    assert email["accounts"] == [
        {
            "account_id": data["account"]["id"],
            "owner": crm.emails["ann"],
            "kind": "personal",
            "sharing": "public",
            "status": "active",
        }
    ]
    # Broken mail without a From header is still logged (nothing to attribute, nothing lost).
    no_from = {**email_data(owner=crm.emails["ann"], to=["x@client.example"]), "from": []}
    assert crm.webhook("email.logged", no_from).json()["status"] == "stored"


def test_status_events_mark_links_and_are_stored(crm: CRM) -> None:
    data = email_data(owner=crm.emails["ann"], to=[f"{unique('r')}@client.example"])
    crm.webhook("email.logged", data)
    account = data["account"]["id"]
    for kind in ("deleted", "archived"):
        response = crm.webhook(
            f"email.{kind}", {"message_id": data["message_id"], "account_id": account}
        )
        assert response.status_code == 200 and response.json()["status"] == "stored"
        assert emails_with(crm, data["subject"])[0]["accounts"][0]["status"] == kind
    changed = crm.webhook(
        "account.status_changed", {"account_id": account, "status": "auth_failed"}
    )
    assert changed.json() == {"status": "stored", "type": "account.status_changed"}
    synced = crm.webhook("sync.completed", {"account_id": account, "fetched": 10, "logged": 3})
    assert synced.json()["status"] == "stored"
    unknown = crm.webhook("email.future_kind", {"anything": 1})
    assert unknown.status_code == 200  # stored for a newer gateway, not rejected
    bad = crm.webhook("sync.completed", {"account_id": account, "fetched": -1})
    assert bad.status_code == 400


@pytest.mark.parametrize(
    ("mutate", "status", "words"),
    [
        (lambda h: h.pop("webhook-signature"), 401, "missing"),
        (lambda h: h.pop("webhook-id"), 401, "missing"),
        (lambda h: h.update({"webhook-signature": "v1,AAAA"}), 401, "does not match"),
        (lambda h: h.update({"webhook-signature": "garbage"}), 400, "v1,"),
        (lambda h: h.update({"webhook-timestamp": h["webhook-timestamp"] + ".5"}), 400, "integer"),
        (lambda h: h.update({"webhook-timestamp": str(int(time.time()) - 400)}), 401, "300"),
        (lambda h: h.update({"webhook-timestamp": str(int(time.time()) + 400)}), 401, "300"),
    ],
)
def test_unsigned_or_malformed_requests_get_400_or_401(
    crm: CRM, mutate: Callable[[dict[str, str]], object], status: int, words: str
) -> None:
    ok = crm.webhook("sync.completed", {"account_id": "probe"})
    assert ok.status_code == 200
    headers = dict(ok.request.headers)
    headers["webhook-id"] = unique("msg_")  # a fresh id: replays short-circuit nothing here
    mutate(headers)
    response = crm.client("anon").post(
        "/api/v1/webhooks/gateway", content=ok.request.content, headers=headers
    )
    assert response.status_code == status, response.text
    assert words in response.json()["detail"]


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[1, 2]",
        b'{"type": "email.logged"}',
        b'{"type": "email.logged", "timestamp": "x", "data": {"message_id": "a"}}',
        b'{"type": "email.logged", "timestamp": 1, "data": {"direction": "up"}}',
        b"\xff\xfe",
    ],
)
def test_malformed_bodies_get_400_and_nothing_is_stored(crm: CRM, body: bytes) -> None:
    webhook_id = unique("msg_")
    response = crm.post_signed(body, webhook_id=webhook_id)
    assert response.status_code == 400, response.text
    assert response.json()["detail"]
    # Not stored: a valid event under the same id is still new.
    valid = json.dumps(
        {"type": "sync.completed", "timestamp": "2026-01-01T00:00:00Z", "data": {"account_id": "a"}}
    ).encode()
    assert crm.post_signed(valid, webhook_id=webhook_id).json()["status"] == "stored"


def test_replies_thread_by_references_in_either_order(crm: CRM) -> None:
    peer = f"{unique('peer')}@client.example"
    ann = crm.emails["ann"]
    root_id, reply_id, late_id = (f"<{unique(n)}@{COMPANY}>" for n in ("root", "reply", "late"))
    subject = unique("Proposal ")
    t0 = datetime.now(UTC) - timedelta(hours=3)
    root = crm.log_email(
        owner=ann, to=[peer], subject=subject, message_id=root_id, date=t0.isoformat()
    )
    # The reply changes the subject and drops nothing: In-Reply-To is enough.
    reply = crm.log_email(
        owner=ann,
        to=[peer],
        subject=f"Re: {subject} (v2)",
        message_id=reply_id,
        in_reply_to=root_id,
        references=[root_id],
        date=(t0 + timedelta(hours=1)).isoformat(),
    )
    assert reply["thread_id"] == root["thread_id"]
    # A grandchild arrives whose parent (late_id) has not been logged yet: a new thread for now …
    orphan = crm.log_email(
        owner=ann,
        to=[peer],
        subject=unique("Other "),
        in_reply_to=late_id,
        references=[late_id],
        date=(t0 + timedelta(hours=2)).isoformat(),
    )
    assert orphan["thread_id"] != root["thread_id"]
    # … until the parent arrives referencing the root: all three threads become one.
    crm.log_email(
        owner=ann,
        to=[peer],
        subject=unique("Late "),
        message_id=late_id,
        references=[root_id, reply_id],
        date=(t0 + timedelta(minutes=90)).isoformat(),
    )
    thread = crm.client("ann").get(f"/api/v1/threads/{root['thread_id']}").json()
    assert len(thread["emails"]) == 4
    assert (
        crm.client("ann").get(f"/api/v1/emails/{orphan['id']}").json()["thread_id"]
        == root["thread_id"]
    )


def test_subject_and_participants_fallback(crm: CRM) -> None:
    peer = f"{unique('peer')}@client.example"
    stranger = f"{unique('stranger')}@elsewhere.example"
    subject = unique("Quote ")
    first = crm.log_email(owner=crm.emails["ann"], to=[peer], subject=subject)
    # A client that drops References: same subject after Re:/AW:, a participant in common.
    reply = crm.log_email(
        owner=crm.emails["ann"],
        direction="inbound",
        sender=peer,
        to=[crm.emails["ann"]],
        subject=f"AW: Re: {subject.upper()}",
    )
    assert reply["thread_id"] == first["thread_id"]
    # Same subject, nobody in common: a different conversation.
    other = crm.log_email(owner=crm.emails["bob"], to=[stranger], subject=f"Re: {subject}")
    assert other["thread_id"] != first["thread_id"]


def test_timeline_newest_thread_first_and_per_user_order(crm: CRM) -> None:
    ann = crm.client("ann")
    contact = ann.post(
        "/api/v1/contacts", json={"primary_address": f"{unique('tl')}@client.example"}
    ).json()
    address = contact["primary_address"]
    t0 = datetime.now(UTC) - timedelta(days=2)
    old = crm.log_email(owner=crm.emails["ann"], to=[address], date=t0.isoformat())
    new = crm.log_email(
        owner=crm.emails["ann"], to=[address], date=(t0 + timedelta(hours=5)).isoformat()
    )
    # A late reply in the old thread makes it the newest thread again.
    reply = crm.log_email(
        owner=crm.emails["ann"],
        to=[address],
        in_reply_to=old["message_id"],
        subject=f"Re: {old['subject']}",
        date=(t0 + timedelta(hours=9)).isoformat(),
    )
    timeline = ann.get(f"/api/v1/contacts/{contact['id']}/timeline").json()
    assert timeline["count"] == 2
    assert [t["id"] for t in timeline["data"]] == [old["thread_id"], new["thread_id"]]
    assert [e["id"] for e in timeline["data"][0]["emails"]] == [old["id"], reply["id"]]  # bottom
    ann.patch("/api/v1/users/me/settings", json={"thread_order": "newest_at_top"})
    try:
        top = ann.get(f"/api/v1/contacts/{contact['id']}/timeline").json()
        assert [e["id"] for e in top["data"][0]["emails"]] == [reply["id"], old["id"]]
        assert top["data"][0]["order"] == "newest_at_top"
        thread = ann.get(f"/api/v1/threads/{old['thread_id']}").json()
        assert [e["id"] for e in thread["emails"]] == [reply["id"], old["id"]]
    finally:
        ann.patch("/api/v1/users/me/settings", json={"thread_order": "newest_at_bottom"})
    assert (
        ann.get(
            f"/api/v1/contacts/{contact['id']}/timeline", params={"limit": 1, "offset": 1}
        ).json()["data"][0]["id"]
        == new["thread_id"]
    )
    assert ann.get("/api/v1/contacts/999999999/timeline").status_code == 404


def _contact_for(crm: CRM, address: str) -> dict[str, Any] | None:
    found = crm.client("admin").post("/api/v1/contacts/match", json={"addresses": [address]}).json()
    result: dict[str, Any] = found["results"][0]
    return result if result["contact_id"] else None


def test_auto_creation_follows_the_policy(crm: CRM, policy: Callable[..., Any]) -> None:
    ann = crm.emails["ann"]
    person = lambda: f"{unique('p')}@prospect.example"  # noqa: E731
    # none: nothing is created.
    policy(auto_create="none")
    nobody = person()
    crm.log_email(owner=ann, to=[nobody])
    assert _contact_for(crm, nobody) is None
    # sent: recipients of outbound mail, but never excluded domains, groups or our own people.
    policy(auto_create="sent", excluded_domains=["gmail.com"])
    recipient, sender = person(), person()
    excluded, group, colleague = (
        f"{unique('g')}@gmail.com",
        f"info@{unique('grp')}.example",
        crm.emails["bob"],
    )
    crm.log_email(owner=ann, to=[recipient, excluded, group, colleague, f"{unique('c')}@{COMPANY}"])
    created = _contact_for(crm, recipient)
    assert created is not None and created["owner"] == ann
    for address in (excluded, group, colleague):
        assert _contact_for(crm, address) is None, address
    crm.log_email(owner=ann, direction="inbound", sender=sender, to=[ann])
    assert _contact_for(crm, sender) is None  # "sent" ignores received mail
    # sent_and_received: senders of inbound mail too.
    policy(auto_create="sent_and_received")
    crm.log_email(owner=ann, direction="inbound", sender=sender, to=[ann])
    assert _contact_for(crm, sender) is not None
    noreply = f"no-reply@{unique('n')}.example"
    crm.log_email(owner=ann, direction="inbound", sender=noreply, to=[ann])
    assert _contact_for(crm, noreply) is None


def test_concurrent_sightings_of_one_message_store_one_email(crm: CRM) -> None:
    import concurrent.futures

    base = email_data(owner=crm.emails["ann"], to=[f"{unique('x')}@client.example"])

    def send(i: int) -> int:
        data = {**base, "account": {**base["account"], "id": f"{base['account']['id']}-{i}"}}
        return crm.webhook("email.logged", data).status_code

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        codes = list(pool.map(send, range(6)))
    assert codes == [200] * 6
    found = emails_with(crm, base["subject"])
    assert len(found) == 1
    assert len(found[0]["accounts"]) == 6
