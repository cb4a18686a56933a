"""Request bodies are checked before any route sees them: size, media type, UTF-8, strict JSON.

Python's ``json`` accepts what a service must not: ``NaN`` and ``Infinity``, ``1e999`` (infinity),
strings with lone surrogates (``"\\ud800"``, which later fail to encode), and nesting deep enough to
exhaust the recursion limit. This ASGI middleware reads the body once (413 past MAX_BODY_BYTES,
before parsing), rejects anything that is not strict JSON with a 4xx in the route family's error
shape, and replays the body to the app. ``curl -d`` labels JSON as form data; that label is read
as JSON, since every route here takes JSON.
"""

from __future__ import annotations

import json
import math
from typing import Any

from serving.api.errors import ApiError, api_error, family_of

MAX_DEPTH = 64
JSON_TYPES = (b"application/json", b"application/x-www-form-urlencoded", b"text/json")


class BodyError(ValueError):
    """The body is not strict JSON; the message says where and why."""


def parse_strict(raw: bytes) -> Any:
    """The JSON value of ``raw``, or BodyError.

    Example::

        >>> parse_strict(b'{"a": [1, 2.5]}')
        {'a': [1, 2.5]}
        >>> parse_strict(b'{"a": NaN}')
        Traceback (most recent call last):
        ...
        serving.api.body.BodyError: NaN is not valid JSON; send a number
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BodyError(f"the body is not valid UTF-8 (byte {exc.start}); send JSON encoded as UTF-8") from None
    try:
        value = json.loads(text, parse_constant=_no_constant, parse_float=_finite_float)
    except BodyError:
        raise
    except RecursionError:
        raise BodyError(f"the JSON is nested too deeply (at most {MAX_DEPTH} levels)") from None
    except ValueError as exc:  # JSONDecodeError, and ints past Python's digit limit
        raise BodyError(f"the body is not valid JSON ({exc})") from None
    _check(value, "body", 0)
    return value


def _no_constant(name: str) -> Any:
    raise BodyError(f"{name} is not valid JSON; send a number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise BodyError(f"the number {text[:40]} is too large")
    return value


def _check(value: Any, where: str, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise BodyError(f"the JSON is nested too deeply (at most {MAX_DEPTH} levels)")
    if isinstance(value, str):
        _check_text(value, where)
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_text(key, where)
            _check(item, f"{where}.{key}", depth + 1)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check(item, f"{where}.{index}", depth + 1)


def _check_text(text: str, where: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        code = ord(text[exc.start])
        raise BodyError(
            f"{where[:200]}: invalid Unicode: lone surrogate \\u{code:04x} at character {exc.start}"
        ) from None


class StrictJSONMiddleware:
    """Checks every POST/PUT/PATCH body; see the module docstring."""

    def __init__(self, app: Any, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        path = scope["path"].removeprefix(scope.get("root_path", "")) or "/"
        try:
            scope = self._json_scope(scope)
            body = await self._read(scope, receive)
            parse_strict(body)
        except ApiError as error:
            await error.response(family_of(path))(scope, receive, send)
            return
        except BodyError as exc:
            await api_error("bad_request", str(exc), code="invalid_json").response(family_of(path))(
                scope, receive, send
            )
            return

        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # afterwards: the client's disconnect, for streaming responses

        await self.app(scope, replay, send)

    def _json_scope(self, scope: dict[str, Any]) -> dict[str, Any]:
        headers = scope["headers"]
        length = next((v for k, v in headers if k == b"content-length"), None)
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            raise self._too_large()
        media = next((v for k, v in headers if k == b"content-type"), b"").split(b";")[0].strip().lower()
        if media and media not in JSON_TYPES and not media.endswith(b"+json"):
            raise api_error(
                "media_type",
                f"this API takes JSON; send Content-Type: application/json (got {media.decode('latin-1')[:80]!r})",
            )
        if media != b"application/json":
            others = [(k, v) for k, v in headers if k != b"content-type"]
            scope = {**scope, "headers": [*others, (b"content-type", b"application/json")]}
        return scope

    async def _read(self, scope: dict[str, Any], receive: Any) -> bytes:
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise api_error(
                    "bad_request", "the client went away before sending the whole body", code="incomplete_body"
                )
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                raise self._too_large()
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    def _too_large(self) -> ApiError:
        return api_error(
            "budget",
            f"the request body is larger than {self.max_body_bytes} bytes (MAX_BODY_BYTES); send less",
            code="body_too_large",
        )
