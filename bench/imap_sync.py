"""IMAP sync: Mailgate's first sync of a 20,000-message mailbox against a bare imapclient scan and
mbsync, the delivery-to-CRM latency while idling, and the RSS of 200 idle accounts.

One private Dovecot (process limits raised so 200 sessions fit) holds a 20,000-message INBOX of
~10 KB messages written as Maildir files, 10 % of them from 200 CRM contacts (2,000 other
senders). The scan, sync and mirror peers use its plain port on loopback (the other benchmarks
run without TLS too); the idle accounts use implicit TLS with a test CA, as real mailboxes do.
The bundled CRM runs under uvicorn with those contacts. Measured in interleaved rounds (the
machine is shared; each figure is the median round):

- ``bare_envelope_scan``: imapclient, one ``UID FETCH 1:N (ENVELOPE)`` parsed by imapclient's own
  ``parse_fetch_response`` (``fetch("1:*")`` itself raises in imapclient 4.1; see PERF_NOTES);
- ``mailgate_initial_sync``: the real :class:`~gateway.imap.service.ImapService` (SQLite store,
  the CRM over HTTP, the hooks' Outbox) from ``add_account`` to the INBOX's ``sync.completed``:
  header scan, contact matching, body fetch and durable accept of the 2,000 contact messages;
- ``mbsync``: isync mirroring the INBOX into a fresh Maildir (its default ``FSync yes``, and
  ``FSync no``).

Then, with an account idling (RFC 2177) in the whole gateway (IMAP sync, worker, hooks to the
CRM), 50 messages from a contact are delivered over LMTP one at a time: the latency from LMTP's
250 to the email stored in the CRM (and to the gateway's accepted row), next to a bare imapclient
IDLE client's delivery-to-EXISTS latency on the same mailbox. Twice: with IDLE alone (Dovecot
holds every IDLE notification back for 500 ms, ``NOTIFY_DELAY_MSECS`` in its
index-mailbox-check.c, so that is the floor of any IDLE client), and with Dovecot's
push_notification ``ox`` driver posting to the gateway's ``/api/v1/imap/push`` (``[imap]
push_secret``; the gateway registers the mailbox by METADATA). Last, a separate process runs
the service with 200 connected, idle accounts: its RSS (and threads, sockets) against the same
process with none.

    .venv/bin/python bench/imap_sync.py [--messages 20000] [--size 10240] [--rounds 3]
                                        [--idle-accounts 200] [--latency-samples 50]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import smtplib
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import httpx  # noqa: E402
from cryptography.fernet import Fernet  # noqa: E402
from imapclient import IMAPClient  # noqa: E402
from imapclient.response_parser import parse_fetch_response  # noqa: E402
from sqlmodel import Session  # noqa: E402

from tests.imap.mailbox import MailboxSpec, make_mails, write_maildir  # noqa: E402
from tests.servers.certs import TestCA  # noqa: E402
from tests.servers.dovecot import DovecotServer  # noqa: E402
from tests.servers.ports import free_port  # noqa: E402
from tests.servers.uvicorn import UvicornServer  # noqa: E402

if TYPE_CHECKING:
    from gateway.imap.service import ImapService

COMPANY = "corp.test"
KEY = Fernet.generate_key().decode()
WEBHOOK_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
PUSH_SECRET = "bench-push-secret"


def log(text: str) -> None:
    print(f"[imap_sync] {text}", file=sys.stderr, flush=True)


def wait_until(check: Callable[[], Any], *, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not done after {timeout:.0f}s")
        time.sleep(0.005)


class BenchDovecot(DovecotServer):
    """The test Dovecot, with room for hundreds of simultaneous IMAP sessions."""

    def _config(self) -> str:
        return super()._config() + "default_process_limit = 1000\ndefault_client_limit = 5000\n"


# -- the CRM -----------------------------------------------------------------------------------


def start_crm(workdir: Path, contacts: list[str]) -> tuple[UvicornServer, str]:
    from crm_api import crud
    from crm_api.db import Database
    from crm_api.db import migrate as crm_migrate
    from crm_api.models import Role, UserCreate

    url = f"sqlite:///{workdir / 'crm.db'}"
    config = workdir / "crm.toml"
    config.write_text(
        f'[webhooks]\nsecrets = ["{WEBHOOK_SECRET}"]\n'
        f'[policy]\ncompany_domains = ["{COMPANY}"]\nauto_create = "none"\n'
    )
    db = Database(url)
    crm_migrate(db.engine)
    with Session(db.engine) as session:
        user = crud.create_user(
            session=session, user_in=UserCreate(email=f"admin@{COMPANY}", role=Role.admin)
        )
        token = crud.create_token(session=session, user=user)
        session.commit()
    db.dispose()
    server = UvicornServer(
        "crm_api.main:create_app_from_env",
        {"MAILGATE_CRM_CONFIG": str(config), "MAILGATE_CRM_DATABASE_URL": url},
    ).start()
    with httpx.Client(
        base_url=server.url, headers={"Authorization": f"Bearer {token}"}, timeout=30
    ) as client:
        for address in contacts:
            reply = client.post(
                "/api/v1/contacts", json={"name": address, "primary_address": address}
            )
            reply.raise_for_status()
    return server, token


# -- peers -------------------------------------------------------------------------------------


def bare_envelope_scan(dovecot: DovecotServer, user: str, password: str) -> dict[str, Any]:
    client = IMAPClient(dovecot.host, dovecot.port, ssl=False, timeout=120)
    client.login(user, password)
    top = client.select_folder("INBOX", readonly=True)[b"UIDNEXT"] - 1
    started = time.perf_counter()
    tag = client._imap._command("UID", "FETCH", f"1:{top}", "(ENVELOPE)")
    typ, data = client._imap._command_complete("FETCH", tag)
    typ, data = client._imap._untagged_response(typ, data, "FETCH")
    parsed = parse_fetch_response(data, True, True)
    seconds = time.perf_counter() - started
    client.logout()
    return {"seconds": round(seconds, 3), "messages": len(parsed)}


def mbsync_mirror(
    dovecot: DovecotServer, user: str, password: str, workdir: Path, *, fsync: bool
) -> dict[str, Any]:
    target = workdir / f"mbsync-{'fsync' if fsync else 'nofsync'}"
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir()
    config = target / "mbsyncrc"
    config.write_text(
        f"FSync {'yes' if fsync else 'no'}\n\n"
        f"IMAPAccount bench\nHost {dovecot.host}\nPort {dovecot.port}\nUser {user}\n"
        f"Pass {password}\nSSLType None\nAuthMechs LOGIN\n\n"
        "IMAPStore remote\nAccount bench\n\n"
        f"MaildirStore local\nPath {target}/mail/\nInbox {target}/mail/INBOX\n\n"
        "Channel mirror\nFar :remote:\nNear :local:\nPatterns INBOX\nCreate Near\n"
        f"Sync Pull\nSyncState {target}/state/\n"
    )
    (target / "state").mkdir()
    (target / "mail").mkdir()
    started = time.perf_counter()
    result = subprocess.run(
        ["mbsync", "-q", "-c", str(config), "mirror"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"mbsync failed: {result.stderr.strip()}")
    copied = len(os.listdir(target / "mail" / "INBOX" / "cur")) + len(
        os.listdir(target / "mail" / "INBOX" / "new")
    )
    shutil.rmtree(target / "mail", ignore_errors=True)
    return {"seconds": round(seconds, 3), "messages": copied}


# -- Mailgate, in this process -----------------------------------------------------------------


class _OnLoop:
    """A gateway on an asyncio loop in a thread of this process: ``call`` runs a coroutine there,
    ``scalar`` reads its SQLite store as an outsider would, ``add`` connects a Dovecot user."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def imap(self) -> ImapService:
        raise NotImplementedError

    def call(self, coroutine: Any, timeout: float = 600) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout=timeout)

    def scalar(self, sql: str, *params: Any) -> Any:
        return sqlite_scalar(self.path, sql, *params)

    def add(self, dovecot: DovecotServer, user: str, password: str, **choices: Any) -> str:
        from gateway.imap.accounts import AccountCreate

        data = AccountCreate(
            email=user,
            password=password,
            imap_host=dovecot.host,
            imap_port=dovecot.port,
            imap_security="none",
            kind="shared",
            **choices,
        )
        return str(self.call(self.imap().add_account(data)).id)

    def _end_loop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


class Gateway(_OnLoop):
    """The IMAP service with a real store, CRM client and outbox, on a loop in a thread."""

    def __init__(self, workdir: Path, crm_url: str, crm_token: str, **imap: Any) -> None:
        from gateway.settings import Settings
        from gateway.store.db import make_engine, migrate

        super().__init__(workdir / "gateway.db")
        url = f"sqlite:///{self.path}"
        self.settings = Settings(
            database={"url": url},  # type: ignore[arg-type]
            imap={"secret_key": KEY, **imap},  # type: ignore[arg-type]
        )
        self.engine = make_engine(url)
        migrate(self.engine)
        self.crm_url, self.crm_token = crm_url, crm_token
        self.call(self._start())

    def imap(self) -> ImapService:
        return self.service

    async def _start(self) -> None:
        from gateway.imap.service import ImapService
        from gateway.metrics import Metrics
        from gateway.store.queue import GroupCommitter, Store
        from hooks.crm_client import CrmClient
        from hooks.webhooks import Outbox

        self.committer = GroupCommitter(self.engine)
        await self.committer.start()
        self.store = Store(self.engine, self.committer, lease_seconds=300)
        self.http = httpx.AsyncClient(timeout=30)
        self.service = ImapService(
            settings=self.settings,
            store=self.store,
            engine=self.engine,
            crm=CrmClient(self.http, base_url=self.crm_url, token=self.crm_token),
            outbox=Outbox(),
            metrics=Metrics(),
            on_accepted=lambda _id: None,
        )
        await self.service.start()

    def add_many(
        self, host: str, port: int, users: list[tuple[str, str]], *, security: str = "ssl"
    ) -> None:
        """Store accounts directly (no login test each), then start them all at once."""
        from gateway.imap import accounts
        from gateway.imap.accounts import AccountCreate

        with Session(self.engine) as session:
            for user, password in users:
                data = AccountCreate(
                    email=user,
                    password=password,
                    imap_host=host,
                    imap_port=port,
                    imap_security=security,  # type: ignore[arg-type]
                    kind="shared",
                )
                accounts.new_account(
                    session,
                    data=data,
                    vault=self.service.vault,
                    providers=self.service.providers,
                )
            session.commit()
        self.call(self.service.reconcile())

    def close(self) -> None:
        async def stop() -> None:
            await self.service.stop()
            await self.http.aclose()
            await self.committer.stop()

        self.call(stop())
        self._end_loop()
        self.engine.dispose()


def mailgate_initial_sync(
    dovecot: DovecotServer, user: str, password: str, workdir: Path, crm: tuple[str, str]
) -> dict[str, Any]:
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir()
    gateway = Gateway(workdir, *crm)
    try:
        started = time.perf_counter()
        account = gateway.add(dovecot, user, password, start="6m", folders=["INBOX"])
        wait_until(
            lambda: gateway.scalar(
                "SELECT COUNT(*) FROM outbox WHERE event_type = ?", "sync.completed"
            ),
            timeout=600,
            what="sync.completed",
        )
        seconds = time.perf_counter() - started
        accepted = gateway.scalar("SELECT COUNT(*) FROM message WHERE source = 'imap'")
        distinct = gateway.scalar(
            "SELECT COUNT(DISTINCT header_message_id) FROM message WHERE source = 'imap'"
        )
        payload = json.loads(
            gateway.scalar("SELECT payload FROM outbox WHERE event_type = 'sync.completed'")
        )["data"]
        return {
            "seconds": round(seconds, 3),
            "scanned": payload["fetched"],
            "accepted": accepted,
            "accepted_distinct": distinct,
            "account": account,
        }
    finally:
        gateway.close()


# -- latency while idling ----------------------------------------------------------------------


class FullGateway(_OnLoop):
    """``Mailgate`` as ``mailgate serve`` builds it (IMAP sync, worker, hooks to the CRM, admin
    API for the push route), on a loop in a thread of this process."""

    def __init__(
        self, workdir: Path, crm_url: str, crm_token: str, *, api_port: int, push: bool
    ) -> None:
        from gateway.app import Mailgate
        from gateway.settings import Settings

        super().__init__(workdir / "gateway.db")
        settings = Settings(
            server={"hostname": "bench.test", "data_dir": str(workdir)},  # type: ignore[arg-type]
            database={"url": f"sqlite:///{self.path}"},  # type: ignore[arg-type]
            submission={"enabled": False},  # type: ignore[arg-type]
            capture={"enabled": False},  # type: ignore[arg-type]
            api={"port": api_port},  # type: ignore[arg-type]
            crm={"embedded": False, "url": crm_url},  # type: ignore[arg-type]
            hooks={  # type: ignore[arg-type]
                "enabled": True,
                "crm_token": crm_token,
                "webhook_secrets": [WEBHOOK_SECRET],
                "link_secret": "bench",
            },
            imap={  # type: ignore[arg-type]
                "secret_key": KEY,
                "push_secret": PUSH_SECRET if push else "",
                "poll_interval_seconds": 600.0,  # only IDLE (or the push) brings news
            },
        )
        self.app = Mailgate(settings)
        self.call(self.app.start())

    def imap(self) -> ImapService:
        assert self.app.imap is not None
        return self.app.imap

    def close(self) -> None:
        self.call(self.app.stop())
        self._end_loop()


def sqlite_scalar(path: Path, sql: str, *params: Any) -> Any:
    # A separate read-only connection: what anyone looking at the database would see.
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        db.execute("PRAGMA busy_timeout = 5000")
        row = db.execute(sql, params).fetchone()
        return row[0] if row else None


def _stamp(value: str) -> float:
    from datetime import UTC, datetime

    parsed = datetime.fromisoformat(value)
    return (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).timestamp()


def latency(
    dovecot: DovecotServer,
    contact: str,
    workdir: Path,
    crm: tuple[str, str],
    crm_db: Path,
    samples: int,
    *,
    api_port: int,
    push: bool,
) -> dict[str, Any]:
    """Delivery (LMTP's 250) to the email stored in the CRM, with the account idling; and a bare
    imapclient IDLE client's delivery-to-EXISTS on the same mailbox at the same time.

    Each sample is delivered once the previous one is in the CRM, so the account is idle
    when it arrives. Times come from the stores' own clocks (the gateway's ``message``
    row, the CRM's ``email.created_at``), read after each sample, so waiting costs nothing
    that is measured.
    """
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir()
    user, password = dovecot.new_user("push" if push else "idle")
    gateway = FullGateway(workdir, *crm, api_port=api_port, push=push)
    bare = IMAPClient(dovecot.host, dovecot.port, ssl=False, timeout=30)
    bare.login(user, password)
    bare.select_folder("INBOX", readonly=True)
    notified: list[float] = []
    stop = threading.Event()

    def idle_client() -> None:
        bare.idle()
        while not stop.is_set():
            for response in bare.idle_check(timeout=0.2):
                if len(response) > 1 and response[1] == b"EXISTS":
                    notified.append(time.time())
        bare.idle_done()

    watcher = threading.Thread(target=idle_client, daemon=True)
    watcher.start()
    to_crm: list[float] = []
    to_store: list[float] = []
    peer: list[float] = []
    try:
        gateway.add(dovecot, user, password, start="now", folders=["INBOX"])
        wait_until(
            lambda: gateway.scalar("SELECT status FROM mail_account") == "live",
            timeout=60,
            what="live",
        )
        time.sleep(0.5)  # let it settle into IDLE: the measurement is of an idle account
        for i in range(samples):
            message_id = f"lat{i}.{time.monotonic_ns()}@bench.test"
            raw = (
                f"From: {contact}\r\nTo: {user}\r\nSubject: latency {i}\r\n"
                f"Message-ID: <{message_id}>\r\n\r\nHello.\r\n"
            ).encode()
            before = len(notified)
            with smtplib.LMTP(dovecot.host, dovecot.lmtp_port) as lmtp:
                lmtp.sendmail(contact, [user], raw)
                delivered = time.time()
            stored = wait_until(
                lambda mid=message_id: sqlite_scalar(
                    crm_db, "SELECT created_at FROM email WHERE message_id LIKE ?", f"%{mid}%"
                ),
                timeout=30,
                what=f"message {i} in the CRM",
            )
            to_crm.append(_stamp(stored) - delivered)
            accepted = gateway.scalar(
                "SELECT created_at FROM message WHERE header_message_id = ?", message_id
            )
            to_store.append(float(accepted) - delivered)
            wait_until(lambda b=before: len(notified) > b, timeout=30, what="bare EXISTS")
            peer.append(notified[before] - delivered)
            time.sleep(0.05)  # distinct deliveries, not one burst
        pushes = gateway.app.metrics.render().decode()
    finally:
        stop.set()
        watcher.join(timeout=5)
        with contextlib.suppress(Exception):
            bare.logout()
        gateway.close()

    def summary(values: list[float]) -> dict[str, float]:
        ordered = sorted(values)
        return {
            "p50_ms": round(1000 * statistics.median(ordered), 1),
            "p99_ms": round(1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 1),
            "max_ms": round(1000 * ordered[-1], 1),
        }

    pushed = [line for line in pushes.splitlines() if line.startswith("mailgate_imap_pushes_total")]
    crm_latency = summary(to_crm)
    return {
        "samples": samples,
        "server_push": push,
        "pushes": pushed,
        "mailgate_delivery_to_crm": crm_latency,
        "mailgate_delivery_to_accepted": summary(to_store),
        "bare_idle_delivery_to_exists": summary(peer),
        "targets": {
            "p50_lt_500ms": crm_latency["p50_ms"] < 500,
            "p99_lt_2s": crm_latency["p99_ms"] < 2000,
        },
    }


# -- 200 idle accounts, in their own process ---------------------------------------------------


def proc_status(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "Threads"):
            out[key] = int(value.split()[0])
    out["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    return out


def idle_worker(spec_file: str) -> int:
    """Child process: start the service, report, add the accounts, wait until idle, report."""
    spec = json.loads(Path(spec_file).read_text())
    gateway = Gateway(
        Path(spec["workdir"]), spec["crm_url"], spec["crm_token"], ca_file=spec["ca_file"]
    )
    print("baseline", flush=True)
    sys.stdin.readline()
    gateway.add_many("localhost", spec["port"], spec["users"])  # TLS, verified (test CA)
    wait_until(
        lambda: (
            gateway.scalar("SELECT COUNT(*) FROM mail_account WHERE status = 'live'")
            == len(spec["users"])
        ),
        timeout=300,
        what="every account live",
    )
    time.sleep(3)  # the first IDLEs begin; nothing else happens from here on
    print("idle", flush=True)
    sys.stdin.readline()
    gateway.close()
    return 0


def idle_accounts(
    dovecot: DovecotServer, count: int, workdir: Path, crm: tuple[str, str], ca_file: Path
) -> dict[str, Any]:
    users = []
    for _ in range(count):
        user, password = dovecot.new_user("idle")
        write_maildir(
            dovecot, user, make_mails(MailboxSpec(owner=user, count=3, contacts=[], size=500))
        )
        users.append((user, password))
    workdir.mkdir(exist_ok=True)
    spec = workdir / "spec.json"
    spec.write_text(
        json.dumps(
            {
                "workdir": str(workdir),
                "crm_url": crm[0],
                "crm_token": crm[1],
                "port": dovecot.imaps_port,
                "ca_file": str(ca_file),
                "users": users,
            }
        )
    )
    child = subprocess.Popen(
        [sys.executable, __file__, "--idle-worker", str(spec)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdin is not None and child.stdout is not None
    try:
        assert child.stdout.readline().strip() == "baseline"
        time.sleep(1)
        before = proc_status(child.pid)
        child.stdin.write("go\n")
        child.stdin.flush()
        started = time.perf_counter()
        assert child.stdout.readline().strip() == "idle"
        connected_in = time.perf_counter() - started
        after = proc_status(child.pid)
        child.stdin.write("stop\n")
        child.stdin.flush()
        child.wait(timeout=120)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(timeout=10)
    return {
        "accounts": count,
        "rss_mib_without_accounts": round(before["VmRSS"] / 1024, 1),
        "rss_mib_with_idle_accounts": round(after["VmRSS"] / 1024, 1),
        "rss_kib_per_idle_account": round((after["VmRSS"] - before["VmRSS"]) / count, 1),
        "threads": after["Threads"],
        "open_fds": after["fds"],
        "seconds_to_connect_all": round(connected_in, 1),
    }


# -- main ----------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--size", type=int, default=10_240)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--idle-accounts", type=int, default=200)
    parser.add_argument("--latency-samples", type=int, default=50)
    parser.add_argument("--idle-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.idle_worker:
        return idle_worker(args.idle_worker)

    workdir = Path(tempfile.mkdtemp(prefix="mailgate-imap-bench-"))
    workdir.chmod(0o755)  # Dovecot's own users read its config and passwd files under here
    ca = TestCA()  # the idle accounts use implicit TLS, as real mailboxes do
    api_port = free_port()  # the gateway's admin API, where Dovecot pushes news
    dovecot = BenchDovecot(
        directory=workdir / "dovecot",
        tls=ca.server,
        push_url=f"http://dovecot:{PUSH_SECRET}@127.0.0.1:{api_port}/api/v1/imap/push",
    )
    (workdir / "dovecot").mkdir(mode=0o755)
    contacts = [f"contact{i}@customer{i % 40}.test" for i in range(200)]
    crm_server = None
    try:
        dovecot.start()
        user, password = dovecot.new_user("bench")
        log(f"writing {args.messages} messages of ~{args.size} bytes")
        spec = MailboxSpec(
            owner=user, count=args.messages, contacts=contacts, size=args.size, strangers=2000
        )
        write_maildir(dovecot, user, make_mails(spec))
        crm_server, token = start_crm(workdir, contacts)
        crm = (crm_server.url, token)

        rounds: dict[str, list[dict[str, Any]]] = {"bare": [], "mailgate": [], "mbsync": []}
        for n in range(args.rounds):
            log(f"round {n + 1}/{args.rounds}")
            rounds["bare"].append(bare_envelope_scan(dovecot, user, password))
            rounds["mailgate"].append(
                mailgate_initial_sync(dovecot, user, password, workdir / "gw", crm)
            )
            rounds["mbsync"].append(mbsync_mirror(dovecot, user, password, workdir, fsync=True))
        nofsync = mbsync_mirror(dovecot, user, password, workdir, fsync=False)

        def median(name: str) -> float:
            return float(statistics.median(r["seconds"] for r in rounds[name]))

        bare, ours, mbsync = median("bare"), median("mailgate"), median("mbsync")
        log("latency while idling")
        crm_db = workdir / "crm.db"
        lat = {
            mode: latency(
                dovecot,
                contacts[0],
                workdir / f"lat-{mode}",
                crm,
                crm_db,
                args.latency_samples,
                api_port=api_port,
                push=mode == "push",
            )
            for mode in ("idle", "push")
        }
        log(f"{args.idle_accounts} idle accounts")
        idle = idle_accounts(dovecot, args.idle_accounts, workdir / "idle", crm, ca.ca_file)
        expected = sum(1 for m in make_mails(spec) if m.sender in contacts)
        report = {
            "mailbox": {
                "messages": args.messages,
                "average_size": args.size,
                "from_contacts": expected,
            },
            "bare_envelope_scan_s": bare,
            "mailgate_initial_sync_s": ours,
            "mbsync_s": mbsync,
            "mbsync_nofsync_s": nofsync["seconds"],
            "mailgate_vs_bare": round(ours / bare, 2),
            "mbsync_vs_mailgate": round(mbsync / ours, 1),
            "targets": {
                "mailgate_le_1_5x_bare": ours <= 1.5 * bare,
                "mailgate_5x_faster_than_mbsync": mbsync >= 5 * ours,
            },
            "accepted_each_once": all(
                r["accepted"] == r["accepted_distinct"] == expected for r in rounds["mailgate"]
            ),
            "rounds": rounds,
            "latency_while_idling": lat,
            "idle_accounts": idle,
        }
        print(json.dumps(report, indent=2))
        return 0
    finally:
        if crm_server is not None:
            crm_server.cleanup()
        dovecot.cleanup()
        ca.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
