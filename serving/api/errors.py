"""One place that turns every failure into a status code, and one renderer per error shape.

Two route families, two shapes:

    native (/generate, /healthz, /admin):  {"error": {"code": 413, "type": "prompt_too_long", "message": "..."}}
    OpenAI (/v1/*, /tokenize, /detokenize): {"error": {"message": "...", "type": "...", "param": ..., "code": ...}}

Every error is made by one factory, :func:`api_error`, from its *kind* (the table ``KINDS``): the
kind fixes the status, and Retry-After for the kinds a client should retry. ``from_exception`` maps
what a route catches (the engine's request errors, the pool's refusals, Ray's and Serve's failures)
onto those kinds:

    validation  -> 422 native / 400 OpenAI     not_found   -> 404        overloaded  -> 503 + Retry-After
    bad_request -> 400 (malformed JSON, ...)   conflict    -> 409        no_room     -> 503 + Retry-After
    unsupported -> 400 (a feature we lack)     budget      -> 413        unavailable -> 503 + Retry-After
    unauthorized -> 401                        media_type  -> 415        timeout     -> 504
    internal    -> 500 with a generic message (the traceback goes to the log only)
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine.errors import ChatTemplateError, PromptTooLongError, RequestError, RowFailedError, StepFailedError
from serving.pool.errors import (
    ModelExistsError,
    ModelRequiredError,
    ModelUnavailableError,
    ModelValidationError,
    PoolError,
    TooManyWaitersError,
    UnknownModelError,
    WrongTaskError,
)

logger = logging.getLogger("ray.serve")

Family = Literal["native", "openai"]

Kind = Literal[
    "validation", "bad_request", "unsupported", "unauthorized", "not_found", "conflict", "budget", "media_type",
    "no_room", "overloaded", "unavailable", "timeout", "internal",
]  # fmt: skip

# kind -> (status, the code clients read when the call site names none, whether to send Retry-After)
KINDS: dict[str, tuple[int, str, bool]] = {
    "validation": (422, "validation_error", False),  # 400 invalid_request_error on OpenAI's routes
    "bad_request": (400, "invalid_request_error", False),
    "unsupported": (400, "unsupported_parameter", False),
    "unauthorized": (401, "invalid_api_key", False),
    "not_found": (404, "model_not_found", False),
    "conflict": (409, "model_exists", False),
    "budget": (413, "too_large", False),
    "media_type": (415, "unsupported_media_type", False),
    "no_room": (503, "no_room", True),
    "overloaded": (503, "overloaded", True),
    "unavailable": (503, "unavailable", True),
    "timeout": (504, "timeout", False),
    "internal": (500, "internal_error", False),
}

# OpenAI's error `type` per status (what its API and the `openai` SDK's users see).
_OPENAI_TYPES = {401: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "server_error"}


class ApiError(Exception):
    """An error with a status, a machine-readable kind, a message a person can act on, and the
    request field it concerns (``param``, dotted, e.g. ``messages.1.content``)."""

    def __init__(
        self,
        status: int,
        kind: str,
        message: str,
        *,
        param: str | None = None,
        details: list[dict[str, Any]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind
        self.message = message
        self.param = param
        self.details = details
        self.headers = headers

    def openai_body(self) -> dict[str, Any]:
        kind = _OPENAI_TYPES.get(self.status, "invalid_request_error" if self.status < 500 else "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.kind}}

    def native_body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"code": self.status, "type": self.kind, "message": self.message}
        if self.details is not None:
            body["details"] = jsonable_encoder(self.details)
        return {"error": body}

    def body(self, family: Family) -> dict[str, Any]:
        return self.openai_body() if family == "openai" else self.native_body()

    def response(self, family: Family) -> JSONResponse:
        return JSONResponse(self.body(family), status_code=self.status, headers=self.headers)


def api_error(
    kind: Kind,
    message: str,
    *,
    code: str | None = None,
    family: Family = "native",
    param: str | None = None,
    details: list[dict[str, Any]] | None = None,
    retry_after_s: int | None = None,
    headers: dict[str, str] | None = None,
) -> ApiError:
    """The one way to make an error: ``kind`` fixes the status and Retry-After; ``code`` what clients read.

    >>> error = api_error("overloaded", "the model is at capacity", retry_after_s=3)
    >>> error.status, error.kind, error.headers
    (503, 'overloaded', {'Retry-After': '3'})
    >>> api_error("validation", "n: too big", family="openai", param="n").status
    400
    """
    status, default_code, retry = KINDS[kind]
    if kind == "validation" and family == "openai":
        status, default_code = 400, "invalid_request_error"
    if retry:
        if retry_after_s is None:
            raise ValueError(f"an error of kind {kind!r} needs retry_after_s")
        headers = {**(headers or {}), "Retry-After": str(retry_after_s)}
    return ApiError(status, code or default_code, message, param=param, details=details, headers=headers)


def unsupported(param: str, what: str) -> ApiError:
    """400: a feature this service does not have; the message starts with the field."""
    return api_error("unsupported", f"{param}: {what}", param=param)


def invalid_value(param: str, what: str) -> ApiError:
    """400: a value this service cannot take; the message starts with the field."""
    return api_error("bad_request", f"{param}: {what}", param=param)


def http_error(status: int, detail: str, headers: dict[str, str] | None = None) -> ApiError:
    """Starlette's own refusals (no such route, wrong method), in the route family's shape."""
    code = {404: "not_found", 405: "method_not_allowed"}.get(status, "http_error")
    return ApiError(status, code, detail, headers=headers)


OPENAI_PATHS = ("/tokenize", "/detokenize")  # vLLM's, beside its OpenAI routes: their error shape too


def family_of(path: str) -> Family:
    """The error shape of the route at ``path`` (relative to the app's root)."""
    return "openai" if path == "/v1" or path.startswith("/v1/") or path in OPENAI_PATHS else "native"


def overloaded(retry_after_s: int, what: str = "the model") -> ApiError:
    return api_error(
        "overloaded",
        f"{what} is at capacity and its queue is full; retry in {retry_after_s} s",
        retry_after_s=retry_after_s,
    )


def invalid(errors: Sequence[dict[str, Any]], family: Family, prefix: Sequence[str] = ("body",)) -> ApiError:
    """A 4xx from pydantic's error list: 422 on native routes, 400 on OpenAI's."""
    details = [_detail(error, prefix) for error in errors]
    message = "; ".join(f"{d['field']}: {d['message']}" if d["field"] else d["message"] for d in details)
    param = details[0]["field"] or None if details else None
    return api_error("validation", message, family=family, param=param, details=details if family == "native" else None)


def _detail(error: dict[str, Any], prefix: Sequence[str]) -> dict[str, Any]:
    loc = [str(part) for part in error.get("loc", ())]
    while loc and loc[0] in prefix:
        loc = loc[1:]
    message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
    detail: dict[str, Any] = {"field": ".".join(loc), "message": message, "type": error.get("type")}
    value = error.get("input")
    if isinstance(value, str | int | float | bool) and len(repr(value)) <= 80 and error.get("type") != "missing":
        detail["input"] = value
    return detail


def from_exception(exc: BaseException, family: Family, retry_after_s: int) -> ApiError:
    """Map anything a route catches, including errors raised inside a model replica."""
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

    if isinstance(exc, ApiError):
        return exc
    cause = getattr(exc, "cause", None) or exc  # Ray wraps a replica's exception; .cause is the original
    if isinstance(cause, ValidationError):
        return invalid(cause.errors(include_url=False), family, prefix=())
    if isinstance(exc, RequestError) or isinstance(cause, RequestError):
        err = exc if isinstance(exc, RequestError) else cause
        text = str(err.args[0]) if err.args else str(err)
        if isinstance(err, PromptTooLongError):
            return api_error("budget", text, code="prompt_too_long", param="prompt")
        if isinstance(err, ChatTemplateError):
            return api_error("bad_request", text, code="chat_template", param="messages")
        return api_error("validation", text, code="invalid_request", family=family, param=getattr(err, "param", None))
    if isinstance(cause, StepFailedError):  # the engine's step failed, not this request: retry
        return api_error("unavailable", str(cause), code="engine_step_failed", retry_after_s=retry_after_s)
    if isinstance(cause, RowFailedError):  # this request's own row failed; its message names no internals
        return api_error("internal", str(cause), code="generation_failed")
    # The original, not Ray's wrapper: the wrapper is a PoolError too, but its text is the remote traceback.
    pool_error = _pool_error(cause if isinstance(cause, PoolError) else exc, family)
    if pool_error is not None:
        return pool_error
    if isinstance(exc, BackPressureError):
        return overloaded(retry_after_s)
    if isinstance(exc, TimeoutError):
        return api_error("timeout", "the model did not answer in time (REQUEST_TIMEOUT_S); retry or ask for less")
    if isinstance(exc, DeploymentUnavailableError | ActorDiedError | ActorUnavailableError | RayActorError):
        message = f"the model replica went away while serving this request; retry in {retry_after_s} s"
        return api_error("unavailable", message, retry_after_s=retry_after_s)
    logger.error("unhandled error", exc_info=exc)
    return api_error("internal", "internal error; the server log has the details")


def _pool_error(exc: BaseException, family: Family) -> ApiError | None:
    """The pool's refusals (raised in the pool controller, they cross the handle as their own types)."""
    if isinstance(exc, ModelValidationError):
        detail = {"field": exc.field, "message": exc.message}
        return api_error("validation", str(exc), code="validation_error", param=exc.field, details=[detail])
    if isinstance(exc, ModelRequiredError):
        return api_error("validation", str(exc), code="model_required", param="model")
    if isinstance(exc, ModelExistsError):
        return api_error("conflict", str(exc))
    if isinstance(exc, UnknownModelError):
        return api_error("not_found", str(exc), param="model")
    if isinstance(exc, WrongTaskError):
        return api_error("bad_request", str(exc), code="wrong_task", param="model")
    if isinstance(exc, ModelUnavailableError):
        return api_error("no_room", str(exc), retry_after_s=exc.retry_after_s)
    if isinstance(exc, TooManyWaitersError):
        return api_error("overloaded", str(exc), code="too_many_waiters", retry_after_s=exc.retry_after_s)
    return None


def install_error_handlers(app: FastAPI, retry_after_s: int) -> None:
    """Every error a route can raise leaves in its family's shape (OpenAI's under /v1)."""

    def family(request: Request) -> Family:
        return family_of(request.url.path.removeprefix(request.scope.get("root_path", "")) or "/")

    async def on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return invalid(exc.errors(), family(request)).response(family(request))

    async def on_api_error(request: Request, exc: ApiError) -> JSONResponse:
        return exc.response(family(request))

    async def on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return http_error(exc.status_code, str(exc.detail), getattr(exc, "headers", None)).response(family(request))

    async def on_error(request: Request, exc: Exception) -> JSONResponse:
        return from_exception(exc, family(request), retry_after_s).response(family(request))

    app.add_exception_handler(RequestValidationError, on_validation)  # type: ignore[arg-type]
    app.add_exception_handler(ApiError, on_api_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, on_http)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, on_error)
