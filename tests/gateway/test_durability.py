"""Promise 1: "250" means on disk. A gateway killed with SIGKILL under load loses nothing.

The gateway runs as a real ``mailgate serve`` process. Several clients send as fast as they can;
the process is killed mid-stream, started again on the same database, and every message that got
its "250" must arrive upstream (a duplicate is allowed, a loss is not).
"""

from __future__ import annotations

import os
import signal
import smtplib
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from tests.gateway.conftest import start_gateway_process
from tests.servers.ports import free_port

SENDERS = 6
PER_SENDER = 120


def write_config(tmp_path: Path, ca: Any, sink_port: int, smtp_port: int) -> Path:
    path = tmp_path / "mailgate.toml"
    path.write_text(
        f"""
[server]
hostname = "gw.example.test"
[database]
url = "sqlite:///{tmp_path / "mailgate.db"}"
lease_seconds = 10
[submission]
port = {smtp_port}
tls_port = 0
cert_file = "{ca.server.cert}"
key_file = "{ca.server.key}"
trusted_networks = ["127.0.0.1/32"]
[relay]
host = "127.0.0.1"
port = {sink_port}
security = "none"
require_tls = false
retry_schedule_seconds = [0.5]
[dkim]
key_dir = "{tmp_path / "dkim"}"
[api]
enabled = false
[worker]
poll_interval_seconds = 0.2
[crm]
embedded = false
"""
    )
    return path


def test_sigkill_under_load_loses_no_accepted_message(tmp_path: Path, ca: Any, sink: Any) -> None:
    port = free_port()
    config = write_config(tmp_path, ca, sink.port, port)
    log = tmp_path / "gateway.log"
    process = start_gateway_process(config, port, log)

    accepted: list[str] = []
    lock = threading.Lock()
    killed = threading.Event()

    def send(sender: int) -> None:
        try:
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
                for n in range(PER_SENDER):
                    tag = f"s{sender}-m{n}"
                    message = (
                        f"From: app@example.test\r\nTo: x@client.test\r\nSubject: {tag}\r\n"
                        f"Message-ID: <{tag}@example.test>\r\n\r\n" + "body line\r\n" * 100
                    ).encode()
                    client.sendmail("app@example.test", ["x@client.test"], message)
                    with lock:  # only now did we get the 250
                        accepted.append(tag)
        except (OSError, smtplib.SMTPException):
            assert killed.is_set(), "a client failed before the gateway was killed"

    threads = [threading.Thread(target=send, args=(i,)) for i in range(SENDERS)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 60
    while len(accepted) < SENDERS * PER_SENDER // 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    killed.set()
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=10)
    for thread in threads:
        thread.join(timeout=30)
    before_restart = set(accepted)
    assert 0 < len(before_restart) < SENDERS * PER_SENDER, "the kill did not land mid-stream"

    process = start_gateway_process(config, port, log)
    try:

        def arrived() -> set[str]:
            return {str(m.message()["Subject"]) for m in sink.messages}

        deadline = time.monotonic() + 60
        while not before_restart <= arrived() and time.monotonic() < deadline:
            time.sleep(0.1)
        missing = before_restart - arrived()
        assert not missing, f"{len(missing)} accepted messages never arrived: {sorted(missing)[:5]}"
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
