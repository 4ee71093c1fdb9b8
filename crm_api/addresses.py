"""Email-address and subject normalisation, pure and without I/O: an address is stripped,
lower-cased and its domain turned into punycode with Python's ``idna`` codec, so that
``Ann@Exämple.COM `` and ``ann@xn--exmple-cua.com`` are the same contact; Message-IDs lose their
angle brackets and case; subjects lose their reply/forward prefixes for thread matching."""

from __future__ import annotations

import re

MAX_ADDRESS = 254  # RFC 5321 §4.5.3.1.3 (path limit less the angle brackets)
MAX_LOCAL = 64  # RFC 5321 §4.5.3.1.1
_LOCAL_FORBIDDEN = re.compile(r'[\s<>()\[\]\\,;:@"]')
_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
# Re:, Fwd:, Fw:, AW: (German), SV: (Nordic), WG: (German forward), VS:, TR:, Antw:, with
# counters such as "Re[2]:" and repeated prefixes such as "Re: Fwd: Re:".
_PREFIXES = re.compile(r"^\s*(?:(?:re|fwd?|aw|sv|wg|vs|tr|antw)\s*(?:\[\d+\])?\s*:\s*)+", re.I)
_SPACES = re.compile(r"\s+")


class InvalidAddress(ValueError):
    """The text is not an email address we can store."""


def normalise_domain(domain: str) -> str:
    domain = domain.strip().rstrip(".").lower()
    try:
        ascii_domain = domain.encode("idna").decode("ascii")
    except UnicodeError as exc:
        raise InvalidAddress(f"domain {domain!r} is not a valid (IDN) domain name") from exc
    labels = ascii_domain.split(".")
    if len(labels) < 2 or not all(_LABEL.match(label) for label in labels):
        raise InvalidAddress(f"domain {domain!r} is not a valid domain name")
    return ascii_domain


def normalise_address(text: str) -> str:
    """``'  Ann@Exämple.COM '`` → ``'ann@xn--exmple-cua.com'``; raises :class:`InvalidAddress`."""
    value = text.strip()
    local, at, domain = value.rpartition("@")
    if not at or not local or not domain:
        raise InvalidAddress(f"{text!r} is not an email address (expected local@domain)")
    if len(local) > MAX_LOCAL or _LOCAL_FORBIDDEN.search(local) or ".." in local:
        raise InvalidAddress(f"{text!r} is not a valid address: bad local part")
    if local.startswith(".") or local.endswith("."):
        raise InvalidAddress(f"{text!r} is not a valid address: bad local part")
    address = f"{local.lower()}@{normalise_domain(domain)}"
    if len(address) > MAX_ADDRESS:
        raise InvalidAddress(f"{text!r} is longer than {MAX_ADDRESS} characters")
    return address


def try_normalise(text: str) -> str | None:
    try:
        return normalise_address(text)
    except InvalidAddress:
        return None


def domain_of(address: str) -> str:
    return address.rpartition("@")[2]


def local_of(address: str) -> str:
    return address.rpartition("@")[0]


def in_domains(address: str, domains: set[str]) -> bool:
    """True when the address is at one of ``domains`` or a subdomain of one."""
    domain = domain_of(address)
    while domain:
        if domain in domains:
            return True
        _, dot, domain = domain.partition(".")
        if not dot:
            return False
    return False


def is_group_address(address: str, group_local_parts: set[str]) -> bool:
    """Role accounts (noreply@, info@, …), including variants such as ``noreply-billing@``."""
    local = local_of(address).split("+", 1)[0]
    if local in group_local_parts:
        return True
    return local.startswith(("noreply", "no-reply", "donotreply", "do-not-reply"))


def normalise_message_id(text: str) -> str:
    """``' <ABC@Host> '`` → ``'abc@host'`` (case folded: several MUAs re-case Message-IDs)."""
    return text.strip().removeprefix("<").removesuffix(">").strip().lower()


def subject_key(subject: str) -> str:
    """The subject as thread matching sees it: no Re:/Fwd:/AW:/SV: prefixes, spaces collapsed,
    lower case, at most 200 characters."""
    return _SPACES.sub(" ", _PREFIXES.sub("", subject)).strip().lower()[:200]
