"""The bulk DATA reader against a line-by-line model of aiosmtpd 1.4.6's DATA loop.

Every input is fed to the reader in many different slicings (one byte at a time, at random
boundaries, all at once), so ends of data, CRLFs and leading dots that straddle reads are covered;
the reader must give the model's answer and leave what followed the end of data in the stream.
"""

from __future__ import annotations

import asyncio
import itertools
import random

import pytest

from gateway.smtp import data
from gateway.smtp.data import LINE_LIMIT, DataResult, DataState, read_data


def model(stream: bytes, size_limit: int | None) -> tuple[DataResult, bytes]:
    """aiosmtpd's rules, one CRLF-terminated line at a time; also returns the unread rest."""
    lines: list[bytes] = []
    size = 0
    state = DataState.COMPLETE
    position = 0
    while True:
        end = stream.find(b"\r\n", position)
        if end < 0:
            return DataResult(DataState.LOST), b""
        line = stream[position : end + 2]
        position = end + 2
        if line == b".\r\n":
            break
        size += len(line)
        if state is DataState.COMPLETE and size_limit and size > size_limit:
            state = DataState.TOO_MUCH
        if state is DataState.COMPLETE and len(line) > LINE_LIMIT:
            state = DataState.TOO_LONG
        lines.append(line[1:] if line.startswith(b".") else line)
    rest = stream[position:]
    if state is not DataState.COMPLETE:
        return DataResult(state), rest
    return DataResult(state, b"".join(lines)), rest


async def feed_and_read(
    stream: bytes, cuts: list[int], size_limit: int | None
) -> tuple[DataResult, bytes]:
    reader = asyncio.StreamReader(limit=LINE_LIMIT)  # aiosmtpd's stream limit
    bounds = [0, *cuts, len(stream)]

    async def feed() -> None:
        for start, stop in itertools.pairwise(bounds):
            reader.feed_data(stream[start:stop])
            await asyncio.sleep(0)
        reader.feed_eof()

    feeder = asyncio.create_task(feed())
    result = await read_data(reader, size_limit=size_limit)
    await feeder
    rest = await reader.read()
    assert reader._limit == LINE_LIMIT  # type: ignore[attr-defined]
    return result, rest


CASES = [
    b".\r\n",
    b"\r\n.\r\n",
    b"a\r\n.\r\nMAIL FROM:<x@y>\r\n",
    b"..\r\n.\r\n",
    b"x\r\n..leading\r\n...\r\n.\r\n",
    b"Subject: s\r\n\r\nthanks.\r\nbye.\r\n.\r\nQUIT\r\n",
    b"first\n.\nMAIL FROM:<x@y>\r\nevil\r\n.\r\n",
    b"first\n.\r\nsecond\r\n.\r\n",
    b"first\r.\rsecond\r\n.\r\n",
    b"first\r.\r\nsecond\r\n.\r\n",
    b"first\r\n.\nsecond\r\n.\r\n",
    b"first\r\n\x00.\r\nsecond\r\n.\r\n",
    b"first\r\n.\rsecond\r\n.\r\n",
    b"\r\r\n.\r\n",
    b"x" * 999 + b"\r\n.\r\n",
    b"x" * 1000 + b"\r\n.\r\n",
    b"y\r\n" + b"x" * 998 + b"\r\r\n.\r\n",
    b"y\r\n" + b"x" * 999 + b"\r\r\n.\r\n",
    b"." + b"x" * 999 + b"\r\n.\r\n",
    (b"z" * 78 + b"\r\n.dot\r\n") * 2000 + b".\r\n",
    b"a" * 5000 + b"\r\n.\r\n",
    b"no end\r\n",
    b"no end\r\n.",
]


@pytest.mark.parametrize("stream", CASES, ids=range(len(CASES)))
@pytest.mark.parametrize("size_limit", [None, 1000, 100_000])
def test_reader_matches_the_line_model(stream: bytes, size_limit: int | None) -> None:
    expected = model(stream, size_limit)
    rng = random.Random(len(stream))
    slicings = [[], list(range(1, min(len(stream), 3000)))]
    for _ in range(20):
        slicings.append(sorted(rng.sample(range(1, len(stream)), min(len(stream) - 1, 5))))
    for cuts in slicings:
        result, rest = asyncio.run(feed_and_read(stream, cuts, size_limit))
        if expected[0].state is DataState.LOST:
            assert result.state is DataState.LOST
            continue
        assert (result, rest) == expected, cuts


def test_pieces_bigger_than_the_search_window(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(data, "PIECE", 64)  # many overrun reads, ends split between them
    rng = random.Random(7)
    for _ in range(200):
        lines = [
            rng.choice([b"", b".", b"..", b"x" * rng.randrange(1, 90), b"a.\r", b"\n."])
            for _ in range(rng.randrange(1, 30))
        ]
        stream = b"\r\n".join(lines) + b"\r\n.\r\nNOOP\r\n"
        cuts = sorted(rng.sample(range(1, len(stream)), min(len(stream) - 1, 4)))
        assert asyncio.run(feed_and_read(stream, cuts, None)) == model(stream, None)
