"""Dependencies of the admin API's routes, aliased so routes read as prose.

``Context`` is what the composition root handed the app (store, engine, metrics, services);
``Admin`` is the e-mail of the admin whose bearer token came with the request (401 otherwise).
Feature packages import these for their own routers.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, TypeVar

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import Engine
from sqlmodel import Session

from gateway.links import valid
from gateway.metrics import Metrics
from gateway.store.queue import Store
from gateway.users import user_for_token


@dataclass(frozen=True, slots=True)
class ApiContext:
    store: Store
    engine: Engine
    metrics: Metrics
    wake: Callable[[str], None]
    # Key of signed links to raw messages and attachments (hooks.link_secret).
    link_secret: str = ""
    # Services of feature packages, by name (e.g. "imap"), for their routers.
    services: dict[str, Any] = field(default_factory=dict)


T = TypeVar("T")


def service(context: ApiContext, name: str, kind: type[T], unavailable: str) -> T:
    """The feature service ``name`` of type ``kind``, or a 503 saying ``unavailable``."""
    found = context.services.get(name)
    if not isinstance(found, kind):
        raise HTTPException(503, unavailable)
    return found


_bearer = HTTPBearer(auto_error=False, description="an admin token from `mailgate token create`")


def _context(request: Request) -> ApiContext:
    context: ApiContext = request.app.state.context
    return context


Context = Annotated[ApiContext, Depends(_context)]


async def _admin(
    context: Context,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> str:
    if credentials is None:
        raise HTTPException(401, "an admin token is required: Authorization: Bearer <token>")

    def lookup() -> str | None:
        with Session(context.engine) as session:
            user = user_for_token(session, credentials.credentials)
            return user.email if user is not None and user.is_admin else None

    email = await asyncio.to_thread(lookup)
    if email is None:
        raise HTTPException(401, "this token is not valid (revoked, or its user is disabled)")
    return email


Admin = Annotated[str, Depends(_admin)]


async def _link_or_admin(
    request: Request,
    context: Context,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> str:
    """A valid signed link (``?expires=&sig=``) for exactly this path, or an admin token."""
    expires = request.query_params.get("expires", "")
    sig = request.query_params.get("sig", "")
    if expires and sig:
        if expires.isdigit() and valid(
            request.url.path, expires=int(expires), sig=sig, secret=context.link_secret
        ):
            return "link"
        raise HTTPException(403, "this link is invalid or has expired; ask the CRM for a new one")
    return await _admin(context, credentials)


LinkOrAdmin = Annotated[str, Depends(_link_or_admin)]
