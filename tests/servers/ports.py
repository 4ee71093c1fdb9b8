"""Free loopback ports, and waiting (by polling with a deadline) until something listens on one.

A port from :func:`free_port` was free for both TCP and UDP on 127.0.0.1 a moment ago; the
server that is handed it binds it shortly after, which is race-prone only in theory on a test box.
"""

from __future__ import annotations

import socket
import time


def free_port() -> int:
    """A port number free on 127.0.0.1 for both TCP and UDP (DNS servers need both)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            tcp.bind(("127.0.0.1", 0))
            port: int = tcp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind(("127.0.0.1", port))
                except OSError:
                    continue
            return port
    raise RuntimeError("no free port found on 127.0.0.1")


def port_open(host: str, port: int, timeout: float = 0.2) -> bool:
    """True if a TCP connection to host:port succeeds right now."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_for_port(host: str, port: int, deadline: float) -> None:
    """Wait until host:port accepts TCP connections; ``deadline`` is a ``time.monotonic()`` value.

    Raises TimeoutError if nothing listens by then.
    """
    while not port_open(host, port):
        if time.monotonic() >= deadline:
            raise TimeoutError(f"nothing listens on {host}:{port}")
        time.sleep(0.02)
