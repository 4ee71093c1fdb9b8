"""Listening sockets for the SMTP doors, on the process's one event loop.

aiosmtpd's ``Controller`` runs its own loop in a thread; we want every door in one loop, so this
module creates the servers with ``loop.create_server`` directly. The submission door listens twice:
on the STARTTLS port (RFC 6409) and on the implicit-TLS port (RFC 8314 §3.3). aiosmtpd only
recognises TLS that came through STARTTLS, so connections on the implicit port are marked as TLS
by hand, and the loopback exception for AUTH without TLS is applied per connection.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ipaddress
import logging
import re
import ssl
import types
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from typing import Any, AnyStr

from aiosmtpd.smtp import MISSING, SMTP

from gateway.errors import ConfigError
from gateway.settings import SubmissionSettings
from gateway.smtp.data import DataState, read_data
from gateway.timers import LazyDeadline

log = logging.getLogger(__name__)

MINIMUM_AIOSMTPD = (1, 4, 6)  # the first release without the smuggling and STARTTLS flaws


def check_aiosmtpd_version(installed: str | None = None) -> None:
    """Refuse to run on an aiosmtpd older than 1.4.6 (CVE-2024-27305, CVE-2024-34083)."""
    installed = installed or version("aiosmtpd")
    parts = tuple(int(p) for p in installed.split(".")[:3] if p.isdigit())
    if parts < MINIMUM_AIOSMTPD:
        raise ConfigError(
            f"aiosmtpd {installed} is installed but Mailgate needs 1.4.6 or newer (older releases "
            "allow SMTP smuggling and STARTTLS command injection); reinstall Mailgate"
        )


def server_tls_context(cert_file: Path, key_file: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert_file, key_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"cannot load the TLS certificate {cert_file} / key {key_file} ({exc}); "
            "set `submission.cert_file` and `submission.key_file`, or run `mailgate init`"
        ) from None
    return context


# aiosmtpd's own replies, reworded with an RFC 3463 enhanced code and a sentence that helps.
_REWORDED = {
    "552 Error: Too much mail data": "552 5.3.4 Message too big for this server",
    "552 Error: message size exceeds fixed maximum message size": "552 5.3.4 Message too big "
    "for this server (see the SIZE in our EHLO reply)",
    "500 Line too long (see RFC5321 4.5.3.1.6)": "500 5.5.2 Line too long: at most 1000 "
    "characters per line (RFC 5321 section 4.5.3.1.6)",
    "503 Error: need MAIL command": "503 5.5.1 Send MAIL FROM first",
    "503 Error: need RCPT command": "503 5.5.1 No valid recipients: send RCPT TO first",
    "530 Must issue a STARTTLS command first": "530 5.7.0 Must issue a STARTTLS command first",
    "503 Error: nested MAIL command": "503 5.5.1 MAIL FROM was already given: send RSET first",
}
# RFC 2034 §3: the enhanced code a reply gets when aiosmtpd gave none.
_DEFAULT_ENHANCED = {
    "221": "2.0.0",
    "250": "2.0.0",
    "252": "2.0.0",
    "421": "4.3.0",
    "451": "4.3.0",
    "454": "4.7.0",
    "500": "5.5.2",
    "501": "5.5.4",
    "502": "5.5.1",
    "503": "5.5.1",
    "504": "5.5.4",
    "530": "5.7.0",
    "550": "5.0.0",
    "552": "5.3.4",
    "553": "5.1.3",
    "554": "5.0.0",
}
_HAS_ENHANCED = re.compile(r"^\d{3} [245]\.\d{1,3}\.\d{1,3} ")


def with_enhanced_code(reply: str) -> str:
    """Every final reply carries an enhanced status code (RFC 2034), except where RFC 2034 §3
    exempts it (the greeting, EHLO/HELO) and the 3xx prompts."""
    reply = _REWORDED.get(reply, reply)
    code = reply[:3]
    if reply[3:4] != " " or reply == "250 HELP" or _HAS_ENHANCED.match(reply):
        return reply
    enhanced = _DEFAULT_ENHANCED.get(code)
    return f"{code} {enhanced} {reply[4:]}" if enhanced else reply


# RFC 5322 §3.2.3 dot-atom local part, RFC 1035 LDH labels, then the rest after any spaces;
# a comment after the ">" (which the email parser would drop) is left to the full parser.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_PLAIN_PATH = re.compile(
    rf"<({_ATEXT}(?:\.{_ATEXT})*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*)>[ \t]*(?![ \t(])(.*)\Z",
    re.DOTALL,
)


class MailgateSMTP(SMTP):
    """aiosmtpd's SMTP with our two per-connection TLS facts and enhanced status codes."""

    def __init__(
        self, handler: Any, *, implicit_tls: bool, plaintext_auth_on_loopback: bool, **kw: Any
    ) -> None:
        super().__init__(handler, **kw)
        self.implicit_tls = implicit_tls
        self.plaintext_auth_on_loopback = plaintext_auth_on_loopback
        self.auth_failures = 0
        self._held: list[bytes] = []  # continuation lines of the reply being pushed
        # aiosmtpd keeps these limits in a dict on the class, which every EHLO raises (MAIL +36
        # for SIZE and SMTPUTF8) and every new connection clears: one connection's EHLOs then
        # loosen every other's limit, and its own limit drops when somebody else connects.
        # Each connection gets its own.
        self.command_size_limits = _command_size_limits()
        self._copied: tuple[dict[str, Any], list[str]] | None = None  # see copy()
        self._idle: LazyDeadline | None = None  # see _reset_timeout()

    def _reset_timeout(self, duration: float | None = None) -> None:
        """The client has ``duration`` (default: the idle timeout) from now to say something.

        aiosmtpd cancels its timer and schedules a new one at every command (seven times for a
        message on a new connection); one :class:`LazyDeadline` per connection moves instead.
        It also stands in aiosmtpd's ``_timeout_handle``, which ``connection_lost`` cancels.
        """
        if self._idle is None:
            self._idle = LazyDeadline(self.loop, self._timeout_cb)
            self._timeout_handle = self._idle  # type: ignore[assignment]
        self._idle.set(self.loop.time() + (duration or self._timeout_duration))

    def copy(self) -> MailgateSMTP:
        """A protocol for a new connection, set up exactly as ``__init__`` with this one's
        arguments would, at a sixth of the cost (:func:`protocol_factory` keeps one unconnected
        instance per listening socket to copy).

        aiosmtpd's ``__init__`` does per connection what is the same for every connection of a
        door: it validates its arguments, lists the instance's and the handler's methods with
        ``inspect``, reads the EHLO hook's signature and logs the AUTH mechanisms, about 60 µs.
        This takes asyncio's part (a new ``StreamReader``) fresh, copies aiosmtpd's attributes
        and binds the methods among them to the new instance; mutable state is copied, never
        shared. A test compares the result with ``__init__``'s, attribute by attribute.
        """
        clone: MailgateSMTP = object.__new__(type(self))
        asyncio.StreamReaderProtocol.__init__(
            clone,
            asyncio.StreamReader(loop=self.loop, limit=self.line_length_limit),
            client_connected_cb=clone._cb_client_connected,
            loop=self.loop,
        )
        mine = clone.__dict__
        if self._copied is None:  # which attributes to take as they are, which to rebind
            plain, bound = {}, []
            for name, value in self.__dict__.items():
                if name in mine:  # asyncio's own attributes are the new ones
                    continue
                if _rebind(value, self, self) is value:
                    plain[name] = value
                else:
                    bound.append(name)
            self._copied = (plain, bound)
        plain, bound = self._copied
        mine.update(plain)
        for name in bound:
            mine[name] = _rebind(self.__dict__[name], self, clone)
        return clone

    async def push(self, status: AnyStr) -> None:
        """Send one reply line; the lines of a multi-line reply go out together, in one write.

        aiosmtpd pushes an EHLO reply line by line, each with its own write (a ``send()`` on
        the socket) and drain: six of them per connection here. A continuation line
        (``250-…``, RFC 5321 §4.2.1) is no use to the client before the reply's last line, so
        it waits in ``_held`` and leaves with that line.
        """
        if isinstance(status, str):
            status = with_enhanced_code(status)
            line = status.encode("utf-8" if self.enable_SMTPUTF8 else "ascii") + b"\r\n"
        else:
            line = bytes(status) + b"\r\n"
        last = line.rfind(b"\n", 0, -1) + 1  # a hook's reply may hold several lines
        if line[last + 3 : last + 4] == b"-":
            self._held.append(line)
            return
        if self._held:
            self._held.append(line)
            line = b"".join(self._held)
            self._held.clear()
        self._writer.write(line)
        await self._writer.drain()

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """aiosmtpd's address parsing for MAIL, RCPT and VRFY, with a fast path for the plain
        ``<local@domain>`` nearly every client sends.

        aiosmtpd 1.4.6 defines a ``typing.Protocol`` class on every call and parses with the
        ``email`` package's RFC 5322 parser, together ~50 us per address. An address whose local
        part is a plain dot-atom and whose domain is plain LDH labels, followed by spaces and
        the parameters, gets exactly the parser's answer from one regex; anything else (quoted
        local parts, comments, source routes, IP literals, UTF-8) takes aiosmtpd's path.
        """
        match = _PLAIN_PATH.match(arg)
        if match is None:
            result: tuple[str | None, str | None] = super()._getaddr(arg)
            return result
        address, rest = match.group(1, 2)
        if self.local_part_limit and len(address.rpartition("@")[0]) > self.local_part_limit:
            return None, None
        return address, rest

    async def smtp_DATA(self, arg: str) -> None:
        """aiosmtpd 1.4.6's DATA command with :func:`gateway.smtp.data.read_data` reading the
        section: the same checks and replies, a fraction of the work per message."""
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        try:
            result = await read_data(self._reader, size_limit=self.data_size_limit)
        except asyncio.CancelledError:
            # The connection went away mid-DATA (aiosmtpd cancels us): close our side too.
            self._writer.close()
            raise
        if result.state is DataState.LOST:
            self._writer.close()
            return
        if result.state is DataState.TOO_LONG:
            await self.push("500 Line too long (see RFC5321 4.5.3.1.6)")
            self._set_post_data_state()  # type: ignore[no-untyped-call]
            return
        if result.state is DataState.TOO_MUCH:
            await self.push("552 Error: Too much mail data")
            self._set_post_data_state()  # type: ignore[no-untyped-call]
            return
        # decode_data is off: the handler gets the exact bytes in both attributes.
        self.envelope.content = self.envelope.original_content = result.content
        status = await self._call_handler_hook("DATA")
        self._set_post_data_state()  # type: ignore[no-untyped-call]
        await self.push("250 OK" if status is MISSING else status)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if self.implicit_tls:
            # The whole connection is TLS: AUTH is safe although STARTTLS never happened.
            self._auth_require_tls = False
        elif self.plaintext_auth_on_loopback and _is_loopback(transport):
            self._auth_require_tls = False


def _command_size_limits() -> collections.defaultdict[str, int]:
    return collections.defaultdict(lambda: SMTP.command_size_limit)


def _rebind(value: Any, old: object, new: object) -> Any:
    """``value`` for ``new``: methods bound to ``old`` rebound, containers copied."""
    if isinstance(value, types.MethodType) and value.__self__ is old:
        return types.MethodType(value.__func__, new)
    if isinstance(value, collections.defaultdict):
        return collections.defaultdict(
            value.default_factory, {k: _rebind(v, old, new) for k, v in value.items()}
        )
    if isinstance(value, dict):
        return {k: _rebind(v, old, new) for k, v in value.items()}
    if isinstance(value, list):
        return [_rebind(v, old, new) for v in value]
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # aiosmtpd's _AuthMechAttr
        return type(value)(*(_rebind(v, old, new) for v in value))
    return value


def _is_loopback(transport: asyncio.BaseTransport) -> bool:
    peer = transport.get_extra_info("peername")
    try:
        return bool(peer) and ipaddress.ip_address(peer[0]).is_loopback
    except ValueError:
        return False


def protocol_factory(handler: Any, **arguments: Any) -> Callable[[], MailgateSMTP]:
    """The protocol factory for one listening socket: the first connection builds an instance
    with ``MailgateSMTP(handler, **arguments)`` that is never connected, and every connection
    gets a :meth:`MailgateSMTP.copy` of it."""
    prototype: MailgateSMTP | None = None

    def make() -> MailgateSMTP:
        nonlocal prototype
        if prototype is None:
            prototype = MailgateSMTP(handler, loop=asyncio.get_running_loop(), **arguments)
        return prototype.copy()

    return make


class SmtpListener:
    """One door: a handler served on a STARTTLS port and (optionally) an implicit-TLS port."""

    def __init__(
        self,
        handler: Any,
        *,
        settings: SubmissionSettings,
        hostname: str,
        tls_context: ssl.SSLContext | None,
    ) -> None:
        self.handler = handler
        self.settings = settings
        self.hostname = hostname
        self.tls_context = tls_context
        self.servers: list[asyncio.Server] = []

    def _factory(self, *, implicit_tls: bool) -> Callable[[], MailgateSMTP]:
        return protocol_factory(
            self.handler,
            implicit_tls=implicit_tls,
            plaintext_auth_on_loopback=self.settings.allow_plaintext_auth_on_loopback,
            hostname=self.hostname,
            tls_context=None if implicit_tls else self.tls_context,
            data_size_limit=self.settings.max_message_size,
            enable_SMTPUTF8=True,
            decode_data=False,
            timeout=self.settings.timeout_seconds,
            auth_require_tls=True,
        )

    async def start(self, *, reuse_port: bool = False) -> None:
        """Listen; ``reuse_port`` lets several gateway processes share the ports (the kernel
        spreads connections among them: SO_REUSEPORT)."""
        loop = asyncio.get_running_loop()
        host = self.settings.listen
        self.servers.append(
            await loop.create_server(
                self._factory(implicit_tls=False),
                host,
                self.settings.port,
                reuse_port=reuse_port,
            )
        )
        if self.tls_context is not None and self.settings.tls_port:
            self.servers.append(
                await loop.create_server(
                    self._factory(implicit_tls=True),
                    host,
                    self.settings.tls_port,
                    ssl=self.tls_context,
                    reuse_port=reuse_port,
                )
            )
        for server in self.servers:
            log.info("SMTP listening on %s", [s.getsockname() for s in server.sockets])

    @property
    def ports(self) -> list[int]:
        return [int(server.sockets[0].getsockname()[1]) for server in self.servers]

    async def stop(self) -> None:
        for server in self.servers:
            server.close()
        for server in self.servers:
            # Python 3.12+ waits here for open sessions; a client mid-DATA is not our problem
            # at shutdown (it gets no 250, so it keeps the message).
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(server.wait_closed(), 5)
        self.servers.clear()
