"""IMAP sync against a real Dovecot and the real bundled CRM: what gets logged, exactly once."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from gateway.imap.accounts import AccountUpdate
from gateway.imap.connection import ImapConnection
from gateway.imap.models import MailAccount
from gateway.imap.service import ImapService
from gateway.metrics import Metrics
from gateway.store.queue import Store
from hooks.webhooks import Outbox
from tests.imap.conftest import Crm, FreezingProxy, Harness, Mailbox, unique, wait_for
from tests.imap.mailbox import Mail, MailboxSpec, make_mails, write_maildir
from tests.servers.certs import TestCA
from tests.servers.dovecot import DovecotServer


def message(sender: str, to: str, message_id: str, subject: str = "hello") -> bytes:
    return (
        f"From: {sender}\r\nTo: {to}\r\nSubject: {subject}\r\n"
        f"Message-ID: <{message_id}>\r\nDate: Mon, 1 Jul 2024 10:00:00 +0000\r\n\r\nHi.\r\n"
    ).encode()


@pytest.mark.parametrize(
    "on_postgres", [False, pytest.param(True, marks=pytest.mark.postgres)], ids=["sqlite", "pg"]
)
def test_first_sync_logs_exactly_the_mail_with_contacts_once_and_changes_no_flag(
    harness: Callable[..., Harness], dovecot: DovecotServer, ca: TestCA, crm: Crm, on_postgres: bool
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

    h = harness(scan_chunk=500, body_chunk=64, postgres=on_postgres)
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
    progress = {
        r["name"]: (r["initial_processed"], r["initial_total"])
        for r in h.rows("SELECT name, initial_processed, initial_total FROM mail_folder")
    }
    assert progress["INBOX"] == (3000, 3000) and progress["Sent"] == (25, 25)
    state = h.account(account.id)
    assert state["last_sync_at"] is not None and state["progress"] is None
    assert h.service is not None
    registry = h.service.metrics.registry
    assert registry.get_sample_value("mailgate_imap_messages_scanned_total") == 3025
    accepted = registry.get_sample_value("mailgate_messages_accepted_total", {"source": "imap"})
    assert accepted == 320
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


def test_mail_delivered_while_idling_is_logged_within_a_second_or_two(
    harness: Callable[..., Harness], dovecot: DovecotServer, crm: Crm
) -> None:
    user, password = dovecot.new_user("idle")
    contact = f"{unique('idle')}@customer.test"
    crm.add_contacts([contact])
    # Polling is off for the test's length, and IDLE is renewed every half second (RFC 2177's
    # 29-minute limit, compressed): only IDLE can bring the mail in this fast.
    h = harness(poll_interval_seconds=120, idle_refresh_seconds=0.5)
    account = h.add_account(user, password)
    h.wait_status(account.id, "live")
    latencies = []
    for i in range(5):
        dovecot.deliver(user, "INBOX", message(f"stranger{i}@elsewhere.test", user, f"n{i}.{user}"))
        started = time.monotonic()
        dovecot.deliver(user, "INBOX", message(contact, user, f"c{i}.{user}"))
        wait_for(lambda n=i: len(h.accepted(account.id)) == n + 1, timeout=10, what=f"mail {i}")
        latencies.append(time.monotonic() - started)
    assert max(latencies) < 2.0, latencies  # Dovecot itself waits 0.5 s before notifying
    assert sorted(r["header_message_id"] for r in h.accepted(account.id)) == sorted(
        f"c{i}.{user}" for i in range(5)
    )


def test_recreated_folder_gets_a_new_uidvalidity_and_nothing_is_logged_twice(
    harness: Callable[..., Harness], dovecot: DovecotServer, crm: Crm
) -> None:
    user, password = dovecot.new_user("uidv")
    contact = f"{unique('uidv')}@customer.test"
    crm.add_contacts([contact])
    dovecot.create_folder(user, "Projects")
    raws = [message(contact, user, f"p{i}.{user}") for i in range(3)]
    for raw in raws:
        dovecot.deliver(user, "Projects", raw)
    h = harness()
    account = h.add_account(user, password, start="1m", folders=["INBOX", "Projects"])
    wait_for(lambda: len(h.accepted(account.id)) == 3, what="the first three")
    first = h.rows("SELECT uidvalidity FROM mail_folder WHERE name = 'Projects'")[0]

    # The folder is deleted and made again (a restore, a migration): RFC 3501 says every UID
    # is void. The same three mails come back, plus one new one.
    dovecot.delete_folder(user, "Projects")
    dovecot.create_folder(user, "Projects")
    for raw in [*raws, message(contact, user, f"p-new.{user}")]:
        dovecot.deliver(user, "Projects", raw)
    wait_for(lambda: len(h.accepted(account.id)) == 4, what="the new mail only")
    wait_for(
        lambda: (
            h.rows(
                "SELECT COUNT(*) AS n FROM mail_link"
                " WHERE folder = 'Projects' AND uidvalidity != :v",
                v=first["uidvalidity"],
            )[0]["n"]
            == 4
        ),
        what="all four links on the new UIDVALIDITY",
    )
    h.wait_status(account.id, "live")
    ids = [r["header_message_id"] for r in h.accepted(account.id)]
    assert sorted(ids) == sorted([f"p{i}.{user}" for i in range(3)] + [f"p-new.{user}"])
    assert h.events("email.deleted") == []  # a reset is not a deletion


@pytest.mark.parametrize(
    ("qresync", "on_postgres"),
    [(True, False), (False, False), pytest.param(True, True, marks=pytest.mark.postgres)],
    ids=["qresync", "no-condstore", "qresync-pg"],
)
def test_expunge_and_moves_become_deleted_and_archived_events(
    harness: Callable[..., Harness],
    dovecot: DovecotServer,
    ca: TestCA,
    crm: Crm,
    monkeypatch: pytest.MonkeyPatch,
    qresync: bool,
    on_postgres: bool,
) -> None:
    if not qresync:
        # The same Dovecot, seen as a server without CONDSTORE/QRESYNC (RFC 7162): changes are
        # then found by UIDNEXT/message counts and a UID SEARCH of the logged UIDs.
        monkeypatch.setattr(ImapConnection, "enable_qresync", lambda self: None)
        monkeypatch.setattr(ImapConnection, "condstore", property(lambda self: False))
    user, password = dovecot.new_user("moves")
    contact = f"{unique('mv')}@customer.test"
    crm.add_contacts([contact])
    for i in range(5):
        dovecot.deliver(user, "INBOX", message(contact, user, f"m{i}.{user}"))
    h = harness(postgres=on_postgres)
    account = h.add_account(user, password, start="1m")
    wait_for(lambda: len(h.accepted(account.id)) == 5, what="five logged")
    h.wait_status(account.id, "live")

    client = Mailbox(dovecot, ca, user, password).client()
    client.select_folder("INBOX")
    uid = {
        data[b"BODY[HEADER.FIELDS (MESSAGE-ID)]"].split(b"<")[1].split(b".")[0].decode(): u
        for u, data in client.fetch(
            client.search(["ALL"]), ["BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)]"]
        ).items()
    }
    client.move([uid["m0"]], "Trash")  # deleted
    client.move([uid["m1"]], "Archive")  # archived
    client.delete_messages([uid["m2"]])  # expunged for good: deleted
    client.expunge()
    client.move([uid["m3"]], "Sent")  # into another synced folder: it just moved
    client.logout()

    def events() -> dict[str, list[str]]:
        return {
            kind: sorted(e["message_id"] for e in h.events(f"email.{kind}"))
            for kind in ("deleted", "archived")
        }

    wait_for(
        lambda: events() == {"deleted": [f"m0.{user}", f"m2.{user}"], "archived": [f"m1.{user}"]},
        what="deleted and archived events",
        state=events,
    )
    assert all(e["account_id"] == account.id for e in h.events("email.deleted"))
    wait_for(
        lambda: (
            h.rows("SELECT folder FROM mail_link WHERE key = :k", k=f"mid:m3.{user}")
            == [{"folder": "Sent"}]
        ),
        what="the moved mail's link to follow it",
    )
    assert len(h.accepted(account.id)) == 5  # moving into Sent logged nothing again


def test_changed_password_stops_after_a_few_tries_and_a_reconnect_resumes(
    harness: Callable[..., Harness], dovecot: DovecotServer, crm: Crm
) -> None:
    user, password = dovecot.new_user("auth")
    contact = f"{unique('auth')}@customer.test"
    crm.add_contacts([contact])
    h = harness(auth_max_failures=3)
    account = h.add_account(user, password)
    h.wait_status(account.id, "live")
    dovecot.deliver(user, "INBOX", message(contact, user, f"before.{user}"))
    wait_for(lambda: len(h.accepted(account.id)) == 1, what="the first mail")

    dovecot.set_password(user, "a-new-password-42")
    dovecot.doveadm("kick", user)  # the open session ends; the next login uses the old password
    failed = h.wait_status(account.id, "auth_failed")
    assert failed["auth_failures"] == 3
    assert "refused the username or password" in failed["last_error"]
    assert "app-specific password" in failed["last_error"]
    changed = h.events("account.status_changed")
    assert changed[-1]["status"] == "auth_failed" and changed[-1]["account_id"] == account.id
    attempts_seen = failed["auth_failures"]
    dovecot.deliver(user, "INBOX", message(contact, user, f"while-down.{user}"))
    assert h.account(account.id)["auth_failures"] == attempts_seen  # it stopped trying

    assert h.service is not None
    h.call(h.service.update_account(account.id, AccountUpdate(password="a-new-password-42")))
    wait_for(lambda: len(h.accepted(account.id)) == 2, what="the mail that came meanwhile")
    h.wait_status(account.id, "live")
    assert [e["status"] for e in h.events("account.status_changed")][-2:] == [
        "auth_failed",
        "live",
    ]
    assert sorted(r["header_message_id"] for r in h.accepted(account.id)) == [
        f"before.{user}",
        f"while-down.{user}",
    ]


def test_two_gateway_processes_never_sync_the_same_mailbox(
    harness: Callable[..., Harness], dovecot: DovecotServer, crm: Crm
) -> None:
    h = harness()
    ids = []
    for _ in range(3):
        user, password = dovecot.new_user("lease")
        ids.append(h.add_account(user, password).id)
    assert h.service is not None
    # A second process on the same database: its own store owner, the same accounts table.
    second = ImapService(
        settings=h.settings,
        store=Store(h.db, h.committer, lease_seconds=60, owner="process-two"),
        engine=h.db,
        crm=h.crm_client,
        outbox=Outbox(),
        metrics=Metrics(),
        on_accepted=lambda _id: None,
    )
    h.call(second.start())
    try:
        for account_id in ids:
            h.wait_status(account_id, "live")
        assert set(h.service.runners) == set(ids) and second.runners == {}
        h.call(h.service.stop())  # the first process goes away (its leases are released)
        wait_for(lambda: set(second.runners) == set(ids), what="the second to take over")
        owners = {r["lease_owner"] for r in h.rows("SELECT lease_owner FROM mail_account")}
        assert owners == {"process-two"}
    finally:
        h.call(second.stop())


def test_mail_sent_from_the_crm_lands_in_sent_and_one_way_accounts_hold_no_session(
    harness: Callable[..., Harness], dovecot: DovecotServer, ca: TestCA, crm: Crm
) -> None:
    user, password = dovecot.new_user("oneway")
    contact = f"{unique('ow')}@customer.test"
    crm.add_contacts([contact])
    h = harness()
    account = h.add_account(user, password)
    h.wait_status(account.id, "live")
    assert h.service is not None
    raw = message(user, contact, f"from-crm.{user}", subject="sent from the CRM")
    assert h.call(h.service.append_sent(account.id, raw))
    sent = Mailbox(dovecot, ca, user, password).flags("Sent")
    assert list(sent.values()) == [(b"\\Recent", b"\\Seen")]  # appended as read
    (row,) = wait_for(lambda: h.accepted(account.id), what="the Sent copy to be synced")
    assert row["meta"]["direction"] == "outbound" and row["meta"]["folder"] == "Sent"

    h.call(h.service.update_account(account.id, AccountUpdate(sync_mode="one_way")))
    runner = h.service.runners[account.id]
    wait_for(lambda: runner.conn is None, what="the IMAP session to end")
    assert h.account(account.id)["status"] == "live"
    # Gmail's preset allows two connections; the setting can only lower that.
    assert h.service.slots(MailAccount(id="x", max_connections=2))._value == 2  # type: ignore[call-arg]
    assert h.service.slots(MailAccount(id="y", max_connections=5))._value == 2  # type: ignore[call-arg]


def test_a_connection_that_goes_silent_is_noticed_and_replaced(
    harness: Callable[..., Harness], dovecot: DovecotServer, crm: Crm
) -> None:
    user, password = dovecot.new_user("silent")
    contact = f"{unique('sil')}@customer.test"
    crm.add_contacts([contact])
    assert dovecot.imaps_port is not None
    proxy = FreezingProxy(dovecot.imaps_port)
    try:
        # IDLE is renewed every half second; a DONE without an answer within a second means
        # the peer is gone (in production: minutes, plus TCP keepalive).
        h = harness(idle_refresh_seconds=0.5, command_timeout_seconds=1.0)
        account = h.add_account(user, password, imap_port=proxy.port)
        h.wait_status(account.id, "live")
        proxy.freeze()
        failed = h.wait_status(account.id, "error")
        assert "stopped answering" in failed["last_error"]
        h.wait_status(account.id, "live")
        dovecot.deliver(user, "INBOX", message(contact, user, f"after-silence.{user}"))
        wait_for(lambda: len(h.accepted(account.id)) == 1, what="mail over the new connection")
    finally:
        proxy.close()
