"""Mailbox credentials at rest: encrypted with a key from the config, readable only in memory.

Passwords and OAuth tokens are stored as Fernet tokens (AES-128-CBC + HMAC-SHA256, from
``cryptography``): a stolen database or backup holds nothing usable without ``imap.secret_key``.
``previous_secret_keys`` keep decrypting during a key rotation while new secrets use the new key.
The key is checked when the vault is built, so a missing or malformed key is one clear sentence
naming the option, never a stack trace deep inside a sync.
"""

from __future__ import annotations

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from gateway.errors import ConfigError

KEY_HINT = (
    "run `mailgate account keygen` and put the key it prints in [imap] secret_key "
    "(or MAILGATE_IMAP__SECRET_KEY)"
)


def generate_key() -> str:
    return Fernet.generate_key().decode("ascii")


class SecretError(Exception):
    """A stored secret cannot be read with the configured keys."""


class Vault:
    """Encrypts and decrypts account secrets with the configured key(s)."""

    def __init__(self, secret_key: str, previous: list[str] | None = None) -> None:
        if not secret_key:
            raise ConfigError(f"`imap.secret_key` is not set: {KEY_HINT}")
        keys = []
        for name, key in [("imap.secret_key", secret_key)] + [
            ("imap.previous_secret_keys", k) for k in previous or []
        ]:
            try:
                keys.append(Fernet(key.encode("ascii")))
            except (ValueError, UnicodeEncodeError):
                raise ConfigError(
                    f"`{name}` is not a Fernet key (32 url-safe base64 bytes); {KEY_HINT}"
                ) from None
        self._fernet = MultiFernet(keys)

    def encrypt(self, secret: str) -> bytes:
        return self._fernet.encrypt(secret.encode("utf-8"))

    def decrypt(self, token: bytes) -> str:
        try:
            return self._fernet.decrypt(bytes(token)).decode("utf-8")
        except InvalidToken:
            raise SecretError(
                "the stored password cannot be decrypted with imap.secret_key (was the key "
                "changed without keeping the old one in imap.previous_secret_keys?); "
                "set the password again"
            ) from None

    def __repr__(self) -> str:  # never show key material, even in a debugger or a log line
        return "Vault(<keys hidden>)"
