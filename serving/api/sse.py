"""Server-sent events: the wire format of every streamed answer.

>>> data({"text": "hi"})
'data: {"text":"hi"}\\n\\n'
>>> comment("waking m: imports (3 s)")
': waking m: imports (3 s)\\n\\n'
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi.responses import StreamingResponse

MEDIA_TYPE = "text/event-stream"
DONE = "data: [DONE]\n\n"
# No proxy on the way may buffer the stream (nginx honours X-Accel-Buffering) or cache it.
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def response(events: AsyncIterator[str]) -> StreamingResponse:
    """The HTTP response of a stream whose status is fixed once it starts."""
    return StreamingResponse(events, media_type=MEDIA_TYPE, headers=HEADERS)


def _json(payload: Any) -> str:
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False)


def data(payload: Any) -> str:
    return f"data: {_json(payload)}\n\n"


def event(name: str, payload: Any) -> str:
    return f"event: {name}\ndata: {_json(payload)}\n\n"


def comment(text: str) -> str:
    """A line every SSE client ignores; it keeps proxies and clients from timing out."""
    return ": " + " ".join(text.splitlines()) + "\n\n"
