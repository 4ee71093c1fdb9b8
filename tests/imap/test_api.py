"""The admin API's account routes, served in the service's own loop, against the real Dovecot."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx
from sqlmodel import Session

from gateway import users
from gateway.api.app import create_api
from gateway.api.deps import ApiContext
from gateway.imap.api import router
from gateway.metrics import Metrics
from tests.imap.conftest import Crm, Harness, Mailbox, unique, wait_for
from tests.imap.test_sync import message
from tests.servers.certs import TestCA
from tests.servers.dovecot import DovecotServer


class Api:
    """Blocking calls to the admin API app, run on the harness's loop through ASGI."""

    def __init__(self, h: Harness) -> None:
        self.h = h
        with Session(h.db) as session:
            users.add_user(session, email="admin@corp.test", password="x" * 12, is_admin=True)
            self.token = users.create_token(session, email="admin@corp.test")
            session.commit()
        assert h.service is not None
        context = ApiContext(
            store=h.store,
            engine=h.db,
            metrics=Metrics(),
            wake=lambda _id: None,
            services={"imap": h.service},
        )
        self.app = create_api(context, routers=[router()])

    def __call__(self, method: str, path: str, *, token: bool = True, **kw: Any) -> httpx.Response:
        async def go() -> httpx.Response:
            headers = {"Authorization": f"Bearer {self.token}"} if token else {}
            transport = httpx.ASGITransport(app=self.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
                return await client.request(method, path, headers=headers, **kw)

        result: httpx.Response = self.h.call(go())
        return result


def test_accounts_are_added_tested_changed_and_disconnected_without_showing_a_password(
    harness: Callable[..., Harness], dovecot: DovecotServer, ca: TestCA, crm: Crm
) -> None:
    h = harness()
    api = Api(h)
    user, password = dovecot.new_user("api")
    contact = f"{unique('api')}@customer.test"
    crm.add_contacts([contact])
    dovecot.deliver(user, "INBOX", message(contact, user, f"a1.{user}"))
    body = h.account_data(user, password, start="1m").model_dump(mode="json")
    body["password"] = password

    assert api("GET", "/api/v1/accounts", token=False).status_code == 401
    wrong = api("POST", "/api/v1/accounts", json={**body, "password": "nope-nope"})
    assert wrong.status_code == 422
    assert "refused the username or password" in wrong.json()["detail"]
    personal = api("POST", "/api/v1/accounts", json={**body, "kind": "personal"})
    assert personal.status_code == 400 and "mailgate user add" in personal.json()["detail"]
    missing = api("POST", "/api/v1/accounts", json={**body, "folders": ["INBOX", "Nope"]})
    assert missing.status_code == 422 and "no folder 'Nope'" in missing.json()["detail"]

    created = api("POST", "/api/v1/accounts", json=body)
    assert created.status_code == 201, created.text
    account = created.json()
    assert password not in created.text and "secret" not in account and "password" not in account
    assert account["status"] in ("connecting", "initial_sync") and account["warning"] is None
    again = api("POST", "/api/v1/accounts", json=body)
    assert again.status_code == 409

    wait_for(lambda: len(h.accepted(account["id"])) == 1, what="the mail in the window")
    h.wait_status(account["id"], "live")
    listed = api("GET", "/api/v1/accounts").json()["accounts"]
    assert [a["id"] for a in listed] == [account["id"]] and password not in str(listed)
    one = api("GET", f"/api/v1/accounts/{account['id']}").json()
    assert one["status"] == "live" and one["last_sync_at"] is not None
    assert {f["name"] for f in one["folder_states"]} == {"INBOX", "Sent"}
    assert api("GET", "/api/v1/accounts/acct_nope").status_code == 404

    tested = api("POST", f"/api/v1/accounts/{account['id']}/test").json()
    assert tested["ok"] and {"INBOX", "Sent", "Trash"} <= {f["name"] for f in tested["folders"]}
    trial = api(
        "POST", "/api/v1/accounts/test", json={**body, "email": f"x{user}", "username": user}
    )
    assert trial.json()["ok"] is True  # a set-up tried without storing it

    paused = api("PATCH", f"/api/v1/accounts/{account['id']}", json={"enabled": False})
    assert paused.status_code == 200 and paused.json()["status"] == "paused"
    wait_for(
        lambda: [e["status"] for e in h.events("account.status_changed")][-1:] == ["paused"],
        what="the paused event",
    )
    dovecot.deliver(user, "INBOX", message(contact, user, f"a2.{user}"))
    api("PATCH", f"/api/v1/accounts/{account['id']}", json={"enabled": True})
    wait_for(lambda: len(h.accepted(account["id"])) == 2, what="resuming where it stopped")

    custom = api(
        "PATCH",
        f"/api/v1/accounts/{account['id']}",
        json={"sharing": "custom", "selected_contacts": [contact]},
    ).json()
    assert custom["sharing"] == "custom" and custom["selected_contacts"] == [contact]
    bad = api("PATCH", f"/api/v1/accounts/{account['id']}", json={"sharing": "nobody"})
    assert bad.status_code == 422

    # CRM to mailbox: refused until the account allows it, then the email moves to Archive.
    action = {"message_id": f"<a1.{user}>", "action": "archive"}
    path = f"/api/v1/accounts/{account['id']}/actions"
    assert api("POST", path, json=action).status_code == 403
    api("PATCH", f"/api/v1/accounts/{account['id']}", json={"allow_mailbox_changes": True})
    moved = api("POST", path, json=action)
    assert moved.status_code == 200, moved.text
    assert moved.json()["folder"] == "Archive"
    box = Mailbox(dovecot, ca, user, password)
    assert len(box.flags("Archive")) == 1 and len(box.flags("INBOX")) == 1
    since = time.time()
    wait_for(
        lambda: (h.account(account["id"])["last_sync_at"] or 0) > since + 0.5,
        what="a sync pass after the action",
    )
    assert h.events("email.archived") == []  # the CRM asked for it: no echo

    gone = api("DELETE", f"/api/v1/accounts/{account['id']}")
    assert gone.status_code == 200 and gone.json() == {"id": account["id"], "disconnected": True}
    assert api("GET", f"/api/v1/accounts/{account['id']}").status_code == 404
    assert h.rows("SELECT * FROM mail_folder WHERE account_id = :a", a=account["id"]) == []
    assert len(h.accepted(account["id"])) == 2  # logged mail stays logged


def test_one_primary_account_per_user(
    harness: Callable[..., Harness], dovecot: DovecotServer
) -> None:
    h = harness()
    api = Api(h)
    rep = f"{unique('rep')}@corp.test"
    h.add_user(rep)
    ids = []
    for _ in range(2):
        user, password = dovecot.new_user("prim")
        body = h.account_data(user, password, kind="personal", owner=rep, primary=True).model_dump(
            mode="json"
        )
        body["password"] = password
        reply = api("POST", "/api/v1/accounts", json=body)
        assert reply.status_code == 201, reply.text
        ids.append(reply.json()["id"])
    listed = {
        a["id"]: a["primary"]
        for a in api("GET", f"/api/v1/accounts?owner={rep}").json()["accounts"]
    }
    assert listed == {ids[0]: False, ids[1]: True}
