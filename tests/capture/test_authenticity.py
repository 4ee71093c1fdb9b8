"""DKIM, DMARC, ARC and the Authentication-Results header, against keys published in NSD.

dkimpy's own test messages and keys, the canonicalisation vectors of flanker's corpus (signed
here from their *expected* canonical forms, so the verifier must canonicalise the originals
exactly so to pass), and the spoofing cases: a second From, a valid signature of an unaligned
domain, a replayed message with text appended under ``l=``, short keys and ``rsa-sha1``.
"""

from __future__ import annotations

import base64
import hashlib
import re
import subprocess
from pathlib import Path

import authres
import dkim
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from gateway.authenticity import (
    AuthenticityChecker,
    CachingResolver,
    DkimVerifier,
    authserv_id_of,
    organizational_domain,
    remove_our_results,
)
from gateway.dkim import DkimKey
from tests.capture.conftest import sign
from tests.servers.dns import AuthoritativeDns, txt_record

DATA = Path(__file__).parent / "data" / "dkimpy"
FLANKER = (
    Path(__file__).resolve().parents[3] / "shared" / "corpora" / "flanker" / "messages" / "dkim"
)
RFC8463_KEY = "v=DKIM1; k=ed25519; p=11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo="


@pytest.fixture(scope="module")
def keys(
    capture_dns: AuthoritativeDns, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, bytes]:
    """dkimpy's test keys published as dkimpy's tests publish them, plus a 512-bit key."""
    small = tmp_path_factory.mktemp("small") / "512.pem"
    subprocess.run(
        ["openssl", "genrsa", "-traditional", "-out", str(small), "512"],
        check=True,
        capture_output=True,
    )
    small_key = serialization.load_pem_private_key(small.read_bytes(), password=None)
    assert isinstance(small_key, rsa.RSAPrivateKey)
    small_public = small_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    capture_dns.publish(
        "example.com",
        [
            txt_record("test._domainkey", (DATA / "test.txt").read_text().strip()),
            txt_record(
                "small._domainkey", "v=DKIM1; k=rsa; p=" + base64.b64encode(small_public).decode()
            ),
            txt_record("revoked._domainkey", "v=DKIM1; k=rsa; p="),
        ],
    )
    capture_dns.publish(
        "football.example.com",
        [
            txt_record("test._domainkey", (DATA / "test.txt").read_text().strip()),
            txt_record("brisbane._domainkey", RFC8463_KEY),
        ],
    )
    # A zone NSD is configured for but has no data for: every query below it gets SERVFAIL.
    status, output = capture_dns._control("addzone", "servfail.example.org", "test")
    assert status == 0, output
    return {"test": (DATA / "test.private").read_bytes(), "small": small.read_bytes()}


@pytest.fixture
def verifier(capture_dns: AuthoritativeDns) -> DkimVerifier:
    return DkimVerifier(CachingResolver(capture_dns.resolver(), max_ttl=0))


MESSAGE = (DATA / "test.message").read_bytes()


@pytest.mark.parametrize("header", [b"simple", b"relaxed"])
@pytest.mark.parametrize("body", [b"simple", b"relaxed"])
def test_dkimpy_signed_messages_pass(
    keys: dict[str, bytes], verifier: DkimVerifier, header: bytes, body: bytes
) -> None:
    signature = dkim.sign(
        MESSAGE, b"test", b"example.com", keys["test"], canonicalize=(header, body)
    )
    [result] = verifier.verify_all(signature + MESSAGE)
    assert (result.result, result.domain, result.selector) == ("pass", "example.com", "test")
    [altered] = verifier.verify_all(signature + MESSAGE + b"foo\r\n")
    assert altered.result == "fail"
    assert altered.reason == "the body hash did not verify"


def test_rfc8463_message_verifies_both_signatures(
    keys: dict[str, bytes], verifier: DkimVerifier
) -> None:
    # RFC 8463 appendix A: one ed25519 and one rsa signature of football.example.com.
    results = verifier.verify_all((DATA / "rfc6376.signed.msg").read_bytes())
    assert [(r.algorithm, r.selector, r.result) for r in results] == [
        ("ed25519-sha256", "brisbane", "pass"),
        ("rsa-sha256", "test", "pass"),
    ]


def test_every_signature_is_verified_not_only_the_first(
    keys: dict[str, bytes], verifier: DkimVerifier
) -> None:
    good = dkim.sign(MESSAGE, b"test", b"example.com", keys["test"])
    stale = good.replace(b"bh=", b"bh=AAAA", 1)  # a broken signature above a good one
    results = verifier.verify_all(stale + good + MESSAGE)
    assert [(r.result, r.reason) for r in results] == [
        ("fail", "the body hash did not verify"),
        ("pass", ""),
    ]


def test_length_tag_short_of_the_body_is_not_a_pass(
    keys: dict[str, bytes], verifier: DkimVerifier
) -> None:
    signature = dkim.sign(MESSAGE, b"test", b"example.com", keys["test"], length=True)
    [whole] = verifier.verify_all(signature + MESSAGE)
    assert whole.result == "pass"  # l= covering the whole body is harmless
    # RFC 6376 §8.2: anyone may append to a message signed with l=; dkimpy still says "valid".
    replayed = signature + MESSAGE + b"Click https://evil.test/ to pay now.\r\n"
    assert dkim.verify(replayed, dnsfunc=lambda name, timeout=5: (DATA / "test.txt").read_bytes())
    [result] = verifier.verify_all(replayed)
    assert result.result == "policy"
    assert "l= signs only" in result.reason


def test_short_keys_fail_and_sha1_is_refused(
    keys: dict[str, bytes], verifier: DkimVerifier
) -> None:
    small = dkim.sign(MESSAGE, b"small", b"example.com", keys["small"])
    assert dkim.DKIM(small + MESSAGE, minkey=256).verify(
        dnsfunc=lambda name, timeout=5: CachingResolver(verifier.resolver.resolver).txt(
            name.decode().rstrip(".")
        )[0]
    )  # a valid signature, just with a 512-bit key
    [result] = verifier.verify_all(small + MESSAGE)
    assert result.result == "fail"
    assert "512-bit RSA key is too short" in result.reason
    sha1 = dkim.sign(
        MESSAGE, b"test", b"example.com", keys["test"], signature_algorithm=b"rsa-sha1"
    )
    [result] = verifier.verify_all(sha1 + MESSAGE)
    assert result.result == "policy"


def test_missing_revoked_and_unreachable_keys(
    keys: dict[str, bytes], verifier: DkimVerifier
) -> None:
    signature = dkim.sign(MESSAGE, b"test", b"example.com", keys["test"])
    cases = {
        b"s=nosuch": ("permerror", "no key record"),
        b"s=revoked": ("permerror", "revoked"),
    }
    for selector, (word, reason) in cases.items():
        [result] = verifier.verify_all(signature.replace(b"s=test", selector) + MESSAGE)
        assert result.result == word
        assert reason in result.reason
    unreachable = signature.replace(b"d=example.com", b"d=servfail.example.org")
    unreachable = unreachable.replace(b"i=@example.com", b"i=@servfail.example.org")
    [result] = verifier.verify_all(unreachable + MESSAGE)
    assert result.result == "temperror"


# -- flanker's canonicalisation vectors ---------------------------------------------------------

VECTORS = sorted(p.name.split(".")[1] for p in FLANKER.glob("email.*") if p.read_bytes().strip())


def _fields(block: bytes) -> list[bytes]:
    """Header fields of a canonical header block, continuation lines kept with their field."""
    fields: list[bytes] = []
    for line in block.split(b"\r\n"):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += b"\r\n" + line
        elif line:
            fields.append(line)
    return fields


@pytest.mark.parametrize("number", VECTORS)
@pytest.mark.parametrize("method", ["simple", "relaxed"])
def test_flanker_canonicalisation_vectors(
    keys: dict[str, bytes], verifier: DkimVerifier, number: str, method: str
) -> None:
    """Sign the vector's expected canonical form by hand; the original must then verify."""
    expected = (FLANKER / f"{method}.expected.{number}").read_bytes()
    head, _, body = expected.partition(b"\r\n\r\n")
    fields = _fields(head)
    names = [f.split(b":", 1)[0].strip().lower() for f in fields]
    if b"from" not in names:
        pytest.fail(f"vector {number} has no From header")
    value = (
        f"v=1; a=rsa-sha256; c={method}/{method}; d=example.com; s=test; "
        f"h={':'.join(n.decode() for n in names)}; "
        f"bh={base64.b64encode(hashlib.sha256(body).digest()).decode()}; b="
    ).encode()
    # RFC 6376 §3.7: the signature field itself is hashed last, canonicalised, b= empty, no CRLF.
    own = b"dkim-signature:" + value if method == "relaxed" else b"DKIM-Signature: " + value
    data = b"".join(f + b"\r\n" for f in fields) + own
    private = serialization.load_pem_private_key(keys["test"], password=None)
    assert isinstance(private, rsa.RSAPrivateKey)
    signed = base64.b64encode(private.sign(data, padding.PKCS1v15(), hashes.SHA256()))
    original = re.sub(rb"(?<!\r)\n", b"\r\n", (FLANKER / f"email.{number}").read_bytes())
    [result] = verifier.verify_all(b"DKIM-Signature: " + value + signed + b"\r\n" + original)
    assert result.result == "pass", result.reason


def test_all_usable_flanker_vectors_are_used() -> None:
    if not VECTORS:
        pytest.skip("../shared/corpora is not beside this checkout")
    # email.01 is empty (nothing to sign); the others all carry a From header.
    assert len(VECTORS) == 20


# -- whole verdicts: DMARC alignment and the spoofing cases -------------------------------------


@pytest.fixture
def checker(company_zone: AuthoritativeDns, keys: dict[str, bytes]) -> AuthenticityChecker:
    return AuthenticityChecker(
        CachingResolver(company_zone.resolver(), max_ttl=0), authserv_id="gw.example.test"
    )


BCC = (
    b"From: Rita Rep <rep@company.test>\r\nTo: Carla <carla@customer.test>\r\n"
    b"Subject: Offer\r\nDate: Mon, 8 Jan 2024 10:00:00 +0000\r\nMessage-ID: <o1@company.test>\r\n"
    b"\r\nHello Carla,\r\nhere is our offer.\r\n"
)


def test_aligned_dkim_pass_is_dmarc_pass(checker: AuthenticityChecker, rep_key: DkimKey) -> None:
    verdicts = checker.verify(
        sign(BCC, rep_key), ip="127.0.0.1", helo="x", mail_from="rep@company.test"
    )
    # SPF fails (only 192.0.2.1 may send for company.test) but DKIM aligns: DMARC passes.
    assert verdicts.words() == {"spf": "fail", "dkim": "pass", "dmarc": "pass", "arc": "none"}
    assert verdicts.aligned == ("dkim",)
    assert verdicts.dmarc.policy == "reject"
    header = verdicts.header()
    parsed = authres.AuthenticationResultsHeader.parse(header.replace("\r\n\t", " ").strip())
    assert parsed.authserv_id == "gw.example.test"
    assert [(r.method, r.result) for r in parsed.results] == [
        ("spf", "fail"),
        ("dkim", "pass"),
        ("dmarc", "pass"),
        ("arc", "none"),
    ]
    assert "header.d=company.test header.s=s1" in header


def test_aligned_spf_pass_alone_is_enough(checker: AuthenticityChecker) -> None:
    verdicts = checker.verify(
        BCC, ip="192.0.2.1", helo="mail.company.test", mail_from="rep@company.test"
    )
    assert verdicts.words()["spf"] == "pass"
    assert verdicts.aligned == ("spf",)


def test_valid_signature_of_an_unaligned_domain_proves_nothing(
    checker: AuthenticityChecker, capture_dns: AuthoritativeDns, tmp_path: Path
) -> None:
    from gateway.dkim import generate_key

    evil_key = generate_key(tmp_path, "evil.test", selector="e1")
    capture_dns.publish(
        "evil.test",
        [
            '@ IN TXT "v=spf1 ip4:127.0.0.0/8 -all"',
            txt_record("_dmarc", "v=DMARC1; p=none"),
            txt_record("e1._domainkey", evil_key.record_value),
        ],
    )
    verdicts = checker.verify(
        sign(BCC, evil_key), ip="127.0.0.1", helo="x", mail_from="bounce@evil.test"
    )
    assert [(r.domain, r.result) for r in verdicts.dkim] == [("evil.test", "pass")]
    assert verdicts.words()["spf"] == "pass"  # for evil.test, the envelope domain
    assert verdicts.dmarc.result == "fail"
    assert verdicts.aligned == ()


def test_second_from_added_above_a_signed_one_breaks_it(
    checker: AuthenticityChecker, rep_key: DkimKey
) -> None:
    forged = b"From: Mallory <mallory@evil.test>\r\n" + sign(BCC, rep_key)
    verdicts = checker.verify(forged, ip="127.0.0.1", helo="x", mail_from="")
    assert [r.result for r in verdicts.dkim] == ["fail"]
    assert verdicts.dmarc.result == "permerror"  # RFC 7489 §6.6.1: which From?
    assert verdicts.aligned == ()


def test_replayed_message_with_text_under_l_is_not_aligned(
    checker: AuthenticityChecker, rep_key: DkimKey
) -> None:
    pem = rep_key.private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    signature = dkim.sign(BCC, b"s1", b"company.test", pem, length=True)
    replay = signature + BCC + b"P.S. wire the money to IBAN XX00 EVIL.\r\n"
    verdicts = checker.verify(replay, ip="127.0.0.1", helo="x", mail_from="rep@company.test")
    assert verdicts.words()["dkim"] == "policy"
    assert verdicts.aligned == ()
    untouched = checker.verify(
        signature + BCC, ip="127.0.0.1", helo="x", mail_from="rep@company.test"
    )
    assert untouched.aligned == ("dkim",)


def test_arc_chain_is_verified(checker: AuthenticityChecker, rep_key: DkimKey) -> None:
    pem = rep_key.private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    message = (
        b"Authentication-Results: company.test; spf=pass smtp.mailfrom=rep@company.test\r\n" + BCC
    )
    arc = b"".join(dkim.arc_sign(message, b"s1", b"company.test", pem, b"company.test"))
    assert (
        checker.verify(arc + message, ip="127.0.0.1", helo="x", mail_from="").arc.result == "pass"
    )
    tampered = arc + message.replace(b"our offer", b"our new offer")
    assert checker.verify(tampered, ip="127.0.0.1", helo="x", mail_from="").arc.result == "fail"


def test_forged_results_with_our_authserv_id_are_removed() -> None:
    raw = (
        b"Authentication-Results: GW.example.test (forged);\r\n"
        b"\tdkim=pass header.d=company.test\r\n"
        b"Authentication-Results: mx.google.com; spf=pass smtp.mailfrom=x@y.test\r\n" + BCC
    )
    cleaned = remove_our_results(raw, "gw.example.test")
    assert b"forged" not in cleaned
    assert b"mx.google.com" in cleaned
    assert cleaned.endswith(BCC)
    assert authserv_id_of(' "gw.example.test" 1 (comment (nested)); none') == "gw.example.test"


def test_organizational_domain_uses_the_public_suffix_list() -> None:
    assert organizational_domain("a.b.example.co.uk") == "example.co.uk"
    assert organizational_domain("rep.sales.company.test") == "company.test"
    assert organizational_domain("example.com") == "example.com"


def test_organizational_domain_counts_the_private_section_and_normalises() -> None:
    # The list's private section (hosting platforms' suffixes) counts, as DMARC checkers do.
    assert organizational_domain("x.y.s3.amazonaws.com") == "y.s3.amazonaws.com"
    assert organizational_domain("co.uk") == "co.uk"
    assert organizational_domain("Mail.Example.COM.") == "example.com"
