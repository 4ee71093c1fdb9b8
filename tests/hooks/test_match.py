"""The match-contacts policy, with the CRM's HTTP answer as the one seam (an httpx transport)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest

from gateway.errors import Defer
from gateway.sighting import AccountRef, Sighting
from gateway.store.queue import QueuedMessage
from hooks.crm_client import CrmClient
from hooks.match import MatchContacts

OWNER = "rep@example.test"


def crm(contacts: dict[str, dict[str, Any]], policy: dict[str, Any], calls: list[Any]) -> CrmClient:
    def answer(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        calls.append(body)
        results = [
            {
                "address": a,
                "normalized": a,
                "contact_id": contacts[a]["id"] if a in contacts else None,
                "match": "primary" if a in contacts else None,
                "owner": contacts.get(a, {}).get("owner"),
                "assigned_to_owner": contacts.get(a, {}).get("owner") == body["owner"],
            }
            for a in body["addresses"]
        ]
        return httpx.Response(200, json={"results": results, "policy": policy})

    client = httpx.AsyncClient(transport=httpx.MockTransport(answer))
    return CrmClient(client, base_url="http://crm.test", token="t", batch_size=2)


def item(raw: bytes, direction: str = "outbound", bcc: list[str] | None = None) -> QueuedMessage:
    message = QueuedMessage(
        id="m",
        source="submission",
        mail_from=OWNER,
        rcpt_tos=[],
        raw=raw,
        prepend=b"",
        username=OWNER,
        header_message_id=None,
        steps_done=[],
        attempts=0,
        created_at=0,
    )
    message.sighting = Sighting(
        raw=raw,
        account=AccountRef(id="u", owner=OWNER),
        direction=direction,  # type: ignore[arg-type]
        source="submission",
        own_addresses=frozenset({"rep2@example.test"}),
        bcc=bcc or [],
    )
    return message


RAW = (
    b"From: rep@example.test\r\nTo: Bob <BOB@customer.test>, info@customer.test, "
    b"rep2@example.test\r\nCc: carol@gmail.com, dave@other.test\r\n\r\nx\r\n"
)
NONE = {"auto_create": "none", "excluded_domains": ["gmail.com"], "assigned_records_only": False}


def run(client: CrmClient, message: QueuedMessage) -> list[str]:
    asyncio.run(MatchContacts(client)(message))
    matched: list[str] = message.sighting.matched
    return matched


def test_contacts_only_never_the_sender_and_batched() -> None:
    calls: list[Any] = []
    client = crm(
        {
            "bob@customer.test": {"id": 1, "owner": OWNER},
            "carol@gmail.com": {"id": 2, "owner": OWNER},
        },
        NONE,
        calls,
    )
    message = item(RAW, bcc=["eve@customer.test"])
    assert run(client, message) == ["bob@customer.test"]  # carol's domain is excluded
    asked = [a for call in calls for a in call["addresses"]]
    assert "rep2@example.test" not in asked  # own addresses are never asked about
    assert "eve@customer.test" in asked  # a blind copy is a recipient too
    assert all(len(call["addresses"]) <= 2 for call in calls)


def test_auto_create_sent_takes_people_not_groups_or_excluded() -> None:
    policy = {**NONE, "auto_create": "sent"}
    client = crm({}, policy, [])
    assert run(client, item(RAW)) == ["bob@customer.test", "dave@other.test"]
    assert run(crm({}, policy, []), item(RAW, direction="inbound")) == []
    both = {**NONE, "auto_create": "sent_and_received"}
    inbound = b"From: Stranger <stranger@new.test>\r\nTo: rep@example.test\r\n\r\nhi\r\n"
    assert run(crm({}, both, []), item(inbound, direction="inbound")) == ["stranger@new.test"]


def test_assigned_records_only() -> None:
    policy = {**NONE, "assigned_records_only": True}
    client = crm(
        {
            "bob@customer.test": {"id": 1, "owner": "someone@example.test"},
            "dave@other.test": {"id": 2, "owner": OWNER},
        },
        policy,
        [],
    )
    assert run(client, item(RAW)) == ["dave@other.test"]


def test_answers_are_cached() -> None:
    calls: list[Any] = []
    client = crm({"bob@customer.test": {"id": 1, "owner": OWNER}}, NONE, calls)
    run(client, item(RAW))
    first = len(calls)
    run(client, item(RAW))
    assert len(calls) == first


@pytest.mark.parametrize("status", [500, 401])
def test_a_failing_crm_defers(status: int) -> None:
    client = CrmClient(
        httpx.AsyncClient(transport=httpx.MockTransport(lambda _r: httpx.Response(status))),
        base_url="http://crm.test",
        token="t",
    )
    with pytest.raises(Defer, match=f"CRM answered {status}"):
        run(client, item(RAW))
