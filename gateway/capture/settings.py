"""The ``[capture]`` table: the inbound door for the capture domain."""

from __future__ import annotations

from typing import Literal

from gateway.settings_base import Section, opt


class CaptureSettings(Section):
    """The inbound door (port 25 in production) that takes BCC'd and forwarded mail."""

    enabled: bool = opt(False, "Listen for mail to the capture address")
    listen: str = opt("127.0.0.1", "Address to listen on")
    port: int = opt(8525, "Port (25 in production)", ge=0, le=65535)
    domain: str = opt("crm.localhost", "The capture domain: log@DOMAIN and log+TOKEN@DOMAIN")
    local_part: str = opt(
        "log", "Local part of the shared capture address (and of log+TOKEN@ secret addresses)"
    )
    authserv_id: str = opt(
        "", "authserv-id in the Authentication-Results header (empty: server.hostname)"
    )
    on_unverified: Literal["reject", "quarantine"] = opt(
        "reject",
        "A known user's message without an aligned SPF or DKIM pass: refuse it at DATA (reject) "
        "or hold it for an admin (quarantine)",
    )
    sharing: Literal["private", "custom", "public"] = opt(
        "public", "Sharing level of mail logged through the capture door"
    )
    max_message_size: int = opt(35 * 1024 * 1024, "Largest message in bytes (SIZE)", ge=1024)
    max_recipients: int = opt(10, "Capture addresses per message", ge=1, le=100)
    timeout_seconds: float = opt(
        300, "Idle time before a session is closed (RFC 5321 section 4.5.3.2.7)", gt=0
    )
    verify_timeout_seconds: float = opt(
        30, "Time limit of all SPF, DKIM, DMARC and ARC checks of one message (then 451)", gt=0
    )
    verify_threads: int = opt(
        4, "Threads that run the (blocking) checks, so slow DNS never stalls the door", ge=1
    )
    dns_cache_seconds: float = opt(
        300, "Longest time a DNS answer is reused (shorter when its TTL is)", ge=0
    )
    dns_cache_entries: int = opt(10_000, "DNS answers kept in memory", ge=0)
    directory_cache_seconds: float = opt(
        5, "How long the door reuses its view of users, addresses and tokens", ge=0
    )
