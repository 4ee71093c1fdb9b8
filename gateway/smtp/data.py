"""Reading the DATA section in large pieces instead of line by line.

aiosmtpd reads DATA one line at a time, with its stream limit at 1,001 bytes, so a 10 KB message
costs about 140 ``readuntil`` calls and several pauses and resumes of the socket, and a 25 MB one
keeps a bytearray object per line until the end. This reader asks the stream for everything up to
the next ``.<CRLF>`` (at most :data:`PIECE` bytes at a time) and does the per-line work in bulk
over each piece: the end of data, the line-length limit, the size limit and dot-unstuffing.

The rules are exactly aiosmtpd 1.4.6's (the release without the smuggling flaw):

- lines end only at CRLF (RFC 5321 §2.3.8), and data ends only at a line that is exactly
  ``.<CRLF>``: ``<LF>.<LF>``, ``<CR>.<CR>`` and the like are data, which the content policy then
  refuses as bare line endings, so a smuggled second message can never start;
- a line longer than 1,001 bytes with its CRLF gives "500 line too long" and more data than
  the size limit gives "552", both only after the whole section was read (RFC 5321 §4.2.5), and
  the data is dropped as soon as the reply is decided, so a large refusal holds no memory;
- a leading dot is removed from every line that has one (RFC 5321 §4.5.2).

Nothing after the end of data is read: a client that pipelines its next command (RFC 2920) finds
it still in the stream for the command loop.
"""

from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass

LINE_LIMIT = 1001  # aiosmtpd's line_length_limit: bytes per line including its CRLF
PIECE = 256 * 1024  # at most this much is searched and kept per read while the end is not seen
_END = b".\r\n"


class DataState(enum.Enum):
    COMPLETE = "complete"
    TOO_LONG = "too-long"  # a line over LINE_LIMIT
    TOO_MUCH = "too-much"  # more than the size limit
    LOST = "lost"  # the connection ended before the end of data


@dataclass(frozen=True, slots=True)
class DataResult:
    state: DataState
    content: bytes = b""  # unstuffed, only when COMPLETE


def _unstuff(piece: bytes, before: bytes) -> bytes:
    """``piece`` without the leading dot of each line that starts in it; ``before`` holds the
    (up to two) bytes of data that came just before it, to see lines that start at its edge."""
    out = piece.replace(b"\r\n.", b"\r\n")
    if piece[:1] == b"." and before[-2:] == b"\r\n":
        out = out[1:]
    elif piece[:2] == b"\n." and before[-1:] == b"\r":
        out = out[:1] + out[2:]
    return out


class _Lines:
    """Tracks the longest line across pieces: only the unfinished last line is carried over."""

    __slots__ = ("carry", "too_long")

    def __init__(self) -> None:
        self.carry = b""
        self.too_long = False

    def feed(self, piece: bytes) -> None:
        if self.too_long:
            return
        if self.carry:
            piece = self.carry + piece
        if len(piece) <= LINE_LIMIT - 2:
            self.carry = piece  # shorter than any over-long line: nothing to split yet
            return
        lines = piece.split(b"\r\n")
        self.carry = lines.pop()
        # A complete line of more than LINE_LIMIT - 2 bytes is too long with its CRLF; the
        # unfinished one may still end in the CR of its CRLF, hence one byte more.
        if (lines and max(map(len, lines)) > LINE_LIMIT - 2) or len(self.carry) > LINE_LIMIT - 1:
            self.too_long = True
            self.carry = b""


async def read_data(reader: asyncio.StreamReader, *, size_limit: int | None) -> DataResult:
    """Read one DATA section from ``reader`` (after our 354) up to and including ``.<CRLF>``."""
    # The stream's limit is aiosmtpd's line limit, which would make every read stop at 1 KB
    # and pause the socket at 2 KB; it is raised for the section and restored for commands.
    limit = reader._limit  # type: ignore[attr-defined]
    reader._limit = PIECE  # type: ignore[attr-defined]
    try:
        return await _read(reader, size_limit)
    finally:
        reader._limit = limit  # type: ignore[attr-defined]


async def _read(reader: asyncio.StreamReader, size_limit: int | None) -> DataResult:
    pieces: list[bytes] = []
    size = 0  # data bytes so far, as sent (dot-stuffed), without the final ".<CRLF>"
    before = b"\r\n"  # the CRLF that ended the DATA command: the first line starts a line
    lines = _Lines()
    state = DataState.COMPLETE  # the first problem seen decides the reply, as in aiosmtpd
    while True:
        try:
            piece = await reader.readuntil(_END)
        except asyncio.LimitOverrunError as exc:
            # No ".<CRLF>" within PIECE bytes: take what was searched and go on.
            piece = await reader.read(exc.consumed)
            ended = False
        except asyncio.IncompleteReadError:
            return DataResult(DataState.LOST)
        else:
            # The end is a ".<CRLF>" that is a line of its own: CRLF (or the start) before it.
            preceding = piece[-5:-3] if len(piece) >= 5 else (before + piece[:-3])[-2:]
            ended = preceding == b"\r\n"
        if not piece:
            return DataResult(DataState.LOST)
        data = piece[:-3] if ended else piece
        size += len(data)
        if state is DataState.COMPLETE:
            if size_limit and size > size_limit:
                state = DataState.TOO_MUCH
            else:
                lines.feed(data)
                if lines.too_long:
                    state = DataState.TOO_LONG
            if state is DataState.COMPLETE:
                pieces.append(_unstuff(data, before))
            else:
                pieces.clear()  # the reply is decided: hold nothing more
        if ended:
            break
        before = piece[-2:] if len(piece) >= 2 else (before + piece)[-2:]
    if state is not DataState.COMPLETE:
        return DataResult(state)
    return DataResult(state, pieces[0] if len(pieces) == 1 else b"".join(pieces))
