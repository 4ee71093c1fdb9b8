"""DKIM signing for outgoing mail: per-domain keys on disk, and a signer that prepends signatures.

Keys live at ``<key_dir>/<domain>/<selector>.<rsa|ed25519>.pem`` (PKCS#8 PEM, mode 0600);
:func:`generate_key` writes one and :meth:`DkimKey.txt_record` gives the DNS record to publish,
:func:`load_keys` reads them all into a :class:`KeyRing`. :class:`DkimSigner` signs with relaxed/
relaxed canonicalisation (RFC 6376 §3.4) and returns only the ``DKIM-Signature`` field(s) to put
in front of the message, so a large message is never copied. dkimpy 1.1.8 is the reference: the
field made here is byte for byte the one its ``dkim.sign`` makes for the same key, headers and
time (tests compare them over many messages, and :func:`_self_check` has dkimpy verify one
whenever a signer is built), except where dkimpy's ``fold`` breaks signatures (a d=, i=, s= or
h= value longer than a line; a bare CR or LF at the end with some RSA key sizes), which
:func:`_fold_tags` and :func:`_fold_b` avoid by folding only where RFC 6376 allows. Its signer is
not on the path: around the key operation it spent 142 µs of Python per message (of a gateway
budget near 1.5 ms), canonicalising every header field and parsing a key in pure Python.
:func:`_sign` takes the same steps with dkimpy's canonicalisation functions, for the signed
fields only, and does the key operation natively (RSA in OpenSSL through ``cryptography``,
ed25519 in libsodium through PyNaCl); the body is hashed a chunk at a time, so memory stays flat.
"""

from __future__ import annotations

import base64
import collections
import hashlib
import logging
import os
import re
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import dkim
import nacl.bindings
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from dkim import canonicalization

from gateway.errors import ConfigError, Reject
from gateway.message import BARE_LF
from gateway.settings import DkimSettings

log = logging.getLogger(__name__)

Algorithm = Literal["rsa-sha256", "ed25519-sha256"]
PrivateKey = rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey

# The file name carries the key type so that load_keys never has to guess it from the contents.
_SUFFIX: dict[Algorithm, str] = {"rsa-sha256": "rsa", "ed25519-sha256": "ed25519"}
_ALGORITHM: dict[str, Algorithm] = {suffix: alg for alg, suffix in _SUFFIX.items()}
_KEY_FILE = re.compile(r"^(?P<selector>.+)\.(?P<kind>rsa|ed25519)\.pem$")

# RFC 8301 §3.2: signers MUST use RSA keys of at least 1024 bits and SHOULD use 2048.
MIN_RSA_BITS = 1024
# A DNS TXT character-string holds at most 255 octets (RFC 1035 §3.3); longer values are split.
_TXT_CHUNK = 255
# Selectors and domains become path components as well as DNS names: accept LDH labels only, so
# nothing like "../" can reach the file system (RFC 6376 §3.1 selector syntax; RFC 1123 labels).
_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_NAME = re.compile(rf"^{_LABEL}(?:\.{_LABEL})*$")
# RFC 1035 §2.3.4: a DNS name has at most 255 octets on the wire, 253 characters written out.
# The key record's name <selector>._domainkey.<domain> must fit too, so d= and s= have at most
# 240 characters, and the longest line a signature gives them ("  i=@", d= and ";") stays far
# below the 998 of RFC 5322 §2.1.1.
_MAX_DNS_NAME = 253

# RSASSA-PKCS1-v1_5 (RFC 8017 §8.2) over a SHA-256 digest already computed: Prehashed stops
# OpenSSL hashing it again. Both objects are immutable, so one pair serves every signature.
_PKCS1 = padding.PKCS1v15()
_SHA256_DIGEST = Prehashed(hashes.SHA256())


class KeyExistsError(ConfigError):
    """A key file is in the way; replacing it would break mail signed for its published record."""


class UnsignableMessage(Reject):
    """dkimpy cannot parse the message's header section, so it cannot be signed as it is."""


def normalise_domain(domain: str) -> str:
    """Lower-case ASCII form of a domain (IDNA A-labels, no trailing dot); ``""`` if it is not one.

    >>> normalise_domain("Sales.Example.COM.")
    'sales.example.com'
    """
    name = domain.strip().rstrip(".").lower()
    if not name.isascii():
        try:
            name = name.encode("idna").decode("ascii")
        except UnicodeError:
            return ""
    return name if len(name) <= _MAX_DNS_NAME and _NAME.match(name) else ""


@dataclass(frozen=True)
class DkimKey:
    """One signing key: the ``d=`` domain, ``s=`` selector, algorithm and private key.

    Two keys are equal when they name the same DNS record (domain, selector, algorithm); compare
    :attr:`record_value` to compare the key material.
    """

    domain: str
    selector: str
    algorithm: Algorithm
    private_key: PrivateKey = field(repr=False, compare=False)
    # The libsodium secret key (seed + public key) for ed25519, derived once here rather than on
    # every message; empty for RSA, which OpenSSL signs with private_key itself.
    _sodium_key: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        sodium_key = b""
        if self.algorithm == "rsa-sha256":
            if not isinstance(self.private_key, rsa.RSAPrivateKey):
                raise TypeError("an rsa-sha256 DkimKey needs an RSA private key")
        else:
            if not isinstance(self.private_key, ed25519.Ed25519PrivateKey):
                raise TypeError("an ed25519-sha256 DkimKey needs an Ed25519 private key")
            seed = self.private_key.private_bytes(
                serialization.Encoding.Raw,
                serialization.PrivateFormat.Raw,
                serialization.NoEncryption(),
            )
            _public, sodium_key = nacl.bindings.crypto_sign_seed_keypair(seed)
        # A frozen dataclass can only set derived fields this way.
        object.__setattr__(self, "_sodium_key", sodium_key)

    def _sign_digest(self, digest: bytes) -> bytes:
        """The ``b=`` signature of a SHA-256 digest of the canonicalised header fields."""
        key = self.private_key
        if isinstance(key, rsa.RSAPrivateKey):
            # PKCS#1 v1.5 is deterministic: this is what dkimpy's pure-Python RSA computes.
            return key.sign(digest, _PKCS1, _SHA256_DIGEST)
        # RFC 8463 §3: ed25519-sha256 signs the SHA-256 digest (PureEdDSA), as dkimpy does;
        # crypto_sign returns the 64-byte signature followed by the message.
        signed: bytes = nacl.bindings.crypto_sign(digest, self._sodium_key)
        return signed[:64]

    @property
    def record_name(self) -> str:
        """The DNS name the public key is published at (RFC 6376 §3.6.2.1), fully qualified.

        >>> key.record_name
        'mailgate._domainkey.example.com.'
        """
        return f"{self.selector}._domainkey.{self.domain}."

    @property
    def record_value(self) -> str:
        """The TXT record's text as one string (RFC 6376 §3.6.1; RFC 8463 §4.2 for ed25519).

        >>> key.record_value
        'v=DKIM1; k=rsa; p=MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEAt0…'
        """
        if isinstance(self.private_key, rsa.RSAPrivateKey):
            # p= is the DER SubjectPublicKeyInfo, base64 (RFC 6376 §3.6.1).
            der = self.private_key.public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            return f"v=DKIM1; k=rsa; p={base64.b64encode(der).decode('ascii')}"
        raw = self.private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        return f"v=DKIM1; k=ed25519; p={base64.b64encode(raw).decode('ascii')}"

    def txt_record(self) -> str:
        """The record as a zone-file line, the value split into ≤255-octet strings.

        >>> key.txt_record()
        'mailgate._domainkey.example.com. IN TXT "v=DKIM1; k=rsa; p=MIIB…" "…IDAQAB"'
        """
        value = self.record_value
        chunks = [value[i : i + _TXT_CHUNK] for i in range(0, len(value), _TXT_CHUNK)]
        return f"{self.record_name} IN TXT " + " ".join(f'"{chunk}"' for chunk in chunks)

    @property
    def file_name(self) -> str:
        """``<selector>.<rsa|ed25519>.pem``, the key's file name inside its domain's directory."""
        return f"{self.selector}.{_SUFFIX[self.algorithm]}.pem"


class KeyRing:
    """The signing keys by domain, with the nearest-parent fallback of :meth:`for_domain`."""

    def __init__(self, keys: Iterable[DkimKey] = ()) -> None:
        by_domain: dict[str, list[DkimKey]] = collections.defaultdict(list)
        for key in keys:
            by_domain[key.domain].append(key)
        # RSA first: verifiers that only look at the topmost signature (dkimpy's verify() does)
        # all know RSA, while ed25519 support is still patchy (RFC 8463 §1 suggests signing both).
        self._keys = {
            domain: tuple(sorted(found, key=lambda k: (k.algorithm != "rsa-sha256", k.selector)))
            for domain, found in by_domain.items()
        }

    def for_domain(self, domain: str) -> tuple[DkimKey, ...]:
        """The keys to sign mail from ``domain`` with: its own, else the nearest parent's.

        A parent's signature is as good for DMARC as the domain's own under relaxed alignment
        (RFC 7489 §3.1.1, the default ``adkim=r``): ``d=example.com`` aligns with
        ``From: rep@sales.example.com``. So one key at the organisational domain covers all its
        subdomains; a subdomain that publishes ``adkim=s`` needs a key of its own. The bare
        top-level label is never tried. Returns ``()`` when nothing fits.

        >>> ring.for_domain("sales.example.com")
        (DkimKey(domain='example.com', selector='mailgate', algorithm='rsa-sha256'),)
        """
        name = normalise_domain(domain)
        if not name:
            return ()
        if name in self._keys:
            return self._keys[name]
        labels = name.split(".")
        for start in range(1, len(labels) - 1):
            parent = ".".join(labels[start:])
            if parent in self._keys:
                return self._keys[parent]
        return ()

    def __iter__(self) -> Iterator[DkimKey]:
        for domain in sorted(self._keys):
            yield from self._keys[domain]

    def __len__(self) -> int:
        return sum(len(keys) for keys in self._keys.values())


def generate_key(
    key_dir: Path,
    domain: str,
    *,
    selector: str,
    algorithm: Algorithm = "rsa-sha256",
    bits: int = 2048,
    force: bool = False,
) -> DkimKey:
    """Create a key for ``domain`` and write it to ``key_dir/<domain>/<selector>.<kind>.pem``.

    The file is written under a temporary name and linked into place, so a reader never sees a
    half-written key, and it is created with mode 0600. An existing key for the same selector
    (of either type: one DNS name holds one key record) is never replaced unless ``force`` is
    true; otherwise :class:`KeyExistsError` says which file is in the way. ``bits`` applies to
    RSA only. Invalid names or sizes raise ``ValueError``.

    >>> generate_key(Path("var/dkim"), "example.com", selector="mailgate").txt_record()
    'mailgate._domainkey.example.com. IN TXT "v=DKIM1; k=rsa; p=MIIB…" "…IDAQAB"'
    """
    name = normalise_domain(domain)
    if not name:
        raise ValueError(f"{domain!r} is not a domain name (letters, digits, hyphens and dots)")
    sel = selector.strip().lower()
    if not _NAME.match(sel):
        raise ValueError(f"{selector!r} is not a valid selector (letters, digits, hyphens, dots)")
    too_long = _record_name_too_long(name, sel)
    if too_long:
        raise ValueError(f"{too_long}; pick a shorter selector")
    if algorithm not in _SUFFIX:
        raise ValueError(f"{algorithm!r} is not one of {', '.join(_SUFFIX)}")
    private_key: PrivateKey
    if algorithm == "rsa-sha256":
        if bits < MIN_RSA_BITS:
            raise ValueError(f"RSA keys must have at least {MIN_RSA_BITS} bits (RFC 8301 §3.2)")
        private_key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    else:
        private_key = ed25519.Ed25519PrivateKey.generate()
    key = DkimKey(domain=name, selector=sel, algorithm=algorithm, private_key=private_key)

    directory = key_dir / name
    path = directory / key.file_name
    others = [directory / f"{sel}.{suffix}.pem" for suffix in _SUFFIX.values()]
    in_the_way = [p for p in others if p.exists()]
    if in_the_way and not force:
        raise KeyExistsError(
            f"{in_the_way[0]}: a key for selector `{sel}` of {name} already exists; keep it, "
            "pick another selector, or pass --force to replace it (then publish the new DNS "
            "record, or mail signed with it will fail DKIM)"
        )
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    pem = private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _write_private(path, pem, replace=force)
    for other in in_the_way:
        if other != path:
            other.unlink()  # the same DNS name cannot publish both keys
    return key


def _write_private(path: Path, data: bytes, *, replace: bool) -> None:
    """Write ``data`` to ``path`` atomically with mode 0600; without ``replace``, never clobber."""
    # mkstemp creates the file 0600 whatever the umask, so the key is never readable by others.
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=".", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        if replace:
            os.replace(tmp, path)
        else:
            try:
                # link() fails if the name exists, so a concurrent keygen cannot be overwritten.
                os.link(tmp, path)
            except FileExistsError:
                raise KeyExistsError(
                    f"{path}: already exists; pass --force to replace it"
                ) from None
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the new name itself durable, not just the data
    finally:
        os.close(dir_fd)


def load_keys(key_dir: Path, *, selector: str | None = None) -> KeyRing:
    """Read every key under ``key_dir`` (only ``selector``'s, if given) into a :class:`KeyRing`.

    A missing ``key_dir`` is an empty ring: the gateway then relays unsigned. Directories whose
    names are not domain names (``lost+found``) and files not ending in ``.pem`` are skipped. A
    ``.pem`` file that is misnamed, unreadable, not a private key, of the wrong type for its
    name, or an RSA key under 1024 bits raises :class:`ConfigError` naming the file and the fix.
    """
    if not key_dir.exists():
        return KeyRing()
    if not key_dir.is_dir():
        raise ConfigError(f"{key_dir}: `dkim.key_dir` must be a directory; fix the option")
    wanted = selector.strip().lower() if selector is not None else None
    keys: list[DkimKey] = []
    for directory in sorted(key_dir.iterdir()):
        if not directory.is_dir() or directory.name.startswith("."):
            continue
        domain = normalise_domain(directory.name)
        if not domain:
            log.warning("dkim: %s is not named after a domain; ignoring it", directory)
            continue
        selectors: dict[str, Path] = {}
        for path in sorted(directory.glob("*.pem")):
            match = _KEY_FILE.match(path.name)
            if not match or not _NAME.match(match["selector"]):
                raise ConfigError(
                    f"{path}: not a key file name; rename it to <selector>.rsa.pem or "
                    "<selector>.ed25519.pem (the selector as published in DNS), or move it away"
                )
            sel = match["selector"]
            if sel in selectors:
                raise ConfigError(
                    f"{path}: selector `{sel}` also has {selectors[sel].name}, but one DNS name "
                    "publishes one key; remove the one that is not in DNS"
                )
            selectors[sel] = path
            too_long = _record_name_too_long(domain, sel)
            if too_long:
                raise ConfigError(
                    f"{path}: {too_long}; generate a key with a shorter selector, publish it, "
                    "and remove this one"
                )
            if wanted is None or sel == wanted:
                keys.append(_read_key(path, domain, sel, _ALGORITHM[match["kind"]]))
    return KeyRing(keys)


def _record_name_too_long(domain: str, selector: str) -> str:
    """Why no receiver could look up the key for ``selector`` of ``domain``, or ``""``.

    The record name ``<selector>._domainkey.<domain>`` must be a DNS name of at most 253
    characters (RFC 1035 §2.3.4), which :data:`_NAME` alone does not limit. Within it, d= and
    s= are at most 240 characters, so every line of the signature stays under RFC 5322's 998.
    """
    record_name = f"{selector}._domainkey.{domain}"
    if len(record_name) <= _MAX_DNS_NAME:
        return ""
    return (
        f"the key's DNS name {record_name} has {len(record_name)} characters, more than the "
        f"{_MAX_DNS_NAME} a DNS name can have (RFC 1035 §2.3.4), so no receiver could look it up"
    )


def _read_key(path: Path, domain: str, selector: str, algorithm: Algorithm) -> DkimKey:
    """Load one PEM file, turning every way it can be wrong into one ConfigError line."""
    fix = (
        f"restore the file, or run `mailgate dkim keygen {domain} --selector {selector} "
        f"{'--ed25519 ' if algorithm == 'ed25519-sha256' else ''}--force` and publish the "
        "new DNS record"
    )
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(
            f"{path}: cannot read the DKIM key ({exc.strerror}); let the gateway's user read it"
        ) from None
    try:
        private_key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise ConfigError(
            f"{path}: the DKIM key is password-protected; store it unencrypted (mode 0600), "
            f"e.g. `openssl pkey -in {path.name} -out {path.name}`"
        ) from None
    except (ValueError, UnsupportedAlgorithm) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else "unreadable"
        raise ConfigError(f"{path}: not a valid PEM private key ({reason}); {fix}") from None
    expected = rsa.RSAPrivateKey if algorithm == "rsa-sha256" else ed25519.Ed25519PrivateKey
    if not isinstance(private_key, expected):
        raise ConfigError(
            f"{path}: holds a {type(private_key).__name__}, but the file name says "
            f"{_SUFFIX[algorithm]}; rename the file to match the key, or {fix}"
        )
    if isinstance(private_key, rsa.RSAPrivateKey) and private_key.key_size < MIN_RSA_BITS:
        raise ConfigError(
            f"{path}: a {private_key.key_size}-bit RSA key is too short to sign with "
            f"(RFC 8301 requires {MIN_RSA_BITS}); {fix}"
        )
    return DkimKey(domain=domain, selector=selector, algorithm=algorithm, private_key=private_key)


# Canonicalise the body this much at a time (cut at a line end), for flat memory on big
# messages: re.sub over text with many matches briefly holds about 18x its input, so 64 KiB
# peaks near 1 MiB, while the throughput is within 10% of 1 MiB chunks.
_BODY_CHUNK = 1 << 16
# A line feed with no carriage return before it (also at the start of a chunk, which follows a
# line feed), or a CRLF with a space or tab before it: the line ends that dkimpy's parser or the
# relaxed body steps change. It also flags a chunk that starts with CRLF, which is harmless.
# Anchored on the rare "\n", this one scan costs less than comparing the counts of "\n" and
# "\r\n" alone did.
_SUSPECT_LINE_END = re.compile(rb"\n(?<![^ \t]\r\n)")
_LINE_END = re.compile(rb"\r?\n")
# A header field name as dkimpy's parser matches it: printable ASCII up to the first colon.
_FIELD_NAME = re.compile(rb"[\x21-\x7e]+?:")
# The same with the rest of its line, when that ends in CRLF or LF and has no other CR: the
# usual field line, taken in one match instead of several Python steps.
_FIELD_LINE = re.compile(rb"([\x21-\x7e]+?):([^\r\n]*)\r?\n")
# What dkimpy puts in b= before signing: 60 characters that force b= onto a line of its own, so
# that adding the real value does not refold the tags before it.
_PLACEHOLDER = b"0" * 60
_SIGNATURE_FIELD = b"DKIM-Signature"
# dkimpy's fold() makes lines of at most 72 characters: the first one shares them with the field
# name (its ``namelen``) and the ": " after it, the others start with the space that folds them.
_FIRST_WIDTH = 72 - len(_SIGNATURE_FIELD)
_WIDTH = 71
# RFC 5322 §2.1.1: a line MUST NOT be longer than 998 characters, CRLF excluded.
_MAX_LINE = 998
# The longest header name that can be signed. Its line in the signature is at most "  h=" and the
# name (a name is never last in h=, From is): two spaces when the line before fitted exactly.
_MAX_NAME_LENGTH = _MAX_LINE - len("  h=")


def _malformed(detail: str) -> UnsignableMessage:
    return UnsignableMessage(
        f"554 5.6.0 The message header is malformed and cannot be DKIM-signed ({detail})",
        code=554,
    )


def _parse_header_section(message: bytes) -> tuple[list[list[bytes]], int]:
    """The header fields as dkimpy's ``rfc822_parse`` reads them, and where the body starts.

    A field is ``[name, rest of its first line, continuation line, …]`` without line ends; the
    value dkimpy holds for it is those pieces after the name, each followed by CRLF. As there, a
    line ends in LF or CRLF, an mbox ``From `` line is skipped, and the header section ends at
    the first empty line or at the end of the message; the body is never looked at. Where
    dkimpy's parser raises, this raises :class:`UnsignableMessage` with the reason (dkimpy's
    text, or "starts with a space" where it fails with an IndexError on a continuation line
    that has no field above it).
    """
    fields: list[list[bytes]] = []
    size = len(message)
    pos = 0
    while pos < size:
        field_line = _FIELD_LINE.match(message, pos)
        if field_line is not None:
            fields.append([field_line[1], field_line[2]])
            pos = field_line.end()
            continue
        # Any other line: continuation lines, the empty line, the last line when it has no
        # line end, lines with a bare CR, "From " lines and malformed lines.
        newline = message.find(b"\n", pos)
        if newline == -1:
            line = message[pos:]
            pos = size
        else:
            end = newline - 1 if newline > pos and message[newline - 1] == 0x0D else newline
            line = message[pos:end]
            pos = newline + 1
        if not line:
            return fields, pos
        if line[0] == 0x09 or line[0] == 0x20:
            if not fields:
                raise _malformed("starts with a space")
            fields[-1].append(line)
            continue
        name_match = _FIELD_NAME.match(line)
        if name_match is not None:
            fields.append([line[: name_match.end() - 1], line[name_match.end() :]])
        elif not line.startswith(b"From "):
            raise _malformed(f"Unexpected characters in RFC822 header: {line!r}")
    return fields, size


def relaxed_body_hash(message: bytes, start: int = 0) -> bytes:
    """SHA-256 of ``message[start:]`` under relaxed body canonicalisation (RFC 6376 §3.4.4).

    Equal to what dkimpy hashes for ``bh=`` (its parser turns every line end into CRLF, then
    ``Relaxed.canonicalize_body``), but done a chunk at a time, so memory stays flat whatever
    the size. The chunk steps are line-local, so cutting at line ends changes nothing; only
    "ignore empty lines at the end" looks across chunks, which ``pending`` carries.
    """
    digest = hashlib.sha256()
    pending = 0  # CRLFs at the end of what was read so far: hashed only if more text follows
    seen_text = False
    size = len(message)
    while start < size:
        newline = message.find(b"\n", min(start + _BODY_CHUNK, size) - 1)
        stop = size if newline == -1 else newline + 1
        chunk = _relax(message[start:stop])
        start = stop
        text_end = len(chunk)
        while chunk.endswith(b"\r\n", 0, text_end):
            text_end -= 2
        if text_end:
            digest.update(b"\r\n" * pending)
            digest.update(memoryview(chunk)[:text_end])
            pending = (len(chunk) - text_end) // 2
            seen_text = True
        else:
            pending += len(chunk) // 2
    if seen_text:
        digest.update(b"\r\n")  # a non-empty body ends in exactly one CRLF; an empty one is b""
    return digest.digest()


def _relax(chunk: bytes) -> bytes:
    """dkimpy's line-end fix and relaxed body steps on one chunk, each skipped when it is a no-op.

    Most bodies (base64 attachments, ordinary text) have no bare LF, no tab, no double space
    and no white space at a line end, and are hashed as they are: three fast scans instead of
    a regex pass that rewrites them. (``find`` rather than ``in``: for bytes, ``in`` first tries
    the operand as an integer and pays for the TypeError. ``rfind`` for the double space: it
    answers the same question and measured twice as fast as ``find`` on CPython 3.11, on prose
    and on base64 alike.)
    """
    tab = chunk.find(b"\t") != -1
    if _SUSPECT_LINE_END.search(chunk):
        if BARE_LF.search(chunk):
            chunk = _LINE_END.sub(b"\r\n", chunk)
        if chunk.find(b" \r\n") != -1 or (tab and chunk.find(b"\t\r\n") != -1):
            chunk = canonicalization.strip_trailing_whitespace(chunk)
    if tab or chunk.rfind(b"  ") != -1:
        chunk = canonicalization.compress_whitespace(chunk)
    return chunk


def _relaxed_value(value: bytes) -> bytes:
    """A header field value, already unfolded, under relaxed canonicalisation (RFC 6376 §3.4.2).

    dkimpy's ``Relaxed.canonicalize_headers`` without the trailing CRLF, and without its
    ``re.sub`` where it would change nothing (most values have no tab or double space).
    """
    if value.find(b"\t") != -1 or value.find(b"  ") != -1:
        value = canonicalization.compress_whitespace(value)
    return value.strip()


def _signed_fields(fields: list[list[bytes]], names: Sequence[bytes]) -> tuple[bytes, bytes]:
    """The ``h=`` value, and the fields it names, canonicalised, in the order they are hashed.

    Each of ``names`` (lower case) is listed once per field of that name, and From once more
    than it occurs (over-signing, RFC 6376 §8.15). A name listed n times covers its n fields
    from the bottom up (§5.4.2), as dkimpy's ``select_headers`` takes them; the extra From
    covers none. Only these fields are canonicalised, not the whole header section.
    """
    by_name: dict[bytes, list[list[bytes]]] = {}
    for found in fields:
        lower = found[0].lower()
        if lower in by_name:
            by_name[lower].append(found)
        else:
            by_name[lower] = [found]
    include: list[bytes] = []
    hashed: list[bytes] = []
    for name in names:
        present = by_name.get(name)
        if present is None:
            continue
        include += [name] * len(present)
        for found in reversed(present):
            # Unfolding (§3.4.2) is joining the pieces: they were split at the line ends.
            value = _relaxed_value(found[1] if len(found) == 2 else b"".join(found[1:]))
            hashed += (name, b":", value, b"\r\n")
    include.append(b"from")
    return b" : ".join(include), b"".join(hashed)


def _signature(
    key: DkimKey, include: bytes, signed_fields: bytes, body_hash: bytes, timestamp: bytes
) -> bytes:
    """The DKIM-Signature header field, CRLF-terminated, as dkimpy 1.1.8's ``DKIM.sign`` makes it.

    Same tags in the same order, folded twice as there: first with the placeholder in b=, which
    is what gets hashed (RFC 6376 §3.7: the field as sent, with the b= value empty), then with
    the signature. The placeholder is one 62-character token after the 48 of bh=, so it always
    has a line of its own (see :func:`_fold_tags`): cutting it off leaves what dkimpy's
    b=-removing regex (``RE_BTAG``, about 9 µs per use, and dkimpy used it twice) leaves, given
    that no configured header name holds an ``=`` (DkimSigner refuses those), and the signed
    field is that same text with the signature's lines (:func:`_fold_b`) in place of the
    placeholder's, which is what dkimpy's second fold gives.
    """
    domain = key.domain.encode("ascii")
    tags = b"; ".join(
        (
            b"v=1",
            b"a=" + key.algorithm.encode("ascii"),
            b"c=relaxed/relaxed",
            b"d=" + domain,
            b"i=@" + domain,
            b"q=dns/txt",
            b"s=" + key.selector.encode("ascii"),
            b"t=" + timestamp,
            b"h=" + include,
            b"bh=" + body_hash,
        )
    )
    folded = _fold_tags(tags + b"; b=" + _PLACEHOLDER)
    unsigned = folded[: -len(_PLACEHOLDER)]
    # The field itself is hashed last, relaxed, without its CRLF (§3.7); unfolding it is
    # removing the fold's CRLFs, the only ones in it.
    own = _relaxed_value(b" " + unsigned.replace(b"\r\n", b""))
    digest = hashlib.sha256(signed_fields + b"dkim-signature:" + own).digest()
    signature = base64.b64encode(key._sign_digest(digest))
    return _SIGNATURE_FIELD + b": " + unsigned[:-2] + _fold_b(b"b=" + signature)


def _fold_tags(tag_list: bytes) -> bytes:
    """``tag_list`` folded as dkimpy 1.1.8's ``fold`` folds it, but never inside a tag value.

    fold() breaks a line at its last space, and where a line has none it cuts the text at the
    line's width, wherever that falls. Inside a d=, i=, s= or h= value that inserts a CRLF and
    a space, which no verifier removes: RFC 6376 §3.2 allows folding white space only around
    ``=`` and ``;`` (and §3.5 inside the base64 of b= and bh=, and around the colons of h=).
    So a domain of more than 68 characters broke d= and i=, a selector of about 70 broke s=,
    and a header name longer than a line broke h=: mail that failed DKIM at every receiver.
    Here a line has the same width and breaks at the same spaces, and a cut happens only where
    fold() would cut at a place the grammar allows (before a space or a ``;``: there its
    output is valid, and so is kept byte for byte); anywhere else the value runs on to the next
    space, making a longer line, which RFC 5322 allows up to 998 characters (the names' limits
    keep every line well under that). A line holding nothing but a space, which fold() leaves
    after an exact fit followed by a long value, is not made either (obsolete syntax, RFC 5322
    §4.2). Only the tags are folded here: b= is :func:`_fold_b`'s.
    """
    lines: list[bytes] = []
    rest = tag_list
    width = _FIRST_WIDTH
    while len(rest) > width:
        # From 1: a space at 0 (left by an exact fit) would give an empty line.
        space = rest.rfind(b" ", 1, width)
        if space != -1:
            lines.append(rest[:space])
            rest = rest[space + 1 :]
        elif rest[width] in b" ;":
            # fold()'s cut at the width falls before a space or a ";", where RFC 6376 allows
            # folding: keep it, with the double space that follows it.
            lines.append(rest[:width])
            rest = rest[width:]
        else:
            # A value longer than the line: it runs on to the end of its token.
            space = rest.find(b" ", width)
            if space == -1:
                break
            lines.append(rest[:space])
            rest = rest[space + 1 :]
        width = _WIDTH
    lines.append(rest)
    return b"\r\n ".join(lines)


def _fold_b(tag: bytes) -> bytes:
    """The ``b=`` tag at the start of a line, folded as dkimpy's fold does, then CRLF.

    fold() cuts base64 anywhere, which RFC 6376 §3.5 allows inside b=, every 71 characters,
    counting the CRLF at the end of the field as two of them. When the CRLF is what reaches
    past a cut, fold() cuts before it or even inside it, ending the field with a line of only
    a space, or with a bare CR and a bare LF: the length of b= decides it, so the key size
    does (RSA keys of 2089 to 2112 bits or 2521 to 2544, and bands like them every 1,704
    bits up; never 1024, 2048, 3072 or 4096, nor ed25519). Those cuts are left out here: the
    value is cut every 71 characters and nowhere else, so the last line takes the one or two
    characters more.
    """
    lines = [tag[start : start + _WIDTH] for start in range(0, len(tag), _WIDTH)]
    return b"\r\n ".join(lines) + b"\r\n"


# A header field name (RFC 5322 §3.6.8: printable ASCII but ":") that can sit in the h= tag:
# no ";" (it ends a tag, RFC 6376 §3.2) and no "=" (a name like "b=x" would be taken for the
# b= tag by the regex verifiers, dkimpy's among them, use to blank it).
_SIGNABLE_NAME = re.compile(r"^[\x21-\x39\x3c\x3e-\x7e]+$")


class DkimSigner:
    """Signs messages with the key of their domain; thread-safe, so usable via asyncio.to_thread.

    ``headers`` are the header field names to sign (``dkim.headers``): each one present is
    signed as many times as it occurs, and From once more than it occurs, so that nobody can add
    a second From above ours without breaking the signature (RFC 6376 §8.15, "over-signing").
    """

    def __init__(self, keys: KeyRing, headers: Sequence[str]) -> None:
        names: list[str] = []
        for header in headers:
            name = header.strip().lower()
            if name.encode("ascii", "replace") in dkim.DKIM.SHOULD_NOT:
                raise ConfigError(
                    f"dkim.headers: `{name}` must not be signed (RFC 6376 §5.4: it is added "
                    "or changed in transit); remove it from the list"
                )
            if name and not _SIGNABLE_NAME.match(name):
                raise ConfigError(
                    f"dkim.headers: `{name}` is not a header field name that can be signed "
                    "(printable ASCII without spaces, `:`, `;` or `=`); fix the list"
                )
            if len(name) > _MAX_NAME_LENGTH:
                raise ConfigError(
                    f"dkim.headers: `{name[:40]}…` has {len(name)} characters; a signed header "
                    f"name can have at most {_MAX_NAME_LENGTH}, or the line of the signature "
                    f"that lists it would pass the {_MAX_LINE} of RFC 5322 §2.1.1; fix the list"
                )
            if name and name not in names:
                names.append(name)
        if "from" not in names:
            names.insert(0, "from")  # RFC 6376 §5.4: From MUST be signed
        self._headers = tuple(name.encode("ascii") for name in names)
        self._keys = keys
        # Signing here re-does what dkimpy does, with its helpers: have dkimpy's verifier
        # accept one signature per algorithm now, so a dkimpy that changed under us fails
        # here, loudly, and not at the receivers, silently, on every message.
        for algorithm in _SUFFIX:
            sample = next((k for k in keys if k.algorithm == algorithm), None)
            if sample is not None:
                _self_check(sample)

    @classmethod
    def from_settings(cls, settings: DkimSettings) -> DkimSigner:
        """The signer for ``[dkim]``: every key under ``key_dir``; none at all when disabled.

        ``dkim.selector`` only names new keys, so a key made with ``keygen --selector`` signs
        too. To rotate, add the new selector's key, publish its record, restart, then delete
        the old key file: in between, mail carries both signatures and either one passes.
        """
        if not settings.enabled:
            return cls(KeyRing(), settings.headers)
        return cls(load_keys(settings.key_dir), settings.headers)

    def has_key(self, domain: str) -> bool:
        """True if :meth:`sign` would sign mail from ``domain`` (its own key or a parent's)."""
        return bool(self._keys.for_domain(domain))

    def sign(self, message: bytes, *, domain: str) -> bytes:
        """The ``DKIM-Signature`` header field(s) to prepend to ``message``, CRLF-terminated.

        ``domain`` is the From domain; the signature's ``d=`` is that domain or the parent whose
        key :meth:`KeyRing.for_domain` picked. Returns ``b""`` when no key fits, so the caller
        writes ``signer.sign(m, domain=d) + m`` either way. ``message`` is the whole message with
        CRLF (or LF) line ends; it is never copied whole, nor changed. Raises
        :class:`UnsignableMessage` (a :class:`Reject`) when the header section cannot be parsed.

        >>> signer.sign(message, domain="example.com")
        b'DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=example.com;\\r\\n i=@ex…'
        """
        keys = self._keys.for_domain(domain)
        if not keys:
            log.debug("dkim: no key for %s; not signing", domain)
            return b""
        return _sign(message, keys, self._headers)


def _sign(message: bytes, keys: Sequence[DkimKey], names: Sequence[bytes]) -> bytes:
    """One DKIM-Signature field per key, signing the fields ``names`` lists (lower case).

    The message is parsed, its signed fields canonicalised and its body hashed once, whatever
    the number of keys.
    """
    fields, body_start = _parse_header_section(message)
    include, signed_fields = _signed_fields(fields, names)
    body_hash = base64.b64encode(relaxed_body_hash(message, body_start))
    timestamp = str(int(time.time())).encode("ascii")  # t=, as dkimpy writes it
    return b"".join(_signature(key, include, signed_fields, body_hash, timestamp) for key in keys)


# Folding, a tab, white space at a line end, a repeated field, and over-signing: each path of
# the header canonicalisation; and a body with runs of white space and empty lines at its end.
_PROBE = (
    b"From: Probe <probe@example.invalid>\r\n"
    b"To: one@example.invalid\r\n"
    b"Subject:  self\tcheck, folded \r\n\tover two lines  \r\n"
    b"To: two@example.invalid\r\n"
    b"\r\n"
    b"This is  only\ta test. \r\n\r\n\r\n"
)


def _self_check(key: DkimKey) -> None:
    """Sign :data:`_PROBE` as :meth:`DkimSigner.sign` does and have dkimpy verify it, or raise.

    The lookup answers only at the key's own record name, as DNS would: a signature whose d= or
    s= came out wrong (a value cut by folding, say) fails here rather than at the receivers.
    """
    header = _sign(_PROBE, [key], (b"from", b"to", b"subject"))
    record = key.record_value.encode("ascii")
    record_name = key.record_name.encode("ascii")

    def dns(name: bytes, timeout: float = 5) -> bytes | None:
        return record if name == record_name else None

    try:
        verified = dkim.DKIM(header + _PROBE).verify(dnsfunc=dns)
        reason = "the signature does not match"
    except dkim.DKIMException as exc:
        verified, reason = False, str(exc) or type(exc).__name__
    if not verified:
        version = _dkimpy_version()
        # The signer reproduces 1.1.8; with that version installed the fault can only be ours.
        suspect = (
            "a bug in gateway/dkim.py's signer; please report it with this message"
            if version == _REFERENCE_DKIMPY
            else f"a bug in gateway/dkim.py's signer, or dkimpy {version}, which is not the "
            f"{_REFERENCE_DKIMPY} the signer was written against: try {_REFERENCE_DKIMPY}"
        )
        raise RuntimeError(
            f"gateway/dkim.py: a signature made with the {key.algorithm} key for "
            f"{key.record_name} does not verify ({reason}); mail signed with it would fail "
            f"DKIM at the receivers, so no signer is built. The cause is {suspect}"
        )


# The dkimpy whose signatures _sign reproduces byte for byte (the tests compare the two).
_REFERENCE_DKIMPY = "1.1.8"


def _dkimpy_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("dkimpy")
    except PackageNotFoundError:
        return "(unknown version)"
