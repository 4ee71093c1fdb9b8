"""The ``[capture]`` table: the inbound door for the capture domain."""

from __future__ import annotations

from gateway.settings_base import Section, opt


class CaptureSettings(Section):
    """The inbound door (port 25 in production) that takes BCC'd and forwarded mail."""

    enabled: bool = opt(False, "Listen for mail to the capture address")
    listen: str = opt("127.0.0.1", "Address to listen on")
    port: int = opt(8525, "Port (25 in production)", ge=0, le=65535)
    domain: str = opt("crm.localhost", "The capture domain: log@DOMAIN and log+TOKEN@DOMAIN")
