"""Who is who for the capture door: users' addresses, and their secret capture addresses.

A :class:`Directory` is a snapshot of the enabled users, the addresses they may send as
(``@domain`` aliases included, as the submission door allows them) and their capture tokens.
The door reads it through :class:`DirectoryCache`, reloaded every few seconds in a thread, so
RCPT and DATA never wait for the database; the ``identify-owner`` step loads a fresh one, so a
user disabled a moment ago is not logged. Tokens are 120 random bits in lower-case base32, so
they survive mail systems that fold the local part's case.
"""

from __future__ import annotations

import asyncio
import base64
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from sqlalchemy import Engine
from sqlmodel import Session, col, select

from gateway.capture.models import CaptureToken
from gateway.capture.settings import CaptureSettings
from gateway.message import domain_of, normalise_address
from gateway.store.models import User, UserAddress
from gateway.users import get_user


@dataclass(frozen=True, slots=True)
class Directory:
    addresses: Mapping[str, str] = field(default_factory=dict)  # address -> owner's login
    domains: Mapping[str, str] = field(default_factory=dict)  # domain (an @alias) -> owner
    tokens: Mapping[str, str] = field(default_factory=dict)  # token -> owner's login
    own: Mapping[str, frozenset[str]] = field(default_factory=dict)  # owner -> addresses

    def owner_of(self, address: str) -> str | None:
        """The user whose address this is; an exact address wins over a domain alias."""
        address = normalise_address(address)
        return self.addresses.get(address) or self.domains.get(domain_of(address))

    def token_owner(self, token: str) -> str | None:
        return self.tokens.get(token.lower())

    def addresses_of(self, owner: str) -> frozenset[str]:
        return self.own.get(owner, frozenset())


def load_directory(session: Session) -> Directory:
    users = {u.id: u for u in session.exec(select(User)).all() if not u.disabled}
    addresses: dict[str, str] = {}
    domains: dict[str, str] = {}
    own: dict[str, set[str]] = {u.email: {u.email} for u in users.values()}
    for row in session.exec(select(UserAddress)).all():
        user = users.get(row.user_id)
        if user is None:
            continue
        if row.address.startswith("@"):
            domains[row.address[1:]] = user.email
        else:
            addresses[row.address] = user.email
            own[user.email].add(row.address)
    tokens = {
        row.token: users[row.user_id].email
        for row in session.exec(select(CaptureToken)).all()
        if row.user_id in users
    }
    return Directory(
        addresses=addresses,
        domains=domains,
        tokens=tokens,
        own={owner: frozenset(found) for owner, found in own.items()},
    )


def read_directory(engine: Engine) -> Directory:
    with Session(engine) as session:
        return load_directory(session)


class DirectoryCache:
    """The door's view of the directory, at most ``max_age`` seconds old."""

    def __init__(
        self, engine: Engine, *, max_age: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.engine = engine
        self.max_age = max_age
        self.clock = clock
        self._directory: Directory | None = None
        self._loaded_at = 0.0
        self._lock = asyncio.Lock()

    async def get(self) -> Directory:
        if self._directory is not None and self.clock() - self._loaded_at < self.max_age:
            return self._directory
        async with self._lock:
            if self._directory is None or self.clock() - self._loaded_at >= self.max_age:
                self._directory = await asyncio.to_thread(read_directory, self.engine)
                self._loaded_at = self.clock()
            return self._directory


# -- secret capture addresses ------------------------------------------------------------------


def new_token() -> str:
    return base64.b32encode(secrets.token_bytes(15)).decode("ascii").lower()


def address_for(token: str, settings: CaptureSettings) -> str:
    return f"{settings.local_part}+{token}@{settings.domain}"


def capture_address(
    session: Session, *, email: str, settings: CaptureSettings, rotate: bool = False
) -> str:
    """The user's secret capture address, made on first use; ``rotate`` replaces it for good."""
    user = get_user(session, email)
    assert user.id is not None
    row = session.get(CaptureToken, user.id)
    if row is None:
        row = CaptureToken(user_id=user.id, token=new_token(), created_at=time.time())
    elif rotate:
        row.token = new_token()
        row.created_at = time.time()
    session.add(row)
    session.flush()
    return address_for(row.token, settings)


def capture_addresses(session: Session, settings: CaptureSettings) -> list[tuple[str, str]]:
    """(user, secret address) for every user who has one."""
    rows = session.exec(
        select(User.email, CaptureToken.token)
        .join(CaptureToken, col(CaptureToken.user_id) == col(User.id))
        .order_by(col(User.email))
    ).all()
    return [(email, address_for(token, settings)) for email, token in rows]
