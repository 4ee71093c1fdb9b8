"""FastAPI dependencies, aliased so routes read as prose: ``SessionDep`` (one session per
request; on SQLite a mutating request first queues for the writer lock), ``CurrentUser`` (the
Bearer token's user), ``AdminUser``, ``ViewerDep`` (the user plus the organisation's sharing
rule), ``SettingsDep`` and ``DbDep`` (from ``app.state``, never a module global)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlmodel import Session

from crm_api import crud
from crm_api.db import Database
from crm_api.errors import Forbidden, Unauthorized
from crm_api.models import Role, User
from crm_api.settings import Settings
from crm_api.visibility import Viewer

_MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
# POST only to carry a body (or to call the gateway); they store nothing, and must not queue
# behind webhook batches.
_READ_ONLY_POSTS = frozenset({"/api/v1/contacts/match", "/api/v1/emails/send"})
_bearer = HTTPBearer(auto_error=False, description="an API token from `mailgate crm token create`")


def get_db(request: Request) -> Database:
    db: Database = request.app.state.db
    return db


def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


DbDep = Annotated[Database, Depends(get_db)]
SettingsDep = Annotated[Settings, Depends(get_settings)]


async def get_session(request: Request, db: DbDep) -> AsyncIterator[Session]:
    if request.method in _MUTATING and request.url.path not in _READ_ONLY_POSTS:
        async with db.writer():
            session = Session(db.engine, expire_on_commit=False)
            try:
                yield session
            finally:
                await run_in_threadpool(session.close)
    else:
        session = Session(db.engine, expire_on_commit=False)
        try:
            yield session
        finally:
            await run_in_threadpool(session.close)


SessionDep = Annotated[Session, Depends(get_session)]


def get_current_user(
    session: SessionDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> User:
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise Unauthorized("missing API token: send 'Authorization: Bearer <token>'")
    user = crud.user_for_token(session=session, token=credentials.credentials)
    if user is None:
        raise Unauthorized("invalid API token; create one with `mailgate crm token create EMAIL`")
    return user


CurrentUser = Annotated[User, Depends(get_current_user)]


def get_admin(user: CurrentUser) -> User:
    if user.role != Role.admin:
        raise Forbidden("this needs an admin's token")
    return user


AdminUser = Annotated[User, Depends(get_admin)]


def get_viewer(session: SessionDep, user: CurrentUser) -> Viewer:
    return Viewer.of(user, crud.get_org(session=session))


ViewerDep = Annotated[Viewer, Depends(get_viewer)]
