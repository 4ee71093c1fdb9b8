"""The gateway's side of ``POST /api/v1/contacts/match``: which addresses are CRM contacts.

Callers ask about any number of addresses for one owner; the client answers from a short-lived
cache where it can, asks the CRM for the rest in batches (the contract allows 1,000 per call), and
returns one :class:`MatchAnswer` with the CRM's policy. The ``httpx.AsyncClient`` is injected, so
tests and the app decide its transport and limits. A CRM that is down or answers garbage raises
:class:`gateway.errors.Defer`: the message waits and is matched later, never logged half-matched.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx

from gateway.errors import Defer
from gateway.message import normalise_address

AutoCreate = Literal["none", "sent", "sent_and_received"]


@dataclass(frozen=True, slots=True)
class ContactMatch:
    address: str
    contact_id: int
    owner: str | None
    primary: bool
    assigned_to_owner: bool


@dataclass(frozen=True, slots=True)
class Policy:
    auto_create: AutoCreate = "none"
    excluded_domains: frozenset[str] = frozenset()
    assigned_records_only: bool = False


@dataclass(frozen=True, slots=True)
class MatchAnswer:
    contacts: dict[str, ContactMatch] = field(default_factory=dict)
    policy: Policy = Policy()


class CrmClient:
    """Batched, cached contact matching against one CRM."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        *,
        base_url: str,
        token: str,
        cache_seconds: float = 60.0,
        batch_size: int = 500,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client = client
        self.url = base_url.rstrip("/") + "/api/v1/contacts/match"
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.cache_seconds = cache_seconds
        self.batch_size = batch_size
        self.clock = clock
        # (owner, address) -> (expires, match or None); policy per owner -> (expires, policy)
        self._cache: dict[tuple[str, str], tuple[float, ContactMatch | None]] = {}
        self._policy: dict[str, tuple[float, Policy]] = {}

    async def match(self, addresses: Iterable[str], *, owner: str) -> MatchAnswer:
        now = self.clock()
        wanted = list(dict.fromkeys(normalise_address(a) for a in addresses if "@" in a))
        contacts: dict[str, ContactMatch] = {}
        unknown: list[str] = []
        for address in wanted:
            cached = self._cache.get((owner, address))
            if cached and cached[0] > now:
                if cached[1] is not None:
                    contacts[address] = cached[1]
            else:
                unknown.append(address)
        policy_cached = self._policy.get(owner)
        policy = policy_cached[1] if policy_cached and policy_cached[0] > now else None
        if unknown or policy is None:
            batches = [
                unknown[i : i + self.batch_size] for i in range(0, len(unknown), self.batch_size)
            ]
            for batch in batches or [[]]:
                found, policy = await self._ask(batch, owner)
                expires = self.clock() + self.cache_seconds
                for address in batch:
                    self._cache[(owner, address)] = (expires, found.get(address))
                contacts.update(found)
                self._policy[owner] = (expires, policy)
        assert policy is not None
        return MatchAnswer(contacts=contacts, policy=policy)

    async def _ask(
        self, batch: Sequence[str], owner: str
    ) -> tuple[dict[str, ContactMatch], Policy]:
        try:
            response = await self.client.post(
                self.url, json={"addresses": list(batch), "owner": owner}, headers=self.headers
            )
        except httpx.HTTPError as exc:
            raise Defer(f"451 4.4.1 CRM unreachable for contact matching ({exc!r})") from None
        if response.status_code != 200:
            raise Defer(
                f"451 4.4.1 CRM answered {response.status_code} to contact matching: "
                f"{response.text[:200]}"
            )
        try:
            return _parse(response.json())
        except (ValueError, KeyError, TypeError) as exc:
            raise Defer(f"451 4.4.1 CRM sent an unreadable match answer ({exc})") from None


def _parse(body: dict[str, Any]) -> tuple[dict[str, ContactMatch], Policy]:
    found: dict[str, ContactMatch] = {}
    for result in body["results"]:
        if result.get("contact_id") is None or not result.get("normalized"):
            continue
        address = normalise_address(result["normalized"])
        found[address] = ContactMatch(
            address=address,
            contact_id=int(result["contact_id"]),
            owner=result.get("owner"),
            primary=result.get("match") == "primary",
            assigned_to_owner=bool(result.get("assigned_to_owner")),
        )
    raw = body["policy"]
    auto_create = raw.get("auto_create", "none")
    if auto_create not in ("none", "sent", "sent_and_received"):
        raise ValueError(f"unknown auto_create {auto_create!r}")
    policy = Policy(
        auto_create=auto_create,
        excluded_domains=frozenset(d.lower() for d in raw.get("excluded_domains", [])),
        assigned_records_only=bool(raw.get("assigned_records_only", False)),
    )
    return found, policy
