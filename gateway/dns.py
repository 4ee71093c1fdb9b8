"""The one DNS resolver every part of the gateway asks (MX now; SPF, DKIM and DMARC later).

Built from ``[dns]`` settings: explicit name servers and port (a test's authoritative server, an
admin's local resolver) or the system's ``resolv.conf``; one timeout for every query.
"""

from __future__ import annotations

import dns.asyncresolver
import dns.resolver

from gateway.settings import DnsSettings


def make_resolver(settings: DnsSettings) -> dns.asyncresolver.Resolver:
    if settings.nameservers:
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = list(settings.nameservers)
        resolver.port = settings.port
    else:
        resolver = dns.asyncresolver.Resolver()
    resolver.lifetime = settings.timeout_seconds
    resolver.timeout = settings.timeout_seconds
    return resolver


def make_sync_resolver(settings: DnsSettings) -> dns.resolver.Resolver:
    """The same, blocking: for libraries (dkimpy, pyspf) that call DNS synchronously."""
    if settings.nameservers:
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = list(settings.nameservers)
        resolver.port = settings.port
    else:
        resolver = dns.resolver.Resolver()
    resolver.lifetime = settings.timeout_seconds
    resolver.timeout = settings.timeout_seconds
    return resolver
