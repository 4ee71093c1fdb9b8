"""An authoritative DNS server (NSD) on loopback, serving zone files written as an admin would.

:class:`AuthoritativeDns` runs ``nsd -d -c DIR/nsd.conf`` as a child process answering UDP and
TCP on 127.0.0.1 on a free port, with its config, zone files, pid file and state under a temp
dir and remote control over a unix socket there. :meth:`~AuthoritativeDns.publish` writes a zone
(SOA, NS and the given resource-record lines; TXT strings longer than 255 bytes are split into
several strings, as RFC 1035 §3.3.14 requires) and waits until the server answers with its new
serial. :meth:`~AuthoritativeDns.resolver` returns a dnspython resolver pointed at it, for the
SPF, DKIM and DMARC code under test.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import threading
from pathlib import Path

import dns.exception
import dns.message
import dns.name
import dns.query
import dns.rdatatype
import dns.resolver

from tests.servers._process import (
    ServerFailed,
    make_temp_dir,
    read_text,
    register_cleanup,
    require_binary,
    stop_process,
    unregister_cleanup,
    wait_until,
)
from tests.servers.ports import free_port

MAX_TXT_STRING = 255  # RFC 1035 §3.3: a <character-string> holds at most 255 octets

_QUOTED = re.compile(r'"((?:[^"\\]|\\.)*)"', re.DOTALL)
# One octet of a zone-file character-string: \DDD, \X, or one (possibly multi-byte) character.
_UNIT = re.compile(r"\\[0-9]{3}|\\.|.", re.DOTALL)


def _unit_octets(unit: str) -> int:
    return 1 if unit.startswith("\\") else len(unit.encode())


def split_txt_string(text: str) -> list[str]:
    """Split the inside of one quoted zone-file string into pieces of at most 255 octets.

    Escapes (``\\"``, ``\\DDD``) count as the one octet they stand for and are never cut.
    """
    pieces: list[str] = []
    current: list[str] = []
    size = 0
    for unit in _UNIT.findall(text):
        octets = _unit_octets(unit)
        if size + octets > MAX_TXT_STRING:
            pieces.append("".join(current))
            current, size = [], 0
        current.append(unit)
        size += octets
    pieces.append("".join(current))
    return pieces


def split_long_txt(line: str) -> str:
    """Rewrite a TXT record line so that no quoted string exceeds 255 octets."""
    head, quote, _ = line.partition('"')
    if not quote or "TXT" not in head.upper().split():
        return line
    strings = _QUOTED.findall(line[len(head) :])
    pieces = [piece for s in strings for piece in split_txt_string(s)]
    return head + " ".join(f'"{p}"' for p in pieces)


def txt_record(name: str, value: str, ttl: int | None = None) -> str:
    """A zone-file TXT line for ``value`` (quoted and escaped; publish() splits long ones)."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    ttl_part = f" {ttl}" if ttl is not None else ""
    return f'{name}{ttl_part} IN TXT "{escaped}"'


class AuthoritativeDns:
    """A throwaway NSD; ``publish()`` zones, then query it through ``resolver()``."""

    def __init__(self, *, directory: Path | None = None, ttl: int = 60) -> None:
        self.nsd = require_binary("/usr/sbin/nsd", "nsd")
        self.nsd_control = require_binary("/usr/sbin/nsd-control", "nsd")
        self.nsd_checkzone = require_binary("/usr/sbin/nsd-checkzone", "nsd")
        self.ttl = ttl
        self._own_dir = directory is None
        self.directory = directory if directory is not None else make_temp_dir("nsd")
        self.config_file = self.directory / "nsd.conf"
        self.log_file = self.directory / "nsd.log"
        self.control_socket = self.directory / "nsd.ctl"
        self.host = "127.0.0.1"
        self.port = free_port()
        self._serials: dict[str, int] = {}
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def _config(self) -> str:
        d = self.directory
        return f"""\
# Written by tests/servers/dns.py for one test session; nothing here is read from /etc.
server:
    ip-address: {self.host}
    port: {self.port}
    do-ip4: yes
    do-ip6: no
    username: ""
    chroot: ""
    zonesdir: "{d}"
    database: ""
    zonelistfile: "{d}/zone.list"
    pidfile: "{d}/nsd.pid"
    xfrdfile: "{d}/xfrd.state"
    xfrdir: "{d}"
    logfile: "{self.log_file}"
    server-count: 1
    verbosity: 1
    hide-version: yes
    zonefiles-write: 0

remote-control:
    control-enable: yes
    control-interface: "{d}/nsd.ctl"

pattern:
    name: "test"
    zonefile: "%s.zone"
"""

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> AuthoritativeDns:
        self.config_file.write_text(self._config())
        self._proc = subprocess.Popen(
            [self.nsd, "-d", "-c", str(self.config_file)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=(self.directory / "stderr.log").open("wb"),
            start_new_session=True,
        )
        register_cleanup(self)
        try:
            wait_until(
                self._answers,
                timeout=timeout,
                what=f"nsd on {self.host}:{self.port}",
                process=self._proc,
                log=self.log_text,
            )
            wait_until(
                lambda: self._control("status")[0] == 0,
                timeout=timeout,
                what="nsd remote control",
                process=self._proc,
                log=self.log_text,
            )
        except ServerFailed:
            self.stop()
            raise
        return self

    def _answers(self) -> bool:
        """True once the server answers a query at all (REFUSED for a zone it does not serve)."""
        query = dns.message.make_query("probe.invalid.", dns.rdatatype.SOA)
        try:
            dns.query.udp(query, self.host, port=self.port, timeout=0.2)
        except (dns.exception.Timeout, OSError):
            return False
        return True

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM nsd by its PID (it stops its helper processes); SIGKILL its group if stuck."""
        if self._proc is not None:
            stop_process(self._proc, timeout=timeout)
            self._proc = None
        unregister_cleanup(self)

    def cleanup(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> AuthoritativeDns:
        try:
            return self.start()
        except BaseException:
            self.cleanup()
            raise

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    # -- zones ----------------------------------------------------------------------------------

    def zone_text(self, zone: str, records: list[str], serial: int) -> str:
        """The zone file for ``zone``: $ORIGIN/$TTL, SOA, NS (with glue), then ``records``."""
        origin = zone.rstrip(".").lower() + "."
        lines = [
            f"$ORIGIN {origin}",
            f"$TTL {self.ttl}",
            f"@ IN SOA ns1.{origin} hostmaster.{origin} ( {serial} 3600 600 86400 {self.ttl} )",
            f"@ IN NS ns1.{origin}",
        ]
        if not any(r.split()[:1] in (["ns1"], [f"ns1.{origin}"]) for r in records if r.strip()):
            lines.append("ns1 IN A 127.0.0.1")
        lines += [split_long_txt(r) for r in records]
        return "\n".join(lines) + "\n"

    def publish(self, zone: str, records: list[str], timeout: float = 10.0) -> int:
        """Serve ``zone`` with ``records`` (zone-file lines, relative to the zone or absolute).

        Replaces the zone's previous contents. Returns once the server answers the new SOA
        serial, which it also returns.
        """
        name = zone.rstrip(".").lower()
        with self._lock:
            serial = self._serials.get(name, 0) + 1
            zone_file = self.directory / f"{name}.zone"
            zone_file.write_text(self.zone_text(name, records, serial))
            check = subprocess.run(
                [self.nsd_checkzone, name, str(zone_file)],
                capture_output=True,
                timeout=30,
                check=False,
            )
            if check.returncode != 0:
                raise ValueError(
                    f"zone {name} does not load: "
                    f"{(check.stdout + check.stderr).decode(errors='replace')}"
                )
            old_servers = self._server_pids()
            if name in self._serials:
                status, output = self._control("reload", name)
            else:
                status, output = self._control("addzone", name, "test")
            if status != 0:
                raise ServerFailed(f"nsd-control for {name} failed: {output}\n{self.log_text()}")
            self._serials[name] = serial
        # A reload forks new server processes while the old ones still answer from the same
        # socket for a moment: wait for the new serial, then for the old servers to be gone.
        wait_until(
            lambda: self.serial(name) == serial and not (old_servers & self._server_pids()),
            timeout=timeout,
            what=f"nsd to serve {name} serial {serial}",
            process=self._proc,
            log=self.log_text,
        )
        return serial

    def remove(self, zone: str) -> None:
        """Stop serving ``zone`` (queries for it are then REFUSED)."""
        name = zone.rstrip(".").lower()
        with self._lock:
            old_servers = self._server_pids()
            status, output = self._control("delzone", name)
            if status != 0:
                raise ServerFailed(f"nsd-control delzone {name} failed: {output}")
            self._serials.pop(name, None)
        wait_until(
            lambda: self.serial(name) is None and not (old_servers & self._server_pids()),
            timeout=10.0,
            what=f"nsd to drop {name}",
            process=self._proc,
        )

    def _server_pids(self) -> set[int]:
        """Live (non-zombie) processes of this NSD below its first two levels.

        NSD's first process and its direct children (xfrd, the server parent) live as long as
        it does; the ones below them are the query-answering servers that a reload replaces.
        """
        if self._proc is None:
            return set()
        group = self._proc.pid
        parents: dict[int, int] = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            state, ppid, pgrp = fields[0], int(fields[1]), int(fields[2])
            if pgrp == group and state != "Z":
                parents[int(entry.name)] = ppid
        stable = {group} | {pid for pid, ppid in parents.items() if ppid == group}
        return set(parents) - stable

    def serial(self, zone: str) -> int | None:
        """The SOA serial the server answers for ``zone`` now, or None if it does not."""
        query = dns.message.make_query(zone.rstrip(".") + ".", dns.rdatatype.SOA)
        try:
            response = dns.query.udp(query, self.host, port=self.port, timeout=0.5)
        except (dns.exception.Timeout, OSError):
            return None
        for rrset in response.answer:
            if rrset.rdtype == dns.rdatatype.SOA:
                return int(rrset[0].serial)
        return None

    def _control(self, *args: str) -> tuple[int, str]:
        result = subprocess.run(
            [self.nsd_control, "-c", str(self.config_file), *args],
            capture_output=True,
            timeout=30,
            check=False,
        )
        return result.returncode, (result.stdout + result.stderr).decode(errors="replace")

    # -- clients --------------------------------------------------------------------------------

    def resolver(self, timeout: float = 2.0) -> dns.resolver.Resolver:
        """A dnspython resolver that asks only this server (no /etc/resolv.conf, no cache)."""
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = [self.host]
        resolver.port = self.port
        resolver.timeout = timeout
        resolver.lifetime = timeout
        return resolver

    def log_text(self) -> str:
        return read_text(self.log_file) + read_text(self.directory / "stderr.log")
