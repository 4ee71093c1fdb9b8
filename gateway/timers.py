"""A deadline that moves often and fires rarely: one event-loop timer instead of one per move.

SMTP sessions push a deadline on all the time: the door's idle timeout at every command, the
relay's command timeout at every reply it waits for, a pooled connection's idle expiry every time
it goes back to its pool. Cancelling a ``TimerHandle`` and scheduling another at each move costs
more than the work it guards, and leaves the cancelled handles in the loop's heap until they are
due. :class:`LazyDeadline` keeps one handle: moving the deadline later changes a number, and when
the handle fires before the deadline of the moment, it sets itself for the time left.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class LazyDeadline:
    """Calls ``callback`` once the loop's clock passes the deadline last :meth:`set` (unless
    :meth:`clear` or :meth:`cancel` came after)."""

    __slots__ = ("_callback", "_handle", "_loop", "_when")

    def __init__(self, loop: asyncio.AbstractEventLoop, callback: Callable[[], object]) -> None:
        self._loop = loop
        self._callback = callback
        self._when: float | None = None
        self._handle: asyncio.TimerHandle | None = None

    def set(self, when: float) -> None:
        """The deadline is now ``when`` (loop time), earlier or later than before."""
        self._when = when
        handle = self._handle
        if handle is None or handle.when() > when:
            if handle is not None:
                handle.cancel()
            self._handle = self._loop.call_at(when, self._fire)

    def clear(self) -> None:
        """No deadline until the next :meth:`set`; a pending timer stays and fires idle."""
        self._when = None

    def cancel(self) -> None:
        """No deadline, and no timer left behind (the owner is going away)."""
        self._when = None
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _fire(self) -> None:
        self._handle = None
        when = self._when
        if when is None:
            return
        if self._loop.time() < when:  # moved later since the timer was set
            self._handle = self._loop.call_at(when, self._fire)
            return
        self._when = None
        self._callback()
