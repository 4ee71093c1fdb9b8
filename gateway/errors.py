"""The gateway's exception tree, drawn once so every layer raises and catches the same names.

```
GatewayError
├── StepOutcome            -- how a pipeline step ends a message's way early
│   ├── Reject             -- permanent: 5xx at the door, or a bounce (DSN) later
│   ├── Defer              -- temporary: retry after a backoff
│   └── Discard            -- drop on purpose, logged
├── ConfigError            -- a bad option; its message names the key and the fix
├── StoreError             -- the database could not take or give the data (client gets 4xx)
└── UpstreamError          -- a peer (relay, DNS, CRM) failed in a way a retry may cure
```

Like Mailman's ``RejectMessage``/``DiscardMessage``, step outcomes are control flow, not bugs: the
worker catches them by name, and anything else raised by a step sends the message to the shunt
queue for a human to look at.
"""

from __future__ import annotations


class GatewayError(Exception):
    """Base of every error the gateway raises on purpose."""


class StepOutcome(GatewayError):
    """A pipeline step ended the message's way early; ``reply`` is what a client or DSN shows."""

    def __init__(self, reply: str, *, code: int = 0) -> None:
        super().__init__(reply)
        self.reply = reply
        self.code = code


class Reject(StepOutcome):
    """Permanent failure: the message cannot be delivered as it is, retrying will not help."""


class Defer(StepOutcome):
    """Temporary failure: try again later; ``retry_after`` overrides the backoff schedule."""

    def __init__(self, reply: str, *, code: int = 0, retry_after: float | None = None) -> None:
        super().__init__(reply, code=code)
        self.retry_after = retry_after


class Discard(StepOutcome):
    """Drop the message on purpose (it is logged, never silently lost)."""


class ConfigError(GatewayError):
    """A configuration problem; the message is one line naming the key and the fix."""


class StoreError(GatewayError):
    """The store could not durably take or give data; callers answer 4xx, never 250."""


class UpstreamError(GatewayError):
    """A peer (relay, DNS, CRM) failed in a way that a later retry may cure."""
