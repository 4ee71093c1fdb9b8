"""Users: admins list and add them; everyone can read and tune themselves. Tokens are made
with the CLI (``mailgate crm token create``) so that a token is only ever shown on a terminal."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from crm_api import crud
from crm_api.deps import AdminUser, CurrentUser, SessionDep
from crm_api.models import ThreadOrder, UserCreate, UserPublic, UserSettingsUpdate, UsersPublic

router = APIRouter(prefix="/users", tags=["users"])


def public(user: object) -> UserPublic:
    return UserPublic.model_validate(user, from_attributes=True)


@router.get("", response_model=UsersPublic)
def list_users(
    session: SessionDep,
    _admin: AdminUser,
    offset: Annotated[int, Query(ge=0)] = 0,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> UsersPublic:
    users, count = crud.list_users(session=session, offset=offset, limit=limit)
    return UsersPublic(data=[public(u) for u in users], count=count)


@router.post("", response_model=UserPublic, status_code=201)
def create_user(session: SessionDep, _admin: AdminUser, user_in: UserCreate) -> UserPublic:
    user = crud.create_user(session=session, user_in=user_in)
    session.commit()
    return public(user)


@router.get("/me", response_model=UserPublic)
def read_me(user: CurrentUser) -> UserPublic:
    return public(user)


@router.patch("/me/settings", response_model=UserPublic)
def update_my_settings(
    session: SessionDep, user: CurrentUser, update: UserSettingsUpdate
) -> UserPublic:
    user.thread_order = ThreadOrder(update.thread_order)
    session.add(user)
    session.commit()
    return public(user)
