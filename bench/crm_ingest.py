"""Webhook ingest into the bundled CRM: signed ``email.logged`` events of ~8 KB (two recipients,
one of them a contact, each a reply in an ongoing thread) posted by 20 and by 50 concurrent
clients to the CRM on SQLite and on PostgreSQL, next to the peer measured in the same run with
the same client: a bare FastAPI endpoint that inserts one SQLite row per request. Prints JSON:
events/s stored (counted in the database afterwards, not from the replies) and p99 latency.

The same client drives both sides, one keep-alive connection per concurrent worker, in two
flavours measured in the same run (see :func:`load`): httpx, the gateway's own client, against
which the target is judged, and a lean asyncio client that shows the servers' own capacity. The
targets are measured in interleaved rounds, each figure the median round (the machine is
shared). Every loop is bounded by a count and a deadline; servers are uvicorn subprocesses
stopped by PID.

    .venv/bin/python bench/crm_ingest.py [--seconds 1.5] [--rounds 6] [--clients httpx raw]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import glob
import itertools
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fastapi import FastAPI, Request  # noqa: E402

SECRET = "whsec_" + base64.b64encode(b"bench-secret-0123456789abcdef").decode()
COMPANY = "acme.test"
THREADS = 200  # ongoing conversations the events reply into
MAX_EVENTS = 20_000  # hard bound per measurement, whatever the deadline


# --- the peer: a bare FastAPI endpoint, one SQLite row per request -----------------------------


def bare_app() -> FastAPI:
    """``uvicorn --factory crm_ingest:bare_app``: the ceiling the CRM is compared with."""
    path = os.environ["BENCH_BARE_DB"]
    conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    # The same durability as the CRM's SQLite: WAL, a commit is on disk.
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("CREATE TABLE IF NOT EXISTS event (id INTEGER PRIMARY KEY, wid TEXT, size INT)")
    app = FastAPI()

    @app.post("/ingest")
    async def ingest(request: Request) -> dict[str, str]:
        body = await request.body()
        conn.execute(
            "INSERT INTO event (wid, size) VALUES (?, ?)",
            (request.headers.get("webhook-id", ""), len(body)),
        )
        return {"status": "stored"}

    return app


# --- servers ----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Uvicorn:
    def __init__(self, target: str, env: dict[str, str], log: Path, app_dir: Path = REPO) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [
            sys.executable,
            "-m",
            "uvicorn",
            "--factory",
            target,
            "--app-dir",
            str(app_dir),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--log-level",
            "warning",
            "--no-access-log",
        ]
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                cmd,
                cwd=REPO,
                env={**os.environ, **env},
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{target} exited: {log.read_text()[-2000:]}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), 0.2),
            ):
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{target} did not listen within 30 s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)


class Postgres:
    """A throwaway cluster (fsync on: the comparison is about durable commits)."""

    def __init__(self, root: Path) -> None:
        bins = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
        bindir = Path(bins[-1]) if bins else Path(shutil.which("initdb") or "initdb").parent
        self.dir = root / "pg"
        self.dir.mkdir()
        self.root = os.geteuid() == 0
        if self.root:
            shutil.chown(root, "postgres", "postgres")
            shutil.chown(self.dir, "postgres", "postgres")
        self.port = free_port()
        self.ctl = [str(bindir / "pg_ctl"), "-D", str(self.dir / "data")]
        self._run(
            [str(bindir / "initdb"), "-D", str(self.dir / "data"), "-A", "trust", "-U", "postgres"]
        )
        opts = f"-k {self.dir} -c listen_addresses=127.0.0.1 -p {self.port} -c max_connections=200"
        self._run([*self.ctl, "-o", opts, "-l", str(self.dir / "log"), "-w", "start"])

    def _run(self, cmd: list[str]) -> None:
        if self.root:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        subprocess.run(cmd, check=True, capture_output=True, timeout=120)

    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self._run([*self.ctl, "-m", "fast", "-w", "stop"])


# --- the CRM's data and events ------------------------------------------------------------------


def prepare_crm(database_url: str) -> list[str]:
    """Migrate, add the rep, and make one contact per conversation; return the contacts."""
    from sqlmodel import Session

    from crm_api import crud
    from crm_api.db import Database, migrate
    from crm_api.models import ContactCreate, Role, UserCreate

    db = Database(database_url)
    migrate(db.engine)
    contacts = [f"buyer{i}@client{i % 7}.example" for i in range(THREADS)]
    with Session(db.engine) as session:
        crud.create_user(session=session, user_in=UserCreate(email=f"rep@{COMPANY}", role=Role.rep))
        for address in contacts:
            crud.create_contact(
                session=session,
                contact_in=ContactCreate(
                    name="Buyer", primary_address=address, owner=f"rep@{COMPANY}"
                ),
            )
        session.commit()
    db.dispose()
    return contacts


class Events:
    """Endless, distinct ``email.logged`` bodies: replies in THREADS ongoing conversations."""

    def __init__(self, contacts: list[str], tag: str) -> None:
        self.contacts = contacts
        self.tag = tag
        self.n = 0
        self.last: dict[int, list[str]] = {}
        filler = "Thanks for the call today. Here are the figures we discussed. " * 60
        self.text = filler[:3000]
        self.html = "<p>" + filler[:4200] + "</p>"

    def next(self) -> tuple[str, bytes]:
        i = self.n
        self.n += 1
        conv = i % THREADS
        mid = f"{self.tag}.{i}@{COMPANY}"
        refs = self.last.get(conv, [])
        data = {
            "message_id": f"<{mid}>",
            "in_reply_to": f"<{refs[-1]}>" if refs else None,
            "references": [f"<{r}>" for r in refs[-10:]],
            "direction": "outbound",
            "source": "submission",
            "account": {
                "id": "rep-mailbox",
                "owner": f"rep@{COMPANY}",
                "kind": "personal",
                "sharing": "public",
            },
            "from": [{"name": "Rep", "address": f"rep@{COMPANY}"}],
            "to": [
                {"name": "Buyer", "address": self.contacts[conv]},
                {"name": "Someone", "address": f"other{conv}@gmail.com"},
            ],
            "cc": [],
            "bcc": [],
            "subject": f"Re: Offer {conv}" if refs else f"Offer {conv}",
            "date": (datetime(2026, 1, 1, tzinfo=UTC) + timedelta(seconds=i)).isoformat(),
            "text_body": self.text,
            "html_body": self.html,
            "body_truncated": False,
            "attachments": [
                {
                    "filename": "offer.pdf",
                    "content_type": "application/pdf",
                    "size": 48213,
                    "url": f"https://gw.{COMPANY}/att/{i}",
                }
            ],
            "authentication": {"spf": "pass", "dkim": "pass", "dmarc": "pass"},
            "matched_contacts": [self.contacts[conv]],
        }
        self.last[conv] = [*refs[-9:], mid]
        body = json.dumps({"type": "email.logged", "timestamp": data["date"], "data": data})
        return f"msg_{self.tag}_{i}", body.encode()


def signed_headers(key: bytes, msg_id: str, body: bytes) -> dict[str, str]:
    import hashlib
    import hmac

    ts = int(time.time())
    mac = hmac.new(key, f"{msg_id}.{ts}.".encode() + body, hashlib.sha256).digest()
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(ts),
        "webhook-signature": "v1," + base64.b64encode(mac).decode(),
        "content-type": "application/json",
    }


# --- the load ---------------------------------------------------------------------------------


@dataclass
class Result:
    sent: int
    ok: int
    errors: int
    seconds: float
    latencies: list[float]
    client_cpu: float = 0.0


def summarise(rounds: list[tuple[Result, int]]) -> dict[str, Any]:
    """Median rate over the interleaved rounds (robust to a noisy neighbour in one round);
    latency percentiles over every request of every round."""
    rates = sorted(stored / r.seconds for r, stored in rounds)
    lat = sorted(x for r, _ in rounds for x in r.latencies)

    def pct(q: float) -> float | None:
        return round(lat[min(len(lat) - 1, int(q * len(lat)))] * 1000, 1) if lat else None

    return {
        "stored_per_s": round(rates[len(rates) // 2], 1),
        "stored_per_s_rounds": [round(x, 1) for x in rates],
        "stored": sum(stored for _, stored in rounds),
        "requests": sum(r.sent for r, _ in rounds),
        "non_2xx": sum(r.errors for r, _ in rounds),
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "max_ms": round(lat[-1] * 1000, 1) if lat else None,
        "client_cpu_ms_per_request": round(
            sum(r.client_cpu for r, _ in rounds) / max(1, sum(r.sent for r, _ in rounds)) * 1000, 3
        ),
    }


async def _request(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, head: bytes, body: bytes
) -> int:
    """One HTTP/1.1 request on a kept-alive connection; returns the status code."""
    writer.write(head + body)
    await writer.drain()
    status_line = await reader.readuntil(b"\r\n")
    length = 0
    while True:
        line = await reader.readuntil(b"\r\n")
        if line == b"\r\n":
            break
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    if length:
        await reader.readexactly(length)
    return int(status_line.split(b" ", 2)[1])


async def load(
    url: str, events: Events, key: bytes, concurrency: int, seconds: float, client: str = "raw"
) -> Result:
    """``concurrency`` workers, each on its own keep-alive connection, for ``seconds``.

    ``client="httpx"``: one ``httpx.AsyncClient`` (one connection) per worker, as the gateway's
    dispatcher sends. It costs 1.2-1.7 ms of CPU per request here, so on two cores shared with
    the server it sets the ceiling (the issue's ≈ 500/s), and one shared pool would degrade
    under 50 concurrent requests (encode/httpx#3215). ``client="raw"``: a few lines of asyncio
    streams at ≈ 0.15 ms per request, which shows what the servers themselves can do."""
    parsed = urlsplit(url)
    host, port, path = parsed.hostname or "127.0.0.1", parsed.port or 80, parsed.path
    latencies: list[float] = []
    counts = {"sent": 0, "ok": 0, "errors": 0}
    deadline = time.monotonic() + seconds

    async def httpx_worker() -> None:
        limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        async with httpx.AsyncClient(limits=limits, timeout=30) as http:
            while time.monotonic() < deadline and counts["sent"] < MAX_EVENTS:
                msg_id, body = events.next()
                counts["sent"] += 1
                headers = signed_headers(key, msg_id, body)
                start = time.perf_counter()
                response = await http.post(url, content=body, headers=headers)
                latencies.append(time.perf_counter() - start)
                counts["ok" if response.status_code == 200 else "errors"] += 1

    async def worker() -> None:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            while time.monotonic() < deadline and counts["sent"] < MAX_EVENTS:
                msg_id, body = events.next()
                counts["sent"] += 1
                headers = signed_headers(key, msg_id, body)
                head = (
                    f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                    + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
                    + f"content-length: {len(body)}\r\n\r\n"
                ).encode()
                start = time.perf_counter()
                status = await asyncio.wait_for(_request(reader, writer, head, body), 30)
                latencies.append(time.perf_counter() - start)
                counts["ok" if status == 200 else "errors"] += 1
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    start = time.monotonic()
    cpu = time.process_time()
    run = httpx_worker if client == "httpx" else worker
    await asyncio.gather(*(run() for _ in range(concurrency)))
    result = Result(
        counts["sent"], counts["ok"], counts["errors"], time.monotonic() - start, latencies
    )
    result.client_cpu = time.process_time() - cpu
    return result


def _child(
    conn: Any,
    url: str,
    contacts: list[str],
    tag: str,
    key: bytes,
    n: int,
    seconds: float,
    client: str,
) -> None:
    result = asyncio.run(load(url, Events(contacts, tag), key, n, seconds, client))
    conn.send(result)
    conn.close()


def load_spread(
    url: str,
    contacts: list[str],
    tag: str,
    key: bytes,
    concurrency: int,
    seconds: float,
    client: str,
    procs: int,
) -> Result:
    """The load from ``procs`` client processes (several httpx clients rather than one process
    with 50 coroutines), merged into one result; each process has its own conversations."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    shares = [concurrency // procs + (1 if i < concurrency % procs else 0) for i in range(procs)]
    pipes, children = [], []
    for i, n in enumerate(shares):
        parent, child = ctx.Pipe(duplex=False)
        proc = ctx.Process(
            target=_child, args=(child, url, contacts, f"{tag}-p{i}", key, n, seconds, client)
        )
        proc.start()
        pipes.append(parent)
        children.append(proc)
    results = []
    for pipe, proc in zip(pipes, children, strict=True):
        if pipe.poll(seconds + 60):
            results.append(pipe.recv())
        proc.join(10)
        if proc.is_alive():
            proc.kill()
    return Result(
        sent=sum(r.sent for r in results),
        ok=sum(r.ok for r in results),
        errors=sum(r.errors for r in results) + sum(shares[len(results) :]),
        seconds=max((r.seconds for r in results), default=seconds),
        latencies=[x for r in results for x in r.latencies],
        client_cpu=sum(r.client_cpu for r in results),
    )


def count_rows(database_url: str, table: str) -> int:
    import sqlalchemy as sa

    from crm_api.db import normalise_url

    engine = sa.create_engine(normalise_url(database_url))
    with engine.connect() as conn:
        n = int(conn.execute(sa.text(f"SELECT count(*) FROM {table}")).scalar_one())
    engine.dispose()
    return n


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.5, help="per round and target")
    parser.add_argument("--rounds", type=int, default=6, help="interleaved rounds per target")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[20, 50])
    parser.add_argument("--skip-postgres", action="store_true")
    parser.add_argument(
        "--clients",
        nargs="+",
        choices=["httpx", "raw"],
        default=["httpx", "raw"],
        help="load generators; the target is judged with httpx, the gateway's own client",
    )
    parser.add_argument(
        "--client-procs",
        type=int,
        default=5,
        help="spread the httpx clients over this many processes (one process of 50 coroutines "
        "is itself the bottleneck)",
    )
    args = parser.parse_args()
    key = base64.b64decode(SECRET.removeprefix("whsec_"))
    root = Path(tempfile.mkdtemp(prefix="mailgate-bench-crm-"))
    root.chmod(0o755)
    servers: list[Uvicorn] = []
    pg: Postgres | None = None
    try:
        bare_db = root / "bare.db"
        bare = Uvicorn(
            "crm_ingest:bare_app",
            {"BENCH_BARE_DB": str(bare_db)},
            root / "bare.log",
            app_dir=REPO / "bench",
        )
        servers.append(bare)
        targets: list[tuple[str, str, Any]] = [
            (
                "bare_fastapi_sqlite",
                bare.url + "/ingest",
                lambda: count_rows(f"sqlite:///{bare_db}", "event"),
            ),
        ]
        backends = [("crm_sqlite", f"sqlite:///{root / 'crm.db'}")]
        if not args.skip_postgres:
            pg = Postgres(root)
            backends.append(("crm_postgres", pg.url()))
        contacts: list[str] = []
        for name, database_url in backends:
            contacts = prepare_crm(database_url)
            env = {
                "MAILGATE_CRM_DATABASE_URL": database_url,
                "MAILGATE_CRM_WEBHOOKS__SECRETS": json.dumps([SECRET]),
                "MAILGATE_CRM_POLICY__COMPANY_DOMAINS": json.dumps([COMPANY]),
                "MAILGATE_CRM_CONFIG": str(REPO / "conf" / "crm.toml"),
                "MAILGATE_CRM_LOG_LEVEL": "warning",
            }
            server = Uvicorn("crm_api.main:create_app_from_env", env, root / f"{name}.log")
            servers.append(server)
            targets.append(
                (
                    name,
                    server.url + "/api/v1/webhooks/gateway",
                    lambda u=database_url: count_rows(u, "email"),
                )
            )
        report: dict[str, Any] = {
            "bench": "crm_ingest",
            "cpus": os.cpu_count(),
            "clients": {
                "httpx": "httpx.AsyncClient per concurrent worker, 1 keep-alive connection each",
                "raw": "asyncio streams, 1 keep-alive HTTP/1.1 connection per concurrent worker",
            },
            "event_bytes": len(Events(contacts, "size").next()[1]),
            "seconds_per_round": args.seconds,
            "httpx_client_processes": args.client_procs,
            "rounds": args.rounds,
            "results": {},
        }
        verdicts = []
        streams = {name: Events(contacts, name) for name, _, _ in targets}
        counter = itertools.count()
        for client in args.clients:
            report["results"][client] = {}
            for concurrency in args.concurrency:
                rounds: dict[str, list[tuple[Result, int]]] = {name: [] for name, _, _ in targets}
                for name, url, _count in targets:  # warm-up, not counted
                    asyncio.run(load(url, streams[name], key, concurrency, 1.0, client))
                # Interleave the targets round by round: drift on a shared machine hits all alike.
                for _ in range(args.rounds):
                    for name, url, count in targets:
                        before = count()
                        if client == "httpx" and args.client_procs > 1:
                            result = load_spread(
                                url, contacts, f"{name}-{next(counter)}", key, concurrency,
                                args.seconds, client, args.client_procs,
                            )  # fmt: skip
                        else:
                            result = asyncio.run(
                                load(url, streams[name], key, concurrency, args.seconds, client)
                            )
                        rounds[name].append((result, count() - before))
                row = {name: summarise(rounds[name]) for name in rounds}
                bare_rate = row["bare_fastapi_sqlite"]["stored_per_s"]
                for name in row:
                    if not name.startswith("crm_"):
                        continue
                    ratio = round(row[name]["stored_per_s"] / bare_rate, 2) if bare_rate else None
                    row[name]["ratio_to_bare"] = ratio
                    ok = ratio is not None and ratio >= 0.6 and row[name]["non_2xx"] == 0
                    if concurrency >= 50:
                        ok = ok and (row[name]["p99_ms"] or 1e9) < 1000
                    if client == "httpx":
                        verdicts.append(ok)
                report["results"][client][f"c{concurrency}"] = row
        report["target"] = (
            "with the httpx client: crm >= 0.6x bare rate; p99 < 1000 ms at 50 clients; no errors"
        )
        report["target_met"] = all(verdicts)
        print(json.dumps(report, indent=2))
        return 0
    finally:
        for server in servers:
            server.stop()
        if pg is not None:
            pg.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
