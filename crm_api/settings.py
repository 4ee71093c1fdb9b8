"""Configuration of the CRM, loaded once: defaults, then the TOML file (``--config``, else
``$MAILGATE_CRM_CONFIG``, else ``conf/crm.toml`` when present), then ``MAILGATE_CRM_…``
environment variables (nested keys joined by ``__``, e.g. ``MAILGATE_CRM_WEBHOOKS__SECRETS``).
Every mistake becomes a :class:`ConfigError` whose message is one line naming the key and the fix,
so the CLI can print it instead of a traceback. ``conf/crm.toml`` documents every option."""

from __future__ import annotations

import base64
import binascii
import os
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

CONFIG_ENV = "MAILGATE_CRM_CONFIG"
DEFAULT_CONFIG = Path("conf/crm.toml")

# Mail providers whose addresses are people, not companies: logging them as company contacts
# would be wrong, so they start out excluded (the admin can edit the list).
PERSONAL_PROVIDERS = [
    "gmail.com",
    "googlemail.com",
    "outlook.com",
    "hotmail.com",
    "live.com",
    "yahoo.com",
    "icloud.com",
    "me.com",
    "aol.com",
    "gmx.de",
    "gmx.net",
    "web.de",
    "proton.me",
    "protonmail.com",
]

# Role accounts: mail from/to them is logged but never turns into a contact.
GROUP_LOCAL_PARTS = [
    "noreply",
    "no-reply",
    "donotreply",
    "do-not-reply",
    "info",
    "support",
    "sales",
    "admin",
    "postmaster",
    "mailer-daemon",
    "hostmaster",
    "webmaster",
    "abuse",
    "billing",
]


class ConfigError(Exception):
    """A configuration problem, phrased as one line with the fix."""


class WebhookSettings(BaseModel):
    """The gateway's webhooks: shared secrets (several, so a secret can be rotated) and the
    accepted clock skew."""

    model_config = ConfigDict(extra="forbid")

    secrets: list[str] = Field(default_factory=list)
    tolerance_seconds: int = Field(default=300, ge=1, le=3600)

    @field_validator("secrets")
    @classmethod
    def _secrets_are_standard_webhooks(cls, value: list[str]) -> list[str]:
        for secret in value:
            secret_bytes(secret)
        return value

    def secret_keys(self) -> list[bytes]:
        return [secret_bytes(s) for s in self.secrets]


class GatewaySettings(BaseModel):
    """The Mailgate gateway this CRM sends mail through (``POST /api/v1/messages`` there)."""

    model_config = ConfigDict(extra="forbid")

    url: str = "http://127.0.0.1:8026"
    token: str = ""  # an admin API token of the gateway; empty: sending is off
    timeout_seconds: float = Field(default=30.0, gt=0)


class PolicySettings(BaseModel):
    """Seed values for the organisation's policy; stored in the database on first start and
    edited afterwards through ``PUT /api/v1/settings``."""

    model_config = ConfigDict(extra="forbid")

    auto_create: Literal["none", "sent", "sent_and_received"] = "sent"
    company_domains: list[str] = Field(default_factory=list)
    excluded_domains: list[str] = Field(default_factory=lambda: list(PERSONAL_PROVIDERS))
    assigned_records_only: bool = False
    excluded_mail: Literal["owner_only", "follow_sharing"] = "owner_only"
    group_local_parts: list[str] = Field(default_factory=lambda: list(GROUP_LOCAL_PARTS))


class Settings(BaseSettings):
    """Everything the CRM process needs; built once and hung on ``app.state.settings``."""

    model_config = SettingsConfigDict(
        env_prefix="MAILGATE_CRM_",
        env_nested_delimiter="__",
        extra="forbid",
    )

    database_url: str = "sqlite:///var/crm.db"
    host: str = "127.0.0.1"
    port: int = Field(default=8025, ge=1, le=65535)
    max_body_bytes: int = Field(default=5 * 1024 * 1024, ge=1024)
    auto_migrate: bool = True
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    webhooks: WebhookSettings = Field(default_factory=WebhookSettings)
    gateway: GatewaySettings = Field(default_factory=GatewaySettings)
    policy: PolicySettings = Field(default_factory=PolicySettings)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The file's values arrive as init arguments; the environment must win over them.
        return (env_settings, init_settings)


def secret_bytes(secret: str) -> bytes:
    """Decode a Standard Webhooks secret (``whsec_`` + base64 of 24-64 random bytes)."""
    if not secret.startswith("whsec_"):
        raise ValueError("a webhook secret must start with 'whsec_' (run `mailgate crm secret`)")
    try:
        key = base64.b64decode(secret.removeprefix("whsec_"), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(
            "the part after 'whsec_' must be base64 (run `mailgate crm secret`)"
        ) from None
    if not 24 <= len(key) <= 64:
        raise ValueError("a webhook secret must decode to 24-64 bytes (run `mailgate crm secret`)")
    return key


def config_path(explicit: str | None = None) -> Path | None:
    """The config file to read, or None when there is none (defaults and environment only)."""
    if explicit:
        return Path(explicit)
    if env := os.environ.get(CONFIG_ENV):
        return Path(env)
    return DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None


def load_settings(path: str | Path | None = None) -> Settings:
    """Build :class:`Settings` from the file at ``path`` (see :func:`config_path`) and the
    environment, or raise :class:`ConfigError` with one line naming the key and the fix."""
    file = config_path(str(path) if path else None)
    data: dict[str, Any] = {}
    where = "environment"
    if file is not None:
        where = str(file)
        try:
            data = tomllib.loads(file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(
                f"{file}: no such config file; create it or pass --config PATH"
            ) from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(
                f"{file}: not valid TOML ({exc}); fix the syntax at that line"
            ) from None
    try:
        return Settings(**data)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            raise ConfigError(
                f"{where}: unknown option '{key}'; remove it or fix its spelling "
                "(conf/crm.toml lists every option)"
            ) from None
        msg = str(err["msg"]).removeprefix("Value error, ")
        env_name = "MAILGATE_CRM_" + "__".join(str(p) for p in err["loc"][:2]).upper()
        source = env_name if env_name in os.environ else where
        raise ConfigError(f"{source}: option '{key}' is invalid: {msg}") from None
