"""The admin API's mailbox routes: connect, list, test, change, disconnect, and CRM actions.

``POST /api/v1/accounts`` tests the login before storing anything (``?test=false`` skips that),
so a wrong password is a 422 with the sentence that explains it, never a stored account that
fails later. No response model has a field for the password; requests carry it as a
``SecretStr``; OAuth tokens never leave the gateway. Every route talks to
``context.services["imap"]`` and needs an admin token, except the two a third party calls: the
OAuth callback (the single-use ``state`` proves it) and the mail server's push (its secret).

=======  ===================================  =============================================
POST     /api/v1/accounts                     connect a mailbox (201; 422 when the login fails)
POST     /api/v1/accounts/test                try a set-up without storing it
POST     /api/v1/accounts/oauth               connect by signing in at the provider (a URL)
GET      /api/v1/accounts/oauth/callback      where the provider returns (state-authenticated)
POST     /api/v1/accounts/{id}/oauth          sign an existing mailbox in again
GET      /api/v1/accounts[?owner=]            the accounts, with status and last error
GET      /api/v1/accounts/{id}                one, with each folder's cursor and progress
POST     /api/v1/accounts/{id}/test           log in now: folders, special use, counts
PATCH    /api/v1/accounts/{id}                enable/disable, password, sharing, folders, …
DELETE   /api/v1/accounts/{id}                disconnect: settings, cursors and links go
POST     /api/v1/accounts/{id}/actions        CRM to mailbox: delete or archive an email
PUT      /api/v1/imap/push                    a mail server's news (Dovecot push_notification)
=======  ===================================  =============================================

The push route is the one not behind an admin token: Dovecot's ``ox`` driver authenticates with
the credentials in its URL (HTTP Basic, the password being ``[imap] push_secret``).
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
from typing import Annotated, Any, Literal

from fastapi import APIRouter, HTTPException, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from gateway.api.deps import Admin, ApiContext, Context, service
from gateway.errors import ConfigError
from gateway.imap.accounts import AccountCreate, AccountError, AccountPublic, AccountUpdate
from gateway.imap.oauth import PENDING_SECONDS
from gateway.imap.service import ImapService


class MailboxAction(BaseModel):
    model_config = ConfigDict(extra="forbid")

    message_id: str = Field(max_length=998, description="the email's Message-ID")
    action: Literal["delete", "archive"]


def _service(context: ApiContext) -> ImapService:
    return service(
        context,
        "imap",
        ImapService,
        "IMAP sync is not running in this gateway (see [imap] enabled)",
    )


def _refused(exc: AccountError | ConfigError) -> HTTPException:
    if isinstance(exc, ConfigError):
        return HTTPException(503, str(exc))
    return HTTPException(exc.status, str(exc))


def router() -> APIRouter:
    routes = APIRouter(prefix="/api/v1/accounts", tags=["accounts"])

    @routes.post("", status_code=201)
    async def add_account(
        context: Context,
        _admin: Admin,
        data: AccountCreate,
        test: Annotated[bool, Query(description="log in first; false stores blindly")] = True,
    ) -> AccountPublic:
        """Connect a mailbox: a provider preset or a custom IMAP/SMTP set-up."""
        try:
            return await _service(context).add_account(data, test=test)
        except (AccountError, ConfigError) as exc:
            raise _refused(exc) from None

    @routes.post("/oauth")
    async def oauth_start(context: Context, _admin: Admin, data: AccountCreate) -> dict[str, Any]:
        """Connect a mailbox by signing in at its provider (Gmail, Microsoft) instead of a
        password: open ``authorize_url`` as the mailbox's owner; the account is made when the
        provider sends the browser back to the callback."""
        try:
            url = await _service(context).oauth_start(data)
        except (AccountError, ConfigError) as exc:
            raise _refused(exc) from None
        return {"authorize_url": url, "expires_in": PENDING_SECONDS}

    @routes.get("/oauth/callback")
    async def oauth_callback(
        context: Context,
        state: Annotated[str, Query(max_length=200)] = "",
        code: Annotated[str, Query(max_length=4096)] = "",
        error: Annotated[str, Query(max_length=200)] = "",
        error_description: Annotated[str, Query(max_length=1000)] = "",
    ) -> AccountPublic:
        """Where the provider returns the browser (no admin token: the single-use ``state``
        of the authorization is what proves the request)."""
        if error:
            raise HTTPException(
                400, f"the provider did not authorize the mailbox: {error} {error_description}"
            )
        if not state or not code:
            raise HTTPException(400, "expected the provider's code and state in the query")
        try:
            return await _service(context).oauth_finish(code=code, state=state)
        except (AccountError, ConfigError) as exc:
            raise _refused(exc) from None

    @routes.post("/test")
    async def try_setup(context: Context, _admin: Admin, data: AccountCreate) -> dict[str, Any]:
        """Log in with a set-up without storing it; ``ok`` false carries the reason in words."""
        try:
            report = await _service(context).test_new(data)
        except (AccountError, ConfigError) as exc:
            raise _refused(exc) from None
        return report.as_dict()

    @routes.get("")
    async def list_accounts(
        context: Context,
        _admin: Admin,
        owner: Annotated[str | None, Query(max_length=320)] = None,
    ) -> dict[str, list[AccountPublic]]:
        return {"accounts": await _service(context).list_accounts(owner=owner)}

    @routes.get("/{account_id}")
    async def get_account(context: Context, _admin: Admin, account_id: str) -> AccountPublic:
        try:
            return await _service(context).get_account(account_id)
        except AccountError as exc:
            raise _refused(exc) from None

    @routes.post("/{account_id}/test")
    async def check_account(context: Context, _admin: Admin, account_id: str) -> dict[str, Any]:
        try:
            report = await _service(context).test_account(account_id)
        except (AccountError, ConfigError) as exc:
            raise _refused(exc) from None
        return report.as_dict()

    @routes.patch("/{account_id}")
    async def update_account(
        context: Context, _admin: Admin, account_id: str, patch: AccountUpdate
    ) -> AccountPublic:
        """Disable (pause) or enable, a new password (reconnect), sharing, folders, mode."""
        try:
            return await _service(context).update_account(account_id, patch)
        except (AccountError, ConfigError) as exc:
            raise _refused(exc) from None

    @routes.delete("/{account_id}")
    async def delete_account(context: Context, _admin: Admin, account_id: str) -> dict[str, Any]:
        """Disconnect: stop syncing and delete the settings and cursor (logged mail stays)."""
        try:
            await _service(context).delete_account(account_id)
        except AccountError as exc:
            raise _refused(exc) from None
        return {"id": account_id, "disconnected": True}

    @routes.post("/{account_id}/oauth")
    async def oauth_reconnect(context: Context, _admin: Admin, account_id: str) -> dict[str, Any]:
        """Sign the mailbox in again (after ``auth_failed``, or to move it from a password to
        OAuth); syncing resumes from its cursor once the provider sends the browser back."""
        try:
            url = await _service(context).oauth_reconnect(account_id)
        except (AccountError, ConfigError) as exc:
            raise _refused(exc) from None
        return {"authorize_url": url, "expires_in": PENDING_SECONDS}

    @routes.post("/{account_id}/actions")
    async def mailbox_action(
        context: Context, _admin: Admin, account_id: str, action: MailboxAction
    ) -> dict[str, Any]:
        """Delete (to Trash) or archive a logged email in the mailbox, if the account allows."""
        try:
            return await _service(context).mailbox_action(
                account_id, action.message_id, action.action
            )
        except (AccountError, ConfigError) as exc:
            raise _refused(exc) from None

    return routes


def _push_allowed(secret: str, authorization: str) -> bool:
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() == "basic":
        try:
            _user, _, value = base64.b64decode(value, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
    elif scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(value.encode(), secret.encode())


def push_router() -> APIRouter:
    routes = APIRouter(prefix="/api/v1/imap", tags=["accounts"])

    @routes.api_route("/push", methods=["PUT", "POST"], status_code=202)
    async def push(context: Context, request: Request) -> dict[str, Any]:
        """News from a mail server (Dovecot's push_notification ``ox`` driver): the mailbox
        named by ``user`` is synced now instead of after the server's IDLE delay."""
        service = _service(context)
        secret = service.settings.push_secret
        if not secret:
            raise HTTPException(404, "push is off in this gateway; set [imap] push_secret")
        if not _push_allowed(secret, request.headers.get("authorization", "")):
            raise HTTPException(
                401,
                "push needs [imap] push_secret as the password in the server's URL",
                headers={"WWW-Authenticate": 'Basic realm="mailgate push"'},
            )
        body = await request.body()
        try:
            news = json.loads(body) if len(body) <= 65536 else None
        except ValueError:
            news = None
        if not isinstance(news, dict) or not isinstance(news.get("user"), str):
            raise HTTPException(400, 'expected a JSON object with the mailbox\'s "user"')
        folder = news.get("folder")
        nudged = await service.pushed(
            news["user"][:320], folder if isinstance(folder, str) else "INBOX"
        )
        return {"nudged": nudged}

    return routes
