"""SMTP throughput: the gateway against Postfix, both relaying to smtp-sink, in the same run.

Postfix's ``smtp-source`` sends ``--messages`` messages of ``--size`` bytes over ``--sessions``
parallel sessions to (a) the gateway (SQLite store with ``synchronous=FULL``, DKIM signing with an
RSA-2048 key for the sender's domain, relaying to its own ``smtp-sink``) and (b) a private Postfix
relaying to another ``smtp-sink``. For each it measures

- the accept rate: messages / smtp-source's wall time (every message got its 250);
- the end-to-end rate: messages / time from the start until the sink counted every message and
  the queue is empty (the gateway's ``state='queued'`` count read from its SQLite file; Postfix's
  ``postqueue -p``);
- the CPU time per message over that span (the gateway process; for Postfix every process of
  the instance, including exited ones its master reaped).

``--connections new`` is a new SMTP session per message (smtp-source's default), ``reuse`` keeps
sending over the same session (``smtp-source -d``); ``both`` (the default) measures each. Every
run starts fresh servers; the peer order alternates between runs; the figures are medians over
``--runs``. Prints one JSON object. Run from the repository root with the venv's Python:

    .venv/bin/python -m bench.smtp_throughput [--messages 5000] [--sessions 20] [--size 10240]
                                              [--runs 3] [--connections both|new|reuse]
                                              [--processes 1]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
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
    median,
    require,
    running,
    temp_dir,
)


def smtp_source(
    port: int, *, messages: int, sessions: int, size: int, reuse: bool, timeout: float
) -> tuple[float, str]:
    """Run smtp-source against ``port``; return its wall time. Raise if it failed."""
    argv = [
        require("/usr/sbin/smtp-source"),
        "-s",
        str(sessions),
        "-m",
        str(messages),
        "-l",
        str(size),
        "-f",
        SENDER,
        "-t",
        RECIPIENT,
        "-M",
        "client.bench.test",
    ]
    if reuse:
        argv.append("-d")
    argv.append(f"{HOST}:{port}")
    start = time.monotonic()
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    wall = time.monotonic() - start
    if result.returncode != 0:
        raise RuntimeError(f"smtp-source failed ({result.returncode}): {result.stderr[-2000:]}")
    return wall, result.stderr.strip()[-500:]


def measure(
    peer: str, server: Any, sink: Sink, args: argparse.Namespace, reuse: bool
) -> dict[str, Any]:
    before = sink.count()
    cpu_before = server.cpu_seconds()
    start = time.monotonic()
    wall, _ = smtp_source(
        server.port,
        messages=args.messages,
        sessions=args.sessions,
        size=args.size,
        reuse=reuse,
        timeout=args.timeout,
    )
    # Drained: the sink has every message, then the queue says it is empty. Poll the sink
    # counter often (cheap) and the queue only once the sink is complete.
    deadline = start + args.timeout
    relayed_at = None
    while time.monotonic() < deadline:
        if sink.count() - before >= args.messages:
            relayed_at = time.monotonic()
            break
        time.sleep(0.02)
    result: dict[str, Any] = {
        "accept_seconds": round(wall, 3),
        "accept_rate": round(args.messages / wall, 1),
    }
    if relayed_at is None:
        result["error"] = f"only {sink.count() - before} of {args.messages} reached the sink"
        return result
    empty = (lambda: server.queued() == 0) if peer == "gateway" else server.queue_empty
    while not empty() and time.monotonic() < deadline:
        time.sleep(0.05)
    done = time.monotonic()
    cpu = server.cpu_seconds() - cpu_before
    result.update(
        cpu_seconds=round(cpu, 2),
        cpu_ms_per_message=round(cpu * 1000 / args.messages, 3),
        end_to_end_seconds=round(relayed_at - start, 3),
        end_to_end_rate=round(args.messages / (relayed_at - start), 1),
        queue_empty_after_seconds=round(done - start, 3),
        sink_count=sink.count() - before,
    )
    if peer == "gateway":
        result["states"] = server.states()
        result["dkim_signed"] = server.dkim_signed()
    return result


def one_run(args: argparse.Namespace, run: int, reuse: bool) -> dict[str, Any]:
    order = ["gateway", "postfix"] if run % 2 == 0 else ["postfix", "gateway"]
    with temp_dir("throughput") as tmp:
        (tmp / "gw").mkdir()
        (tmp / "pf").mkdir()
        gw_sink, pf_sink = Sink(tmp), Sink(tmp)
        gateway = GatewayServer(tmp / "gw", gw_sink.port, processes=args.processes)
        postfix = PostfixServer(tmp / "pf", pf_sink.port)
        servers = {"gateway": (gateway, gw_sink), "postfix": (postfix, pf_sink)}
        with running(gw_sink, pf_sink, gateway, postfix):
            time.sleep(1.0)  # let both settle after start-up
            out: dict[str, Any] = {"order": order}
            for peer in order:
                server, sink = servers[peer]
                out[peer] = measure(peer, server, sink, args, reuse)
                print(
                    f"run {run + 1} {'reuse' if reuse else 'new'} {peer}: {out[peer]}",
                    file=sys.stderr,
                )
                time.sleep(1.0)
            return out


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for peer in ("gateway", "postfix"):
        for key in ("accept_rate", "end_to_end_rate", "cpu_ms_per_message"):
            values = [r[peer][key] for r in runs if key in r[peer]]
            summary.setdefault(peer, {})[key] = round(median(values), 3) if values else None
    for key in ("accept_rate", "end_to_end_rate"):
        ratios = [
            r["gateway"][key] / r["postfix"][key]
            for r in runs
            if key in r["gateway"] and key in r["postfix"]
        ]
        summary[f"ratio_{key}"] = round(median(ratios), 3) if ratios else None
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--size", type=int, default=10240, help="body bytes (smtp-source -l)")
    parser.add_argument("--runs", type=int, default=3, help="median of this many runs")
    parser.add_argument("--connections", choices=["new", "reuse", "both"], default="both")
    parser.add_argument(
        "--processes", type=int, default=1, help="gateway processes (server.processes)"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        help="give up on one peer's run after this many seconds",
    )
    args = parser.parse_args()
    report: dict[str, Any] = {
        "benchmark": "smtp_throughput",
        "messages": args.messages,
        "sessions": args.sessions,
        "size": args.size,
        "runs": args.runs,
        "processes": args.processes,
        "machine": machine(),
    }
    modes = {"new": [False], "reuse": [True], "both": [False, True]}[args.connections]
    for reuse in modes:
        runs = [one_run(args, run, reuse) for run in range(args.runs)]
        name = "reuse" if reuse else "new"
        report[name] = {"median": summarise(runs), "runs": runs}
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
