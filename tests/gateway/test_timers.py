"""LazyDeadline: one timer that follows a deadline moved later, earlier, or cleared."""

from __future__ import annotations

import asyncio

from gateway.timers import LazyDeadline


async def _fired_at(moves: list[tuple[float, float | None]], *, wait: float) -> list[float]:
    """Apply ``(at, deadline)`` moves (seconds from the start; None clears) and return when the
    callback ran, in seconds from the start, within ``wait`` seconds."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    fired: list[float] = []
    deadline = LazyDeadline(loop, lambda: fired.append(loop.time() - start))
    for at, when in moves:
        await asyncio.sleep(max(0.0, start + at - loop.time()))  # the scenario's clock
        if when is None:
            deadline.clear()
        else:
            deadline.set(start + when)
    await asyncio.sleep(max(0.0, start + wait - loop.time()))
    deadline.cancel()
    return fired


def test_a_deadline_moved_later_fires_once_at_the_last_one() -> None:
    fired = asyncio.run(_fired_at([(0, 0.2), (0.1, 0.3), (0.2, 0.4)], wait=0.7))
    assert len(fired) == 1 and 0.4 <= fired[0] < 0.6


def test_a_deadline_moved_earlier_fires_at_the_earlier_one() -> None:
    fired = asyncio.run(_fired_at([(0, 0.5), (0.05, 0.15)], wait=0.7))
    assert len(fired) == 1 and 0.15 <= fired[0] < 0.4


def test_a_cleared_deadline_does_not_fire_and_can_be_set_again() -> None:
    assert asyncio.run(_fired_at([(0, 0.2), (0.1, None)], wait=0.5)) == []
    fired = asyncio.run(_fired_at([(0, 0.2), (0.05, None), (0.1, 0.3)], wait=0.6))
    assert len(fired) == 1 and 0.3 <= fired[0] < 0.5
