"""``server.processes = N``: N gateway processes share the SMTP port (SO_REUSEPORT) under one
supervisor, which starts a dead one again and stops them all on SIGTERM."""

from __future__ import annotations

import os
import signal
import smtplib
from pathlib import Path
from typing import Any

from tests.gateway.conftest import start_gateway_process
from tests.gateway.test_durability import write_config
from tests.hooks.conftest import poll
from tests.servers.ports import free_port


def children(pid: int) -> set[int]:
    """Live gateway processes whose parent is ``pid`` (from /proc)."""
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        # Fields after the command name in parentheses: state, ppid, ...
        state, ppid = stat.rpartition(")")[2].split()[:2]
        if int(ppid) == pid and state != "Z" and b"gateway" in cmdline:
            found.add(int(entry))
    return found


def test_processes_share_the_port_are_restarted_and_stop_together(
    tmp_path: Path, ca: Any, sink: Any
) -> None:
    port = free_port()
    config = write_config(tmp_path, ca, sink.port, port)
    config.write_text(config.read_text().replace("[server]\n", "[server]\nprocesses = 2\n"))
    log = tmp_path / "gateway.log"
    parent = start_gateway_process(config, port, log)
    try:
        first = poll(lambda: children(parent.pid), timeout=30, what="the second process")
        assert len(first) == 1, log.read_text()

        for n in range(30):  # new connections: the kernel spreads them over both listeners
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
                client.sendmail(
                    "app@example.test",
                    ["x@client.test"],
                    f"From: app@example.test\r\nSubject: p{n}\r\n\r\nbody\r\n".encode(),
                )
        poll(lambda: len(sink.messages) >= 30, timeout=30, what="all 30 relayed")
        assert sorted(str(m.message()["Subject"]) for m in sink.messages) == sorted(
            f"p{n}" for n in range(30)
        )

        (child,) = first
        os.kill(child, signal.SIGKILL)
        again = poll(
            lambda: (c := children(parent.pid)) and c != first and c, timeout=30, what="a restart"
        )
        assert len(again) == 1 and child not in again
        assert "exited" in log.read_text() and "starting it again" in log.read_text()
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
            client.sendmail("app@example.test", ["x@client.test"], b"Subject: after\r\n\r\nx\r\n")
        poll(lambda: len(sink.messages) >= 31, timeout=30, what="relayed after the restart")

        parent.send_signal(signal.SIGTERM)
        assert parent.wait(timeout=30) == 0, log.read_text()
        assert not children(parent.pid)
        (survivor,) = again
        assert (
            not Path(f"/proc/{survivor}").exists()
            or " Z " in Path(f"/proc/{survivor}/stat").read_text()
        )
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait(timeout=10)
        for pid in children(parent.pid):
            os.kill(pid, signal.SIGKILL)


def test_processes_stop_when_their_supervisor_is_killed(tmp_path: Path, ca: Any, sink: Any) -> None:
    """SIGKILL (or the OOM killer) gives the supervisor no chance to stop the others: they see
    their pipe from it close and stop themselves instead of serving on as orphans."""
    port = free_port()
    config = write_config(tmp_path, ca, sink.port, port)
    config.write_text(config.read_text().replace("[server]\n", "[server]\nprocesses = 2\n"))
    log = tmp_path / "gateway.log"
    parent = start_gateway_process(config, port, log)
    orphans: set[int] = set()
    try:
        orphans = poll(lambda: children(parent.pid), timeout=30, what="the second process")
        parent.kill()
        parent.wait(timeout=10)
        poll(
            lambda: (
                not any(
                    Path(f"/proc/{pid}").exists()
                    and " Z " not in Path(f"/proc/{pid}/stat").read_text()
                    for pid in orphans
                )
            ),
            timeout=30,
            what="the orphaned process to stop",
        )
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait(timeout=10)
        for pid in orphans:
            if Path(f"/proc/{pid}").exists():
                os.kill(pid, signal.SIGKILL)
