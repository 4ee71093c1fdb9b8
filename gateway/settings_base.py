"""The building blocks of every settings section, shared by the sections other packages own.

Each feature package (``gateway.capture``, ``gateway.imap``) declares its own TOML table as a
:class:`Section` next to its code; ``gateway.settings`` assembles them into one ``Settings``.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field


class Section(BaseModel):
    """A TOML table: unknown keys are errors, so typos never pass silently."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def opt(default: Any = ..., doc: str = "", **kw: Any) -> Any:
    """A field with its one-line comment; the comment is what ``conf/mailgate.toml`` shows."""
    if default is list or (callable(default) and not isinstance(default, type)):
        return Field(default_factory=default, description=doc, **kw)
    return Field(default=default, description=doc, **kw)


def _schedule(value: list[float]) -> list[float]:
    if not value or any(step <= 0 for step in value):
        raise ValueError("needs at least one positive number of seconds")
    return value


# A retry schedule: waits in seconds, at least one, all positive (the last one repeats or ends).
Schedule = Annotated[list[float], AfterValidator(_schedule)]
