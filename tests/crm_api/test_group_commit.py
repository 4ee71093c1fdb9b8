"""Group commit, in process: several events in one transaction behave exactly as if each had
its own (a reply before its parent in the same batch, the same Message-ID or webhook-id twice in
one batch), and one event that cannot be stored fails alone while its neighbours are stored."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlmodel import Session

from crm_api import crud, ingest
from crm_api.db import Database, migrate
from crm_api.settings import PolicySettings
from tests.crm_api.conftest import COMPANY, email_data


def item(event_type: str, data: dict[str, Any], webhook_id: str) -> ingest.Item:
    body = json.dumps({"type": event_type, "timestamp": "2026-01-01T00:00:00Z", "data": data})
    return ingest.Item(webhook_id, int(time.time()), ingest.parse(body.encode()))


def database(url: str) -> Database:
    db = Database(url)
    migrate(db.engine)
    with Session(db.engine) as session:
        crud.seed_org(session=session, policy=PolicySettings(company_domains=[COMPANY]))
        session.commit()
    return db


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def new_db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[[], Database]]:
    """Makes fresh CRM databases on either backend: on PostgreSQL a batch runs in psycopg's
    pipeline with its look-ups in one round trip and its rows as arrays, on SQLite statement
    by statement; both must store alike."""
    made: list[tuple[Database, str]] = []

    def make() -> Database:
        if request.param == "sqlite":
            url = f"sqlite:///{tmp_path / f'batch{len(made)}.db'}"
        else:
            url = request.getfixturevalue("postgres").new_database()
        made.append((database(url), url))
        return made[-1][0]

    yield make
    for db, url in made:
        db.dispose()
        if request.param == "postgres":
            request.getfixturevalue("postgres").drop_database(url)


def rows(db: Database, sql: str) -> list[Any]:
    with db.engine.connect() as conn:
        return list(conn.execute(sa.text(sql)).all())


def test_a_batch_threads_and_dedupes_like_single_events(new_db: Callable[[], Database]) -> None:
    db = new_db()
    owner = f"ann@{COMPANY}"
    parent = email_data(owner=owner, to=["p@client.example"], message_id="<Parent@x>")
    child = email_data(
        owner=owner,
        to=["p@client.example"],
        message_id="<child@x>",
        in_reply_to="<parent@X>",
        subject="Re: other words",
    )
    again = {**parent, "account": {**parent["account"], "id": "second-account"}}
    items = [
        item("email.logged", child, "w1"),  # the reply first …
        item("email.logged", parent, "w2"),  # … then its parent, in the same transaction
        item("email.logged", again, "w3"),  # the same message seen by a second account
        item("email.logged", child, "w1"),  # a replay inside the batch
        item("email.deleted", {"message_id": "<parent@x>", "account_id": "second-account"}, "w4"),
    ]
    assert ingest.store(engine=db.engine, items=items) == [
        "stored",
        "stored",
        "stored",
        "duplicate",
        "stored",
    ]
    emails = rows(db, "SELECT message_id, thread_id FROM email ORDER BY message_id")
    assert [m for m, _ in emails] == ["child@x", "parent@x"]
    assert len({t for _, t in emails}) == 1  # one thread
    assert rows(db, "SELECT count(*) FROM thread") == [(1,)]
    links = rows(
        db,
        "SELECT e.message_id, l.account_id, l.status FROM email_account l "
        "JOIN email e ON e.id = l.email_id ORDER BY e.message_id, l.account_id",
    )
    first_account = parent["account"]["id"]
    assert links == sorted(
        [
            ("child@x", first_account, "active"),
            ("parent@x", first_account, "active"),
            ("parent@x", "second-account", "deleted"),
        ]
    )
    assert rows(db, "SELECT count(*) FROM webhook_event") == [(4,)]
    db.dispose()


def test_one_bad_event_fails_alone(
    new_db: Callable[[], Database], monkeypatch: pytest.MonkeyPatch
) -> None:
    db = new_db()
    original = ingest._Batch._other

    def sometimes_broken(self: ingest._Batch, it: ingest.Item) -> None:
        if it.event.data.get("account_id") == "boom":
            raise RuntimeError("simulated storage failure")
        original(self, it)

    monkeypatch.setattr(ingest._Batch, "_other", sometimes_broken)
    good = [email_data(owner=f"ann@{COMPANY}", to=[f"g{i}@client.example"]) for i in range(3)]
    items = [item("email.logged", g, f"ok{i}") for i, g in enumerate(good)]
    bad = item("sync.completed", {"account_id": "boom"}, "bad")
    results = ingest.store(engine=db.engine, items=[items[0], items[1], bad, items[2]])
    assert results[:2] == ["stored", "stored"] and results[3] == "stored"
    assert isinstance(results[2], RuntimeError)
    assert rows(db, "SELECT count(*) FROM email") == [(3,)]
    assert rows(db, "SELECT webhook_id FROM webhook_event ORDER BY webhook_id") == [
        ("ok0",),
        ("ok1",),
        ("ok2",),
    ]
    db.dispose()


def test_a_late_middle_ancestor_joins_the_whole_chain(new_db: Callable[[], Database]) -> None:
    db = new_db()
    owner = f"ann@{COMPANY}"
    chain = ["<r@x>", "<a@x>", "<b@x>", "<c@x>", "<d@x>"]

    def message(i: int) -> dict[str, Any]:
        return email_data(
            owner=owner,
            to=["p@client.example"],
            message_id=chain[i],
            subject=f"Re: step {i}",
            references=chain[:i],
            in_reply_to=chain[i - 1] if i else None,
        )

    for i in (2, 3, 4, 1):  # the root never arrives; a@x, which b@x answers, arrives last
        assert ingest.store(
            engine=db.engine, items=[item("email.logged", message(i), f"w{i}")]
        ) == ["stored"]
    assert rows(db, "SELECT count(DISTINCT thread_id) FROM email") == [(1,)]
    assert rows(db, "SELECT count(*) FROM thread") == [(1,)]
    assert rows(db, "SELECT count(*) FROM email") == [(4,)]
    # Only the root, the parent and the newest Reference are kept as keys, not every Reference.
    assert rows(
        db, "SELECT max(n) FROM (SELECT count(*) AS n FROM email_reference GROUP BY email_id) AS t"
    ) == [(3,)]
    db.dispose()


def test_the_subject_fallback_in_a_batch_matches_one_event_at_a_time(
    new_db: Callable[[], Database],
) -> None:
    """Mail without References finds its thread by subject and a shared participant, whether
    the thread's other mail was stored earlier or earlier in the same batch, and the thread
    chosen is the one active last, counting this batch's mail."""
    owner = f"ann@{COMPANY}"

    def message(n: int, subject: str, to: str, day: int) -> dict[str, Any]:
        return email_data(
            owner=owner,
            to=[to],
            message_id=f"<fb{n}@x>",
            subject=subject,
            date=f"2026-01-{day:02d}T00:00:00Z",
        )

    stored = [
        message(1, "Offer", "p@client.example", 1),
        message(2, "Offer", "q@client.example", 2),
    ]
    batch = [
        message(3, "Offer", "p@client.example", 5),  # p's thread is now the newest
        message(4, "Re: Offer", "p@client.example", 6),
        message(5, "Quote", "r@client.example", 7),
        message(6, "Quote", "r@client.example", 8),  # its thread exists only in this batch
        message(7, "Offer", "q@client.example", 9),
    ]

    def threads(db: Database) -> list[Any]:
        return rows(db, "SELECT message_id, thread_id FROM email ORDER BY message_id")

    results = []
    for batched in (False, True):
        db = new_db()
        for n, data in enumerate(stored):
            ingest.store(engine=db.engine, items=[item("email.logged", data, f"s{n}")])
        items = [item("email.logged", data, f"b{n}") for n, data in enumerate(batch)]
        if batched:
            assert ingest.store(engine=db.engine, items=items) == ["stored"] * len(items)
        else:
            for one in items:
                assert ingest.store(engine=db.engine, items=[one]) == ["stored"]
        results.append(threads(db))
        db.dispose()
    assert results[0] == results[1]
    by_mid = dict(results[1])
    assert by_mid["fb1@x"] == by_mid["fb3@x"] == by_mid["fb4@x"]
    assert by_mid["fb2@x"] == by_mid["fb7@x"] != by_mid["fb1@x"]
    assert by_mid["fb5@x"] == by_mid["fb6@x"]


@pytest.mark.postgres
def test_a_unique_race_on_postgres_fails_only_its_event(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch runs in psycopg's pipeline mode there: a unique violation (as when a concurrent
    request stored the same webhook first) fails the batch, each event is then stored alone,
    and the connection goes back to the pool usable."""
    db = Database(pg_url)
    migrate(db.engine)
    with Session(db.engine) as session:
        crud.seed_org(session=session, policy=PolicySettings(company_domains=[COMPANY]))
        session.commit()
    first = email_data(owner=f"ann@{COMPANY}", to=["r0@client.example"])
    assert ingest.store(engine=db.engine, items=[item("email.logged", first, "raced")]) == [
        "stored"
    ]
    # The race: this request's look-up does not see the row the other one stored.
    statements = ingest.STATEMENTS["postgresql"]
    monkeypatch.setattr(statements, "seen", statements.seen.where(sa.false()))
    others = [email_data(owner=f"ann@{COMPANY}", to=[f"r{i}@client.example"]) for i in (1, 2)]
    results = ingest.store(
        engine=db.engine,
        items=[
            item("email.logged", others[0], "w1"),
            item("email.logged", {**first, "message_id": "<new@x>"}, "raced"),
            item("email.logged", others[1], "w2"),
        ],
    )
    assert results[0] == "stored" and results[2] == "stored"
    assert isinstance(results[1], sa.exc.IntegrityError)
    monkeypatch.undo()
    more = email_data(owner=f"ann@{COMPANY}", to=["r3@client.example"])
    assert ingest.store(engine=db.engine, items=[item("email.logged", more, "w3")]) == ["stored"]
    assert rows(db, "SELECT count(*) FROM email") == [(4,)]
    db.dispose()
