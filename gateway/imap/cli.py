"""The ``mailgate account`` commands: connect, test, change and disconnect mailboxes.

They work on the database directly (a running ``mailgate serve`` picks changes up within
``imap.reload_interval_seconds``); ``add`` logs in first and stores nothing when that fails.
Passwords are read from a terminal prompt or ``--password-stdin``, never from the command line
(where ``ps`` and shell history would show them), and no command prints one. Every failure is one
line naming the fix, as for the rest of ``mailgate``.
"""

from __future__ import annotations

import argparse
import getpass
import json
import sys
import time
from typing import Any

from sqlmodel import Session

from gateway.imap import accounts
from gateway.imap.accounts import AccountCreate, AccountError, AccountUpdate
from gateway.imap.connection import ConnectionFactory
from gateway.imap.oauth import Tokens
from gateway.imap.presets import load_providers
from gateway.imap.service import (
    FolderState,
    first_look,
    login_secret,
    probe,
    store_new,
    validate_new,
)
from gateway.imap.settings import ImapSettings
from gateway.imap.vault import Vault, generate_key
from gateway.settings import load_settings
from gateway.store.db import make_engine, migrate


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register this package's sub-commands on the `mailgate` parser."""
    account = commands.add_parser("account", help="connected mailboxes (IMAP sync)")
    sub = account.add_subparsers(dest="account_command", required=True)

    sub.add_parser(
        "keygen", help="make a key for [imap] secret_key (encrypts mailbox passwords)"
    ).set_defaults(func=cmd_keygen)
    sub.add_parser("providers", help="list the provider presets").set_defaults(func=cmd_providers)

    add = sub.add_parser("add", help="connect a mailbox (logs in first)")
    add.add_argument("email")
    add.add_argument("--provider", default="custom", help="a preset (see `account providers`)")
    add.add_argument("--host", help="IMAP server (custom set-up)")
    add.add_argument("--port", type=int, help="IMAP port (993 for ssl, 143 for starttls)")
    add.add_argument("--security", choices=["ssl", "starttls", "none"])
    add.add_argument("--username", help="login name, if not the address (Exchange)")
    add.add_argument("--smtp-host")
    add.add_argument("--smtp-port", type=int)
    add.add_argument("--smtp-security", choices=["ssl", "starttls", "none"])
    add.add_argument(
        "--allow-unverified-certificate",
        action="store_true",
        help="accept any TLS certificate (dangerous; only for your own server)",
    )
    add.add_argument("--owner", help="the rep it belongs to (default: the address)")
    add.add_argument("--shared", action="store_true", help="a shared box like sales@")
    add.add_argument("--sharing", choices=["private", "custom", "public"], default="public")
    add.add_argument("--contact", action="append", default=[], help="for --sharing custom")
    add.add_argument("--primary", action="store_true", help="the owner's account for sending")
    add.add_argument("--one-way", action="store_true", help="do not sync incoming mail")
    add.add_argument("--start", default="now", help="now, 1m, 3m, 6m or YYYY-MM-DD")
    add.add_argument("--folder", action="append", default=[], help="default: Inbox and Sent")
    add.add_argument("--alias", action="append", default=[], help="other addresses of the box")
    add.add_argument("--no-test", action="store_true", help="store without logging in first")
    add.add_argument("--password-stdin", action="store_true")
    add.set_defaults(func=cmd_add)

    listing = sub.add_parser("list", help="accounts with their status")
    listing.add_argument("--owner")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(func=cmd_list)

    for name, func, text in (
        ("show", cmd_show, "one account, its folders and cursors"),
        ("test", cmd_test, "log in now and list the folders"),
        ("disable", cmd_disable, "pause syncing (keeps everything)"),
        ("enable", cmd_enable, "resume syncing where it stopped"),
        ("remove", cmd_remove, "disconnect: delete its settings and cursor"),
    ):
        one = sub.add_parser(name, help=text)
        one.add_argument("account", help="id or address")
        one.set_defaults(func=func)

    passwd = sub.add_parser("passwd", help="set a new password (reconnects)")
    passwd.add_argument("account", help="id or address")
    passwd.add_argument("--password-stdin", action="store_true")
    passwd.set_defaults(func=cmd_passwd)

    change = sub.add_parser("set", help="change an account's choices")
    change.add_argument("account", help="id or address")
    change.add_argument("--sharing", choices=["private", "custom", "public"])
    change.add_argument("--contact", action="append", help="for --sharing custom (repeat)")
    change.add_argument("--folder", action="append", help="folders to sync (repeat)")
    change.add_argument("--sync-mode", choices=["two_way", "one_way"])
    change.add_argument("--primary", action=argparse.BooleanOptionalAction)
    change.add_argument("--deleted-events", action=argparse.BooleanOptionalAction)
    change.add_argument("--archived-events", action=argparse.BooleanOptionalAction)
    change.add_argument("--mailbox-changes", action=argparse.BooleanOptionalAction)
    change.set_defaults(func=cmd_set)


# -- helpers ---------------------------------------------------------------------------------


def _password(from_stdin: bool) -> str:
    if from_stdin:
        return sys.stdin.readline().rstrip("\n")
    if sys.stdin.isatty():
        return getpass.getpass("Mailbox password (or app password): ")
    raise AccountError("no terminal to ask for the password: pass --password-stdin and pipe it in")


def _imap(args: argparse.Namespace) -> tuple[ImapSettings, str]:
    settings = load_settings(args.config)
    return settings.imap, settings.database.url


def _factory(imap: ImapSettings) -> ConnectionFactory:
    return ConnectionFactory(
        ca_file=imap.ca_file,
        connect_timeout=imap.connect_timeout_seconds,
        command_timeout=imap.command_timeout_seconds,
        keepalive_seconds=imap.tcp_keepalive_seconds,
    )


def _session(url: str) -> Session:
    engine = make_engine(url)
    migrate(engine)
    return Session(engine, expire_on_commit=False)


def _vault(imap: ImapSettings) -> Vault:
    return Vault(imap.secret_key, imap.previous_secret_keys)


def _print_account(data: dict[str, Any]) -> None:
    for key in (
        "id",
        "email",
        "owner",
        "kind",
        "sharing",
        "provider",
        "imap_host",
        "imap_port",
        "imap_security",
        "username",
        "sync_mode",
        "start",
        "enabled",
        "status",
        "progress",
        "last_sync_at",
        "last_error",
        "warning",
    ):
        if data.get(key) is not None:
            print(f"{key:16} {data[key]}")
    for folder in data.get("folder_states", []):
        print(
            f"folder {folder['name']!r}: uidvalidity {folder['uidvalidity']}, "
            f"last uid {folder['last_uid']}, modseq {folder['highest_modseq']}, "
            f"{'synced' if folder['initial_done'] else 'first sync running'}, "
            f"{folder['logged']} logged of {folder['fetched']} scanned"
        )


# -- commands --------------------------------------------------------------------------------


def cmd_keygen(args: argparse.Namespace) -> int:
    print(f'secret_key = "{generate_key()}"')
    print(
        "# put this line in the [imap] table of mailgate.toml (or set MAILGATE_IMAP__SECRET_KEY);"
        " keep it safe: without it the stored mailbox passwords cannot be read",
        file=sys.stderr,
    )
    return 0


def cmd_providers(args: argparse.Namespace) -> int:
    imap, _ = _imap(args)
    for key, p in load_providers(imap.providers_file).items():
        print(
            f"{key:14} {p.name:32} IMAP {p.imap_host}:{p.imap_port} {p.imap_security:8} "
            f"SMTP {p.smtp_host}:{p.smtp_port} {p.smtp_security}"
        )
    return 0


def cmd_add(args: argparse.Namespace) -> int:
    imap, url = _imap(args)
    vault = _vault(imap)
    providers = load_providers(imap.providers_file)
    data = AccountCreate(
        email=args.email,
        password=_password(args.password_stdin),
        provider=args.provider,
        username=args.username,
        imap_host=args.host,
        imap_port=args.port,
        imap_security=args.security,
        smtp_host=args.smtp_host,
        smtp_port=args.smtp_port,
        smtp_security=args.smtp_security,
        allow_unverified_certificate=args.allow_unverified_certificate,
        owner=args.owner,
        kind="shared" if args.shared else "personal",
        sharing=args.sharing,
        selected_contacts=args.contact,
        primary=args.primary,
        sync_mode="one_way" if args.one_way else "two_way",
        start=args.start,
        folders=args.folder,
        aliases=args.alias,
    )
    with _session(url) as session:
        draft = validate_new(session, data=data, vault=vault, providers=providers)
        states: list[FolderState] = []
        if not args.no_test:
            report, states = first_look(
                _factory(imap),
                accounts.endpoint_of(draft, providers),
                login_secret(data),
                list(draft.folders),
            )
            if not report.ok:
                raise AccountError(f"{report.error}; nothing was stored")
        account = store_new(
            session, data=data, vault=vault, providers=providers, draft=draft, states=states
        )
        session.commit()
        print(f"connected {account.email} as {account.id}")
        if account.allow_unverified_certificate:
            print(f"warning: {accounts.UNVERIFIED_WARNING}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    _, url = _imap(args)
    with _session(url) as session:
        rows = [accounts.public(a) for a in accounts.list_accounts(session, owner=args.owner)]
    if args.json:
        print(json.dumps([r.model_dump(mode="json") for r in rows], indent=2))
        return 0
    for row in rows:
        state = row.status + (f" {row.progress:.0f}%" if row.progress is not None else "")
        print(f"{row.id}  {row.email:36} {row.kind:8} {state:18} {row.last_error or ''}")
    if not rows:
        print("no connected mailboxes; `mailgate account add EMAIL` connects one")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    _, url = _imap(args)
    with _session(url) as session:
        account = accounts.find_account(session, args.account)
        data = accounts.public(account, accounts.folders_of(session, account.id))
    _print_account(data.model_dump(mode="json"))
    return 0


def cmd_test(args: argparse.Namespace) -> int:
    imap, url = _imap(args)
    providers = load_providers(imap.providers_file)
    with _session(url) as session:
        account = accounts.find_account(session, args.account)
    password = _vault(imap).decrypt(account.secret)
    if account.auth_method == "oauth":
        tokens = Tokens.loads(password)
        if not tokens.fresh(time.time()):
            raise AccountError(
                f"{account.email} signs in with OAuth and its access token has expired; "
                f"`mailgate serve` renews it (test there: POST /api/v1/accounts/{account.id}/test)"
            )
        password = tokens.access_token
    report = probe(_factory(imap), accounts.endpoint_of(account, providers), password)
    if not report.ok:
        raise AccountError(report.error or "the login failed")
    print(f"logged in to {account.imap_host}:{account.imap_port} as {account.username}")
    for folder in report.folders:
        count = "-" if folder.messages is None else str(folder.messages)
        print(f"  {folder.name:40} {folder.special_use or '':10} {count:>8} messages")
    return 0


def _update(args: argparse.Namespace, patch: AccountUpdate, done: str) -> int:
    imap, url = _imap(args)
    vault = _vault(imap) if patch.password is not None else None
    with _session(url) as session:
        account = accounts.find_account(session, args.account)
        accounts.update_account(session, account=account, patch=patch, vault=vault)
        session.commit()
        print(f"{account.email}: {done}")
    return 0


def cmd_disable(args: argparse.Namespace) -> int:
    return _update(args, AccountUpdate(enabled=False), "paused (`account enable` resumes)")


def cmd_enable(args: argparse.Namespace) -> int:
    return _update(args, AccountUpdate(enabled=True), "syncing resumes from where it stopped")


def cmd_passwd(args: argparse.Namespace) -> int:
    patch = AccountUpdate(password=_password(args.password_stdin))
    return _update(args, patch, "password changed; it reconnects")


def cmd_set(args: argparse.Namespace) -> int:
    patch = AccountUpdate(
        sharing=args.sharing,
        selected_contacts=args.contact,
        folders=args.folder,
        sync_mode=args.sync_mode,
        primary=args.primary,
        emit_deleted=args.deleted_events,
        emit_archived=args.archived_events,
        allow_mailbox_changes=args.mailbox_changes,
    )
    return _update(args, patch, "changed")


def cmd_remove(args: argparse.Namespace) -> int:
    _, url = _imap(args)
    with _session(url) as session:
        account = accounts.find_account(session, args.account)
        accounts.delete_account(session, account)
        session.commit()
        print(f"disconnected {account.email}; mail already logged stays in the CRM")
    return 0
