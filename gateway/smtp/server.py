"""Listening sockets for the SMTP doors, on the process's one event loop.

aiosmtpd's ``Controller`` runs its own loop in a thread; we want every door in one loop, so this
module creates the servers with ``loop.create_server`` directly. The submission door listens twice:
on the STARTTLS port (RFC 6409) and on the implicit-TLS port (RFC 8314 §3.3). aiosmtpd only
recognises TLS that came through STARTTLS, so connections on the implicit port are marked as TLS
by hand, and the loopback exception for AUTH without TLS is applied per connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import ssl
from importlib.metadata import version
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP

from gateway.errors import ConfigError
from gateway.settings import SubmissionSettings

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


class MailgateSMTP(SMTP):
    """aiosmtpd's SMTP with our two per-connection TLS facts."""

    def __init__(
        self, handler: Any, *, implicit_tls: bool, plaintext_auth_on_loopback: bool, **kw: Any
    ) -> None:
        super().__init__(handler, **kw)
        self.implicit_tls = implicit_tls
        self.plaintext_auth_on_loopback = plaintext_auth_on_loopback
        self.auth_failures = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if self.implicit_tls:
            # The whole connection is TLS: AUTH is safe although STARTTLS never happened.
            self._auth_require_tls = False
        elif self.plaintext_auth_on_loopback and _is_loopback(transport):
            self._auth_require_tls = False


def _is_loopback(transport: asyncio.BaseTransport) -> bool:
    peer = transport.get_extra_info("peername")
    try:
        return bool(peer) and ipaddress.ip_address(peer[0]).is_loopback
    except ValueError:
        return False


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

    def _factory(self, *, implicit_tls: bool) -> SMTP:
        return MailgateSMTP(
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
            loop=asyncio.get_running_loop(),
        )

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        host = self.settings.listen
        self.servers.append(
            await loop.create_server(
                lambda: self._factory(implicit_tls=False), host, self.settings.port
            )
        )
        if self.tls_context is not None and self.settings.tls_port:
            self.servers.append(
                await loop.create_server(
                    lambda: self._factory(implicit_tls=True),
                    host,
                    self.settings.tls_port,
                    ssl=self.tls_context,
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
