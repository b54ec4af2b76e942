"""Bearer-token checks for the admin and (optionally) the predict endpoints.

Tokens are compared with :func:`hmac.compare_digest` on their SHA-256 digests: the comparison takes
the same time whatever prefix matches (no timing oracle), and hashing first also hides the token's
length. A missing and a wrong token get the same 401, so probing learns nothing.
"""

from __future__ import annotations

import hashlib
import hmac

from infercache.errors import Unauthorized


class TokenAuth:
    """Checks ``Authorization: Bearer <token>``; ``token=None`` disables the check."""

    __slots__ = ("_digest",)

    def __init__(self, token: str | None) -> None:
        self._digest = None if token is None else hashlib.sha256(token.encode()).digest()

    @property
    def enabled(self) -> bool:
        return self._digest is not None

    def matches(self, authorization: str | None) -> bool:
        """True when the header carries the token (always True when auth is disabled)."""
        if self._digest is None:
            return True
        if not authorization:
            return False
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() != "bearer":
            return False
        given = hashlib.sha256(value.strip().encode()).digest()
        return hmac.compare_digest(given, self._digest)

    def check(self, authorization: str | None) -> None:
        """Raise :class:`Unauthorized` unless the header carries the token."""
        if not self.matches(authorization):
            raise Unauthorized("missing or invalid bearer token")
