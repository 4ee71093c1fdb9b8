"""The deliverability check: does DOMAIN's DNS let receivers trust the mail we send for it?

``mailgate dns check DOMAIN`` and the admin API read three things and say, line by line, what
holds and what to publish. SPF (RFC 7208): one record, that authorises the address our mail
leaves from (``relay.host`` resolved, or this host in ``mx`` mode), within the ten DNS lookups
of §4.6.4. DKIM (RFC 6376): for each selector we hold a key for, the published record's ``p=``
is our public key. DMARC (RFC 7489): a record exists, its policy, and whether our signature can
align with it. A finding is ``ok``, ``warn`` (works, could be better) or ``fail`` (receivers will
reject or junk the mail); the command exits non-zero when anything fails.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from gateway.authenticity import CachingResolver, DnsTempError, SpfChecker, find_dmarc
from gateway.dkim import DkimKey, KeyRing, normalise_domain
from gateway.settings import RelaySettings

Severity = Literal["ok", "warn", "fail"]
MAX_LOOKUPS = 10  # RFC 7208 §4.6.4
_COUNTED = ("include", "a", "mx", "ptr", "exists")  # mechanisms that cost a DNS lookup


@dataclass(frozen=True, slots=True)
class Finding:
    check: Literal["spf", "dkim", "dmarc"]
    severity: Severity
    text: str
    publish: str = ""  # the DNS record (zone-file line) that would fix it


@dataclass(slots=True)
class Report:
    domain: str
    findings: list[Finding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(f.severity != "fail" for f in self.findings)

    def lines(self) -> list[str]:
        out = []
        for f in self.findings:
            out.append(f"{f.severity.upper():4}  {f.check:5}  {f.text}")
            if f.publish:
                out.append(f"{'':13}publish: {f.publish}")
        return out

    def as_dict(self) -> dict[str, Any]:
        return {
            "domain": self.domain,
            "ok": self.ok,
            "findings": [asdict(f) for f in self.findings],
        }


def check_domain(
    domain: str,
    *,
    resolver: CachingResolver,
    keys: KeyRing,
    relay: RelaySettings,
    hostname: str,
) -> Report:
    """Read DOMAIN's SPF, DKIM and DMARC records and judge them (blocking; DNS inside)."""
    name = normalise_domain(domain)
    if not name:
        raise ValueError(f"{domain!r} is not a domain name")
    report = Report(name)
    own_keys = keys.for_domain(name)
    for check in (_spf, _dkim, _dmarc):
        try:
            report.findings += check(name, resolver, own_keys, relay, hostname)
        except DnsTempError as exc:
            report.findings.append(
                Finding(check.__name__[1:], "fail", f"cannot read DNS: {exc}")  # type: ignore[arg-type]
            )
    return report


# -- SPF ---------------------------------------------------------------------------------------


def _spf_records(resolver: CachingResolver, domain: str) -> list[str]:
    texts = [t.decode("utf-8", "replace") for t in resolver.txt(domain)]
    return [t for t in texts if t.lower() == "v=spf1" or t.lower().startswith("v=spf1 ")]


def count_lookups(
    resolver: CachingResolver, domain: str, _seen: frozenset[str] = frozenset()
) -> int:
    """DNS-querying terms in ``domain``'s SPF record, includes and redirects followed."""
    records = _spf_records(resolver, domain)
    if len(records) != 1 or domain in _seen:
        return 0
    seen = _seen | {domain}
    total = 0
    for term in records[0].split()[1:]:
        mechanism, _, target = term.lstrip("+-~?").partition(":")
        key, equals, value = term.partition("=")
        if equals and key.lower() == "redirect":
            total += 1 + (count_lookups(resolver, value, seen) if "%" not in value else 0)
        elif mechanism.lower().split("/")[0] in _COUNTED:
            total += 1
            if mechanism.lower() == "include" and "%" not in target:
                total += count_lookups(resolver, target, seen)
    return total


def _relay_addresses(
    resolver: CachingResolver, relay: RelaySettings, hostname: str
) -> tuple[str, list[str]]:
    host = relay.host if relay.mode == "smarthost" else hostname
    label = f"relay.host {host}" if relay.mode == "smarthost" else f"this host ({host})"
    try:
        return label, [str(ipaddress.ip_address(host.strip("[]")))]
    except ValueError:
        pass
    found = [r.address for rdtype in ("A", "AAAA") for r in resolver.lookup(host, rdtype)]
    return label, found


def _spf(
    domain: str,
    resolver: CachingResolver,
    keys: Sequence[DkimKey],
    relay: RelaySettings,
    hostname: str,
) -> list[Finding]:
    label, addresses = _relay_addresses(resolver, relay, hostname)
    public = [a for a in addresses if ipaddress.ip_address(a).is_global]
    mechanisms = (
        " ".join(f"ip{ipaddress.ip_address(a).version}:{a}" for a in public)
        or f"a:{relay.host if relay.mode == 'smarthost' else hostname}"
    )
    suggestion = f'{domain}. IN TXT "v=spf1 {mechanisms} ~all"'
    records = _spf_records(resolver, domain)
    if not records:
        return [Finding("spf", "fail", f"{domain} publishes no SPF record", suggestion)]
    if len(records) > 1:
        return [
            Finding(
                "spf",
                "fail",
                f"{domain} publishes {len(records)} SPF records, which is an error for "
                "receivers (RFC 7208 section 4.5): merge them into one",
            )
        ]
    record = records[0]
    findings = [Finding("spf", "ok", f"record: {record}")]
    lookups = count_lookups(resolver, domain)
    if lookups > MAX_LOOKUPS:
        findings.append(
            Finding(
                "spf",
                "fail",
                f"evaluating it takes {lookups} DNS lookups; receivers stop at {MAX_LOOKUPS} "
                "(RFC 7208 section 4.6.4) and treat it as an error: replace includes with "
                "ip4:/ip6: ranges",
            )
        )
    else:
        findings.append(
            Finding("spf", "ok", f"{lookups} of {MAX_LOOKUPS} DNS lookups (RFC 7208 section 4.6.4)")
        )
    last = record.split()[-1].lower()
    if last in ("+all", "all"):
        findings.append(Finding("spf", "fail", "it ends in +all: it lets anyone send as " + domain))
    elif last == "?all" or not re.search(r"(^|\s)[-~]all$|redirect=", record.lower()):
        findings.append(
            Finding("spf", "warn", "it does not end in ~all or -all, so it proves little")
        )
    if not addresses:
        findings.append(
            Finding(
                "spf", "fail", f"cannot resolve {label}: set relay.host to a name that resolves"
            )
        )
    checker = SpfChecker(resolver, receiver=hostname)
    for address in addresses:
        if not ipaddress.ip_address(address).is_global:
            findings.append(
                Finding(
                    "spf",
                    "warn",
                    f"{label} is {address}, not a public address: make sure the record covers "
                    "the public address your mail leaves from (your provider's include:)",
                )
            )
            continue
        result = checker.check(address, f"postmaster@{domain}", hostname).result
        if result == "pass":
            findings.append(Finding("spf", "ok", f"it authorises {address} ({label})"))
        else:
            version = ipaddress.ip_address(address).version
            findings.append(
                Finding(
                    "spf",
                    "fail",
                    f"it does not authorise {address} ({label}): SPF gives {result}; add "
                    f"ip{version}:{address} (or your provider's include:)",
                    suggestion,
                )
            )
    return findings


# -- DKIM --------------------------------------------------------------------------------------


def _p_of(text: str) -> str:
    for part in text.split(";"):
        key, _, value = part.partition("=")
        if key.strip() == "p":
            return re.sub(r"\s+", "", value)
    return ""


def _dkim(
    domain: str,
    resolver: CachingResolver,
    keys: Sequence[DkimKey],
    relay: RelaySettings,
    hostname: str,
) -> list[Finding]:
    if not keys:
        return [
            Finding(
                "dkim",
                "fail",
                f"we hold no DKIM key for {domain}, so its mail goes out unsigned: run "
                f"`mailgate dkim keygen {domain}` and publish the record it prints",
            )
        ]
    findings = []
    for key in keys:
        where = key.record_name.rstrip(".")
        texts = [t.decode("utf-8", "replace") for t in resolver.txt(where)]
        ours = _p_of(key.record_value)
        kind = "ed25519" if key.algorithm == "ed25519-sha256" else "rsa"
        signer = "" if key.domain == domain else f" (we sign as d={key.domain})"
        if not texts:
            findings.append(
                Finding(
                    "dkim",
                    "fail",
                    f"selector {key.selector}: nothing is published at {where}{signer}",
                    key.txt_record(),
                )
            )
        elif any(_p_of(t) == ours for t in texts):
            findings.append(
                Finding(
                    "dkim",
                    "ok",
                    f"selector {key.selector}: the {kind} key at {where} matches ours{signer}",
                )
            )
        else:
            findings.append(
                Finding(
                    "dkim",
                    "fail",
                    f"selector {key.selector}: the key at {where} is not ours, so our "
                    f"signatures fail{signer}",
                    key.txt_record(),
                )
            )
    return findings


# -- DMARC -------------------------------------------------------------------------------------


def _dmarc(
    domain: str,
    resolver: CachingResolver,
    keys: Sequence[DkimKey],
    relay: RelaySettings,
    hostname: str,
) -> list[Finding]:
    record = find_dmarc(resolver, domain)
    if record is None:
        return [
            Finding(
                "dmarc",
                "fail",
                f"{domain} publishes no DMARC record; large mailbox providers junk or refuse "
                "mail from domains without one: start with p=none",
                f'_dmarc.{domain}. IN TXT "v=DMARC1; p=none; rua=mailto:dmarc-reports@{domain}"',
            )
        ]
    where = "" if record.domain == domain else f" (inherited from {record.domain})"
    policy = record.policy if record.domain == domain else record.subdomain_policy
    findings = [Finding("dmarc", "ok", f"record{where}: {record.text}")]
    if policy == "none":
        findings.append(
            Finding(
                "dmarc",
                "warn",
                "p=none only monitors; move to p=quarantine or p=reject once the reports show "
                "all your mail passes",
            )
        )
    else:
        findings.append(Finding("dmarc", "ok", f"policy {policy}"))
    if record.adkim == "s" and any(key.domain != domain for key in keys):
        findings.append(
            Finding(
                "dmarc",
                "fail",
                f"adkim=s, but we sign as d={keys[0].domain}, which then does not align: "
                f"run `mailgate dkim keygen {domain}` or relax adkim",
            )
        )
    return findings
