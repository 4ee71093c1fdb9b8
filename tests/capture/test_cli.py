"""`mailgate dns check`, `mailgate capture address` and `mailgate capture quarantine`, as an admin
runs them: the real command in a subprocess, against NSD and a database of its own."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.dkim import generate_key
from tests.capture.conftest import REP
from tests.servers.dns import AuthoritativeDns, txt_record

ROOT = Path(__file__).resolve().parents[2]


def mailgate(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MAILGATE_CONFIG": str(config)}
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=ROOT,
        check=False,
    )


@pytest.fixture
def config(
    tmp_path: Path, capture_dns: AuthoritativeDns, template_db: tuple[Path, dict[str, str]]
) -> Path:
    import shutil

    shutil.copyfile(template_db[0], tmp_path / "mailgate.db")
    path = tmp_path / "mailgate.toml"
    path.write_text(
        f'[database]\nurl = "sqlite:///{tmp_path / "mailgate.db"}"\n'
        f'[dns]\nnameservers = ["{capture_dns.host}"]\nport = {capture_dns.port}\n'
        "timeout_seconds = 2.0\n"
        f'[dkim]\nkey_dir = "{tmp_path / "dkim"}"\n'
        '[relay]\nhost = "45.33.10.25"\n'
        '[server]\nhostname = "gw.example.test"\n'
        '[capture]\ndomain = "crm.test"\n'
    )
    return path


def test_dns_check_passes_a_well_published_domain(
    config: Path, capture_dns: AuthoritativeDns
) -> None:
    key = generate_key(config.parent / "dkim", "good.test", selector="mg")
    capture_dns.publish(
        "good.test",
        [
            '@ IN TXT "v=spf1 include:_spf.good.test -all"',
            '_spf IN TXT "v=spf1 ip4:45.33.10.0/24 ~all"',
            txt_record("mg._domainkey", key.record_value),
            txt_record("_dmarc", "v=DMARC1; p=quarantine; rua=mailto:d@good.test"),
        ],
    )
    result = mailgate(config, "dns", "check", "good.test")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert "OK    spf    it authorises 45.33.10.25 (relay.host 45.33.10.25)" in lines
    assert "OK    spf    1 of 10 DNS lookups (RFC 7208 section 4.6.4)" in lines
    assert "OK    dkim   selector mg: the rsa key at mg._domainkey.good.test matches ours" in lines
    assert "OK    dmarc  policy quarantine" in lines
    assert not [line for line in lines if line.startswith("FAIL")]


def test_dns_check_says_what_to_publish(config: Path, capture_dns: AuthoritativeDns) -> None:
    key = generate_key(config.parent / "dkim", "bad.test", selector="mg")
    other = generate_key(config.parent / "other", "bad.test", selector="mg")
    includes = " ".join(f"include:i{n}.bad.test" for n in range(11))
    capture_dns.publish(
        "bad.test",
        [
            f'@ IN TXT "v=spf1 {includes} -all"',
            *[f'i{n} IN TXT "v=spf1 ip4:192.0.2.{n} -all"' for n in range(11)],
            txt_record("mg._domainkey", other.record_value),  # someone else's key
        ],
    )
    result = mailgate(config, "dns", "check", "bad.test")
    assert result.returncode == 1
    out = result.stdout
    assert "FAIL  spf    evaluating it takes 11 DNS lookups; receivers stop at 10" in out
    assert "FAIL  spf    it does not authorise 45.33.10.25 (relay.host 45.33.10.25)" in out
    assert "FAIL  dkim   selector mg: the key at mg._domainkey.bad.test is not ours" in out
    assert f"publish: {key.txt_record()}" in out
    assert "FAIL  dmarc  bad.test publishes no DMARC record" in out
    assert 'publish: _dmarc.bad.test. IN TXT "v=DMARC1; p=none;' in out


def test_capture_address_show_and_rotate(
    config: Path, template_db: tuple[Path, dict[str, str]]
) -> None:
    shown = mailgate(config, "capture", "address", REP)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.strip() == template_db[1][REP]
    rotated = mailgate(config, "capture", "address", REP, "--rotate")
    new = rotated.stdout.strip().splitlines()[-1]
    assert new.startswith("log+") and new.endswith("@crm.test") and new != template_db[1][REP]
    unknown = mailgate(config, "capture", "address", "nobody@company.test")
    assert unknown.returncode == 2
    assert unknown.stderr.strip() == (
        "mailgate: no user nobody@company.test; `mailgate user list` shows who exists"
    )


def test_quarantine_cli_errors_are_one_line(config: Path) -> None:
    listed = mailgate(config, "capture", "quarantine", "list")
    assert (listed.returncode, listed.stdout.strip()) == (0, "the quarantine is empty")
    missing = mailgate(config, "capture", "quarantine", "release", "nosuchid")
    assert missing.returncode == 2
    assert missing.stderr.strip() == (
        "mailgate: no quarantined message nosuchid; "
        "`mailgate capture quarantine list` shows the ids"
    )
