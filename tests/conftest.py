"""Fixtures shared by every test package.

Sections are owned separately; add new shared fixtures in a section of their own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pytest

from tests.servers._process import ServerUnavailable
from tests.servers.certs import TestCA
from tests.servers.dns import AuthoritativeDns
from tests.servers.dovecot import DovecotServer
from tests.servers.postfix import PostfixRelay
from tests.servers.postgres import PostgresCluster
from tests.servers.sink import MessageSink

# == Real servers (tests/servers) =================================================================
# Session-scoped servers start lazily, on the first test that asks for them, and stop at the end
# of the session. A missing server binary fails the test (never skips it): tests/run.sh installs
# them all.

_T = TypeVar("_T")


def _available(make: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
    """Construct a server helper; a missing binary fails the test with the install hint."""
    try:
        return make(*args, **kwargs)
    except ServerUnavailable as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="session")
def ca() -> Iterator[TestCA]:
    """The session's test CA; ``ca.server`` holds cert/key files for localhost and 127.0.0.1."""
    authority = TestCA()
    yield authority
    authority.cleanup()


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresCluster]:
    """A PostgreSQL cluster for the session (trust auth on 127.0.0.1)."""
    with _available(PostgresCluster) as cluster:
        yield cluster


@pytest.fixture
def pg_url(postgres: PostgresCluster) -> Iterator[str]:
    """A fresh, empty database for this test: ``postgresql+psycopg://postgres@127.0.0.1:P/NAME``."""
    url = postgres.new_database()
    yield url
    postgres.drop_database(url)


@pytest.fixture(scope="session")
def dns_server() -> Iterator[AuthoritativeDns]:
    """NSD for the session. Publish zones under names unique to your test."""
    with _available(AuthoritativeDns) as server:
        yield server


@pytest.fixture(scope="session")
def dovecot(ca: TestCA) -> Iterator[DovecotServer]:
    """Dovecot for the session, TLS required (``port``: STARTTLS, ``imaps_port``: implicit TLS).

    Create users with ``dovecot.new_user()`` so that tests never share a mailbox.
    """
    with _available(DovecotServer, tls=ca.server) as server:
        yield server


@pytest.fixture(scope="session")
def postfix(ca: TestCA) -> Iterator[PostfixRelay]:
    """Postfix for the session, relaying to its own sink (``postfix.sink``); STARTTLS offered.

    Relays for 127.0.0.0/8 without AUTH. The sink is shared: match messages by a recipient
    unique to your test (``postfix.sink.wait_for_rcpt(address)``).
    """
    with (
        MessageSink(tls_context=ca.server_context()) as relay_sink,
        _available(PostfixRelay, relay_sink, tls=ca.server) as relay,
    ):
        yield relay


@pytest.fixture(scope="session")
def postfix_auth(ca: TestCA, dovecot: DovecotServer) -> Iterator[PostfixRelay]:
    """Postfix for the session that relays only after SMTP AUTH over TLS.

    Credentials are the session Dovecot's users (``dovecot.new_user()``); STARTTLS on ``port``,
    implicit TLS on ``tls_port``; mail goes to ``postfix_auth.sink``.
    """
    with (
        MessageSink() as relay_sink,
        _available(
            PostfixRelay,
            relay_sink,
            tls=ca.server,
            require_auth=True,
            sasl_socket=dovecot.auth_socket,
        ) as relay,
    ):
        yield relay


@pytest.fixture
def sink() -> Iterator[MessageSink]:
    """A fresh recording SMTP server for this test (``reject@…`` gets 550, ``tempfail@…`` 451)."""
    with MessageSink() as server:
        yield server


# == end of real servers ==========================================================================
