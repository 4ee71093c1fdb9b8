"""The pure parts of IMAP sync: presets, the vault, reply and header parsing, UID sets, policy."""

from __future__ import annotations

from datetime import UTC, datetime
from email.utils import getaddresses
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from gateway.errors import ConfigError
from gateway.imap import accounts
from gateway.imap.accounts import AccountError, start_at
from gateway.imap.connection import FolderInfo, UidSet, imap_date
from gateway.imap.decide import candidates, direction, worth_logging
from gateway.imap.errors import AuthFailed, ImapDisabled, Throttled, classify_login_failure
from gateway.imap.headers import HeaderRecord, literals, parse_addresses, parse_scan
from gateway.imap.models import MailAccount, MailFolder, MailLink
from gateway.imap.presets import bundled_text, load_providers
from gateway.imap.service import choose_folders, pushes_to_us
from gateway.imap.settings import ImapSettings
from gateway.imap.sync import Engine
from gateway.imap.vault import SecretError, Vault, generate_key
from gateway.message import dedupe_key
from gateway.store.db import make_engine, migrate
from gateway.store.models import GatewayTable
from hooks.crm_client import ContactMatch, MatchAnswer, Policy

ROOT = Path(__file__).resolve().parents[2]


# -- presets and secrets -----------------------------------------------------------------------


def test_the_packaged_presets_are_the_documented_ones() -> None:
    assert bundled_text() == (ROOT / "conf" / "providers.toml").read_text()
    providers = load_providers()
    assert set(providers) == {
        "gmail",
        "microsoft365",
        "outlook",
        "zoho",
        "yahoo",
        "icloud",
        "fastmail",
    }
    assert providers["gmail"].imap_host == "imap.gmail.com"
    assert providers["gmail"].max_connections == 2  # never more than two for Gmail
    assert all(p.imap_security == "ssl" and p.imap_port == 993 for p in providers.values())


def test_a_broken_presets_file_is_one_line_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "providers.toml"
    path.write_text('[mine]\nimap_host = "x"\n')
    with pytest.raises(ConfigError, match=r"preset \[mine\] is incomplete"):
        load_providers(path)
    with pytest.raises(ConfigError, match=r"imap\.providers_file"):
        load_providers(tmp_path / "missing.toml")


def test_the_vault_encrypts_and_names_the_key_when_it_is_missing_or_wrong() -> None:
    key = generate_key()
    vault = Vault(key)
    token = vault.encrypt("hunter2-secret")
    assert b"hunter2" not in token
    assert vault.decrypt(token) == "hunter2-secret"
    assert "hunter2" not in repr(vault) and key not in repr(vault)
    rotated = Vault(generate_key(), [key])  # a rotation keeps old secrets readable
    assert rotated.decrypt(token) == "hunter2-secret"
    with pytest.raises(SecretError, match="set the password again"):
        Vault(generate_key()).decrypt(token)
    with pytest.raises(ConfigError) as missing:
        Vault("")
    assert "`imap.secret_key` is not set" in str(missing.value)
    assert "mailgate account keygen" in str(missing.value)
    assert "\n" not in str(missing.value)
    with pytest.raises(ConfigError, match=r"`imap\.secret_key` is not a Fernet key"):
        Vault("not-a-key")


# -- replies and headers ------------------------------------------------------------------------


SCAN = b"BODY[HEADER.FIELDS (FROM TO CC BCC REPLY-TO MESSAGE-ID)]"


def test_fetch_replies_are_matched_by_uid_whatever_their_shape() -> None:
    data: list[object] = [
        (
            b"1 (UID 11 RFC822.SIZE 5000 " + SCAN + b" {40}",
            b"From: a@x.test\r\nMessage-ID: <1@x.test>\r\n\r\n",
        ),
        b")",
        # UID after the literal (servers choose the order of FETCH items).
        (b"2 (" + SCAN + b" {22}", b"From: B@X.test\r\n\r\n"),
        b" UID 12 RFC822.SIZE 77)",
        # An unsolicited flag update of another message (RFC 3501 section 7.4.2): ignored.
        b"7 (FLAGS (\\Seen))",
        # A short value as a quoted string instead of a literal.
        b"3 (UID 13 " + SCAN + b' "From: c@x.test\\r\\n\\r\\n")',
        b"4 (UID 14 " + SCAN + b" NIL)",
    ]
    records = parse_scan(data)
    assert [r.uid for r in records] == [11, 12, 13, 14]
    assert records[0].from_ == ["a@x.test"] and records[0].key == "mid:1@x.test"
    assert records[1].from_ == ["b@x.test"] and records[1].key is None
    assert [r.size for r in records] == [5000, 77, 0, 0]
    assert records[3].from_ == []
    assert dict(literals([(b"5 (UID 9 BODY[] {3}", b"abc"), b")"], b"BODY[]")) == {9: b"abc"}


def test_header_blocks_unfold_and_parse_every_address_form() -> None:
    block = (
        b'From: "Doe, Jane" <Jane@Example.TEST>\r\n'
        b"To: bob@x.test,\r\n\tCarol <carol@x.test>, undisclosed-recipients:;\r\n"
        b"Cc: =?utf-8?q?J=C3=BCrgen?= <j@x.test> (work)\r\n"
        b"Bcc: hidden@x.test\r\nReply-To: r@x.test\r\n"
        b"Message-ID: <Local.Part@Domain.TEST>\r\n\r\n"
    )
    (record,) = parse_scan([(b"1 (UID 1 " + SCAN + b" {%d}" % len(block), block), b")"])
    assert record.from_ == ["jane@example.test"]
    assert record.to == ["bob@x.test", "carol@x.test"]
    assert record.cc == ["j@x.test"] and record.bcc == ["hidden@x.test"]
    assert record.reply_to == ["r@x.test"]
    # The same key the pipeline's dedupe_key gives the whole message.
    assert record.key == dedupe_key(block + b"body") == "mid:Local.Part@domain.test"
    assert parse_addresses("a@x.test, b@y.test") == ["a@x.test", "b@y.test"]
    # The fast path agrees with the email package on the forms real mail uses.
    for value in (
        '"Doe, Jane" <Jane@X.test>, bob@y.test',
        '"a" <a@x.test>,"b, c" <b@x.test>',
        '"odd <x@y>" <real@z.test>',
        "=?utf-8?q?J=C3=BCrgen?= <j@x.test>",
        "Bob <bob@x.test> (work), Team: c@x.test, d@x.test;",
        "Undisclosed recipients:;",
    ):
        expected = [a.lower() for _, a in getaddresses([value]) if "@" in a]
        assert parse_addresses(value) == expected, value


def test_uid_sets_stay_compact_and_avoid_the_star_pitfall() -> None:
    uids = UidSet.parse("1:5,7,9:12")
    assert str(uids) == "1:5,7,9:12" and len(uids) == 10
    assert [str(c) for c in uids.chunks(4)] == ["1:4", "5,7,9:10", "11:12"]
    # "UID 13:*" on a mailbox whose highest UID is 12 answers 12 (RFC 3501 section 6.4.8).
    assert not UidSet.of([12]).above(12)
    assert str(UidSet.parse("3:1")) == "1:3"
    assert 7 in uids and 8 not in uids and uids.max == 12
    assert imap_date(datetime(2024, 2, 1, tzinfo=UTC).date()) == "1-Feb-2024"


def test_body_fetches_are_bounded_by_count_and_bytes() -> None:
    engine = Engine(
        store=None,  # type: ignore[arg-type]
        crm=None,  # type: ignore[arg-type]
        outbox=None,
        settings=ImapSettings(body_chunk=3, body_batch_bytes=10_000),
        io=None,  # type: ignore[arg-type]
        metrics=None,  # type: ignore[arg-type]
        on_accepted=lambda _id: None,
    )
    sizes = [100, 100, 100, 100, 9_000, 20_000, 50]
    wanted = [(HeaderRecord(uid=i, size=n), "inbound") for i, n in enumerate(sizes)]
    pieces = engine._pieces(wanted)  # type: ignore[arg-type]
    assert [[r.uid for r, _ in p] for p in pieces] == [[0, 1, 2], [3, 4], [5], [6]]
    assert engine._pieces([]) == [[]]  # one (empty) piece still carries the cursor


# -- what is worth logging ----------------------------------------------------------------------


def answer(contacts: dict[str, bool], **policy: object) -> MatchAnswer:
    return MatchAnswer(
        contacts={
            a: ContactMatch(a, i, "rep@corp.test", True, mine)
            for i, (a, mine) in enumerate(contacts.items())
        },
        policy=Policy(**policy),  # type: ignore[arg-type]
    )


def test_only_mail_with_contacts_or_what_auto_create_would_take_is_fetched() -> None:
    own = frozenset({"rep@corp.test"})
    received = HeaderRecord(uid=1, from_=["c@client.test"], to=["rep@corp.test"])
    sent = HeaderRecord(uid=2, from_=["rep@corp.test"], to=["new@client.test"])
    noreply = HeaderRecord(uid=3, from_=["rep@corp.test"], to=["noreply@client.test"])
    assert direction(received, own, sent_folder=False) == "inbound"
    assert direction(sent, own, sent_folder=False) == "outbound"
    assert direction(received, own, sent_folder=True) == "outbound"
    assert candidates(received, own, "inbound") == ["c@client.test"]

    def takes(record: HeaderRecord, a: MatchAnswer) -> bool:
        way = direction(record, own, sent_folder=False)
        return worth_logging(candidates(record, own, way), a, way)

    assert takes(received, answer({"c@client.test": True}))
    assert not takes(received, answer({}))
    assert not takes(received, answer({"c@client.test": False}, assigned_records_only=True))
    assert not takes(received, answer({"c@client.test": True}, excluded_domains={"client.test"}))
    assert takes(sent, answer({}, auto_create="sent"))
    assert not takes(received, answer({}, auto_create="sent"))
    assert takes(received, answer({}, auto_create="sent_and_received"))
    assert not takes(noreply, answer({}, auto_create="sent_and_received"))  # a group address


def test_login_refusals_are_told_apart_by_what_providers_say() -> None:
    hints = {"app_password_hint": "APP", "disabled_hint": "ENABLE"}
    gmail = "[ALERT] Your account is not enabled for IMAP use. Please visit your Gmail settings"
    assert isinstance(classify_login_failure(gmail, **hints), ImapDisabled)
    m365 = "User is authenticated but not connected."
    assert isinstance(classify_login_failure(m365, **hints), ImapDisabled)
    wrong = classify_login_failure("[AUTHENTICATIONFAILED] Invalid credentials (Failure)", **hints)
    assert isinstance(wrong, AuthFailed) and wrong.sentence.endswith("APP")
    busy = "[THROTTLED] Too many simultaneous connections. (Failure)"
    assert isinstance(classify_login_failure(busy, **hints), Throttled)


# -- account choices ----------------------------------------------------------------------------


def test_window_choices_mean_calendar_months_or_a_date() -> None:
    now = datetime(2024, 8, 31, 12, tzinfo=UTC).timestamp()
    assert start_at("now", now=now) == now
    assert datetime.fromtimestamp(start_at("6m", now=now), UTC).date().isoformat() == "2024-02-29"
    assert datetime.fromtimestamp(start_at("1m", now=now), UTC).date().isoformat() == "2024-07-31"
    assert start_at("2024-01-31", now=now) == datetime(2024, 1, 31, tzinfo=UTC).timestamp()
    with pytest.raises(AccountError, match="use now, 1m, 3m, 6m or a date"):
        start_at("2 weeks", now=now)


def test_default_folders_are_inbox_and_the_special_use_sent_folder() -> None:
    available = [
        FolderInfo("INBOX", None, True),
        FolderInfo("[Gmail]", None, False),
        FolderInfo("[Gmail]/Sent Mail", "\\Sent", True),
        FolderInfo("[Gmail]/Trash", "\\Trash", True),
    ]
    picked, missing = choose_folders([], available)
    assert [f.name for f in picked] == ["INBOX", "[Gmail]/Sent Mail"] and missing == []
    picked, missing = choose_folders(["inbox", "Nope"], available)
    assert [f.name for f in picked] == ["INBOX"] and missing == ["Nope"]


def test_only_custom_set_ups_are_registered_for_push_and_only_when_it_is_on() -> None:
    # Promise 7: a preset provider's server never pushes to us, so its mailbox is not written.
    on, off = ImapSettings(push_secret="s"), ImapSettings()
    custom, gmail = MailAccount(provider="custom"), MailAccount(provider="gmail")
    assert pushes_to_us(on, custom)
    assert not pushes_to_us(on, gmail)
    assert not pushes_to_us(off, custom)


def test_a_new_password_or_new_tokens_reconnect_with_that_kind_of_login(tmp_path: Path) -> None:
    from pydantic import SecretStr
    from sqlmodel import Session

    from gateway.imap.models import AccountStatus

    vault = Vault(generate_key())
    engine = make_engine(f"sqlite:///{tmp_path / 'a.db'}")
    migrate(engine)
    account = MailAccount(
        auth_method="oauth", auth_failures=3, status=AccountStatus.AUTH_FAILED, sharing="public"
    )
    with Session(engine) as session:
        patch = accounts.AccountUpdate(password=SecretStr("app-password"))
        accounts.update_account(session, account=account, patch=patch, vault=vault)
    # A password set on an OAuth mailbox is a password login from now on, not tokens to parse.
    assert account.auth_method == "password" and vault.decrypt(account.secret) == "app-password"
    assert account.auth_failures == 0 and account.status == AccountStatus.CONNECTING
    accounts.replace_secret(account, vault.encrypt("{}"), auth_method="oauth")
    assert account.auth_method == "oauth"


def test_the_migration_creates_exactly_the_modelled_tables(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'm.db'}")
    migrate(engine)
    mine = {t.__tablename__ for t in (MailAccount, MailFolder, MailLink)}  # type: ignore[attr-defined]
    with engine.connect() as connection:
        diffs = compare_metadata(MigrationContext.configure(connection), GatewayTable.metadata)
    ours = [d for d in diffs if any(name in repr(d) for name in mine)]
    assert ours == []
    assert accounts.UNVERIFIED_WARNING  # shown beside any account that skips verification
    engine.dispose()
