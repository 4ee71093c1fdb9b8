"""The scale-out path: gateways sharing one PostgreSQL queue, and a database that dies.

Promise 1 from the other side: when the store cannot take a message, the client gets a 4xx and
keeps it; a gateway never answers 250 for mail it could not write down.
"""

from __future__ import annotations

import smtplib
import time
from pathlib import Path
from typing import Any

import httpx

from tests.gateway.conftest import REP, REP_PASSWORD, RunningGateway, add_users, gateway_settings
from tests.servers.postgres import PostgresCluster


def send(gateway: RunningGateway, ca: Any, subject: str) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", gateway.port, timeout=30) as client:
        client.starttls(context=ca.client_context())
        client.login(REP, REP_PASSWORD)
        client.mail(REP)
        client.rcpt("customer@client.test")
        return client.data(f"From: {REP}\r\nSubject: {subject}\r\n\r\nhello\r\n".encode())


def test_two_gateways_share_one_postgresql_queue(
    tmp_path: Path, ca: Any, postgres: Any, sink: Any
) -> None:
    url = postgres.new_database()
    relay = {"host": "127.0.0.1", "port": sink.port, "security": "none", "require_tls": False}
    first_settings = gateway_settings(tmp_path / "a", ca, database={"url": url}, relay=relay)
    second_settings = gateway_settings(tmp_path / "b", ca, database={"url": url}, relay=relay)
    add_users(url)
    first = RunningGateway(first_settings).start()
    second = RunningGateway(second_settings).start()
    try:
        for n in range(20):
            code, _ = send(first if n % 2 else second, ca, f"shared {n}")
            assert code == 250
        received = sink.wait_for(20, timeout=30)
        subjects = sorted(str(m.message()["Subject"]) for m in received)
        assert subjects == sorted(f"shared {n}" for n in range(20))  # each exactly once
    finally:
        first.stop()
        second.stop()


def test_a_dead_database_gives_451_and_the_client_keeps_the_message(
    tmp_path: Path, ca: Any, sink: Any
) -> None:
    cluster = PostgresCluster().start()
    try:
        url = cluster.new_database()
        add_users(url)
        settings = gateway_settings(
            tmp_path,
            ca,
            database={"url": url},
            relay={
                "host": "127.0.0.1",
                "port": sink.port,
                "security": "none",
                "require_tls": False,
            },
        )
        gateway = RunningGateway(settings).start()
        try:
            assert send(gateway, ca, "before")[0] == 250
            with smtplib.SMTP("127.0.0.1", gateway.port, timeout=90) as client:
                client.starttls(context=ca.client_context())
                client.login(REP, REP_PASSWORD)  # users are checked while the database is up
                cluster.stop()
                client.mail(REP)
                client.rcpt("customer@client.test")
                code, reply = client.data(f"From: {REP}\r\nSubject: during\r\n\r\nx\r\n".encode())
            assert code == 451
            assert reply.startswith(b"4.3.0 ")
            health = _get(f"{gateway.api}/healthz")
            assert health[0] == 503
            assert "database unavailable" in health[1]["detail"]
            cluster.start()
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                code, _ = send(gateway, ca, "after")
                if code == 250:
                    break
                time.sleep(0.2)
            assert code == 250
            subjects = {str(m.message()["Subject"]) for m in sink.wait_for(2, timeout=30)}
            assert subjects == {"before", "after"}
        finally:
            gateway.stop()
    finally:
        cluster.stop()
        cluster.cleanup()


def _get(url: str) -> tuple[int, dict[str, Any]]:
    response = httpx.get(url, timeout=30)
    return response.status_code, response.json()
