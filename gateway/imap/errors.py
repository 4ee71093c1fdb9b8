"""What can go wrong talking to a mailbox, each as a sentence a user can act on.

```
ImapError (GatewayError)            -- .sentence: what the user reads; .temporary: retry helps
├── ConnectFailed                   -- host not found, refused, timed out (temporary)
├── TlsFailed                       -- certificate or handshake problem (not temporary)
├── AuthFailed                      -- wrong username/password (with the app-password hint)
├── ImapDisabled                    -- the provider has IMAP switched off for this mailbox
├── Throttled                       -- the provider asks us to slow down ([THROTTLED], limits)
└── ServerError                     -- anything else the server or connection did (temporary)
```
:func:`classify_login_failure` turns a server's refusal into one of these; the texts it looks
for are the ones providers actually send (RFC 5530 response codes first, then known phrases).
"""

from __future__ import annotations

import re

from gateway.errors import GatewayError


class ImapError(GatewayError):
    temporary = True

    def __init__(self, sentence: str) -> None:
        super().__init__(sentence)
        self.sentence = sentence


class ConnectFailed(ImapError):
    temporary = True


class TlsFailed(ImapError):
    temporary = False


class AuthFailed(ImapError):
    temporary = False


class ImapDisabled(ImapError):
    temporary = False


class Throttled(ImapError):
    temporary = True


class ServerError(ImapError):
    temporary = True


# RFC 5530 response codes and the phrases providers use when IMAP is off for a mailbox.
_DISABLED = re.compile(
    r"not enabled for IMAP|IMAP (access )?(is )?disabled|IMAP is not enabled|"
    r"User is authenticated but not connected|enable IMAP|IMAP access is not allowed|"
    r"\[CONTACTADMIN\]",
    re.IGNORECASE,
)
_THROTTLED = re.compile(
    r"\[THROTTLED\]|\[LIMIT\]|\[UNAVAILABLE\]|Too many (simultaneous )?(connections|logins)|"
    r"rate limit|try again later|temporarily unavailable",
    re.IGNORECASE,
)


def server_text(exc: object) -> str:
    """The server's own words from an imaplib/imapclient error, without byte-string noise."""
    text = exc.decode("utf-8", "replace") if isinstance(exc, bytes) else str(exc)
    text = re.sub(r"^b['\"]|['\"]$", "", text)
    return text.replace("\\r\\n", " ").strip()[:300]


def classify_login_failure(text: str, *, app_password_hint: str, disabled_hint: str) -> ImapError:
    """A refused LOGIN, as the error a user can act on."""
    if _DISABLED.search(text):
        return ImapDisabled(
            f"the provider has IMAP access switched off for this mailbox ({text}). {disabled_hint}"
        )
    if _THROTTLED.search(text):
        return Throttled(f"the provider is limiting logins right now ({text}); we will retry later")
    return AuthFailed(f"the server refused the username or password ({text}). {app_password_hint}")


def is_throttling(text: str) -> bool:
    return bool(_THROTTLED.search(text))
