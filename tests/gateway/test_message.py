"""Header handling on raw bytes: what goes out, and the identity of an email."""

from __future__ import annotations

import email.utils
import random
import re

import pytest

from gateway.message import (
    _SIMPLE_MAILBOX,
    addresses,
    dedupe_key,
    has_bare_line_ending,
    missing_header_lines,
    normalise_address,
    outgoing,
    parse_headers,
)


def test_bcc_never_goes_out_and_the_body_is_untouched() -> None:
    raw = (
        b"From: a@x.test\r\nBcc: hidden@y.test,\r\n  other@y.test\r\nTo: b@z.test\r\n\r\n"
        b"Bcc: this line is body text\r\n"
    )
    out = outgoing(raw, b"X-Added: 1\r\n")
    assert out.startswith(b"X-Added: 1\r\nFrom: a@x.test\r\nTo: b@z.test\r\n\r\n")
    assert b"hidden@" not in out and b"other@" not in out
    assert out.endswith(b"Bcc: this line is body text\r\n")


def test_added_headers_are_the_same_on_every_attempt() -> None:
    headers = parse_headers(b"From: a@x.test\r\n\r\nhi\r\n")
    first = missing_header_lines(headers, local_id="abc", hostname="gw.test", now=0)
    again = missing_header_lines(headers, local_id="abc", hostname="gw.test", now=0)
    assert first == again
    assert first == b"Message-ID: <abc@gw.test>\r\nDate: Thu, 01 Jan 1970 00:00:00 +0000\r\n"
    complete = parse_headers(b"Message-ID: <m@x>\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000\r\n\r\n")
    assert missing_header_lines(complete, local_id="abc", hostname="gw.test", now=0) == b""


def test_dedupe_key_normalises_the_message_id_domain_and_falls_back_to_a_hash() -> None:
    assert dedupe_key(b"Message-ID: <Abc@EXAMPLE.com>\r\n\r\n") == "mid:Abc@example.com"
    assert dedupe_key(b"Message-ID:   <Abc@example.com> (comment)\r\n\r\n") == "mid:Abc@example.com"
    assert dedupe_key(b"Message-ID: garbage\r\n\r\nbody").startswith("sha256:")
    assert dedupe_key(b"Subject: x\r\n\r\na") != dedupe_key(b"Subject: x\r\n\r\nb")


def test_addresses_normalise_case_and_idn() -> None:
    assert normalise_address(" <Bob@Bücher.Example> ") == "bob@xn--bcher-kva.example"


def test_bare_line_endings() -> None:
    bare = has_bare_line_ending

    assert not bare(b"a\r\nb\r\n")
    assert not bare(b"")
    for raw in [b"a\nb", b"a\r.\r", b"\r\r\n", b"\r\n\n", b"\r\r\n\n", b"\n\r", b"x\r"]:
        assert bare(raw), raw
    rng = random.Random(3)
    for _ in range(2000):
        raw = bytes(rng.choices(b"\r\nab", k=rng.randrange(8)))
        assert bare(raw) == bool(re.search(rb"\r(?!\n)|(?<!\r)\n", raw)), raw


def _parser_answer(value: str) -> list[str]:
    """What ``addresses`` gives through the email package's parser alone."""
    return [normalise_address(addr) for _, addr in email.utils.getaddresses([value]) if "@" in addr]


SIMPLE_FROM = [
    "a@b",
    "<a@b>",
    "Bench <bench@example.test>",
    "  Bench  Two <A.b+c@Example.COM>  ",
    "Name<a@b.c>",
    "<a@b.c> ",
    "\t<a@b>",
    "a.b@c-d.e",
    "x <a@b>, y <c@d>",
    '"Quoted, Name" <a@b>',
    "a@b (comment)",
    "=?utf-8?q?J=C3=B6rg?= <j@b>",
    "Group: a@b, c@d;",
    "<a..b@c>",
    "<.a@b>",
    "<a@b.>",
    "<a@-b>",
    "Name <a@b> trailing",
    "<@x:a@b>",
    "a@[192.0.2.1]",
]


def _random_from(count: int) -> list[str]:
    rng = random.Random(5322)
    alphabet = 'ab.@<>-_+ \t()"[],;:\\=?x1'
    return [
        rng.choice(["", "Name ", " A b1 ", "".join(rng.choices(alphabet, k=rng.randrange(12)))])
        + rng.choice(["a@b", "<a@b>", "x.y@c.d", "<a@b.c> ", "<A+1@B-2.c>", ""])
        + rng.choice(["", "".join(rng.choices(alphabet, k=rng.randrange(4)))])
        for _ in range(count)
    ]


@pytest.mark.parametrize("value", SIMPLE_FROM)
def test_the_fast_path_for_one_plain_mailbox_gives_the_parsers_answer(value: str) -> None:
    headers = parse_headers(f"From: {value}\r\nTo: x@y\r\n\r\nbody".encode())
    assert addresses(headers, "From") == _parser_answer(str(headers["From"]))


def test_the_fast_path_agrees_with_the_parser_on_random_headers() -> None:
    wrong, fast = [], 0
    for value in _random_from(3000):
        headers = parse_headers(f"From: {value}\r\n\r\n".encode())
        fast += bool(_SIMPLE_MAILBOX.match(str(headers["From"])))
        if addresses(headers, "From") != _parser_answer(str(headers["From"])):
            wrong.append(value)
    assert wrong == []
    assert fast > 300  # the inputs do exercise the fast path
