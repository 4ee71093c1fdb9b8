"""DKIM signing for outgoing mail: per-domain keys on disk, and a signer that prepends signatures.

Keys live at ``<key_dir>/<domain>/<selector>.<rsa|ed25519>.pem`` (PKCS#8 PEM, mode 0600);
:func:`generate_key` writes one and :meth:`DkimKey.txt_record` gives the DNS record to publish,
:func:`load_keys` reads them all into a :class:`KeyRing`. :class:`DkimSigner` signs with relaxed/
relaxed canonicalisation (RFC 6376 §3.4) and returns only the ``DKIM-Signature`` header field(s)
to put in front of the message, so a large message is never copied. dkimpy does the DKIM work
(header parsing and canonicalisation, header selection, tag formatting, folding) with two
changes made at one seam, :class:`_DkimpyWithOpenSsl`: the RSA private-key operation runs in
OpenSSL through ``cryptography`` (about 3,700/s) instead of dkimpy's pure-Python ``pow()``
(about 125/s), and the body is canonicalised and hashed in chunks with dkimpy's own functions
instead of all at once (which took 40 times a big message's size in memory). The output is
byte for byte dkimpy's. ed25519 (RFC 8463) keeps dkimpy's PyNaCl path, already native code and
measured faster here than ``cryptography``'s ed25519.
"""

from __future__ import annotations

import base64
import collections
import hashlib
import logging
import os
import re
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import dkim
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from dkim import canonicalization

from gateway.errors import ConfigError, Reject
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

_RELAXED = (b"relaxed", b"relaxed")


def _der_integer(value: int) -> bytes:
    body = value.to_bytes(value.bit_length() // 8 + 1, "big")
    return b"\x02" + bytes([len(body)]) + body


# The textbook RSA key (p=61, q=53): well-formed PKCS#1 for dkimpy's parser, worthless as a
# key. See DkimKey.__post_init__ for why dkimpy is handed this; _check_seam proves at start-up
# that signatures are still made with, and verify against, the real key.
_TOY = b"".join(_der_integer(v) for v in (0, 3233, 17, 2753, 61, 53, 53, 49, 38))
_PARSE_ONLY_RSA_PEM = (
    b"-----BEGIN RSA PRIVATE KEY-----\n"
    + base64.b64encode(b"\x30" + bytes([len(_TOY)]) + _TOY)
    + b"\n-----END RSA PRIVATE KEY-----\n"
)


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
    return name if len(name) <= 253 and _NAME.match(name) else ""


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
    # What dkimpy's DKIM.sign() takes as ``privkey`` (PEM for RSA, the base64 seed for ed25519),
    # and the OpenSSL stand-in used for RSA: both derived once here, not on every message.
    _dkimpy_key: bytes = field(init=False, repr=False, compare=False)
    _openssl_rsa: _OpenSslRsa | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        openssl_rsa: _OpenSslRsa | None = None
        if self.algorithm == "rsa-sha256":
            if not isinstance(self.private_key, rsa.RSAPrivateKey):
                raise TypeError("an rsa-sha256 DkimKey needs an RSA private key")
            # dkimpy only parses this (its result goes unused: gen_header signs with OpenSSL
            # and the real key), so it gets a tiny placeholder that parses in ~6 µs instead of
            # the real key's ~150 µs of pure-Python ASN.1 on every message.
            dkimpy_key = _PARSE_ONLY_RSA_PEM
            openssl_rsa = _OpenSslRsa(self.private_key)
        else:
            if not isinstance(self.private_key, ed25519.Ed25519PrivateKey):
                raise TypeError("an ed25519-sha256 DkimKey needs an Ed25519 private key")
            seed = self.private_key.private_bytes(
                serialization.Encoding.Raw,
                serialization.PrivateFormat.Raw,
                serialization.NoEncryption(),
            )
            dkimpy_key = base64.b64encode(seed)
        # A frozen dataclass can only set derived fields this way.
        object.__setattr__(self, "_dkimpy_key", dkimpy_key)
        object.__setattr__(self, "_openssl_rsa", openssl_rsa)

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
            if wanted is None or sel == wanted:
                keys.append(_read_key(path, domain, sel, _ALGORITHM[match["kind"]]))
    return KeyRing(keys)


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
# The empty line that ends the header section, as dkimpy's parser finds it (RFC 5322 §2.1).
_BLANK_LINE = re.compile(rb"(?:\A|\n)(\r?\n)")
_LINE_END = re.compile(rb"\r?\n")


def _split_message(message: bytes) -> tuple[bytes, int]:
    """The header section, ending in an empty line, and the offset where the body starts."""
    blank = _BLANK_LINE.search(message)
    if blank is None:  # no body at all: dkimpy reads every line as a header line
        return message, len(message)
    return message[: blank.start(1)] + b"\r\n", blank.end(1)


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
    and no space at a line end, and are hashed as they are, without a regex pass over them.
    """
    if chunk.count(b"\n") != chunk.count(b"\r\n"):
        chunk = _LINE_END.sub(b"\r\n", chunk)
    if b" \r\n" in chunk or b"\t\r\n" in chunk:
        chunk = canonicalization.strip_trailing_whitespace(chunk)
    if b"\t" in chunk or b"  " in chunk:
        chunk = canonicalization.compress_whitespace(chunk)
    return chunk


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
            if name and name not in names:
                names.append(name)
        if "from" not in names:
            names.insert(0, "from")  # RFC 6376 §5.4: From MUST be signed
        self._headers = tuple(names)
        self._keys = keys
        # The seam leans on dkimpy internals (see _DkimpyWithOpenSsl): prove it against dkimpy's
        # own verifier once per algorithm, so an incompatible dkimpy fails here, loudly, and not
        # at the receivers, silently, on every message.
        for algorithm in _SUFFIX:
            sample = next((k for k in keys if k.algorithm == algorithm), None)
            if sample is not None:
                _check_seam(sample)

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
        header_section, body_start = _split_message(message)
        try:
            signer = _DkimpyWithOpenSsl(header_section)
        except (dkim.MessageFormatError, IndexError) as exc:
            # dkimpy's header parser raises IndexError, not its own error, when the first line
            # is a continuation line; both mean the header section is malformed.
            raise UnsignableMessage(
                "554 5.6.0 The message header is malformed and cannot be DKIM-signed "
                f"({exc if isinstance(exc, dkim.MessageFormatError) else 'starts with a space'})",
                code=554,
            ) from None
        include = self._include_headers(signer.headers)
        body_hash = relaxed_body_hash(message, body_start)
        return b"".join(signer.sign_with(key, include, body_hash) for key in keys)

    def _include_headers(self, headers: Sequence[Sequence[bytes]]) -> list[bytes]:
        """The h= list: each configured name once per occurrence, plus one extra From."""
        counts = collections.Counter(name.lower() for name, _value in headers)
        include: list[bytes] = []
        for name in self._headers:
            raw = name.encode("ascii", "replace")
            include.extend([raw] * counts[raw])
        include.append(b"from")
        return include


@dataclass(frozen=True)
class _Signature:
    """The shape of PyNaCl's SignedMessage that dkimpy reads: just ``.signature``."""

    signature: bytes


class _OpenSslRsa:
    """An RSA key that signs a finished digest, in the shape dkimpy expects of a signing key."""

    __slots__ = ("_key",)

    def __init__(self, key: rsa.RSAPrivateKey) -> None:
        self._key = key

    def sign(self, digest: bytes) -> _Signature:
        # RSASSA-PKCS1-v1_5 (RFC 8017 §8.2) over the SHA-256 digest dkimpy computed of the
        # canonicalised headers; Prehashed stops OpenSSL hashing it again and checks its length.
        # PKCS#1 v1.5 is deterministic, so this equals dkimpy's pure-Python result bit for bit.
        return _Signature(self._key.sign(digest, padding.PKCS1v15(), Prehashed(hashes.SHA256())))


class _DkimpyWithOpenSsl(dkim.DKIM):  # type: ignore[misc]  # dkimpy has no type hints
    """dkimpy's DKIM signer with the RSA key operation in OpenSSL and the body hashed in chunks.

    The key operation: dkimpy 1.1.8's ``DomainSigner.gen_header`` hashes the headers and then
    does the key operation in one of two branches, chosen by ``self.signature_algorithm``. The
    RSA branch calls the module-level pure-Python ``RSASSA_PKCS1_v1_5_sign(h, pk)``; the
    ed25519 branch calls ``pk.sign(h.digest()).signature`` on whatever key object it is given.
    By the time
    ``gen_header`` runs, ``DKIM.sign`` has already fixed everything the algorithm decides (the
    ``a=`` tag in ``fields``, and ``self.hasher``, SHA-256 for both), so for that one call we
    select the duck-typed branch and hand it :class:`_OpenSslRsa`. This touches one instance,
    made per message, instead of replacing dkimpy's module functions for every user in the
    process, and needs no copy of dkimpy's code; the tests check the result is byte-identical
    to dkimpy's own, and :func:`_check_seam` re-checks it whenever a signer is built.

    The body: dkimpy reads the whole message into a list of lines and canonicalises the body
    with ``re.sub`` over all of it at once, which for a 25 MB message took 2.5 s and 1 GB of
    memory. So this instance is given only the header section, and ``gen_header`` swaps the
    ``bh=`` tag dkimpy computed of the resulting empty body for :func:`relaxed_body_hash`'s,
    which applies dkimpy's own canonicalisation functions 64 KiB at a time. ``bh=`` is in
    ``fields`` before anything is hashed or formatted, so the rest is dkimpy's work as usual.

    The key parse: ``DKIM.sign`` parses the ``privkey`` it is given with pure-Python ASN.1
    (about 150 µs for 2048 bits) before ``gen_header`` runs; since that result is never used for
    RSA here, it is given a tiny placeholder key (``_PARSE_ONLY_RSA_PEM``) that parses in ~6 µs.
    """

    signature_algorithm: bytes  # set by dkimpy; declared for the type checker
    headers: list[list[bytes]]  # [name, value] pairs as dkimpy parsed them

    def __init__(self, message: bytes) -> None:
        super().__init__(message, linesep=b"\r\n")
        self._openssl_rsa: _OpenSslRsa | None = None
        self._body_hash: bytes | None = None

    def sign_with(self, key: DkimKey, include_headers: list[bytes], body_hash: bytes) -> bytes:
        """Sign with ``key`` (relaxed/relaxed) and return the DKIM-Signature header field.

        ``body_hash`` is the SHA-256 of the relaxed-canonicalised body (:func:`relaxed_body_hash`);
        this instance was given the header section only.
        """
        self._openssl_rsa = key._openssl_rsa
        self._body_hash = base64.b64encode(body_hash)
        try:
            header: bytes = self.sign(
                key.selector.encode("ascii"),
                key.domain.encode("ascii"),
                key._dkimpy_key,
                signature_algorithm=key.algorithm.encode("ascii"),
                canonicalize=_RELAXED,
                include_headers=include_headers,
            )
        finally:
            self._openssl_rsa = None
            self._body_hash = None
        return header

    def gen_header(
        self,
        fields: Any,
        include_headers: Any,
        canon_policy: Any,
        header_name: Any,
        pk: Any,
        standardize: bool = False,
    ) -> Any:
        if self._body_hash is not None:
            fields = [(tag, self._body_hash if tag == b"bh" else value) for tag, value in fields]
        if self._openssl_rsa is None:
            return super().gen_header(
                fields, include_headers, canon_policy, header_name, pk, standardize
            )
        rsa_algorithm = self.signature_algorithm
        self.signature_algorithm = b"ed25519-sha256"  # selects `pk.sign(digest).signature`
        try:
            return super().gen_header(
                fields, include_headers, canon_policy, header_name, self._openssl_rsa, standardize
            )
        finally:
            self.signature_algorithm = rsa_algorithm


_SEAM_PROBE = b"From: probe@example.invalid\r\nSubject: seam check\r\n\r\nThis is only a test.\r\n"


def _check_seam(key: DkimKey) -> None:
    """Sign a probe through :class:`_DkimpyWithOpenSsl` and verify it with dkimpy, or raise."""
    header_section, body_start = _split_message(_SEAM_PROBE)
    header = _DkimpyWithOpenSsl(header_section).sign_with(
        key, [b"from", b"subject", b"from"], relaxed_body_hash(_SEAM_PROBE, body_start)
    )
    record = key.record_value.encode("ascii")

    def dns(name: bytes, timeout: float = 5) -> bytes:
        return record

    if not dkim.verify(header + _SEAM_PROBE, dnsfunc=dns):
        raise RuntimeError(
            f"gateway/dkim.py: dkimpy {_dkimpy_version()} no longer works with our signing seam "
            f"({key.algorithm} signatures would fail); install dkimpy 1.1.8 or update "
            "_DkimpyWithOpenSsl"
        )


def _dkimpy_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("dkimpy")
    except PackageNotFoundError:
        return "(unknown version)"
