"""What a request's headers alone decide, before a byte of its body is read.

Starlette runs middleware outside-in and a route's dependencies only after the body middleware
has read and parsed the body, so a key checked by a route dependency alone lets a keyless client
spend the Gateway's event loop on up to MAX_BODY_BYTES of JSON before its 401. This ASGI middleware
sits between the access log and the body checks (``serving.app``) and answers from the headers:

- with API keys set, a request to a key-guarded path without a valid key gets its 401 here. Guarded:
  ``/generate``, ``/v1/...``, and every request that carries a body (POST, PUT, PATCH, DELETE) except
  under ``/admin``, which takes the admin key (ADMIN_API_KEY) instead; ``/docs``, ``/redoc`` and
  ``/openapi.json`` too unless DOCS_NEED_KEY=false (they list /admin). GET/HEAD elsewhere (``/healthz``,
  which then tells a keyless caller only each model's state, and the page) stay open, as probes need;
- a refusal for the key is held back ``delay_s`` (AUTH_FAILURE_DELAY_S) before it is sent, at most
  ``max_held`` at once (AUTH_FAILURE_MAX_HELD; past it, at once). A keyless client in a closed loop
  then costs the proxy and the Gateway a few requests a second instead of hundreds; a held refusal
  costs a timer and nothing else, its body still unread;
- ``x-request-disconnect-disabled: ?1`` is refused (400): Serve would stop watching for the client's
  disconnect, so a generation would run on, up to REQUEST_TIMEOUT_S, after its client left.

The routes keep their own key dependency too (it documents the scheme in OpenAPI, and checks again).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from serving.api.auth import KeyCheck, key_error
from serving.api.errors import ApiError, api_error, family_of

# Serve's per-request hint to stop watching for client disconnects (ray.serve's http_util).
DISCONNECT_DISABLED_HEADER = b"x-request-disconnect-disabled"
BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


@dataclass(frozen=True)
class Guard:
    """The key that paths under ``prefix`` need (``every_method``: GET too, else only requests with a body)."""

    prefix: str
    keys: KeyCheck
    what: str = "API key"
    setting: str = "API_KEY"
    every_method: bool = True

    def covers(self, path: str, method: str) -> bool:
        inside = self.prefix == "" or path == self.prefix or path.startswith(self.prefix + "/")
        return inside and (self.every_method or method in BODY_METHODS)


DOCS_PATHS = ("/docs", "/redoc", "/openapi.json")  # they list every route, /admin included


def guards(api_keys: KeyCheck, admin_keys: KeyCheck | None, docs: bool = True) -> list[Guard]:
    """The service's rules, first match wins (see the module docstring); ``docs``: with keys set, the
    documentation needs a key too (DOCS_NEED_KEY)."""
    rules: list[Guard] = []
    if admin_keys is not None:
        rules.append(Guard("/admin", admin_keys, "admin key", "ADMIN_API_KEY"))
    if api_keys.required:
        rules += [Guard("/v1", api_keys), Guard("/generate", api_keys)]
        if docs:
            rules += [Guard(path, api_keys) for path in DOCS_PATHS]
        rules.append(Guard("", api_keys, every_method=False))
    return rules


def bearer(headers: Sequence[tuple[bytes, bytes]]) -> str | None:
    """The Bearer token of raw ASGI headers; None without one (or with another scheme)."""
    header = next((v for k, v in headers if k == b"authorization"), None)
    if header is None:
        return None
    scheme, _, token = header.decode("latin-1").strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


class HeaderGate:
    """ASGI middleware: refuses from the headers alone; see the module docstring."""

    def __init__(
        self,
        app: Any,
        rules: Sequence[Guard],
        delay_s: float = 0.0,
        max_held: int = 0,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.app = app
        self.rules = list(rules)
        self.delay_s = delay_s
        self.max_held = max_held
        self.held = 0  # refusals waiting out delay_s now
        self._sleep = sleep

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            path = scope["path"].removeprefix(scope.get("root_path", "")) or "/"
            error = self._refusal(scope, path)
            if error is not None:
                if error.status == 401:
                    await self._hold()
                # Nothing of the body is read: the connection's unread bytes are the server's to drop.
                await error.response(family_of(path))(scope, receive, send)
                return
        await self.app(scope, receive, send)

    async def _hold(self) -> None:
        """Wait out ``delay_s`` before a refusal for the key, unless ``max_held`` refusals wait already."""
        if self.delay_s <= 0 or self.held >= self.max_held:
            return
        self.held += 1
        try:
            await self._sleep(self.delay_s)
        finally:  # also when the client leaves and Serve cancels the call
            self.held -= 1

    def _refusal(self, scope: dict[str, Any], path: str) -> ApiError | None:
        headers = scope["headers"]
        for key, value in headers:
            if key == DISCONNECT_DISABLED_HEADER and value.strip() == b"?1":
                return api_error(
                    "bad_request",
                    code="disconnect_disabled_refused",
                    message="x-request-disconnect-disabled is not accepted here: a generation stops when its client "
                    "leaves. Remove the header.",
                )
        rule = next((r for r in self.rules if r.covers(path, scope["method"])), None)
        return None if rule is None else key_error(rule.keys, bearer(headers), rule.what, rule.setting)
