"""The submission policy as plain functions: who may relay, as whom, and which bytes."""

from __future__ import annotations

import ipaddress

import pytest

from gateway.smtp import policy
from gateway.smtp.policy import Identity, SessionFacts, Verdict

REP = Identity(
    login="rep@example.com",
    addresses=frozenset({"rep@example.com"}),
    domains=frozenset({"sales.example.com"}),
)
AUTHED = SessionFacts(identity=REP, peer="192.0.2.7", tls=True)
ANONYMOUS = SessionFacts(peer="192.0.2.7")
TRUSTED = SessionFacts(peer="10.1.2.3", trusted_networks=(ipaddress.ip_network("10.0.0.0/8"),))


@pytest.mark.parametrize(
    "address",
    [
        "victim%elsewhere.test@example.com",  # percent hack
        "@relay.test:victim@elsewhere.test",  # source route
        "@a.test,@b.test:victim@elsewhere.test",
        "elsewhere.test!victim@example.com",  # bang path
    ],
)
def test_routing_tricks_are_refused_even_after_auth(address: str) -> None:
    assert policy.recipient(address, AUTHED, accepted=0, limit=10) is Verdict.SOURCE_ROUTE


@pytest.mark.parametrize(
    "address",
    [
        "victim@elsewhere.test",
        '"victim@elsewhere"@example.com',
        "victim@[192.0.2.1]",
        "a%b@c.test",
        "c!d@e.test",
        "@x:y@z.test",
    ],
)
def test_nothing_is_relayed_without_auth(address: str) -> None:
    assert policy.recipient(address, ANONYMOUS, accepted=0, limit=10) is Verdict.AUTH_REQUIRED
    assert policy.sender("someone@example.com", ANONYMOUS) is Verdict.AUTH_REQUIRED


def test_trusted_network_may_relay_without_auth() -> None:
    assert policy.recipient("x@elsewhere.test", TRUSTED, accepted=0, limit=10) is Verdict.ACCEPT
    assert policy.sender("app@example.com", TRUSTED) is Verdict.ACCEPT


def test_sender_must_be_the_users_own_address() -> None:
    assert policy.sender("rep@example.com", AUTHED) is Verdict.ACCEPT
    assert policy.sender("REP@Example.COM", AUTHED) is Verdict.ACCEPT
    assert policy.sender("anyone@sales.example.com", AUTHED) is Verdict.ACCEPT
    assert policy.sender("boss@example.com", AUTHED) is Verdict.SENDER_NOT_OWNED
    assert policy.sender("", AUTHED) is Verdict.SENDER_NOT_OWNED


def test_recipient_limit_answers_452() -> None:
    assert (
        policy.recipient("a@b.test", AUTHED, accepted=10, limit=10) is Verdict.TOO_MANY_RECIPIENTS
    )
    assert policy.REPLIES[Verdict.TOO_MANY_RECIPIENTS].startswith("452 4.5.3 ")


@pytest.mark.parametrize(
    ("raw", "verdict"),
    [
        (b"From: rep@example.com\r\n\r\nok\r\n", Verdict.ACCEPT),
        (b"From: rep@example.com\r\n\r\nbare\nLF\r\n", Verdict.BARE_LINE_ENDING),
        (b"From: rep@example.com\r\n\r\nbare\rCR\r\n", Verdict.BARE_LINE_ENDING),
        (b"From: rep@example.com\r\n\r\nnul\x00.\r\n", Verdict.NUL_CHARACTER),
    ],
)
def test_content_bytes(raw: bytes, verdict: Verdict) -> None:
    assert policy.content(raw, ["rep@example.com"], 1, AUTHED) is verdict


def test_from_header_must_be_owned_and_single() -> None:
    raw = b"From: x\r\n\r\nbody\r\n"
    assert policy.content(raw, ["boss@example.com"], 1, AUTHED) is Verdict.FROM_NOT_OWNED
    assert policy.content(raw, ["rep@example.com", "boss@example.com"], 1, AUTHED) is (
        Verdict.FROM_NOT_OWNED
    )
    assert policy.content(raw, ["rep@example.com"], 2, AUTHED) is Verdict.FROM_MISSING
    assert policy.content(raw, [], 0, AUTHED) is Verdict.FROM_MISSING


def test_every_refusal_has_an_enhanced_code_and_a_sentence() -> None:
    for verdict, reply in policy.REPLIES.items():
        code, enhanced, sentence = reply.split(" ", 2)
        assert code[0] in "245" and len(code) == 3, verdict
        assert enhanced[0] == code[0] and enhanced.count(".") == 2, verdict
        assert verdict is Verdict.ACCEPT or len(sentence) > 20, verdict
