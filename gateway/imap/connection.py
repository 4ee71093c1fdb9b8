"""One IMAP session, blocking: the thin wrapper that owns an IMAPClient and speaks for the engine.

:class:`ConnectionFactory` opens sessions (TLS per the account's choice, one shared SSL context
per trust policy, TCP keepalive on, LOGIN, ``ENABLE QRESYNC`` when offered) and turns every
failure into a sentence a user can act on (:mod:`gateway.imap.errors`). :class:`ImapConnection`
offers exactly the commands sync needs, each read-only unless its name says otherwise: folders
with their RFC 6154 special-use flags, STATUS, EXAMINE (RFC 3501 §6.3.2, so nothing is ever marked
read) with RFC 7162 QRESYNC, UID SEARCH with RFC 4731 ESEARCH, header scans and body fetches
through the cheap path of :mod:`gateway.imap.headers`, and RFC 2177 IDLE split into start / poll
/ done so the waiting can happen in the event loop instead of a thread. Every method is called
from a worker thread, one at a time per connection.
"""

from __future__ import annotations

import contextlib
import imaplib
import logging
import re
import socket
import ssl
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import date
from functools import wraps
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from imapclient import IMAPClient
from imapclient.exceptions import IMAPClientError, LoginError
from imapclient.imapclient import SocketTimeout

from gateway.imap.errors import (
    AuthFailed,
    ConnectFailed,
    ImapError,
    ServerError,
    Throttled,
    TlsFailed,
    classify_login_failure,
    is_throttling,
    server_text,
)
from gateway.imap.headers import SCAN_ITEM, HeaderRecord, parse_bodies, parse_scan
from gateway.imap.presets import GENERIC_APP_PASSWORD_HINT, GENERIC_IMAP_DISABLED_HINT, Security

log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")

# RFC 6154 special-use attributes, and the names servers without SPECIAL-USE use for them.
SPECIAL_USES = ("\\Sent", "\\Trash", "\\Junk", "\\Archive", "\\Drafts", "\\All", "\\Flagged")
_NAMED = {
    "\\Sent": ("sent", "sent items", "sent messages", "sent mail", "[gmail]/sent mail"),
    "\\Trash": ("trash", "deleted items", "deleted messages", "bin", "[gmail]/trash"),
    "\\Junk": ("junk", "spam", "junk e-mail", "junk email", "bulk mail", "[gmail]/spam"),
    "\\Archive": ("archive", "archives"),
    "\\Drafts": ("drafts", "draft", "[gmail]/drafts"),
}
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
# Where Dovecot's push_notification "ox" driver looks for who wants news of a mailbox.
PUSH_METADATA = "/private/vendor/vendor.dovecot/http-notify"
_CHANGE_RESPONSES = ("EXISTS", "EXPUNGE", "VANISHED", "RECENT")
_ESEARCH_ALL = re.compile(rb"\bALL ([0-9:,]+)")
_VANISHED = re.compile(rb"([0-9:,]+)\s*$")
_COUNT_LINE = re.compile(rb"\* (\d+) (EXISTS|EXPUNGE|RECENT)\b", re.IGNORECASE)
_CHANGE_LINE = re.compile(rb"\* (?:\d+ (?:EXISTS|EXPUNGE|RECENT)|VANISHED)\b", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where and how to log in; ``hints`` are the provider's sentences for refused logins."""

    host: str
    port: int
    security: Security
    username: str
    allow_unverified_certificate: bool = False
    oauth: bool = False  # the secret is an OAuth access token, sent as SASL XOAUTH2
    app_password_hint: str = GENERIC_APP_PASSWORD_HINT
    imap_disabled_hint: str = GENERIC_IMAP_DISABLED_HINT


@dataclass(frozen=True, slots=True)
class FolderInfo:
    name: str
    special_use: str | None
    selectable: bool


@dataclass(frozen=True, slots=True)
class FolderStatus:
    uidvalidity: int
    uidnext: int | None
    messages: int
    highest_modseq: int | None


@dataclass(slots=True)
class Selected:
    """The selected folder's state: what EXAMINE said, kept current by what the server reports.

    ``vanished`` holds RFC 7162 VANISHED UIDs (QRESYNC only): ``(EARLIER)`` ones from EXAMINE,
    then those announced while the folder stays selected (during IDLE, after commands).
    ``expunged`` says an RFC 3501 EXPUNGE (a sequence number, no UID) came in meanwhile.
    ``reused`` marks a state taken over from the open session instead of a new EXAMINE.
    """

    name: str
    uidvalidity: int
    uidnext: int | None
    exists: int
    highest_modseq: int | None
    vanished: UidSet = field(default_factory=lambda: UidSet([]))
    expunged: bool = False
    reused: bool = False


class UidSet:
    """A set of UIDs kept as sorted inclusive ranges, so a million UIDs cost a few tuples."""

    def __init__(self, ranges: Iterable[tuple[int, int]]) -> None:
        merged: list[tuple[int, int]] = []
        for lo, hi in sorted(ranges):
            if merged and lo <= merged[-1][1] + 1:
                merged[-1] = (merged[-1][0], max(hi, merged[-1][1]))
            else:
                merged.append((lo, hi))
        self.ranges = merged

    @classmethod
    def of(cls, uids: Iterable[int]) -> UidSet:
        return cls((u, u) for u in uids)

    @classmethod
    def parse(cls, text: str) -> UidSet:
        """From an RFC 3501 sequence-set of UIDs (no ``*``)."""
        ranges = []
        for part in text.split(","):
            if not part:
                continue
            lo, _, hi = part.partition(":")
            a, b = int(lo), int(hi or lo)
            ranges.append((min(a, b), max(a, b)))
        return cls(ranges)

    def __len__(self) -> int:
        return sum(hi - lo + 1 for lo, hi in self.ranges)

    def __bool__(self) -> bool:
        return bool(self.ranges)

    def __contains__(self, uid: object) -> bool:
        return isinstance(uid, int) and any(lo <= uid <= hi for lo, hi in self.ranges)

    def __iter__(self) -> Iterator[int]:
        for lo, hi in self.ranges:
            yield from range(lo, hi + 1)

    def above(self, floor: int) -> UidSet:
        """Only UIDs greater than ``floor``."""
        return UidSet((max(lo, floor + 1), hi) for lo, hi in self.ranges if hi > floor)

    def chunks(self, size: int) -> Iterator[UidSet]:
        """Consecutive pieces of at most ``size`` UIDs each, in ascending order."""
        piece: list[tuple[int, int]] = []
        room = size
        for lo, hi in self.ranges:
            while lo <= hi:
                take = min(room, hi - lo + 1)
                piece.append((lo, lo + take - 1))
                lo += take
                room -= take
                if room == 0:
                    yield UidSet(piece)
                    piece, room = [], size
        if piece:
            yield UidSet(piece)

    @property
    def max(self) -> int:
        return self.ranges[-1][1] if self.ranges else 0

    def __str__(self) -> str:
        return ",".join(f"{lo}" if lo == hi else f"{lo}:{hi}" for lo, hi in self.ranges)

    def __repr__(self) -> str:
        return f"UidSet({self})"


def imap_date(day: date) -> str:
    """RFC 3501 date (``1-Feb-1994``), independent of the process locale."""
    return f"{day.day}-{_MONTHS[day.month - 1]}-{day.year}"


def _translated(method: Callable[P, T]) -> Callable[P, T]:
    """Turn socket and protocol errors into :class:`ImapError` sentences."""

    @wraps(method)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return method(*args, **kwargs)
        except ImapError:
            raise
        except TimeoutError:
            raise ServerError(
                "the server stopped answering (no reply within the command timeout); "
                "the connection was dropped and will be opened again"
            ) from None
        except (imaplib.IMAP4.abort, EOFError, OSError) as exc:
            text = server_text(exc)
            if is_throttling(text):
                raise Throttled(f"the provider is limiting connections ({text})") from None
            raise ServerError(f"the connection to the server was lost ({text})") from None
        except (imaplib.IMAP4.error, IMAPClientError) as exc:
            text = server_text(exc)
            if is_throttling(text):
                raise Throttled(f"the provider is limiting us ({text})") from None
            raise ServerError(f"the server refused a command ({text})") from None

    return wrapper


class ConnectionFactory:
    """Opens :class:`ImapConnection` sessions; holds the shared TLS contexts and timeouts.

    One SSL context per trust policy is shared by every connection: a context holding the
    system's CA store costs about a megabyte, which hundreds of accounts must not each pay.
    """

    def __init__(
        self,
        *,
        ca_file: Path | None = None,
        connect_timeout: float = 20.0,
        command_timeout: float = 120.0,
        keepalive_seconds: int = 60,
    ) -> None:
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self.keepalive_seconds = keepalive_seconds
        # The system's CAs plus ``ca_file``; also what OAuth token requests verify with.
        self.verified = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        if ca_file is not None:
            self.verified.load_verify_locations(cafile=str(ca_file))
        self._unverified = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        self._unverified.check_hostname = False
        self._unverified.verify_mode = ssl.CERT_NONE

    def open(self, endpoint: Endpoint, password: str) -> ImapConnection:
        """Connect, secure, log in; raises an :class:`ImapError` with the reason in words."""
        context = self._unverified if endpoint.allow_unverified_certificate else self.verified
        where = f"{endpoint.host}:{endpoint.port}"
        try:
            client = IMAPClient(
                endpoint.host,
                endpoint.port,
                ssl=endpoint.security == "ssl",
                ssl_context=context,
                timeout=SocketTimeout(self.connect_timeout, self.command_timeout),
            )
        except Exception as exc:
            raise self._connect_error(exc, endpoint) from None
        # imapclient turns on imaplib's debug output (every line, LOGIN included) into its
        # logger; we never want protocol lines with credentials anywhere near a log.
        client._imap.debug = 0
        try:
            if endpoint.security == "starttls":
                if b"STARTTLS" not in client.capabilities():
                    raise TlsFailed(
                        f"{where} does not offer STARTTLS; choose ssl (usually port 993) "
                        "or check the port"
                    )
                try:
                    client.starttls(context)
                except (ssl.SSLError, OSError, IMAPClientError) as exc:
                    raise self._connect_error(exc, endpoint) from None
            self._keepalive(client)
            self._login(client, endpoint, password)
            connection = ImapConnection(client, endpoint)
            if connection.has("QRESYNC"):
                # RFC 7162 §3.2.3: QRESYNC must be enabled before SELECT/EXAMINE may use it.
                connection.enable_qresync()
            return connection
        except BaseException:
            with contextlib.suppress(Exception):
                client.shutdown()
            raise

    def _login(self, client: IMAPClient, endpoint: Endpoint, password: str) -> None:
        try:
            if endpoint.oauth:
                client.oauth2_login(endpoint.username, password)
            else:
                client.login(endpoint.username, password)
        except LoginError as exc:
            text = server_text(exc)
            if endpoint.oauth:
                raise AuthFailed(
                    f"{endpoint.host} refused the OAuth sign-in ({text}); authorize the "
                    "mailbox again"
                ) from None
            if "PRIVACYREQUIRED" in text or "Plaintext authentication disallowed" in text:
                raise TlsFailed(
                    f"the server accepts passwords only over TLS ({text}); "
                    "choose ssl or starttls as the encryption"
                ) from None
            raise classify_login_failure(
                text,
                app_password_hint=endpoint.app_password_hint,
                disabled_hint=endpoint.imap_disabled_hint,
            ) from None
        except (imaplib.IMAP4.abort, OSError) as exc:
            text = server_text(exc)
            if is_throttling(text):
                raise Throttled(f"the provider is limiting logins ({text})") from None
            raise ServerError(f"the connection dropped while logging in ({text})") from None
        finally:
            # imaplib keeps the last commands (LOGIN with its password) in a debug ring buffer.
            log_buffer = getattr(client._imap, "_cmd_log", None)
            if isinstance(log_buffer, dict):
                log_buffer.clear()

    def _keepalive(self, client: IMAPClient) -> None:
        """TCP keepalive, so a peer that vanished while we IDLE is noticed within minutes."""
        sock = client._imap.sock
        with contextlib.suppress(OSError, AttributeError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, self.keepalive_seconds)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 15)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 4)

    def _connect_error(self, exc: BaseException, endpoint: Endpoint) -> ImapError:
        host, where = endpoint.host, f"{endpoint.host}:{endpoint.port}"
        if isinstance(exc, socket.gaierror):
            return ConnectFailed(
                f"the server name {host} was not found ({exc.strerror}); check the host name"
            )
        if isinstance(exc, ssl.SSLCertVerificationError):
            return TlsFailed(
                f"the TLS certificate of {host} could not be verified ({exc.verify_message}); "
                "check the host name, or for your own server with a self-signed certificate "
                "switch on 'allow an unverified certificate' (not recommended)"
            )
        if isinstance(exc, ssl.SSLError):
            return TlsFailed(
                f"the TLS handshake with {where} failed ({exc.reason or exc}); check the "
                "encryption setting (port 993 usually means ssl, 143 starttls)"
            )
        if isinstance(exc, ConnectionRefusedError):
            return ConnectFailed(f"{host} refused the connection on port {endpoint.port}")
        if isinstance(exc, TimeoutError):
            hint = (
                "; if the port expects implicit TLS (993), choose ssl"
                if endpoint.security != "ssl"
                else ""
            )
            return ConnectFailed(
                f"no answer from {where} within {self.connect_timeout:g} s; check the host, "
                f"the port and any firewall{hint}"
            )
        if isinstance(exc, OSError):
            return ConnectFailed(f"cannot connect to {where} ({exc.strerror or exc})")
        text = server_text(exc)
        if is_throttling(text):
            return Throttled(f"{host} is limiting connections ({text})")
        return ServerError(f"{where} did not greet as an IMAP server ({text})")


class ImapConnection:
    """A logged-in IMAP session; all methods block and raise :class:`ImapError`."""

    def __init__(self, client: IMAPClient, endpoint: Endpoint) -> None:
        self.client = client
        self.endpoint = endpoint
        self.capabilities = frozenset(c.decode().upper() for c in client.capabilities())
        self.qresync = False
        self.selected: str | None = None
        self.selection: Selected | None = None
        self.changed = False  # unsolicited EXISTS/EXPUNGE/VANISHED seen since last looked at
        self._imap: Any = client._imap

    def has(self, capability: str) -> bool:
        return capability.upper() in self.capabilities

    @property
    def condstore(self) -> bool:
        return self.has("CONDSTORE") or self.qresync

    @_translated
    def register_push(self, token: str | None) -> bool:
        """Ask the server to push news of this mailbox to us (Dovecot's ``ox`` driver reads this
        METADATA entry, RFC 5464, and sends ``token`` as the ``user`` of each notification);
        ``None`` withdraws the request. False when the server has no METADATA or refuses: IDLE
        and polling still work."""
        if not self.has("METADATA"):
            return False
        if token is None:
            value = b"NIL"
        else:
            value = b'"user=' + token.replace("\\", "").replace('"', "").encode() + b'"'
        entry = b"(" + PUSH_METADATA.encode() + b" " + value + b")"
        typ, _data = self.client._raw_command(b"SETMETADATA", [b'""', entry], uid=False)
        return bool(typ == "OK")

    @_translated
    def enable_qresync(self) -> None:
        self.qresync = b"QRESYNC" in [c.upper() for c in self.client.enable("QRESYNC")]

    # -- folders ---------------------------------------------------------------------------

    @_translated
    def list_folders(self) -> list[FolderInfo]:
        """Every folder with its RFC 6154 special use (guessed from well-known names without it)."""
        out = []
        for flags, _delimiter, name in self.client.list_folders():
            names = {f.decode() if isinstance(f, bytes) else str(f) for f in flags}
            lowered = {f.lower() for f in names}
            special = next((s for s in SPECIAL_USES if s.lower() in lowered), None)
            if special is None and not self.has("SPECIAL-USE"):
                special = next((s for s, known in _NAMED.items() if name.lower() in known), None)
            selectable = not ({"\\noselect", "\\nonexistent"} & lowered)
            out.append(FolderInfo(name=name, special_use=special, selectable=selectable))
        return out

    @_translated
    def status(self, folder: str) -> FolderStatus:
        """STATUS (RFC 3501 §6.3.10): cheap, and does not select the folder."""
        items = ["MESSAGES", "UIDNEXT", "UIDVALIDITY"]
        if self.condstore:
            items.append("HIGHESTMODSEQ")  # RFC 7162 §3.1.6
        found = self.client.folder_status(folder, items)
        self._drain()
        uidnext = found.get(b"UIDNEXT")
        modseq = found.get(b"HIGHESTMODSEQ")
        return FolderStatus(
            uidvalidity=int(found[b"UIDVALIDITY"]),
            uidnext=int(uidnext) if uidnext else None,
            messages=int(found.get(b"MESSAGES", 0)),
            highest_modseq=int(modseq) if modseq else None,
        )

    @_translated
    def examine(self, folder: str, *, known: tuple[int, int] | None = None) -> Selected:
        """EXAMINE (read-only SELECT): never changes flags, not even ``\\Recent``.

        With QRESYNC and a known ``(uidvalidity, modseq)``, RFC 7162 §3.2.5 has the server list
        the UIDs expunged since then as ``VANISHED (EARLIER)`` in the same round trip.
        """
        imap = self._imap
        imap.untagged_responses = {}
        name = self.client._normalise_folder(folder)
        args = [name]
        if self.qresync and known is not None:
            args.append(f"(QRESYNC ({known[0]} {known[1]}))")
        typ, data = imap._simple_command("EXAMINE", *args)
        if typ != "OK":
            raise ServerError(f"cannot open the folder {folder!r} ({server_text(data[-1])})")
        imap.state = "SELECTED"  # imaplib tracks state only for its own select()
        self.selected = folder
        untagged = imap.untagged_responses
        imap.untagged_responses = {}

        def number(key: str) -> int | None:
            values = untagged.get(key)
            try:
                return int(values[-1]) if values else None
            except ValueError:
                return None

        vanished = UidSet([])
        for line in untagged.get("VANISHED", []):
            found = _VANISHED.search(line)
            if found:
                vanished = UidSet(vanished.ranges + UidSet.parse(found.group(1).decode()).ranges)
        uidvalidity = number("UIDVALIDITY")
        if uidvalidity is None:
            raise ServerError(f"the server gave no UIDVALIDITY for {folder!r} (RFC 3501 §2.3.1.1)")
        self.changed = False
        selected = Selected(
            name=folder,
            uidvalidity=uidvalidity,
            uidnext=number("UIDNEXT"),  # may be missing on some servers: we never rely on it
            exists=number("EXISTS") or 0,
            highest_modseq=number("HIGHESTMODSEQ"),  # absent with NOMODSEQ (RFC 7162 §3.1.2.2)
            vanished=vanished,
        )
        # What comes later (EXISTS, VANISHED, EXPUNGE) is tracked on a copy of our own.
        self.selection = Selected(
            name=folder,
            uidvalidity=uidvalidity,
            uidnext=None,
            exists=selected.exists,
            highest_modseq=None,
        )
        return selected

    def reuse_selection(self, folder: str) -> Selected | None:
        """The state of ``folder`` if it is still selected, with the news since last asked.

        While a folder stays selected its UIDVALIDITY cannot change (RFC 3501 §2.3.1.1), and the
        server reports new mail (EXISTS) and removals (EXPUNGE, or VANISHED under QRESYNC) on its
        own: after IDLE there is no need for another EXAMINE, which costs a large folder tens of
        milliseconds at the server.
        """
        current = self.selection
        if current is None or self.selected != folder:
            return None
        self.selection = Selected(
            name=folder,
            uidvalidity=current.uidvalidity,
            uidnext=None,
            exists=current.exists,
            highest_modseq=None,
        )
        current.reused = True
        self.changed = False
        return current

    # -- finding messages ------------------------------------------------------------------

    @_translated
    def search(self, criteria: str) -> UidSet:
        """``UID SEARCH criteria`` as a :class:`UidSet`; ESEARCH (RFC 4731) keeps replies small."""
        imap = self._imap
        if self.has("ESEARCH"):
            typ, data = imap.uid("SEARCH", "RETURN (ALL)", criteria)
            self._check(typ, data, "SEARCH")
            lines = imap.untagged_responses.pop("ESEARCH", [])
            result = UidSet([])
            for line in lines:
                found = _ESEARCH_ALL.search(line)
                if found:
                    result = UidSet(result.ranges + UidSet.parse(found.group(1).decode()).ranges)
        else:
            typ, data = imap.uid("SEARCH", criteria)
            self._check(typ, data, "SEARCH")
            result = UidSet.of(int(u) for line in data if line for u in line.split())
        self._drain()
        return result

    def new_uids(self, after: int, *, since: date | None = None) -> UidSet:
        """UIDs above ``after`` (optionally with an internal date on or after ``since``).

        ``UID n:*`` always matches the highest UID even when it is below n (RFC 3501 §6.4.8: a
        range's ends may come in either order), so the answer is filtered, not trusted.
        """
        criteria = f"UID {after + 1}:*"
        if since is not None:
            criteria += f" SINCE {imap_date(since)}"
        return self.search(criteria).above(after)

    @_translated
    def fetch_headers(self, uids: UidSet) -> list[HeaderRecord]:
        """The scan fields of ``uids``; UIDs expunged meanwhile are simply missing."""
        typ, data = self._imap.uid("FETCH", str(uids), f"(UID RFC822.SIZE {SCAN_ITEM})")
        self._check(typ, data, "FETCH", tolerate_no=True)
        self._drain()
        return parse_scan(data)

    @_translated
    def fetch_bodies(self, uids: UidSet) -> dict[int, bytes]:
        """Whole messages by UID, with ``BODY.PEEK[]`` (RFC 3501 §6.4.5: no ``\\Seen``)."""
        typ, data = self._imap.uid("FETCH", str(uids), "(UID BODY.PEEK[])")
        self._check(typ, data, "FETCH", tolerate_no=True)
        self._drain()
        return parse_bodies(data)

    @_translated
    def find_message_ids(self, folder: str, message_ids: Iterable[str]) -> dict[str, int]:
        """Which of ``message_ids`` (without <>) are in ``folder``, and at which UID."""
        self.examine(folder)
        found: dict[str, int] = {}
        for message_id in message_ids:
            quoted = '"<' + message_id.replace("\\", "\\\\").replace('"', '\\"') + '>"'
            uids = self.search(f"HEADER Message-ID {quoted}")
            if uids:
                found[message_id] = uids.max
        return found

    # -- changing the mailbox (only for actions the account allows) -------------------------

    @_translated
    def move(self, folder: str, uids: UidSet, destination: str) -> None:
        """Move messages (RFC 6851 MOVE; COPY + \\Deleted + UID EXPUNGE of RFC 4315 without)."""
        self.client.select_folder(folder)  # read-write: this is the one place we change things
        self.selected = folder
        self.selection = None
        ids = list(uids)
        if self.has("MOVE"):
            self.client.move(ids, destination)
        else:
            self.client.copy(ids, destination)
            self.client.add_flags(ids, [b"\\Deleted"], silent=True)
            if self.has("UIDPLUS"):
                self.client.uid_expunge(ids)
            else:
                self.client.expunge()
        self._drain()

    @_translated
    def append(self, folder: str, raw: bytes, *, seen: bool = True) -> None:
        self.client.append(folder, raw, flags=(b"\\Seen",) if seen else ())
        self._drain()

    # -- IDLE (RFC 2177) -------------------------------------------------------------------

    @_translated
    def idle_start(self) -> None:
        self.client.idle()

    def fileno(self) -> int:
        return int(self._imap.sock.fileno())

    def buffered(self) -> bool:
        """True if something is ready to read: bytes in our buffers, on the socket, or EOF."""
        return self._probe() != "none"

    def _probe(self) -> str:
        """``"data"``, ``"none"`` or ``"eof"``, without blocking.

        imaplib reads through a BufferedReader (over an SSL socket with its own buffer), so bytes
        that arrived together with the IDLE continuation may already sit where polling the socket
        cannot see them; a non-blocking ``peek`` looks in the buffers first and reads the socket
        only when they are empty.
        """
        sock = self._imap.sock
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return "data"
        sock.setblocking(False)
        try:
            try:
                got = self._imap.file.peek(1)
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
                return "none"  # an SSL socket with nothing to read
            except (ValueError, OSError):
                return "eof"
            if got:
                return "data"
            if isinstance(sock, ssl.SSLSocket):
                return "eof"  # a non-blocking SSL read returns b"" only at EOF
            try:  # a plain socket answers b"" both for "nothing yet" and EOF: ask it directly
                return "eof" if sock.recv(1, socket.MSG_PEEK) == b"" else "data"
            except BlockingIOError:
                return "none"
            except OSError:
                return "eof"
        finally:
            with contextlib.suppress(OSError):
                sock.settimeout(self.client._timeout.read)

    @_translated
    def idle_poll(self) -> tuple[bool, bool]:
        """Read what the server sent while idling: ``(mailbox changed, connection closed)``.

        Servers send ``* OK Still here`` keepalives and flag updates too; only EXISTS, EXPUNGE,
        VANISHED and RECENT mean new work. A BYE or EOF means the session is over.
        """
        changed = closed = False
        for _ in range(10_000):  # bounded: a flood of notifications must not pin a thread
            state = self._probe()
            if state == "none":
                break
            if state == "eof":
                closed = True
                break
            try:
                line = self._imap._get_line()
            except imaplib.IMAP4.abort:
                closed = True
                break
            if line.startswith(b"* BYE"):
                closed = True
                break
            if _CHANGE_LINE.match(line):
                changed = True
                self._note(line)
        return changed, closed

    @_translated
    def idle_done(self) -> bool:
        """End IDLE; True if the mailbox changed meanwhile. A dead peer raises (read timeout)."""
        _text, responses = self.client.idle_done()
        self._drain()  # what came before the tagged reply was kept by imaplib: note it
        return any(_is_change(r) for r in responses)

    @_translated
    def noop(self) -> bool:
        _text, responses = self.client.noop()
        return any(_is_change(r) for r in responses)

    def logout(self) -> None:
        with contextlib.suppress(Exception):
            self.client.logout()
        with contextlib.suppress(Exception):
            self.client.shutdown()

    # -- internals -------------------------------------------------------------------------

    def _check(self, typ: str, data: list[Any], command: str, *, tolerate_no: bool = False) -> None:
        if typ == "OK" or (typ == "NO" and tolerate_no):
            # A NO to UID FETCH means some messages were expunged meanwhile (RFC 5530
            # EXPUNGEISSUED); what did come back is still good.
            return
        text = server_text(data[-1] if data else b"")
        if is_throttling(text):
            raise Throttled(f"the provider is limiting us ({text})")
        raise ServerError(f"the server refused {command} ({text})")

    def _drain(self) -> None:
        """Consume unsolicited responses imaplib keeps per command (RFC 3501 §7), so they cannot
        pile up over a long session, and note what they say about the selected folder."""
        untagged = self._imap.untagged_responses
        expunges = untagged.pop("EXPUNGE", [])
        vanished = untagged.pop("VANISHED", [])
        exists = untagged.pop("EXISTS", [])
        if untagged.pop("RECENT", None) or expunges or vanished or exists:
            self.changed = True
        untagged.pop("FETCH", None)  # flag updates of other messages: not our business
        selection = self.selection
        if selection is None:
            return
        if expunges:
            selection.expunged = True
            selection.exists -= len(expunges)
        for line in vanished:
            if not line.upper().startswith(b"(EARLIER)"):
                self._vanish(selection, line)
        if exists:
            # The last EXISTS is the count after everything before it (RFC 3501 §7.3.1).
            selection.exists = int(exists[-1])

    def _note(self, line: bytes) -> None:
        """Track one untagged line read while idling."""
        selection = self.selection
        found = _COUNT_LINE.match(line)
        if selection is None:
            return
        if found is not None:
            number, what = int(found.group(1)), found.group(2).upper()
            if what == b"EXISTS":
                selection.exists = number
            elif what == b"EXPUNGE":
                selection.expunged = True
                selection.exists -= 1
        elif line.upper().startswith(b"* VANISHED ") and b"(EARLIER)" not in line.upper():
            self._vanish(selection, line[len(b"* VANISHED ") :])

    @staticmethod
    def _vanish(selection: Selected, text: bytes) -> None:
        found = _VANISHED.search(text.strip())
        if found:
            uids = UidSet.parse(found.group(1).decode())
            selection.vanished = UidSet(selection.vanished.ranges + uids.ranges)
            selection.exists -= len(uids)


def _is_change(response: Any) -> bool:
    """EXISTS, EXPUNGE, VANISHED or RECENT: the mailbox's content changed."""
    if not isinstance(response, tuple) or len(response) < 2:
        return False
    names = {response[0], response[1]}
    return any(
        isinstance(n, bytes) and n.upper() in (b"EXISTS", b"EXPUNGE", b"VANISHED", b"RECENT")
        for n in names
    )
