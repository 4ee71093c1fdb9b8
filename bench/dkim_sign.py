"""DKIM signing rate: dkimpy's stock signer against gateway.dkim's, for RSA-2048 and ed25519.

Signs one 10 KB message over and over (up to --count signatures or --seconds per variant,
whichever ends first) and prints JSON: signatures per second for each, and the speed-up. The
bare key operations (pure-Python RSA vs OpenSSL; PyNaCl vs cryptography ed25519) are measured
too, since they are what the two signers differ in. Run from the repository root:
``python -m bench.dkim_sign [--count N] [--seconds S]``.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dkim
import dkim.crypto
import nacl.signing
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from gateway.dkim import DkimKey, DkimSigner, KeyRing, generate_key
from gateway.settings import DkimSettings

DOMAIN = "example.com"


def message(size: int = 10 * 1024) -> bytes:
    """A plain-text message of ``size`` bytes with the usual headers, CRLF line ends."""
    head = (
        b"From: Sales Rep <rep@example.com>\r\n"
        b"To: Customer <someone@customer.example>\r\n"
        b"Cc: boss@example.com\r\n"
        b"Subject: Your quote for the spring order\r\n"
        b"Date: Mon, 03 Mar 2025 10:00:00 +0000\r\n"
        b"Message-ID: <bench-0001@example.com>\r\n"
        b"MIME-Version: 1.0\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: 7bit\r\n"
        b"\r\n"
    )
    line = b"Thanks for your order; the items ship next week,  as agreed on the phone.\r\n"
    body = line * ((size - len(head)) // len(line) + 1)
    return (head + body)[: size - 2] + b"\r\n"


def rate(fn: Callable[[], object], *, count: int, seconds: float) -> dict[str, float]:
    """Call ``fn`` until ``count`` calls or ``seconds`` have passed; report calls per second."""
    for _ in range(3):  # warm caches and lazy imports outside the timed loop
        fn()
    done = 0
    start = time.perf_counter()
    deadline = start + seconds
    while done < count:
        fn()
        done += 1
        if time.perf_counter() >= deadline:
            break
    elapsed = time.perf_counter() - start
    return {"signs": done, "seconds": round(elapsed, 3), "per_second": round(done / elapsed, 1)}


def compare(
    key: DkimKey, msg: bytes, stock_key: bytes, *, count: int, seconds: float
) -> dict[str, Any]:
    """Stock ``dkim.sign`` and our DkimSigner on the same message, key and header list."""
    headers = DkimSettings().headers
    signer = DkimSigner(KeyRing([key]), headers)
    # The same h= list our signer uses, so both do the same canonicalisation and hashing work.
    present = {name.lower() for name, _ in dkim.rfc822_parse(msg)[0]}
    include = [h.encode() for h in headers if h.encode() in present] + [b"from"]

    def stock() -> bytes:
        header: bytes = dkim.sign(
            msg,
            key.selector.encode(),
            key.domain.encode(),
            stock_key,
            signature_algorithm=key.algorithm.encode(),
            canonicalize=(b"relaxed", b"relaxed"),
            include_headers=include,
        )
        return header

    def ours() -> bytes:
        return signer.sign(msg, domain=DOMAIN)

    stock_rate = rate(stock, count=count, seconds=seconds)
    our_rate = rate(ours, count=count, seconds=seconds)
    return {
        "dkimpy": stock_rate,
        "mailgate": our_rate,
        "speedup": round(our_rate["per_second"] / stock_rate["per_second"], 2),
    }


def key_operations(
    rsa_key: rsa.RSAPrivateKey, ed_key: ed25519.Ed25519PrivateKey, *, count: int, seconds: float
) -> dict[str, Any]:
    """The bare private-key operations on one SHA-256 digest, without any DKIM work around them."""
    digest = hashlib.sha256(b"canonicalised headers").digest()
    pem = rsa_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    parsed = dkim.crypto.parse_pem_private_key(pem)
    seed = ed_key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    nacl_key = nacl.signing.SigningKey(seed)
    return {
        "rsa_pure_python": rate(
            lambda: dkim.crypto.RSASSA_PKCS1_v1_5_sign(
                hashlib.sha256(b"canonicalised headers"), parsed
            ),
            count=count,
            seconds=seconds,
        ),
        "rsa_openssl": rate(
            lambda: rsa_key.sign(digest, padding.PKCS1v15(), Prehashed(hashes.SHA256())),
            count=count * 10,
            seconds=seconds,
        ),
        "dkimpy_pem_parse": rate(
            lambda: dkim.crypto.parse_pem_private_key(pem), count=count * 10, seconds=seconds
        ),
        "ed25519_pynacl": rate(lambda: nacl_key.sign(digest), count=count * 10, seconds=seconds),
        "ed25519_cryptography": rate(
            lambda: ed_key.sign(digest), count=count * 10, seconds=seconds
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=2000, help="signatures per variant, at most")
    parser.add_argument("--seconds", type=float, default=5.0, help="time per variant, at most")
    parser.add_argument("--size", type=int, default=10 * 1024, help="message size in bytes")
    args = parser.parse_args()

    msg = message(args.size)
    with tempfile.TemporaryDirectory() as tmp:
        rsa_key = generate_key(Path(tmp), DOMAIN, selector="bench")
        ed_key = generate_key(Path(tmp), DOMAIN, selector="bench-ed", algorithm="ed25519-sha256")
    assert isinstance(rsa_key.private_key, rsa.RSAPrivateKey)
    assert isinstance(ed_key.private_key, ed25519.Ed25519PrivateKey)
    rsa_pem = rsa_key.private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    ed_seed = ed_key.private_key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    bounds = {"count": args.count, "seconds": args.seconds}
    report = {
        "message_bytes": len(msg),
        "limits": bounds,
        "rsa-2048": compare(rsa_key, msg, rsa_pem, **bounds),
        "ed25519": compare(ed_key, msg, base64.b64encode(ed_seed), **bounds),
        "key_operation": key_operations(rsa_key.private_key, ed_key.private_key, **bounds),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
