"""The building blocks of every settings section, shared by the sections other packages own.

Each feature package (``gateway.capture``, ``gateway.imap``) declares its own TOML table as a
:class:`Section` next to its code; ``gateway.settings`` assembles them into one ``Settings``.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class Section(BaseModel):
    """A TOML table: unknown keys are errors, so typos never pass silently."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def opt(default: Any = ..., doc: str = "", **kw: Any) -> Any:
    """A field with its one-line comment; the comment is what ``conf/mailgate.toml`` shows."""
    if default is list or (callable(default) and not isinstance(default, type)):
        return Field(default_factory=default, description=doc, **kw)
    return Field(default=default, description=doc, **kw)
