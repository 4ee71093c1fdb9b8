"""The ``[imap]`` table: mailbox sync, from where credentials are kept to how often we look.

Every number here has a reason a comment can name: the IDLE refresh must stay below the 29
minutes after which RFC 2177 lets a server drop an idle client; header scans go in UID chunks so
memory stays flat on a mailbox of any size; connections per account are capped because providers
(Gmail above all) throttle or lock accounts that open many.
"""

from __future__ import annotations

from pathlib import Path

from gateway.settings_base import Schedule, Section, opt


class ImapSettings(Section):
    """IMAP sync of reps' and shared mailboxes."""

    enabled: bool = opt(True, "Sync the connected mailboxes")
    secret_key: str = opt(
        "",
        "Fernet key that encrypts mailbox passwords at rest (`mailgate account keygen` makes one)",
    )
    previous_secret_keys: list[str] = opt(
        list, "Older keys that still decrypt during a rotation (new secrets use secret_key)"
    )
    providers_file: Path | None = opt(
        None, "Provider presets (TOML); unset: the presets shipped with Mailgate"
    )
    ca_file: Path | None = opt(
        None, "Extra CA bundle (PEM) trusted for IMAP servers; unset: the system's"
    )
    connect_timeout_seconds: float = opt(20.0, "Connecting and logging in to a server", gt=0)
    command_timeout_seconds: float = opt(
        120.0, "Waiting for the answer to one command (a dead connection is found this way)", gt=0
    )
    io_threads: int = opt(
        16, "Threads doing IMAP I/O; idle connections use none (they wait in the event loop)", ge=1
    )
    max_connections_per_account: int = opt(
        2, "Most IMAP connections to one mailbox at once (presets may lower it)", ge=1, le=10
    )
    max_initial_syncs: int = opt(4, "Accounts doing their first (history) sync at once", ge=1)
    poll_interval_seconds: float = opt(
        60.0, "How often folders without IDLE (all but the Inbox) are checked", gt=0
    )
    idle_refresh_seconds: float = opt(
        25 * 60.0,
        "IDLE is restarted this often; RFC 2177 servers may drop it after 29 minutes",
        gt=0,
        le=29 * 60.0,
    )
    scan_chunk: int = opt(1000, "UIDs per header scan command (memory stays flat)", ge=10)
    body_chunk: int = opt(200, "Messages per body fetch command", ge=1)
    body_batch_bytes: int = opt(
        32 * 1024 * 1024,
        "Bytes of bodies fetched and stored together (a bigger message goes alone)",
        ge=1024,
    )
    auth_max_failures: int = opt(
        3, "Failed logins in a row before an account is marked auth_failed (no lock-outs)", ge=1
    )
    retry_schedule_seconds: Schedule = opt(
        lambda: [5.0, 30.0, 120.0, 600.0, 1800.0],
        "Waits after temporary errors (network, server, CRM); the last one repeats",
    )
    throttle_seconds: float = opt(
        300.0, "Wait when a provider says it is throttling us ([THROTTLED], too many connections)"
    )
    reload_interval_seconds: float = opt(
        30.0, "How often account changes made with the CLI are picked up by `mailgate serve`", gt=0
    )
    oauth_redirect_url: str = opt(
        "",
        "Where mail providers send a user back after allowing access (OAuth): "
        "https://<this gateway's public name>/api/v1/accounts/oauth/callback; register the same "
        "URL with the OAuth client",
    )
    google_client_id: str = opt("", "OAuth client id (Google Cloud console) for Gmail accounts")
    google_client_secret: str = opt("", "Its client secret")
    microsoft_client_id: str = opt(
        "", "OAuth application (client) id (Microsoft Entra) for Microsoft 365 / Outlook.com"
    )
    microsoft_client_secret: str = opt("", "Its client secret")
    microsoft_tenant: str = opt(
        "common", "Entra tenant: common, organizations, consumers, or your tenant id"
    )
    push_secret: str = opt(
        "",
        "Shared secret of Dovecot's push_notification (ox driver) posting new-mail news to "
        "/api/v1/imap/push; set it to have mailboxes on such servers synced at once instead of "
        "after Dovecot's 0.5 s IDLE delay (empty: IDLE only)",
    )
    tcp_keepalive_seconds: int = opt(
        60, "TCP keepalive idle time on IMAP sockets, so a dead peer is noticed while idling", ge=1
    )
