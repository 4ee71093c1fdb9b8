"""The capture door's aiosmtpd handler and listener: BCC'd and forwarded mail, proven at DATA.

Like the submission handler, it decides nothing itself: each hook asks
:mod:`gateway.capture.policy` and answers the verdict's reply. RCPT takes only the capture
addresses (550 5.1.1 for anything else, so the door is never a relay). At the end of DATA, before
the "250", it checks the bytes (the submission door's smuggling rules), the From header, and then
SPF, DKIM, DMARC and ARC in a thread pool, and settles as whom the message may be logged. Refusing
here, while the sender is still connected, beats a DSN later: the verdicts are known now, and a
DSN would go to an envelope sender nobody has proven (backscatter). A DNS failure is a 451, so
the sender retries. Accepted messages are stored with the verdicts and the
``Authentication-Results`` header in ``meta``; the exact bytes are kept as received.
There is no AUTH on this door; STARTTLS is offered when the process has a certificate.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Callable
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session
from sqlalchemy import Engine

from gateway.authenticity import AuthenticityChecker, CachingResolver, TemporaryFailure
from gateway.capture import policy
from gateway.capture.directory import DirectoryCache
from gateway.capture.policy import REPLIES, Verdict
from gateway.capture.settings import CaptureSettings
from gateway.dns import make_sync_resolver
from gateway.errors import StoreError
from gateway.message import message_id, parse_headers
from gateway.metrics import Metrics
from gateway.settings import Settings
from gateway.smtp.server import MailgateSMTP, protocol_factory
from gateway.store.models import Source
from gateway.store.queue import NewMessage, Store

log = logging.getLogger(__name__)

STORE_TIMEOUT = 60.0  # a stuck database must turn into a 451, not a hung client


class CaptureHandler:
    """aiosmtpd handler for the inbound door of the capture domain."""

    def __init__(
        self,
        *,
        store: Store,
        checker: AuthenticityChecker,
        directory: DirectoryCache,
        settings: CaptureSettings,
        metrics: Metrics,
        on_accepted: Callable[[str], None] = lambda _id: None,
    ) -> None:
        self.store = store
        self.checker = checker
        self.directory = directory
        self.settings = settings
        self.metrics = metrics
        self.on_accepted = on_accepted

    def _refuse(self, verdict: Verdict) -> str:
        self.metrics.refused.labels(reason=f"capture-{verdict.value}").inc()
        return REPLIES[verdict]

    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname  # the new-style hook must record it (aiosmtpd docs)
        return [r for r in responses if not r.startswith("250-AUTH")]  # no AUTH on this door

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        # aiosmtpd reports the null reverse-path (RFC 5321 §4.5.5) as "<>"; it is kept so,
        # since aiosmtpd takes an empty mail_from for "no MAIL yet" at RCPT.
        null = address in ("", "<>")
        verdict = policy.sender("" if null else address)
        if verdict is not Verdict.ACCEPT:
            return self._refuse(verdict)
        envelope.mail_from = "<>" if null else address
        envelope.mail_options.extend(options)
        return "250 2.1.0 Sender OK"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        directory = await self.directory.get()
        verdict = policy.recipient(
            address,
            local_part=self.settings.local_part,
            domain=self.settings.domain,
            token_known=lambda token: directory.token_owner(token) is not None,
            accepted=len(envelope.rcpt_tos),
            limit=self.settings.max_recipients,
        )
        if verdict is not Verdict.ACCEPT:
            return self._refuse(verdict)
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        return "250 2.1.5 Recipient OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        started = time.perf_counter()
        raw = envelope.original_content or b""
        verdict = policy.content(raw)
        if verdict is not Verdict.ACCEPT:
            return self._refuse(verdict)
        headers = parse_headers(raw)
        verdict, from_address = policy.author([str(v) for v in headers.get_all("From", [])])
        if verdict is not Verdict.ACCEPT:
            return self._refuse(verdict)
        directory = await self.directory.get()
        token_owners = set()
        for rcpt in envelope.rcpt_tos:
            found = policy.parse_capture_address(
                rcpt, local_part=self.settings.local_part, domain=self.settings.domain
            )
            owner = directory.token_owner(found.token) if found and found.token else None
            if owner:
                token_owners.add(owner)
        claim = policy.claimant(
            from_address, owner_of=directory.owner_of, token_owners=token_owners
        )
        if claim.verdict in (Verdict.SEVERAL_OWNERS, Verdict.STRANGER):
            return self._refuse(claim.verdict)  # no DNS spent on mail nobody could own
        peer = session.peer[0] if isinstance(session.peer, tuple) else str(session.peer or "")
        helo = session.host_name or ""
        mail_from = "" if envelope.mail_from in (None, "<>") else envelope.mail_from
        try:
            verdicts = await self.checker.verify_async(
                raw, ip=peer, helo=helo, mail_from=mail_from, header_from=from_address
            )
        except TemporaryFailure as exc:
            log.warning("capture from %s: checks did not finish: %s", peer, exc)
            return self._refuse(Verdict.DNS_TEMPORARY)
        decision = policy.proven(
            claim,
            aligned=verdicts.aligned,
            temporary=verdicts.temporary,
            words=verdicts.words(),
            from_domain=from_address.rpartition("@")[2],
        )
        if decision.verdict is Verdict.DNS_TEMPORARY:
            return self._refuse(decision.verdict)
        if decision.verdict is Verdict.UNPROVEN and self.settings.on_unverified == "reject":
            log.info("capture from %s refused: %s", peer, decision.reason)
            return self._refuse(decision.verdict)
        meta: dict[str, Any] = {
            "authentication": verdicts.as_meta(),
            "authentication_results": verdicts.header(),
            "capture": {
                "from": from_address,
                "owner": decision.owner,
                "via": decision.via,
                "claimed_owner": decision.claimed_owner,
                "verified": decision.proven,
                "reason": decision.reason,
                "token_owner": claim.owner if claim.via == "token" else None,
                "helo": helo,
            },
        }
        message = NewMessage(
            source=Source.CAPTURE.value,
            mail_from=mail_from,
            rcpt_tos=list(envelope.rcpt_tos),
            raw=raw,
            username=decision.owner,
            client_address=peer,
            header_message_id=message_id(headers),
            meta=meta,
        )
        try:
            # asyncio.timeout, not wait_for: no task of its own per message (Python 3.11).
            async with asyncio.timeout(STORE_TIMEOUT):
                stored_id = await self.store.accept(message)
        except (StoreError, TimeoutError) as exc:
            log.error("capture not accepted from %s: %s", peer, exc)
            return self._refuse(Verdict.STORE_UNAVAILABLE)
        self.metrics.accepted.labels(source=message.source).inc()
        self.metrics.accept_latency.observe(time.perf_counter() - started)
        self.on_accepted(stored_id)
        return f"250 2.0.0 OK: queued as {stored_id}"


class CaptureListener:
    """The capture door's one listening socket (STARTTLS when there is a certificate)."""

    def __init__(
        self,
        handler: CaptureHandler,
        *,
        settings: CaptureSettings,
        hostname: str,
        tls_context: ssl.SSLContext | None,
    ) -> None:
        self.handler = handler
        self.settings = settings
        self.hostname = hostname
        self.tls_context = tls_context
        self.servers: list[asyncio.Server] = []

    def _factory(self) -> Callable[[], MailgateSMTP]:
        return protocol_factory(
            self.handler,
            implicit_tls=False,
            plaintext_auth_on_loopback=False,
            hostname=self.hostname,
            tls_context=self.tls_context,
            data_size_limit=self.settings.max_message_size,
            enable_SMTPUTF8=True,
            decode_data=False,
            timeout=self.settings.timeout_seconds,
            auth_require_tls=True,
            auth_exclude_mechanism=["LOGIN", "PLAIN"],  # no AUTH here: nobody logs in
        )

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(self._factory(), self.settings.listen, self.settings.port)
        self.servers.append(server)
        log.info("capture SMTP listening on %s", [s.getsockname() for s in server.sockets])

    @property
    def ports(self) -> list[int]:
        return [int(server.sockets[0].getsockname()[1]) for server in self.servers]

    async def stop(self) -> None:
        for server in self.servers:
            server.close()
        for server in self.servers:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(server.wait_closed(), 5)
        self.servers.clear()
        self.handler.checker.close()


def build_checker(settings: Settings) -> AuthenticityChecker:
    """The SPF/DKIM/DMARC/ARC checker for ``settings``: ``[dns]`` resolver, capture's cache."""
    capture = settings.capture
    resolver = CachingResolver(
        make_sync_resolver(settings.dns),
        max_ttl=capture.dns_cache_seconds,
        max_entries=capture.dns_cache_entries,
    )
    return AuthenticityChecker(
        resolver,
        authserv_id=capture.authserv_id or settings.server.hostname,
        time_limit=capture.verify_timeout_seconds,
        threads=capture.verify_threads,
    )


def build_capture_listener(
    settings: Settings,
    store: Store,
    engine: Engine,
    metrics: Metrics,
    on_accepted: Callable[[str], None],
    tls_context: ssl.SSLContext | None,
) -> CaptureListener:
    """The whole door, ready to ``await listener.start()``; ``stop()`` also ends its threads."""
    handler = CaptureHandler(
        store=store,
        checker=build_checker(settings),
        directory=DirectoryCache(engine, max_age=settings.capture.directory_cache_seconds),
        settings=settings.capture,
        metrics=metrics,
        on_accepted=on_accepted,
    )
    return CaptureListener(
        handler,
        settings=settings.capture,
        hostname=settings.server.hostname,
        tls_context=tls_context,
    )
