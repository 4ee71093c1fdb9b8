"""Sharing, enforced on every read: for each sharing level (private, custom, public), ann (the
owner) logs two emails, one with a contact she selected and one with a contact she did not; then
every read endpoint (list, get, search, a contact's timeline, a thread, an attachment link, the
inbox) is checked for ann, for bob (another rep) and for the admin. Also the admin's rule for
excluded-domain mail, and bcc shown only to the mail's owners."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from tests.crm_api.conftest import CRM, unique

# Which of the two emails bob may read, per level: (selected contact's, other contact's).
BOB_SEES = {"private": (False, False), "custom": (True, False), "public": (True, True)}


def _ids(items: list[dict[str, Any]]) -> set[int]:
    return {int(e["id"]) for e in items}


def readable_ids(
    crm: CRM, who: str, email: dict[str, Any], contact_id: int, tag: str
) -> dict[str, bool]:
    """Whether ``who`` sees ``email`` through each read endpoint."""
    c = crm.client(who)
    eid = email["id"]
    timeline = c.get(f"/api/v1/contacts/{contact_id}/timeline").json()["data"]
    thread = c.get(f"/api/v1/threads/{email['thread_id']}")
    attachment = c.get(f"/api/v1/attachments/{email['attachments'][0]['id']}")
    got = c.get(f"/api/v1/emails/{eid}")
    for response in (thread, attachment, got):
        assert response.status_code in (200, 404), response.text
        if response.status_code == 404:
            assert "not found" in response.json()["detail"]
    return {
        "list": eid in _ids(c.get("/api/v1/emails", params={"limit": 200}).json()["data"]),
        "list_by_contact": eid
        in _ids(c.get("/api/v1/emails", params={"contact_id": contact_id}).json()["data"]),
        "get": got.status_code == 200,
        "search": eid in _ids(c.get("/api/v1/search", params={"q": tag}).json()["emails"]["data"]),
        "timeline": eid in {e["id"] for t in timeline for e in t["emails"]},
        "thread": thread.status_code == 200 and eid in _ids(thread.json()["emails"]),
        "attachment": attachment.status_code == 200
        and attachment.json()["url"] == email["attachments"][0]["url"],
        "inbox": eid in _ids(c.get("/api/v1/inbox", params={"limit": 200}).json()["data"]),
    }


@pytest.mark.parametrize("level", ["private", "custom", "public"])
def test_every_read_endpoint_obeys_every_sharing_level(crm: CRM, level: str) -> None:
    ann = crm.client("ann")
    tag = unique("sharetag")
    chosen = ann.post(
        "/api/v1/contacts", json={"primary_address": f"{unique('sel')}@client.example"}
    ).json()
    other = ann.post(
        "/api/v1/contacts", json={"primary_address": f"{unique('oth')}@client.example"}
    ).json()
    account = unique(f"acct-{level}-")
    logged = {
        which: crm.log_email(
            owner=crm.emails["ann"],
            to=[contact["primary_address"]],
            sharing=level,
            account_id=account,
            selected=[chosen["primary_address"]] if level == "custom" else [],
            subject=f"{tag} {which}",
            text=f"body {tag}",
        )
        for which, contact in (("chosen", chosen), ("other", other))
    }
    contacts = {"chosen": chosen["id"], "other": other["id"]}
    for which, expected_for_bob in zip(("chosen", "other"), BOB_SEES[level], strict=True):
        email, cid = logged[which], contacts[which]
        as_ann = readable_ids(crm, "ann", email, cid, tag)
        assert all(as_ann.values()), (level, which, as_ann)  # the owner sees her own everywhere
        as_bob = readable_ids(crm, "bob", email, cid, tag)
        assert as_bob.pop("inbox") is False  # never in someone else's inbox
        assert as_bob == dict.fromkeys(as_bob, expected_for_bob), (level, which, as_bob)
        as_admin = readable_ids(crm, "admin", email, cid, tag)
        assert as_admin.pop("inbox") is False
        assert all(as_admin.values()), (level, which, as_admin)  # admins see all (documented)


def test_a_change_of_sharing_applies_to_mail_already_logged(crm: CRM) -> None:
    account = unique("acct-switch-")
    email = crm.log_email(
        owner=crm.emails["ann"],
        to=[f"{unique('s')}@client.example"],
        sharing="public",
        account_id=account,
    )
    assert crm.client("bob").get(f"/api/v1/emails/{email['id']}").status_code == 200
    crm.log_email(
        owner=crm.emails["ann"],
        to=[f"{unique('s')}@client.example"],
        sharing="private",
        account_id=account,
    )
    assert crm.client("bob").get(f"/api/v1/emails/{email['id']}").status_code == 404


def test_excluded_domain_mail_follows_the_admins_rule(crm: CRM, policy: Callable[..., Any]) -> None:
    policy(excluded_mail="owner_only", excluded_domains=["gmail.com"])
    private_life = crm.log_email(
        owner=crm.emails["ann"], to=[f"{unique('friend')}@gmail.com"], sharing="public"
    )
    business = crm.log_email(
        owner=crm.emails["ann"], to=[f"{unique('b')}@client.example"], sharing="public"
    )
    bob = crm.client("bob")
    assert bob.get(f"/api/v1/emails/{private_life['id']}").status_code == 404
    assert bob.get(f"/api/v1/emails/{business['id']}").status_code == 200
    assert crm.client("ann").get(f"/api/v1/emails/{private_life['id']}").status_code == 200
    policy(excluded_mail="follow_sharing")
    assert bob.get(f"/api/v1/emails/{private_life['id']}").status_code == 200


def test_bcc_is_shown_only_to_the_owner(crm: CRM) -> None:
    hidden = f"{unique('bcc')}@client.example"
    email = crm.log_email(
        owner=crm.emails["ann"],
        to=[f"{unique('to')}@client.example"],
        bcc=[hidden],
        sharing="public",
    )
    assert [
        p["address"] for p in crm.client("ann").get(f"/api/v1/emails/{email['id']}").json()["bcc"]
    ] == [hidden]
    assert crm.client("bob").get(f"/api/v1/emails/{email['id']}").json()["bcc"] == []
