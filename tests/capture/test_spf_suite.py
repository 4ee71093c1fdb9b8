"""The RFC 7208 SPF test suite, its zone data served by NSD, checked through our resolver.

Every scenario's zone data goes into a private NSD as real zones; each case then runs through
:class:`SpfChecker` with a :class:`CachingResolver` (cache off) pointed at it, exactly as the
door checks mail, and must give the suite's result (any of its listed results) and, where the
suite names one, its explanation. A root zone makes names outside the scenario's data NXDOMAIN,
as they are in the real DNS. Two things of the suite's own test driver are expressed as
DNS can express them, and nothing is skipped:

- ``TIMEOUT`` names become zones NSD is configured for but has no data for: it answers SERVFAIL
  for them and below, which a resolver reports the way it reports a timeout (a temporary
  error, RFC 7208 §2.6.6 ``temperror``). ``spftimeout.example.net`` has TXT data and times out
  only for type-99 (SPF) queries, which RFC 7208 clients never make: it is served normally.
- An SPF/TXT record of zero strings (``null.example.com``'s ``SPF: []``) cannot exist in DNS
  (RFC 1035 §3.3.14: one or more character-strings); it is served as one empty string, which
  a checker treats the same way (not an SPF record).
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dns.exception
import dns.message
import dns.query
import dns.rcode
import pytest
import yaml

from gateway.authenticity import CachingResolver, SpfChecker
from tests.capture.conftest import zone_string
from tests.servers._process import wait_until
from tests.servers.dns import AuthoritativeDns

SUITE = Path(__file__).parent / "data" / "rfc7208-tests.yml"
SCENARIOS: list[dict[str, Any]] = list(yaml.safe_load_all(SUITE.read_text(encoding="utf-8")))
CASES = [
    pytest.param(index, name, case, id=f"{index:02d}-{name}")
    for index, scenario in enumerate(SCENARIOS)
    for name, case in scenario["tests"].items()
]


def owner(name: str) -> str:
    """A zone-file owner name: characters other than letters, digits, ``-``, ``_`` and ``.`` as
    \\DDD (the suite has names with spaces and ``%`` in them)."""
    return (
        "".join(
            c if c.isascii() and (c.isalnum() or c in "-_.") else f"\\{ord(c):03d}" for c in name
        )
        + "."
    )


def records_of(name: str, entries: list[Any]) -> tuple[list[str], bool]:
    """Zone lines for one name, and whether it times out (pyspf's driver rules: SPF records
    are copied to TXT unless the name has TXT data or ``TXT: NONE``)."""
    lines: list[str] = []
    has_txt = any(isinstance(e, dict) and "TXT" in e for e in entries)
    timeout = "TIMEOUT" in entries
    for entry in entries:
        if not isinstance(entry, dict):
            continue
        for rtype, value in entry.items():
            if rtype in ("TXT", "SPF"):
                if value == "NONE":
                    continue
                strings = [value] if isinstance(value, str) else list(value)
                text = " ".join(zone_string(s.encode("utf-8")) for s in strings) or '""'
                lines.append(f"{owner(name)} IN {rtype} {text}")
                if rtype == "SPF" and not has_txt:
                    lines.append(f"{owner(name)} IN TXT {text}")
            elif rtype == "MX":
                lines.append(
                    f"{owner(name)} IN MX {value[0]} {owner(value[1]) if value[1] else '.'}"
                )
            elif rtype in ("PTR", "CNAME"):
                lines.append(f"{owner(name)} IN {rtype} {owner(value.rstrip('.'))}")
            elif rtype in ("A", "AAAA"):
                lines.append(f"{owner(name)} IN {rtype} {value}")
            else:
                raise AssertionError(f"record type {rtype} of {name} is not handled")
    real_txt = any(isinstance(e, dict) and e.get("TXT", "NONE") != "NONE" for e in entries)
    served_anyway = timeout and real_txt  # only its type-99 lookups would have timed out
    return lines, timeout and not served_anyway


def zones_of(zonedata: dict[str, list[Any]]) -> tuple[dict[str, list[str]], list[str]]:
    """Zones (apex -> lines) holding every name, and the broken zones that stand for TIMEOUT."""
    names = {name.lower().rstrip("."): records_of(name.lower(), e) for name, e in zonedata.items()}
    broken = sorted(name for name, (_, times_out) in names.items() if times_out)
    zones: dict[str, list[str]] = {}
    for name, (lines, times_out) in names.items():
        if times_out:
            continue
        labels = name.split(".")
        # NSD answers from the closest enclosing zone it serves, so a name under a broken
        # (TIMEOUT) name gets a zone of its own just below it; others share the domain's zone.
        below = [b for b in broken if name.endswith("." + b)]
        size = max((b.count(".") + 2 for b in below), default=2)
        apex = ".".join(labels[-size:])
        zones.setdefault(apex, []).extend(lines)
    return zones, broken


class ScenarioDns:
    """One scenario's zones at a time in a private NSD."""

    def __init__(self, server: AuthoritativeDns) -> None:
        self.server = server
        self.current: int | None = None
        self.zones: list[str] = []
        self.broken: list[str] = []
        # A root zone, so that a name outside the scenario's zones is NXDOMAIN, as it is in the
        # real DNS, rather than REFUSED by an authoritative server that does not know it.
        (server.directory / "..zone").write_text(
            "$ORIGIN .\n$TTL 60\n. IN SOA ns1.root. hostmaster.root. ( 1 3600 600 86400 60 )\n"
            ". IN NS ns1.root.\n"
        )
        status, output = server._control("addzone", ".", "test")
        assert status == 0, output

    def activate(self, index: int) -> None:
        if self.current == index:
            return
        for zone in self.zones:
            self.server.remove(zone)
        for name in self.broken:
            status, output = self.server._control("delzone", name)
            assert status == 0, output
            wait_until(
                lambda name=name: self._rcode(name) != dns.rcode.SERVFAIL,
                timeout=10,
                what=f"nsd to drop {name}",
            )
        self.zones, self.broken = [], []
        zones, broken = zones_of(SCENARIOS[index].get("zonedata") or {})
        for apex, lines in zones.items():
            self.server.publish(apex, lines)
            self.zones.append(apex)
        for name in broken:
            # A zone NSD is told to serve but has no file for: it answers SERVFAIL.
            status, output = self.server._control("addzone", name, "test")
            assert status == 0, output
            wait_until(
                lambda name=name: self._rcode(name) == dns.rcode.SERVFAIL,
                timeout=10,
                what=f"nsd to serve {name} as SERVFAIL",
            )
            self.broken.append(name)
        self.current = index

    def _rcode(self, name: str) -> int:
        query = dns.message.make_query(name + ".", "TXT")
        try:
            return int(
                dns.query.udp(query, self.server.host, port=self.server.port, timeout=1).rcode()
            )
        except dns.exception.Timeout:
            return -1


@pytest.fixture(scope="module")
def scenario_dns() -> Iterator[ScenarioDns]:
    with AuthoritativeDns() as server:
        yield ScenarioDns(server)


@pytest.mark.parametrize(("index", "name", "case"), CASES)
def test_rfc7208_case(
    scenario_dns: ScenarioDns, index: int, name: str, case: dict[str, Any]
) -> None:
    scenario_dns.activate(index)
    resolver = CachingResolver(scenario_dns.server.resolver(timeout=1.0), max_ttl=0)
    checker = SpfChecker(
        resolver,
        receiver=case.get("receiver", ""),
        default_explanation="DEFAULT",
    )
    expected = case["result"] if isinstance(case["result"], list) else [case["result"]]
    result = checker.check(case["host"], case["mailfrom"], case["helo"])
    assert result.result in expected, f"{name}: {case.get('description', '')} {case.get('spec')}"
    if "explanation" in case:
        assert result.explanation == case["explanation"]


def test_the_suite_is_all_here() -> None:
    # 203 cases in 16 scenarios in the 2014.04 release; a truncated file must not pass quietly.
    assert len(SCENARIOS) == 16
    assert len(CASES) == 203
    assert socket.inet_pton(socket.AF_INET6, "::1")  # the suite's IPv6 cases need IPv6 parsing
