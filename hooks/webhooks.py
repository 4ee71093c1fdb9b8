"""Signed webhooks: the durable outbox, the dispatcher that drains it, and its SSRF guard.

Events are written by :meth:`Outbox.event` inside the transaction of the step that produced them
(one ``outbox`` row, one ``webhook_delivery`` row per subscriber that wants the type), so an event
exists exactly when its cause was recorded. The :class:`Dispatcher` leases due deliveries (the
same lease pattern as the mail queue, so several gateway processes can share the work), POSTs
them with Standard Webhooks headers (``webhook-id`` stable across retries, a fresh
``webhook-timestamp``, one ``v1,`` signature per configured secret so secrets can rotate), and
records the answer: 2xx delivered; 410 disables the subscriber; anything else retries on the
schedule (≈ 5 s … 24 h) and then dead-letters, replayable. Redirects are never followed, replies
are read only up to a cap, every request has a time limit, and the subscriber's host is resolved
and checked before each connection, which then goes to the checked address.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import ipaddress
import logging
import secrets
import socket
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

import httpx
from sqlalchemy import Connection, insert, select, text, update

from gateway.store.models import OutboxEvent, Subscriber, WebhookDelivery
from gateway.store.queue import GroupCommitter, Write
from hooks.events import envelope

log = logging.getLogger(__name__)

OUTBOX = OutboxEvent.__table__  # type: ignore[attr-defined]
DELIVERY = WebhookDelivery.__table__  # type: ignore[attr-defined]
SUBSCRIBER = Subscriber.__table__  # type: ignore[attr-defined]

# RFC 6052 §2.1 well-known NAT64 prefix, and 6to4 (RFC 3056): both embed an IPv4 address.
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")
_6TO4 = ipaddress.ip_network("2002::/16")


def new_secret() -> str:
    """A Standard Webhooks secret: ``whsec_`` and 32 random bytes in base64."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode("ascii")


def secret_key(secret: str) -> bytes:
    return base64.b64decode(secret.removeprefix("whsec_"))


def signature_header(secrets_: Sequence[str], msg_id: str, timestamp: int, body: bytes) -> str:
    """``v1,<sig>`` for each secret, space-separated (the receiver accepts any one)."""
    signatures = []
    for secret in secrets_:
        mac = hmac.new(secret_key(secret), f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256)
        signatures.append("v1," + base64.b64encode(mac.digest()).decode("ascii"))
    return " ".join(signatures)


# -- the outbox ----------------------------------------------------------------------------------


class Outbox:
    """Turns events into rows, inside whatever transaction the caller is writing."""

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock

    def event(self, event_type: str, data: Any, *, event_id: str | None = None) -> Write:
        """The write that stores one event and queues it for every interested subscriber."""
        now = self.clock()
        event_id = event_id or f"msg_{uuid.uuid4().hex}"
        body = envelope(event_type, data, at=datetime.fromtimestamp(now, UTC))

        def write(connection: Connection) -> str:
            connection.execute(
                insert(OUTBOX),
                {"id": event_id, "event_type": event_type, "payload": body, "created_at": now},
            )
            subscribers = connection.execute(
                select(SUBSCRIBER.c.id, SUBSCRIBER.c.event_types).where(SUBSCRIBER.c.enabled)
            ).all()
            rows = [
                {
                    "event_id": event_id,
                    "subscriber_id": sid,
                    "state": "pending",
                    "attempts": 0,
                    "next_attempt_at": now,
                    "created_at": now,
                }
                for sid, types in subscribers
                if not types or event_type in types
            ]
            if rows:
                connection.execute(insert(DELIVERY), rows)
            return event_id

        return write


# -- where a subscriber may be reached ----------------------------------------------------------


class HostResolver(Protocol):
    async def __call__(self, host: str, port: int) -> list[str]: ...


async def system_resolver(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


class UnsafeTarget(Exception):
    """The subscriber's address is not one the gateway may connect to; says why."""


def embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address inside an IPv4-mapped, IPv4-compatible, NAT64 or 6to4 address."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip in _NAT64 or ip in _NAT64_LOCAL:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if int(ip) >> 32 == 0 and int(ip) > 1:  # ::a.b.c.d (deprecated IPv4-compatible form)
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def check_address(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """Refuse anything but a globally routable unicast address (after unwrapping IPv4)."""
    ip = ipaddress.ip_address(address.split("%")[0])
    unwrapped: ipaddress.IPv4Address | ipaddress.IPv6Address = ip
    if isinstance(ip, ipaddress.IPv6Address):
        inner = embedded_ipv4(ip)
        if inner is not None:
            unwrapped = inner
    if not unwrapped.is_global or unwrapped.is_multicast:
        kind = (
            "loopback"
            if unwrapped.is_loopback
            else "link-local (cloud metadata)"
            if unwrapped.is_link_local
            else "private"
            if unwrapped.is_private
            else "not globally routable"
        )
        raise UnsafeTarget(
            f"{address} is {kind}; allow private targets for this subscriber "
            "if it really lives there"
        )
    return ip


@dataclass(frozen=True, slots=True)
class Target:
    url: str  # with the checked IP in place of the name
    host_header: str
    sni: str | None


async def resolve_target(url: str, *, allow_private: bool, resolver: HostResolver) -> Target:
    """Resolve and check the subscriber URL; the request then goes to the checked address."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UnsafeTarget(f"{url!r} is not an http(s) URL")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        literal = ipaddress.ip_address(parts.hostname)
        addresses = [str(literal)]
    except ValueError:
        try:
            addresses = await resolver(parts.hostname, port)
        except OSError as exc:
            raise UnsafeTarget(f"cannot resolve {parts.hostname}: {exc}") from None
    if not addresses:
        raise UnsafeTarget(f"{parts.hostname} has no address")
    checked: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
    problems = []
    for address in addresses:
        try:
            checked.append(
                ipaddress.ip_address(address) if allow_private else check_address(address)
            )
        except UnsafeTarget as exc:
            problems.append(str(exc))
    if problems or not checked:
        # One bad answer is enough to refuse: a name that resolves to both a public and an
        # internal address is a rebinding attempt.
        raise UnsafeTarget("; ".join(problems) or f"{parts.hostname} has no usable address")
    chosen = checked[0]
    host = f"[{chosen}]" if chosen.version == 6 else str(chosen)
    netloc = f"{host}:{port}"
    pinned = urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, ""))
    host_header = parts.netloc.rpartition("@")[2]
    return Target(pinned, host_header, parts.hostname if parts.scheme == "https" else None)


# -- the dispatcher ------------------------------------------------------------------------------


@dataclass(slots=True)
class _Due:
    id: int
    event_id: str
    attempts: int
    payload: str
    subscriber_id: int
    url: str
    secrets: list[str]
    allow_private: bool


class Dispatcher:
    """Delivers the outbox to subscribers, with retries, leases and a dead-letter state."""

    def __init__(
        self,
        *,
        committer: GroupCommitter,
        client: httpx.AsyncClient,
        schedule: Sequence[float],
        concurrency: int = 8,
        timeout: float = 10.0,
        max_response_bytes: int = 65536,
        lease_seconds: float | None = None,
        poll_seconds: float = 1.0,
        resolver: HostResolver = system_resolver,
        clock: Callable[[], float] = time.time,
        owner: str | None = None,
    ) -> None:
        self.committer = committer
        self.client = client
        self.schedule = list(schedule)
        self.concurrency = concurrency
        self.timeout = timeout
        self.max_response_bytes = max_response_bytes
        # A claim covers one round of at most `concurrency` requests, each bounded by `timeout`:
        # a dead process's claims come back soon after that.
        self.lease_seconds = lease_seconds or 2 * timeout + 5
        self.poll_seconds = poll_seconds
        self.resolver = resolver
        self.clock = clock
        self.owner = owner or uuid.uuid4().hex[:16]
        self._tick = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._inflight: set[asyncio.Task[None]] = set()
        self._postgres = committer._engine.dialect.name == "postgresql"

    def wake(self) -> None:
        self._tick.set()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="webhook-dispatcher")

    async def stop(self) -> None:
        # Requests in flight are abandoned; their leases expire and they are sent again.
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for task in list(self._inflight):
            task.cancel()
        if self._inflight:
            await asyncio.wait(self._inflight, timeout=5)

    async def _run(self) -> None:
        # A pipeline, not rounds: whenever a request finishes, its slot is refilled, so one slow
        # subscriber does not hold back the others and throughput does not wait on the slowest.
        inflight = self._inflight
        while True:
            free = self.concurrency - len(inflight)
            due: list[_Due] = []
            if free > 0:
                try:
                    due = await self._claim(free)
                except Exception:
                    log.exception("webhook dispatcher cannot claim work; retrying")
            for item in due:
                task = asyncio.create_task(self._deliver_safely(item))
                inflight.add(task)
                task.add_done_callback(inflight.discard)
                task.add_done_callback(lambda _t: self._tick.set())
            if due and len(due) == free:
                continue  # more may be due right now
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._tick.wait(), self.poll_seconds)
            self._tick.clear()

    async def _deliver_safely(self, item: _Due) -> None:
        try:
            await self._deliver(item)
        except Exception:
            # The lease expires and the event is tried again; nothing is lost.
            log.exception("webhook %s: recording the attempt failed", item.event_id)

    async def dispatch_once(self) -> int:
        """Deliver one batch of due events and wait for them; returns how many were attempted.

        For tests and tools; the running dispatcher keeps its slots full instead.
        """
        due = await self._claim(self.concurrency)
        await asyncio.gather(*(self._deliver(item) for item in due))
        return len(due)

    async def _claim(self, limit: int) -> list[_Due]:
        now = self.clock()
        skip = " FOR UPDATE OF d SKIP LOCKED" if self._postgres else ""
        free = "(d.lease_expires_at IS NULL OR d.lease_expires_at < :now)"
        claim = text(
            "UPDATE webhook_delivery SET lease_owner = :owner, lease_expires_at = :expires "
            f"WHERE id IN (SELECT d.id FROM webhook_delivery d JOIN subscriber s "
            f"ON s.id = d.subscriber_id WHERE d.state = 'pending' AND s.enabled "
            f"AND d.next_attempt_at <= :now AND {free} ORDER BY d.next_attempt_at "
            f"LIMIT {int(limit)}{skip}) AND (lease_expires_at IS NULL OR lease_expires_at < :now) "
            "RETURNING id"
        )
        params = {"owner": self.owner, "expires": now + self.lease_seconds, "now": now}

        def write(connection: Connection) -> list[_Due]:
            ids = [row[0] for row in connection.execute(claim, params)]
            if not ids:
                return []
            rows = connection.execute(
                select(
                    DELIVERY.c.id,
                    DELIVERY.c.event_id,
                    DELIVERY.c.attempts,
                    OUTBOX.c.payload,
                    SUBSCRIBER.c.id,
                    SUBSCRIBER.c.url,
                    SUBSCRIBER.c.secrets,
                    SUBSCRIBER.c.allow_private,
                )
                .join(OUTBOX, OUTBOX.c.id == DELIVERY.c.event_id)
                .join(SUBSCRIBER, SUBSCRIBER.c.id == DELIVERY.c.subscriber_id)
                .where(DELIVERY.c.id.in_(ids))
            ).all()
            return [_Due(*row) for row in rows]

        result: list[_Due] = await self.committer.write(write)
        return result

    async def _deliver(self, item: _Due) -> None:
        status, error = await self._post(item)
        now = self.clock()
        values: dict[str, Any] = {
            "lease_owner": None,
            "lease_expires_at": None,
            "attempts": item.attempts + 1,
            "last_status": status,
            "last_error": error,
        }
        disable = False
        if status is not None and 200 <= status < 300:
            values.update(state="delivered", delivered_at=now, last_error=None)
        elif status == 410:
            # RFC 9110 §15.5.11 Gone: the receiver says it will never want these again.
            values.update(state="dead", last_error="410 Gone: subscriber disabled")
            disable = True
        elif item.attempts >= len(self.schedule):
            values.update(state="dead")
        else:
            values["next_attempt_at"] = now + self.schedule[item.attempts]

        def write(connection: Connection) -> None:
            connection.execute(
                update(DELIVERY)
                .where(DELIVERY.c.id == item.id)
                .where(DELIVERY.c.lease_owner == self.owner)
                .values(**values)
            )
            if disable:
                connection.execute(
                    update(SUBSCRIBER)
                    .where(SUBSCRIBER.c.id == item.subscriber_id)
                    .values(enabled=False, disabled_reason=f"answered 410 Gone at {int(now)}")
                )

        await self.committer.write(write)
        if status is None or not 200 <= status < 300:
            log.warning(
                "webhook %s to subscriber %s: %s",
                item.event_id,
                item.subscriber_id,
                error or status,
            )

    async def _post(self, item: _Due) -> tuple[int | None, str | None]:
        try:
            target = await resolve_target(
                item.url, allow_private=item.allow_private, resolver=self.resolver
            )
        except UnsafeTarget as exc:
            return None, f"refused: {exc}"
        body = item.payload.encode("ascii")
        timestamp = int(self.clock())
        headers = {
            "content-type": "application/json",
            "host": target.host_header,
            "webhook-id": item.event_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": signature_header(item.secrets, item.event_id, timestamp, body),
            "user-agent": "Mailgate-Webhooks/1",
        }
        extensions = {"sni_hostname": target.sni} if target.sni else {}
        try:
            async with asyncio.timeout(self.timeout):
                request = self.client.build_request(
                    "POST",
                    target.url,
                    content=body,
                    headers=headers,
                    extensions=extensions,
                    timeout=self.timeout,
                )
                response = await self.client.send(request, stream=True, follow_redirects=False)
                try:
                    read = 0
                    async for chunk in response.aiter_raw():
                        read += len(chunk)
                        if read >= self.max_response_bytes:
                            break  # nobody needs more of a webhook reply than this
                finally:
                    await response.aclose()
        except (httpx.HTTPError, TimeoutError, OSError) as exc:
            return None, f"{type(exc).__name__}: {exc}"[:500]
        error = None if 200 <= response.status_code < 300 else f"HTTP {response.status_code}"
        if 300 <= response.status_code < 400:
            error = f"HTTP {response.status_code} redirect (not followed)"
        return response.status_code, error


async def replay(
    committer: GroupCommitter, event_id: str, *, clock: Callable[[], float] = time.time
) -> int:
    """Queue an event again for each of its subscribers (dead letters included); returns count."""

    def write(connection: Connection) -> int:
        return int(
            connection.execute(
                update(DELIVERY)
                .where(DELIVERY.c.event_id == event_id)
                .where(DELIVERY.c.state != "pending")
                .values(
                    state="pending",
                    attempts=0,
                    next_attempt_at=clock(),
                    lease_owner=None,
                    lease_expires_at=None,
                )
            ).rowcount
        )

    result: int = await committer.write(write)
    return result
