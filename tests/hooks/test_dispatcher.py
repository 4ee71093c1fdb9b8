"""The webhook dispatcher against a real HTTP receiver: signatures, outages, 410, redirects,
oversized replies, time limits, and the SSRF guard (through the resolver seam only)."""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from sqlalchemy import Connection, select

from crm_api.signatures import verify
from gateway.store.db import make_engine, migrate
from gateway.store.models import Subscriber, WebhookDelivery
from gateway.store.queue import GroupCommitter
from hooks.subscribers import SubscriberError, add_subscriber
from hooks.webhooks import (
    Dispatcher,
    Outbox,
    UnsafeTarget,
    check_address,
    resolve_target,
    signature_header,
)
from tests.servers.ports import free_port
from tests.servers.uvicorn import UvicornServer

T = TypeVar("T")
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
NEW_SECRET = "whsec_" + base64.b64encode(b"the next secret, rotated in soon").decode()


def test_signature_matches_the_standard_webhooks_test_vector() -> None:
    # The published vector of the Standard Webhooks reference libraries.
    signature = signature_header(
        [SECRET], "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, b'{"test": 2432232314}'
    )
    assert signature == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def receiver(tmp_path: Path, port: int | None = None, **env: str) -> UvicornServer:
    log = tmp_path / f"received-{time.monotonic_ns()}.jsonl"
    log.touch()
    server = UvicornServer(
        "tests.hooks.receiver:create_app", {"RECEIVER_LOG": str(log), **env}, port=port
    )
    server.received_file = log  # type: ignore[attr-defined]
    return server


def received(server: UvicornServer) -> list[dict[str, Any]]:
    text = server.received_file.read_text()  # type: ignore[attr-defined]
    return [json.loads(line) for line in text.splitlines() if line]


def run(
    tmp_path: Path,
    body: Callable[[GroupCommitter, Dispatcher, Outbox], Awaitable[T]],
    **dispatcher: Any,
) -> T:
    async def main() -> T:
        engine = make_engine(f"sqlite:///{tmp_path / 'gw.db'}")
        migrate(engine)
        committer = GroupCommitter(engine)
        await committer.start()
        client = httpx.AsyncClient(follow_redirects=False, trust_env=False)
        options: dict[str, Any] = {"schedule": [0.2, 0.2, 0.2], "timeout": 2.0, **dispatcher}
        worker = Dispatcher(committer=committer, client=client, **options)
        try:
            return await body(committer, worker, Outbox())
        finally:
            await client.aclose()
            await committer.stop()
            engine.dispose()

    return asyncio.run(main())


async def subscribe(committer: GroupCommitter, url: str, *secrets: str) -> None:
    await add_subscriber(
        committer,
        name=f"s{time.monotonic_ns()}",
        url=url,
        secret=secrets[0] if secrets else SECRET,
        event_types=[],
        allow_private=True,
    )
    if len(secrets) > 1:

        def write(connection: Connection) -> None:
            table = Subscriber.__table__  # type: ignore[attr-defined]
            connection.execute(table.update().values(secrets=list(secrets)))

        await committer.write(write)


async def states(committer: GroupCommitter) -> list[tuple[str, int, int | None]]:
    table = WebhookDelivery.__table__  # type: ignore[attr-defined]

    def read(connection: Connection) -> list[tuple[str, int, int | None]]:
        rows = connection.execute(
            select(table.c.state, table.c.attempts, table.c.last_status).order_by(table.c.id)
        )
        return [tuple(r) for r in rows]  # type: ignore[misc]

    result: list[tuple[str, int, int | None]] = await committer.read(read)
    return result


async def drain(
    dispatcher: Dispatcher, until: Callable[[], Awaitable[bool]], timeout: float = 15
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        await dispatcher.dispatch_once()
        if await until():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the dispatcher did not get there in time")


def status_event(n: int) -> dict[str, Any]:
    return {"account_id": f"acct-{n}", "status": "live", "detail": "ok"}


def test_signed_delivery_survives_an_outage_and_arrives_once(tmp_path: Path) -> None:
    port = free_port()
    server = receiver(tmp_path, port=port)

    async def body(committer: GroupCommitter, dispatcher: Dispatcher, outbox: Outbox) -> None:
        await subscribe(committer, f"http://127.0.0.1:{port}/hook", SECRET, NEW_SECRET)
        ids = [
            await committer.write(outbox.event("account.status_changed", status_event(n)))
            for n in range(5)
        ]
        await dispatcher.dispatch_once()  # nobody listens yet
        assert {s for s, _, _ in await states(committer)} == {"pending"}
        assert all(attempts == 1 for _, attempts, _ in await states(committer))
        server.start()
        try:

            async def done() -> bool:
                return {s for s, _, _ in await states(committer)} == {"delivered"}

            await drain(dispatcher, done)
        finally:
            server.stop()
        arrivals = received(server)
        assert sorted(a["headers"]["webhook-id"] for a in arrivals) == sorted(ids)
        for arrival in arrivals:
            headers = arrival["headers"]
            assert len(headers["webhook-signature"].split(" ")) == 2  # both secrets sign
            for secret in (SECRET, NEW_SECRET):  # either one verifies (rotation)
                key = base64.b64decode(secret.removeprefix("whsec_"))
                verify(keys=[key], headers=headers, body=arrival["body"].encode(), now=time.time())
            assert json.loads(arrival["body"])["type"] == "account.status_changed"

    run(tmp_path, body)


def test_gone_disables_the_subscriber(tmp_path: Path) -> None:
    server = receiver(tmp_path, RECEIVER_STATUS="410").start()

    async def body(committer: GroupCommitter, dispatcher: Dispatcher, outbox: Outbox) -> None:
        await subscribe(committer, f"{server.url}/hook")
        await committer.write(outbox.event("account.status_changed", status_event(1)))
        await committer.write(outbox.event("account.status_changed", status_event(2)))
        await dispatcher.dispatch_once()
        table = Subscriber.__table__  # type: ignore[attr-defined]
        enabled = await committer.read(
            lambda c: c.execute(select(table.c.enabled, table.c.disabled_reason)).one()
        )
        assert enabled[0] is False
        assert "410" in enabled[1]
        # Later events for it are not even tried.
        await committer.write(outbox.event("account.status_changed", status_event(3)))
        assert await dispatcher.dispatch_once() == 0

    try:
        run(tmp_path, body)
    finally:
        server.stop()


def test_redirects_are_not_followed(tmp_path: Path) -> None:
    target = receiver(tmp_path).start()
    redirector = receiver(
        tmp_path, RECEIVER_STATUS="302", RECEIVER_LOCATION=f"{target.url}/hook"
    ).start()

    async def body(committer: GroupCommitter, dispatcher: Dispatcher, outbox: Outbox) -> None:
        await subscribe(committer, f"{redirector.url}/hook")
        await committer.write(outbox.event("account.status_changed", status_event(1)))
        await dispatcher.dispatch_once()
        [(state, attempts, status)] = await states(committer)
        assert (state, attempts, status) == ("pending", 1, 302)

    try:
        run(tmp_path, body)
        assert len(received(redirector)) == 1
        assert received(target) == []
    finally:
        target.stop()
        redirector.stop()


def test_huge_replies_are_cut_and_slow_ones_time_out(tmp_path: Path) -> None:
    big = receiver(tmp_path, RECEIVER_BODY_BYTES=str(20 * 1024 * 1024)).start()
    slow = receiver(tmp_path, RECEIVER_DELAY="5").start()

    async def body(committer: GroupCommitter, dispatcher: Dispatcher, outbox: Outbox) -> None:
        await subscribe(committer, f"{big.url}/hook")
        await subscribe(committer, f"{slow.url}/hook")
        await committer.write(outbox.event("account.status_changed", status_event(1)))
        started = time.monotonic()
        await dispatcher.dispatch_once()
        assert time.monotonic() - started < 4  # bounded by the 1 s limit, not the 5 s delay
        assert sorted(await states(committer)) == [("delivered", 1, 200), ("pending", 1, None)]

    try:
        run(tmp_path, body, timeout=1.0, max_response_bytes=64 * 1024)
    finally:
        big.stop()
        slow.stop()


def test_dead_letter_after_the_schedule(tmp_path: Path) -> None:
    server = receiver(tmp_path, RECEIVER_STATUS="500").start()

    async def body(committer: GroupCommitter, dispatcher: Dispatcher, outbox: Outbox) -> None:
        await subscribe(committer, f"{server.url}/hook")
        await committer.write(outbox.event("account.status_changed", status_event(1)))

        async def dead() -> bool:
            return (await states(committer))[0][0] == "dead"

        await drain(dispatcher, dead)
        assert (await states(committer))[0] == ("dead", 4, 500)  # 1 try + 3 retries

    try:
        run(tmp_path, body)
    finally:
        server.stop()


# -- the SSRF guard, through the resolver seam (no traffic leaves the machine) -----------------


def fixed(*addresses: str) -> Any:
    async def resolve(_host: str, _port: int) -> list[str]:
        return list(addresses)

    return resolve


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/hook",
        "http://[::1]/hook",
        "http://[::ffff:127.0.0.1]/hook",
        "http://[64:ff9b::7f00:1]/hook",
        "http://[2002:7f00:1::1]/hook",
        "http://[::7f00:1]/hook",
        "http://169.254.169.254/latest/meta-data",
        "http://10.1.2.3/hook",
        "http://[fd00::1]/hook",
        "http://0.0.0.0/hook",
    ],
)
def test_internal_literals_are_refused(url: str) -> None:
    with pytest.raises(UnsafeTarget):
        asyncio.run(resolve_target(url, allow_private=False, resolver=fixed()))


def test_names_resolving_inside_are_refused_and_the_checked_address_is_used() -> None:
    with pytest.raises(UnsafeTarget, match="private"):
        asyncio.run(
            resolve_target(
                "https://crm.example.com/h", allow_private=False, resolver=fixed("10.0.0.1")
            )
        )
    # A name that answers one public and one internal address is a rebinding attempt.
    with pytest.raises(UnsafeTarget):
        asyncio.run(
            resolve_target(
                "https://crm.example.com/h",
                allow_private=False,
                resolver=fixed("93.184.216.34", "127.0.0.1"),
            )
        )
    target = asyncio.run(
        resolve_target(
            "https://crm.example.com:8443/h?x=1",
            allow_private=False,
            resolver=fixed("93.184.216.34"),
        )
    )
    assert target.url == "https://93.184.216.34:8443/h?x=1"
    assert target.host_header == "crm.example.com:8443"
    assert target.sni == "crm.example.com"
    allowed = asyncio.run(
        resolve_target("http://127.0.0.1:9/h", allow_private=True, resolver=fixed())
    )
    assert allowed.url == "http://127.0.0.1:9/h"


def test_check_address_unwraps_embedded_ipv4() -> None:
    assert check_address("2606:4700::1111") == ipaddress.ip_address("2606:4700::1111")
    for wrapped in ("::ffff:10.0.0.1", "64:ff9b::a00:1", "2002:a00:1::"):
        with pytest.raises(UnsafeTarget):
            check_address(wrapped)


def test_subscriber_url_is_checked_when_saved(tmp_path: Path) -> None:
    async def body(committer: GroupCommitter, _d: Dispatcher, _o: Outbox) -> None:
        with pytest.raises(SubscriberError, match="refused"):
            await add_subscriber(
                committer,
                name="evil",
                url="http://[::ffff:127.0.0.1]/",
                secret=SECRET,
                event_types=[],
            )
        with pytest.raises(SubscriberError, match="unknown event type"):
            await add_subscriber(
                committer,
                name="typo",
                url="https://crm.example.com/",
                secret=SECRET,
                event_types=["email.logd"],
                resolver=fixed("93.184.216.34"),
            )
        assert (
            await add_subscriber(
                committer,
                name="ok",
                url="https://crm.example.com/",
                secret=SECRET,
                event_types=["email.logged"],
                resolver=fixed("93.184.216.34"),
            )
            > 0
        )

    run(tmp_path, body)


def test_a_refused_address_at_connection_time_is_not_contacted(tmp_path: Path) -> None:
    server = receiver(tmp_path).start()

    async def body(committer: GroupCommitter, dispatcher: Dispatcher, outbox: Outbox) -> None:
        # Saved while the name looked public; at delivery time it resolves to loopback.
        await add_subscriber(
            committer,
            name="rebinding",
            url="http://hooks.example.com/hook",
            secret=SECRET,
            event_types=[],
            resolver=fixed("93.184.216.34"),
        )
        dispatcher.resolver = fixed("127.0.0.1")
        await committer.write(outbox.event("account.status_changed", status_event(1)))
        await dispatcher.dispatch_once()
        table = WebhookDelivery.__table__  # type: ignore[attr-defined]
        error = await committer.read(lambda c: c.execute(select(table.c.last_error)).scalar_one())
        assert error.startswith("refused: 127.0.0.1 is loopback")

    try:
        run(tmp_path, body)
        assert received(server) == []
    finally:
        server.stop()
