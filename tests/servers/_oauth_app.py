"""A small OAuth 2.0 authorization server for tests, served by :mod:`tests.servers.uvicorn`.

It speaks the parts of RFC 6749 / RFC 7636 a mail client meets at Google or Microsoft: an
authorization endpoint (the user "consents" at once: it redirects back with a code for the
``login_hint``), a token endpoint (authorization code with PKCE S256, refresh token with
rotation, ``invalid_grant`` once revoked) and a userinfo endpoint that Dovecot's oauth2 passdb
asks whether an access token is good (``introspection_mode = auth``). ``POST /admin/revoke``
withdraws a user's grants (what a user does in their account's security page) and
``GET /stats`` counts grants, so tests can see a refresh happen. Configuration by environment:
``OAUTH_CLIENT_ID``, ``OAUTH_CLIENT_SECRET``, ``OAUTH_TOKEN_SECONDS``.
"""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
import time
from typing import Annotated, Any
from urllib.parse import parse_qs, urlencode

from fastapi import FastAPI, Header, HTTPException, Query, Request
from fastapi.responses import JSONResponse, RedirectResponse


def create_app() -> FastAPI:
    app = FastAPI()
    client_id = os.environ["OAUTH_CLIENT_ID"]
    client_secret = os.environ["OAUTH_CLIENT_SECRET"]
    lifetime = int(os.environ.get("OAUTH_TOKEN_SECONDS", "3600"))
    codes: dict[str, dict[str, str]] = {}
    access: dict[str, tuple[str, float]] = {}  # token -> (user, expires at)
    refresh: dict[str, str] = {}  # token -> user
    stats = {"authorization_code": 0, "refresh_token": 0, "refused": 0}

    def issue(user: str) -> dict[str, Any]:
        token, renewal = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
        access[token] = (user, time.time() + lifetime)
        refresh[renewal] = user
        return {
            "access_token": token,
            "refresh_token": renewal,
            "expires_in": lifetime,
            "token_type": "Bearer",
        }

    def refused(error: str, description: str) -> JSONResponse:
        stats["refused"] += 1
        return JSONResponse({"error": error, "error_description": description}, status_code=400)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/authorize")
    def authorize(
        response_type: str,
        client_id_: Annotated[str, Query(alias="client_id")],
        redirect_uri: str,
        state: str,
        code_challenge: str,
        login_hint: str,
        code_challenge_method: str = "plain",
        scope: str = "",
    ) -> RedirectResponse:
        if client_id_ != client_id or response_type != "code" or code_challenge_method != "S256":
            raise HTTPException(400, "bad authorization request")
        code = secrets.token_urlsafe(16)
        codes[code] = {
            "redirect_uri": redirect_uri,
            "challenge": code_challenge,
            "user": login_hint,
        }
        return RedirectResponse(f"{redirect_uri}?{urlencode({'code': code, 'state': state})}")

    @app.post("/token", response_model=None)
    async def token(request: Request) -> dict[str, Any] | JSONResponse:
        form = await _form(request)
        if form.get("client_id") != client_id or form.get("client_secret") != client_secret:
            return refused("invalid_client", "unknown client or wrong secret")
        grant_type = form.get("grant_type", "")
        if grant_type == "authorization_code":
            grant = codes.pop(form.get("code", ""), None)
            digest = hashlib.sha256(form.get("code_verifier", "").encode()).digest()
            challenge = base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
            if grant is None or grant["redirect_uri"] != form.get("redirect_uri"):
                return refused("invalid_grant", "unknown code or another redirect_uri")
            if grant["challenge"] != challenge:
                return refused("invalid_grant", "PKCE verification failed")
            stats["authorization_code"] += 1
            return issue(grant["user"])
        if grant_type == "refresh_token":
            # Rotation: each refresh token works once.
            user = refresh.pop(form.get("refresh_token", ""), None)
            if user is None:
                return refused("invalid_grant", "the refresh token was revoked or used")
            stats["refresh_token"] += 1
            return issue(user)
        return refused("unsupported_grant_type", grant_type)

    @app.get("/userinfo")
    def userinfo(authorization: Annotated[str, Header()] = "") -> dict[str, Any]:
        scheme, _, value = authorization.partition(" ")
        found = access.get(value) if scheme.lower() == "bearer" else None
        if found is None or found[1] < time.time():
            raise HTTPException(401, "invalid token")
        return {"email": found[0], "active": True}

    @app.post("/admin/revoke")
    async def revoke(request: Request) -> dict[str, int]:
        user = (await _form(request)).get("user", "")
        gone = [t for t, (u, _) in access.items() if u == user]
        gone += [t for t, u in refresh.items() if u == user]
        for t in gone:
            access.pop(t, None)
            refresh.pop(t, None)
        return {"revoked": len(gone)}

    @app.get("/stats")
    def get_stats() -> dict[str, int]:
        return dict(stats)

    return app


async def _form(request: Request) -> dict[str, str]:
    """An ``application/x-www-form-urlencoded`` body (without python-multipart)."""
    return {k: v[0] for k, v in parse_qs((await request.body()).decode()).items()}
