"""gateway.dkim: keys on disk, and signatures that dkimpy verifies against the published record.

Every verification looks the public key up in DNS: the record from ``DkimKey.txt_record()`` is
published in a zone of the session's authoritative DNS server and fetched through its resolver,
exactly as a receiving MTA would.
"""

from __future__ import annotations

import base64
import collections
import hashlib
import itertools
import os
import random
import re
import stat
import tracemalloc
import types
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import dkim
import dkim.util
import dns.resolver
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from dkim.canonicalization import Relaxed

from gateway import dkim as gateway_dkim
from gateway.dkim import (
    DkimKey,
    DkimSigner,
    KeyExistsError,
    KeyRing,
    UnsignableMessage,
    generate_key,
    load_keys,
)
from gateway.errors import ConfigError, Reject
from gateway.settings import DkimSettings
from tests.servers.dns import AuthoritativeDns

CORPUS = Path(__file__).resolve().parents[3] / "shared" / "corpora" / "flanker" / "messages"
HEADERS = DkimSettings().headers
FIXED_TIME = 1_700_000_000  # 2023-11-14: in the past, so dkimpy's t= check accepts it

MESSAGE = (
    b"From: Sales Rep <rep@example.test>\r\n"
    b"To: customer@customer.example\r\n"
    b"Subject: Your quote\r\n"
    b"Date: Mon, 03 Mar 2025 10:00:00 +0000\r\n"
    b"Message-ID: <quote-1@example.test>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"\r\n"
    b"Here is the quote we discussed.\r\n"
    b"  Trailing  spaces and\ttabs   \r\n"
    b"\r\n"
    b"\r\n"
)

Publish = Callable[[DkimKey], None]
DnsFunc = Callable[..., bytes | None]


# --- DNS: the published record, through a real server --------------------------------------------

_zone_numbers = itertools.count()


@pytest.fixture
def zone() -> str:
    """A fresh zone per test (on the session's server), so tests never see each other's keys."""
    return f"dkim{os.getpid()}-{next(_zone_numbers)}.test"


@pytest.fixture
def publish(dns_server: AuthoritativeDns, zone: str) -> Iterator[Publish]:
    """Publish keys' TXT records in ``zone`` on the authoritative server, as an admin would."""
    records: list[str] = []

    def do(key: DkimKey) -> None:
        assert key.record_name.endswith(f".{zone}."), "keys in a test live under its zone"
        records.append(key.txt_record())
        dns_server.publish(zone, records)  # replaces the zone: all of this test's records

    yield do
    if records:
        dns_server.remove(zone)


@pytest.fixture
def dnsfunc(dns_server: AuthoritativeDns) -> DnsFunc:
    """dkimpy's ``dnsfunc``: the TXT record at a name, asked of the authoritative server."""
    resolver = dns_server.resolver()

    def lookup(name: bytes, timeout: float = 5) -> bytes | None:
        try:
            answer = resolver.resolve(name.decode("ascii"), "TXT")
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer, dns.resolver.NoNameservers):
            return None
        # As dkimpy's own lookup does: one record, its strings joined (RFC 6376 §3.6.2.2).
        return b"".join(next(iter(answer)).strings)

    return lookup


def verifies(message: bytes, dnsfunc: DnsFunc, *, idx: int = 0) -> bool:
    """dkimpy's verdict on signature ``idx`` (0 is the topmost), looking the key up in DNS.

    Like ``dkim.verify`` (which only checks the topmost), a DKIMException such as a body hash
    mismatch is a failed verification.
    """
    try:
        result: bool = dkim.DKIM(message).verify(idx=idx, dnsfunc=dnsfunc)
    except dkim.DKIMException:
        return False
    return result


def tags(header: bytes) -> dict[bytes, bytes]:
    """The tag=value pairs of one DKIM-Signature header field."""
    name, _, value = header.partition(b":")
    assert name == b"DKIM-Signature"
    parsed: dict[bytes, bytes] = dkim.util.parse_tag_value(value)
    return parsed


def signed_names(header: bytes) -> list[bytes]:
    """The h= names of one DKIM-Signature field (folded, if at all, around the colons)."""
    return [h.strip() for h in tags(header)[b"h"].split(b":")]


def dkimpy_fields(fields: list[list[bytes]]) -> list[list[bytes]]:
    """Our parsed header fields in dkimpy's shape: [name, value with each line's CRLF]."""
    return [[name, b"".join(piece + b"\r\n" for piece in pieces)] for name, *pieces in fields]


# --- keys -----------------------------------------------------------------------------------------


@pytest.fixture
def rsa_key(tmp_path: Path, zone: str, publish: Publish) -> DkimKey:
    key = generate_key(tmp_path / "keys", zone, selector="mailgate")
    publish(key)
    return key


@pytest.fixture
def ed_key(tmp_path: Path, zone: str, publish: Publish) -> DkimKey:
    key = generate_key(tmp_path / "keys", zone, selector="ed", algorithm="ed25519-sha256")
    publish(key)
    return key


@pytest.fixture
def fixed_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """Freeze the clock dkimpy and our signer read for t=, so their signatures can be compared."""
    frozen = types.SimpleNamespace(time=lambda: float(FIXED_TIME))
    monkeypatch.setattr(dkim, "time", frozen)
    monkeypatch.setattr(gateway_dkim, "time", frozen)


def from_domain(zone: str) -> bytes:
    return MESSAGE.replace(b"example.test", zone.encode())


# --- signing and verifying ------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["rsa-sha256", "ed25519-sha256"])
def test_signature_verifies_against_the_published_record(
    tmp_path: Path, zone: str, publish: Publish, dnsfunc: DnsFunc, algorithm: str
) -> None:
    key = generate_key(tmp_path, zone, selector="s1", algorithm=algorithm)  # type: ignore[arg-type]
    publish(key)
    message = from_domain(zone)

    header = DkimSigner(load_keys(tmp_path), HEADERS).sign(message, domain=zone)

    assert header.startswith(b"DKIM-Signature: ")
    assert header.endswith(b"\r\n")
    fields = tags(header)
    assert fields[b"a"] == algorithm.encode()
    assert fields[b"c"] == b"relaxed/relaxed"
    assert (fields[b"d"], fields[b"s"]) == (zone.encode(), b"s1")
    # txt_record() survives a real zone file and server: the answer is the record, unchanged.
    assert dnsfunc(f"s1._domainkey.{zone}.".encode()) == key.record_value.encode()
    assert verifies(header + message, dnsfunc)


def test_signature_needs_the_published_key(
    rsa_key: DkimKey, tmp_path: Path, zone: str, dnsfunc: DnsFunc
) -> None:
    """A key that was never published (or was replaced) does not verify: the lookup matters."""
    unpublished = generate_key(tmp_path / "other", zone, selector="mailgate")
    message = from_domain(zone)

    header = DkimSigner(KeyRing([unpublished]), HEADERS).sign(message, domain=zone)

    assert not verifies(header + message, dnsfunc)


def test_rsa_signature_is_byte_identical_to_dkimpys_pure_python_one(
    rsa_key: DkimKey, zone: str, fixed_time: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    message = from_domain(zone)
    signer = DkimSigner(KeyRing([rsa_key]), HEADERS)
    include = signed_names(signer.sign(message, domain=zone))
    stock = dkim.sign(
        message,
        rsa_key.selector.encode(),
        rsa_key.domain.encode(),
        _pkcs8_pem(rsa_key),
        canonicalize=(b"relaxed", b"relaxed"),
        include_headers=include,
    )

    # Prove ours never falls back to dkimpy's pure-Python RSA.
    def pure_python_rsa(*args: object) -> bytes:
        raise AssertionError("dkimpy's pure-Python RSA was called")

    monkeypatch.setattr(dkim, "RSASSA_PKCS1_v1_5_sign", pure_python_rsa)
    ours = signer.sign(message, domain=zone)

    assert ours == stock


def test_ed25519_signature_is_byte_identical_to_dkimpys(
    ed_key: DkimKey, zone: str, fixed_time: None
) -> None:
    message = from_domain(zone)
    signer = DkimSigner(KeyRing([ed_key]), HEADERS)
    ours = signer.sign(message, domain=zone)
    stock = dkim.sign(
        message,
        ed_key.selector.encode(),
        ed_key.domain.encode(),
        _stock_key(ed_key),
        signature_algorithm=b"ed25519-sha256",
        canonicalize=(b"relaxed", b"relaxed"),
        include_headers=signed_names(ours),
    )
    assert ours == stock


def _pkcs8_pem(key: DkimKey) -> bytes:
    return key.private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _stock_key(key: DkimKey) -> bytes:
    """The ``privkey`` dkimpy's own signer takes: PEM for RSA, the base64 seed for ed25519."""
    if key.algorithm == "rsa-sha256":
        return _pkcs8_pem(key)
    seed = key.private_key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    return base64.b64encode(seed)


def stock_sign(message: bytes, key: DkimKey, include: list[bytes]) -> bytes:
    """dkimpy 1.1.8's own signature (pure-Python RSA, or PyNaCl) of ``message``."""
    header: bytes = dkim.sign(
        message,
        key.selector.encode(),
        key.domain.encode(),
        _stock_key(key),
        signature_algorithm=key.algorithm.encode(),
        canonicalize=(b"relaxed", b"relaxed"),
        include_headers=include,
    )
    return header


CORPUS_MESSAGES = [
    "8bitmime.eml",  # raw 8-bit body
    "from-encoding.eml",  # raw 8-bit in headers
    "long-header.eml",  # a 200 KB folded header
    "torture.eml",  # 1.8 MB, deeply nested MIME
    "multi-received-headers.eml",
    "outlook-express.eml",
    "quoted-printable.eml",
    "mailformed-headers.eml",
    "disposition-notification.eml",  # CRLF line ends
    "signed.eml",  # mixed line ends
    "spam/broken-headers.eml",
    "bounce/office365.eml",
]


CORPUS_ALL = (
    sorted(str(p.relative_to(CORPUS)) for p in CORPUS.glob("**/*.eml"))
    if CORPUS.is_dir()
    else ["(corpus missing)"]
)


@pytest.fixture(scope="module")
def corpus() -> Path:
    if not CORPUS.is_dir():
        pytest.skip(f"the flanker corpus is not at {CORPUS}")
    return CORPUS


@pytest.mark.parametrize("name", CORPUS_MESSAGES)
@pytest.mark.parametrize("algorithm", ["rsa-sha256", "ed25519-sha256"])
def test_corpus_messages_sign_and_verify(
    corpus: Path,
    tmp_path: Path,
    zone: str,
    publish: Publish,
    dnsfunc: DnsFunc,
    name: str,
    algorithm: str,
) -> None:
    key = generate_key(tmp_path, zone, selector="c", algorithm=algorithm)  # type: ignore[arg-type]
    publish(key)
    message = (corpus / name).read_bytes()

    header = DkimSigner(KeyRing([key]), HEADERS).sign(message, domain=zone)

    assert header
    assert verifies(header + message, dnsfunc)
    # Signing the message as it will go out on the wire (CRLF) gives a signature that holds too.
    assert verifies(header + message.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"), dnsfunc)


@pytest.mark.parametrize("name", CORPUS_ALL)
@pytest.mark.parametrize("key_name", ["rsa_key", "ed_key"])
def test_corpus_signatures_are_byte_identical_to_dkimpys(
    request: pytest.FixtureRequest,
    corpus: Path,
    zone: str,
    fixed_time: None,
    key_name: str,
    name: str,
) -> None:
    """Our header split and chunked body hash give dkimpy's own bytes on every corpus message,
    and we refuse exactly the messages dkimpy itself cannot sign."""
    key: DkimKey = request.getfixturevalue(key_name)
    message = (corpus / name).read_bytes()

    try:
        ours = DkimSigner(KeyRing([key]), HEADERS).sign(message, domain=zone)
    except UnsignableMessage:
        with pytest.raises((dkim.MessageFormatError, IndexError)):
            stock_sign(message, key, [b"from"])
    else:
        assert ours == stock_sign(message, key, signed_names(ours))


# Messages that take every branch of the header parsing and canonicalisation, each signed by our
# signer and by dkimpy's own at the same instant: the two must be byte-identical.
HEAD = b"From: Rep <rep@example.test>\r\nTo: a@customer.example\r\nSubject: Quote\r\n"
VARIETY: dict[str, bytes] = {
    "plain": HEAD + b"\r\nHello.\r\n",
    "folded with tabs": (
        b"From: Rep\r\n\t<rep@example.test>\r\nSubject:  Your\tquote,\r\n  folded\r\n\t"
        b"over  three lines \t\r\nTo: a@customer.example\r\n\r\nBody\r\n"
    ),
    "repeated fields": (
        b"To: one@customer.example\r\n" + HEAD + b"To: two@customer.example\r\n"
        b"Cc: x@customer.example\r\nCc: y@customer.example\r\nFrom: second@example.test\r\n"
        b"\r\nBody\r\n"
    ),
    "names in odd case": (
        b"FROM: rep@example.test\r\nsUbJeCt: x\r\nTO: a@customer.example\r\n\r\nBody\r\n"
    ),
    "trailing white space": (
        b"From: rep@example.test  \r\nSubject: x \t \r\nTo:\ta@customer.example\t\r\n\r\n"
        b"Body  with   runs\t\tand trailing \t \r\nline\t\r\n \r\n\t\r\n"
    ),
    "empty and blank values": b"From: rep@example.test\r\nSubject:\r\nTo:   \r\n\r\nx\r\n",
    "empty body": HEAD + b"\r\n",
    "only empty lines in the body": HEAD + b"\r\n\r\n\r\n\r\n",
    "no body at all": HEAD,
    "last line has no line end": HEAD + b"Date: Mon, 03 Mar 2025 10:00:00 +0000",
    "LF line ends": HEAD.replace(b"\r\n", b"\n") + b"\nLF only \n\n  indented\t\n\n",
    "mixed line ends": HEAD + b"Cc: c@x.example\n\t folded\n\nbare\nCR\r\rLF\n\r\n\r\n",
    "bare CR in a header": b"From: rep@example.test\r\nSubject: a\rb \r\r\n\r\nbody\r\n",
    "non-ASCII header bytes": (
        b"From: =?utf-8?q?R=C3=A9p?= <rep@example.test>\r\nSubject: Gr\xc3\xbc\xc3\x9fe "
        b"\xe9t\xe9\r\nTo: \xff\xfe a@customer.example\r\n\r\nBody \xc3\xa9\r\n"
    ),
    "mbox From line": b"From rep@example.test Mon Mar  3 10:00:00 2025\r\n" + HEAD + b"\r\nx\r\n",
    "unusual field names": (
        b"X-Odd!#$%&'*+-.^_`|~: 1\r\nFrom: rep@example.test\r\nDKIM-Signature: v=1; b=x\r\n"
        b"Subject: a: b: c\r\n\r\nx\r\n"
    ),
    "a long unfolded field": HEAD + b"References: " + b"<id@example.test> " * 60 + b"\r\n\r\nx\r\n",
    "many fields": HEAD
    + b"".join(b"Cc: c%d@customer.example\r\n" % i for i in range(40))
    + b"\r\n",
}
# Names that are present, absent, repeated, odd; From last, so it is not first in h=.
VARIETY_HEADERS = ["subject", "to", "cc", "references", "date", "x-odd!#$%&'*+-.^_`|~", "from"]


@pytest.fixture(scope="module")
def variety_keys(tmp_path_factory: pytest.TempPathFactory) -> list[DkimKey]:
    tmp = tmp_path_factory.mktemp("variety")
    return [
        generate_key(tmp, "example.test", selector="s"),
        generate_key(tmp, "example.test", selector="e", algorithm="ed25519-sha256"),
    ]


def record_of(key: DkimKey) -> DnsFunc:
    """A dnsfunc that answers with ``key``'s record at its name, and nothing elsewhere."""

    def lookup(name: bytes, timeout: float = 5) -> bytes | None:
        return key.record_value.encode() if name == key.record_name.encode() else None

    return lookup


@pytest.mark.parametrize("name", VARIETY, ids=list(VARIETY))
def test_signatures_of_awkward_messages_are_byte_identical_to_dkimpys(
    variety_keys: list[DkimKey], fixed_time: None, name: str
) -> None:
    message = VARIETY[name]
    for key in variety_keys:
        ours = DkimSigner(KeyRing([key]), VARIETY_HEADERS).sign(message, domain=key.domain)

        assert ours == stock_sign(message, key, signed_names(ours)), key
        assert signed_names(ours)[-1] == b"from"
        assert dkim.verify(ours + message, dnsfunc=record_of(key)), key


def _name_of_length(length: int, letters: str = "abcd") -> str:
    """A DNS name of exactly ``length`` characters, in labels of at most 63 (RFC 1035 §2.3.4)."""
    labels: list[str] = []
    left = length
    for letter in itertools.cycle(letters):
        size = min(63, left)
        if left - size == 1:  # no room for a dot and a label after this one
            size -= 1
        labels.append(letter * size)
        left -= size
        if not left:
            break
        left -= 1  # the dot
    name = ".".join(labels)
    assert len(name) == length and gateway_dkim._NAME.match(name), name
    return name


# The longest names a key can have: its record name <selector>._domainkey.<domain> may have 253
# characters (RFC 1035 §2.3.4), so the domain beside selector "e" has 240, in labels of 63.
LONG_DOMAIN = _name_of_length(253 - len("e._domainkey."))
LONG_SELECTOR = _name_of_length(253 - len("._domainkey.example.test"), "stuv")
LONG_NAME = "x-" + "n" * 150
LONG_NAMES = {
    "long domain": (LONG_DOMAIN, "e", []),
    "long selector": ("example.test", LONG_SELECTOR, []),
    "long header name": ("example.test", "s", [LONG_NAME]),
}


def field_lines(header: bytes) -> list[bytes]:
    """The lines of one CRLF-terminated header field, without their CRLF."""
    assert header.endswith(b"\r\n")
    return header[:-2].split(b"\r\n")


def assert_well_formed(header: bytes, key: DkimKey, names: list[bytes]) -> None:
    """One DKIM-Signature field folded only where RFC 6376 §3.2 allows: once unfolded (CRLFs
    removed, RFC 5322 §3.2.2), d=, i=, s= and each h= name are exactly what was signed for; no
    line is empty, white space only, or longer than 998 (RFC 5322 §2.1.1); no bare CR or LF."""
    lines = field_lines(header)
    assert all(line.strip() for line in lines), header
    assert all(b"\r" not in line and b"\n" not in line for line in lines), header
    assert max(len(line) for line in lines) <= 998
    name, _, value = header.partition(b":")
    assert name == b"DKIM-Signature"
    parsed = dkim.util.parse_tag_value(value.replace(b"\r\n", b""))
    assert parsed[b"d"] == key.domain.encode()
    assert parsed[b"i"] == b"@" + key.domain.encode()
    assert parsed[b"s"] == key.selector.encode()
    assert [h.strip() for h in parsed[b"h"].split(b":")] == names


@pytest.mark.parametrize("case", LONG_NAMES, ids=list(LONG_NAMES))
@pytest.mark.parametrize("algorithm", ["rsa-sha256", "ed25519-sha256"])
def test_a_domain_selector_or_header_name_longer_than_a_line_verifies(
    tmp_path: Path, case: str, algorithm: str
) -> None:
    """dkimpy's fold() cuts a tag value longer than a line with CRLF and a space, which
    verifiers keep (RFC 6376 §3.2 allows folding only around = and ;, and inside b=, bh= and
    around h='s colons): its own signatures of these fail. Ours fold only there, making a
    longer line instead, and verify, looked up at exactly the key's record name."""
    domain, selector, extra = LONG_NAMES[case]
    key = generate_key(tmp_path, domain, selector=selector, algorithm=algorithm)  # type: ignore[arg-type]
    if case != "long header name":
        assert len(key.record_name.rstrip(".")) == 253
    message = MESSAGE.replace(b"example.test", domain.encode())
    message = b"".join(f"{name}: one\r\n".encode() for name in extra) + message

    header = DkimSigner(KeyRing([key]), [*HEADERS, *extra]).sign(message, domain=domain)

    names = signed_names(header)
    assert_well_formed(header, key, names)
    assert all(name.encode() in names for name in extra)
    assert dkim.verify(header + message, dnsfunc=record_of(key))
    stock = stock_sign(message, key, names)
    assert not dkim.verify(stock + message, dnsfunc=record_of(key))


@pytest.mark.parametrize("case", ["long domain", "long selector"])
def test_longest_names_verify_through_real_dns(
    tmp_path: Path, zone: str, publish: Publish, dnsfunc: DnsFunc, case: str
) -> None:
    """The record at a 253-character name survives a real zone and server too."""
    if case == "long domain":
        domain = f"{_name_of_length(253 - len('e._domainkey.') - len(zone) - 1)}.{zone}"
        selector = "e"
    else:
        domain = zone
        selector = _name_of_length(253 - len("._domainkey.") - len(zone), "stuv")
    key = generate_key(tmp_path, domain, selector=selector, algorithm="ed25519-sha256")
    publish(key)
    message = MESSAGE.replace(b"example.test", domain.encode())

    header = DkimSigner(KeyRing([key]), HEADERS).sign(message, domain=domain)

    assert len(key.record_name.rstrip(".")) == 253
    assert verifies(header + message, dnsfunc)


def test_folding_is_dkimpys_wherever_dkimpys_is_valid(fixed_time: None) -> None:
    """Domains, selectors and header names around a line's length, where fold() starts to cut
    them: wherever dkimpy's field is well formed, ours is byte for byte the same (this takes in
    fold()'s exact fits, which leave two spaces or a lone ";" at a line's start); wherever it is
    not, ours is still well formed and verifies."""
    private_key = ed25519.Ed25519PrivateKey.generate()
    cases = [(_name_of_length(n), "e", None) for n in range(50, 80)]
    cases += [("example.test", _name_of_length(n, "st"), None) for n in range(55, 85)]
    cases += [("example.test", "s", "x-" + "n" * (n - 2)) for n in range(55, 85)]
    outcomes: collections.Counter[str] = collections.Counter()
    for domain, selector, extra in cases:
        key = DkimKey(domain, selector, "ed25519-sha256", private_key)
        names = [*HEADERS, extra] if extra else HEADERS
        message = MESSAGE.replace(b"example.test", domain.encode())
        if extra:
            message = f"{extra}: one\r\n".encode() + message

        ours = DkimSigner(KeyRing([key]), names).sign(message, domain=domain)

        signed = signed_names(ours)
        assert_well_formed(ours, key, signed)
        assert dkim.verify(ours + message, dnsfunc=record_of(key)), ours
        stock = stock_sign(message, key, signed)
        try:
            assert_well_formed(stock, key, signed)
        except AssertionError:
            assert ours != stock
            outcomes["dkimpy's broken"] += 1
        else:
            assert ours == stock
            outcomes["same"] += 1
            outcomes["exact fit"] += b"\r\n  " in ours or b"\r\n ;" in ours
    assert outcomes["dkimpy's broken"] and outcomes["same"] and outcomes["exact fit"], outcomes


@pytest.mark.parametrize("bits", [2096, 2530])
def test_rsa_key_sizes_dkimpy_ends_the_field_badly_with_give_a_clean_end(
    tmp_path: Path, fixed_time: None, bits: int
) -> None:
    """With these key sizes the b= value ends one or two characters past a line's width, and
    fold(), counting the field's CRLF as part of it, cuts before or inside that CRLF: a line of
    a lone space, or a bare CR and LF on the wire. Ours gives the last line those characters."""
    key = generate_key(tmp_path, "example.test", selector="odd", bits=bits)

    ours = DkimSigner(KeyRing([key]), HEADERS).sign(MESSAGE, domain="example.test")

    assert_well_formed(ours, key, signed_names(ours))
    assert dkim.verify(ours + MESSAGE, dnsfunc=record_of(key))
    stock = stock_sign(MESSAGE, key, signed_names(ours))
    bad_end = {2096: b"\r\r\n \n", 2530: b"\r\n \r\n"}[bits]
    assert stock.endswith(bad_end)
    assert ours == stock[: -len(bad_end)] + b"\r\n"


def test_header_names_up_to_the_line_limit_can_be_signed(tmp_path: Path) -> None:
    """A header name of 994 characters gives signature lines of at most 998 (RFC 5322 §2.1.1):
    "  h=" and the name, should an exact fit put two spaces before it; longer ones are refused."""
    key = generate_key(tmp_path, "example.test", selector="s", algorithm="ed25519-sha256")
    longest = "x-" + "n" * 992
    message = f"{longest}: x\r\n".encode() + MESSAGE

    header = DkimSigner(KeyRing([key]), [*HEADERS, longest]).sign(message, domain="example.test")

    assert_well_formed(header, key, signed_names(header))
    assert dkim.verify(header + message, dnsfunc=record_of(key))
    with pytest.raises(ConfigError, match=r"dkim\.headers: `x-n+…` has 995 characters; .* 994"):
        DkimSigner(KeyRing([key]), [*HEADERS, longest + "n"])


def test_keygen_refuses_a_record_name_longer_than_dns_allows(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"has 254 characters, more than the 253 a DNS name"):
        generate_key(tmp_path, LONG_DOMAIN, selector="e2", algorithm="ed25519-sha256")
    assert list(tmp_path.iterdir()) == []


def test_key_file_whose_record_name_is_too_long_is_a_config_error(tmp_path: Path) -> None:
    generate_key(tmp_path, LONG_DOMAIN, selector="e", algorithm="ed25519-sha256")
    directory = tmp_path / LONG_DOMAIN
    (directory / "e.ed25519.pem").rename(directory / "e2.ed25519.pem")

    with pytest.raises(ConfigError, match=r"e2\.ed25519\.pem: the key's DNS name .* 254 char"):
        load_keys(tmp_path)


def test_header_parse_matches_dkimpys_on_random_header_sections() -> None:
    """Random header sections of good, folded, mbox, malformed and bare-CR lines with either
    line end: we read the same fields and find the same body as dkimpy's rfc822_parse, and
    refuse exactly what it fails on."""
    lines = [
        b"Subject: hi",
        b"To:a@b",
        b"X-A!: v:w",
        b"Empty:",
        b"\tcontinued",
        b" also continued ",
        b"From someone",
        b"From: x",
        b"bad line",
        b"Sub ject: x",
        b"Cr: a\rb",
        b"Cr-End: a\r",
        b"\xe9: x",
        b"",
    ]
    ends = [b"\r\n", b"\n", b"\r\r\n"]
    rng = random.Random(5322)
    for _ in range(4000):
        message = b"".join(rng.choice(lines) + rng.choice(ends) for _ in range(rng.randrange(0, 7)))
        message += rng.choice([b"", b"last line", b"body\r\n", b"\tx"])
        try:
            expected_fields, expected_body = dkim.rfc822_parse(message)
        except (dkim.MessageFormatError, IndexError) as exc:
            with pytest.raises(UnsignableMessage) as caught:
                gateway_dkim._parse_header_section(message)
            reason = str(exc) if isinstance(exc, dkim.MessageFormatError) else "starts with a"
            assert reason in caught.value.reply, message
            continue
        fields, start = gateway_dkim._parse_header_section(message)

        assert dkimpy_fields(fields) == expected_fields, message
        assert message[start:].replace(b"\r\n", b"\n").replace(b"\n", b"\r\n") == (expected_body), (
            message
        )


@pytest.mark.parametrize("bad", ["x-a b", "x-a:b", "x;y", "b=c", "x-é"])
def test_header_name_that_cannot_go_in_h_is_a_config_error(bad: str) -> None:
    with pytest.raises(ConfigError, match=rf"dkim\.headers: `{re.escape(bad)}` is not a header"):
        DkimSigner(KeyRing(), [*HEADERS, bad])


def test_body_hash_matches_dkimpy_on_awkward_bodies(monkeypatch: pytest.MonkeyPatch) -> None:
    """Random bodies of spaces, tabs, bare CR and LF and empty lines, cut into tiny chunks so
    that every chunk-boundary case occurs: the hash always equals dkimpy's."""
    monkeypatch.setattr(gateway_dkim, "_BODY_CHUNK", 3)
    pieces = [b"a", b"b ", b" ", b"  ", b"\t", b"\r", b"\n", b"\r\n", b"\r\n\r\n", b" \r\n"]
    rng = random.Random(6376)
    separators = [b"\r\n\r\n", b"\n\n", b"\r\n\n", b"\n\r\n"]
    bodies = (
        b"".join(rng.choice(pieces) for _ in range(rng.randrange(0, 24))) for _ in range(3000)
    )
    no_body = [b"Subject: x", b"Subject: x\r\n", b"Subject: x\r\nTo: y\n"]
    for message in no_body + [b"Subject: x" + rng.choice(separators) + body for body in bodies]:
        _headers, dkimpy_body = dkim.rfc822_parse(message)
        expected = hashlib.sha256(Relaxed.canonicalize_body(dkimpy_body)).digest()

        fields, start = gateway_dkim._parse_header_section(message)

        assert gateway_dkim.relaxed_body_hash(message, start) == expected, message
        assert dkimpy_fields(fields) == _headers


def test_signing_a_large_message_takes_little_memory(
    rsa_key: DkimKey, zone: str, dnsfunc: DnsFunc
) -> None:
    """dkimpy alone needed about 40x a 25 MB message; ours stays within a few chunks."""
    line = b"QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo=  like an attachment,\twith  spaces \r\n"
    message = from_domain(zone) + line * (16 * 2**20 // len(line))
    signer = DkimSigner(KeyRing([rsa_key]), HEADERS)

    tracemalloc.start()
    try:
        header = signer.sign(message, domain=zone)
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert peak < 4 * 2**20, f"signing took {peak / 2**20:.0f} MiB"
    assert verifies(header + message, dnsfunc)


@pytest.mark.parametrize("name", ["enclosed.eml", "iphone.eml"])
def test_message_with_a_malformed_header_section_is_rejected(
    corpus: Path, rsa_key: DkimKey, zone: str, name: str
) -> None:
    """These start with a whitespace line, which dkimpy cannot parse: a Reject, not a crash."""
    message = (corpus / name).read_bytes()

    with pytest.raises(UnsignableMessage) as caught:
        DkimSigner(KeyRing([rsa_key]), HEADERS).sign(message, domain=zone)

    assert isinstance(caught.value, Reject)
    assert caught.value.reply.startswith("554 5.6.0 ")
    assert caught.value.code == 554


ALTERATIONS: dict[str, Callable[[bytes], bytes]] = {
    "body changed": lambda m: m.replace(b"the quote", b"the other quote"),
    "body appended to": lambda m: m + b"P.S. pay to a new account\r\n",
    "subject changed": lambda m: m.replace(b"Subject: Your quote", b"Subject: Urgent"),
    "second From added on top": lambda m: b"From: ceo@evil.example\r\n" + m,
    "signed header removed": lambda m: m.replace(b"Date: Mon, 03 Mar 2025 10:00:00 +0000\r\n", b""),
}


@pytest.mark.parametrize("alteration", ALTERATIONS, ids=list(ALTERATIONS))
@pytest.mark.parametrize("key_name", ["rsa_key", "ed_key"])
def test_message_altered_after_signing_fails_verification(
    request: pytest.FixtureRequest, zone: str, dnsfunc: DnsFunc, key_name: str, alteration: str
) -> None:
    key: DkimKey = request.getfixturevalue(key_name)
    message = from_domain(zone)
    signed = DkimSigner(KeyRing([key]), HEADERS).sign(message, domain=zone) + message
    assert verifies(signed, dnsfunc)

    altered = ALTERATIONS[alteration](signed)

    assert altered != signed
    assert not verifies(altered, dnsfunc)


def test_changes_relays_make_in_transit_keep_the_signature_valid(
    rsa_key: DkimKey, zone: str, dnsfunc: DnsFunc
) -> None:
    """relaxed/relaxed tolerates re-folding and white space; Received fields are not signed."""
    message = from_domain(zone)
    signed = DkimSigner(KeyRing([rsa_key]), HEADERS).sign(message, domain=zone) + message

    refolded = signed.replace(b"Subject: Your quote", b"Subject:  Your\r\n\tquote  ")
    relayed = b"Received: from mailgate by relay.example; Mon, 3 Mar 2025 10:00:01 +0000\r\n"

    assert verifies(refolded, dnsfunc)
    assert verifies(relayed + signed, dnsfunc)  # trace fields added on the way are not signed


def test_headers_signed_once_per_occurrence_and_from_once_more(
    rsa_key: DkimKey, zone: str, dnsfunc: DnsFunc
) -> None:
    message = b"To: second@customer.example\r\n" + from_domain(zone)

    header = DkimSigner(KeyRing([rsa_key]), HEADERS).sign(message, domain=zone)

    names = signed_names(header)
    assert names.count(b"from") == 2  # one From present, signed twice: over-signing
    assert names.count(b"to") == 2  # both To fields are covered
    assert b"reply-to" not in names  # absent and not over-signed
    assert b"cc" not in names
    assert verifies(header + message, dnsfunc)


def test_from_is_signed_even_if_not_configured(rsa_key: DkimKey, zone: str) -> None:
    header = DkimSigner(KeyRing([rsa_key]), ["subject"]).sign(from_domain(zone), domain=zone)

    assert signed_names(header) == [b"from", b"subject", b"from"]


@pytest.mark.parametrize("bad", ["received", "Return-Path", "bcc", "dkim-signature"])
def test_header_that_must_not_be_signed_is_a_config_error(bad: str) -> None:
    with pytest.raises(ConfigError, match=rf"dkim\.headers: `{bad.lower()}` must not be signed"):
        DkimSigner(KeyRing(), [*HEADERS, bad])


def test_both_keys_of_a_domain_sign_rsa_first(
    rsa_key: DkimKey, ed_key: DkimKey, zone: str, dnsfunc: DnsFunc, tmp_path: Path
) -> None:
    message = from_domain(zone)

    headers = DkimSigner(load_keys(tmp_path / "keys"), HEADERS).sign(message, domain=zone)

    signed = headers + message
    second = headers.index(b"DKIM-Signature: ", 1)
    assert tags(headers[:second])[b"a"] == b"rsa-sha256"
    assert tags(headers[second:])[b"a"] == b"ed25519-sha256"
    assert verifies(signed, dnsfunc, idx=0)
    assert verifies(signed, dnsfunc, idx=1)


# --- which key: exact domain, nearest parent, none ----------------------------------------------


def test_subdomain_falls_back_to_the_nearest_parent_key(
    tmp_path: Path, zone: str, publish: Publish, dnsfunc: DnsFunc
) -> None:
    top = generate_key(tmp_path, zone, selector="mailgate")
    middle = generate_key(tmp_path, f"eu.{zone}", selector="mailgate")
    publish(top)
    publish(middle)
    ring = load_keys(tmp_path)
    signer = DkimSigner(ring, HEADERS)
    sender = f"sales.eu.{zone}"
    message = MESSAGE.replace(b"example.test", sender.encode())

    header = signer.sign(message, domain=sender)

    assert ring.for_domain(sender) == (middle,)
    assert ring.for_domain(f"other.{zone}") == (top,)
    assert ring.for_domain(zone.upper() + ".") == (top,)  # case and trailing dot do not matter
    assert tags(header)[b"d"] == f"eu.{zone}".encode()
    assert verifies(header + message, dnsfunc)


def test_domain_without_a_key_is_left_unsigned(rsa_key: DkimKey, zone: str) -> None:
    signer = DkimSigner(KeyRing([rsa_key]), HEADERS)
    message = MESSAGE.replace(b"example.test", b"elsewhere.test")

    assert signer.has_key(f"a.{zone}")
    assert not signer.has_key("elsewhere.test")
    assert not signer.has_key(zone.split(".")[-1])  # the TLD is never a fallback
    assert not signer.has_key("not a domain")
    assert signer.sign(message, domain="elsewhere.test") == b""


def test_empty_or_missing_key_dir_signs_nothing(tmp_path: Path) -> None:
    signer = DkimSigner(load_keys(tmp_path / "absent"), HEADERS)

    assert signer.sign(MESSAGE, domain="example.test") == b""
    assert len(load_keys(tmp_path)) == 0


def test_from_settings_signs_with_every_key_and_not_when_disabled(
    tmp_path: Path, zone: str, publish: Publish, dnsfunc: DnsFunc
) -> None:
    """``dkim.selector`` only names new keys: a key made with another selector signs too."""
    for selector in ("mailgate", "2025"):
        publish(generate_key(tmp_path, zone, selector=selector))
    message = from_domain(zone)
    enabled = DkimSettings(key_dir=tmp_path)
    disabled = DkimSettings(key_dir=tmp_path, enabled=False)

    headers = DkimSigner.from_settings(enabled).sign(message, domain=zone)

    assert headers.count(b"DKIM-Signature: ") == 2
    assert verifies(headers + message, dnsfunc, idx=0)
    assert verifies(headers + message, dnsfunc, idx=1)
    assert DkimSigner.from_settings(disabled).sign(message, domain=zone) == b""


def test_load_keys_can_pick_one_selector(tmp_path: Path, zone: str) -> None:
    current = generate_key(tmp_path, zone, selector="2025")
    generate_key(tmp_path, zone, selector="2024")

    ring = load_keys(tmp_path, selector="2025")

    assert [k.record_value for k in ring.for_domain(zone)] == [current.record_value]


def test_signing_is_thread_safe(
    rsa_key: DkimKey, ed_key: DkimKey, zone: str, fixed_time: None, tmp_path: Path
) -> None:
    """Many threads at once produce exactly what one thread does (both algorithms are
    deterministic, and the clock is frozen)."""
    signer = DkimSigner(load_keys(tmp_path / "keys"), HEADERS)
    messages = [from_domain(zone) + f"line {i}\r\n".encode() for i in range(64)]
    expected = [signer.sign(m, domain=zone) for m in messages]

    with ThreadPoolExecutor(max_workers=8) as pool:
        got = list(pool.map(lambda m: signer.sign(m, domain=zone), messages * 4))

    assert got == expected * 4
    assert len(set(expected)) == len(messages)


def test_signatures_dkimpy_rejects_are_caught_when_the_signer_is_built(
    rsa_key: DkimKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If a bug here (or a dkimpy upgrade) made our signatures fail its verifier, fail loudly;
    with the dkimpy the signer reproduces installed, the message blames the signer alone."""

    def wrong(self: DkimKey, digest: bytes) -> bytes:
        return b"\x00" * 256

    monkeypatch.setattr(DkimKey, "_sign_digest", wrong)

    with pytest.raises(RuntimeError) as caught:
        DkimSigner(KeyRing([rsa_key]), HEADERS)

    message = str(caught.value)
    assert f"the rsa-sha256 key for {rsa_key.record_name} does not verify" in message
    assert message.endswith("a bug in gateway/dkim.py's signer; please report it with this message")


def test_self_check_suspects_another_dkimpy_version_too(
    rsa_key: DkimKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(DkimKey, "_sign_digest", lambda self, digest: b"\x00" * 256)
    monkeypatch.setattr(gateway_dkim, "_dkimpy_version", lambda: "9.9")

    with pytest.raises(RuntimeError, match=r"signer, or dkimpy 9\.9, which is not the 1\.1\.8"):
        DkimSigner(KeyRing([rsa_key]), HEADERS)


@pytest.mark.parametrize(("domain", "selector"), [(LONG_DOMAIN, "e"), ("x.test", LONG_SELECTOR)])
def test_self_check_looks_the_key_up_at_its_own_name_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, domain: str, selector: str
) -> None:
    """Folded as dkimpy's fold() does, a long d= or s= is cut and names another record: the
    self-check's lookup, which answers at the key's record name only, fails the signer at
    start-up (it used to answer at any name, so a cut selector passed)."""

    def dkimpys_fold(tag_list: bytes) -> bytes:
        folded: bytes = dkim.fold(tag_list, namelen=len("DKIM-Signature"))
        return folded

    key = generate_key(tmp_path, domain, selector=selector, algorithm="ed25519-sha256")
    monkeypatch.setattr(gateway_dkim, "_fold_tags", dkimpys_fold)

    with pytest.raises(RuntimeError, match=r"does not verify \(.+\); mail signed with it would"):
        DkimSigner(KeyRing([key]), HEADERS)


# --- key files ------------------------------------------------------------------------------------


def test_generated_key_file_is_private_and_loads_back(tmp_path: Path) -> None:
    key = generate_key(tmp_path, "Example.TEST.", selector="Mailgate", algorithm="ed25519-sha256")
    path = tmp_path / "example.test" / "mailgate.ed25519.pem"

    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert (key.domain, key.selector) == ("example.test", "mailgate")
    assert [k.record_value for k in load_keys(tmp_path)] == [key.record_value]
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temp files left


def test_txt_record(tmp_path: Path) -> None:
    rsa = generate_key(tmp_path, "example.test", selector="s")
    ed = generate_key(tmp_path, "example.test", selector="e", algorithm="ed25519-sha256")

    assert rsa.record_name == "s._domainkey.example.test."
    assert rsa.record_value.startswith("v=DKIM1; k=rsa; p=MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8A")
    name, _, strings = rsa.txt_record().partition(" IN TXT ")
    assert name == rsa.record_name
    chunks = re.findall(r'"([^"]*)"', strings)
    assert len(chunks) == 2  # a 2048-bit key's record is longer than one 255-octet string
    assert all(len(chunk) <= 255 for chunk in chunks)
    assert "".join(chunks) == rsa.record_value
    assert strings == " ".join(f'"{chunk}"' for chunk in chunks)
    assert ed.txt_record() == f'e._domainkey.example.test. IN TXT "{ed.record_value}"'
    assert len(ed.record_value) == len("v=DKIM1; k=ed25519; p=") + 44  # 32 bytes, base64


def test_keygen_refuses_to_overwrite_an_existing_key(tmp_path: Path) -> None:
    generate_key(tmp_path, "example.test", selector="mailgate")
    path = tmp_path / "example.test" / "mailgate.rsa.pem"
    before = path.read_bytes()

    with pytest.raises(KeyExistsError, match=r"mailgate\.rsa\.pem: .*already exists.*--force"):
        generate_key(tmp_path, "example.test", selector="mailgate")
    # One DNS name holds one key, so the other algorithm under the same selector is refused too.
    with pytest.raises(KeyExistsError, match=r"mailgate\.rsa\.pem"):
        generate_key(tmp_path, "example.test", selector="mailgate", algorithm="ed25519-sha256")

    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["mailgate.rsa.pem"]


def test_keygen_with_force_replaces_the_key(tmp_path: Path) -> None:
    old = generate_key(tmp_path, "example.test", selector="mailgate")

    new = generate_key(
        tmp_path, "example.test", selector="mailgate", algorithm="ed25519-sha256", force=True
    )

    directory = tmp_path / "example.test"
    assert sorted(p.name for p in directory.iterdir()) == ["mailgate.ed25519.pem"]
    assert [k.record_value for k in load_keys(tmp_path)] == [new.record_value]
    assert new.record_value != old.record_value


@pytest.mark.parametrize(
    ("domain", "selector"), [("../etc", "s"), ("example.test", "../s"), ("a b", "s"), ("x", "")]
)
def test_keygen_refuses_names_that_are_not_dns_names(
    tmp_path: Path, domain: str, selector: str
) -> None:
    with pytest.raises(ValueError, match="not a"):
        generate_key(tmp_path, domain, selector=selector, algorithm="ed25519-sha256")
    assert list(tmp_path.iterdir()) == []


def test_keygen_refuses_short_rsa_keys(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least 1024 bits"):
        generate_key(tmp_path, "example.test", selector="s", bits=512)


BAD_KEY_FILES: dict[str, Callable[[Path], bytes]] = {
    "garbage": lambda _: b"this is not a key\n",
    "truncated": lambda good: good.read_bytes()[:300],
    "empty": lambda _: b"",
}


@pytest.mark.parametrize("damage", BAD_KEY_FILES, ids=list(BAD_KEY_FILES))
def test_corrupt_key_file_is_a_config_error_naming_the_file_and_the_fix(
    tmp_path: Path, damage: str
) -> None:
    generate_key(tmp_path, "example.test", selector="mailgate")
    path = tmp_path / "example.test" / "mailgate.rsa.pem"
    path.write_bytes(BAD_KEY_FILES[damage](path))

    with pytest.raises(ConfigError) as caught:
        load_keys(tmp_path)

    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: not a valid PEM private key")
    assert "mailgate dkim keygen example.test --selector mailgate --force" in message


def test_key_of_the_wrong_type_for_its_file_name_is_a_config_error(tmp_path: Path) -> None:
    generate_key(tmp_path, "example.test", selector="mailgate", algorithm="ed25519-sha256")
    directory = tmp_path / "example.test"
    (directory / "mailgate.ed25519.pem").rename(directory / "mailgate.rsa.pem")

    with pytest.raises(ConfigError, match=r"mailgate\.rsa\.pem: holds a .*Ed25519.*rename"):
        load_keys(tmp_path)


def test_misnamed_pem_file_is_a_config_error(tmp_path: Path) -> None:
    generate_key(tmp_path, "example.test", selector="mailgate")
    directory = tmp_path / "example.test"
    (directory / "mailgate.rsa.pem").rename(directory / "dkim.pem")

    with pytest.raises(ConfigError, match=r"dkim\.pem: not a key file name; rename it"):
        load_keys(tmp_path)


def test_unreadable_key_file_is_a_config_error(tmp_path: Path) -> None:
    generate_key(tmp_path, "example.test", selector="mailgate")
    path = tmp_path / "example.test" / "mailgate.rsa.pem"
    path.unlink()
    path.mkdir()  # reading a directory fails even for root, unlike a chmod 000 file

    with pytest.raises(ConfigError, match=r"mailgate\.rsa\.pem: cannot read the DKIM key"):
        load_keys(tmp_path)


def test_other_files_in_the_key_dir_are_ignored(tmp_path: Path) -> None:
    key = generate_key(tmp_path, "example.test", selector="mailgate")
    (tmp_path / "README").write_text("keys live here\n")
    (tmp_path / "lost+found").mkdir()
    (tmp_path / "example.test" / "mailgate.txt").write_text(key.txt_record())

    assert list(load_keys(tmp_path)) == [key]
