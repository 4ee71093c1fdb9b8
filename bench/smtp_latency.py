"""SMTP accept latency at a steady rate: the gateway against Postfix, in the same run.

A pool of ``--connections`` persistent smtplib sessions (one thread each) sends ``--rate``
messages per second for ``--seconds`` (after ``--warmup`` seconds that are not counted). Message
``i`` is due at ``start + i / rate``: a thread takes the next message, waits until it is due and
sends it (the pacing is a schedule, so a slow reply makes later messages late rather than
silently lowering the rate; that lateness is reported as ``lag``). Both servers relay to their
own ``smtp-sink`` while measured, so the gateway's worker signs and relays alongside.

Per message it records (milliseconds):

- ``data``: the whole DATA exchange (``DATA`` → 354 → body and "." → 250), what smtplib's
  ``data()`` call takes; the target (p99 < 50 ms) applies to this;
- ``eod``: from the end of the body (".") being written to the 250;
- ``transaction``: MAIL FROM to the 250;
- ``from_schedule``: due time to the 250 (includes any lag).

Prints one JSON object with p50/p95/p99/max for each, per peer. Run from the repository root:

    .venv/bin/python -m bench.smtp_latency [--rate 100] [--seconds 30] [--connections 10]
                                           [--size 10240] [--peers gateway,postfix]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import smtplib
import sys
import threading
import time
from typing import Any

from bench._common import (
    HOST,
    RECIPIENT,
    SENDER,
    GatewayServer,
    PostfixServer,
    Sink,
    machine,
    message,
    percentile,
    running,
    temp_dir,
    wait_until,
)


class Schedule:
    """Hands out message numbers; message i is due at start + i / rate."""

    def __init__(self, *, rate: float, count: int, start: float) -> None:
        self.rate = rate
        self.count = count
        self.start = start
        self.next = 0
        self.lock = threading.Lock()

    def take(self) -> tuple[int, float] | None:
        with self.lock:
            if self.next >= self.count:
                return None
            i = self.next
            self.next += 1
        return i, self.start + i / self.rate


def sender(
    port: int,
    schedule: Schedule,
    body: bytes,
    warmup: int,
    samples: list[dict[str, float]],
    errors: list[str],
    deadline: float,
) -> None:
    try:
        client = smtplib.SMTP(HOST, port, local_hostname="client.bench.test", timeout=30)
        client.ehlo()
    except (OSError, smtplib.SMTPException) as exc:
        errors.append(f"connect: {exc}")
        return
    try:
        while time.monotonic() < deadline:
            task = schedule.take()
            if task is None:
                break
            i, due = task
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            started = time.monotonic()
            try:
                code, reply = client.mail(SENDER)
                if code != 250:
                    raise smtplib.SMTPException(f"MAIL {code} {reply!r}")
                code, reply = client.rcpt(RECIPIENT)
                if code != 250:
                    raise smtplib.SMTPException(f"RCPT {code} {reply!r}")
                data_start = time.monotonic()
                code, reply = client.docmd("DATA")
                if code != 354:
                    raise smtplib.SMTPException(f"DATA {code} {reply!r}")
                client.send(body + b".\r\n")
                body_sent = time.monotonic()
                code, reply = client.getreply()
                done = time.monotonic()
                if code != 250:
                    raise smtplib.SMTPException(f"end of data {code} {reply!r}")
            except (OSError, smtplib.SMTPException) as exc:
                errors.append(f"message {i}: {exc}")
                return
            if i >= warmup:
                samples.append(
                    {
                        "data": done - data_start,
                        "eod": done - body_sent,
                        "transaction": done - started,
                        "from_schedule": done - due,
                        "lag": max(0.0, started - due),
                        "done": done,
                    }
                )
    finally:
        try:
            client.quit()
        except (OSError, smtplib.SMTPException):
            client.close()


def measure(port: int, args: argparse.Namespace) -> dict[str, Any]:
    body = message(args.size, tag="latency")
    assert body.endswith(b"\r\n") and b"\r\n." not in body  # no dot-stuffing needed
    warmup = int(args.rate * args.warmup)
    count = warmup + int(args.rate * args.seconds)
    start = time.monotonic() + 0.5
    schedule = Schedule(rate=args.rate, count=count, start=start)
    samples: list[dict[str, float]] = []
    errors: list[str] = []
    deadline = start + count / args.rate + args.grace
    threads = [
        threading.Thread(
            target=sender,
            args=(port, schedule, body, warmup, samples, errors, deadline),
            daemon=True,
        )
        for _ in range(args.connections)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max(0.1, deadline + 35 - time.monotonic()))
    result: dict[str, Any] = {
        "sent": len(samples),
        "expected": count - warmup,
        "errors": errors[:5],
        "error_count": len(errors),
    }
    if samples:
        first_due = start + warmup / args.rate
        span = max(s["done"] for s in samples) - first_due
        result["achieved_rate"] = round(len(samples) / span, 1) if span > 0 else None
        for key in ("data", "eod", "transaction", "from_schedule", "lag"):
            values = [s[key] * 1000 for s in samples]
            result[key + "_ms"] = {
                name: round(percentile(values, p), 2)
                for name, p in (("p50", 50), ("p95", 95), ("p99", 99), ("max", 100))
            }
    return result


def drained(peer: str, server: Any, sink: Sink, total: int) -> bool:
    """The sink has ``total`` messages and (for the gateway) nothing is left queued."""
    return sink.count() >= total and (peer != "gateway" or server.queued() == 0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rate", type=float, default=100.0, help="messages per second")
    parser.add_argument("--seconds", type=float, default=30.0, help="measured duration")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds sent but not counted")
    parser.add_argument("--connections", type=int, default=10)
    parser.add_argument("--size", type=int, default=10240, help="body bytes")
    parser.add_argument("--peers", default="gateway,postfix")
    parser.add_argument(
        "--grace", type=float, default=30.0, help="stop this long after the last message was due"
    )
    args = parser.parse_args()
    peers = [p for p in args.peers.split(",") if p]
    report: dict[str, Any] = {
        "benchmark": "smtp_latency",
        "rate": args.rate,
        "seconds": args.seconds,
        "connections": args.connections,
        "size": args.size,
        "machine": machine(),
        "target": "gateway data_ms.p99 < 50",
    }
    with temp_dir("latency") as tmp:
        for peer in peers:
            (tmp / peer).mkdir()
            sink = Sink(tmp / peer)
            server: Any = (
                GatewayServer(tmp / peer, sink.port)
                if peer == "gateway"
                else PostfixServer(tmp / peer, sink.port)
            )
            with running(sink, server):
                time.sleep(1.0)
                report[peer] = result = measure(server.port, args)
                # Every message that got its 250 (warm-up included) reaches the sink and leaves
                # the queue; count only once that happened (bounded).
                total = result["sent"] + int(args.rate * args.warmup)
                with contextlib.suppress(TimeoutError):
                    wait_until(
                        functools.partial(drained, peer, server, sink, total),
                        timeout=30,
                        what="relayed",
                        interval=0.05,
                    )
                result["sink_count"] = sink.count()
                if peer == "gateway":
                    result["dkim_signed"] = server.dkim_signed()
            print(f"{peer}: {report[peer]}", file=sys.stderr)
    gateway = report.get("gateway", {})
    if "data_ms" in gateway:
        report["gateway_meets_target"] = gateway["data_ms"]["p99"] < 50
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
