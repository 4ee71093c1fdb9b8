"""Provider presets: the IMAP and SMTP settings a user gets by naming their mail provider.

The presets live in TOML (``conf/providers.toml``, with an identical copy shipped inside the
package so a ``pip install .`` has them); ``imap.providers_file`` points at another file for sites
that add their own. A preset also carries what we tell a user when a login fails at that provider
(app passwords, where IMAP is switched on), because the right sentence differs per provider.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Literal, cast

from gateway.errors import ConfigError

Security = Literal["ssl", "starttls", "none"]
SECURITIES: tuple[Security, ...] = ("ssl", "starttls", "none")

GENERIC_APP_PASSWORD_HINT = (
    "If two-factor authentication is on for this mailbox, the provider usually refuses the "
    "normal password: create an app-specific password and use it here."
)
GENERIC_IMAP_DISABLED_HINT = "Ask the provider or mail administrator to enable IMAP access."


@dataclass(frozen=True, slots=True)
class Provider:
    key: str
    name: str
    imap_host: str
    imap_port: int
    imap_security: Security
    smtp_host: str
    smtp_port: int
    smtp_security: Security
    max_connections: int = 2
    # The provider files mail submitted over its SMTP in Sent by itself (no APPEND from us).
    saves_sent: bool = False
    # OAuth sign-in (gateway.imap.oauth): which client ("google", "microsoft"), and endpoints
    # or scopes of its own where a preset needs them (a self-hosted identity provider).
    oauth: str = ""
    oauth_authorize_url: str = ""
    oauth_token_url: str = ""
    oauth_scopes: tuple[str, ...] = ()
    app_password_hint: str = GENERIC_APP_PASSWORD_HINT
    imap_disabled_hint: str = GENERIC_IMAP_DISABLED_HINT


def bundled_text() -> str:
    """The presets shipped inside the package."""
    return resources.files("gateway.imap").joinpath("providers.toml").read_text(encoding="utf-8")


def load_providers(path: Path | None = None) -> dict[str, Provider]:
    """The presets from ``path`` (``imap.providers_file``) or the bundled file, by key."""
    origin = str(path) if path else "the bundled providers.toml"
    try:
        text = path.read_text(encoding="utf-8") if path else bundled_text()
        data = tomllib.loads(text)
    except OSError as exc:
        raise ConfigError(
            f"`imap.providers_file` = {origin}: cannot read it ({exc.strerror}); "
            "fix the path or unset it to use the bundled presets"
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{origin}: not valid TOML ({exc}); fix the syntax there") from None
    providers: dict[str, Provider] = {}
    for key, table in data.items():
        try:
            providers[key] = _provider(key, table)
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"{origin}: preset [{key}] is incomplete or wrong ({exc})") from None
    return providers


def _provider(key: str, table: dict[str, object]) -> Provider:
    def security(name: str) -> Security:
        value = str(table[name])
        if value not in SECURITIES:
            raise ValueError(f"{name} must be one of {', '.join(SECURITIES)}, not {value!r}")
        return value

    return Provider(
        key=key,
        name=str(table.get("name", key)),
        imap_host=str(table["imap_host"]),
        imap_port=int(cast(int, table["imap_port"])),
        imap_security=security("imap_security"),
        smtp_host=str(table["smtp_host"]),
        smtp_port=int(cast(int, table["smtp_port"])),
        smtp_security=security("smtp_security"),
        max_connections=int(cast(int, table.get("max_connections", 2))),
        saves_sent=bool(table.get("saves_sent", False)),
        oauth=str(table.get("oauth", "")),
        oauth_authorize_url=str(table.get("oauth_authorize_url", "")),
        oauth_token_url=str(table.get("oauth_token_url", "")),
        oauth_scopes=tuple(str(x) for x in cast(list[object], table.get("oauth_scopes", []))),
        app_password_hint=str(table.get("app_password_hint", GENERIC_APP_PASSWORD_HINT)),
        imap_disabled_hint=str(table.get("imap_disabled_hint", GENERIC_IMAP_DISABLED_HINT)),
    )
