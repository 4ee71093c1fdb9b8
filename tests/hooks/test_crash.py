"""Promise 5 under a crash: the gateway killed with SIGKILL while dispatching webhooks, then
restarted, delivers every event, and the CRM stores each email once."""

from __future__ import annotations

import os
import signal
import smtplib
import subprocess
from pathlib import Path
from typing import Any

from tests.gateway.conftest import start_gateway_process
from tests.hooks.conftest import SECRET, Crm, poll
from tests.servers.ports import free_port

MESSAGES = 40


def test_sigkill_while_dispatching_loses_no_event(
    tmp_path: Path, ca: Any, sink: Any, crm_server: Crm
) -> None:
    crm_server.add_contact("bob@customer.test")
    port = free_port()
    config = tmp_path / "mailgate.toml"
    config.write_text(f"""
[server]
hostname = "gw.example.test"
[database]
url = "sqlite:///{tmp_path / "gw.db"}"
lease_seconds = 10
[submission]
port = {port}
tls_port = 0
cert_file = "{ca.server.cert}"
key_file = "{ca.server.key}"
trusted_networks = ["127.0.0.1/32"]
[relay]
host = "127.0.0.1"
port = {sink.port}
security = "none"
require_tls = false
[dkim]
key_dir = "{tmp_path / "dkim"}"
[api]
enabled = false
[worker]
poll_interval_seconds = 0.2
[crm]
embedded = false
url = "{crm_server.url}"
[hooks]
crm_token = "{crm_server.gateway_token}"
webhook_secrets = ["{SECRET}"]
dispatch_concurrency = 1
request_timeout_seconds = 2
retry_schedule_seconds = [0.5, 0.5, 0.5, 0.5]
""")
    log = tmp_path / "gateway.log"
    process = start_gateway_process(config, port, log)
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        for n in range(MESSAGES):
            client.sendmail(
                "rep@example.test",
                ["bob@customer.test"],
                f"From: rep@example.test\r\nTo: bob@customer.test\r\nSubject: crash {n}\r\n"
                f"Message-ID: <crash-{n}@example.test>\r\n\r\nhello\r\n".encode(),
            )
    poll(lambda: len(crm_server.emails()) >= 3, timeout=30, what="dispatching under way")
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=10)
    at_kill = len(crm_server.emails())
    process = start_gateway_process(config, port, log)
    try:
        emails = poll(
            lambda: (e := crm_server.emails()) and len(e) >= MESSAGES and e,
            timeout=60,
            what="every email after the restart",
        )
        subjects = sorted(e["subject"] for e in emails)
        assert subjects == sorted(f"crash {n}" for n in range(MESSAGES))  # each exactly once
        assert at_kill < MESSAGES, "the kill came after dispatching had finished"
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
