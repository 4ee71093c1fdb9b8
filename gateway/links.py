"""Signed, expiring links to a message's raw MIME and attachments on the admin API.

The CRM gets URLs, not bytes: ``…/api/v1/messages/ID/attachments/N?expires=T&sig=S`` where ``S`` is
an HMAC-SHA256 (keyed by ``hooks.link_secret``) of the path and the expiry. Whoever holds the link
may fetch that one thing until ``T``; an admin token works too.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from urllib.parse import urlencode


def _mac(secret: str, path: str, expires: int) -> str:
    return hmac.new(secret.encode(), f"{path}\n{expires}".encode(), hashlib.sha256).hexdigest()


def signed_url(
    base: str, path: str, *, secret: str, lifetime: int, now: float | None = None
) -> str:
    expires = int((time.time() if now is None else now) + lifetime)
    query = urlencode({"expires": expires, "sig": _mac(secret, path, expires)})
    return f"{base.rstrip('/')}{path}?{query}"


def valid(path: str, *, expires: int, sig: str, secret: str, now: float | None = None) -> bool:
    if not secret or expires < (time.time() if now is None else now):
        return False
    return hmac.compare_digest(_mac(secret, path, expires), sig)
