"""A throwaway certificate authority (from ``trustme``) for the test servers' TLS.

One :class:`TestCA` per session issues a server certificate for ``localhost`` and ``127.0.0.1``,
written to PEM files that Dovecot, Postfix and aiosmtpd can load, and hands out client
``ssl.SSLContext`` objects that trust it (and nothing else).
"""

from __future__ import annotations

import shutil
import ssl
from dataclasses import dataclass
from pathlib import Path

import trustme

from tests.servers._process import make_temp_dir


@dataclass(frozen=True)
class CertFiles:
    """PEM files of one issued certificate: the chain (leaf first) and its private key."""

    cert: Path
    key: Path


class TestCA:
    """A session-wide test CA with one ready-made server certificate (``server``).

    Files live in ``directory`` (a fresh temp dir by default, world-readable so that servers
    running as their own users can read them; the keys are test keys).
    """

    __test__ = False  # not a pytest test class, despite the name

    def __init__(self, directory: Path | None = None) -> None:
        self._own_dir = directory is None
        self.directory = directory if directory is not None else make_temp_dir("ca")
        self.ca = trustme.CA(organization_name="Mailgate test CA")
        self.ca_file = self.directory / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        self._issued = 0
        self.server = self.issue("localhost", "127.0.0.1")

    def issue(self, *names: str) -> CertFiles:
        """Issue a certificate for ``names`` (host names or IP addresses) and write its files."""
        self._issued += 1
        leaf = self.ca.issue_cert(*names)
        cert = self.directory / f"cert{self._issued}.pem"
        key = self.directory / f"key{self._issued}.pem"
        with cert.open("wb") as out:
            for blob in leaf.cert_chain_pems:
                out.write(blob.bytes())
        leaf.private_key_pem.write_to_path(str(key))
        key.chmod(0o644)
        return CertFiles(cert=cert, key=key)

    def client_context(self) -> ssl.SSLContext:
        """A client context that verifies servers against this CA only."""
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        ctx.load_verify_locations(cafile=str(self.ca_file))
        return ctx

    def server_context(self, files: CertFiles | None = None) -> ssl.SSLContext:
        """A server context presenting ``files`` (default: the localhost certificate)."""
        chosen = files if files is not None else self.server
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(str(chosen.cert), str(chosen.key))
        return ctx

    def cleanup(self) -> None:
        """Remove the files (only if this object made the directory)."""
        if self._own_dir:
            shutil.rmtree(self.directory, ignore_errors=True)
