"""An SMTP server that accepts mail and remembers it, for tests that relay mail somewhere.

:class:`MessageSink` runs an aiosmtpd ``Controller`` in a thread on a free loopback port and
records each message (envelope sender, recipients, and the DATA bytes exactly as received) in a
thread-safe list. Chosen recipients can be answered with a chosen reply (by default ``reject@…``
gets a 550 and ``tempfail@…`` a 451) so that relay tests can provoke bounces and retries; the
replies can be changed while it runs. STARTTLS is offered when given an ``ssl.SSLContext``.
"""

from __future__ import annotations

import email
import email.message
import email.policy
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiosmtpd.controller import Controller

from tests.servers._process import register_cleanup, unregister_cleanup
from tests.servers.ports import free_port

# Keys are a whole address or just a local part, compared case-insensitively.
DEFAULT_RCPT_REPLIES: Mapping[str, str] = {
    "reject": "550 5.1.1 Mailbox unavailable (test sink: reject)",
    "tempfail": "451 4.3.0 Try again later (test sink: tempfail)",
}


@dataclass(frozen=True)
class Received:
    """One message as the sink received it."""

    mail_from: str  # "<>" for the null reverse-path (bounces), as aiosmtpd reports it
    rcpt_tos: tuple[str, ...]
    data: bytes  # the DATA payload exactly as received (dot-unstuffed, CRLF line ends)
    mail_options: tuple[str, ...]
    tls: bool  # whether the session had done STARTTLS
    peer: str
    received_at: float = field(default_factory=time.time)

    def message(self) -> email.message.EmailMessage:
        """The data parsed with the modern email policy."""
        parsed = email.message_from_bytes(self.data, policy=email.policy.default)
        assert isinstance(parsed, email.message.EmailMessage)
        return parsed


class _Handler:
    def __init__(self, sink: MessageSink) -> None:
        self._sink = sink

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: list[str]
    ) -> str:
        reply = self._sink.reply_for(address)
        if reply is not None:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        data_reply = self._sink.data_reply
        if data_reply is not None:
            return data_reply
        raw = envelope.original_content if envelope.original_content is not None else b""
        self._sink._record(
            Received(
                mail_from=envelope.mail_from or "",
                rcpt_tos=tuple(envelope.rcpt_tos),
                data=bytes(raw),
                mail_options=tuple(envelope.mail_options),
                tls=session.ssl is not None,
                peer=f"{session.peer[0]}:{session.peer[1]}" if session.peer else "",
            )
        )
        return "250 2.0.0 OK: queued by test sink"


class MessageSink:
    """A recording SMTP server on 127.0.0.1.

    ``rcpt_replies`` maps an address or a local part to the full reply for RCPT TO (e.g.
    ``{"reject": "550 5.1.1 No"}``); it defaults to :data:`DEFAULT_RCPT_REPLIES`. ``tls_context``
    makes it offer STARTTLS (``require_tls`` refuses mail without it). Use as a context manager
    or call :meth:`start` / :meth:`stop`.
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        rcpt_replies: Mapping[str, str] | None = None,
        tls_context: ssl.SSLContext | None = None,
        require_tls: bool = False,
        hostname: str = "sink.mailgate.test",
    ) -> None:
        self.host = "127.0.0.1"
        self.port = port if port is not None else free_port()
        self._lock = threading.Condition()
        self._messages: list[Received] = []
        self._rcpt_replies: dict[str, str] = {
            k.lower(): v for k, v in (rcpt_replies or DEFAULT_RCPT_REPLIES).items()
        }
        self.data_reply: str | None = None
        self._tls_context = tls_context
        self._require_tls = require_tls
        self._hostname = hostname
        self._controller: Controller | None = None

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> MessageSink:
        kwargs: dict[str, Any] = {}
        if self._tls_context is not None:
            kwargs["tls_context"] = self._tls_context
            kwargs["require_starttls"] = self._require_tls
        controller = Controller(
            _Handler(self),
            hostname=self.host,
            port=self.port,
            server_hostname=self._hostname,
            ready_timeout=10.0,
            **kwargs,
        )
        controller.start()
        self._controller = controller
        register_cleanup(self)
        return self

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None
        unregister_cleanup(self)

    def __enter__(self) -> MessageSink:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- behaviour ----------------------------------------------------------------------------

    def set_rcpt_reply(self, key: str, reply: str | None) -> None:
        """Answer RCPT TO for ``key`` (address or local part) with ``reply``; None accepts it."""
        with self._lock:
            if reply is None:
                self._rcpt_replies.pop(key.lower(), None)
            else:
                self._rcpt_replies[key.lower()] = reply

    def reply_for(self, address: str) -> str | None:
        """The configured RCPT reply for ``address``, if any (an address beats a local part)."""
        lowered = address.lower()
        local = lowered.rsplit("@", 1)[0]
        with self._lock:
            return self._rcpt_replies.get(lowered, self._rcpt_replies.get(local))

    # -- what arrived ---------------------------------------------------------------------------

    def _record(self, received: Received) -> None:
        with self._lock:
            self._messages.append(received)
            self._lock.notify_all()

    @property
    def messages(self) -> list[Received]:
        """A snapshot of everything received so far, oldest first."""
        with self._lock:
            return list(self._messages)

    def clear(self) -> None:
        with self._lock:
            self._messages.clear()

    def wait_for(
        self,
        count: int = 1,
        timeout: float = 10.0,
        where: Callable[[Received], bool] | None = None,
    ) -> list[Received]:
        """Wait until at least ``count`` messages (matching ``where``) arrived; return them all.

        Raises TimeoutError (listing what did arrive) after ``timeout`` seconds.
        """

        def matching() -> list[Received]:
            return [m for m in self._messages if where is None or where(m)]

        deadline = time.monotonic() + timeout
        with self._lock:
            while len(found := matching()) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    summary = [(m.mail_from, m.rcpt_tos) for m in self._messages]
                    raise TimeoutError(
                        f"sink got {len(found)} of {count} matching messages in {timeout}s; "
                        f"all received: {summary}"
                    )
                self._lock.wait(remaining)
            return found

    def wait_for_rcpt(self, address: str, timeout: float = 10.0) -> Received:
        """Wait for the first message addressed to ``address`` and return it."""
        lowered = address.lower()
        found = self.wait_for(
            1, timeout, where=lambda m: lowered in (r.lower() for r in m.rcpt_tos)
        )
        return found[0]
