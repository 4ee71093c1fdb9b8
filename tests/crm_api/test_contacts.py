"""The CRM over HTTP: health, docs, tokens on every endpoint, JSON errors, contacts (normalised,
unique, searchable, paginated, relinking logged mail) and the contract's batch match, on SQLite
and PostgreSQL alike."""

from __future__ import annotations

import httpx
import pytest

from tests.crm_api.conftest import COMPANY, CRM, unique


def new_contact(crm: CRM, who: str = "ann", **fields: object) -> dict[str, object]:
    body = {"name": unique("Name "), "primary_address": f"{unique('c')}@client.example", **fields}
    response = crm.client(who).post("/api/v1/contacts", json=body)
    assert response.status_code == 201, response.text
    result: dict[str, object] = response.json()
    return result


def test_health_and_docs_need_no_token(crm: CRM) -> None:
    anon = crm.client("anon")
    assert anon.get("/healthz").json() == {"status": "ok"}
    docs = anon.get("/docs")
    assert docs.status_code == 200
    assert "swagger" in docs.text.lower()
    paths = anon.get("/openapi.json").json()["paths"]
    assert "/api/v1/contacts/match" in paths
    assert "/api/v1/webhooks/gateway" in paths


def test_every_api_endpoint_requires_a_token(crm: CRM) -> None:
    anon = crm.client("anon")
    paths = anon.get("/openapi.json").json()["paths"]
    checked = 0
    for path, methods in paths.items():
        if path == "/api/v1/webhooks/gateway" or not path.startswith("/api/"):
            continue
        concrete = path.replace("{contact_id}", "1").replace("{email_id}", "1")
        concrete = concrete.replace("{thread_id}", "1").replace("{attachment_id}", "1")
        concrete = concrete.replace("{address}", "a@b.example")
        for method in methods:
            for headers in ({}, {"Authorization": "Bearer mgc_not-a-real-token"}):
                response = anon.request(method.upper(), concrete, headers=headers, json={})
                assert response.status_code == 401, (method, path, response.text)
                assert response.json()["detail"]
                checked += 1
    assert checked >= 30


def test_errors_are_json_with_a_detail(crm: CRM) -> None:
    ann = crm.client("ann")
    for response, status in (
        (ann.get("/api/v1/contacts/999999999"), 404),
        (ann.get("/api/v1/no-such-thing"), 404),
        (ann.get("/api/v1/contacts", params={"limit": 0}), 422),
        (ann.get("/api/v1/contacts/not-a-number"), 422),
        (ann.put("/api/v1/contacts", json={}), 405),
        (
            ann.post(
                "/api/v1/contacts", content=b"{oops", headers={"content-type": "application/json"}
            ),
            422,
        ),
        (
            ann.post("/api/v1/contacts", json={"primary_address": "a@b.example", "nickname": "x"}),
            422,
        ),
        (ann.get("/api/v1/users"), 403),
        (ann.patch("/api/v1/settings", json={"auto_create": "none"}), 403),
    ):
        assert response.status_code == status, response.text
        assert response.headers["content-type"].startswith("application/json")
        assert isinstance(response.json()["detail"], str) and response.json()["detail"]
        assert "Traceback" not in response.text


def test_oversized_bodies_get_413(crm: CRM) -> None:
    big = b"[" + b"0," * (600 * 1024) + b"0]"  # > 1 MiB, the cap the fixture configures
    response = crm.client("ann").post(
        "/api/v1/contacts", content=big, headers={"content-type": "application/json"}
    )
    assert response.status_code == 413
    assert "exceeds" in response.json()["detail"]

    def chunked() -> object:
        for _ in range(20):
            yield b" " * 65536

    response = crm.client("anon").post(
        "/api/v1/webhooks/gateway", content=chunked(), headers={"content-type": "application/json"}
    )
    assert response.status_code == 413


def test_contact_crud_with_normalised_addresses(crm: CRM) -> None:
    ann = crm.client("ann")
    local = unique("bob")
    created = new_contact(
        crm,
        name="Bob",
        company="Client GmbH",
        primary_address=f"  {local.upper()}@Bücher.Example ",
        secondary_addresses=[f"{local}@second.example", f"{local}@THIRD.example"],
    )
    assert created["primary_address"] == f"{local}@xn--bcher-kva.example"
    assert created["secondary_addresses"] == [f"{local}@second.example", f"{local}@third.example"]
    assert created["owner"] == f"ann@{COMPANY}"  # a rep's contact is theirs by default
    cid = created["id"]
    assert ann.get(f"/api/v1/contacts/{cid}").json() == created

    patched = ann.patch(
        f"/api/v1/contacts/{cid}", json={"company": "Client AG", "secondary_addresses": []}
    )
    assert patched.status_code == 200
    assert patched.json()["company"] == "Client AG"
    assert patched.json()["secondary_addresses"] == []
    # The dropped addresses are free again for another contact.
    other = new_contact(crm, primary_address=f"{local}@second.example")
    assert other["primary_address"] == f"{local}@second.example"

    added = ann.post(
        f"/api/v1/contacts/{cid}/addresses",
        json={"address": f"{local}@new.example", "primary": True},
    )
    assert added.status_code == 201
    assert added.json()["primary_address"] == f"{local}@new.example"
    assert f"{local}@xn--bcher-kva.example" in added.json()["secondary_addresses"]
    removed = ann.delete(f"/api/v1/contacts/{cid}/addresses/{local}@xn--bcher-kva.example")
    assert removed.status_code == 200
    assert removed.json()["secondary_addresses"] == []
    refused = ann.delete(f"/api/v1/contacts/{cid}/addresses/{local}@new.example")
    assert refused.status_code == 422  # the primary cannot just vanish

    assert ann.delete(f"/api/v1/contacts/{cid}").status_code == 204
    assert ann.get(f"/api/v1/contacts/{cid}").status_code == 404
    assert ann.delete(f"/api/v1/contacts/{cid}").status_code == 404


@pytest.mark.parametrize(
    "address",
    ["not-an-address", "a b@example.com", "ann@localhost", "@example.com", "x@exa_mple.com"],
)
def test_invalid_addresses_get_422(crm: CRM, address: str) -> None:
    response = crm.client("ann").post("/api/v1/contacts", json={"primary_address": address})
    assert response.status_code == 422
    assert "address" in response.json()["detail"] or "domain" in response.json()["detail"]


def test_duplicate_addresses_get_409_and_nothing_is_half_stored(crm: CRM) -> None:
    ann = crm.client("ann")
    first = new_contact(crm)
    taken = str(first["primary_address"]).upper()  # same address after normalisation
    before = ann.get("/api/v1/contacts").json()["count"]
    fresh = f"{unique('fresh')}@client.example"
    response = ann.post(
        "/api/v1/contacts",
        json={"name": "Dup", "primary_address": fresh, "secondary_addresses": [taken]},
    )
    assert response.status_code == 409
    assert str(first["primary_address"]) in response.json()["detail"]
    assert str(first["id"]) in response.json()["detail"]
    # The contact row and its fresh primary address were rolled back with the failure.
    assert ann.get("/api/v1/contacts").json()["count"] == before
    assert ann.get("/api/v1/contacts", params={"q": fresh}).json()["count"] == 0
    second = new_contact(crm)
    clash = ann.post(f"/api/v1/contacts/{second['id']}/addresses", json={"address": taken})
    assert clash.status_code == 409


def test_search_and_pagination(crm: CRM) -> None:
    ann = crm.client("ann")
    tag = unique("zeta")
    ids = [new_contact(crm, company=f"{tag} Corp")["id"] for _ in range(5)]
    new_contact(crm, primary_address=f"{tag}@mail.example")  # matched by address
    page1 = ann.get("/api/v1/contacts", params={"q": tag, "limit": 4}).json()
    page2 = ann.get("/api/v1/contacts", params={"q": tag.upper(), "limit": 4, "offset": 4}).json()
    assert page1["count"] == page2["count"] == 6
    assert len(page1["data"]) == 4 and len(page2["data"]) == 2
    seen = [c["id"] for c in page1["data"] + page2["data"]]
    assert len(set(seen)) == 6 and set(ids) <= set(seen)
    both = crm.client("bob").get("/api/v1/search", params={"q": tag}).json()
    assert both["contacts"]["count"] == 6


def test_reps_edit_only_their_own_contacts(crm: CRM) -> None:
    mine = new_contact(crm, "ann")
    assert (
        crm.client("bob").patch(f"/api/v1/contacts/{mine['id']}", json={"name": "x"}).status_code
        == 403
    )
    assert (
        crm.client("admin").patch(f"/api/v1/contacts/{mine['id']}", json={"name": "x"}).status_code
        == 200
    )


def test_gaining_an_address_links_mail_already_logged(crm: CRM) -> None:
    stranger = f"{unique('later')}@client.example"
    email = crm.log_email(owner=crm.emails["ann"], to=[stranger])
    assert email["contact_ids"] == []
    contact = new_contact(crm)
    response = crm.client("ann").post(
        f"/api/v1/contacts/{contact['id']}/addresses", json={"address": stranger.upper()}
    )
    assert response.status_code == 201
    relinked = crm.client("ann").get(f"/api/v1/emails/{email['id']}").json()
    assert relinked["contact_ids"] == [contact["id"]]
    timeline = crm.client("ann").get(f"/api/v1/contacts/{contact['id']}/timeline").json()
    assert [e["id"] for t in timeline["data"] for e in t["emails"]] == [email["id"]]
    # Losing the address unlinks it again.
    crm.client("ann").delete(f"/api/v1/contacts/{contact['id']}/addresses/{stranger}")
    assert crm.client("ann").get(f"/api/v1/emails/{email['id']}").json()["contact_ids"] == []


def test_match_answers_a_batch_in_order_with_the_policy(crm: CRM) -> None:
    ann_contact = new_contact(crm, "ann", secondary_addresses=[f"{unique('s')}@client.example"])
    bob_contact = new_contact(crm, "bob")
    addresses = [
        str(ann_contact["primary_address"]).upper(),
        str(ann_contact["secondary_addresses"][0]),  # type: ignore[index]
        f" {bob_contact['primary_address']} ",
        f"{unique('nobody')}@client.example",
        "garbage",
    ]
    response = crm.client("admin").post(
        "/api/v1/contacts/match", json={"addresses": addresses, "owner": crm.emails["ann"]}
    )
    assert response.status_code == 200
    body = response.json()
    results = body["results"]
    assert [r["address"] for r in results] == addresses
    assert [r["match"] for r in results] == ["primary", "secondary", "primary", None, None]
    assert [r["contact_id"] for r in results[:3]] == [
        ann_contact["id"],
        ann_contact["id"],
        bob_contact["id"],
    ]
    assert [r["owner"] for r in results[:3]] == [
        crm.emails["ann"],
        crm.emails["ann"],
        crm.emails["bob"],
    ]
    assert [r["assigned_to_owner"] for r in results] == [True, True, False, False, False]
    assert results[4]["normalized"] is None
    policy = body["policy"]
    assert policy["auto_create"] == "none"
    assert COMPANY in policy["excluded_domains"] and "gmail.com" in policy["excluded_domains"]
    assert policy["assigned_records_only"] is False


def test_match_takes_up_to_1000_addresses(crm: CRM) -> None:
    admin = crm.client("admin")
    many = [f"m{i}@bulk.example" for i in range(1000)]
    response = admin.post("/api/v1/contacts/match", json={"addresses": many})
    assert response.status_code == 200
    assert len(response.json()["results"]) == 1000
    too_many = admin.post("/api/v1/contacts/match", json={"addresses": [*many, "x@bulk.example"]})
    assert too_many.status_code == 422
    assert "addresses" in too_many.json()["detail"]


def test_settings_endpoints(crm: CRM, policy: object) -> None:
    admin = crm.client("admin")
    assert callable(policy)
    changed = policy(
        auto_create="sent_and_received",
        excluded_domains=["Example-Personal.COM", "gmail.com"],
        assigned_records_only=True,
    )
    assert changed["excluded_domains"] == ["example-personal.com", "gmail.com"]
    policy_seen = (
        crm.client("bob").post("/api/v1/contacts/match", json={"addresses": []}).json()["policy"]
    )
    assert policy_seen == {
        "auto_create": "sent_and_received",
        "excluded_domains": sorted([COMPANY, "example-personal.com", "gmail.com"]),
        "assigned_records_only": True,
    }
    bad = admin.patch("/api/v1/settings", json={"excluded_domains": ["not a domain"]})
    assert bad.status_code == 422
    mine = crm.client("bob").patch(
        "/api/v1/users/me/settings", json={"thread_order": "newest_at_top"}
    )
    assert mine.json()["thread_order"] == "newest_at_top"
    assert (
        crm.client("bob").get("/api/v1/settings").json()["user"]["thread_order"] == "newest_at_top"
    )
    crm.client("bob").patch("/api/v1/users/me/settings", json={"thread_order": "newest_at_bottom"})


def test_admins_manage_users(crm: CRM) -> None:
    admin = crm.client("admin")
    email = f"{unique('carol')}@{COMPANY}"
    created = admin.post("/api/v1/users", json={"email": email.upper(), "role": "rep"})
    assert created.status_code == 201 and created.json()["email"] == email
    assert admin.post("/api/v1/users", json={"email": email, "role": "rep"}).status_code == 409
    assert (
        admin.post("/api/v1/users", json={"email": "x@y.example", "role": "boss"}).status_code
        == 422
    )
    listed = admin.get("/api/v1/users", params={"limit": 500}).json()
    assert email in [u["email"] for u in listed["data"]]
    assert crm.client("ann").get("/api/v1/users/me").json()["email"] == crm.emails["ann"]


def test_concurrent_contact_creation_keeps_addresses_unique(crm: CRM) -> None:
    import concurrent.futures

    address = f"{unique('race')}@client.example"

    def create(_: int) -> int:
        with httpx.Client(
            base_url=crm.url, headers={"Authorization": f"Bearer {crm.tokens['admin']}"}
        ) as c:
            return c.post("/api/v1/contacts", json={"primary_address": address}).status_code

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(create, range(8)))
    assert codes.count(201) == 1
    assert set(codes) == {201, 409}
