"""Relay against real SMTP servers: Postfix, aiosmtpd sinks, NSD for MX, on loopback sockets.

What the wire carries is observed by :class:`WireTap`, a TCP proxy in front of a sink that records
the client's bytes, counts connections, and can hang up like a server that dropped an idle one.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import re
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, Self

import dns.asyncresolver
import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

import gateway.relay
from gateway.relay import RecipientResult, Relay, _prepare
from gateway.settings import RelaySettings
from tests.servers.certs import TestCA
from tests.servers.dns import AuthoritativeDns
from tests.servers.dovecot import DovecotServer
from tests.servers.ports import free_port
from tests.servers.postfix import PostfixRelay
from tests.servers.sink import MessageSink, Received

MESSAGE = b"From: rep@corp.test\r\nTo: buyer@client.test\r\nSubject: Offer\r\n\r\nHello.\r\n"


def run(coro: Awaitable[Any]) -> Any:
    """Run one test's coroutine on a fresh loop (the servers run in their own threads)."""

    async def bounded() -> Any:
        async with asyncio.timeout(60):
            return await coro

    return asyncio.run(bounded())


def settings(**overrides: Any) -> RelaySettings:
    base: dict[str, Any] = {
        "host": "127.0.0.1",
        "security": "none",
        "connect_timeout_seconds": 5,
        "command_timeout_seconds": 5,
    }
    return RelaySettings(**(base | overrides))


async def poll(check: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not true after {timeout}s: {what}")
        await asyncio.sleep(0.01)


def arrived(sink: MessageSink, recipient: str, count: int = 1) -> list[Received]:
    """Messages for ``recipient`` at the sink (waiting, with a deadline, for ``count``)."""
    lowered = recipient.lower()
    return sink.wait_for(count, 10, where=lambda m: lowered in (r.lower() for r in m.rcpt_tos))


class LoopbackServer:
    """An asyncio server on a free loopback port for the length of an ``async with``; a
    subclass answers each connection in ``_handle``."""

    port = 0
    _server: asyncio.Server | None = None

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError


class WireTap(LoopbackServer):
    """A TCP proxy to ``port`` that records what clients send and can hang up on them."""

    def __init__(self, port: int) -> None:
        self.target = port
        self.connections = 0
        self.sent: list[bytearray] = []  # per connection, what the client wrote
        self.hang_up_on_next_command = False
        self.sabotage_next_starttls = False  # answer the TLS handshake with garbage, once
        self._peers: list[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = []

    async def __aexit__(self, *exc: object) -> None:
        for client, upstream in self._peers:
            client.transport.abort()
            upstream.transport.abort()
        await super().__aexit__(*exc)

    @property
    def open_connections(self) -> int:
        return sum(1 for client, _ in self._peers if not client.is_closing())

    async def hang_up_all(self, farewell: bytes = b"") -> None:
        """Close every connection from the server's side, as an idle timeout does."""
        for client, upstream in self._peers:
            if farewell and not client.is_closing():
                client.write(farewell)
            client.close()
            upstream.transport.abort()
        await poll(lambda: self.open_connections == 0, "tap connections closed")

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        self.connections += 1
        record = bytearray()
        self.sent.append(record)
        up_r, up_w = await asyncio.open_connection("127.0.0.1", self.target)
        self._peers.append((client_w, up_w))

        async def client_to_server() -> None:
            sabotaged = False
            while data := await client_r.read(65536):
                if sabotaged:  # the client's TLS ClientHello: answer with something else
                    client_w.write(b"this is not TLS\r\n" * 8)
                    client_w.close()
                    up_w.transport.abort()
                    return
                if self.sabotage_next_starttls and data.startswith(b"STARTTLS"):
                    self.sabotage_next_starttls = False
                    sabotaged = True
                    client_w.write(b"220 2.0.0 Ready to start TLS\r\n")
                    continue
                if self.hang_up_on_next_command:
                    self.hang_up_on_next_command = False
                    client_w.transport.abort()
                    up_w.transport.abort()
                    return
                record.extend(data)
                up_w.write(data)
                await up_w.drain()
            up_w.close()

        async def server_to_client() -> None:
            while data := await up_r.read(65536):
                client_w.write(data)
                await client_w.drain()
            client_w.close()

        await asyncio.gather(client_to_server(), server_to_client(), return_exceptions=True)


@pytest.fixture
def plain_sink() -> Iterator[MessageSink]:
    with MessageSink() as sink:
        yield sink


@contextlib.asynccontextmanager
async def relay_for(port: int, **overrides: Any) -> AsyncIterator[Relay]:
    relay = Relay(settings(port=port, **overrides), hostname="gw.mailgate.test")
    try:
        yield relay
    finally:
        await relay.aclose()


# -- the wire ---------------------------------------------------------------------------------


def test_output_is_strict_crlf_and_dot_stuffed_on_the_wire(plain_sink: MessageSink) -> None:
    # Bare LF, bare CR, lines starting with "." (one alone, as the terminator looks) and a last
    # line without any line end: everything a sloppy producer might hand over.
    message = (
        b"From: rep@corp.test\nTo: wire@client.test\rSubject: dots\r\n\r\n"
        b".leading dot\n..two dots\r\n.\r\nmiddle\n.\nlast line without newline"
    )
    normalised = (
        b"From: rep@corp.test\r\nTo: wire@client.test\r\nSubject: dots\r\n\r\n"
        b".leading dot\r\n..two dots\r\n.\r\nmiddle\r\n.\r\nlast line without newline\r\n"
    )
    on_the_wire = (
        b"From: rep@corp.test\r\nTo: wire@client.test\r\nSubject: dots\r\n\r\n"
        b"..leading dot\r\n...two dots\r\n..\r\nmiddle\r\n..\r\nlast line without newline\r\n"
        b".\r\n"
    )

    async def scenario() -> bytes:
        async with WireTap(plain_sink.port) as tap, relay_for(tap.port) as relay:
            results = await relay.send("rep@corp.test", ["wire@client.test"], message)
            assert [r.code for r in results] == [250]
            return bytes(tap.sent[0])

    wire = run(scenario())
    data_start = wire.index(b"DATA\r\n") + len(b"DATA\r\n")
    assert wire[data_start : data_start + len(on_the_wire)] == on_the_wire
    # Every line ending the client wrote at all was a CRLF.
    assert wire.count(b"\n") == wire.count(b"\r\n") == wire.count(b"\r")
    (received,) = arrived(plain_sink, "wire@client.test")
    assert received.data == normalised


def test_message_starting_with_a_dot_and_a_large_one_are_stuffed(plain_sink: MessageSink) -> None:
    # A body of 2 MB goes out in slices; dots at slice boundaries must not confuse anything.
    line = b".x" + b"y" * 97 + b"\r\n"  # 101 bytes, so lines straddle the 256 KiB slices
    big = b"Subject: big\r\n\r\n" + line * 20_000
    starts_with_dot = b".Subject-less oddity\r\n"

    async def scenario() -> list[RecipientResult]:
        async with relay_for(plain_sink.port) as relay:
            first = await relay.send("rep@corp.test", ["big@client.test"], big)
            second = await relay.send("rep@corp.test", ["dot@client.test"], starts_with_dot)
            return first + second

    assert [r.code for r in run(scenario())] == [250, 250]
    assert arrived(plain_sink, "big@client.test")[0].data == big
    assert arrived(plain_sink, "dot@client.test")[0].data == starts_with_dot


def _prepared_the_long_way(message: bytes) -> bytes:
    """What _prepare must produce, computed by normalising and stuffing every message."""
    message = re.sub(rb"\r\n|\r|\n", b"\r\n", message)
    message = re.sub(rb"(?m)^\.", b"..", message.replace(b"\r\n", b"\n")).replace(b"\n", b"\r\n")
    return message if not message or message.endswith(b"\r\n") else message + b"\r\n"


def test_preparation_agrees_with_normalising_everything() -> None:
    # _prepare skips its passes when two searches find nothing to change; every short mix of
    # CR, LF, "." and text (bare ends first and last included) must come out the same anyway.
    pieces = [b"\r", b"\n", b"\r\n", b".", b"a", b"\xc3\xa9"]
    for length in range(6):
        for combination in itertools.product(pieces, repeat=length):
            message = b"".join(combination)
            assert _prepare(message).data == _prepared_the_long_way(message), message


def test_null_reverse_path_is_sent_as_empty_brackets(plain_sink: MessageSink) -> None:
    async def scenario() -> bytes:
        async with WireTap(plain_sink.port) as tap, relay_for(tap.port) as relay:
            results = await relay.send("", ["bounce@client.test"], MESSAGE)
            assert results[0].delivered
            return bytes(tap.sent[0])

    assert b"\r\nMAIL FROM:<>" in run(scenario())
    assert arrived(plain_sink, "bounce@client.test")[0].mail_from == "<>"


# -- per-recipient results --------------------------------------------------------------------


def test_each_recipient_gets_its_own_result(plain_sink: MessageSink) -> None:
    recipients = ["ok1@client.test", "reject@client.test", "tempfail@client.test", "ok2@c.test"]

    async def scenario() -> list[RecipientResult]:
        async with relay_for(plain_sink.port) as relay:
            return await relay.send("rep@corp.test", recipients, MESSAGE)

    results = run(scenario())
    assert [r.recipient for r in results] == recipients
    assert [r.code for r in results] == [250, 550, 451, 250]
    assert [r.delivered for r in results] == [True, False, False, True]
    assert [r.permanent for r in results] == [False, True, False, False]
    assert results[1].enhanced == "5.1.1"
    assert results[1].text == "Mailbox unavailable (test sink: reject)"
    assert results[1].remote_mta == "127.0.0.1"
    assert results[2].enhanced == "4.3.0"
    (received,) = arrived(plain_sink, "ok1@client.test")
    assert received.rcpt_tos == ("ok1@client.test", "ok2@c.test")


def test_data_refused_after_recipients_accepted_applies_to_them(plain_sink: MessageSink) -> None:
    plain_sink.data_reply = "554 5.7.1 Message refused by content filter"

    async def scenario() -> list[RecipientResult]:
        async with relay_for(plain_sink.port) as relay:
            return await relay.send("rep@corp.test", ["a@c.test", "reject@c.test"], MESSAGE)

    results = run(scenario())
    assert [(r.code, r.enhanced) for r in results] == [(554, "5.7.1"), (550, "5.1.1")]
    assert results[0].text == "Message refused by content filter"
    assert plain_sink.messages == []


def test_all_recipients_refused_sends_no_data(plain_sink: MessageSink) -> None:
    async def scenario() -> tuple[list[RecipientResult], bytes]:
        async with WireTap(plain_sink.port) as tap, relay_for(tap.port) as relay:
            results = await relay.send("rep@corp.test", ["reject@c.test"], MESSAGE)
            # The connection stays usable for the next message.
            again = await relay.send("rep@corp.test", ["fine@c.test"], MESSAGE)
            assert again[0].delivered
            assert tap.connections == 1
            return results, bytes(tap.sent[0])

    results, wire = run(scenario())
    assert results[0].permanent
    assert wire.count(b"Subject: Offer") == 1  # only the second message's data went out
    # The unfinished transaction is reset before the next one on the same connection.
    assert b"RCPT TO:<reject@c.test>\r\nRSET\r\nMAIL FROM:<rep@corp.test>" in wire
    assert len(arrived(plain_sink, "fine@c.test")) == 1


# -- connection reuse -------------------------------------------------------------------------


def test_many_messages_share_one_connection(plain_sink: MessageSink) -> None:
    async def scenario() -> int:
        async with WireTap(plain_sink.port) as tap, relay_for(tap.port) as relay:
            for n in range(20):
                results = await relay.send("rep@corp.test", [f"reuse{n}@c.test"], MESSAGE)
                assert results[0].delivered
            return tap.connections

    assert run(scenario()) == 1
    received = plain_sink.wait_for(20, 10, where=lambda m: m.rcpt_tos[0].startswith("reuse"))
    assert len({m.peer for m in received}) == 1  # the sink saw one client port too


def test_concurrent_sends_are_bounded_by_max_connections(plain_sink: MessageSink) -> None:
    async def scenario() -> int:
        async with (
            WireTap(plain_sink.port) as tap,
            relay_for(tap.port, max_connections=3) as relay,
        ):
            sends = [relay.send("rep@corp.test", [f"conc{n}@c.test"], MESSAGE) for n in range(30)]
            results = await asyncio.gather(*sends)
            assert all(r[0].delivered for r in results)
            return tap.connections

    connections = run(scenario())
    assert 1 <= connections <= 3
    assert len(plain_sink.wait_for(30, 10, where=lambda m: m.rcpt_tos[0].startswith("conc"))) == 30


@pytest.mark.parametrize("farewell", [b"", b"421 4.4.2 sink: idle for too long\r\n"])
def test_pool_reconnects_when_the_server_closed_an_idle_connection(
    plain_sink: MessageSink, farewell: bytes
) -> None:
    async def scenario() -> tuple[list[RecipientResult], int]:
        async with WireTap(plain_sink.port) as tap, relay_for(tap.port) as relay:
            assert (await relay.send("rep@corp.test", ["idle1@c.test"], MESSAGE))[0].delivered
            await tap.hang_up_all(farewell)
            results = await relay.send("rep@corp.test", ["idle2@c.test"], MESSAGE)
            return results, tap.connections

    results, connections = run(scenario())
    assert results[0].delivered, results
    assert connections == 2
    assert len(arrived(plain_sink, "idle2@c.test")) == 1


def test_pool_reconnects_when_the_server_hangs_up_on_the_next_command(
    plain_sink: MessageSink,
) -> None:
    # The race an idle check cannot see: the connection looks open, and the server drops it
    # the moment the reused connection speaks. Nothing was sent, so it must be retried at once.
    async def scenario() -> tuple[list[RecipientResult], int]:
        async with WireTap(plain_sink.port) as tap, relay_for(tap.port) as relay:
            assert (await relay.send("rep@corp.test", ["race1@c.test"], MESSAGE))[0].delivered
            tap.hang_up_on_next_command = True
            results = await relay.send("rep@corp.test", ["race2@c.test"], MESSAGE)
            return results, tap.connections

    results, connections = run(scenario())
    assert results[0].delivered, results
    assert connections == 2
    assert len(arrived(plain_sink, "race2@c.test")) == 1


def test_a_connection_idle_too_long_is_closed_with_quit(
    plain_sink: MessageSink, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One expiry timer per connection: armed at the first return to the pool, it must not close
    # the connection used again since, and must close it once it has been idle long enough.
    monkeypatch.setattr(gateway.relay, "IDLE_SECONDS", 1.5)

    async def scenario() -> tuple[float, bytes]:
        async with WireTap(plain_sink.port) as tap, relay_for(tap.port) as relay:
            assert (await relay.send("rep@corp.test", ["idle-a@c.test"], MESSAGE))[0].delivered
            await asyncio.sleep(0.9)
            assert (await relay.send("rep@corp.test", ["idle-b@c.test"], MESSAGE))[0].delivered
            last_used = time.monotonic()
            await asyncio.sleep(1.0)  # past the first timer, short of the second idle spell
            assert tap.open_connections == 1 and tap.connections == 1
            await poll(lambda: tap.open_connections == 0, "idle connection closed", 10)
            return time.monotonic() - last_used, bytes(tap.sent[0])

    idle, wire = run(scenario())
    assert idle > 1.4  # not before IDLE_SECONDS after its last use (less a little clock slack)
    assert wire.endswith(b"QUIT\r\n")


def test_aclose_says_quit_and_send_afterwards_is_a_bug(plain_sink: MessageSink) -> None:
    async def scenario() -> bytes:
        async with WireTap(plain_sink.port) as tap:
            relay = Relay(settings(port=tap.port), hostname="gw.mailgate.test")
            assert (await relay.send("rep@corp.test", ["q@c.test"], MESSAGE))[0].delivered
            await relay.aclose()
            await poll(lambda: tap.open_connections == 0, "connection closed after QUIT")
            with pytest.raises(RuntimeError):
                await relay.send("rep@corp.test", ["q@c.test"], MESSAGE)
            return bytes(tap.sent[0])

    assert run(scenario()).endswith(b"QUIT\r\n")


# -- failures become results --------------------------------------------------------------------


def test_connection_refused_is_a_temporary_result() -> None:
    async def scenario() -> list[RecipientResult]:
        async with relay_for(free_port()) as relay:
            return await relay.send("rep@corp.test", ["a@c.test", "b@c.test"], MESSAGE)

    results = run(scenario())
    assert [r.code for r in results] == [0, 0]
    assert not any(r.permanent or r.delivered for r in results)
    assert "connection refused" in results[0].text
    assert results[0].enhanced == "4.4.1"


def test_a_server_that_never_answers_times_out() -> None:
    async def scenario() -> tuple[list[RecipientResult], float]:
        silent = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = silent.sockets[0].getsockname()[1]
        started = time.monotonic()
        try:
            async with relay_for(port, command_timeout_seconds=0.5) as relay:
                results = await relay.send("rep@corp.test", ["a@c.test"], MESSAGE)
        finally:
            silent.close()
        return results, time.monotonic() - started

    results, elapsed = run(scenario())
    assert results[0].code == 0 and not results[0].permanent
    assert "timed out" in results[0].text
    assert elapsed < 3


class SlowSmtp(LoopbackServer):
    """A minimal SMTP server offering PIPELINING whose every reply line comes ``delay`` seconds
    after the one before; it can stay silent, and greet with a reply of many lines."""

    def __init__(self, delay: float, *, greeting_lines: int = 1) -> None:
        self.delay = delay
        self.greeting_lines = greeting_lines
        self.silent = False
        self.messages = 0

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async def say(*lines: str) -> None:
            for line in lines:
                await asyncio.sleep(self.delay)
                if not self.silent:
                    writer.write(line.encode() + b"\r\n")

        await say(*["220-slow.test"] * (self.greeting_lines - 1), "220 slow.test ESMTP")
        while line := await reader.readline():
            verb = line[:4].upper()
            if verb == b"EHLO":
                await say("250-slow.test", "250 PIPELINING")
            elif verb == b"DATA":
                await say("354 go on")
                while await reader.readline() not in (b".\r\n", b""):
                    pass
                self.messages += 1
                await say("250 2.0.0 queued")
            elif verb == b"QUIT":
                await say("221 2.0.0 bye")
                break
            else:
                await say("250 2.0.0 ok")
        writer.close()


def test_each_reply_has_its_own_deadline_on_a_long_lived_connection() -> None:
    # Replies 0.15 s apart, a 0.5 s limit: the four replies to a message's pipelined commands
    # take longer than that, three messages on one connection far longer, yet no single reply
    # is late. Then the server falls silent, and the next message must still time out.
    async def scenario() -> tuple[list[list[RecipientResult]], list[RecipientResult], float]:
        async with (
            SlowSmtp(0.15) as server,
            relay_for(server.port, command_timeout_seconds=0.5) as relay,
        ):
            sent = [await relay.send("rep@corp.test", [f"s{n}@c.test"], MESSAGE) for n in range(3)]
            assert server.messages == 3
            server.silent = True
            started = time.monotonic()
            silent = await relay.send("rep@corp.test", ["quiet@c.test"], MESSAGE)
            return sent, silent, time.monotonic() - started

    sent, silent, elapsed = run(scenario())
    assert [r[0].code for r in sent] == [250, 250, 250]
    assert silent[0].code == 0 and "timed out" in silent[0].text
    assert 0.5 <= elapsed < 3


def test_a_reply_dripping_line_by_line_is_bounded_as_a_whole() -> None:
    # Ten greeting lines 0.2 s apart: each arrives in time, the reply as a whole does not.
    async def scenario() -> tuple[list[RecipientResult], float]:
        async with SlowSmtp(0.2, greeting_lines=10) as server:
            started = time.monotonic()
            async with relay_for(server.port, command_timeout_seconds=0.5) as relay:
                results = await relay.send("rep@corp.test", ["a@c.test"], MESSAGE)
            return results, time.monotonic() - started

    results, elapsed = run(scenario())
    assert results[0].code == 0 and "timed out" in results[0].text
    assert elapsed < 1.5


def test_a_reply_stalling_after_a_line_that_came_at_its_deadline_still_times_out() -> None:
    # The greeting's first line arrives in time but is read only after the deadline, because
    # the event loop was busy; the reply then stalls. Its next wait must be bounded all the same.
    # The server is a thread, so that it is not blocked along with the loop.
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)
    stop = threading.Event()

    def serve() -> None:
        connection, _ = listener.accept()
        with connection:
            time.sleep(0.2)
            connection.sendall(b"220-slow.test first line of two\r\n")
            stop.wait(10)

    server = threading.Thread(target=serve, daemon=True)
    server.start()

    async def scenario() -> list[RecipientResult]:
        loop = asyncio.get_running_loop()
        loop.call_later(0.1, time.sleep, 0.8)  # busy past the 0.5 s deadline
        async with asyncio.timeout(5):
            async with relay_for(listener.getsockname()[1], command_timeout_seconds=0.5) as relay:
                return await relay.send("rep@corp.test", ["a@c.test"], MESSAGE)

    try:
        results = run(scenario())
    finally:
        stop.set()
        server.join()
        listener.close()
    assert results[0].code == 0 and "timed out" in results[0].text


def test_control_characters_in_an_address_are_a_programming_error(
    plain_sink: MessageSink,
) -> None:
    async def scenario() -> None:
        async with relay_for(plain_sink.port) as relay:
            with pytest.raises(ValueError, match="control character"):
                await relay.send("rep@corp.test", ["a@c.test\r\nRCPT TO:<evil@x>"], MESSAGE)
            with pytest.raises(ValueError, match="sender"):
                await relay.send("rep@corp.test>\r\nDATA", ["a@c.test"], MESSAGE)

    run(scenario())
    assert plain_sink.messages == []


# -- 8BITMIME and SMTPUTF8 ------------------------------------------------------------------------


def test_eight_bit_message_is_declared_with_body_8bitmime(plain_sink: MessageSink) -> None:
    message = "Subject: Grüße\r\n\r\nSchöne Grüße.\r\n".encode()

    async def scenario() -> list[RecipientResult]:
        async with relay_for(plain_sink.port) as relay:
            seven = await relay.send("rep@corp.test", ["seven@c.test"], MESSAGE)
            eight = await relay.send("rep@corp.test", ["eight@c.test"], message)
            return seven + eight

    assert all(r.delivered for r in run(scenario()))
    assert "BODY=8BITMIME" in arrived(plain_sink, "eight@c.test")[0].mail_options
    assert "BODY=8BITMIME" not in arrived(plain_sink, "seven@c.test")[0].mail_options
    assert arrived(plain_sink, "eight@c.test")[0].data == message


def test_non_ascii_recipient_without_smtputf8_fails_alone() -> None:
    seen: list[tuple[str, ...]] = []

    class Handler:
        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
            seen.append(tuple(envelope.rcpt_tos))
            return "250 2.0.0 OK"

    controller = Controller(
        Handler(), hostname="127.0.0.1", port=free_port(), enable_SMTPUTF8=False
    )
    controller.start()
    try:
        port = controller.port

        async def scenario() -> list[RecipientResult]:
            async with relay_for(port) as relay:
                return await relay.send("rep@corp.test", ["jörg@c.test", "joerg@c.test"], MESSAGE)

        results = run(scenario())
    finally:
        controller.stop()
    assert (results[0].code, results[0].enhanced) == (553, "5.6.7")
    assert results[0].permanent and "SMTPUTF8" in results[0].text
    assert results[1].delivered
    assert seen == [("joerg@c.test",)]


def test_non_ascii_recipient_goes_with_smtputf8_when_offered(plain_sink: MessageSink) -> None:
    # The sink's aiosmtpd offers SMTPUTF8 (RFC 6531).
    async def scenario() -> list[RecipientResult]:
        async with relay_for(plain_sink.port) as relay:
            return await relay.send("rep@corp.test", ["jörg@c.test"], MESSAGE)

    assert run(scenario())[0].delivered
    received = arrived(plain_sink, "jörg@c.test")[0]
    assert "SMTPUTF8" in received.mail_options


# -- TLS and AUTH against aiosmtpd -------------------------------------------------------------


@pytest.fixture(scope="module")
def test_ca() -> Iterator[TestCA]:
    authority = TestCA()
    yield authority
    authority.cleanup()


def test_require_tls_refuses_a_smarthost_without_starttls(plain_sink: MessageSink) -> None:
    async def scenario() -> list[RecipientResult]:
        async with relay_for(plain_sink.port, security="starttls", require_tls=True) as relay:
            return await relay.send("rep@corp.test", ["a@c.test"], MESSAGE)

    results = run(scenario())
    assert results[0].code == 0 and not results[0].permanent
    assert "does not offer STARTTLS" in results[0].text
    assert plain_sink.messages == []


def test_starttls_to_aiosmtpd_with_verified_certificate(test_ca: TestCA) -> None:
    with MessageSink(tls_context=test_ca.server_context(), require_tls=True) as sink:

        async def scenario() -> list[RecipientResult]:
            async with relay_for(sink.port, security="starttls", ca_file=test_ca.ca_file) as relay:
                return await relay.send("rep@corp.test", ["tls@c.test"], MESSAGE)

        assert run(scenario())[0].delivered
        assert arrived(sink, "tls@c.test")[0].tls


def test_untrusted_smarthost_certificate_is_a_temporary_failure(
    test_ca: TestCA,
) -> None:
    # Verification is on by default: without the test CA, the smarthost's certificate fails.
    with MessageSink(tls_context=test_ca.server_context()) as sink:

        async def scenario() -> list[RecipientResult]:
            async with relay_for(sink.port, security="starttls") as relay:
                return await relay.send("rep@corp.test", ["a@c.test"], MESSAGE)

        results = run(scenario())
        assert results[0].code == 0 and not results[0].permanent
        assert "certificate verification failed" in results[0].text
        assert "relay.ca_file" in results[0].text
        assert sink.messages == []


def test_a_mailbox_submission_server_failure_names_the_mailbox_settings(
    test_ca: TestCA,
) -> None:
    # The same failure on a mailbox's own server (gateway.outgoing) points at its settings.
    from gateway.outgoing import ACCOUNT_ADVICE

    with MessageSink(tls_context=test_ca.server_context()) as sink:

        async def scenario() -> list[RecipientResult]:
            relay = Relay(
                settings(port=sink.port, security="starttls"),
                hostname="gw.mailgate.test",
                advice=ACCOUNT_ADVICE,
            )
            try:
                return await relay.send("rep@corp.test", ["a@c.test"], MESSAGE)
            finally:
                await relay.aclose()

        results = run(scenario())
        assert "imap.ca_file" in results[0].text and "relay." not in results[0].text
        assert sink.messages == []


class _Users:
    """An aiosmtpd authenticator with one user."""

    def __init__(self, username: str, password: str) -> None:
        self.secrets = (username.encode(), password.encode())
        self.attempts: list[str] = []

    def __call__(
        self, server: Any, session: Any, envelope: Any, mechanism: str, data: Any
    ) -> AuthResult:
        self.attempts.append(mechanism)
        ok = isinstance(data, LoginPassword) and (data.login, data.password) == self.secrets
        return AuthResult(success=ok, handled=False, auth_data=data.login.decode() if ok else None)


@contextlib.contextmanager
def auth_server(
    ca: TestCA, users: _Users, *, tls: bool = True, exclude: list[str] | None = None
) -> Iterator[tuple[int, list[tuple[str, str]]]]:
    got: list[tuple[str, str]] = []

    class Handler:
        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
            if not session.authenticated:
                return "530 5.7.0 Authentication required"
            got.append((session.auth_data, envelope.rcpt_tos[0]))
            return "250 2.0.0 OK"

    kwargs: dict[str, Any] = {
        "auth_require_tls": tls,
        "authenticator": users,
        "auth_exclude_mechanism": exclude or [],
    }
    if tls:
        kwargs["tls_context"] = ca.server_context()
    else:
        kwargs["auth_require_tls"] = False
    controller = Controller(Handler(), hostname="127.0.0.1", port=free_port(), **kwargs)
    controller.start()
    try:
        yield controller.port, got
    finally:
        controller.stop()


def test_auth_over_starttls(test_ca: TestCA) -> None:
    users = _Users("relay-user", "s3cret pass")
    with auth_server(test_ca, users) as (port, got):

        async def scenario() -> list[RecipientResult]:
            async with relay_for(
                port,
                security="starttls",
                ca_file=test_ca.ca_file,
                username="relay-user",
                password="s3cret pass",
            ) as relay:
                first = await relay.send("rep@corp.test", ["auth1@c.test"], MESSAGE)
                second = await relay.send("rep@corp.test", ["auth2@c.test"], MESSAGE)
                return first + second

        results = run(scenario())
    assert [r.delivered for r in results] == [True, True], results
    assert got == [("relay-user", "auth1@c.test"), ("relay-user", "auth2@c.test")]
    assert users.attempts == ["PLAIN"]  # one login: the pooled connection stays authenticated


def test_wrong_password_is_temporary_and_never_echoed(test_ca: TestCA) -> None:
    users = _Users("relay-user", "right")
    with auth_server(test_ca, users) as (port, got):

        async def scenario() -> list[RecipientResult]:
            async with relay_for(
                port,
                security="starttls",
                ca_file=test_ca.ca_file,
                username="relay-user",
                password="wrong-password",
            ) as relay:
                return await relay.send("rep@corp.test", ["a@c.test"], MESSAGE)

        results = run(scenario())
    assert results[0].code == 0 and not results[0].permanent  # a config problem: retry, no bounce
    assert "refused AUTH" in results[0].text
    assert "wrong-password" not in results[0].text
    assert got == []


def test_password_is_not_sent_without_tls_unless_security_is_none(
    plain_sink: MessageSink, test_ca: TestCA
) -> None:
    async def refused() -> list[RecipientResult]:
        async with WireTap(plain_sink.port) as tap:
            async with relay_for(
                tap.port, security="starttls", require_tls=False, username="u", password="pw"
            ) as relay:
                results = await relay.send("rep@corp.test", ["a@c.test"], MESSAGE)
            assert b"AUTH" not in bytes(tap.sent[0])
            return results

    results = run(refused())
    assert results[0].code == 0 and "without TLS" in results[0].text

    users = _Users("u", "pw")
    with auth_server(test_ca, users, tls=False) as (port, got):

        async def allowed() -> list[RecipientResult]:
            async with relay_for(port, security="none", username="u", password="pw") as relay:
                return await relay.send("rep@corp.test", ["plain@c.test"], MESSAGE)

        assert run(allowed())[0].delivered
    assert got == [("u", "plain@c.test")]


def test_auth_login_when_plain_is_not_offered(test_ca: TestCA) -> None:
    users = _Users("login-user", "pw")
    with auth_server(test_ca, users, exclude=["PLAIN"]) as (port, got):

        async def scenario() -> list[RecipientResult]:
            async with relay_for(
                port,
                security="starttls",
                ca_file=test_ca.ca_file,
                username="login-user",
                password="pw",
            ) as relay:
                return await relay.send("rep@corp.test", ["login@c.test"], MESSAGE)

        assert run(scenario())[0].delivered
    assert users.attempts == ["LOGIN"]
    assert got == [("login-user", "login@c.test")]


def test_a_server_silent_in_mid_session_times_out(test_ca: TestCA) -> None:
    # An authenticator that claims to have answered but did not: AUTH never gets a reply.
    def mute(*args: Any) -> AuthResult:
        return AuthResult(success=False, handled=True)

    with auth_server(test_ca, mute) as (port, got):  # type: ignore[arg-type]

        async def scenario() -> list[RecipientResult]:
            async with relay_for(
                port,
                security="starttls",
                ca_file=test_ca.ca_file,
                username="u",
                password="pw",
                command_timeout_seconds=0.5,
            ) as relay:
                return await relay.send("rep@corp.test", ["a@c.test"], MESSAGE)

        started = time.monotonic()
        results = run(scenario())
    assert time.monotonic() - started < 5
    assert results[0].code == 0 and not results[0].permanent
    assert "timed out" in results[0].text
    assert got == []


# -- Postfix as the smarthost --------------------------------------------------------------------


@pytest.fixture(scope="module")
def postfix_sink() -> Iterator[MessageSink]:
    with MessageSink() as sink:
        yield sink


@pytest.fixture(scope="module")
def tls_postfix(postfix_sink: MessageSink, test_ca: TestCA) -> Iterator[PostfixRelay]:
    with PostfixRelay(postfix_sink, tls=test_ca.server) as postfix:
        yield postfix


def test_delivery_through_postfix_over_verified_starttls(
    tls_postfix: PostfixRelay, postfix_sink: MessageSink, test_ca: TestCA
) -> None:
    message = b"Subject: via postfix\r\n\r\n.dot line\r\nend\r\n"

    async def scenario() -> list[RecipientResult]:
        async with relay_for(
            tls_postfix.port, security="starttls", ca_file=test_ca.ca_file
        ) as relay:
            return await relay.send("rep@corp.test", ["pf1@client.test", "pf2@c.test"], message)

    results = run(scenario())
    assert [r.code for r in results] == [250, 250]
    assert "queued as" in results[0].text
    received = arrived(postfix_sink, "pf1@client.test")[0]
    assert set(received.rcpt_tos) == {"pf1@client.test", "pf2@c.test"}
    parsed = received.message()
    assert "using TLS" in parsed["Received"]  # Postfix's smtpd_tls_received_header
    assert parsed["Subject"] == "via postfix"
    assert received.data.endswith(b"\r\n\r\n.dot line\r\nend\r\n")  # unstuffed once, intact


def test_implicit_tls_to_postfix(
    tls_postfix: PostfixRelay, postfix_sink: MessageSink, test_ca: TestCA
) -> None:
    assert tls_postfix.tls_port is not None

    async def scenario() -> list[RecipientResult]:
        # The certificate names "localhost" and 127.0.0.1; connect by name to check the name.
        async with relay_for(
            tls_postfix.tls_port, host="localhost", security="tls", ca_file=test_ca.ca_file
        ) as relay:
            return await relay.send("rep@corp.test", ["implicit@client.test"], MESSAGE)

    assert run(scenario())[0].delivered
    assert "using TLS" in arrived(postfix_sink, "implicit@client.test")[0].message()["Received"]


@pytest.mark.parametrize("security", ["starttls", "tls"])
def test_postfix_certificate_from_an_untrusted_ca_fails_temporarily(
    tls_postfix: PostfixRelay, security: str
) -> None:
    port = tls_postfix.port if security == "starttls" else tls_postfix.tls_port
    assert port is not None

    async def scenario() -> list[RecipientResult]:
        async with relay_for(port, security=security) as relay:
            return await relay.send("rep@corp.test", ["untrusted@client.test"], MESSAGE)

    result = run(scenario())[0]
    assert (result.code, result.permanent, result.enhanced) == (0, False, "4.7.5")
    assert "certificate verification failed" in result.text


def test_certificate_for_another_name_fails_verification(test_ca: TestCA) -> None:
    # A certificate from the trusted CA, but for another name than the one we connect to.
    other = test_ca.issue("other.mailgate.test")
    with MessageSink(tls_context=test_ca.server_context(other)) as sink:

        async def scenario() -> list[RecipientResult]:
            async with relay_for(sink.port, security="starttls", ca_file=test_ca.ca_file) as relay:
                return await relay.send("rep@corp.test", ["name@client.test"], MESSAGE)

        result = run(scenario())[0]
        assert sink.messages == []
    assert result.code == 0 and "certificate verification failed" in result.text
    assert "127.0.0.1" in result.text


def test_postfix_refuses_one_recipient_and_takes_the_other(
    tls_postfix: PostfixRelay, postfix_sink: MessageSink, test_ca: TestCA
) -> None:
    async def scenario() -> list[RecipientResult]:
        async with relay_for(
            tls_postfix.port, security="starttls", ca_file=test_ca.ca_file
        ) as relay:
            return await relay.send(
                "rep@corp.test", ["bad@client..test", "good@client.test"], MESSAGE
            )

    bad, good = run(scenario())
    assert (bad.code, bad.enhanced, bad.permanent) == (501, "5.1.3", True)
    assert good.delivered
    assert arrived(postfix_sink, "good@client.test")[0].rcpt_tos == ("good@client.test",)


def test_postfix_sees_one_session_for_many_messages_with_rset_between(
    tls_postfix: PostfixRelay, postfix_sink: MessageSink, test_ca: TestCA
) -> None:
    async def scenario() -> None:
        async with relay_for(
            tls_postfix.port, security="starttls", ca_file=test_ca.ca_file, helo_name="reuse.test"
        ) as relay:
            for n in range(10):
                results = await relay.send("rep@corp.test", [f"pfreuse{n}@c.test"], MESSAGE)
                assert results[0].delivered

    run(scenario())
    # smtpd logs one line per session with its command counts (PIPELINING carries the RSETs).
    log = tls_postfix.wait_logged("mail=10 rcpt=10 data=10 rset=9 quit=1")
    assert "ehlo=2 starttls=1 mail=10 rcpt=10 data=10 rset=9 quit=1 commands=43" in log
    assert len(postfix_sink.wait_for(10, 20, where=lambda m: "pfreuse" in m.rcpt_tos[0])) == 10


def test_message_over_the_servers_size_limit_is_refused_before_data() -> None:
    class Handler:
        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
            return "250 2.0.0 OK"

    controller = Controller(Handler(), hostname="127.0.0.1", port=free_port(), data_size_limit=1024)
    controller.start()
    try:

        async def scenario() -> tuple[list[RecipientResult], bytes]:
            async with WireTap(controller.port) as tap, relay_for(tap.port) as relay:
                big = b"Subject: big\r\n\r\n" + b"x" * 2000 + b"\r\n"
                results = await relay.send("rep@corp.test", ["size@c.test"], big)
                return results, bytes(tap.sent[0])

        results, wire = run(scenario())
    finally:
        controller.stop()
    assert (results[0].code, results[0].enhanced, results[0].permanent) == (552, "5.3.4", True)
    assert "limit of 1024" in results[0].text
    assert b"MAIL FROM" not in wire  # RFC 1870: decided from EHLO's SIZE, nothing sent


# -- Postfix requiring SMTP AUTH (checked by Dovecot's auth socket) ------------------------------


@pytest.fixture(scope="module")
def dovecot_auth() -> Iterator[DovecotServer]:
    with DovecotServer() as dovecot:
        yield dovecot


@pytest.fixture(scope="module")
def auth_postfix(
    postfix_sink: MessageSink, test_ca: TestCA, dovecot_auth: DovecotServer
) -> Iterator[PostfixRelay]:
    with PostfixRelay(
        postfix_sink, tls=test_ca.server, require_auth=True, sasl_socket=dovecot_auth.auth_socket
    ) as postfix:
        yield postfix


def test_auth_to_postfix_smarthost(
    auth_postfix: PostfixRelay,
    postfix_sink: MessageSink,
    test_ca: TestCA,
    dovecot_auth: DovecotServer,
) -> None:
    user, password = dovecot_auth.new_user("relay")

    async def scenario() -> list[RecipientResult]:
        async with relay_for(
            auth_postfix.port,
            security="starttls",
            ca_file=test_ca.ca_file,
            username=user,
            password=password,
        ) as relay:
            return await relay.send("rep@corp.test", ["pfauth@client.test"], MESSAGE)

    assert run(scenario())[0].delivered
    received = arrived(postfix_sink, "pfauth@client.test")[0]
    assert f"Authenticated sender: {user}" in received.message()["Received"]
    assert f"sasl_method=PLAIN, sasl_username={user}" in auth_postfix.log_text()


def test_postfix_smarthost_without_auth_or_with_a_wrong_password(
    auth_postfix: PostfixRelay, test_ca: TestCA, dovecot_auth: DovecotServer
) -> None:
    user, _ = dovecot_auth.new_user("relay")

    async def scenario(**credentials: str) -> RecipientResult:
        async with relay_for(
            auth_postfix.port, security="starttls", ca_file=test_ca.ca_file, **credentials
        ) as relay:
            return (await relay.send("rep@corp.test", ["noauth@client.test"], MESSAGE))[0]

    # Not configured for AUTH: Postfix refuses to relay, a permanent per-recipient answer.
    anonymous = run(scenario())
    assert (anonymous.code, anonymous.enhanced) == (554, "5.7.1")
    assert "Access denied" in anonymous.text
    # A wrong password is a configuration problem: temporary, so nothing bounces meanwhile.
    wrong = run(scenario(username=user, password="not-the-password"))
    assert wrong.code == 0 and not wrong.permanent
    assert "refused AUTH" in wrong.text and "535" in wrong.text
    assert "not-the-password" not in wrong.text


# -- direct delivery to MX hosts, found through NSD --------------------------------------------

_zones = itertools.count()


@pytest.fixture(scope="module")
def nsd() -> Iterator[AuthoritativeDns]:
    with AuthoritativeDns() as server:
        yield server


@pytest.fixture
def zone(nsd: AuthoritativeDns) -> str:
    """A fresh zone name per test, so that records from other tests never interfere."""
    return f"mx{os.getpid()}-{next(_zones)}.test"


def async_resolver(nsd: AuthoritativeDns, port: int | None = None) -> dns.asyncresolver.Resolver:
    resolver = dns.asyncresolver.Resolver(configure=False)
    resolver.nameservers = [nsd.host]
    resolver.port = nsd.port if port is None else port
    resolver.lifetime = resolver.timeout = 2.0
    return resolver


def mx_send(
    nsd: AuthoritativeDns,
    port: int,
    recipients: list[str],
    *,
    message: bytes = MESSAGE,
    resolver_port: int | None = None,
) -> list[RecipientResult]:
    # In mx mode, relay.port is the port every MX host is contacted on: 25 in production,
    # the sink's port here.
    async def scenario() -> list[RecipientResult]:
        relay = Relay(
            settings(mode="mx", port=port),
            hostname="gw.mailgate.test",
            resolver=async_resolver(nsd, resolver_port),
        )
        try:
            return await relay.send("rep@corp.test", recipients, message)
        finally:
            await relay.aclose()

    result: list[RecipientResult] = run(scenario())
    return result


def test_mx_delivery_to_the_published_host(
    nsd: AuthoritativeDns, zone: str, plain_sink: MessageSink
) -> None:
    nsd.publish(zone, ["@ IN MX 10 mail", "mail IN A 127.0.0.1"])
    (result,) = mx_send(nsd, plain_sink.port, [f"buyer@{zone}"])
    assert result.delivered, result
    assert result.remote_mta == f"mail.{zone}"
    assert arrived(plain_sink, f"buyer@{zone}")[0].mail_from == "rep@corp.test"


def test_mx_hosts_are_tried_in_order_of_preference(
    nsd: AuthoritativeDns, zone: str, plain_sink: MessageSink
) -> None:
    # The preferred MX (127.0.0.2, same port) is busy and says so; the backup takes the mail.
    busy_connections: list[str] = []

    async def busy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        busy_connections.append("connected")
        writer.write(b"421 4.3.2 busy, try the backup\r\n")
        await writer.drain()
        writer.close()

    nsd.publish(
        zone,
        [
            "@ IN MX 50 backup",
            "@ IN MX 10 primary",
            "primary IN A 127.0.0.2",
            "backup IN A 127.0.0.1",
        ],
    )

    async def scenario() -> list[RecipientResult]:
        server = await asyncio.start_server(busy, "127.0.0.2", plain_sink.port)
        try:
            relay = Relay(
                settings(mode="mx", port=plain_sink.port),
                hostname="gw.mailgate.test",
                resolver=async_resolver(nsd),
            )
            try:
                return await relay.send("rep@corp.test", [f"pref@{zone}"], MESSAGE)
            finally:
                await relay.aclose()
        finally:
            server.close()

    (result,) = run(scenario())
    assert result.delivered and result.remote_mta == f"backup.{zone}", result
    assert busy_connections == ["connected"]
    assert len(arrived(plain_sink, f"pref@{zone}")) == 1


def test_unreachable_mx_hosts_give_a_temporary_failure(
    nsd: AuthoritativeDns, zone: str, plain_sink: MessageSink
) -> None:
    nsd.publish(zone, ["@ IN MX 10 gone", "gone IN A 127.0.0.2"])
    (result,) = mx_send(nsd, plain_sink.port, [f"x@{zone}"])
    assert result.code == 0 and not result.permanent
    assert f"gone.{zone}[127.0.0.2]" in result.text and "connection refused" in result.text


def test_domain_without_mx_uses_its_address_as_implicit_mx(
    nsd: AuthoritativeDns, zone: str, plain_sink: MessageSink
) -> None:
    nsd.publish(zone, ["@ IN A 127.0.0.1"])  # RFC 5321 §5.1
    (result,) = mx_send(nsd, plain_sink.port, [f"implicit@{zone}"])
    assert result.delivered and result.remote_mta == zone, result
    assert len(arrived(plain_sink, f"implicit@{zone}")) == 1


def test_null_mx_is_a_permanent_556(
    nsd: AuthoritativeDns, zone: str, plain_sink: MessageSink
) -> None:
    nsd.publish(zone, ["@ IN MX 0 .", "@ IN A 127.0.0.1"])  # RFC 7505: no mail, whatever A says
    (result,) = mx_send(nsd, plain_sink.port, [f"nobody@{zone}"])
    assert (result.code, result.enhanced, result.permanent) == (556, "5.1.10", True)
    assert "null MX" in result.text
    assert not [m for m in plain_sink.messages if f"nobody@{zone}" in m.rcpt_tos]


def test_nxdomain_and_no_mail_records_are_permanent(
    nsd: AuthoritativeDns, zone: str, plain_sink: MessageSink
) -> None:
    nsd.publish(zone, ['nomail IN TXT "no MX, no A"'])
    missing, nomail = mx_send(nsd, plain_sink.port, [f"a@nothere.{zone}", f"b@nomail.{zone}"])
    assert (missing.code, missing.enhanced, missing.permanent) == (550, "5.1.2", True)
    assert "NXDOMAIN" in missing.text
    assert (nomail.code, nomail.permanent) == (550, True)
    assert "no MX and no address record" in nomail.text


def test_dns_failures_are_temporary(nsd: AuthoritativeDns, plain_sink: MessageSink) -> None:
    # NSD refuses a zone it does not serve (the resolver sees no usable answer: SERVFAIL-like);
    # a name server that does not answer at all times out.
    (refused,) = mx_send(nsd, plain_sink.port, ["a@not-served.invalid"])
    assert (refused.code, refused.enhanced, refused.permanent) == (451, "4.4.3", False)
    started = time.monotonic()
    (silent,) = mx_send(nsd, plain_sink.port, ["a@example.test"], resolver_port=free_port())
    assert (silent.code, silent.enhanced, silent.permanent) == (451, "4.4.3", False)
    assert time.monotonic() - started < 10


def test_recipients_are_grouped_by_route_and_answered_in_order(
    nsd: AuthoritativeDns, zone: str, plain_sink: MessageSink
) -> None:
    nsd.publish(
        zone,
        [
            "one IN MX 10 mail",
            "two IN MX 10 mail",  # the same MX host set: one route, one transaction
            "three IN MX 0 .",
            "mail IN A 127.0.0.1",
        ],
    )
    recipients = [f"a@one.{zone}", f"b@three.{zone}", f"c@two.{zone}", f"reject@one.{zone}"]
    results = mx_send(nsd, plain_sink.port, recipients)
    assert [r.recipient for r in results] == recipients
    assert [r.code for r in results] == [250, 556, 250, 550]
    (received,) = arrived(plain_sink, f"a@one.{zone}")
    assert received.rcpt_tos == (f"a@one.{zone}", f"c@two.{zone}")


def test_opportunistic_starttls_to_mx_encrypts_without_verifying(
    nsd: AuthoritativeDns, zone: str, test_ca: TestCA
) -> None:
    # The MX's certificate is for another name from a CA we do not trust: still encrypted.
    other = test_ca.issue("not-the-mx.test")
    with MessageSink(tls_context=test_ca.server_context(other), require_tls=True) as sink:
        nsd.publish(zone, ["@ IN MX 10 mail", "mail IN A 127.0.0.1"])
        (result,) = mx_send(nsd, sink.port, [f"tls@{zone}"])
        assert result.delivered, result
        assert arrived(sink, f"tls@{zone}")[0].tls


def test_opportunistic_tls_falls_back_to_plaintext_when_the_handshake_fails(
    nsd: AuthoritativeDns, zone: str, test_ca: TestCA
) -> None:
    # Something between us and the MX breaks the handshake; RFC 7435 §3 says deliver anyway.
    with MessageSink(tls_context=test_ca.server_context()) as sink:
        nsd.publish(zone, ["@ IN MX 10 mail", "mail IN A 127.0.0.1"])

        async def scenario() -> tuple[list[RecipientResult], int]:
            async with WireTap(sink.port) as tap:
                tap.sabotage_next_starttls = True
                relay = Relay(
                    settings(mode="mx", port=tap.port),
                    hostname="gw.mailgate.test",
                    resolver=async_resolver(nsd),
                )
                try:
                    results = await relay.send("rep@corp.test", [f"fallback@{zone}"], MESSAGE)
                finally:
                    await relay.aclose()
                return results, tap.connections

        (result,), connections = run(scenario())
        assert result.delivered, result
        assert connections == 2  # the broken TLS attempt, then plaintext
        assert not arrived(sink, f"fallback@{zone}")[0].tls
