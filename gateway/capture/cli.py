"""The `mailgate` sub-commands of gateway.capture: secret addresses, the quarantine, `dns check`.

``mailgate capture address EMAIL [--rotate]`` shows (or replaces) a user's secret capture
address; ``mailgate capture quarantine list|release ID [--as EMAIL]|delete ID`` works the
quarantine; ``mailgate dns check DOMAIN`` is the deliverability check, exiting 1 when something
would hurt delivery. Errors are one line with the fix, like every `mailgate` command.
"""

from __future__ import annotations

import argparse
import getpass
import json
from datetime import UTC, datetime
from typing import TypeVar

from gateway.settings import Settings, load_settings
from gateway.store.offline import with_session, with_store

T = TypeVar("T")


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register this package's sub-commands on the `mailgate` parser."""
    capture = commands.add_parser("capture", help="the capture door: secret addresses, quarantine")
    capture_commands = capture.add_subparsers(dest="capture_command", required=True)
    address = capture_commands.add_parser(
        "address", help="show a user's secret capture address (log+TOKEN@…)"
    )
    address.add_argument("email")
    address.add_argument(
        "--rotate", action="store_true", help="replace it; the old address stops working"
    )
    address.set_defaults(func=cmd_capture_address)

    quarantine = capture_commands.add_parser("quarantine", help="messages held for an admin")
    quarantine_commands = quarantine.add_subparsers(dest="quarantine_command", required=True)
    listing = quarantine_commands.add_parser("list", help="held messages, oldest first")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(func=cmd_quarantine_list)
    release = quarantine_commands.add_parser("release", help="log a held message after all")
    release.add_argument("id")
    release.add_argument(
        "--as", dest="owner", default=None, help="the user to log it as (default: its From's)"
    )
    release.set_defaults(func=cmd_quarantine_release)
    delete = quarantine_commands.add_parser("delete", help="delete a held message for good")
    delete.add_argument("id")
    delete.set_defaults(func=cmd_quarantine_delete)

    dns = commands.add_parser("dns", help="check a domain's SPF, DKIM and DMARC records")
    dns_commands = dns.add_subparsers(dest="dns_command", required=True)
    check = dns_commands.add_parser(
        "check", help="say what holds and what to publish; exit 1 if delivery would suffer"
    )
    check.add_argument("domain")
    check.add_argument("--json", action="store_true")
    check.set_defaults(func=cmd_dns_check)


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(args.config)


def cmd_capture_address(args: argparse.Namespace) -> int:
    from gateway.capture.directory import capture_address

    settings = _settings(args)
    address = with_session(
        settings,
        lambda s: capture_address(
            s, email=args.email, settings=settings.capture, rotate=args.rotate
        ),
    )
    if args.rotate:
        print(f"new secret capture address of {args.email} (the old one no longer works):")
    print(address)
    return 0


def cmd_quarantine_list(args: argparse.Namespace) -> int:
    from gateway.capture.quarantine import held

    rows = with_store(_settings(args), held)
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return 0
    for row in rows:
        when = datetime.fromtimestamp(row["created_at"], UTC).strftime("%Y-%m-%d %H:%M:%S")
        print(
            f"{row['id']}  {when}  from {row['from_address']}  "
            f"claims {row['claimed_owner'] or '-'}  {row['subject'][:50]!r}\n"
            f"{'':34}why: {row['reason']}"
        )
    if not rows:
        print("the quarantine is empty")
    return 0


def cmd_quarantine_release(args: argparse.Namespace) -> int:
    from gateway.capture.quarantine import release

    admin = f"cli:{getpass.getuser()}"
    owner = with_store(
        _settings(args), lambda s: release(s, args.id, admin=admin, owner=args.owner)
    )
    print(f"{args.id} released as {owner}; the running gateway logs it within a second")
    return 0


def cmd_quarantine_delete(args: argparse.Namespace) -> int:
    from gateway.capture.quarantine import delete

    with_store(_settings(args), lambda s: delete(s, args.id))
    print(f"{args.id} deleted")
    return 0


def cmd_dns_check(args: argparse.Namespace) -> int:
    from gateway.capture.api import run_dns_check

    report = run_dns_check(_settings(args), args.domain)
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        print(f"{report.domain}:")
        for line in report.lines():
            print(line)
        print(
            "delivery looks fine"
            if report.ok
            else "fix the FAIL lines: receivers will junk or refuse this domain's mail"
        )
    return 0 if report.ok else 1
