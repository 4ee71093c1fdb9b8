"""The people who may submit mail: accounts, their addresses, passwords and admin API tokens.

Passwords are hashed with Argon2id (argon2-cffi: salted, memory-hard, deliberately slow), so the
check runs in a worker thread and never stalls the event loop. An unknown login is checked against
a dummy hash so response time does not tell which logins exist. Functions here take an explicit
SQLModel session; the CLI and the admin API share them.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import time

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import Engine
from sqlmodel import Session, col, select

from gateway.message import normalise_address
from gateway.smtp.policy import Identity, is_mailbox
from gateway.store.models import ApiToken, User, UserAddress

_HASHER = PasswordHasher()  # argon2-cffi's defaults follow RFC 9106's second recommendation
_DUMMY_HASH = _HASHER.hash("not a real password")
MIN_PASSWORD_LENGTH = 10


class UserError(ValueError):
    """A refused change, with a sentence that says what to do instead."""


def hash_password(password: str) -> str:
    if len(password) < MIN_PASSWORD_LENGTH:
        raise UserError(f"the password is too short: use at least {MIN_PASSWORD_LENGTH} characters")
    return _HASHER.hash(password)


def _check_address(address: str) -> str:
    normalised = normalise_address(address)
    if normalised.startswith("@") and "." in normalised:
        return normalised  # a whole-domain alias
    if not is_mailbox(normalised):
        raise UserError(f"{address!r} is not an email address (user@domain)")
    return normalised


def add_user(
    session: Session,
    *,
    email: str,
    password: str,
    is_admin: bool = False,
    aliases: list[str] | None = None,
) -> User:
    login = _check_address(email)
    if session.exec(select(User).where(User.email == login)).first():
        raise UserError(f"user {login} exists already; use `mailgate user passwd` to change it")
    user = User(
        email=login,
        password_hash=hash_password(password),
        is_admin=is_admin,
        created_at=time.time(),
    )
    session.add(user)
    session.flush()
    assert user.id is not None
    for address in [login, *(aliases or [])]:
        add_address(session, user=user, address=address)
    return user


def add_address(session: Session, *, user: User, address: str) -> UserAddress:
    normalised = _check_address(address)
    existing = session.exec(select(UserAddress).where(UserAddress.address == normalised)).first()
    if existing is not None:
        if existing.user_id == user.id:
            return existing
        raise UserError(f"{normalised} already belongs to another user")
    assert user.id is not None
    row = UserAddress(user_id=user.id, address=normalised)
    session.add(row)
    return row


def get_user(session: Session, email: str) -> User:
    user = session.exec(select(User).where(User.email == normalise_address(email))).first()
    if user is None:
        raise UserError(f"no user {email}; `mailgate user list` shows who exists")
    return user


def set_password(session: Session, *, email: str, password: str) -> User:
    user = get_user(session, email)
    user.password_hash = hash_password(password)
    session.add(user)
    return user


def set_disabled(session: Session, *, email: str, disabled: bool) -> User:
    user = get_user(session, email)
    user.disabled = disabled
    session.add(user)
    return user


def list_users(session: Session) -> list[tuple[User, list[str]]]:
    users = session.exec(select(User).order_by(col(User.email))).all()
    addresses = session.exec(select(UserAddress)).all()
    by_user: dict[int, list[str]] = {}
    for row in addresses:
        by_user.setdefault(row.user_id, []).append(row.address)
    return [(user, sorted(by_user.get(user.id or 0, []))) for user in users]


def identity_of(session: Session, user: User) -> Identity:
    rows = session.exec(select(UserAddress.address).where(UserAddress.user_id == user.id)).all()
    return Identity(
        login=user.email,
        addresses=frozenset(a for a in rows if not a.startswith("@")),
        domains=frozenset(a[1:] for a in rows if a.startswith("@")),
    )


def create_token(session: Session, *, email: str, label: str = "") -> str:
    """A new admin API token; only its hash is stored, so this is the one time it is shown."""
    user = get_user(session, email)
    if not user.is_admin:
        raise UserError(f"{user.email} is not an admin; only admins get API tokens")
    token = "mgt_" + secrets.token_urlsafe(32)
    assert user.id is not None
    session.add(
        ApiToken(user_id=user.id, token_sha256=_sha256(token), label=label, created_at=time.time())
    )
    return token


def user_for_token(session: Session, token: str) -> User | None:
    row = session.exec(select(ApiToken).where(ApiToken.token_sha256 == _sha256(token))).first()
    if row is None:
        return None
    user = session.get(User, row.user_id)
    return user if user is not None and not user.disabled else None


def _sha256(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class Authenticator:
    """Checks SMTP AUTH credentials against the user table, off the event loop."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    async def verify(self, login: str, password: str) -> Identity | None:
        return await asyncio.to_thread(self._verify, login, password)

    def _verify(self, login: str, password: str) -> Identity | None:
        with Session(self._engine) as session:
            user = session.exec(select(User).where(User.email == normalise_address(login))).first()
            stored = user.password_hash if user and not user.disabled else _DUMMY_HASH
            try:
                _HASHER.verify(stored, password)
            except (VerificationError, InvalidHashError):
                return None
            if user is None or user.disabled:
                return None
            return identity_of(session, user)
