"""Memory while relaying one big message: the gateway's peak RSS above idle (and Postfix's).

Starts the gateway (``max_message_size`` above the message, DKIM signing on, SQLite store) relaying
to ``smtp-sink``, relays one small message to warm it up, measures its idle RSS, then submits one
``--size`` message (default 25 MiB of 78-character lines) with smtplib and waits until the sink has
it and the queue is empty. A thread samples ``/proc/PID/status`` (VmRSS) every 10 ms throughout;
VmHWM (the kernel's high-water mark) is read at the end as a cross-check. Target: peak - idle <
4 x the message size.

With ``--peers gateway,postfix`` the same is done for a private Postfix; Postfix is several
processes (smtpd, cleanup, qmgr, smtp, … appear on demand), so its figure is the sum of PSS
(proportional set size, so shared libraries are not counted once per process) over every process
in the master's session, sampled the same way.

Prints one JSON object. Run from the repository root:

    .venv/bin/python -m bench.smtp_big_message [--size 26214400] [--peers gateway,postfix]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import smtplib
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench._common import (
    HOST,
    RECIPIENT,
    SENDER,
    GatewayServer,
    PostfixServer,
    Sink,
    machine,
    median,
    message,
    rss_kib,
    running,
    temp_dir,
    wait_until,
)

MIB = 1024 * 1024


def pss_kib(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError, ValueError, IndexError):
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
                    break
    return total


class Sampler(threading.Thread):
    """Calls ``measure()`` every ``interval`` seconds; keeps (time, KiB) samples."""

    def __init__(
        self, measure: Callable[[], int], interval: float = 0.01, limit: float = 600.0
    ) -> None:
        super().__init__(daemon=True)
        self.measure = measure
        self.interval = interval
        self.limit = limit
        self.samples: list[tuple[float, int]] = []
        self.stopped = threading.Event()

    def run(self) -> None:
        end = time.monotonic() + self.limit
        next_at = time.monotonic()
        while not self.stopped.is_set() and time.monotonic() < end:
            value = self.measure()
            if value:
                self.samples.append((time.monotonic(), value))
            next_at += self.interval
            self.stopped.wait(max(0.0, next_at - time.monotonic()))

    def stop(self) -> None:
        self.stopped.set()
        self.join(5)

    def peak(self, since: float = 0.0, until: float = float("inf")) -> int:
        return max((v for t, v in self.samples if since <= t <= until), default=0)


def send(port: int, data: bytes, timeout: float) -> None:
    with smtplib.SMTP(HOST, port, local_hostname="client.bench.test", timeout=timeout) as client:
        client.sendmail(SENDER, [RECIPIENT], data)


def measure_peer(peer: str, server: Any, sink: Sink, args: argparse.Namespace) -> dict[str, Any]:
    if peer == "gateway":

        def measure() -> int:
            return rss_kib(server.pid).get("VmRSS", 0)

        unit = "VmRSS of the gateway process"
    else:

        def measure() -> int:
            return pss_kib(server.pids())

        unit = "sum of PSS over the Postfix instance's processes"

    def drained(count: int) -> Callable[[], bool]:
        if peer == "gateway":
            return lambda: sink.count() >= count and server.queued() == 0
        return lambda: sink.count() >= count and server.queue_empty()

    # Warm up: one small message through the whole path, so lazy imports and pools exist.
    send(server.port, message(10 * 1024, tag="warmup"), timeout=60)
    wait_until(drained(1), timeout=60, what=f"{peer} warm-up relayed", interval=0.05)
    time.sleep(args.settle)
    sampler = Sampler(measure, interval=args.interval, limit=args.timeout + 60)
    sampler.start()
    time.sleep(1.0)
    idle_kib = int(median([v for _, v in sampler.samples]) or measure())

    data = message(args.size, tag="big")
    size = len(data)
    t_send = time.monotonic()
    send(server.port, data, timeout=args.timeout)
    t_accepted = time.monotonic()
    del data
    t_relayed = wait_until(
        drained(2), timeout=args.timeout, what=f"{peer} relayed the big one", interval=0.02
    )
    time.sleep(1.0)
    sampler.stop()
    after_kib = int(median([v for t, v in sampler.samples if t > t_relayed + 0.5]) or 0)

    peak_kib = sampler.peak()
    result: dict[str, Any] = {
        "measured": unit,
        "message_bytes": size,
        "idle_mib": round(idle_kib / 1024, 1),
        "peak_mib": round(peak_kib / 1024, 1),
        "delta_mib": round((peak_kib - idle_kib) / 1024, 1),
        "delta_over_size": round((peak_kib - idle_kib) * 1024 / size, 2),
        "peak_while_accepting_mib": round(sampler.peak(t_send, t_accepted) / 1024, 1),
        "peak_while_relaying_mib": round(sampler.peak(t_accepted, t_relayed) / 1024, 1),
        "after_mib": round(after_kib / 1024, 1),
        "accept_seconds": round(t_accepted - t_send, 2),
        "relay_seconds": round(t_relayed - t_accepted, 2),
        "samples": len(sampler.samples),
    }
    if peer == "gateway":
        hwm = rss_kib(server.pid).get("VmHWM", 0)
        result["vmhwm_mib"] = round(hwm / 1024, 1)
        result["vmhwm_delta_over_size"] = round((hwm - idle_kib) * 1024 / size, 2)
        result["dkim_signed"] = server.dkim_signed()
        result["meets_target"] = result["delta_over_size"] < 4
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=25 * MIB, help="message bytes")
    parser.add_argument("--peers", default="gateway,postfix")
    parser.add_argument("--interval", type=float, default=0.01, help="sampling period (s)")
    parser.add_argument("--settle", type=float, default=1.0, help="idle wait before measuring")
    parser.add_argument("--timeout", type=float, default=300.0)
    args = parser.parse_args()
    report: dict[str, Any] = {
        "benchmark": "smtp_big_message",
        "size": args.size,
        "machine": machine(),
        "target": "gateway delta_over_size < 4",
    }
    with temp_dir("bigmsg") as tmp:
        for peer in [p for p in args.peers.split(",") if p]:
            (tmp / peer).mkdir()
            sink = Sink(tmp / peer)
            server: Any = (
                GatewayServer(tmp / peer, sink.port, max_message_size=args.size + 16 * MIB)
                if peer == "gateway"
                else PostfixServer(tmp / peer, sink.port)
            )
            with running(sink, server):
                time.sleep(1.0)
                report[peer] = measure_peer(peer, server, sink, args)
            print(f"{peer}: {report[peer]}", file=sys.stderr)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
