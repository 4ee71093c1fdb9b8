"""The ``[imap]`` table: mailbox sync."""

from __future__ import annotations

from gateway.settings_base import Section, opt


class ImapSettings(Section):
    """IMAP sync of reps' and shared mailboxes."""

    enabled: bool = opt(True, "Sync the connected mailboxes")
