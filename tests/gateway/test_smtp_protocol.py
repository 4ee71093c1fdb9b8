"""The door's protocol object: ``MailgateSMTP.copy`` makes what ``__init__`` makes, and the one
idle timer per connection still closes a silent client and only a silent one."""

from __future__ import annotations

import asyncio
import ssl
import types
import weakref
from typing import Any

import pytest

from gateway.smtp.server import MailgateSMTP


class _Handler:
    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        return "250 OK"

    async def handle_EHLO(
        self, server: Any, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        return responses

    async def auth_PLAIN(self, server: Any, args: list[str]) -> None:
        return None


def _arguments(tls: ssl.SSLContext | None) -> dict[str, Any]:
    return {
        "implicit_tls": tls is None,
        "plaintext_auth_on_loopback": True,
        "hostname": "gateway.test",
        "tls_context": tls,
        "data_size_limit": 10_000,
        "enable_SMTPUTF8": True,
        "decode_data": False,
        "timeout": 30,
        "auth_require_tls": True,
    }


def _same(made: Any, copied: Any, made_owner: object, copy_owner: object) -> bool:
    """Equal, where a method bound to its own instance counts as equal to its twin."""
    if isinstance(made, types.MethodType):
        owner = made.__self__
        return (
            isinstance(copied, types.MethodType)
            and made.__func__ is copied.__func__
            and (copied.__self__ is copy_owner if owner is made_owner else copied.__self__ is owner)
        )
    if isinstance(made, dict):
        return (
            isinstance(copied, dict)
            and type(made) is type(copied)
            and made.keys() == copied.keys()
            and all(_same(made[k], copied[k], made_owner, copy_owner) for k in made)
        )
    if isinstance(made, tuple | list):
        return (
            type(made) is type(copied)
            and len(made) == len(copied)
            and all(_same(a, b, made_owner, copy_owner) for a, b in zip(made, copied, strict=True))
        )
    if isinstance(made, asyncio.StreamReader | asyncio.Future):  # asyncio's, new per instance
        return type(made) is type(copied) and made is not copied
    if isinstance(made, weakref.ref):  # to the StreamReader
        return isinstance(copied, weakref.ref) and _same(made(), copied(), made_owner, copy_owner)
    return bool(made == copied)


@pytest.mark.parametrize("tls", [False, True])
def test_copy_equals_a_new_instance(tls: bool) -> None:
    asyncio.run(_copy_equals_a_new_instance(tls))


async def _copy_equals_a_new_instance(tls: bool) -> None:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH) if tls else None
    handler = _Handler()
    loop = asyncio.get_running_loop()
    prototype = MailgateSMTP(handler, **_arguments(context), loop=loop)
    made = MailgateSMTP(handler, **_arguments(context), loop=loop)
    copied = prototype.copy()

    assert type(copied) is MailgateSMTP
    assert made.__dict__.keys() == copied.__dict__.keys()
    differing = [
        name
        for name, value in made.__dict__.items()
        if not _same(value, copied.__dict__[name], made, copied)
    ]
    assert differing == []
    # Nothing mutable is shared with the prototype or with another copy.
    other = prototype.copy()
    for name, value in copied.__dict__.items():
        if isinstance(value, dict | list):
            assert value is not prototype.__dict__[name], name
            assert value is not other.__dict__[name], name
    assert copied._smtp_methods["EHLO"].__self__ is copied
    assert copied._auth_methods["LOGIN"].method.__self__ is copied  # aiosmtpd's built-in
    assert copied._auth_methods["PLAIN"].method.__self__ is handler


def test_command_size_limits_are_per_connection() -> None:
    """aiosmtpd shares these on the class: one connection's EHLOs raised everyone's limit."""
    asyncio.run(_command_size_limits_are_per_connection())


async def _command_size_limits_are_per_connection() -> None:
    loop = asyncio.get_running_loop()
    prototype = MailgateSMTP(_Handler(), **_arguments(None), loop=loop)
    first, second = prototype.copy(), prototype.copy()
    first.command_size_limits["MAIL"] += 36  # what aiosmtpd's EHLO does with SIZE + SMTPUTF8
    assert second.command_size_limits["MAIL"] == MailgateSMTP.command_size_limit
    assert prototype.command_size_limits["MAIL"] == MailgateSMTP.command_size_limit


def test_idle_timeout_closes_only_a_silent_client() -> None:
    asyncio.run(_idle_timeout_closes_only_a_silent_client())


async def _idle_timeout_closes_only_a_silent_client() -> None:
    loop = asyncio.get_running_loop()
    arguments = {**_arguments(None), "timeout": 0.5}
    prototype = MailgateSMTP(_Handler(), **arguments, loop=loop)
    server = await loop.create_server(prototype.copy, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        assert (await reader.readline()).startswith(b"220 ")
        # Busy for twice the timeout: each command pushes the deadline on.
        start = last = loop.time()
        while last - start < 1.0:
            await asyncio.sleep(0.1)  # the client's pace, not a wait for state
            writer.write(b"NOOP\r\n")
            assert (await asyncio.wait_for(reader.readline(), 5)).startswith(b"250 ")
            last = loop.time()
        # Then silent: closed once the timeout has passed since the last command, not before.
        assert await asyncio.wait_for(reader.read(), 5) == b""
        assert loop.time() - last >= 0.45
    finally:
        writer.close()
        server.close()
