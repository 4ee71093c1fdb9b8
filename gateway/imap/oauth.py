"""OAuth 2.0 for mailboxes that refuse passwords: Google (Gmail) and Microsoft (365, Outlook.com).

The authorization-code flow with PKCE (RFC 6749 §4.1, RFC 7636): an admin asks the gateway for an
authorization URL, the mailbox's owner allows access at the provider, the provider redirects to
the gateway's callback with a code, and the gateway exchanges it for an access token (an hour)
and a refresh token (until revoked). The tokens are kept encrypted like passwords and handed to
IMAP and SMTP as SASL XOAUTH2. The access token is refreshed shortly before it expires; a refresh
the provider refuses (``invalid_grant``: revoked, password changed, consent withdrawn) is an
authentication failure, so the account ends in ``auth_failed`` and waits to be authorized again.

Which provider uses which client comes from the presets (``oauth = "google"``); the client's id
and secret from ``[imap]``; a preset may name its own endpoints (a self-hosted identity provider).
Nothing here logs a token.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

import httpx

from gateway.imap.errors import AuthFailed, ServerError
from gateway.imap.presets import Provider
from gateway.imap.settings import ImapSettings

# Refresh this long before the provider's expiry, so a token never dies mid-session.
EARLY_REFRESH_SECONDS = 120
PENDING_SECONDS = 15 * 60  # an authorization link is good for this long


@dataclass(frozen=True, slots=True)
class _Endpoints:
    authorize_url: str  # "{tenant}" is filled in for Microsoft
    token_url: str
    scopes: tuple[str, ...]
    extra: dict[str, str]


ENDPOINTS = {
    "google": _Endpoints(
        authorize_url="https://accounts.google.com/o/oauth2/v2/auth",
        token_url="https://oauth2.googleapis.com/token",
        scopes=("https://mail.google.com/",),
        # A refresh token is only issued with offline access, and again only on a new consent.
        extra={"access_type": "offline", "prompt": "consent"},
    ),
    "microsoft": _Endpoints(
        authorize_url="https://login.microsoftonline.com/{tenant}/oauth2/v2.0/authorize",
        token_url="https://login.microsoftonline.com/{tenant}/oauth2/v2.0/token",
        scopes=(
            "https://outlook.office.com/IMAP.AccessAsUser.All",
            "https://outlook.office.com/SMTP.Send",
            "offline_access",
        ),
        extra={"prompt": "select_account"},
    ),
}


class OAuthError(ValueError):
    """A flow that cannot go on, with the sentence for the admin."""


@dataclass(frozen=True, slots=True)
class OAuthClient:
    name: str  # "google" | "microsoft"
    client_id: str
    client_secret: str
    authorize_url: str
    token_url: str
    scopes: tuple[str, ...]
    extra: dict[str, str] = field(default_factory=dict)


def client_for(provider: Provider | None, settings: ImapSettings) -> OAuthClient:
    """The OAuth client of a preset, or an :class:`OAuthError` saying what to configure."""
    if provider is None or not provider.oauth:
        name = provider.name if provider else "a custom set-up"
        raise OAuthError(f"{name} has no OAuth sign-in here; connect it with a password")
    kind = provider.oauth
    base = ENDPOINTS.get(kind)
    if base is None:
        raise OAuthError(f"preset {provider.key}: unknown oauth client {kind!r}")
    client_id = str(getattr(settings, f"{kind}_client_id"))
    if not client_id:
        raise OAuthError(
            f"OAuth for {provider.name} is not set up: set [imap] {kind}_client_id and "
            f"{kind}_client_secret (an OAuth client registered with {kind.title()}, whose "
            "redirect URI is [imap] oauth_redirect_url)"
        )
    tenant = settings.microsoft_tenant
    return OAuthClient(
        name=kind,
        client_id=client_id,
        client_secret=str(getattr(settings, f"{kind}_client_secret")),
        authorize_url=provider.oauth_authorize_url or base.authorize_url.format(tenant=tenant),
        token_url=provider.oauth_token_url or base.token_url.format(tenant=tenant),
        scopes=tuple(provider.oauth_scopes) or base.scopes,
        extra=dict(base.extra),
    )


@dataclass(frozen=True, slots=True)
class Tokens:
    access_token: str
    refresh_token: str
    expires_at: float

    def fresh(self, now: float) -> bool:
        return self.expires_at - EARLY_REFRESH_SECONDS > now

    def dumps(self) -> str:
        return json.dumps(
            {
                "access_token": self.access_token,
                "refresh_token": self.refresh_token,
                "expires_at": self.expires_at,
            }
        )

    @classmethod
    def loads(cls, text: str) -> Tokens:
        data = json.loads(text)
        return cls(str(data["access_token"]), str(data["refresh_token"]), float(data["expires_at"]))

    def __repr__(self) -> str:  # never a token in a log line or a traceback
        return f"Tokens(expires_at={self.expires_at:.0f})"


@dataclass(frozen=True, slots=True)
class Pending:
    """An authorization in flight: what the admin asked for, waiting for the provider's code."""

    verifier: str
    redirect_uri: str
    request: dict[str, Any]  # the account's choices (or the id of the account to reconnect)
    expires_at: float


class Authorizations:
    """Authorizations in flight, by their ``state`` (single use, a quarter of an hour).

    Kept in the memory of the process that serves the admin API, which is the one the provider
    redirects back to; a restart in between means starting again, as with any sign-in link.
    """

    def __init__(self) -> None:
        self._pending: dict[str, Pending] = {}

    def start(
        self,
        client: OAuthClient,
        *,
        redirect_uri: str,
        login_hint: str,
        request: dict[str, Any],
        now: float | None = None,
    ) -> str:
        """The URL to send the mailbox's owner to."""
        now = time.time() if now is None else now
        self._pending = {k: p for k, p in self._pending.items() if p.expires_at > now}
        state = secrets.token_urlsafe(24)
        verifier = secrets.token_urlsafe(48)  # RFC 7636 §4.1: 43-128 characters
        challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest())
        self._pending[state] = Pending(
            verifier, redirect_uri, request, expires_at=now + PENDING_SECONDS
        )
        query = {
            "response_type": "code",
            "client_id": client.client_id,
            "redirect_uri": redirect_uri,
            "scope": " ".join(client.scopes),
            "state": state,
            "code_challenge": challenge.rstrip(b"=").decode(),
            "code_challenge_method": "S256",
            "login_hint": login_hint,
            **client.extra,
        }
        return f"{client.authorize_url}?{urlencode(query)}"

    def take(self, state: str, now: float | None = None) -> Pending:
        pending = self._pending.pop(state, None)
        if pending is None or pending.expires_at <= (time.time() if now is None else now):
            raise OAuthError(
                "this sign-in link has expired or was already used; start the connection again"
            )
        return pending


async def exchange(
    http: httpx.AsyncClient, client: OAuthClient, *, code: str, pending: Pending
) -> Tokens:
    """The authorization code for tokens (RFC 6749 §4.1.3, with the PKCE verifier)."""
    data = await _token_request(
        http,
        client,
        {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": pending.redirect_uri,
            "code_verifier": pending.verifier,
        },
    )
    if not data.get("refresh_token"):
        raise OAuthError(
            f"{client.name} gave no refresh token (offline access was not granted); "
            "remove the app's access in the account's security settings and start again"
        )
    return _tokens(data, previous_refresh="")


async def refresh(http: httpx.AsyncClient, client: OAuthClient, tokens: Tokens) -> Tokens:
    """A new access token (RFC 6749 §6); the refresh token rotates when the provider says so."""
    data = await _token_request(
        http, client, {"grant_type": "refresh_token", "refresh_token": tokens.refresh_token}
    )
    return _tokens(data, previous_refresh=tokens.refresh_token)


async def _token_request(
    http: httpx.AsyncClient, client: OAuthClient, form: dict[str, str]
) -> dict[str, Any]:
    form = {**form, "client_id": client.client_id}
    if client.client_secret:
        form["client_secret"] = client.client_secret
    try:
        response = await http.post(
            client.token_url, data=form, headers={"Accept": "application/json"}
        )
    except httpx.HTTPError as exc:
        raise ServerError(
            f"{client.name}'s token endpoint did not answer ({type(exc).__name__})"
        ) from None
    try:
        data = response.json()
    except ValueError:
        data = {}
    if not isinstance(data, dict):
        data = {}
    if response.status_code == 200 and data.get("access_token"):
        return data
    error = str(data.get("error", f"HTTP {response.status_code}"))
    if error in ("invalid_grant", "unauthorized_client", "invalid_client"):
        # RFC 6749 §5.2: the grant (or our client) is no longer good: a person must act.
        raise AuthFailed(
            f"{client.name} refused the authorization ({error}: "
            f"{data.get('error_description', 'no reason given')}); authorize the mailbox again"
        )
    raise ServerError(f"{client.name}'s token endpoint failed ({error})")


def _tokens(data: dict[str, Any], *, previous_refresh: str) -> Tokens:
    expires_in = float(data.get("expires_in") or 3600)
    return Tokens(
        access_token=str(data["access_token"]),
        refresh_token=str(data.get("refresh_token") or previous_refresh),
        expires_at=time.time() + expires_in,
    )
