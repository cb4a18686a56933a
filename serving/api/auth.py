"""API keys: one FastAPI dependency per key set, Bearer tokens compared in constant time.

The keys are ``SecretStr`` from the settings; only their SHA-256 digests are kept here, and a
presented token is hashed and compared against every digest (``hmac.compare_digest``, all of them,
whichever matches), so neither the time taken nor an error message says anything about a key.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Sequence

from fastapi import Request
from fastapi.security import HTTPBearer
from pydantic import SecretStr

from serving.api.errors import ApiError, api_error

BEARER = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer <key>`.")


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode("utf-8", "surrogatepass")).digest()


class KeyCheck:
    """Whether a presented token is one of ``keys``.

    Example::

        >>> check = KeyCheck([SecretStr("s3cret-key")])
        >>> check.accepts("s3cret-key"), check.accepts("guess-key1")
        (True, False)
    """

    def __init__(self, keys: Sequence[SecretStr]) -> None:
        self._digests = [_digest(k.get_secret_value()) for k in keys]

    @property
    def required(self) -> bool:
        return bool(self._digests)

    def accepts(self, token: str) -> bool:
        presented = _digest(token)
        matched = False
        for digest in self._digests:
            matched |= hmac.compare_digest(presented, digest)
        return matched


def bearer_token(request: Request) -> str | None:
    """The Bearer token of the request; None when it sent none."""
    header = request.headers.get("authorization")
    if header is None:
        return None
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None  # another scheme (Basic...): as if no key was sent
    return token.strip()


def require(check: KeyCheck, what: str = "API key", setting: str = "API_KEY") -> Callable:
    """A dependency that lets a request through only with a key ``check`` accepts."""

    async def dependency(request: Request) -> None:
        error = key_error(check, bearer_token(request), what, setting)
        if error is not None:
            raise error

    return dependency


def key_error(check: KeyCheck, token: str | None, what: str = "API key", setting: str = "API_KEY") -> ApiError | None:
    """The 401 for a request that presented ``token`` (None: no key), or None when ``check`` lets it in."""
    if not check.required:
        return None
    if token is None:
        return unauthorized(f"missing {what}: send the header `Authorization: Bearer <key>` ({setting})")
    if not check.accepts(token):
        return unauthorized(f"invalid {what}: the key sent is not one of this service's keys ({setting})")
    return None


def unauthorized(message: str) -> ApiError:
    return api_error("unauthorized", message, headers={"WWW-Authenticate": "Bearer"})
