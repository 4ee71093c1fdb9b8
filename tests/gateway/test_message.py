"""Header handling on raw bytes: what goes out, and the identity of an email."""

from __future__ import annotations

from gateway.message import (
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
    assert not has_bare_line_ending(b"a\r\nb\r\n")
    assert has_bare_line_ending(b"a\nb")
    assert has_bare_line_ending(b"a\r.\r")
