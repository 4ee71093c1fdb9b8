"""IMAP sync: connect reps' and shared mailboxes and log the mail that involves contacts.

``settings`` (the ``[imap]`` table) · ``presets`` (provider presets, ``providers.toml``) · ``vault``
(passwords encrypted at rest) · ``models`` (accounts, folder cursors, links of logged mail) ·
``accounts`` (validated choices, for the API and CLI) · ``errors`` (failures in words) ·
``connection`` (the one wrapper around an IMAPClient session) · ``headers`` (the cheap scan
path) · ``decide`` (what is worth logging; pure) · ``sync`` (one folder's sync) · ``service``
(every account's runner in the event loop) · ``api`` and ``cli`` (the admin's doors).
"""
