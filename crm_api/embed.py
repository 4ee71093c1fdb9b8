"""The CRM as ``mailgate serve`` embeds it: the same app as ``mailgate crm serve``, built from
the CRM's own settings (``$MAILGATE_CRM_CONFIG`` / conf/crm.toml / ``MAILGATE_CRM_…``) and
listening where the gateway's ``crm.url`` points, so the gateway reaches it over HTTP exactly as
it would reach any other CRM."""

from __future__ import annotations

from urllib.parse import urlsplit

from fastapi import FastAPI

from crm_api.main import create_app
from crm_api.settings import load_settings


def embedded_app(url: str, config: str | None = None) -> tuple[FastAPI, str, int]:
    """``(ASGI app, host, port)`` for the gateway to serve beside its own doors; ``config`` is
    the CRM's own config file (None: ``$MAILGATE_CRM_CONFIG`` or conf/crm.toml)."""
    settings = load_settings(config)
    parsed = urlsplit(url)
    return create_app(settings), parsed.hostname or settings.host, parsed.port or settings.port
