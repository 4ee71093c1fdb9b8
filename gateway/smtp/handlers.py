"""The submission door's aiosmtpd handler: each hook asks the policy and answers its reply.

The handler decides nothing itself. It turns aiosmtpd's session into :class:`SessionFacts`, asks
:mod:`gateway.smtp.policy`, and either answers the verdict's reply or records what the client
said. At the end of DATA it hands the exact bytes to the store and answers "250" only once the
store has committed them; when the store cannot, the client gets a 451 and keeps the message.
AUTH PLAIN and LOGIN are implemented here (rather than with aiosmtpd's synchronous
``authenticator``) so the slow password hash runs off the event loop.
"""

from __future__ import annotations

import asyncio
import binascii
import ipaddress
import logging
import time
from base64 import b64decode
from collections.abc import Callable, Sequence

from aiosmtpd.smtp import MISSING, SMTP, AuthResult, Envelope, Session

from gateway.errors import StoreError
from gateway.message import addresses, from_header_count, message_id, parse_headers
from gateway.metrics import Metrics
from gateway.settings import SubmissionSettings
from gateway.smtp import policy
from gateway.smtp.policy import REPLIES, Identity, SessionFacts, Verdict
from gateway.store.models import Source
from gateway.store.queue import NewMessage, Store
from gateway.users import Authenticator

log = logging.getLogger(__name__)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
STORE_TIMEOUT = 60.0  # a stuck database must turn into a 451, not a hung client


class SubmissionHandler:
    """aiosmtpd handler for the submission ports (587 STARTTLS, 465 implicit TLS)."""

    def __init__(
        self,
        *,
        store: Store,
        authenticator: Authenticator,
        settings: SubmissionSettings,
        metrics: Metrics,
        trusted_networks: Sequence[Network] = (),
        on_accepted: Callable[[str], None] = lambda _id: None,
    ) -> None:
        self.store = store
        self.authenticator = authenticator
        self.settings = settings
        self.metrics = metrics
        self.trusted_networks = tuple(trusted_networks)
        self.on_accepted = on_accepted

    def facts(self, server: SMTP, session: Session) -> SessionFacts:
        identity = session.auth_data if isinstance(session.auth_data, Identity) else None
        tls = session.ssl is not None or getattr(server, "implicit_tls", False)
        # Asked at MAIL, RCPT and DATA: made again only when AUTH or STARTTLS changed them.
        known: SessionFacts | None = getattr(server, "mailgate_facts", None)
        if known is not None and known.identity is identity and known.tls == tls:
            return known
        peer = session.peer[0] if isinstance(session.peer, tuple) else str(session.peer or "")
        facts = SessionFacts(
            identity=identity, peer=peer, tls=tls, trusted_networks=self.trusted_networks
        )
        server.mailgate_facts = facts  # type: ignore[attr-defined]
        return facts

    def _refuse(self, verdict: Verdict) -> str:
        self.metrics.refused.labels(reason=verdict.value).inc()
        return REPLIES[verdict]

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        # aiosmtpd hands over the null reverse-path as "<>" (and needs a non-empty mail_from
        # to accept RCPT), so only the policy and the store see it as "".
        verdict = policy.sender("" if address == "<>" else address, self.facts(server, session))
        if verdict is not Verdict.ACCEPT:
            return self._refuse(verdict)
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 2.1.0 Sender OK"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        verdict = policy.recipient(
            address,
            self.facts(server, session),
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
        facts = self.facts(server, session)
        headers = parse_headers(raw)
        verdict = policy.content(raw, addresses(headers, "From"), from_header_count(headers), facts)
        if verdict is not Verdict.ACCEPT:
            return self._refuse(verdict)
        message = NewMessage(
            source=Source.SUBMISSION.value,
            mail_from="" if envelope.mail_from in (None, "<>") else envelope.mail_from,
            rcpt_tos=list(envelope.rcpt_tos),
            raw=raw,
            username=facts.identity.login if facts.identity else None,
            client_address=facts.peer,
            header_message_id=message_id(headers),
            headers=headers,
        )
        try:
            # asyncio.timeout, not wait_for: no task of its own per message (Python 3.11).
            async with asyncio.timeout(STORE_TIMEOUT):
                stored_id = await self.store.accept(message)
        except (StoreError, TimeoutError) as exc:
            log.error("not accepted from %s: %s", facts.peer, exc)
            return self._refuse(Verdict.STORE_UNAVAILABLE)
        self.metrics.accepted.labels(source=message.source).inc()
        self.metrics.accept_latency.observe(time.perf_counter() - started)
        self.on_accepted(stored_id)
        return f"250 2.0.0 OK: queued as {stored_id}"

    # -- AUTH (RFC 4954), with the password check in a thread ---------------------------------

    async def auth_PLAIN(self, server: SMTP, args: list[str]) -> AuthResult:
        blob = await _auth_value(server, args[1] if len(args) > 1 else None, "")
        if blob is None:
            return AuthResult(success=False, handled=True)
        parts = blob.split(b"\x00")
        if len(parts) != 3:  # RFC 4616: [authzid] NUL authcid NUL passwd
            await server.push("501 5.5.2 AUTH PLAIN needs authzid, user and password")
            return AuthResult(success=False, handled=True)
        return await self._check(server, parts[1], parts[2])

    async def auth_LOGIN(self, server: SMTP, args: list[str]) -> AuthResult:
        login = await _auth_value(server, args[1] if len(args) > 1 else None, "Username:")
        if login is None:
            return AuthResult(success=False, handled=True)
        password = await _auth_value(server, None, "Password:")
        if password is None:
            return AuthResult(success=False, handled=True)
        return await self._check(server, login, password)

    async def _check(self, server: SMTP, login: bytes, password: bytes) -> AuthResult:
        identity = await self.authenticator.verify(
            login.decode("utf-8", "replace"), password.decode("utf-8", "replace")
        )
        if identity is None:
            failures = getattr(server, "auth_failures", 0) + 1
            server.auth_failures = failures  # type: ignore[attr-defined]
            self.metrics.refused.labels(reason="auth-failed").inc()
            if failures >= self.settings.max_auth_failures:
                # Slow down guessing: one connection gets a few tries, then it is closed.
                await server.push("421 4.7.0 Too many failed logins; closing the connection")
                if server.transport is not None:
                    server.transport.close()
                return AuthResult(success=False, handled=True)
            return AuthResult(
                success=False,
                handled=False,
                message="535 5.7.8 Authentication failed: wrong user or password",
            )
        return AuthResult(success=True, auth_data=identity)


async def _auth_value(server: SMTP, initial: str | None, challenge: str) -> bytes | None:
    """The client's decoded answer (initial response or a 334 challenge); None when it gave up
    or sent bad base64, in which case the client has already been told."""
    if initial is None:
        answer = await server.challenge_auth(challenge)
        return None if answer is MISSING else bytes(answer)
    try:
        return b64decode(initial.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        await server.push("501 5.5.2 Cannot decode the base64 argument")
        return None
