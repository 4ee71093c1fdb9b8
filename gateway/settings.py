"""Typed configuration, loaded once from ``conf/mailgate.toml`` and ``MAILGATE_…`` overrides.

The TOML file is the admin's; environment variables (``MAILGATE_RELAY__HOST=…``, sections joined
by a double underscore) win over it so containers can override single keys. Everything is loaded
in :func:`load_settings` and handed to the objects that need it as small typed sections: nothing
reads configuration at import time. A wrong option raises :class:`ConfigError` with one line that
names the key and the fix, which the CLI prints as it is.
"""

from __future__ import annotations

import difflib
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from gateway.errors import ConfigError

DEFAULT_CONFIG_PATH = Path("conf/mailgate.toml")
CONFIG_ENV = "MAILGATE_CONFIG"


class Section(BaseModel):
    """A TOML table: unknown keys are errors, so typos never pass silently."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerSettings(Section):
    hostname: str = "mailgate.localhost"
    data_dir: Path = Path("var")
    log_level: Literal["debug", "info", "warning", "error"] = "info"


class DatabaseSettings(Section):
    url: str = "sqlite:///var/mailgate.db"
    # Accepting sessions share one transaction when they arrive within this window (group commit).
    group_commit_window_ms: float = Field(default=2.0, ge=0, le=100)
    group_commit_max_batch: int = Field(default=128, ge=1, le=10_000)
    # A worker that dies leaves its claims behind; another may take them after this long.
    lease_seconds: int = Field(default=300, ge=10)


class SubmissionSettings(Section):
    enabled: bool = True
    listen: str = "127.0.0.1"
    # 587 and 465 in production; high ports by default so a first run needs no root.
    port: int = Field(default=8587, ge=0, le=65535)
    tls_port: int = Field(default=8465, ge=0, le=65535)
    cert_file: Path = Path("var/tls/cert.pem")
    key_file: Path = Path("var/tls/key.pem")
    # AUTH is only offered over TLS; this lets loopback clients (a local CRM) skip TLS.
    allow_plaintext_auth_on_loopback: bool = False
    max_message_size: int = Field(default=35 * 1024 * 1024, ge=1024)
    max_recipients: int = Field(default=100, ge=1)  # RFC 5321 §4.5.3.1.8: at least 100
    # RFC 5321 §4.5.3.2.7: the server should wait five minutes for a command.
    timeout_seconds: float = Field(default=300, gt=0)
    max_auth_failures: int = Field(default=3, ge=1)


class RelaySettings(Section):
    mode: Literal["smarthost", "mx"] = "smarthost"
    host: str = "127.0.0.1"
    port: int = Field(default=25, ge=1, le=65535)
    security: Literal["starttls", "tls", "none"] = "starttls"
    # STARTTLS only when the smarthost offers it; never set this for a host on the internet.
    require_tls: bool = True
    verify_certificate: bool = True
    ca_file: Path | None = None
    username: str = ""
    password: str = ""
    helo_name: str = ""
    connect_timeout_seconds: float = Field(default=30, gt=0)
    command_timeout_seconds: float = Field(default=120, gt=0)
    max_connections: int = Field(default=8, ge=1, le=256)
    # Minutes-to-hours backoff, as MTAs do; the last value repeats until the lifetime ends.
    retry_schedule_seconds: list[float] = Field(
        default_factory=lambda: [60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0]
    )
    queue_lifetime_seconds: float = Field(default=5 * 24 * 3600, gt=0)
    bounce_sender: str = ""  # empty: MAILER-DAEMON@<server.hostname>

    @field_validator("retry_schedule_seconds")
    @classmethod
    def _schedule_not_empty(cls, value: list[float]) -> list[float]:
        if not value or any(step <= 0 for step in value):
            raise ValueError("needs at least one positive number of seconds")
        return value


class DkimSettings(Section):
    enabled: bool = True
    key_dir: Path = Path("var/dkim")
    selector: str = "mailgate"
    # RFC 6376 §5.4.1 recommends these; From is required.
    headers: list[str] = Field(
        default_factory=lambda: [
            "from",
            "to",
            "cc",
            "subject",
            "date",
            "message-id",
            "reply-to",
            "in-reply-to",
            "references",
            "mime-version",
            "content-type",
            "content-transfer-encoding",
        ]
    )


class DnsSettings(Section):
    nameservers: list[str] = Field(default_factory=list)  # empty: the system's resolv.conf
    port: int = Field(default=53, ge=1, le=65535)
    timeout_seconds: float = Field(default=5.0, gt=0)


class ApiSettings(Section):
    enabled: bool = True
    listen: str = "127.0.0.1"
    port: int = Field(default=8026, ge=0, le=65535)


class WorkerSettings(Section):
    concurrency: int = Field(default=32, ge=1, le=1024)
    poll_interval_seconds: float = Field(default=1.0, gt=0)


class CrmSettings(Section):
    # Start the bundled CRM (crm_api) beside the gateway; the gateway still talks to it by HTTP.
    embedded: bool = True
    url: str = "http://127.0.0.1:8025"


class Settings(BaseSettings):
    """All of Mailgate's options; the defaults are the embedded, loopback-only set-up."""

    model_config = SettingsConfigDict(
        env_prefix="MAILGATE_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    server: ServerSettings = ServerSettings()
    database: DatabaseSettings = DatabaseSettings()
    submission: SubmissionSettings = SubmissionSettings()
    relay: RelaySettings = RelaySettings()
    dkim: DkimSettings = DkimSettings()
    dns: DnsSettings = DnsSettings()
    api: ApiSettings = ApiSettings()
    worker: WorkerSettings = WorkerSettings()
    crm: CrmSettings = CrmSettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The file's values come in as init arguments; the environment overrides them.
        return (env_settings, init_settings)


def config_path(explicit: str | Path | None = None, env: Mapping[str, str] | None = None) -> Path:
    """Where the config file is: the ``--config`` argument, ``$MAILGATE_CONFIG``, or the default."""
    env = os.environ if env is None else env
    if explicit:
        return Path(explicit)
    if env.get(CONFIG_ENV):
        return Path(env[CONFIG_ENV])
    return DEFAULT_CONFIG_PATH


def load_settings(path: str | Path | None = None) -> Settings:
    """Read the TOML file (a missing default file means all defaults) and apply the environment.

    Raises :class:`ConfigError` with one line naming the offending key and what to do.
    """
    file = config_path(path)
    data: dict[str, Any] = {}
    if file.exists():
        try:
            data = tomllib.loads(file.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{file}: not valid TOML ({exc}); fix the syntax there") from None
        except OSError as exc:
            raise ConfigError(f"{file}: cannot read it ({exc.strerror})") from None
    elif path is not None or os.environ.get(CONFIG_ENV):
        raise ConfigError(f"{file}: no such file; run `mailgate init` to write one")
    try:
        return Settings(**data)
    except ValidationError as exc:
        raise ConfigError(_explain(file, exc)) from None


def _explain(file: Path, exc: ValidationError) -> str:
    """Turn pydantic's report into one line per problem, naming the key and the fix."""
    lines = []
    for error in exc.errors():
        key = ".".join(str(part) for part in error["loc"])
        if error["type"] == "extra_forbidden":
            lines.append(f"{file}: unknown option `{key}`{_suggest(error['loc'])}")
        else:
            value = error.get("input")
            lines.append(
                f"{file}: `{key}` = {value!r}: {error['msg']}; "
                "fix the value (conf/mailgate.toml documents each option and its default)"
            )
    return "\n".join(lines)


def _suggest(loc: tuple[int | str, ...]) -> str:
    """``; did you mean `relay.host`?`` for a near-miss, else a pointer to the documented keys."""
    model: type[BaseModel] = Settings
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        annotation = field.annotation if field else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            break
        model = annotation
    close = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=1)
    if close:
        prefix = ".".join(str(part) for part in loc[:-1])
        return f"; did you mean `{prefix + '.' if prefix else ''}{close[0]}`?"
    return "; remove it (conf/mailgate.toml lists every option)"
