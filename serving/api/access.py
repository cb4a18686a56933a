"""One access log line and the request metrics of every HTTP request, written when the request ends.

``AccessLog`` is the Gateway's outermost middleware of its own. It gives each request an
:class:`Access` record (``of(request)``), which the routes fill in as they learn things (the model,
the tokens, when the first token came), and when the request ends (a stream: when its last byte is
sent or the client goes away) it logs one line and records ``observability.metrics``::

    access route=/v1/completions model=tiny status=200 stream=true prompt_tokens=3 completion_tokens=8
      queue_s=0.001 ttft_s=0.153 total_s=0.410 request_id=6b1f0c...

The request id is Serve's (the proxy takes the client's ``X-Request-Id`` or makes one, puts it in
the request's headers and returns it as ``X-Request-ID``); the model server receives the same id.
A client's id is used only when it is 1 to 128 characters of ``[A-Za-z0-9._:-]``: anything else
(spaces, ``key=value`` pairs, control characters) would write fields of its own into log lines, so
it is replaced by a new id, everywhere the request goes (its headers, Serve's request context), and
the replacement is logged (the new id and the length of the old one, never its text).
Routes are labelled by their template (``/v1/models/{model:path}``) and unknown paths as ``other``,
so neither a log line nor a metric label carries what a client typed as a path.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from starlette.routing import BaseRoute, Match

from engine.types import Completion, Delta, Started
from observability import metrics
from serving.api.errors import family_of, from_exception

logger = logging.getLogger("ray.serve")
audit_logger = logging.getLogger("ray.serve.audit")  # its own name: an operator can route it elsewhere

SCOPE_KEY = "llm_serve.access"
CLIENT_GONE = 499  # the status counted for a request whose client left before the answer began
SAFE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


@dataclass
class Access:
    """What is known of one request; the routes fill it in, the middleware writes it out.

    Example::

        >>> record = Access("req-1", "/v1/completions", arrived=100.0)
        >>> record.model, record.stream = "tiny", True
        >>> record.started(Started("r1", prompt_tokens=(3,), queue_s=0.002))
        >>> record.deltas((Delta(0, "Hi", 1),), now=100.2)
        >>> record.deltas((Delta(0, " there", 2, finish_reason="stop"),), now=100.4)
        >>> record.status, record.complete = 200, True
        >>> record.line(now=100.5)
        'access route=/v1/completions model=tiny status=200 stream=true prompt_tokens=3 completion_tokens=3 \
queue_s=0.002 ttft_s=0.200 total_s=0.500 request_id=req-1'
    """

    request_id: str
    route: str
    arrived: float = field(default_factory=time.monotonic)
    model: str = metrics.NO_MODEL
    stream: bool = False
    status: int | None = None
    complete: bool = False  # the last byte of the answer was sent
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    queue_s: float | None = None
    ttft_s: float | None = None
    cold_start_s: float | None = None
    error: str | None = None  # a stream that failed after its status was sent
    _last_token_at: float | None = None

    def started(self, started: Started) -> None:
        """The model server took the request."""
        self.prompt_tokens = sum(started.prompt_tokens)
        self.queue_s = started.queue_s

    def deltas(self, deltas: Sequence[Delta], now: float | None = None) -> None:
        """A streamed chunk passed on to the client: time to first token, then inter-token latency."""
        now = time.monotonic() if now is None else now
        tokens = sum(d.tokens for d in deltas)
        self.completion_tokens = (self.completion_tokens or 0) + tokens
        if self._last_token_at is None:
            self.ttft_s = now - self.arrived
            metrics.first_token(self.route, self.model, self.ttft_s)
        else:  # rows advance together: a chunk covers as many steps as its longest row moved
            metrics.inter_token(self.model, now - self._last_token_at, max((d.tokens for d in deltas), default=1))
        self._last_token_at = now

    def finished(self, completions: Sequence[Completion]) -> None:
        """A whole answer (not streamed)."""
        self.completion_tokens = sum(c.completion_tokens for c in completions)

    def line(self, now: float | None = None) -> str:
        now = time.monotonic() if now is None else now
        status = self.status if self.status is not None else CLIENT_GONE
        fields: list[tuple[str, Any]] = [
            ("route", self.route), ("model", self.model), ("status", status), ("stream", str(self.stream).lower()),
            ("prompt_tokens", self.prompt_tokens), ("completion_tokens", self.completion_tokens),
            ("queue_s", _seconds(self.queue_s)), ("ttft_s", _seconds(self.ttft_s)),
            ("cold_start_s", _seconds(self.cold_start_s)), ("total_s", _seconds(now - self.arrived)),
            ("error", self.error), ("request_id", self.request_id),
        ]  # fmt: skip
        if self.status is not None and not self.complete and self.error is None:
            fields.insert(-1, ("error", "client_gone"))  # the answer began and was never finished
        return "access " + " ".join(f"{key}={value}" for key, value in fields if value is not None)


ADMIN_ACTIONS = {"GET": "list", "HEAD": "list", "POST": "load", "PATCH": "update", "DELETE": "unload"}


def audit_line(record: Access, method: str) -> str:
    """One line per /admin call, refused ones included: who did what is in the request id; never a key.

    >>> record = Access("req-1", "/admin/models/{name:path}")
    >>> record.model, record.status = "mini", 200
    >>> audit_line(record, "DELETE")
    'audit route=/admin/models/{name:path} action=unload model=mini result=ok status=200 request_id=req-1'
    """
    status = record.status if record.status is not None else CLIENT_GONE
    result = (
        "ok"
        if isinstance(status, int) and status < 400
        else "refused"
        if isinstance(status, int) and status < 500
        else "failed"
    )
    fields = [("route", record.route), ("action", ADMIN_ACTIONS.get(method, method.lower())),
              ("model", record.model or "-"), ("result", result), ("status", status),
              ("request_id", record.request_id)]  # fmt: skip
    return "audit " + " ".join(f"{key}={value}" for key, value in fields)


def _seconds(value: float | None) -> str | None:
    return None if value is None else f"{value:.3f}"


def of(request: Any) -> Access:
    """The access record of ``request`` (a Starlette request), made on the spot outside the middleware."""
    record = request.scope.get(SCOPE_KEY)
    if record is None:  # an app without AccessLog (a test of one route): a record nobody writes out
        record = request.scope[SCOPE_KEY] = Access(_request_id(request.scope), "other")
    return record


def _request_id(scope: dict[str, Any]) -> str:
    # Serve's proxy always sets the header; without Serve (tests), make one.
    header = next((v for k, v in scope.get("headers", ()) if k == b"x-request-id"), None)
    return header.decode("latin-1") if header else uuid.uuid4().hex


def safe_request_id(scope: dict[str, Any]) -> str:
    """The request's id, replaced (in ``scope`` and Serve's request context) unless it is a safe one."""
    given = _request_id(scope)
    if SAFE_REQUEST_ID.fullmatch(given):
        return given
    new = uuid.uuid4().hex
    logger.warning(
        "replaced a client request id of %d characters outside [A-Za-z0-9._:-]{1,128} with request_id=%s",
        len(given),
        new,
        extra={"request_id": new},
    )
    others = [(k, v) for k, v in scope["headers"] if k != b"x-request-id"]
    scope["headers"] = [*others, (b"x-request-id", new.encode())]
    _set_serve_request_id(new)
    return new


def _set_serve_request_id(request_id: str) -> None:
    """Make Serve's request context (its log lines, and the calls this request makes) carry ``request_id``."""
    try:
        from ray.serve import context
    except ImportError:  # pragma: no cover - Ray is always installed where this runs
        return
    current = context._serve_request_context.get()
    if current is None or not dataclasses.is_dataclass(current):  # outside a Serve request (tests)
        return
    context._serve_request_context.set(dataclasses.replace(current, request_id=request_id))


class AccessLog:
    """ASGI middleware: an :class:`Access` record per request, logged and measured when it ends.

    It also answers an exception no route handled (500, or 503 for a replica that went away), so that
    the status it logs is the one the client got.
    """

    def __init__(self, app: Any, routes: Sequence[BaseRoute], retry_after_s: int) -> None:
        self.app = app
        self.routes = routes
        self.retry_after_s = retry_after_s

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        record = scope[SCOPE_KEY] = Access(safe_request_id(scope), self._route(scope))

        async def watch(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                record.status = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                record.complete = True
            await send(message)

        try:
            await self.app(scope, receive, watch)
        except Exception as exc:
            if record.status is not None:
                raise
            family = family_of(scope["path"].removeprefix(scope.get("root_path", "")) or "/")
            await from_exception(exc, family, self.retry_after_s).response(family)(scope, receive, watch)
        finally:
            total_s = time.monotonic() - record.arrived
            metrics.request_done(record.route, record.model, record.status or CLIENT_GONE, total_s)
            logger.info(record.line(), extra={"request_id": record.request_id})
            path = scope["path"].removeprefix(scope.get("root_path", ""))
            if path == "/admin" or path.startswith("/admin/"):
                audit_logger.info(audit_line(record, scope["method"]), extra={"request_id": record.request_id})

    def _route(self, scope: dict[str, Any], routes: Sequence[BaseRoute] | None = None) -> str:
        """The template of the route that serves ``scope`` (405s included), else ``other``."""
        for route in self.routes if routes is None else routes:
            included = getattr(route, "original_router", None)  # FastAPI's include_router (/admin)
            if included is not None:
                found = self._route(scope, included.routes)
                if found != "other":
                    return found
                continue
            match, _ = route.matches(scope)
            if match != Match.NONE:
                return getattr(route, "path", None) or "other"
        return "other"
