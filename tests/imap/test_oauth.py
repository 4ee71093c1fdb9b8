"""OAuth sign-in for mailboxes that take no passwords: the authorization-code flow with PKCE
against a real authorization server (uvicorn), XOAUTH2 logins checked by Dovecot's oauth2 passdb
at that server, token refresh, a revoked grant ending in ``auth_failed``, and signing in again."""

from __future__ import annotations

import smtplib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.gateway.conftest import RunningGateway
from tests.hooks import conftest as hooks_fixtures
from tests.hooks.conftest import Crm, poll
from tests.imap.conftest import start_gateway
from tests.servers.certs import TestCA
from tests.servers.dovecot import DovecotServer
from tests.servers.ports import free_port
from tests.servers.postfix import PostfixRelay
from tests.servers.sink import MessageSink
from tests.servers.uvicorn import UvicornServer

CLIENT_ID, CLIENT_SECRET = "mailgate-test-client", "test-client-secret"
TOKEN_SECONDS = 121  # two seconds past the early-refresh margin: tokens go stale at once

# The bundled CRM under uvicorn, as the hooks tests use it.
crm_server = hooks_fixtures.crm_server


@dataclass
class World:
    gateway: RunningGateway
    dovecot: DovecotServer
    idp: UvicornServer
    api: httpx.Client

    def stats(self) -> dict[str, int]:
        return dict(httpx.get(f"{self.idp.url}/stats").json())

    def status(self, account: str) -> dict[str, Any]:
        return dict(self.api.get(f"/api/v1/accounts/{account}").json())


@pytest.fixture
def world(tmp_path: Path, ca: TestCA, sink: Any, crm_server: Crm) -> Iterator[World]:
    idp = UvicornServer(
        "tests.servers._oauth_app:create_app",
        {
            "OAUTH_CLIENT_ID": CLIENT_ID,
            "OAUTH_CLIENT_SECRET": CLIENT_SECRET,
            "OAUTH_TOKEN_SECONDS": str(TOKEN_SECONDS),
        },
    ).start()
    dovecot = DovecotServer(oauth_userinfo_url=f"{idp.url}/userinfo").start()
    providers = tmp_path / "providers.toml"
    providers.write_text(
        f"""[testmail]
name = "Test Mail"
imap_host = "127.0.0.1"
imap_port = {dovecot.port}
imap_security = "none"
smtp_host = ""
smtp_port = 587
smtp_security = "starttls"
oauth = "google"
oauth_authorize_url = "{idp.url}/authorize"
oauth_token_url = "{idp.url}/token"
oauth_scopes = ["mail"]

[testms]
name = "Test Microsoft"
imap_host = "127.0.0.1"
imap_port = {dovecot.port}
imap_security = "none"
smtp_host = ""
smtp_port = 587
smtp_security = "starttls"
oauth = "microsoft"
"""
    )
    api_port = free_port()
    gateway = start_gateway(
        tmp_path,
        ca,
        sink,
        crm_server,
        api_port=api_port,
        providers_file=str(providers),
        google_client_id=CLIENT_ID,
        google_client_secret=CLIENT_SECRET,
        oauth_redirect_url=f"http://127.0.0.1:{api_port}/api/v1/accounts/oauth/callback",
    )
    api = httpx.Client(
        base_url=gateway.api, headers={"Authorization": f"Bearer {gateway.token}"}, timeout=30
    )
    try:
        yield World(gateway, dovecot, idp, api)
    finally:
        api.close()
        gateway.stop()
        dovecot.cleanup()
        idp.cleanup()


def _sign_in(url: str) -> httpx.Response:
    """What the owner's browser does: the provider consents and redirects to our callback."""
    return httpx.get(url, follow_redirects=True, timeout=30)


def test_a_mailbox_signs_in_with_oauth_syncs_refreshes_and_signs_in_again(
    world: World, crm_server: Crm
) -> None:
    user, _password = world.dovecot.new_user("oauth")
    crm_server.add_contact("gus@customer.test")
    started = world.api.post(
        "/api/v1/accounts/oauth", json={"email": user, "provider": "testmail", "kind": "shared"}
    )
    assert started.status_code == 200, started.text
    url = started.json()["authorize_url"]
    assert "code_challenge_method=S256" in url and f"login_hint={user.replace('@', '%40')}" in url

    landed = _sign_in(url)
    assert landed.status_code == 200, landed.text
    account = landed.json()
    assert account["auth"] == "oauth" and "secret" not in account
    assert "refresh_token" not in landed.text and "access_token" not in landed.text
    assert world.stats()["authorization_code"] == 1
    replayed = httpx.get(str(landed.request.url))  # the same code and state a second time
    assert replayed.status_code == 400 and "already used" in replayed.json()["detail"]

    # The sync logs in with XOAUTH2, which Dovecot checks at the authorization server.
    poll(lambda: world.status(account["id"])["status"] == "live", timeout=30, what="live")
    with smtplib.LMTP(world.dovecot.host, world.dovecot.lmtp_port) as lmtp:
        lmtp.sendmail(
            "gus@customer.test",
            [user],
            f"From: gus@customer.test\r\nTo: {user}\r\nSubject: over oauth\r\n"
            "Message-ID: <oauth-1@customer.test>\r\n\r\nHi\r\n".encode(),
        )
    emails = poll(lambda: crm_server.emails() or None, timeout=30, what="the email in the CRM")
    assert [e["subject"] for e in emails] == ["over oauth"]

    # A stale access token is refreshed before a login (the refresh token rotates).
    tested = poll(
        lambda: (
            (r := world.api.post(f"/api/v1/accounts/{account['id']}/test").json())["ok"]
            and world.stats()["refresh_token"] >= 1
            and r
        ),
        timeout=30,
        what="a login after a refresh",
    )
    assert tested["ok"]

    # The owner withdraws the grant: the next login fails for good and the account waits.
    httpx.post(f"{world.idp.url}/admin/revoke", data={"user": user}).raise_for_status()
    world.api.patch(f"/api/v1/accounts/{account['id']}", json={"emit_archived": False})
    failed = poll(
        lambda: (s := world.status(account["id"]))["status"] == "auth_failed" and s,
        timeout=30,
        what="auth_failed",
    )
    assert "authorize the mailbox again" in failed["last_error"]

    # Signing in again gives new tokens; syncing resumes from the cursor.
    again = world.api.post(f"/api/v1/accounts/{account['id']}/oauth")
    assert again.status_code == 200, again.text
    assert _sign_in(again.json()["authorize_url"]).status_code == 200
    poll(lambda: world.status(account["id"])["status"] == "live", timeout=30, what="live again")


def test_oauth_refusals_say_what_to_do(world: World) -> None:
    user, _password = world.dovecot.new_user("oauthbad")
    unset = world.api.post(
        "/api/v1/accounts/oauth", json={"email": user, "provider": "testms", "kind": "shared"}
    )
    assert unset.status_code == 400
    assert "set [imap] microsoft_client_id" in unset.json()["detail"]
    custom = world.api.post(
        "/api/v1/accounts/oauth",
        json={"email": user, "imap_host": "127.0.0.1", "kind": "shared"},
    )
    assert custom.status_code == 400 and "connect it with a password" in custom.json()["detail"]
    callback = f"{world.gateway.api}/api/v1/accounts/oauth/callback"
    denied = httpx.get(callback, params={"error": "access_denied", "state": "x"})
    assert denied.status_code == 400 and "access_denied" in denied.json()["detail"]
    forged = httpx.get(callback, params={"code": "abc", "state": "not-ours"})
    assert forged.status_code == 400 and "expired" in forged.json()["detail"]
    empty = httpx.get(callback)
    assert empty.status_code == 400
    assert world.api.get("/api/v1/accounts").json()["accounts"] == []


def test_crm_mail_from_an_oauth_mailbox_is_submitted_with_xoauth2(
    world: World, crm_server: Crm, ca: TestCA, tmp_path: Path
) -> None:
    """The mailbox's own submission server (Postfix asking Dovecot's auth, which checks the
    token at the authorization server) takes the CRM's mail only with AUTH XOAUTH2."""
    with (
        MessageSink() as upstream,
        PostfixRelay(
            upstream, tls=ca.server, require_auth=True, sasl_socket=world.dovecot.auth_socket
        ) as submission,
    ):
        user, _password = world.dovecot.new_user("oauthsend")
        started = world.api.post(
            "/api/v1/accounts/oauth",
            json={
                "email": user,
                "provider": "testmail",
                "kind": "shared",
                "smtp_host": "localhost",
                "smtp_port": submission.port,
                "smtp_security": "starttls",
            },
        )
        assert started.status_code == 200, started.text
        account = _sign_in(started.json()["authorize_url"]).json()["id"]
        sent = world.api.post(
            "/api/v1/messages",
            json={"account": account, "to": ["hal@customer.test"], "subject": "x", "text": "y"},
        )
        assert sent.status_code == 202 and sent.json()["route"] == "account", sent.text
        relayed = upstream.wait_for_rcpt("hal@customer.test", timeout=30)
        assert relayed.mail_from == user
        assert f"(Authenticated sender: {user})" in relayed.data.decode()
