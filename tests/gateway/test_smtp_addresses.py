"""MAIL/RCPT address parsing: our fast path gives aiosmtpd's answer for every input."""

from __future__ import annotations

import random

import pytest
from aiosmtpd.smtp import SMTP

from gateway.smtp.server import _PLAIN_PATH, MailgateSMTP


class _Bare(MailgateSMTP):
    """Just enough of a session object for ``_getaddr``."""

    def __init__(self, local_part_limit: int = 0) -> None:  # no server, no loop
        self.local_part_limit = local_part_limit


def _answer(parse: object, server: MailgateSMTP, arg: str) -> object:
    try:
        return parse(server, arg)  # type: ignore[operator]
    except Exception as exc:  # aiosmtpd's parser raises on some garbage; so must we
        return type(exc)


FIXED = [
    "<bench@example.test>",
    "<bench@example.test> SIZE=10240",
    "<A+tag@Example.COM>  RET=HDRS ENVID=x",
    "<a@b>\t\tX",
    "<a@b>(comment) SIZE=1",
    "<a@b> \t(c) X",
    '<"quoted local"@b> X',
    "< a@b>",
    "<a@b >",
    "<a..b@c>",
    "<.a@b>",
    "<a@b.>",
    "<@x,@y:a@b>",
    "<a@[192.0.2.1]>",
    "<ü@b>",
    "a@b",
    "<>",
    "<a@b",
    "<a@b>>",
    "<a@b>\x00",
]


def _random_paths(count: int) -> list[str]:
    rng = random.Random(5321)
    alphabet = 'ab.@<>-_+ \t()"[]:,;\\x1'
    paths = []
    for _ in range(count):
        local = rng.choice(["a", "a.b", "x-y", "".join(rng.choices(alphabet, k=4))])
        domain = rng.choice(["b", "b.c", "b-c.d", "".join(rng.choices(alphabet, k=3))])
        paths.append(f"<{local}@{domain}>" + "".join(rng.choices(alphabet, k=rng.randrange(6))))
    return paths


@pytest.mark.parametrize("limit", [0, 3])
def test_fast_path_agrees_with_aiosmtpd(limit: int) -> None:
    server = _Bare(limit)
    paths = FIXED + _random_paths(3000)
    assert sum(1 for p in paths if _PLAIN_PATH.match(p)) > 300  # the fast path is exercised
    for path in paths:
        expected = _answer(SMTP._getaddr, server, path)
        assert _answer(MailgateSMTP._getaddr, server, path) == expected, path
