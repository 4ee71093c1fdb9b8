"""Outbound SMTP delivery: hand a stored message to the smarthost or the recipients' MX hosts.

:class:`Relay` is the worker's only way out: ``await relay.send(sender, recipients, message)``
returns one :class:`RecipientResult` per recipient and never raises for an SMTP, TLS, DNS or
network failure (those become 4xx/5xx results, or code 0 when no server answered), so the caller
decides retry or bounce from the codes alone. It speaks SMTP itself on asyncio streams rather than
driving :mod:`smtplib` in threads, because the worker is one event loop: a native client gets a
real deadline per reply (a loop timer also bounds a server that drips a byte a minute, which a
socket timeout does not), clean cancellation, PIPELINING (RFC 2920: RSET, MAIL, RCPTs and DATA
in one packet), and a pool bounded by ``relay.max_connections`` instead of by the default thread
pool (six threads on two cores, shared with everything else that uses ``to_thread``); smtplib
would also leave bytes with bare LFs as they are (its ``_fix_eols`` is for ``str`` only). The
price is owning the reply parser, STARTTLS and AUTH, which the tests drive against Postfix,
aiosmtpd and NSD on real sockets; the message itself goes out byte for byte, only made strict CRLF
and dot-stuffed.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import logging
import random
import re
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.name
import dns.rdatatype
import dns.rdtypes.ANY.MX
import dns.rdtypes.IN.A
import dns.rdtypes.IN.AAAA
import dns.resolver

from gateway.errors import ConfigError
from gateway.message import BARE_CR, BARE_LF
from gateway.settings import RelaySettings
from gateway.timers import LazyDeadline

log = logging.getLogger(__name__)

# RFC 5321 §4.5.3.1.8: a server must accept at least 100 recipients per transaction; more than
# that go in further transactions on the same connection.
MAX_RECIPIENTS_PER_TRANSACTION = 100
# Postfix's smtp_mx_address_limit: how many MX addresses one delivery attempt may try.
MAX_MX_ADDRESSES = 5
# A pooled connection idle this long is closed by us before the peer times it out (RFC 5321
# §4.5.3.2.7 has servers wait at least 5 minutes for a command); one older than the reuse limit
# is not reused at all (Postfix: smtp_connection_reuse_time_limit = 300s).
IDLE_SECONDS = 60.0
REUSE_SECONDS = 300.0
# Message data goes out in slices so a 25 MB message is never copied into the transport whole.
_WRITE_CHUNK = 256 * 1024
_QUIT_SECONDS = 5.0
_MAX_REPLY_LINES = 200

_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})(?:\s+|$)")  # RFC 3463 §2, RFC 2034
_LINE_BREAK = re.compile(rb"\r\n|\r|\n")
# What _prepare must change: a CR without its LF (BARE_CR), an LF without its CR or with a "."
# after it. Searches that each begin with a literal byte the regex engine scans for fast; one
# pattern with both alternatives is several times slower, and so were three bytes.count passes.
_BARE_LF_OR_DOT = re.compile(rb"\n(?:\.|(?<!\r\n))")
_FORBIDDEN_IN_ADDRESS = re.compile(r"[\x00-\x1f\x7f<>]")


@dataclass(frozen=True, slots=True)
class RecipientResult:
    """What became of one recipient.

    ``code`` is the SMTP reply code (0 when no server answered for this recipient: a connection,
    TLS or session failure, always temporary); ``enhanced`` the RFC 3463 status when there is one;
    ``remote_mta`` the host whose reply this is (empty when the result was decided here, e.g. a
    DNS answer or a failed connection), which the DSN reports as ``Remote-MTA``.
    """

    recipient: str
    code: int
    text: str
    enhanced: str = ""
    remote_mta: str = ""

    @property
    def delivered(self) -> bool:
        return 200 <= self.code < 300

    @property
    def permanent(self) -> bool:
        return 500 <= self.code < 600


@dataclass(frozen=True, slots=True)
class _Reply:
    code: int
    lines: tuple[str, ...]

    @property
    def enhanced(self) -> str:
        match = _ENHANCED.match(self.lines[0]) if self.lines else None
        # RFC 3463 §2: the class digit must agree with the reply code's first digit.
        if match and match.group(1) == str(self.code)[0]:
            return ".".join(match.groups())
        return ""

    @property
    def text(self) -> str:
        return " ".join(_ENHANCED.sub("", line, count=1).strip() for line in self.lines).strip()

    def __str__(self) -> str:
        return " ".join(part for part in (str(self.code), self.enhanced, self.text) if part)


@dataclass(frozen=True, slots=True)
class Advice:
    """How a failure's sentence names the setting to change: the ``[relay]`` options by default,
    a mailbox's own settings for its submission server (see gateway.outgoing)."""

    ca_file: str = "set relay.ca_file to the CA that signed its certificate, or fix the certificate"
    starttls: str = "relay.require_tls is on; enable TLS there, or set relay.security"
    auth: str = "relay.username needs AUTH PLAIN or LOGIN"


class _SessionFailed(Exception):
    """The session cannot go on; recipients without a final reply get a temporary result."""

    def __init__(self, text: str, *, enhanced: str = "4.4.2", reply: _Reply | None = None) -> None:
        super().__init__(text)
        self.text = text
        self.enhanced = enhanced
        self.reply = reply  # set when a server reply (421) ended the session


class _TlsFailed(_SessionFailed):
    """The TLS handshake failed; for opportunistic TLS the caller retries in plaintext."""


class _Stale(Exception):
    """A pooled connection turned out to be closed before this transaction began."""


class _ProtocolError(Exception):
    """The server sent something that is not an SMTP reply."""


@dataclass(frozen=True, slots=True)
class _Payload:
    data: bytes  # CRLF line ends, dot-stuffed, ending in CRLF, without the final "."
    eight_bit: bool
    utf8_headers: bool


def _prepare(message: bytes) -> _Payload:
    """Strict CRLF (RFC 5321 §2.3.8) and dot-stuffing (§4.5.2), copying only when needed."""
    # Mail that came in by SMTP needs neither, which two searches tell without copying it.
    bare_cr = BARE_CR.search(message)
    if bare_cr or message.startswith(b".") or _BARE_LF_OR_DOT.search(message):
        if bare_cr or BARE_LF.search(message):
            message = _LINE_BREAK.sub(b"\r\n", message)  # a bare CR or LF becomes a line break
        message = message.replace(b"\r\n.", b"\r\n..")  # no copy when there is none
        if message.startswith(b"."):
            message = b"." + message
    if message and not message.endswith(b"\r\n"):
        message += b"\r\n"  # the last line needs its CRLF before the terminating "."
    end = message.find(b"\r\n\r\n")
    headers = message if end < 0 else message[:end]
    return _Payload(message, not message.isascii(), not headers.isascii())


def _unread(reader: asyncio.StreamReader) -> bytearray:
    """What the server sent that was not read yet. asyncio has no public way to ask, so this
    reads its private buffer, and fails loudly (AttributeError) rather than answering "nothing"
    if asyncio renames it: the STARTTLS injection guard depends on the answer."""
    buffered: bytearray = reader._buffer  # type: ignore[attr-defined]
    return buffered


def _check_address(address: str, role: str) -> None:
    if _FORBIDDEN_IN_ADDRESS.search(address):
        raise ValueError(f"{role} address {address!r} contains a control character or <>")


def _describe(exc: BaseException) -> str:
    """A short human account of a network failure."""
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verification failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS error: {exc.reason or exc}"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, ConnectionError | EOFError | asyncio.IncompleteReadError):
        return "connection closed by the server"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return str(exc) or type(exc).__name__


@dataclass(frozen=True, slots=True)
class _Route:
    """Where a group of recipients goes: the smarthost, or MX hosts in order of preference."""

    key: tuple[str, ...]
    # MX hosts grouped by preference (equal ones shuffled per attempt, RFC 5321 §5.1); empty for
    # the smarthost.
    mx: tuple[tuple[str, ...], ...] = ()


_SMARTHOST = _Route(("smarthost",))


@dataclass(frozen=True, slots=True)
class _Refusal:
    """A decision made before any connection (DNS said no, the address is unusable)."""

    code: int
    enhanced: str
    text: str

    def result(self, recipient: str) -> RecipientResult:
        return RecipientResult(recipient, self.code, self.text, self.enhanced)


class _Session:
    """One SMTP connection: greeting, EHLO, STARTTLS, AUTH, then any number of transactions."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        host: str,
        where: str,
        settings: RelaySettings,
        helo: str,
        advice: Advice,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.advice = advice
        self.host = host
        self.where = where  # "host[address]:port" for messages
        self._timeout = settings.command_timeout_seconds
        self._connect_timeout = settings.connect_timeout_seconds
        self._helo = helo
        self.extensions: dict[str, str] = {}
        self.tls = writer.get_extra_info("sslcontext") is not None
        self.broken = False
        self.dirty = False  # a transaction began and did not reach its final DATA reply
        self.created = time.monotonic()
        self.expiry: LazyDeadline | None = None  # while pooled (Relay._put_idle)
        # The deadline of the reply being waited for (RFC 5321 §4.5.3.2): one timer per
        # connection, not an asyncio.timeout per wait, which was a measurable share of the CPU
        # per message.
        self._watchdog = LazyDeadline(asyncio.get_running_loop(), self._timed_out)

    # -- wire ---------------------------------------------------------------------------------

    async def _write(self, data: bytes | memoryview) -> None:
        self.writer.write(data)
        # Wait (bounded) only when the kernel did not take it all; a lost connection shows up
        # at the next reply instead, so the common case costs no timer.
        if self.writer.transport.get_write_buffer_size():
            async with asyncio.timeout(self._timeout):
                await self.writer.drain()

    async def command(self, *lines: str, utf8: bool = False) -> None:
        encoding = "utf-8" if utf8 else "ascii"
        await self._write(("\r\n".join(lines) + "\r\n").encode(encoding))

    async def reply(self) -> _Reply:
        code = 0
        lines: list[str] = []
        deadline = 0.0
        while True:
            try:
                # RFC 5321 §4.5.3.2: every wait is bounded, all of one reply's by one deadline.
                # A line already buffered is read without waiting: the replies to pipelined
                # RSET, MAIL, RCPTs and DATA arrive together.
                if b"\n" in _unread(self.reader):
                    raw = await self.reader.readline()
                else:
                    if not deadline:
                        deadline = asyncio.get_running_loop().time() + self._timeout
                    self._watchdog.set(deadline)
                    try:
                        raw = await self.reader.readline()
                    finally:
                        self._watchdog.clear()
            except (ValueError, asyncio.LimitOverrunError):
                raise _ProtocolError("reply line longer than 64 KiB") from None
            if not raw.endswith(b"\n"):
                raise ConnectionResetError("connection closed by the server")
            line = raw.rstrip(b"\r\n")
            mark = line[3:4]
            if len(line) < 3 or not line[:3].isdigit() or mark not in (b"", b" ", b"-"):
                raise _ProtocolError(f"not an SMTP reply: {line[:80]!r}")
            if not lines:
                code = int(line[:3])
            elif int(line[:3]) != code:
                raise _ProtocolError(f"reply code changed within a reply: {line[:80]!r}")
            lines.append(line[4:].decode("utf-8", "replace"))
            if mark != b"-":
                break
            if len(lines) > _MAX_REPLY_LINES:
                raise _ProtocolError("reply has too many lines")
        reply = _Reply(code, tuple(lines))
        if code == 421:  # RFC 5321 §3.8: the server is closing the channel
            self.broken = True
            raise _SessionFailed(f"{self.where} said: {reply}", reply=reply)
        return reply

    def _timed_out(self) -> None:
        # A reply line that arrived just in time is buffered even if the reading task has not
        # run yet; only a reader still waiting has run out of time. It is failed rather than
        # its task cancelled, so the wait raises TimeoutError as asyncio.timeout's would; every
        # caller then abandons the connection, whose reader keeps the error.
        if b"\n" not in _unread(self.reader):
            self.reader.set_exception(TimeoutError())

    def _stop_timers(self) -> None:
        self._watchdog.cancel()
        if self.expiry is not None:
            self.expiry.cancel()

    def abort(self) -> None:
        self.broken = True
        self._stop_timers()
        self.writer.transport.abort()

    def close_politely(self) -> None:
        """QUIT without waiting for the answer (for idle expiry, which cannot await)."""
        self._stop_timers()
        if not self.writer.is_closing():
            self.writer.write(b"QUIT\r\n")
            self.writer.close()

    async def quit(self) -> None:
        try:
            async with asyncio.timeout(min(_QUIT_SECONDS, self._timeout)):
                await self.command("QUIT")
                await self.reply()
                self.writer.close()
                await self.writer.wait_closed()
        except (OSError, TimeoutError, _ProtocolError, _SessionFailed):
            pass
        finally:
            self.abort()

    # -- session set-up ------------------------------------------------------------------------

    async def greet(self) -> None:
        greeting = await self.reply()
        if greeting.code != 220:  # RFC 5321 §3.1: 554 here means "no service"
            raise _SessionFailed(f"{self.where} greeted us with: {greeting}", enhanced="4.4.1")
        await self.hello()

    async def hello(self) -> None:
        await self.command(f"EHLO {self._helo}")
        reply = await self.reply()
        if reply.code == 250:
            self.extensions = _parse_ehlo(reply.lines[1:])
            return
        if reply.code in (500, 502):  # RFC 5321 §4.1.4: fall back to HELO, no extensions
            await self.command(f"HELO {self._helo}")
            reply = await self.reply()
            if reply.code == 250:
                self.extensions = {}
                return
        raise _SessionFailed(f"{self.where} refused our EHLO: {reply}")

    async def starttls(self, context: ssl.SSLContext, server_hostname: str) -> bool:
        """Upgrade to TLS (RFC 3207); False if the server declined, so the caller decides."""
        await self.command("STARTTLS")
        reply = await self.reply()
        if reply.code != 220:
            return False
        # Anything the server sent after its 220 arrived in plaintext and must not be read as
        # if it came over TLS (the STARTTLS response-injection attack, CVE-2011-0411's twin).
        buffered = _unread(self.reader)
        if buffered:
            raise _SessionFailed(
                f"{self.where} sent data after its STARTTLS reply", enhanced="4.7.5"
            )
        try:
            async with asyncio.timeout(self._connect_timeout):
                await self.writer.start_tls(
                    context,
                    server_hostname=server_hostname,
                    ssl_handshake_timeout=self._connect_timeout,
                )
        except (OSError, TimeoutError) as exc:
            raise _TlsFailed(_tls_failure(self.where, exc, self.advice), enhanced="4.7.5") from None
        self.tls = True
        await self.hello()  # RFC 3207 §4.2: forget what was learnt before TLS
        return True

    async def authenticate(self, username: str, password: str, *, bearer: bool = False) -> None:
        """AUTH PLAIN (RFC 4616) or LOGIN, or XOAUTH2 with an OAuth access token (``bearer``);
        the secret never appears in any message."""
        offered = self.extensions.get("AUTH", "").upper().split()
        if bearer:
            if "XOAUTH2" not in offered:
                what = f"only {' '.join(offered)}" if offered else "no AUTH"
                raise _SessionFailed(
                    f"{self.where} offers {what}; an OAuth mailbox needs AUTH XOAUTH2",
                    enhanced="4.7.0",
                )
            blob = f"user={username}\x01auth=Bearer {password}\x01\x01".encode()
            await self.command(f"AUTH XOAUTH2 {base64.b64encode(blob).decode('ascii')}")
            reply = await self.reply()
            if reply.code == 334:  # the error, base64 JSON; an empty line ends the exchange
                await self.command("")
                reply = await self.reply()
        elif "PLAIN" in offered:
            token = base64.b64encode(f"\0{username}\0{password}".encode()).decode("ascii")
            await self.command(f"AUTH PLAIN {token}")
            reply = await self.reply()
        elif "LOGIN" in offered:
            await self.command("AUTH LOGIN")
            reply = await self.reply()
            for secret in (username, password):
                if reply.code != 334:
                    break
                await self.command(base64.b64encode(secret.encode()).decode("ascii"))
                reply = await self.reply()
        else:
            what = f"only {' '.join(offered)}" if offered else "no AUTH"
            raise _SessionFailed(
                f"{self.where} offers {what}; {self.advice.auth}",
                enhanced="4.7.0",
            )
        if reply.code != 235:
            if reply.code == 334:  # an unexpected challenge: cancel the exchange (RFC 4954 §4)
                await self.command("*")
                reply = await self.reply()
            raise _SessionFailed(
                f"{self.where} refused AUTH for {username!r}: {reply}", enhanced="4.7.8"
            )

    # -- one message ---------------------------------------------------------------------------

    async def transact(
        self, sender: str, recipients: Sequence[str], payload: _Payload, *, reuse: bool
    ) -> list[RecipientResult]:
        """MAIL, RCPT…, DATA for one message; one result per recipient, in order.

        Network failures become temporary results (and mark the session broken), except that on
        a reused connection (``reuse``) a failure before the first reply raises :class:`_Stale`:
        the server had closed it while idle, nothing was sent, and the caller reconnects.
        """
        final: dict[int, RecipientResult] = {}
        refused = self._refuse_locally(sender, recipients, payload)
        if refused is not None:
            return refused
        smtputf8 = "SMTPUTF8" in self.extensions and (
            payload.utf8_headers or not sender.isascii() or not all(r.isascii() for r in recipients)
        )
        params = []
        if "SIZE" in self.extensions:
            params.append(f"SIZE={len(payload.data) + 3}")  # RFC 1870 §6
        if payload.eight_bit:
            if "8BITMIME" in self.extensions or smtputf8:
                params.append("BODY=8BITMIME")  # RFC 6152
            else:
                # Most servers take 8-bit data anyway; downgrading would break DKIM signatures.
                log.info("%s does not offer 8BITMIME; sending 8-bit data as it is", self.where)
        if smtputf8:
            params.append("SMTPUTF8")  # RFC 6531 §3.4
        mail = " ".join([f"MAIL FROM:<{sender}>", *params])
        rcpts = [f"RCPT TO:<{recipient}>" for recipient in recipients]
        phase = "before MAIL FROM"
        try:
            accepted: list[int] = []
            data_reply: _Reply | None = None
            pipelining = "PIPELINING" in self.extensions
            # RSET cleans up after a transaction that did not end with DATA, and probes a
            # pooled connection. With PIPELINING it rides in the same packet, so always; without,
            # it would cost a round trip per message, so a cleanly ended transaction goes
            # straight to MAIL and MAIL's reply is the probe instead (RFC 5321 §4.1.1.5: the
            # state after a completed DATA is already reset).
            reset = reuse and (pipelining or self.dirty)
            self.dirty = True
            if pipelining:
                first = ["RSET"] if reset else []
                await self._send_first([*first, mail, *rcpts, "DATA"], probe=reuse, utf8=smtputf8)
            else:
                await self._send_first(["RSET"] if reset else [mail], probe=reuse, utf8=smtputf8)
            probe = reuse
            if reset:
                if (await self._probe_reply(probe)).code != 250:
                    raise _Stale
                probe = False
                if not pipelining:
                    await self.command(mail, utf8=smtputf8)
            phase = "after MAIL FROM"
            mail_reply = await self._probe_reply(probe)
            mail_ok = 200 <= mail_reply.code < 300
            phase = "after RCPT TO"
            for index, command in enumerate(rcpts):
                if not pipelining:
                    if not mail_ok:
                        break
                    await self.command(command, utf8=smtputf8)
                reply = await self.reply()
                if not mail_ok:
                    reply = mail_reply  # MAIL's answer decides; RCPTs got 503 (bad sequence)
                if 200 <= reply.code < 300:
                    accepted.append(index)
                else:
                    final[index] = self._result(recipients[index], reply)
            if not mail_ok:
                for index, recipient in enumerate(recipients):
                    final[index] = self._result(recipient, mail_reply)
            phase = "after DATA"
            if pipelining:
                data_reply = await self.reply()
            elif accepted:
                await self.command("DATA")
                data_reply = await self.reply()
            if data_reply is not None and data_reply.code == 354 and not accepted:
                # RFC 2920 §3.1: DATA was accepted with no valid recipient; end it empty.
                await self._write(b".\r\n")
                await self.reply()
            elif data_reply is not None and accepted:
                if data_reply.code == 354:
                    phase = "while sending message data"
                    await self._send_data(payload.data)
                    phase = "after end of data"
                    data_reply = await self.reply()
                    self.dirty = False  # RFC 5321 §4.1.1.4: the transaction is over either way
                for index in accepted:
                    final[index] = self._result(recipients[index], data_reply)
        except _SessionFailed as failure:
            self.broken = True
            for index, recipient in enumerate(recipients):
                if index not in final:
                    final[index] = self._failure_result(recipient, failure)
        except (OSError, TimeoutError, EOFError, _ProtocolError) as exc:
            self.broken = True
            text = f"{self.where}: {_describe(exc)} {phase}"
            if phase == "after end of data":
                text += " (the message may arrive twice)"  # RFC 1047
            for index, recipient in enumerate(recipients):
                if index not in final:
                    final[index] = RecipientResult(recipient, 0, text, "4.4.2")
        return [final[index] for index in range(len(recipients))]

    async def _send_first(self, lines: list[str], *, probe: bool, utf8: bool) -> None:
        try:
            await self.command(*lines, utf8=utf8)
        except ConnectionError:
            if probe:
                raise _Stale from None
            raise

    async def _probe_reply(self, probe: bool) -> _Reply:
        """A reply; on a reused connection, no reply at all means it went stale while idle."""
        if not probe:
            return await self.reply()
        try:
            return await self.reply()
        except (ConnectionError, EOFError, _SessionFailed, _ProtocolError):
            raise _Stale from None

    async def _send_data(self, data: bytes) -> None:
        if len(data) <= _WRITE_CHUNK:
            await self._write(data + b".\r\n")
            return
        view = memoryview(data)
        for start in range(0, len(view), _WRITE_CHUNK):
            await self._write(view[start : start + _WRITE_CHUNK])
        await self._write(b".\r\n")

    def _refuse_locally(
        self, sender: str, recipients: Sequence[str], payload: _Payload
    ) -> list[RecipientResult] | None:
        """Permanent results decided from the server's EHLO alone, before sending anything."""
        limit = self.extensions.get("SIZE", "")
        if limit.isdigit() and 0 < int(limit) < len(payload.data):  # RFC 1870 §4
            text = f"message of {len(payload.data)} bytes exceeds {self.where}'s limit of {limit}"
            return [RecipientResult(r, 552, text, "5.3.4") for r in recipients]
        if "SMTPUTF8" in self.extensions:
            return None
        # RFC 6531 §3.2: a non-ASCII address cannot go to a server without SMTPUTF8.
        if not sender.isascii():
            text = f"{self.where} does not support SMTPUTF8, needed for the sender {sender}"
            return [RecipientResult(r, 550, text, "5.6.7") for r in recipients]
        if all(r.isascii() for r in recipients):
            return None
        raise _NeedsSplit

    def _result(self, recipient: str, reply: _Reply) -> RecipientResult:
        return RecipientResult(recipient, reply.code, reply.text, reply.enhanced, self.host)

    def _failure_result(self, recipient: str, failure: _SessionFailed) -> RecipientResult:
        if failure.reply is not None:
            return self._result(recipient, failure.reply)
        return RecipientResult(recipient, 0, failure.text, failure.enhanced)


class _NeedsSplit(Exception):
    """Some recipients are non-ASCII and the server lacks SMTPUTF8: send the others alone."""


def _parse_ehlo(lines: Sequence[str]) -> dict[str, str]:
    """EHLO keywords (upper case) to their parameters (RFC 5321 §4.1.1.1)."""
    extensions: dict[str, str] = {}
    for line in lines:
        keyword, _, params = line.strip().partition(" ")
        keyword = keyword.upper()
        if keyword.startswith("AUTH="):  # a pre-RFC 4954 form some servers still send
            params = f"{keyword[5:]} {params}".strip()
            keyword = "AUTH"
        if keyword == "AUTH" and "AUTH" in extensions:
            params = f"{extensions['AUTH']} {params}"
        extensions[keyword] = params.strip()
    return extensions


class _Pool:
    """Open connections to one route: at most ``size`` in use, the idle ones reused LIFO."""

    __slots__ = ("idle", "key", "slots", "users")

    def __init__(self, key: tuple[str, ...], size: int) -> None:
        self.key = key
        self.slots = asyncio.Semaphore(size)
        self.idle: list[_Session] = []
        self.users = 0


class Relay:
    """Delivers messages by SMTP to the configured smarthost or to the recipients' MX hosts.

    In ``mx`` mode ``settings.port`` is the port MX hosts are contacted on (25 unless a test
    points it elsewhere) and ``resolver`` answers the MX/A/AAAA queries (default: the system's).
    """

    def __init__(
        self,
        settings: RelaySettings,
        *,
        hostname: str,
        resolver: dns.asyncresolver.Resolver | None = None,
        bearer: bool = False,
        advice: Advice | None = None,
    ) -> None:
        self._settings = settings
        self._advice = advice or Advice()
        # settings.password is an OAuth access token, sent as SASL XOAUTH2 (a mailbox's own
        # submission server at Google or Microsoft).
        self._bearer = bearer
        self._helo = settings.helo_name or hostname
        if resolver is None and settings.mode == "mx":
            resolver = dns.asyncresolver.Resolver()
            resolver.lifetime = settings.connect_timeout_seconds
        self._resolver = resolver
        self._pools: dict[tuple[str, ...], _Pool] = {}
        self._closed = False
        self._verified_tls = _verified_context(settings)
        # RFC 7435 opportunistic TLS to MX hosts: encrypt without authenticating (an MX name
        # rarely matches its certificate, and without DANE/MTA-STS nothing says it should).
        self._opportunistic_tls = ssl.create_default_context()
        self._opportunistic_tls.check_hostname = False
        self._opportunistic_tls.verify_mode = ssl.CERT_NONE

    async def send(
        self, sender: str, recipients: Sequence[str], message: bytes
    ) -> list[RecipientResult]:
        """Deliver ``message`` (raw RFC 5322 bytes) from ``sender`` ("" is the null reverse
        path of a DSN) to each recipient; one result per recipient, in order."""
        if self._closed:
            raise RuntimeError("Relay.send() after aclose()")
        _check_address(sender, "sender")
        for recipient in recipients:
            _check_address(recipient, "recipient")
        if not recipients:
            return []
        payload = _prepare(message)
        if self._settings.mode == "smarthost":  # one route, results already in order
            return await self._deliver(_SMARTHOST, sender, list(recipients), payload)
        results: dict[int, RecipientResult] = {}
        groups: dict[_Route, list[int]] = {}
        await self._route_mx(recipients, groups, results)
        deliveries = [
            self._deliver(route, sender, [recipients[index] for index in indices], payload)
            for route, indices in groups.items()
        ]
        if len(deliveries) == 1:  # one MX route: no task needed
            (indices,) = groups.values()
            for index, result in zip(indices, await deliveries[0], strict=True):
                results[index] = result
            return [results[index] for index in range(len(recipients))]
        try:
            # A TaskGroup so that a bug in one route's delivery cancels the others.
            async with asyncio.TaskGroup() as tasks:
                done = [tasks.create_task(delivery) for delivery in deliveries]
        except BaseExceptionGroup as group:
            raise group.exceptions[0] from None
        for indices, task in zip(groups.values(), done, strict=True):
            for index, result in zip(indices, task.result(), strict=True):
                results[index] = result
        return [results[index] for index in range(len(recipients))]

    async def aclose(self) -> None:
        """QUIT every idle connection; connections in use are closed when their send ends."""
        self._closed = True
        sessions = [session for pool in self._pools.values() for session in pool.idle]
        for pool in self._pools.values():
            pool.idle.clear()
        await asyncio.gather(*(session.quit() for session in sessions))

    # -- delivery on one route -----------------------------------------------------------------

    async def _deliver(
        self,
        route: _Route,
        sender: str,
        wanted: list[str],
        payload: _Payload,
    ) -> list[RecipientResult]:
        pool = self._pools.get(route.key)
        if pool is None:
            pool = self._pools[route.key] = _Pool(route.key, self._settings.max_connections)
        pool.users += 1
        try:
            async with pool.slots:
                results: list[RecipientResult] = []
                for start in range(0, len(wanted), MAX_RECIPIENTS_PER_TRANSACTION):
                    batch = wanted[start : start + MAX_RECIPIENTS_PER_TRANSACTION]
                    results += await self._transaction(route, pool, sender, batch, payload)
                return results
        finally:
            pool.users -= 1
            self._prune(pool)

    async def _transaction(
        self, route: _Route, pool: _Pool, sender: str, batch: list[str], payload: _Payload
    ) -> list[RecipientResult]:
        session = self._take_idle(pool)
        if session is not None:
            try:
                return await self._run(pool, session, sender, batch, payload, reuse=True)
            except _Stale:
                # The server closed it while it sat idle; its older siblings likely went too.
                log.debug("pooled connection to %s was closed by the server", session.where)
                for other in pool.idle:
                    other.abort()
                pool.idle.clear()
        try:
            session = await self._connect(route)
        except _SessionFailed as failure:
            return [RecipientResult(r, 0, failure.text, failure.enhanced) for r in batch]
        try:
            return await self._run(pool, session, sender, batch, payload, reuse=False)
        except _Stale:  # only raised with reuse=True
            raise AssertionError("a fresh connection cannot be stale") from None

    async def _run(
        self,
        pool: _Pool,
        session: _Session,
        sender: str,
        batch: list[str],
        payload: _Payload,
        *,
        reuse: bool,
    ) -> list[RecipientResult]:
        try:
            try:
                results = await session.transact(sender, batch, payload, reuse=reuse)
            except _NeedsSplit:
                results = await self._split_utf8(session, sender, batch, payload, reuse=reuse)
        except BaseException:
            session.abort()  # stale, cancelled or a bug: never pool a connection mid-dialogue
            raise
        if session.broken or self._closed or time.monotonic() - session.created > REUSE_SECONDS:
            if session.broken:
                session.abort()
            else:
                session.close_politely()
        else:
            self._put_idle(pool, session)
        return results

    async def _split_utf8(
        self, session: _Session, sender: str, batch: list[str], payload: _Payload, *, reuse: bool
    ) -> list[RecipientResult]:
        """Send to the ASCII recipients; refuse the others (RFC 6531 §3.2, no SMTPUTF8)."""
        ascii_only = [r for r in batch if r.isascii()]
        sent = iter(
            await session.transact(sender, ascii_only, payload, reuse=reuse) if ascii_only else []
        )
        text = f"{session.where} does not support SMTPUTF8, needed for this address"
        return [
            next(sent) if r.isascii() else RecipientResult(r, 553, text, "5.6.7") for r in batch
        ]

    def _take_idle(self, pool: _Pool) -> _Session | None:
        now = time.monotonic()
        while pool.idle:
            session = pool.idle.pop()  # LIFO: the most recently used is the least likely stale
            if session.expiry is not None:
                session.expiry.clear()
            if session.reader.at_eof() or now - session.created > REUSE_SECONDS:
                session.abort()
                continue
            return session
        return None

    def _put_idle(self, pool: _Pool, session: _Session) -> None:
        pool.idle.append(session)
        loop = asyncio.get_running_loop()
        if session.expiry is None:  # one per connection, moved at every return to the pool
            session.expiry = LazyDeadline(loop, lambda: self._expire(pool, session))
        session.expiry.set(loop.time() + IDLE_SECONDS)

    def _expire(self, pool: _Pool, session: _Session) -> None:
        if session in pool.idle:  # (not taken or closed since)
            pool.idle.remove(session)
            session.close_politely()
            self._prune(pool)

    def _prune(self, pool: _Pool) -> None:
        """Forget a route nobody uses and nothing is pooled for (MX mode meets many domains)."""
        if pool.users == 0 and not pool.idle and self._pools.get(pool.key) is pool:
            del self._pools[pool.key]

    # -- connecting ----------------------------------------------------------------------------

    async def _connect(self, route: _Route) -> _Session:
        if not route.mx:
            return await self._connect_smarthost()
        failures: list[str] = []
        attempts = 0
        for preference in route.mx:
            hosts = list(preference)
            random.shuffle(hosts)  # RFC 5321 §5.1: spread load over equal preferences
            for host in hosts:
                if attempts == MAX_MX_ADDRESSES:
                    break
                addresses, problem = await self._addresses(host)
                if not addresses:
                    failures.append(f"MX host {host}: {problem}")
                for address in addresses:
                    if attempts == MAX_MX_ADDRESSES:
                        break
                    attempts += 1
                    try:
                        return await self._connect_mx(host, address)
                    except _SessionFailed as failure:
                        failures.append(failure.text)
        text = "; ".join(failures[-3:]) or "no MX host to try"
        raise _SessionFailed(text, enhanced="4.4.1")

    async def _connect_smarthost(self) -> _Session:
        settings = self._settings
        host = settings.host
        implicit = settings.security == "tls"  # RFC 8314 §3.3: TLS from the first byte
        session = await self._open(
            host,
            host,
            tls=self._verified_tls if implicit else None,
        )
        try:
            if settings.security == "starttls":
                secured = "STARTTLS" in session.extensions and await session.starttls(
                    self._verified_tls, host
                )
                if not secured and settings.require_tls:
                    raise _SessionFailed(
                        f"{session.where} does not offer STARTTLS and {self._advice.starttls}",
                        enhanced="4.7.10",
                    )
            if settings.username:
                if not session.tls and settings.security != "none":
                    # Credentials go in plaintext only when the admin chose security = "none".
                    raise _SessionFailed(
                        f"not sending the relay password to {session.where} without TLS",
                        enhanced="4.7.10",
                    )
                await session.authenticate(
                    settings.username, settings.password, bearer=self._bearer
                )
        except (OSError, TimeoutError, EOFError, _ProtocolError) as exc:
            session.abort()
            raise _SessionFailed(f"{session.where}: {_describe(exc)} during set-up") from None
        except BaseException:
            session.abort()
            raise
        return session

    async def _connect_mx(self, host: str, address: str) -> _Session:
        session = await self._open(host, address, tls=None)
        try:
            if "STARTTLS" in session.extensions:
                try:
                    await session.starttls(self._opportunistic_tls, host)
                except _TlsFailed as failure:
                    # RFC 7435 §3: a failed opportunistic handshake falls back to plaintext,
                    # on a new connection since this one is in an unknown TLS state.
                    log.warning("%s; retrying without TLS", failure.text)
                    session.abort()
                    return await self._open(host, address, tls=None)
        except (OSError, TimeoutError, EOFError, _ProtocolError) as exc:
            session.abort()
            raise _SessionFailed(f"{session.where}: {_describe(exc)} during set-up") from None
        except BaseException:
            session.abort()
            raise
        return session

    async def _open(self, host: str, address: str, *, tls: ssl.SSLContext | None) -> _Session:
        """Connect, read the greeting and say EHLO; raise :class:`_SessionFailed` if not."""
        port = self._settings.port
        shown = host if address == host else f"{host}[{address}]"
        where = f"{shown}:{port}"
        timeout = self._settings.connect_timeout_seconds
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_connection(
                    address,
                    port,
                    ssl=tls,
                    server_hostname=host if tls is not None else None,
                    ssl_handshake_timeout=timeout if tls is not None else None,
                )
        except ssl.SSLError as exc:
            raise _SessionFailed(_tls_failure(where, exc, self._advice), enhanced="4.7.5") from None
        except (OSError, TimeoutError) as exc:
            raise _SessionFailed(
                f"cannot connect to {where}: {_describe(exc)}", enhanced="4.4.1"
            ) from None
        session = _Session(
            reader,
            writer,
            host=host,
            where=where,
            settings=self._settings,
            helo=self._helo,
            advice=self._advice,
        )
        try:
            await session.greet()
        except (OSError, TimeoutError, EOFError, _ProtocolError) as exc:
            session.abort()
            raise _SessionFailed(f"{where}: {_describe(exc)} during greeting or EHLO") from None
        except BaseException:
            session.abort()
            raise
        return session

    # -- MX routing (RFC 5321 §5.1) ------------------------------------------------------------

    async def _route_mx(
        self,
        recipients: Sequence[str],
        groups: dict[_Route, list[int]],
        results: dict[int, RecipientResult],
    ) -> None:
        domains: dict[str, list[int]] = {}
        for index, recipient in enumerate(recipients):
            local, at, domain = recipient.rpartition("@")
            if not at or not local or not domain:
                results[index] = RecipientResult(
                    recipient, 553, "recipient address has no domain to deliver to", "5.1.3"
                )
                continue
            domains.setdefault(domain.lower(), []).append(index)
        names = list(domains)
        routes = await asyncio.gather(*(self._lookup(domain) for domain in names))
        for domain, route in zip(names, routes, strict=True):
            if isinstance(route, _Refusal):
                for index in domains[domain]:
                    results[index] = route.result(recipients[index])
            else:
                groups.setdefault(route, []).extend(domains[domain])
        for indices in groups.values():
            indices.sort()

    async def _lookup(self, domain: str) -> _Route | _Refusal:
        """The MX hosts for ``domain``, or why there are none."""
        if domain.startswith("[") and domain.endswith("]"):
            literal = domain[1:-1]
            literal = literal[5:] if literal.lower().startswith("ipv6:") else literal
            try:
                address = str(ipaddress.ip_address(literal))  # RFC 5321 §4.1.3 address literal
            except ValueError:
                return _Refusal(553, "5.1.2", f"{domain} is not a valid address literal")
            return self._mx_route(((address,),))
        try:
            name = dns.name.from_text(domain)
        except (dns.exception.DNSException, UnicodeError):
            return _Refusal(553, "5.1.2", f"{domain} is not a valid domain name")
        assert self._resolver is not None
        try:
            answer = await self._resolver.resolve(name, dns.rdatatype.MX, search=False)
        except dns.resolver.NXDOMAIN:
            return _Refusal(550, "5.1.2", f"domain {domain} does not exist (DNS: NXDOMAIN)")
        except dns.resolver.NoAnswer:
            # RFC 5321 §5.1: no MX records means the domain itself is the one "implicit MX".
            addresses, problem = await self._addresses(domain)
            if addresses:
                return self._mx_route(((domain,),))
            if problem.startswith("temporary"):
                return _Refusal(451, "4.4.3", f"{domain}: {problem}")
            return _Refusal(550, "5.1.2", f"domain {domain} has no MX and no address record")
        except dns.exception.DNSException as exc:  # SERVFAIL, timeout: ask again later
            return _Refusal(451, "4.4.3", f"DNS lookup of MX for {domain} failed: {_dns_text(exc)}")
        records = [
            (record.preference, record.exchange)
            for record in answer
            if isinstance(record, dns.rdtypes.ANY.MX.MX)
        ]
        if len(records) == 1 and records[0][1] == dns.name.root:
            # RFC 7505 §3: a null MX says the domain accepts no mail at all.
            return _Refusal(556, "5.1.10", f"domain {domain} accepts no mail (null MX, RFC 7505)")
        by_preference: dict[int, list[str]] = {}
        for preference, exchange in sorted(records, key=lambda pair: pair[0]):
            if exchange != dns.name.root:
                host = exchange.to_text(omit_final_dot=True).lower()
                by_preference.setdefault(preference, []).append(host)
        if not by_preference:
            return _Refusal(550, "5.1.2", f"domain {domain} has no usable MX record")
        return self._mx_route(tuple(tuple(sorted(hosts)) for hosts in by_preference.values()))

    def _mx_route(self, preferences: tuple[tuple[str, ...], ...]) -> _Route:
        key = ("mx", str(self._settings.port), *("|".join(hosts) for hosts in preferences))
        return _Route(key, preferences)

    async def _addresses(self, host: str) -> tuple[list[str], str]:
        """IPv4 then IPv6 addresses of ``host``, or ([], why) - "temporary …" if DNS failed."""
        try:
            return [str(ipaddress.ip_address(host))], ""
        except ValueError:
            pass
        assert self._resolver is not None
        answers = await asyncio.gather(
            self._resolver.resolve(host, dns.rdatatype.A, search=False),
            self._resolver.resolve(host, dns.rdatatype.AAAA, search=False),
            return_exceptions=True,
        )
        addresses: list[str] = []
        temporary = ""
        for answer in answers:
            if isinstance(answer, dns.resolver.NXDOMAIN | dns.resolver.NoAnswer):
                continue
            if isinstance(answer, dns.exception.DNSException):
                temporary = f"temporary DNS failure: {_dns_text(answer)}"
                continue
            if isinstance(answer, BaseException):
                raise answer
            for record in answer:
                if isinstance(record, dns.rdtypes.IN.A.A | dns.rdtypes.IN.AAAA.AAAA):
                    addresses.append(record.address)
        if addresses:
            return addresses, ""
        return [], temporary or "no address record (A/AAAA)"


def _tls_failure(where: str, exc: BaseException, advice: Advice) -> str:
    text = f"TLS with {where} failed: {_describe(exc)}"
    if isinstance(exc, ssl.SSLCertVerificationError):
        text += f"; {advice.ca_file}"
    return text


def _dns_text(exc: dns.exception.DNSException) -> str:
    if isinstance(exc, dns.exception.Timeout):
        return "timed out"
    if isinstance(exc, dns.resolver.NoNameservers):
        return "no name server answered (SERVFAIL)"
    return str(exc).split(": ", 1)[0] or type(exc).__name__


def _verified_context(settings: RelaySettings) -> ssl.SSLContext:
    """The client context for the smarthost: verification on unless the admin turned it off."""
    try:
        context = ssl.create_default_context(
            cafile=str(settings.ca_file) if settings.ca_file else None
        )
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"relay.ca_file = {str(settings.ca_file)!r}: cannot load it ({exc}); "
            "point it at a PEM file of CA certificates"
        ) from None
    if not settings.verify_certificate:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context
