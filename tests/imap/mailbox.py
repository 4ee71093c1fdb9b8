"""Synthetic mailboxes written straight into a Dovecot user's Maildir, for tests and the bench.

Writing Maildir files and letting ``doveadm index`` assign UIDs is about 50 times faster than
``doveadm save`` per message (one process per message), which is what makes a mailbox of
thousands of messages affordable in a test. Each message is deterministic: its index decides its
sender (a contact for a known share), its flags (so tests can prove flags never change) and its
size (about ``size`` bytes of quoted-printable-safe text).
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import format_datetime
from pathlib import Path

from tests.servers.dovecot import DovecotServer

# Maildir info flags (the part after ":2,"), and the IMAP flags they stand for.
_FLAG_CYCLE = ("", "S", "FS", "RS", "S", "")


@dataclass(frozen=True)
class Mail:
    index: int
    sender: str
    recipients: tuple[str, ...]
    message_id: str
    raw: bytes
    flags: str  # Maildir info letters


@dataclass
class MailboxSpec:
    """``contact_every``: every n-th message is from a contact (10 → 10 %)."""

    owner: str
    count: int
    contacts: list[str]
    contact_every: int = 10
    strangers: int = 2000
    size: int = 10_000
    domain: str = "mail.test"
    tag: str = "m"
    sent_from_owner_every: int = 0  # also some outbound mail from the owner to a contact
    extra_headers: dict[str, str] = field(default_factory=dict)


def _body(index: int, size: int) -> bytes:
    line = b"Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor.\r\n"
    # Sizes spread around the average (0.5x .. 1.5x) so literals are not all alike.
    target = int(size * (0.5 + (index * 7919 % 1000) / 1000))
    return line * max(1, target // len(line))


def make_mails(spec: MailboxSpec) -> Iterator[Mail]:
    date = format_datetime(datetime(2024, 5, 1, 12, 0, tzinfo=UTC))
    for i in range(spec.count):
        if spec.sent_from_owner_every and i % spec.sent_from_owner_every == 1:
            sender = spec.owner
            recipients: tuple[str, ...] = (spec.contacts[i % len(spec.contacts)],)
        elif i % spec.contact_every == 0 and spec.contacts:
            sender = spec.contacts[(i // spec.contact_every) % len(spec.contacts)]
            recipients = (spec.owner,)
        else:
            sender = f"stranger{i % spec.strangers}@{spec.domain}"
            recipients = (spec.owner, f"colleague{i % 17}@{spec.domain}")
        message_id = f"<{spec.tag}.{i}@{spec.domain}>"
        head = (
            f"Return-Path: <{sender}>\r\n"
            f"Received: from relay.{spec.domain} by mx.{spec.domain}; {date}\r\n"
            f'From: "Sender {i}" <{sender}>\r\n'
            f"To: {', '.join(recipients)}\r\n"
            f"Subject: Message {spec.tag} number {i}\r\n"
            f"Date: {date}\r\n"
            f"Message-ID: {message_id}\r\n"
            "MIME-Version: 1.0\r\n"
            "Content-Type: text/plain; charset=utf-8\r\n"
            + "".join(f"{k}: {v}\r\n" for k, v in spec.extra_headers.items())
            + "\r\n"
        ).encode()
        yield Mail(
            index=i,
            sender=sender,
            recipients=recipients,
            message_id=message_id,
            raw=head + _body(i, spec.size),
            flags=_FLAG_CYCLE[i % len(_FLAG_CYCLE)],
        )


def maildir_path(dovecot: DovecotServer, user: str, folder: str = "INBOX") -> Path:
    root = dovecot.mail_dir / user.lower() / "Maildir"
    # Maildir++ layout: INBOX is the root, other folders are ".Name" (separator "/" maps to ".").
    return root if folder.upper() == "INBOX" else root / ("." + folder.replace("/", "."))


def write_maildir(
    dovecot: DovecotServer,
    user: str,
    mails: Iterable[Mail],
    *,
    folder: str = "INBOX",
    internal_date: float | None = None,
) -> int:
    """Write ``mails`` as Maildir files, then have Dovecot index them (UIDs in file order).

    The folder must be empty or unknown to Dovecot so far; returns the number written.
    """
    base = maildir_path(dovecot, user, folder)
    for sub in ("cur", "new", "tmp"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    stamp = int(time.time())
    mtime = internal_date if internal_date is not None else time.time()
    count = 0
    for mail in mails:
        # Names sort in index order, and Dovecot assigns UIDs to new files sorted by name.
        name = f"{stamp}.M{mail.index:08d}P{os.getpid()}.mailgate,S={len(mail.raw)}:2,{mail.flags}"
        path = base / "cur" / name
        path.write_bytes(mail.raw)
        os.utime(path, (mtime, mtime))  # a Maildir file's mtime is the IMAP internal date
        count += 1
    for path in (dovecot.mail_dir / user.lower(),):
        shutil.chown(path, "mail", "mail")
        for dirpath, dirnames, filenames in os.walk(path):
            for name in dirnames + filenames:
                shutil.chown(os.path.join(dirpath, name), "mail", "mail")
    if folder.upper() != "INBOX":
        dovecot.doveadm("mailbox", "subscribe", "-u", user, folder)
    dovecot.doveadm("index", "-u", user, folder)
    return count
