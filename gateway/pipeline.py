"""A message's way through the gateway, written once: the pipelines, read top to bottom.

Each source has a list of steps; each step is a small named object with one
``async __call__(item)`` that either returns (done) or raises one of the outcomes in
:mod:`gateway.errors` (``Reject``, ``Defer``, ``Discard``). The worker runs the list, skipping what
``item.steps_done`` says already happened, so a crash resumes where it stopped and never relays or
logs twice. Steps that touch the outside world (``durable = True``) are recorded before the next
such step runs; steps that only compute (normalise, sign) are cheap to repeat and are not.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

from gateway.store.models import Source
from gateway.store.queue import QueuedMessage


class Step(Protocol):
    name: str  # kebab-case; shows in logs and in ``steps_done``
    durable: bool

    async def __call__(self, item: QueuedMessage) -> None: ...


Pipelines = Mapping[str, Sequence[Step]]


def build_pipelines(
    *,
    normalise: Step,
    sign: Step,
    relay: Step,
    identify_sender: Step,
    identify_account: Step,
    append_sent: Step,
    capture: Sequence[Step] = (),
    hooks: Sequence[Step] = (),
) -> dict[str, Sequence[Step]]:
    """Which steps each source's messages take, in order.

    ``hooks`` is ``(match-contacts, emit)`` when CRM logging is on; ``capture`` is the capture
    door's own steps (prove the owner, unwrap forwards) that lead to a sighting. Mail the CRM
    sends (``api``) ends with ``append_sent``: the copy for its mailbox's Sent folder.
    """
    # Without hooks nothing reads a sighting, so the steps that make one are left out too.
    logged: tuple[Step, ...] = (identify_sender, *hooks) if hooks else ()
    pipelines: dict[str, Sequence[Step]] = {
        Source.SUBMISSION.value: (normalise, sign, relay, *logged),
        Source.API.value: (normalise, sign, relay, *logged, append_sent),
        Source.IMAP.value: (identify_account, *hooks),
        # Our own DSNs: already complete messages; sign them when we hold the domain's key.
        Source.BOUNCE.value: (sign, relay),
    }
    if capture:
        pipelines[Source.CAPTURE.value] = (*capture, *hooks)
    return pipelines
