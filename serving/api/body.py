"""Request bodies are checked before any route sees them: size, media type, UTF-8, strict JSON.

Python's ``json`` accepts what a service must not: ``NaN`` and ``Infinity``, ``1e999`` (infinity),
strings with lone surrogates (``"\\ud800"``, which later fail to encode), and nesting deep enough to
exhaust the recursion limit. This ASGI middleware reads the body once (413 past MAX_BODY_BYTES,
before parsing), rejects anything that is not strict JSON with a 4xx in the route family's error
shape, and replays the body to the app. Only ``application/json`` bodies are read (415 otherwise,
with or without a Content-Type): a form or ``text/plain`` post is what a cross-site page can send
without the browser asking first.

Its cost is bounded by the body's size, in C: the nesting is measured on the text before parsing
(strings removed, then a running sum over the brackets), the parse runs without the garbage
collector (which a body of many small lists would trigger thousands of times), and the parsed
value is walked for lone surrogates only when the text has a surrogate escape; a field's path is
spelled out only for the error that names it. It runs after the API key check (``serving.api.gate``).
"""

from __future__ import annotations

import gc
import json
import math
import re
from typing import Any

import numpy as np

from serving.api.errors import ApiError, api_error, family_of

MAX_DEPTH = 64
JSON_MEDIA = b"application/json"
_STRINGS = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")  # bytes.translate deletes these
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


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
    if nesting_exceeds(text, MAX_DEPTH):
        raise BodyError(f"the JSON is nested too deeply (at most {MAX_DEPTH} levels)")
    collecting = gc.isenabled()
    gc.disable()  # a body of many small lists would trigger a collection every few hundred of them
    try:
        value = json.loads(text, parse_constant=_no_constant, parse_float=_finite_float)
    except BodyError:
        raise
    except RecursionError:
        raise BodyError(f"the JSON is nested too deeply (at most {MAX_DEPTH} levels)") from None
    except ValueError as exc:  # JSONDecodeError, and ints past Python's digit limit
        raise BodyError(f"the body is not valid JSON ({exc})") from None
    finally:
        if collecting:
            gc.enable()
    if _SURROGATE_ESCAPE.search(text):  # only an escape can make a surrogate: raw UTF-8 cannot hold one
        found = _lone_surrogate(value)
        if found is not None:
            path, code, at = found
            where = ".".join(["body", *reversed(path)])
            raise BodyError(f"{where[:200]}: invalid Unicode: lone surrogate \\u{code:04x} at character {at}")
    return value


def nesting_exceeds(text: str, limit: int) -> bool:
    """Whether the JSON ``text`` nests containers more than ``limit`` deep (vectorised, no Python loop).

    >>> nesting_exceeds('{"a": [[1], "]]]"]}', 3), nesting_exceeds('[[[[]]]]', 3)
    (False, True)
    """
    outside_strings = _STRINGS.sub("", text).encode("utf-8", "surrogatepass")
    brackets = outside_strings.translate(None, _NOT_BRACKETS)
    if not brackets:
        return False
    codes = np.frombuffer(brackets, dtype=np.uint8)
    steps = np.where((codes == ord("[")) | (codes == ord("{")), 1, -1).astype(np.int32)
    return int(np.cumsum(steps).max()) > limit


def _no_constant(name: str) -> Any:
    raise BodyError(f"{name} is not valid JSON; send a number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise BodyError(f"the number {text[:40]} is too large")
    return value


def _lone_surrogate(value: Any) -> tuple[list[str], int, int] | None:
    """(path reversed, code point, offset) of the first string with a lone surrogate, else None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            return [], ord(value[exc.start]), exc.start
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            found = _lone_surrogate(key)
            if found is None:
                found = _lone_surrogate(item)
            if found is not None:
                found[0].append(str(key))
                return found
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found = _lone_surrogate(item)
            if found is not None:
                found[0].append(str(index))
                return found
    return None


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
        if media != JSON_MEDIA:
            got = f"got {media.decode('latin-1')[:80]!r}" if media else "got none"
            raise api_error(
                "media_type",
                f"this API takes JSON; send the header Content-Type: application/json ({got})",
            )
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
