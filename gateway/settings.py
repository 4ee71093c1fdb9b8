"""Typed configuration, loaded once from ``conf/mailgate.toml`` and ``MAILGATE_…`` overrides.

The TOML file is the admin's; environment variables (``MAILGATE_RELAY__HOST=…``, sections joined
by a double underscore) win over it so containers can override single keys. Everything is loaded
in :func:`load_settings` and handed to the objects that need it as small typed sections: nothing
reads configuration at import time. A wrong option raises :class:`ConfigError` with one line that
names the key and the fix, which the CLI prints as it is.
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ValidationError, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from gateway.capture.settings import CaptureSettings
from gateway.errors import ConfigError
from gateway.imap.settings import ImapSettings
from gateway.settings_base import Schedule, Section, opt

DEFAULT_CONFIG_PATH = Path("mailgate.toml")  # conf/mailgate.toml is the documented template
CONFIG_ENV = "MAILGATE_CONFIG"


class ServerSettings(Section):
    """The process as a whole."""

    hostname: str = opt("mailgate.localhost", "Our name in SMTP greetings, Message-IDs and DSNs")
    data_dir: Path = opt(Path("var"), "Where the database, keys and certificates live by default")
    log_level: Literal["debug", "info", "warning", "error"] = opt("info", "Log verbosity")
    processes: int = opt(
        1,
        "Gateway processes sharing the SMTP ports and the queue (one per core is fastest: Python "
        "runs one core per process)",
        ge=1,
        le=64,
    )


class DatabaseSettings(Section):
    """The one SQL database: SQLite by default, PostgreSQL for several gateway processes."""

    url: str = opt(
        "sqlite:///var/mailgate.db",
        "sqlite:///FILE or postgresql+psycopg://USER:PASSWORD@HOST/DB",
    )
    group_commit_window_ms: float = opt(
        0.0,
        "Extra wait for more messages to share a commit (0: only while one is in flight)",
        ge=0,
        le=100,
    )
    group_commit_max_batch: int = opt(128, "Most writes in one transaction", ge=1, le=10_000)
    lease_seconds: int = opt(
        300, "A claimed message returns to the queue after this long if its worker died", ge=10
    )


class SubmissionSettings(Section):
    """The door for reps' mail clients (RFC 6409): AUTH required, over TLS."""

    enabled: bool = opt(True, "Listen for mail clients at all")
    listen: str = opt("127.0.0.1", "Address to listen on (0.0.0.0 or :: for all)")
    port: int = opt(8587, "STARTTLS submission port (587 in production)", ge=0, le=65535)
    tls_port: int = opt(
        8465, "Implicit-TLS submission port (465 in production; 0: off)", ge=0, le=65535
    )
    cert_file: Path = opt(Path("var/tls/cert.pem"), "TLS certificate chain (PEM)")
    key_file: Path = opt(Path("var/tls/key.pem"), "TLS private key (PEM)")
    allow_plaintext_auth_on_loopback: bool = opt(
        False, "Let clients on 127.0.0.1/::1 log in without TLS (a CRM on the same host)"
    )
    trusted_networks: list[str] = opt(
        list, "Networks that may relay without AUTH, like Postfix's mynetworks (CIDR)"
    )
    max_message_size: int = opt(35 * 1024 * 1024, "Largest message in bytes (SIZE)", ge=1024)
    max_recipients: int = opt(
        100, "Recipients per message; RFC 5321 section 4.5.3.1.8 asks for at least 100", ge=1
    )
    timeout_seconds: float = opt(
        300, "Idle time before a session is closed (RFC 5321 section 4.5.3.2.7)", gt=0
    )
    max_auth_failures: int = opt(3, "Failed logins before the connection is closed", ge=1)

    @field_validator("trusted_networks")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        for network in value:
            try:
                ipaddress.ip_network(network, strict=False)
            except ValueError:
                raise ValueError(f"{network!r} is not a network like 10.0.0.0/8") from None
        return value


class RelaySettings(Section):
    """Where accepted mail goes: a smarthost, or straight to each domain's MX."""

    mode: Literal["smarthost", "mx"] = opt("smarthost", "smarthost or mx")
    host: str = opt("127.0.0.1", "Smarthost name or address")
    port: int = opt(
        25,
        "Smarthost port (587 for STARTTLS submission, 465 for TLS); in mx mode the MX port",
        ge=1,
        le=65535,
    )
    security: Literal["starttls", "tls", "none"] = opt(
        "starttls", "starttls, tls (implicit) or none"
    )
    require_tls: bool = opt(
        True, "Fail (and retry later) rather than send in clear when STARTTLS is not offered"
    )
    verify_certificate: bool = opt(True, "Check the upstream's certificate and name")
    ca_file: Path | None = opt(None, "Extra CA bundle to trust (PEM); unset: the system's")
    username: str = opt("", "Smarthost AUTH user (empty: no AUTH)")
    password: str = opt("", "Smarthost AUTH password")
    helo_name: str = opt("", "Name in our EHLO (empty: server.hostname)")
    connect_timeout_seconds: float = opt(30, "Connecting to the upstream", gt=0)
    command_timeout_seconds: float = opt(120, "Waiting for any one upstream reply", gt=0)
    max_connections: int = opt(8, "Open connections per upstream route", ge=1, le=256)
    retry_schedule_seconds: Schedule = opt(
        lambda: [60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0],
        "Delays between attempts; the last one repeats until the queue lifetime ends",
    )
    queue_lifetime_seconds: float = opt(
        5 * 24 * 3600, "Give up and bounce after this long (5 days, as MTAs do)", gt=0
    )
    bounce_sender: str = opt("", "From address of DSNs (empty: MAILER-DAEMON@server.hostname)")


class DkimSettings(Section):
    """DKIM signing of outgoing mail (keys: `mailgate dkim keygen DOMAIN`)."""

    enabled: bool = opt(True, "Sign mail from domains we hold a key for")
    key_dir: Path = opt(Path("var/dkim"), "Where keys live: KEY_DIR/DOMAIN/SELECTOR.*.pem")
    selector: str = opt("mailgate", "Selector for new keys")
    headers: list[str] = opt(
        lambda: [
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
        ],
        "Headers to sign (RFC 6376 section 5.4.1); From is always signed",
    )


class DnsSettings(Section):
    """The resolver used for MX lookups (and later SPF, DKIM and DMARC)."""

    nameservers: list[str] = opt(list, "Name servers to ask (empty: the system's resolv.conf)")
    port: int = opt(53, "Their port", ge=1, le=65535)
    timeout_seconds: float = opt(5.0, "Give up on a query after this long", gt=0)


class ApiSettings(Section):
    """The admin HTTP API (queue, health, metrics)."""

    enabled: bool = opt(True, "Serve the admin API")
    listen: str = opt("127.0.0.1", "Address to listen on")
    port: int = opt(8026, "Port", ge=0, le=65535)


class WorkerSettings(Section):
    """The queue runner."""

    concurrency: int = opt(32, "Messages worked on at once", ge=1, le=1024)
    poll_interval_seconds: float = opt(1.0, "How often to look for retries that came due", gt=0)


class CrmSettings(Section):
    """The CRM the gateway reports to."""

    embedded: bool = opt(True, "Start the bundled CRM beside the gateway (`mailgate serve`)")
    url: str = opt("http://127.0.0.1:8025", "Base URL of the CRM; the gateway only talks HTTP")
    config: str = opt(
        "crm.toml", "The bundled CRM's own config file, when embedded (missing: its defaults)"
    )


class HooksSettings(Section):
    """Matching mail to CRM contacts and telling subscribers (webhooks)."""

    enabled: bool = opt(True, "Match mail to CRM contacts and send webhooks")
    crm_token: str = opt("", "API token the gateway uses for the CRM's /contacts/match")
    webhook_secrets: list[str] = opt(
        list,
        "Standard Webhooks secrets (whsec_...) for the CRM subscriber; the first signs, "
        "two during rotation",
    )
    match_cache_seconds: float = opt(60.0, "How long a contact-match answer is reused", ge=0)
    match_batch_size: int = opt(500, "Addresses per /contacts/match call", ge=1, le=1000)
    submission_sharing: Literal["private", "custom", "public"] = opt(
        "public",
        "Sharing level of submitted mail of reps without a primary mailbox (with one: its level)",
    )
    max_body_bytes: int = opt(
        256 * 1024, "Text and HTML bodies above this are truncated in events (with a flag)", ge=1024
    )
    dispatch_concurrency: int = opt(16, "Webhook POSTs in flight at once", ge=1, le=256)
    request_timeout_seconds: float = opt(10.0, "Time limit of one webhook POST", gt=0)
    max_response_bytes: int = opt(64 * 1024, "Most of a subscriber's reply that is read", ge=0)
    retry_schedule_seconds: Schedule = opt(
        lambda: [5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 50400.0, 72000.0, 86400.0],
        "Delays between webhook attempts; after the last one the event is dead-lettered",
    )
    public_url: str = opt(
        "http://127.0.0.1:8026", "Base URL of the admin API in links sent to the CRM"
    )
    link_secret: str = opt("", "Key for signed attachment links (empty: generated by init)")
    link_lifetime_seconds: int = opt(7 * 24 * 3600, "How long an attachment link works", ge=60)


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
    hooks: HooksSettings = HooksSettings()
    capture: CaptureSettings = CaptureSettings()
    imap: ImapSettings = ImapSettings()

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


HEADER = """\
# Mailgate configuration. Every option is listed with its default and what it does.
# Environment variables override single keys: MAILGATE_<SECTION>__<KEY>, e.g.
#   MAILGATE_RELAY__HOST=smtp.example.com
# `mailgate init` writes this file; `mailgate config check` validates it.
"""


def render_toml(settings: Settings | None = None) -> str:
    """The whole configuration as commented TOML: the documentation and the file are one."""
    settings = settings or Settings()
    out = [HEADER]
    for name in Settings.model_fields:
        section = getattr(settings, name)
        out.append(f"\n# {(type(section).__doc__ or '').strip()}\n[{name}]")
        for key, info in type(section).model_fields.items():
            value = getattr(section, key)
            out.append(f"# {info.description}")
            if value is None:
                out.append(f"# {key} =")
            else:
                out.append(f"{key} = {_toml_value(value)}")
    return "\n".join(out) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    # JSON string escapes are valid TOML basic-string escapes.
    return json.dumps(str(value), ensure_ascii=False)
