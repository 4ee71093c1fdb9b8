"""IMAP sync against a real Dovecot and the real bundled CRM: what gets logged, exactly once."""

from __future__ import annotations

import time
from collections.abc import Callable

from tests.imap.conftest import Crm, Harness, Mailbox, unique, wait_for
from tests.imap.mailbox import Mail, MailboxSpec, make_mails, write_maildir
from tests.servers.certs import TestCA
from tests.servers.dovecot import DovecotServer


def message(sender: str, to: str, message_id: str, subject: str = "hello") -> bytes:
    return (
        f"From: {sender}\r\nTo: {to}\r\nSubject: {subject}\r\n"
        f"Message-ID: <{message_id}>\r\nDate: Mon, 1 Jul 2024 10:00:00 +0000\r\n\r\nHi.\r\n"
    ).encode()


def test_first_sync_logs_exactly_the_mail_with_contacts_once_and_changes_no_flag(
    harness: Callable[..., Harness], dovecot: DovecotServer, ca: TestCA, crm: Crm
) -> None:
    user, password = dovecot.new_user("sync")
    tag = unique("s")
    contacts = [f"c{i}.{tag}@customer.test" for i in range(30)]
    crm.add_contacts(contacts)
    inbox: list[Mail] = list(
        make_mails(MailboxSpec(owner=user, count=3000, contacts=contacts, size=1500, tag=tag))
    )
    write_maildir(dovecot, user, inbox)
    # Older than the window (a year ago): not logged, though from contacts and with higher UIDs.
    old = list(
        make_mails(
            MailboxSpec(owner=user, count=40, contacts=contacts, contact_every=1, tag=f"old{tag}")
        )
    )
    write_maildir(dovecot, user, old, internal_date=time.time() - 365 * 86400)
    sent_ids = []
    for i in range(25):
        to = contacts[i] if i % 5 else f"someone{i}@elsewhere.test"
        mid = f"sent{i}.{tag}@example.test"
        dovecot.deliver(user, "Sent", message(user, to, mid))
        if i % 5:
            sent_ids.append(mid)
    for i in range(5):  # Trash history is never synced on the first pass
        dovecot.deliver(user, "Trash", message(contacts[i], user, f"trash{i}.{tag}@x.test"))
    box = Mailbox(dovecot, ca, user, password)
    flags_before = {f: box.flags(f) for f in ("INBOX", "Sent", "Trash")}

    h = harness(scan_chunk=500, body_chunk=64)
    account = h.add_account(user, password, start="6m", folders=["INBOX", "Sent", "Trash"])
    done = wait_for(
        lambda: len(h.events("sync.completed")) == 3 and h.events("sync.completed"),
        timeout=60,
        what="sync.completed for three folders",
        state=lambda: (h.account(account.id), h.rows("SELECT * FROM mail_folder")),
    )
    h.wait_status(account.id, "live")

    expected_inbox = {m.message_id.strip("<>") for m in inbox if m.sender in contacts}
    assert len(expected_inbox) == 300
    got = [r["header_message_id"] for r in h.accepted(account.id)]
    assert sorted(got) == sorted(expected_inbox | set(sent_ids))  # each exactly once
    by_folder = {d["folder"]: d for d in done}
    assert by_folder["INBOX"]["fetched"] == 3000 and by_folder["INBOX"]["logged"] == 300
    assert by_folder["Sent"]["logged"] == 20 and by_folder["Trash"]["logged"] == 0
    for row in h.accepted(account.id):
        meta = row["meta"]
        assert meta["account"]["id"] == account.id and meta["account"]["kind"] == "shared"
        assert meta["direction"] == ("outbound" if meta["folder"] == "Sent" else "inbound")
        assert isinstance(meta["uid"], int) and isinstance(meta["uidvalidity"], int)
    state = h.account(account.id)
    assert state["last_sync_at"] is not None and state["progress"] is None
    statuses = [e["status"] for e in h.events("account.status_changed")]
    assert statuses[:2] == ["initial_sync", "live"]

    # A restart resumes from the cursor: nothing is logged twice.
    h.stop()
    h.start()
    dovecot.deliver(user, "INBOX", message(contacts[0], user, f"after.{tag}@x.test"))
    wait_for(
        lambda: len(h.accepted(account.id)) == len(got) + 1,
        what="the new message",
        state=lambda: h.account(account.id),
    )
    # Flags (even \\Recent, which a read-write SELECT would clear) are as they were.
    for folder, before in flags_before.items():
        after = box.flags(folder)
        assert {uid: after[uid] for uid in before} == before, folder
