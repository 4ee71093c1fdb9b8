"""Who really sent a message: SPF, DKIM, DMARC and ARC verdicts, and the header that records them.

One caching resolver (dnspython, from ``[dns]``) answers every lookup: pyspf's (through
``spf.DNSLookup``, the seam pyspf's own test driver uses; it defers to pyspf's resolver for any
caller outside :class:`SpfChecker`), the DKIM key lookups and DMARC's. Every DKIM signature is
verified (RFC 6376 §6.1) with dkimpy's parsing, header selection and canonicalisation, and the
RSA operation in OpenSSL through ``cryptography`` (dkimpy's own is pure-Python ``pow()``, about ten
times slower); keys under 1024 bits fail (RFC 8301 §3.2), ``rsa-sha1`` is not accepted (RFC 8301
§3.1), and a signature whose ``l=`` covers only part of the body is ``policy``, never ``pass``.
DMARC (RFC 7489) finds the record at the From domain or its organisational domain (public
suffix list) and checks relaxed or strict alignment; ARC (RFC 8617) is verified by dkimpy for
forwarded mail. The result is an RFC 8601 ``Authentication-Results`` header with our authserv-id.
Everything here blocks (pyspf and dkimpy are synchronous), so the door runs it in a thread pool;
a DNS timeout or SERVFAIL becomes the RFC 8601 word ``temperror``, which the door turns into 451.
"""

from __future__ import annotations

import asyncio
import base64
import contextvars
import functools
import logging
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from email.utils import getaddresses
from typing import Any, Literal

import authres
import authres.core
import dkim
import dns.exception
import dns.message
import dns.name
import dns.rdatatype
import dns.resolver
import spf
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from dkim.canonicalization import CanonicalizationPolicy, InvalidCanonicalizationPolicyError
from dkim.util import InvalidTagValueList, parse_tag_value

from gateway.dkim import MIN_RSA_BITS, relaxed_body_hash
from gateway.errors import UpstreamError
from gateway.message import header_block, parse_headers

log = logging.getLogger(__name__)

Word = Literal["pass", "fail", "softfail", "neutral", "none", "temperror", "permerror", "policy"]


class TemporaryFailure(UpstreamError):
    """The checks could not finish (DNS timeout or SERVFAIL, or the time limit): answer 451."""


class DnsTempError(TemporaryFailure):
    """A DNS query timed out or every server failed (SERVFAIL, REFUSED): try again later."""


class CacheMiss(Exception):  # not an error: a signal to take the slow path
    """Raised in cache-only mode when an answer is not cached: verify in a thread instead."""


# Cache-only mode: the checks run on the event loop while every answer is cached (the steady
# state), and move to a thread, where blocking on DNS is harmless, at the first miss.
_CACHE_ONLY: contextvars.ContextVar[bool] = contextvars.ContextVar("cache_only", default=False)


# -- the resolver ------------------------------------------------------------------------------


class CachingResolver:
    """A blocking dnspython resolver with a small TTL cache, shared by every check and thread.

    Answers are kept for their TTL, capped at ``max_ttl``; "no such name" and "no data" are
    both kept as an empty answer (RFC 2308), for the SOA minimum when the server gave one.
    Temporary failures are never cached: the next message asks again.
    """

    def __init__(
        self,
        resolver: dns.resolver.Resolver,
        *,
        max_ttl: float = 300.0,
        max_entries: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.resolver = resolver
        self.max_ttl = max_ttl
        self.max_entries = max_entries
        self.clock = clock
        self._cache: OrderedDict[tuple[str, str], tuple[float, tuple[Any, ...]]] = OrderedDict()
        self._lock = threading.Lock()
        self.queries = 0  # answered from the network (for the benchmark's cost split)
        self.hits = 0

    def lookup(self, name: str, rdtype: str) -> tuple[Any, ...]:
        """The rdata of ``name``/``rdtype`` (CNAMEs followed); ``()`` when there is none."""
        key = (name.lower().rstrip("."), rdtype.upper())
        now = self.clock()
        with self._lock:
            entry = self._cache.get(key)
            if entry is not None and entry[0] > now:
                self.hits += 1
                return entry[1]
        if _CACHE_ONLY.get():
            raise CacheMiss(f"{key[0]} {key[1]}")
        records, ttl = self._ask(key[0], key[1])
        if self.max_entries and self.max_ttl > 0:
            with self._lock:
                self._cache[key] = (now + min(ttl, self.max_ttl), records)
                self._cache.move_to_end(key)
                while len(self._cache) > self.max_entries:
                    self._cache.popitem(last=False)
        return records

    def txt(self, name: str) -> list[bytes]:
        """Each TXT record's strings joined into one (RFC 7208 §3.3, RFC 6376 §3.6.2.2)."""
        return [b"".join(record.strings) for record in self.lookup(name, "TXT")]

    def _ask(self, name: str, rdtype: str) -> tuple[tuple[Any, ...], float]:
        self.queries += 1
        try:
            answer = self.resolver.resolve(
                name + ".", rdtype, search=False, raise_on_no_answer=False
            )
        except dns.resolver.NXDOMAIN as exc:
            return (), _negative_ttl(exc)
        except dns.resolver.NoNameservers as exc:
            if _cname_loop(exc):
                return (), 60.0  # a CNAME loop is a broken zone, not a passing outage
            raise DnsTempError(
                f"no server answered {name} {rdtype} (SERVFAIL or REFUSED)"
            ) from None
        except dns.exception.Timeout:
            raise DnsTempError(f"DNS query for {name} {rdtype} timed out") from None
        except (dns.name.LabelTooLong, dns.name.EmptyLabel, dns.name.NameTooLong):
            return (), self.max_ttl  # not a name DNS can hold (RFC 1035 §2.3.4)
        except dns.exception.DNSException as exc:
            raise DnsTempError(f"DNS query for {name} {rdtype} failed: {exc}") from None
        ttl = max(0.0, answer.expiration - time.time())
        if answer.rrset is None:
            return (), ttl
        return tuple(answer.rrset), ttl

    def clear(self) -> None:
        with self._lock:
            self._cache.clear()


def _negative_ttl(exc: dns.resolver.NXDOMAIN) -> float:
    for response in exc.responses().values():  # type: ignore[no-untyped-call]
        for rrset in response.authority:
            if rrset.rdtype == dns.rdatatype.SOA:
                return float(min(rrset.ttl, rrset[0].minimum))
    return 60.0


def _cname_loop(exc: dns.resolver.NoNameservers) -> bool:
    errors = exc.kwargs.get("errors") or []
    return bool(errors) and all(isinstance(e[3], dns.message.ChainTooLong) for e in errors)


# -- SPF (RFC 7208) ----------------------------------------------------------------------------

_ACTIVE_RESOLVER: contextvars.ContextVar[CachingResolver | None] = contextvars.ContextVar(
    "mailgate_spf_resolver", default=None
)
_PYSPF_LOOKUP = spf.DNSLookup


def _spf_lookup(
    name: str, qtype: str, strict: Any = True, timeout: Any = None
) -> list[tuple[tuple[str, str], Any]]:
    """pyspf's DNS hook: our resolver inside :meth:`SpfChecker.check`, pyspf's own elsewhere.

    Returns what pyspf's dnspython lookup returns: ``((name, type), value)`` pairs with
    addresses as text, MX as ``(preference, exchange)``, PTR as a name, TXT as the strings.
    """
    resolver = _ACTIVE_RESOLVER.get()
    if resolver is None:
        found: list[tuple[tuple[str, str], Any]] = _PYSPF_LOOKUP(name, qtype, strict, timeout)
        return found
    try:
        records = resolver.lookup(name, qtype)
    except DnsTempError as exc:
        raise spf.TempError(f"DNS {exc}") from None
    values: list[tuple[tuple[str, str], Any]] = []
    for rdata in records:
        if qtype in ("A", "AAAA"):
            value: Any = rdata.address
        elif qtype == "MX":
            value = (rdata.preference, _host(rdata.exchange))
        elif qtype == "PTR":
            value = _host(rdata.target)
        elif qtype in ("TXT", "SPF"):
            value = list(rdata.strings)
        else:
            continue
        values.append(((name, qtype), value))
    return values


def _host(name: dns.name.Name) -> str:
    return "" if name == dns.name.root else name.to_text(omit_final_dot=True)


spf.DNSLookup = _spf_lookup


@dataclass(frozen=True, slots=True)
class SpfResult:
    result: Word
    domain: str  # the identity checked: the MAIL FROM domain, or the HELO name for <>
    identity: Literal["mailfrom", "helo"]
    mail_from: str
    helo: str
    explanation: str = ""


class SpfChecker:
    """``check_host()`` (RFC 7208 §4) for MAIL FROM, or for HELO when MAIL FROM is ``<>``."""

    def __init__(
        self,
        resolver: CachingResolver,
        *,
        receiver: str = "",
        time_limit: float = 20.0,  # RFC 7208 §4.6.4: at least 20 s for all lookups together
        default_explanation: str | None = None,
    ) -> None:
        self.resolver = resolver
        self.receiver = receiver
        self.time_limit = time_limit
        self.default_explanation = default_explanation

    def check(self, ip: str, mail_from: str, helo: str) -> SpfResult:
        identity: Literal["mailfrom", "helo"] = "mailfrom" if mail_from else "helo"
        domain = mail_from.rpartition("@")[2] if mail_from else helo
        query = spf.query(
            i=ip,
            s=mail_from,
            h=helo,
            receiver=self.receiver or "unknown",
            querytime=self.time_limit,
        )
        if self.default_explanation is not None:
            query.set_default_explanation(self.default_explanation)
        token = _ACTIVE_RESOLVER.set(self.resolver)
        try:
            result, _code, explanation = query.check()
        except ValueError:  # not an IP address (a Unix-socket peer): nothing to check
            result, explanation = "none", ""
        finally:
            _ACTIVE_RESOLVER.reset(token)
        word = {"unknown": "permerror", "error": "temperror", "ambiguous": "permerror"}.get(
            result, result
        )
        return SpfResult(
            result=word,
            domain=domain.lower().rstrip("."),
            identity=identity,
            mail_from=mail_from,
            helo=helo,
            explanation=explanation or "",
        )


# -- DKIM (RFC 6376, RFC 8301, RFC 8463) -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DkimResult:
    result: Word
    domain: str = ""  # d=
    selector: str = ""  # s=
    algorithm: str = ""  # a=
    identity: str = ""  # i=
    header_b: str = ""  # the first 8 characters of b= (RFC 6008), to tell signatures apart
    reason: str = ""


@dataclass(frozen=True, slots=True)
class _Key:
    kind: Literal["rsa", "ed25519"]
    bits: int
    public: rsa.RSAPublicKey | ed25519.Ed25519PublicKey


class _KeyProblem(Exception):
    """The key record is missing or unusable: a permanent error (permerror)."""


# The empty line that ends the header section, found as dkimpy's parser finds it.
_BLANK_LINE = re.compile(rb"(?:\A|\n)(\r?\n)")
_SIG_ALGORITHMS = {b"rsa-sha256": "rsa", b"ed25519-sha256": "ed25519", b"rsa-sha1": "rsa"}


class DkimVerifier:
    """Verifies every DKIM-Signature of a message (RFC 6376 §6.1), not only the first."""

    def __init__(self, resolver: CachingResolver, *, min_rsa_bits: int = MIN_RSA_BITS) -> None:
        self.resolver = resolver
        self.min_rsa_bits = min_rsa_bits
        self._keys: OrderedDict[bytes, _Key | str] = OrderedDict()
        self._lock = threading.Lock()

    def verify_all(self, message: bytes) -> list[DkimResult]:
        if b"dkim-signature" not in header_block(message).lower():
            return []
        try:
            parsed = dkim.DKIM(message, minkey=self.min_rsa_bits)
        except dkim.MessageFormatError as exc:
            return [DkimResult("permerror", reason=f"the header cannot be parsed: {exc}")]
        signatures = [h for h in parsed.headers if h[0].lower() == b"dkim-signature"]
        bodies: dict[bytes, bytes] = {}
        return [self._verify(message, parsed, header, bodies) for header in signatures]

    def _verify(
        self,
        message: bytes,
        parsed: dkim.DKIM,
        header: tuple[bytes, bytes],
        bodies: dict[bytes, bytes],
    ) -> DkimResult:
        try:
            sig = parse_tag_value(header[1])
        except InvalidTagValueList as exc:
            return DkimResult("permerror", reason=f"the signature is not a tag list ({exc})")

        def text(tag: bytes) -> str:
            value: bytes = sig.get(tag, b"")
            return value.decode("ascii", "replace").strip()

        seen = DkimResult(
            "permerror",
            domain=text(b"d").lower(),
            selector=text(b"s"),
            algorithm=text(b"a"),
            identity=text(b"i"),
            header_b=re.sub(r"\s+", "", text(b"b"))[:8],
        )

        def verdict(result: Word, reason: str = "") -> DkimResult:
            return DkimResult(
                result,
                seen.domain,
                seen.selector,
                seen.algorithm,
                seen.identity,
                seen.header_b,
                reason,
            )

        try:
            dkim.validate_signature_fields(sig)
        except dkim.ValidationError as exc:
            return verdict("permerror", str(exc))
        algorithm = sig[b"a"]
        if algorithm == b"rsa-sha1":
            return verdict("policy", "rsa-sha1 signatures are not accepted (RFC 8301 section 3.1)")
        include = [h.lower() for h in re.split(rb"\s*:\s*", sig[b"h"].strip()) if h]
        if b"from" not in include:
            return verdict("permerror", "From is not signed (RFC 6376 section 6.1.1)")
        try:
            key = self._key(seen.selector, seen.domain)
        except DnsTempError as exc:
            return verdict("temperror", str(exc))
        except _KeyProblem as exc:
            return verdict("permerror", str(exc))
        if key.kind != _SIG_ALGORITHMS.get(algorithm):
            return verdict("permerror", f"the key is {key.kind} but a= is {seen.algorithm}")
        if key.kind == "rsa" and key.bits < self.min_rsa_bits:
            return verdict(
                "fail",
                f"the {key.bits}-bit RSA key is too short (RFC 8301 section 3.2 needs "
                f"{self.min_rsa_bits})",
            )
        try:
            policy = CanonicalizationPolicy.from_c_value(sig.get(b"c", b"simple/simple"))
        except InvalidCanonicalizationPolicyError:
            return verdict("permerror", f"unknown canonicalisation c={text(b'c')}")
        c_body = sig.get(b"c", b"simple/simple").partition(b"/")[2] or b"simple"
        hasher = dkim.HASH_ALGORITHMS[algorithm]
        try:
            expected = base64.b64decode(re.sub(rb"\s+", b"", sig[b"bh"]))
        except ValueError:
            return verdict("permerror", "bh= is not base64")
        partial = ""
        if c_body == b"relaxed" and b"l" not in sig:
            # The common case, hashed the signer's way: in chunks, skipping the regex passes
            # that change nothing (most bodies), byte for byte dkimpy's canonical form.
            key_of = b"relaxed-sha256"
            if key_of not in bodies:
                blank = _BLANK_LINE.search(message)
                bodies[key_of] = relaxed_body_hash(message, blank.end(1) if blank else len(message))
            body_hash = bodies[key_of]
        else:
            body = bodies.get(c_body)
            if body is None:
                body = bodies[c_body] = policy.canonicalize_body(parsed.body)
            if b"l" in sig:
                length = int(sig[b"l"])
                if length > len(body):
                    return verdict("fail", "l= is longer than the body (RFC 6376 section 3.5)")
                if length < len(body):
                    # RFC 6376 §8.2: text after l= is unsigned; anyone could have appended it.
                    partial = f"l= signs only {length} of the body's {len(body)} bytes"
                    body = body[:length]
            body_hash = hasher(body).digest()
        if body_hash != expected:
            return verdict("fail", "the body hash did not verify")
        # Like dkimpy: one From more than h= lists, so that a From added above the signed one
        # (a second From header) is hashed too and breaks the signature (RFC 6376 §8.15).
        digest_of = dkim.HashThrough(hasher())
        dkim.hash_headers(
            digest_of,
            policy,
            policy.canonicalize_headers(parsed.headers),
            [*include, b"from"],
            header,
            sig,
        )
        digest = digest_of.digest()
        try:
            signature = base64.b64decode(re.sub(rb"\s+", b"", sig[b"b"]))
        except ValueError:
            return verdict("permerror", "b= is not base64")
        try:
            if isinstance(key.public, rsa.RSAPublicKey):
                key.public.verify(signature, digest, padding.PKCS1v15(), Prehashed(hashes.SHA256()))
            else:
                key.public.verify(signature, digest)  # RFC 8463 §3: Ed25519 over the hash
        except (InvalidSignature, ValueError):
            return verdict("fail", "the signature did not verify")
        if partial:
            return verdict("policy", partial)
        return verdict("pass")

    def _key(self, selector: str, domain: str) -> _Key:
        name = f"{selector}._domainkey.{domain}"
        records = self.resolver.txt(name)
        if not records:
            raise _KeyProblem(f"no key record at {name}")
        record = records[0]
        with self._lock:
            cached = self._keys.get(record)
        if cached is None:
            cached = _parse_key(name, record)
            with self._lock:
                self._keys[record] = cached
                while len(self._keys) > 1000:
                    self._keys.popitem(last=False)
        if isinstance(cached, str):
            raise _KeyProblem(cached)
        return cached


def _parse_key(name: str, record: bytes) -> _Key | str:
    """The public key of a key record (RFC 6376 §3.6.1), or a sentence saying why not."""
    try:
        tags = parse_tag_value(record)
    except InvalidTagValueList:
        return f"the key record at {name} is not a tag list"
    if tags.get(b"v", b"DKIM1") != b"DKIM1":
        return f"the key record at {name} is not v=DKIM1"
    services = {s.strip() for s in tags.get(b"s", b"*").split(b":")}
    if not services & {b"*", b"email"}:
        return f"the key at {name} is not for email (s=)"
    raw = re.sub(rb"\s+", b"", tags.get(b"p", b""))
    if not raw:
        return f"the key at {name} has been revoked (empty p=)"
    try:
        material = base64.b64decode(raw, validate=True)
    except ValueError:
        return f"the key at {name} is not base64"
    kind = tags.get(b"k", b"rsa")
    if kind == b"ed25519":
        try:
            return _Key("ed25519", 256, ed25519.Ed25519PublicKey.from_public_bytes(material))
        except ValueError:
            return f"the ed25519 key at {name} cannot be read"
    if kind != b"rsa":
        return f"unknown key type k={kind.decode('ascii', 'replace')} at {name}"
    try:
        parsed = dkim.crypto.parse_public_key(material)
    except (dkim.crypto.UnparsableKeyError, TypeError, ValueError, IndexError):
        return f"the RSA key at {name} cannot be read"
    public = rsa.RSAPublicNumbers(parsed["publicExponent"], parsed["modulus"]).public_key()
    return _Key("rsa", public.key_size, public)


# -- ARC (RFC 8617) ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ArcResult:
    result: Word
    reason: str = ""


def verify_arc(message: bytes, resolver: CachingResolver) -> ArcResult:
    """The ARC chain's validation status; ``none`` without ARC headers (the common case)."""
    if b"arc-seal" not in header_block(message).lower():
        return ArcResult("none")

    def dnsfunc(name: bytes, timeout: float = 5) -> bytes | None:
        records = resolver.txt(name.decode("ascii", "replace"))
        return records[0] if records else None

    try:
        cv, _results, comment = dkim.arc_verify(message, dnsfunc=dnsfunc, minkey=MIN_RSA_BITS)
    except DnsTempError as exc:
        return ArcResult("temperror", str(exc))
    except CacheMiss:
        raise
    except Exception as exc:  # dkimpy raises assorted errors on malformed chains
        return ArcResult("fail", f"the ARC chain cannot be verified ({type(exc).__name__})")
    if cv == dkim.CV_Pass:
        return ArcResult("pass")
    if cv == dkim.CV_None:
        return ArcResult("none", str(comment))
    return ArcResult("fail", str(comment))


# -- DMARC (RFC 7489) --------------------------------------------------------------------------


@functools.cache
def _public_suffixes() -> Any:  # loads the bundled list once, on first use
    from publicsuffixlist import PublicSuffixList

    return PublicSuffixList()


@functools.lru_cache(maxsize=4096)
def organizational_domain(domain: str) -> str:
    """The registrable domain (RFC 7489 §3.2) by the public suffix list; unknown TLDs count as
    public suffixes, so ``rep.example.test`` belongs to ``example.test``. A name that is itself
    a public suffix is its own organisational domain."""
    name = domain.lower().rstrip(".")
    return str(_public_suffixes().privatesuffix(name) or name)


def aligned(a: str, b: str, mode: str) -> bool:
    """Identifier alignment (RFC 7489 §3.1): strict is equality, relaxed the same org domain."""
    a, b = a.lower().rstrip("."), b.lower().rstrip(".")
    if not a or not b:
        return False
    if mode == "s":
        return a == b
    return organizational_domain(a) == organizational_domain(b)


@dataclass(frozen=True, slots=True)
class DmarcRecord:
    domain: str  # where it was found (the From domain or its organisational domain)
    policy: str  # p=
    subdomain_policy: str  # sp= (p= when absent)
    adkim: str = "r"
    aspf: str = "r"
    text: str = ""


_POLICIES = ("none", "quarantine", "reject")


def parse_dmarc(domain: str, text: str) -> DmarcRecord | None:
    """A DMARC record, or None when it is not usable (RFC 7489 §6.6.3 step 6: no valid p=)."""
    tags: dict[str, str] = {}
    for part in text.split(";"):
        key, sep, value = part.partition("=")
        if sep:
            tags.setdefault(key.strip().lower(), value.strip())
    if tags.get("v") != "DMARC1":
        return None
    policy = tags.get("p", "").lower()
    if policy not in _POLICIES:
        if "rua" not in tags:
            return None
        policy = "none"  # §6.6.3: a record with rua but no valid p= acts as p=none
    sub = tags.get("sp", policy).lower()
    return DmarcRecord(
        domain=domain,
        policy=policy,
        subdomain_policy=sub if sub in _POLICIES else policy,
        adkim="s" if tags.get("adkim", "r").lower() == "s" else "r",
        aspf="s" if tags.get("aspf", "r").lower() == "s" else "r",
        text=text,
    )


def find_dmarc(resolver: CachingResolver, domain: str) -> DmarcRecord | None:
    """The record at ``_dmarc.<domain>``, else at the organisational domain (RFC 7489 §6.6.3)."""
    domain = domain.lower().rstrip(".")
    org = organizational_domain(domain)
    for where in (domain, org) if org != domain else (domain,):
        texts = [t.decode("utf-8", "replace") for t in resolver.txt(f"_dmarc.{where}")]
        candidates = [t for t in texts if t.startswith("v=DMARC1")]
        if len(candidates) == 1:  # more than one: as if none (§6.6.3 step 5)
            record = parse_dmarc(where, candidates[0])
            if record is not None:
                return record
    return None


@dataclass(frozen=True, slots=True)
class DmarcResult:
    result: Word
    header_from: str  # the From domain
    policy: str = ""  # the policy that applies to this domain ("" without a record)
    record_domain: str = ""
    aligned: tuple[str, ...] = ()  # which of "spf" and "dkim" passed and aligned
    reason: str = ""


def evaluate_dmarc(
    resolver: CachingResolver,
    header_from: str,
    spf_result: SpfResult,
    dkim_results: Sequence[DkimResult],
) -> DmarcResult:
    """Alignment of the SPF and DKIM passes with the From domain, and the domain's policy.

    Alignment is computed even without a record (relaxed, the default), because the capture
    door's question, "did the From domain authenticate this?", does not depend on whether the
    domain asks receivers to act on failures; the verdict word is ``none`` then.
    """
    if not header_from:
        return DmarcResult(
            "permerror",
            "",
            reason="needs exactly one From address (RFC 7489 section 6.6.1)",
        )
    try:
        record = find_dmarc(resolver, header_from)
    except DnsTempError as exc:
        return DmarcResult("temperror", header_from, reason=str(exc))
    adkim = record.adkim if record else "r"
    aspf = record.aspf if record else "r"
    passes: list[str] = []
    # RFC 7489 §3.1.2: the SPF identity is MAIL FROM's domain (HELO's for the null sender).
    if spf_result.result == "pass" and aligned(spf_result.domain, header_from, aspf):
        passes.append("spf")
    if any(r.result == "pass" and aligned(r.domain, header_from, adkim) for r in dkim_results):
        passes.append("dkim")
    if record is None:
        return DmarcResult("none", header_from, aligned=tuple(passes), reason="no DMARC record")
    policy = record.policy if record.domain == header_from else record.subdomain_policy
    return DmarcResult(
        "pass" if passes else "fail",
        header_from,
        policy=policy,
        record_domain=record.domain,
        aligned=tuple(passes),
    )


# -- all of it together ------------------------------------------------------------------------


def summarise_dkim(results: Iterable[DkimResult]) -> Word:
    """One word for all signatures: pass if any passed, else the most telling failure."""
    words = {r.result for r in results}
    order: tuple[Word, ...] = ("pass", "temperror", "fail", "policy", "neutral", "permerror")
    return next((word for word in order if word in words), "none")


@dataclass(frozen=True, slots=True)
class Verdicts:
    """Everything the checks found about one message."""

    authserv_id: str
    spf: SpfResult
    dkim: tuple[DkimResult, ...]
    dmarc: DmarcResult
    arc: ArcResult
    timings: dict[str, float] = field(default_factory=dict, compare=False)

    @property
    def aligned(self) -> tuple[str, ...]:
        """``("spf",)``, ``("dkim",)``, both or neither: an aligned pass proves the From domain."""
        return self.dmarc.aligned

    @property
    def temporary(self) -> bool:
        """Some check hit a DNS failure that a retry may cure."""
        return "temperror" in (self.spf.result, self.dmarc.result) or any(
            r.result == "temperror" for r in self.dkim
        )

    def words(self) -> dict[str, str]:
        return {
            "spf": self.spf.result,
            "dkim": summarise_dkim(self.dkim),
            "dmarc": self.dmarc.result,
            "arc": self.arc.result,
        }

    def as_meta(self) -> dict[str, Any]:
        """The verdicts as JSON for ``message.meta["authentication"]``."""
        return {
            **self.words(),
            "header_from": self.dmarc.header_from,
            "aligned": list(self.aligned),
            "dmarc_policy": self.dmarc.policy,
            "spf_domain": self.spf.domain,
            "dkim_pass_domains": sorted({r.domain for r in self.dkim if r.result == "pass"}),
        }

    def header(self) -> str:
        """The RFC 8601 ``Authentication-Results`` field, folded, ending in CRLF."""
        clauses = [str(c) for c in self._clauses()]
        return "Authentication-Results: " + ";\r\n\t".join([self.authserv_id, *clauses]) + "\r\n"

    def _clauses(self) -> list[Any]:
        prop = authres.core.AuthenticationResultProperty
        spf_property = (
            prop("smtp", "mailfrom", self.spf.mail_from)
            if self.spf.identity == "mailfrom"
            else prop("smtp", "helo", self.spf.helo or "unknown")
        )
        clauses: list[Any] = [
            authres.core.AuthenticationResult(
                "spf", result=self.spf.result, properties=[spf_property]
            )
        ]
        if not self.dkim:
            clauses.append(authres.core.AuthenticationResult("dkim", result="none"))
        for r in self.dkim:
            properties = [
                prop("header", name, value)
                for name, value in (
                    ("d", r.domain),
                    ("s", r.selector),
                    ("i", r.identity),
                    ("b", r.header_b),
                )
                if value and _is_value(value)
            ]
            clauses.append(
                authres.core.AuthenticationResult(
                    "dkim", result=r.result, reason=r.reason or None, properties=properties
                )
            )
        dmarc_properties = (
            [prop("header", "from", self.dmarc.header_from)]
            if _is_value(self.dmarc.header_from)
            else []
        )
        clauses.append(
            authres.core.AuthenticationResult(
                "dmarc",
                result=self.dmarc.result,
                result_comment=f"p={self.dmarc.policy}" if self.dmarc.policy else None,
                reason=self.dmarc.reason or None,
                properties=dmarc_properties,
            )
        )
        clauses.append(
            authres.core.AuthenticationResult(
                "arc", result=self.arc.result, reason=self.arc.reason or None
            )
        )
        return clauses


def _is_value(text: str) -> bool:
    """Only printable ASCII goes into a property value (RFC 8601 §2.2 pvalue)."""
    return bool(text) and text.isascii() and text.isprintable() and "\\" not in text


_COMMENT = re.compile(r"\((?:[^()\\]|\\.)*\)")
_FIELD = re.compile(rb"^([!-9;-~]+)[ \t]*:", re.MULTILINE)


def authserv_id_of(value: str) -> str:
    """The authserv-id of an Authentication-Results value: its first token, without comments."""
    previous = None
    while previous != value:  # comments may nest (RFC 5322 §3.2.2)
        previous, value = value, _COMMENT.sub(" ", value)
    token = value.strip().split(";", 1)[0].strip().split()
    ident = token[0] if token else ""
    return ident.strip('"').lower()


def remove_our_results(raw: bytes, authserv_id: str) -> bytes:
    """``raw`` without Authentication-Results fields that claim our authserv-id (RFC 8601 §5):
    anyone can write one, and a reader must be able to trust the ones with our name."""
    head = header_block(raw)
    if b"authentication-results" not in head.lower():
        return raw
    ours = authserv_id.lower()
    kept: list[bytes] = []
    dropping = False
    for line in head.splitlines(keepends=True):
        if line[:1] in (b" ", b"\t"):
            if not dropping:
                kept.append(line)
            continue
        dropping = False
        match = _FIELD.match(line)
        if match and match.group(1).lower() == b"authentication-results":
            field_text = _unfolded_field(head, line)
            value = field_text.split(b":", 1)[1].decode("utf-8", "replace")
            if authserv_id_of(value) == ours:
                dropping = True
                continue
        kept.append(line)
    return b"".join(kept) + raw[len(head) :]


def _unfolded_field(head: bytes, first_line: bytes) -> bytes:
    start = head.index(first_line)
    lines = [first_line]
    for line in head[start + len(first_line) :].splitlines(keepends=True):
        if line[:1] not in (b" ", b"\t"):
            break
        lines.append(line)
    return b"".join(lines).replace(b"\r\n", b"").replace(b"\n", b"")


def single_from(raw: bytes) -> str:
    """The From address when there is exactly one From header with one address, else ``""``."""
    values = parse_headers(raw).get_all("From", [])
    if len(values) != 1:
        return ""
    pairs = getaddresses([str(values[0])])
    if len(pairs) != 1 or "@" not in pairs[0][1]:
        return ""
    return pairs[0][1].strip().lower()


class AuthenticityChecker:
    """Runs SPF, DKIM, DMARC and ARC for a message as one call; thread-safe."""

    def __init__(
        self,
        resolver: CachingResolver,
        *,
        authserv_id: str,
        time_limit: float = 30.0,
        threads: int = 4,
        spf_default_explanation: str | None = None,
    ) -> None:
        self.resolver = resolver
        self.authserv_id = authserv_id.lower()
        self.time_limit = time_limit
        self.spf = SpfChecker(
            resolver,
            receiver=authserv_id,
            time_limit=time_limit,
            default_explanation=spf_default_explanation,
        )
        self.dkim = DkimVerifier(resolver)
        self._threads = threads
        self._executor: ThreadPoolExecutor | None = None

    def verify(
        self, raw: bytes, *, ip: str, helo: str, mail_from: str, header_from: str | None = None
    ) -> Verdicts:
        """All verdicts for ``raw`` as received from ``ip`` (blocking; DNS inside).

        ``header_from`` is the one From address when the caller already has it; otherwise it is
        read from ``raw`` (and is empty unless there is exactly one).
        """
        timings: dict[str, float] = {}
        started = time.perf_counter()
        spf_result = self.spf.check(ip, mail_from, helo)
        after_spf = time.perf_counter()
        dkim_results = tuple(self.dkim.verify_all(raw))
        after_dkim = time.perf_counter()
        author = single_from(raw) if header_from is None else header_from
        dmarc_result = evaluate_dmarc(
            self.resolver, author.rpartition("@")[2], spf_result, dkim_results
        )
        after_dmarc = time.perf_counter()
        arc_result = verify_arc(raw, self.resolver)
        done = time.perf_counter()
        timings.update(
            spf=after_spf - started,
            dkim=after_dkim - after_spf,
            dmarc=after_dmarc - after_dkim,
            arc=done - after_dmarc,
        )
        return Verdicts(
            self.authserv_id, spf_result, dkim_results, dmarc_result, arc_result, timings
        )

    async def verify_async(
        self, raw: bytes, *, ip: str, helo: str, mail_from: str, header_from: str | None = None
    ) -> Verdicts:
        """:meth:`verify` without blocking the event loop, within ``time_limit`` (else
        :class:`TemporaryFailure`).

        While every answer it needs is cached it runs right here (a thread hop and the GIL
        hand-offs cost more than the checks); at the first uncached lookup it starts again in
        this checker's threads, where waiting for DNS stalls nobody.
        """
        token = _CACHE_ONLY.set(True)
        try:
            return self.verify(raw, ip=ip, helo=helo, mail_from=mail_from, header_from=header_from)
        except CacheMiss:
            pass
        finally:
            _CACHE_ONLY.reset(token)
        if self._executor is None:
            self._executor = ThreadPoolExecutor(
                max_workers=self._threads, thread_name_prefix="mailgate-verify"
            )
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(
            self._executor,
            functools.partial(
                self.verify, raw, ip=ip, helo=helo, mail_from=mail_from, header_from=header_from
            ),
        )
        try:
            return await asyncio.wait_for(future, self.time_limit)
        except TimeoutError:
            raise TemporaryFailure(
                f"the SPF, DKIM and DMARC checks took longer than {self.time_limit:g} s"
            ) from None

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
