"""Standard Webhooks signatures (https://www.standardwebhooks.com/): ``webhook-signature`` is a
space-separated list of ``v1,<base64 HMAC-SHA256>`` over ``f"{id}.{timestamp}.{body}"`` keyed by
the secret's bytes after ``whsec_``. Verification accepts any configured secret (rotation),
integer timestamps within the tolerance only, and compares in constant time. Failures raise
:class:`WebhookError` carrying the HTTP status: 400 for a malformed request, 401 for one that is
unsigned or whose signature or timestamp does not verify."""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from collections.abc import Mapping, Sequence

_TIMESTAMP = re.compile(r"^[0-9]{1,12}$")  # integer seconds only, per the specification


class WebhookError(Exception):
    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


def sign(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``v1,…`` signature for one key (what the gateway sends)."""
    mac = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256)
    return "v1," + base64.b64encode(mac.digest()).decode("ascii")


def verify(
    *,
    keys: Sequence[bytes],
    headers: Mapping[str, str],
    body: bytes,
    now: float,
    tolerance: int = 300,
) -> tuple[str, int]:
    """Check a request's signature; return its ``(webhook-id, timestamp)``."""
    msg_id = headers.get("webhook-id")
    stamp = headers.get("webhook-timestamp")
    signature = headers.get("webhook-signature")
    missing = [
        name
        for name, value in (
            ("webhook-id", msg_id),
            ("webhook-timestamp", stamp),
            ("webhook-signature", signature),
        )
        if not value
    ]
    if missing or msg_id is None or stamp is None or signature is None:
        raise WebhookError(401, f"unsigned webhook: missing header(s) {', '.join(missing)}")
    if len(msg_id) > 200 or not msg_id.isprintable():
        raise WebhookError(400, "malformed webhook-id: at most 200 printable characters")
    if not _TIMESTAMP.match(stamp):
        raise WebhookError(400, "malformed webhook-timestamp: integer seconds since the epoch")
    timestamp = int(stamp)
    if abs(now - timestamp) > tolerance:
        raise WebhookError(
            401, f"webhook-timestamp is more than {tolerance} s away from the receiver's clock"
        )
    if not keys:
        raise WebhookError(401, "no webhook secret is configured on the CRM (webhooks.secrets)")
    offered = [
        part.removeprefix("v1,").encode("ascii", "replace")
        for part in signature.split(" ")
        if part.startswith("v1,")
    ]
    if not offered:
        raise WebhookError(400, "malformed webhook-signature: expected 'v1,<base64>' entries")
    for key in keys:
        expected = sign(key, msg_id, timestamp, body).removeprefix("v1,").encode("ascii")
        # Compare against every offered signature (no early exit) so timing reveals nothing.
        matched = False
        for candidate in offered:
            matched |= hmac.compare_digest(expected, candidate)
        if matched:
            return msg_id, timestamp
    raise WebhookError(401, "webhook signature does not match any configured secret")
