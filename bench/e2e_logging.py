"""End to end, SMTP "250" to readable in the CRM: submitted mail at a steady rate, half of it to CRM
contacts, through a real gateway into the real bundled CRM; then the dispatcher's peak events/s
into that CRM, next to a plain httpx client posting the same events in the same run.

What runs (all on 127.0.0.1, free ports, one temp dir deleted at the end, every process stopped
by its PID; every loop bounded in count and time):

- ``smtp-sink`` as the upstream (``-u nobody``);
- the bundled CRM under uvicorn (``crm_api.main:create_app_from_env``, SQLite in the temp dir,
  ``auto_create = "none"``, ``company_domains = ["example.test"]``), with an admin, the rep and a
  token for the gateway made through ``crm_api.crud`` and ``--contacts`` contacts made through its
  API;
- the gateway, ``python -m gateway --config FILE serve`` (SQLite store, DKIM on for
  example.test, ``trusted_networks`` so the clients need no AUTH, relay to the sink, admin API on
  a free port, hooks to the CRM with the webhook secret shared with the CRM's config). Hooks
  settings are the defaults except ``match_cache_seconds = 600`` and ``request_timeout_seconds =
  30`` (phase 2 pauses the CRM: the burst must neither need it for matching, its contacts being
  cached from phase 1, nor time out the requests in flight) and ``--dispatch-concurrency``
  (default 8, the product default).

Phase 1, latency. ``--connections`` persistent smtplib sessions (one thread each) send
``--rate`` messages/s for ``--seconds`` (after ``--warmup`` seconds not counted), paced by a
schedule (message i is due at start + i / rate; a slow reply makes later messages late, reported
as ``smtp_lag_ms``, rather than lowering the rate). Even-numbered messages go to one of the
contacts, odd ones to a new non-contact address each (each costs the gateway a
``/contacts/match`` call and must not be logged). Each message has its own Message-ID and
subject. For every message to a contact: the time from the client's 250 to the email being
listed by ``GET /api/v1/emails`` for the CRM's admin.

The poller: one thread (stdlib ``http.client``, one keep-alive connection) lists the newest
emails every ``--poll-interval`` s (``limit=--poll-limit``) and pages further only while the
listed ``count`` says an email has not been seen yet, so every poll is complete and normally one
small request. An email first listed by poll j is stamped with the end of that request (an upper
bound: the figure reported); it was not there when the last complete poll before j started (the
lower bound, also reported). The width of that bracket is the resolution (``resolution_ms``).
The poller is not free: each list request costs the CRM ≈ 4-5 ms of CPU whatever the page size
(measured after the phase, ``crm_cpu_ms_per_request_when_idle``), so at 20 ms it takes ≈ 0.2 of a
core. Hence two checks: the same latency from the databases without the poller
(``250_to_crm_commit_ms``: the 250 to the CRM's ``email.created_at``), and phase 1b, the same
load for ``--control-seconds`` with the poller off (figures from the databases only).

Where the time goes, per message, from the databases afterwards (same clock, same host):
``message.created_at`` (stored, before the 250), ``delivery.updated_at`` (the relay's outcome
recorded), ``outbox.created_at`` (the emit step, after identify-sender and match-contacts), the
CRM's ``email.created_at``, ``webhook_delivery.delivered_at``, the poller's stamp (``stages_ms``,
explained in ``stage_notes``). ``per_10s`` gives, per 10 s of the phase, messages accepted,
events emitted and delivered per second, the outbox backlog and the latency of the mail sent in
it. ``cpu`` gives each process's cores, the machine's (other work shares it), and for the main
threads the share of wall time on a CPU, runnable but waiting for one, and off CPU (schedstat).
With ``--py-spy DIR`` the gateway and the CRM are recorded with ``py-spy --gil`` during phase 1
(speedscope files in DIR) and ``gateway_gil_holder_by_component`` splits the gateway's samples
by pipeline step.

Phase 2, the dispatcher's peak. The CRM is paused (SIGSTOP), ``--burst`` messages to contacts
are sent as fast as ``--connections`` sessions go; once every one of them is in the outbox the
CRM is resumed (SIGCONT) and the drain is timed from ``webhook_delivery.delivered_at``: events/s
from resume to the last delivery, the slope between the 10th and 90th percentile deliveries and
the best one-second window, with the gateway's and the CRM's CPU per event. The peers, measured
right after against the same CRM: the same payloads (fresh Message-IDs and webhook-ids, freshly
signed) posted by one ``httpx.AsyncClient`` with as many requests in flight as the dispatcher
(the gateway's own client without its pipeline), and by a lean asyncio HTTP/1.1 client (what the
CRM itself takes at that concurrency).

Prints one JSON object (progress on stderr). Targets (issue 4): p50 < 100 ms and p99 < 500 ms
from the 250 to readable. Needs Debian's ``postfix`` package for ``smtp-sink``. Run from the
repository root (defaults: about 3.5 minutes):

    .venv/bin/python -m bench.e2e_logging [--rate 100] [--seconds 60] [--warmup 3]
        [--control-seconds SECONDS] [--connections 10] [--contacts 50] [--burst 2000]
        [--size 2048] [--poll-interval 0.02] [--poll-limit 10] [--dispatch-concurrency 8]
        [--grace 120] [--py-spy DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import hmac
import http.client
import json
import os
import re
import shutil
import signal
import smtplib
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import formatdate
from pathlib import Path
from typing import Any

import httpx

from bench._common import (
    HOST,
    REPO,
    SENDER,
    SENDER_DOMAIN,
    GatewayServer,
    Sink,
    cpu_seconds,
    free_port,
    machine,
    percentile,
    port_open,
    stop_pid,
    temp_dir,
    wait_until,
)

SECRET = "whsec_" + base64.b64encode(b"e2e-bench-secret-0123456789abcdef").decode()
ADMIN = "admin@example.test"
CONTACT_DOMAINS = 5
MAX_MESSAGES = 200_000  # hard bound on any one phase, whatever the options say
MAX_POLLS = 1_000_000


def log(text: str) -> None:
    print(f"[e2e] {text}", file=sys.stderr, flush=True)


def norm_mid(value: str | None) -> str:
    return (value or "").strip().removeprefix("<").removesuffix(">").strip().lower()


def pct(values: list[float], scale: float = 1000.0) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p95": None, "p99": None, "max": None}
    return {
        name: round(percentile(values, p) * scale, 1)
        for name, p in (("p50", 50), ("p95", 95), ("p99", 99), ("max", 100))
    }


def sqlite_rows(path: Path, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """A read-only look at a server's SQLite file (WAL: never blocks its writer)."""
    connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    try:
        return connection.execute(sql, params).fetchall()
    finally:
        connection.close()


def thread_times(pid: int) -> dict[int, tuple[float, float]]:
    """Per thread of ``pid``: (seconds on a CPU, seconds runnable but waiting for one)."""
    out: dict[int, tuple[float, float]] = {}
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError, ValueError, IndexError):
                run, wait = Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[:2]
                out[int(tid)] = (int(run) / 1e9, int(wait) / 1e9)
    return out


def thread_report(
    pid: int,
    before: dict[int, tuple[float, float]],
    after: dict[int, tuple[float, float]],
    seconds: float,
    names: dict[int, str] | None = None,
) -> dict[str, float]:
    """The main thread's wall time split into on-CPU, waiting for a CPU and off-CPU (idle in
    epoll, or waiting for the GIL: py-spy tells which), and the other threads' CPU."""
    main0, main1 = before.get(pid, (0.0, 0.0)), after.get(pid, (0.0, 0.0))
    others = sum(after[t][0] - before[t][0] for t in after if t != pid and t in before)
    on_cpu, runq = main1[0] - main0[0], main1[1] - main0[1]
    out = {
        "main_thread_on_cpu": round(on_cpu / seconds, 3),
        "main_thread_waiting_for_cpu": round(runq / seconds, 3),
        "main_thread_off_cpu": round(max(0.0, seconds - on_cpu - runq) / seconds, 3),
        "other_threads_cpu": round(others / seconds, 3),
    }
    for tid, name in (names or {}).items():
        if tid in before and tid in after and tid != pid:
            key = name.removesuffix("_0").replace("-", "_")
            out[f"{key}_on_cpu"] = round((after[tid][0] - before[tid][0]) / seconds, 3)
            out[f"{key}_waiting_for_cpu"] = round((after[tid][1] - before[tid][1]) / seconds, 3)
    return out


def machine_busy() -> tuple[float, float]:
    """(busy CPU seconds over all cores, wall seconds) from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    tick = os.sysconf("SC_CLK_TCK")
    idle = fields[3] + fields[4]
    return (sum(fields) - idle) / tick, time.time()


def crm_time(value: str) -> float:
    """The CRM stores naive UTC datetimes; as epoch seconds."""
    return datetime.fromisoformat(value).replace(tzinfo=UTC).timestamp()


# -- the CRM ------------------------------------------------------------------------------------


class Crm:
    """The bundled CRM under uvicorn on SQLite, with an admin, the rep, tokens and contacts."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.db = directory / "crm.db"
        self.url_db = f"sqlite:///{self.db}"
        self.config = directory / "crm.toml"
        self.log = directory / "crm.log"
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.paused = False
        self.admin_token = ""
        self.gateway_token = ""
        self.contacts: list[str] = []

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def prepare(self) -> None:
        from sqlmodel import Session

        from crm_api import crud
        from crm_api.db import Database, migrate
        from crm_api.models import Role, UserCreate

        self.config.write_text(
            f'log_level = "warning"\n[webhooks]\nsecrets = ["{SECRET}"]\n'
            f'[policy]\ncompany_domains = ["{SENDER_DOMAIN}"]\nauto_create = "none"\n'
        )
        db = Database(self.url_db)
        migrate(db.engine)
        with Session(db.engine) as session:
            admin = crud.create_user(
                session=session, user_in=UserCreate(email=ADMIN, role=Role.admin)
            )
            crud.create_user(session=session, user_in=UserCreate(email=SENDER, role=Role.rep))
            self.admin_token = crud.create_token(session=session, user=admin)
            self.gateway_token = crud.create_token(session=session, user=admin)
            session.commit()
        db.dispose()

    def start(self) -> Crm:
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
            "MAILGATE_CRM_CONFIG": str(self.config),
            "MAILGATE_CRM_DATABASE_URL": self.url_db,
        }
        cmd = [
            sys.executable, "-m", "uvicorn", "--factory", "crm_api.main:create_app_from_env",
            "--host", HOST, "--port", str(self.port), "--log-level", "warning", "--no-access-log",
        ]  # fmt: skip
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                cmd, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
        wait_until(
            lambda: port_open(self.port), timeout=60, what="CRM (uvicorn)", proc=self.proc,
            log=lambda: self.log.read_text(errors="replace"),
        )  # fmt: skip
        return self

    def add_contacts(self, n: int) -> None:
        headers = {"Authorization": f"Bearer {self.admin_token}"}
        with httpx.Client(base_url=self.url, headers=headers, timeout=30, trust_env=False) as api:
            for k in range(n):
                address = f"buyer{k}@customer{k % CONTACT_DOMAINS}.test"
                response = api.post(
                    "/api/v1/contacts",
                    json={"name": f"Buyer {k}", "primary_address": address, "owner": SENDER},
                )
                if response.status_code != 201:
                    raise RuntimeError(f"adding contact {address}: {response.text}")
                self.contacts.append(address)

    def pause(self) -> None:
        os.kill(self.pid, signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        if self.proc is not None and self.paused:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGCONT)
        self.paused = False

    def stop(self) -> None:
        if self.proc is not None:
            self.resume()
            stop_pid(self.proc.pid, proc=self.proc, timeout=15)
            self.proc = None

    def cpu(self) -> float:
        return cpu_seconds([self.pid]) if self.proc is not None else 0.0

    def email_times(self) -> dict[str, float]:
        """message_id → when the CRM's ingest batch created the email row."""
        rows = sqlite_rows(self.db, "SELECT message_id, created_at FROM email")
        return {norm_mid(mid): crm_time(at) for mid, at in rows}

    def count_emails(self, like: str = "%") -> int:
        sql = "SELECT count(*) FROM email WHERE message_id LIKE ?"
        return int(sqlite_rows(self.db, sql, (like,))[0][0])


# -- the gateway --------------------------------------------------------------------------------


class HookedGateway(GatewayServer):
    """The benchmark gateway of ``_common`` with its admin API and hooks to the CRM."""

    def __init__(
        self, directory: Path, sink_port: int, crm: Crm, *, dispatch_concurrency: int
    ) -> None:
        super().__init__(directory, sink_port)
        self.crm = crm
        self.api_port = free_port()
        self.dispatch_concurrency = dispatch_concurrency

    def _write_config(self) -> None:
        from gateway.tls import write_self_signed

        tls = self.dir / "tls"
        tls.mkdir(parents=True, exist_ok=True)
        write_self_signed(tls / "cert.pem", tls / "key.pem", hostname="gateway.bench.test")
        self.config.write_text(
            f"""[server]
hostname = "gateway.bench.test"
data_dir = "{self.dir}"
log_level = "warning"

[database]
url = "sqlite:///{self.db}"

[submission]
listen = "{HOST}"
port = {self.port}
tls_port = 0
cert_file = "{tls / "cert.pem"}"
key_file = "{tls / "key.pem"}"
trusted_networks = ["127.0.0.1/32"]

[relay]
mode = "smarthost"
host = "{HOST}"
port = {self.sink_port}
security = "none"
require_tls = false

[dkim]
enabled = true
key_dir = "{self.dir / "dkim"}"

[api]
enabled = true
listen = "{HOST}"
port = {self.api_port}

[crm]
embedded = false
url = "{self.crm.url}"

[hooks]
crm_token = "{self.crm.gateway_token}"
webhook_secrets = ["{SECRET}"]
public_url = "http://{HOST}:{self.api_port}"
link_secret = "e2e-bench-link-secret"
match_cache_seconds = 600
request_timeout_seconds = 30
dispatch_concurrency = {self.dispatch_concurrency}
"""
        )

    def cpu(self) -> float:
        return cpu_seconds([self.pid]) if self.proc is not None else 0.0

    def rows(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        return sqlite_rows(self.db, sql, params)


# -- the load -----------------------------------------------------------------------------------


@dataclass
class Sent:
    i: int
    mid: str
    contact: bool
    due: float  # time.time()
    t250: float  # time.time() at the 250
    lag: float  # started late against the schedule


class Schedule:
    """Hands out message numbers; message i is due at start + i / rate (rate 0: all at once)."""

    def __init__(self, *, count: int, rate: float, start: float) -> None:
        self.count = min(count, MAX_MESSAGES)
        self.rate = rate
        self.start = start
        self.next = 0
        self.lock = threading.Lock()

    def take(self) -> tuple[int, float] | None:
        with self.lock:
            if self.next >= self.count:
                return None
            i = self.next
            self.next += 1
        return i, self.start + (i / self.rate if self.rate else 0.0)


class Load:
    """Builds the messages of one phase and sends them from persistent smtplib sessions."""

    def __init__(
        self, *, port: int, run: str, contacts: list[str], size: int, all_contacts: bool
    ) -> None:
        self.port = port
        self.run = run
        self.contacts = contacts
        self.all_contacts = all_contacts
        line = "The quick brown fox jumps over the lazy dog, again and again and again.....\r\n"
        self.body = (line * max(1, size // len(line))).encode()
        self.sent: list[Sent] = []
        self.errors: list[str] = []
        self.lock = threading.Lock()

    def message(self, i: int) -> tuple[str, str, bool, bytes]:
        contact = self.all_contacts or i % 2 == 0
        to = (
            self.contacts[(i // (1 if self.all_contacts else 2)) % len(self.contacts)]
            if contact
            else f"lead{i}.{self.run}@prospect{i % 50}.test"
        )
        mid = f"e2e.{self.run}.{i}@{SENDER_DOMAIN}"
        head = (
            f"From: Bench Rep <{SENDER}>\r\nTo: <{to}>\r\nSubject: e2e {self.run} {i}\r\n"
            f"Message-ID: <{mid}>\r\nDate: {formatdate(usegmt=True)}\r\nMIME-Version: 1.0\r\n"
            "Content-Type: text/plain; charset=us-ascii\r\n\r\n"
        )
        return mid, to, contact, head.encode() + self.body

    def _sender(self, schedule: Schedule, deadline: float) -> None:
        try:
            client = smtplib.SMTP(HOST, self.port, local_hostname="client.bench.test", timeout=30)
            client.ehlo()
        except (OSError, smtplib.SMTPException) as exc:
            with self.lock:
                self.errors.append(f"connect: {exc}")
            return
        try:
            while time.time() < deadline:
                task = schedule.take()
                if task is None:
                    break
                i, due = task
                mid, to, contact, data = self.message(i)
                delay = due - time.time()
                if delay > 0:
                    time.sleep(delay)
                started = time.time()
                try:
                    # sendmail: MAIL, RCPT, DATA; raises on anything but 250 at the end.
                    refused = client.sendmail(SENDER, [to], data)
                    t250 = time.time()
                    if refused:
                        raise smtplib.SMTPException(f"refused {refused}")
                except (OSError, smtplib.SMTPException) as exc:
                    with self.lock:
                        self.errors.append(f"message {i}: {exc}")
                    return
                with self.lock:
                    self.sent.append(Sent(i, mid, contact, due, t250, max(0.0, started - due)))
        finally:
            try:
                client.quit()
            except (OSError, smtplib.SMTPException):
                client.close()

    def send(self, *, count: int, rate: float, connections: int, timeout: float) -> float:
        """Send ``count`` messages (at ``rate``/s, or as fast as possible when 0); returns the
        time the schedule started."""
        start = time.time() + 0.3
        schedule = Schedule(count=count, rate=rate, start=start)
        deadline = start + (count / rate if rate else 0) + timeout
        threads = [
            threading.Thread(target=self._sender, args=(schedule, deadline), daemon=True)
            for _ in range(connections)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(max(0.1, deadline + 35 - time.time()))
        return start


# -- the poller ---------------------------------------------------------------------------------


@dataclass
class Poll:
    start: float
    end: float
    pages: int
    complete: bool


@dataclass
class Poller:
    """One thread listing the CRM's newest emails every ``interval`` seconds."""

    port: int
    token: str
    interval: float
    limit: int
    max_pages: int = 20
    seen: dict[str, float] = field(default_factory=dict)  # upper bound: end of the request
    lower: dict[str, float] = field(default_factory=dict)  # start of the last complete poll
    polls: list[Poll] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    cpu: float = 0.0
    stop_event: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def start(self, deadline: float) -> None:
        self.thread = threading.Thread(target=self._run, args=(deadline,), daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.stop_event.set()
        if self.thread is not None:
            self.thread.join(15)

    def _get(self, conn: http.client.HTTPConnection, offset: int) -> dict[str, Any]:
        conn.request(
            "GET",
            f"/api/v1/emails?limit={self.limit}&offset={offset}",
            headers={"Authorization": f"Bearer {self.token}"},
        )
        response = conn.getresponse()
        body = response.read()
        if response.status != 200:
            raise RuntimeError(f"GET /api/v1/emails: {response.status} {body[:200]!r}")
        result: dict[str, Any] = json.loads(body)
        return result

    def _run(self, deadline: float) -> None:
        cpu0 = time.thread_time()
        conn = http.client.HTTPConnection(HOST, self.port, timeout=10)
        last_complete_start = 0.0
        try:
            while not self.stop_event.is_set() and time.time() < deadline:
                if len(self.polls) >= MAX_POLLS:
                    break
                start = time.time()
                pages, complete, offset = 0, False, 0
                try:
                    while pages < self.max_pages:
                        page = self._get(conn, offset)
                        pages += 1
                        end = time.time()
                        for email in page["data"]:
                            mid = norm_mid(email.get("message_id"))
                            if mid not in self.seen:
                                self.seen[mid] = end
                                self.lower[mid] = last_complete_start
                        if page["count"] <= len(self.seen) or len(page["data"]) < self.limit:
                            complete = True
                            break
                        offset += self.limit
                except (OSError, http.client.HTTPException, RuntimeError, ValueError) as exc:
                    if len(self.errors) < 100:
                        self.errors.append(f"{type(exc).__name__}: {exc}")
                    conn.close()
                    conn = http.client.HTTPConnection(HOST, self.port, timeout=10)
                self.polls.append(Poll(start, time.time(), pages, complete))
                if complete:
                    last_complete_start = start
                self.stop_event.wait(max(0.0, start + self.interval - time.time()))
        finally:
            conn.close()
            self.cpu = time.thread_time() - cpu0


# -- phase 2's peer: the same events posted straight to the CRM ---------------------------------


def signed(body: bytes, webhook_id: str) -> dict[str, str]:
    ts = int(time.time())
    key = base64.b64decode(SECRET.removeprefix("whsec_"))
    mac = hmac.new(key, f"{webhook_id}.{ts}.".encode() + body, hashlib.sha256).digest()
    return {
        "content-type": "application/json",
        "webhook-id": webhook_id,
        "webhook-timestamp": str(ts),
        "webhook-signature": "v1," + base64.b64encode(mac).decode(),
    }


def fresh(payloads: list[str], tag: str) -> list[tuple[str, bytes]]:
    """The gateway's own event bodies under new Message-IDs and webhook-ids (new emails)."""
    out = []
    for n, payload in enumerate(payloads):
        event = json.loads(payload)
        event["data"]["message_id"] = f"{tag}.{n}.{event['data']['message_id']}"
        event["data"]["subject"] = f"{tag} {n} {event['data'].get('subject', '')}"
        out.append((f"msg_{tag}_{n}", json.dumps(event).encode()))
    return out


async def post_httpx(url: str, events: list[tuple[str, bytes]], concurrency: int) -> list[int]:
    """As the dispatcher sends: one AsyncClient, ``concurrency`` connections and requests."""
    statuses: list[int] = []
    queue = iter(events)
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=30, trust_env=False) as client:

        async def worker() -> None:
            for webhook_id, body in queue:
                response = await client.post(url, content=body, headers=signed(body, webhook_id))
                statuses.append(response.status_code)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return statuses


async def post_raw(url: str, events: list[tuple[str, bytes]], concurrency: int) -> list[int]:
    """A lean HTTP/1.1 client on asyncio streams: what the CRM itself can take."""
    parts = httpx.URL(url)
    statuses: list[int] = []
    queue = iter(events)

    async def worker() -> None:
        reader, writer = await asyncio.open_connection(parts.host, parts.port)
        try:
            for webhook_id, body in queue:
                head = f"POST {parts.path} HTTP/1.1\r\nHost: {parts.host}:{parts.port}\r\n"
                head += "".join(f"{k}: {v}\r\n" for k, v in signed(body, webhook_id).items())
                head += f"content-length: {len(body)}\r\n\r\n"
                writer.write(head.encode() + body)
                await writer.drain()
                status = int((await reader.readuntil(b"\r\n")).split(b" ", 2)[1])
                length = 0
                while (line := await reader.readuntil(b"\r\n")) != b"\r\n":
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                await reader.readexactly(length)
                statuses.append(status)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(concurrency))), 300)
    return statuses


def peer_run(
    name: str,
    poster: Callable[..., Any],
    crm: Crm,
    events: list[tuple[str, bytes]],
    concurrency: int,
) -> dict[str, Any]:
    before_rows, crm_cpu0, cpu0 = crm.count_emails(), crm.cpu(), time.process_time()
    start = time.time()
    statuses = asyncio.run(poster(crm.url + "/api/v1/webhooks/gateway", events, concurrency))
    seconds = time.time() - start
    stored = crm.count_emails() - before_rows
    client_cpu, crm_cpu = time.process_time() - cpu0, crm.cpu() - crm_cpu0
    n = max(1, len(statuses))
    return {
        "client": name,
        "events": len(events),
        "non_2xx": sum(1 for s in statuses if not 200 <= s < 300),
        "stored": stored,
        "seconds": round(seconds, 2),
        "events_per_s": round(stored / seconds, 1) if seconds > 0 else None,
        "client_cpu_ms_per_event": round(client_cpu / n * 1000, 3),
        "crm_cpu_ms_per_event": round(crm_cpu / n * 1000, 3),
    }


# -- the phases ---------------------------------------------------------------------------------


@dataclass
class Timeline:
    """What the gateway's and the CRM's databases say happened to one phase's messages."""

    accepted: dict[str, tuple[str, float]]  # message_id → (queue id, message.created_at)
    relayed: dict[str, float]  # queue id → delivery.updated_at (relay outcome recorded)
    emitted: dict[str, tuple[float, float | None, int]]  # message_id → outbox, delivered, tries
    stored: dict[str, float]  # message_id → the CRM's email.created_at

    @classmethod
    def read(cls, gateway: HookedGateway, crm: Crm, run: str) -> Timeline:
        like = (f"e2e.{run}.%",)
        accepted = {
            norm_mid(mid): (row_id, created)
            for mid, row_id, created in gateway.rows(
                "SELECT header_message_id, id, created_at FROM message "
                "WHERE lower(header_message_id) LIKE ?", like,
            )
        }  # fmt: skip
        relayed = dict(gateway.rows("SELECT message_id, max(updated_at) FROM delivery GROUP BY 1"))
        emitted: dict[str, tuple[float, float | None, int]] = {}
        for payload, created, delivered, attempts in gateway.rows(
            "SELECT o.payload, o.created_at, d.delivered_at, d.attempts FROM outbox o "
            "JOIN webhook_delivery d ON d.event_id = o.id WHERE o.event_type = 'email.logged'"
        ):
            mid = norm_mid(json.loads(payload)["data"]["message_id"])
            if mid.startswith(f"e2e.{run}."):
                emitted[mid] = (created, delivered, attempts)
        stored = {m: t for m, t in crm.email_times().items() if m.startswith(f"e2e.{run}.")}
        return cls(accepted, relayed, emitted, stored)


def breakdown(timeline: Timeline, sent: list[Sent], seen: dict[str, float]) -> dict[str, Any]:
    """Per message to a contact: where the time between the 250 and readable went."""
    stages: dict[str, list[float]] = {
        "accept_to_250": [],
        "250_to_relay_recorded": [],
        "relay_recorded_to_emit": [],
        "emit_to_crm_commit": [],
        "crm_commit_to_delivery_recorded": [],
        "crm_commit_to_readable": [],
    }
    to_commit: list[float] = []
    retried = 0
    for s in sent:
        if not s.contact or s.mid not in timeline.emitted or s.mid not in timeline.stored:
            continue
        row_id, t_accept = timeline.accepted.get(s.mid, ("", 0.0))
        t_emit, t_delivered, attempts = timeline.emitted[s.mid]
        t_crm = timeline.stored[s.mid]
        retried += attempts > 1
        to_commit.append(t_crm - s.t250)
        if t_accept:
            stages["accept_to_250"].append(s.t250 - t_accept)
        if row_id in timeline.relayed:
            stages["250_to_relay_recorded"].append(timeline.relayed[row_id] - s.t250)
            stages["relay_recorded_to_emit"].append(t_emit - timeline.relayed[row_id])
        stages["emit_to_crm_commit"].append(t_crm - t_emit)
        if t_delivered is not None:
            stages["crm_commit_to_delivery_recorded"].append(t_delivered - t_crm)
        if s.mid in seen:
            stages["crm_commit_to_readable"].append(seen[s.mid] - t_crm)
    return {
        "250_to_crm_commit_ms": pct(to_commit),
        "stages_ms": {name: pct(values) for name, values in stages.items() if values},
        "webhook_retries": retried,
    }


STAGE_NOTES = {
    "250_to_crm_commit_ms": "client's 250 to the CRM's email.created_at (its ingest batch), "
    "from the databases: no poller involved",
    "accept_to_250": "message.created_at (stored) to the client's 250",
    "250_to_relay_recorded": "to delivery.updated_at: worker claim, normalise, DKIM, relay to "
    "the sink, and the commit recording it",
    "relay_recorded_to_emit": "to outbox.created_at: identify-sender (a DB read in a thread), "
    "match-contacts (cache, or /contacts/match), building the payload",
    "emit_to_crm_commit": "to the CRM's email.created_at: the emit commit, dispatcher wake and "
    "claim commit, waiting behind the outbox backlog, the POST, the CRM's verify/parse/batch",
    "crm_commit_to_delivery_recorded": "to webhook_delivery.delivered_at: the CRM's commit and "
    "reply, the dispatcher's recording commit (not on the readable path)",
    "crm_commit_to_readable": "to the poller's stamp: poll resolution and the read path",
}


def slices(
    timeline: Timeline, sent: list[Sent], t0: float, seconds: float, width: float = 10.0
) -> list[dict[str, Any]]:
    """Per ``width`` seconds of the phase: rates in and out of each stage, the dispatcher's
    backlog at the slice's end, and the 250-to-CRM latency of the mail sent in it."""
    accepted = sorted(t for _, t in timeline.accepted.values())
    emitted = sorted(e[0] for e in timeline.emitted.values())
    delivered = sorted(e[1] for e in timeline.emitted.values() if e[1] is not None)
    import bisect

    def count(values: list[float], a: float, b: float) -> int:
        return bisect.bisect_right(values, b) - bisect.bisect_right(values, a)

    out = []
    n = max(1, int(-(-seconds // width)))
    for k in range(n):
        a, b = t0 + k * width, t0 + min(seconds, (k + 1) * width)
        if b <= a:
            break
        lat = [
            timeline.stored[s.mid] - s.t250
            for s in sent
            if s.contact and a <= s.t250 < b and s.mid in timeline.stored
        ]
        out.append(
            {
                "from_s": round(a - t0, 1),
                "accepted_per_s": round(count(accepted, a, b) / (b - a), 1),
                "emitted_per_s": round(count(emitted, a, b) / (b - a), 1),
                "delivered_per_s": round(count(delivered, a, b) / (b - a), 1),
                "outbox_backlog_at_end": bisect.bisect_right(emitted, b)
                - bisect.bisect_right(delivered, b),
                "250_to_crm_commit_p50_ms": round(percentile(lat, 50) * 1000) if lat else None,
            }
        )
    return out


def phase_latency(
    args: argparse.Namespace,
    gateway: HookedGateway,
    crm: Crm,
    run: str,
    *,
    seconds: float,
    poll: bool,
) -> dict[str, Any]:
    load = Load(port=gateway.port, run=run, contacts=crm.contacts, size=args.size,
                all_contacts=False)  # fmt: skip
    warm = int(args.rate * args.warmup)
    count = warm + int(args.rate * seconds)
    poller = Poller(crm.port, crm.admin_token, args.poll_interval, args.poll_limit)
    if poll:
        poller.start(deadline=time.time() + args.warmup + seconds + args.grace + 60)
    spies = start_py_spy(args, gateway, crm, args.warmup + seconds + 2) if poll else []
    cpu0 = (gateway.cpu(), crm.cpu(), time.process_time())
    writer_names = {
        tid: name
        for tid, name in (thread_names(gateway.pid) if args.py_spy else {}).items()
        if name.startswith("mailgate-writer")
    }
    threads0 = (thread_times(gateway.pid), thread_times(crm.pid))
    busy0 = machine_busy()
    log(f"{count} messages at {args.rate}/s ({warm} warm-up) over {args.connections} sessions, "
        f"poller {'on' if poll else 'off'}")  # fmt: skip
    start = load.send(count=count, rate=args.rate, connections=args.connections,
                      timeout=args.grace)  # fmt: skip
    sent_end = time.time()
    counted = [s for s in load.sent if s.i >= warm]
    contact_sent = [s for s in counted if s.contact]
    wanted = {s.mid for s in load.sent if s.contact}
    if poll:
        done: Callable[[], bool] = lambda: wanted <= poller.seen.keys()  # noqa: E731
    else:
        done = lambda: crm.count_emails(f"e2e.{run}.%") >= len(wanted)  # noqa: E731
    deadline = time.time() + args.grace
    while time.time() < deadline and not done():
        time.sleep(0.1)
    t_end = time.time()
    cpu1 = (gateway.cpu(), crm.cpu(), time.process_time())
    threads1 = (thread_times(gateway.pid), thread_times(crm.pid))
    busy1 = machine_busy()
    poller.stop()
    stop_py_spy(spies)
    profile = gil_components(Path(args.py_spy) / "gateway.speedscope.json") if spies else {}
    wall = t_end - start
    timeline = Timeline.read(gateway, crm, run)
    first = start + args.warmup
    sent_span = (max(s.t250 for s in counted) - first) if counted else 0.0
    ours = (cpu1[0] - cpu0[0]) + (cpu1[1] - cpu0[1]) + (cpu1[2] - cpu0[2])
    result: dict[str, Any] = {
        "poller": "on" if poll else "off",
        "rate": args.rate,
        "seconds": seconds,
        "sent": len(counted),
        "expected": count - warm,
        "achieved_rate": round(len(counted) / sent_span, 1) if sent_span > 0 else None,
        "smtp_errors": len(load.errors),
        "smtp_error_examples": load.errors[:3],
        "to_contacts": len(contact_sent),
        "in_crm": sum(1 for s in contact_sent if s.mid in timeline.stored),
        "non_contact_in_crm": sum(1 for s in counted if not s.contact and s.mid in timeline.stored),
        "smtp_lag_ms": pct([s.lag for s in counted]),
        "smtp_250_after_due_ms": pct([s.t250 - s.due for s in counted]),
        "drain_after_last_send_s": round(t_end - sent_end, 2),
    }
    if poll:
        latencies = [poller.seen[s.mid] - s.t250 for s in contact_sent if s.mid in poller.seen]
        lower_lat = [
            max(0.0, poller.lower[s.mid] - s.t250) for s in contact_sent if s.mid in poller.seen
        ]
        widths = [
            poller.seen[s.mid] - poller.lower[s.mid]
            for s in contact_sent
            if s.mid in poller.seen and poller.lower[s.mid] > 0
        ]
        poll_times = [p.end - p.start for p in poller.polls]
        span = (poller.polls[-1].end - poller.polls[0].start) if poller.polls else 0.0
        result.update(
            {
                "logged": len(latencies),
                "missing": len(contact_sent) - len(latencies),
                "non_contact_readable": sum(
                    1 for s in counted if not s.contact and s.mid in poller.seen
                ),
                "latency_250_to_readable_ms": pct(latencies),
                "latency_250_to_readable_lower_bound_ms": pct(lower_lat),
                "target": "p50 < 100 ms, p99 < 500 ms",
                "target_met": bool(latencies)
                and len(latencies) == len(contact_sent)
                and percentile(latencies, 50) < 0.1
                and percentile(latencies, 99) < 0.5,
                "poll": {
                    "interval_ms": args.poll_interval * 1000,
                    "limit": args.poll_limit,
                    "polls": len(poller.polls),
                    "polls_per_s": round(len(poller.polls) / span, 1) if span else None,
                    "incomplete": sum(1 for p in poller.polls if not p.complete),
                    "requests": sum(p.pages for p in poller.polls),
                    "request_ms": pct(poll_times),
                    "requests_per_s": round(sum(p.pages for p in poller.polls) / span, 1)
                    if span
                    else None,
                    "client_cpu_ms_per_poll": round(
                        poller.cpu / max(1, len(poller.polls)) * 1000, 3
                    ),
                    "errors": len(poller.errors),
                    "error_examples": poller.errors[:3],
                    "resolution_ms": pct(widths),
                },
            }
        )
    result["breakdown"] = breakdown(timeline, contact_sent, poller.seen)
    if profile:
        result["gateway_gil_holder_by_component"] = profile
    result["per_10s"] = slices(timeline, counted, first, max(0.0, t_end - first))
    result["cpu"] = {
        "over_s": round(wall, 1),
        "gateway_cores": round((cpu1[0] - cpu0[0]) / wall, 3),
        "gateway_cpu_ms_per_message": round((cpu1[0] - cpu0[0]) / max(1, len(load.sent)) * 1000, 2),
        "crm_cores": round((cpu1[1] - cpu0[1]) / wall, 3),
        "bench_cores": round((cpu1[2] - cpu0[2]) / wall, 3),
        "machine_busy_cores": round((busy1[0] - busy0[0]) / (busy1[1] - busy0[1]), 3),
        "others_on_machine_cores": round(((busy1[0] - busy0[0]) - ours) / (busy1[1] - busy0[1]), 3),
        "gateway_threads": thread_report(gateway.pid, threads0[0], threads1[0], wall, writer_names),
        "crm_threads": thread_report(crm.pid, threads0[1], threads1[1], wall),
    }
    return result


def phase_burst(
    args: argparse.Namespace, gateway: HookedGateway, crm: Crm, run: str
) -> dict[str, Any]:
    before = int(gateway.rows("SELECT count(*) FROM outbox")[0][0])
    load = Load(port=gateway.port, run=run, contacts=crm.contacts, size=args.size,
                all_contacts=True)  # fmt: skip
    crm.pause()
    log(f"phase 2: CRM paused; {args.burst} messages to contacts as fast as possible")
    t0 = time.time()
    load.send(count=args.burst, rate=0, connections=args.connections, timeout=120)
    submitted = time.time()
    expected = before + len(load.sent)
    try:
        wait_until(
            lambda: int(gateway.rows("SELECT count(*) FROM outbox")[0][0]) >= expected,
            timeout=120, what="every burst event in the outbox", interval=0.1,
        )  # fmt: skip
    except TimeoutError as exc:
        log(str(exc))
    emitted_at = time.time()
    pending = int(
        gateway.rows("SELECT count(*) FROM webhook_delivery WHERE state = 'pending'")[0][0]
    )
    cpu0 = (gateway.cpu(), crm.cpu())
    t_resume = time.time()
    crm.resume()
    log(f"phase 2: {pending} deliveries pending; CRM resumed, draining")
    try:
        wait_until(
            lambda: int(gateway.rows(
                "SELECT count(*) FROM webhook_delivery WHERE state = 'pending'")[0][0]) == 0,
            timeout=300, what="the outbox drained", interval=0.05,
        )  # fmt: skip
    except TimeoutError as exc:
        log(str(exc))
    t_drained = time.time()
    cpu1 = (gateway.cpu(), crm.cpu())
    rows = gateway.rows(
        "SELECT d.delivered_at, d.attempts, o.payload FROM webhook_delivery d "
        "JOIN outbox o ON o.id = d.event_id WHERE o.created_at >= ? AND d.state = 'delivered' "
        "ORDER BY d.delivered_at",
        (t0,),
    )
    times = [r[0] for r in rows]
    n = len(times)
    best = 0
    lo = 0
    for hi in range(n):  # best one-second window, two pointers
        while times[hi] - times[lo] > 1.0:
            lo += 1
        best = max(best, hi - lo + 1)
    p10, p90 = (times[n // 10], times[(9 * n) // 10]) if n >= 10 else (0.0, 0.0)
    steady = round((0.8 * n) / (p90 - p10), 1) if p90 > p10 else None
    drain_s = (times[-1] - t_resume) if times else 0.0
    stored = crm.email_times()
    burst_mids = {s.mid for s in load.sent}
    result = {
        "messages": args.burst,
        "accepted": len(load.sent),
        "smtp_errors": len(load.errors),
        "submit_s": round(submitted - t0, 2),
        "submit_rate": round(len(load.sent) / (submitted - t0), 1) if submitted > t0 else None,
        "all_in_outbox_after_s": round(emitted_at - t0, 2),
        "pending_at_resume": pending,
        "delivered": n,
        "stored_in_crm": len(burst_mids & stored.keys()),
        "retried": sum(1 for r in rows if r[1] > 1),
        "drain_s": round(drain_s, 2),
        "events_per_s": round(n / drain_s, 1) if drain_s > 0 else None,
        "steady_events_per_s_p10_p90": steady,
        "peak_1s_window": best,
        "gateway_cpu_ms_per_event": round((cpu1[0] - cpu0[0]) / max(1, n) * 1000, 3),
        "crm_cpu_ms_per_event": round((cpu1[1] - cpu0[1]) / max(1, n) * 1000, 3),
        "gateway_cpu_share": round((cpu1[0] - cpu0[0]) / (t_drained - t_resume), 3),
        "crm_cpu_share": round((cpu1[1] - cpu0[1]) / (t_drained - t_resume), 3),
    }
    payloads = [r[2] for r in rows]
    concurrency = args.dispatch_concurrency  # as many requests in flight as the dispatcher
    result["peers"] = [
        peer_run("httpx (the dispatcher's client, same concurrency)", post_httpx, crm,
                 fresh(payloads, f"peer-httpx-{run}"), concurrency),
        peer_run("raw asyncio HTTP/1.1 (the CRM's ceiling)", post_raw, crm,
                 fresh(payloads, f"peer-raw-{run}"), concurrency),
    ]  # fmt: skip
    result["concurrency"] = concurrency
    httpx_rate = result["peers"][0]["events_per_s"]
    if httpx_rate and result["events_per_s"]:
        result["dispatcher_vs_httpx_peer"] = round(result["events_per_s"] / httpx_rate, 2)
    return result


def poll_cost(crm: Crm, limit: int, n: int = 100) -> float:
    """CRM CPU ms per ``GET /api/v1/emails?limit=…`` while it does nothing else."""
    conn = http.client.HTTPConnection(HOST, crm.port, timeout=10)
    try:
        cpu0 = crm.cpu()
        for _ in range(n):
            conn.request("GET", f"/api/v1/emails?limit={limit}",
                         headers={"Authorization": f"Bearer {crm.admin_token}"})  # fmt: skip
            conn.getresponse().read()
        return round((crm.cpu() - cpu0) / n * 1000, 2)
    finally:
        conn.close()


def wait_idle(gateway: HookedGateway, timeout: float) -> bool:
    """Nothing queued in the gateway and no webhook pending (bounded)."""
    try:
        wait_until(
            lambda: gateway.queued() == 0 and int(gateway.rows(
                "SELECT count(*) FROM webhook_delivery WHERE state = 'pending'")[0][0]) == 0,
            timeout=timeout, what="the gateway idle", interval=0.2,
        )  # fmt: skip
        return True
    except TimeoutError as exc:
        log(str(exc))
        return False


def start_py_spy(
    args: argparse.Namespace, gateway: HookedGateway, crm: Crm, seconds: float
) -> list[Any]:
    if not args.py_spy:
        return []
    binary = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    out = Path(args.py_spy)
    out.mkdir(parents=True, exist_ok=True)
    duration = int(seconds)
    spies = []
    for name, pid in (("gateway", gateway.pid), ("crm", crm.pid)):
        cmd = [binary, "record", "-p", str(pid), "-d", str(duration), "-r", "100", "--gil",
               "-f", "speedscope", "-o", str(out / f"{name}.speedscope.json")]  # fmt: skip
        with (out / f"{name}.py-spy.log").open("wb") as err:
            spies.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err))
    return spies


# Pipeline components, matched against a sample's whole stack in this order.
COMPONENTS = [
    ("emit: build_email_logged + outbox write", ["EmitLogged.__call__"]),
    ("match-contacts (httpx POST /contacts/match)", ["MatchContacts.__call__"]),
    ("dispatcher (claim, httpx POST, record)", ["Dispatcher."]),
    ("DKIM sign", ["DkimSign.__call__"]),
    ("identify-sender (user lookup in a thread)", ["IdentifySender.__call__", "_addresses_of"]),
    ("relay to the sink", ["RelayUpstream.__call__"]),
    ("normalise", ["Normalise.__call__"]),
    ("worker claim/record", ["Store.claim", "Store.record", "Worker."]),
    ("SMTP sessions and accept", ["SMTP._handle_client", "Store.accept", "MailgateSMTP"]),
    ("admin API (uvicorn)", ["RequestResponseCycle", "uvicorn"]),
    ("group commit, other writes", ["GroupCommitter."]),
]


def gil_components(path: Path) -> dict[str, Any]:
    """Share of py-spy ``--gil`` samples (the thread holding the GIL) per component."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    frames = data["shared"]["frames"]
    counts: dict[str, int] = {}
    total = 0
    for profile in data["profiles"]:
        for stack in profile["samples"]:
            total += 1
            names = [frames[i]["name"] for i in stack]
            label = "other"
            for component, keys in COMPONENTS:
                if any(k in n for n in names for k in keys):
                    label = component
                    break
            counts[label] = counts.get(label, 0) + 1
    ranked = sorted(counts.items(), key=lambda kv: -kv[1])
    return {"samples": total, "share": {k: round(v / max(1, total), 3) for k, v in ranked}}


def thread_names(pid: int) -> dict[int, str]:
    """Native thread id → Python thread name, from ``py-spy dump`` (empty without py-spy)."""
    binary = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not os.access(binary, os.X_OK):
        return {}
    try:
        out = subprocess.run(
            [binary, "dump", "--pid", str(pid)], capture_output=True, text=True, timeout=30
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    found = re.findall(r'^Thread (\d+) \(\w+\): "([^"]+)"', out, re.MULTILINE)
    return {int(tid): name for tid, name in found}


def stop_py_spy(spies: list[Any]) -> None:
    for spy in spies:
        try:
            spy.wait(timeout=30)  # it stops itself after its duration and writes the file
        except subprocess.TimeoutExpired:
            stop_pid(spy.pid, proc=spy, timeout=10)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=100.0, help="messages per second")
    parser.add_argument("--seconds", type=float, default=60.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds sent, not counted")
    parser.add_argument("--connections", type=int, default=10, help="SMTP sessions (threads)")
    parser.add_argument("--contacts", type=int, default=50)
    parser.add_argument("--burst", type=int, default=2000, help="phase 2 messages (0: skip)")
    parser.add_argument("--size", type=int, default=2048, help="body bytes per message")
    parser.add_argument("--poll-interval", type=float, default=0.02, help="seconds")
    parser.add_argument("--poll-limit", type=int, default=10, help="emails per list request")
    parser.add_argument("--grace", type=float, default=120.0, help="wait for stragglers (s)")
    parser.add_argument(
        "--control-seconds", type=float, default=None,
        help="phase 1b, the same load without the poller (default: --seconds; 0: skip)",
    )  # fmt: skip
    parser.add_argument(
        "--dispatch-concurrency", type=int, default=8,
        help="hooks.dispatch_concurrency for the gateway (and the peer); 8 is the default",
    )  # fmt: skip
    parser.add_argument("--py-spy", metavar="DIR", default="", help="profile phase 1 into DIR")
    args = parser.parse_args()
    if args.rate <= 0 or args.rate * (args.seconds + args.warmup) > MAX_MESSAGES:
        parser.error(f"rate x (seconds + warmup) must be in 1..{MAX_MESSAGES}")
    args.burst = max(0, min(args.burst, MAX_MESSAGES))
    if args.control_seconds is None:
        args.control_seconds = args.seconds
    report: dict[str, Any] = {"bench": "e2e_logging", **machine()}
    run = f"{int(time.time())}"
    with temp_dir("e2e") as directory:
        sink = Sink(directory)
        crm = Crm(directory)
        gateway: HookedGateway | None = None
        try:
            sink.start()
            crm.prepare()
            crm.start()
            crm.add_contacts(args.contacts)
            gateway = HookedGateway(
                directory, sink.port, crm, dispatch_concurrency=args.dispatch_concurrency
            )
            gateway.start()
            log(f"sink :{sink.port}, CRM {crm.url} (pid {crm.pid}), gateway SMTP :{gateway.port} "
                f"API :{gateway.api_port} (pid {gateway.pid})")  # fmt: skip
            report["setup"] = {
                "contacts": args.contacts,
                "message_body_bytes": args.size,
                "connections": args.connections,
                "gateway": "SQLite WAL synchronous=FULL, DKIM RSA-2048, relay to smtp-sink, "
                f"hooks defaults (worker poll 1 s) but dispatch_concurrency "
                f"{args.dispatch_concurrency}, match_cache_seconds 600, "
                "request_timeout_seconds 30",
                "crm": "uvicorn, 1 process, SQLite, auto_create none",
            }
            log("phase 1: latency, poller on")
            latency = phase_latency(args, gateway, crm, run, seconds=args.seconds, poll=True)
            report["latency"] = latency
            log(f"phase 1: readable {json.dumps(latency.get('latency_250_to_readable_ms'))}")
            wait_idle(gateway, args.grace)
            if "poll" in latency:
                cost = poll_cost(crm, args.poll_limit)
                poll = latency["poll"]
                poll["crm_cpu_ms_per_request_when_idle"] = cost
                if poll.get("requests_per_s"):
                    poll["est_crm_cores_used_by_poller"] = round(
                        poll["requests_per_s"] * cost / 1000, 3
                    )
            if args.control_seconds > 0:
                log("phase 1b: control, same load, poller off")
                report["control_poller_off"] = phase_latency(
                    args, gateway, crm, run + "c", seconds=args.control_seconds, poll=False
                )
                wait_idle(gateway, args.grace)
            report["stage_notes"] = STAGE_NOTES
            if args.burst:
                report["dispatcher_peak"] = phase_burst(args, gateway, crm, run + "b")
            report["gateway_states"] = dict(
                gateway.rows("SELECT state, count(*) FROM message GROUP BY state")
            )
            report["sink_messages"] = sink.count()
            warnings = [line for line in gateway.log_text().splitlines() if "Traceback" in line]
            report["gateway_log_tracebacks"] = len(warnings)
        finally:
            if gateway is not None:
                gateway.stop()
            crm.stop()
            sink.stop()
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
