"""Refresh tokens at rest: sealed with TOKEN_KEY's first key when it is set, opened with any of its keys.

Every read and write of users.refresh_token goes through a TokenVault. A sealed value is `fernet:` followed by a
Fernet token; anything else is a token as the web app wrote it (an EVE SSO refresh token never holds a colon), so
a plaintext row stays readable, with or without TOKEN_KEY. Without TOKEN_KEY nothing is sealed: tokens are stored
as given.

Access tokens are not sealed. They live 20 minutes, the worker refreshes them (sealing the rotated refresh
token) when they are near their end, and they reach only what the database already holds: the killmails of the
pilots and corporations they were granted for.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import overload

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

PREFIX = "fernet:"  # marks a sealed token: an EVE SSO refresh token never holds a colon


class TokenKeyError(Exception):
    """A stored refresh token is sealed, and no key of TOKEN_KEY opens it (or TOKEN_KEY is unset)."""


def check_key(key: str) -> None:
    """Raise ValueError unless `key` is a Fernet key (32 bytes in url-safe base64); its text is never quoted."""
    try:
        Fernet(key)
    except (ValueError, TypeError):
        raise ValueError("not a Fernet key") from None


class TokenVault:
    """Seals refresh tokens with the first of its keys and opens them with any; without keys, stores them as
    given."""

    def __init__(self, keys: Sequence[str] = ()):
        self._fernet = MultiFernet([Fernet(k) for k in keys]) if keys else None

    def __repr__(self) -> str:
        return f"TokenVault(sealing={self.sealing})"

    @property
    def sealing(self) -> bool:
        """Whether tokens written through this vault are sealed (TOKEN_KEY is set)."""
        return self._fernet is not None

    @overload
    def seal(self, token: str) -> str: ...
    @overload
    def seal(self, token: None) -> None: ...
    def seal(self, token: str | None) -> str | None:
        """The value to store for a refresh token: sealed with the first key, or as given without keys."""
        if not token or self._fernet is None:
            return token
        return PREFIX + self._fernet.encrypt(token.encode()).decode()

    @overload
    def open(self, stored: str) -> str: ...
    @overload
    def open(self, stored: None) -> None: ...
    def open(self, stored: str | None) -> str | None:
        """The refresh token a stored value holds (a plaintext value as it is); TokenKeyError when sealed with a
        key TOKEN_KEY does not hold."""
        if not stored or not is_sealed(stored):
            return stored
        if self._fernet is None:
            raise TokenKeyError("the refresh token is sealed, but TOKEN_KEY is not set")
        try:
            return self._fernet.decrypt(stored[len(PREFIX):].encode()).decode()
        except InvalidToken:
            raise TokenKeyError("the refresh token is sealed with a key TOKEN_KEY does not hold") from None

    @overload
    def reseal(self, stored: str) -> str: ...
    @overload
    def reseal(self, stored: None) -> None: ...
    def reseal(self, stored: str | None) -> str | None:
        """The stored value rewritten with the first key (a plaintext one sealed); as it is without keys."""
        if self._fernet is None:
            return stored
        return self.seal(self.open(stored))


def is_sealed(stored: str) -> bool:
    """Whether a stored refresh token is sealed (as opposed to plaintext the web app wrote)."""
    return stored.startswith(PREFIX)
