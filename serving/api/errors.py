"""One place that turns every failure into a status code, and one renderer per error shape.

Two route families, two shapes:

    native (/generate, /healthz, /admin):  {"error": {"code": 413, "type": "prompt_too_long", "message": "..."}}
    OpenAI (/v1/*):                        {"error": {"message": "...", "type": "...", "param": ..., "code": ...}}

Validation -> 422 native / 400 OpenAI (malformed JSON -> 400 both), too large -> 413, unknown model
-> 404, missing key -> 401, overloaded -> 503 with Retry-After, timeout -> 504, anything else -> 500
with a generic message (the traceback goes to the log only).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Literal

from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from engine.errors import ChatTemplateError, PromptTooLongError, RequestError, RowFailedError, StepFailedError
from serving.pool.errors import (
    ModelExistsError,
    ModelUnavailableError,
    ModelValidationError,
    PoolError,
    UnknownModelError,
)

logger = logging.getLogger("ray.serve")

Family = Literal["native", "openai"]

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


def family_of(path: str) -> Family:
    """The error shape of the route at ``path`` (relative to the app's root)."""
    return "openai" if path == "/v1" or path.startswith("/v1/") else "native"


def retry_headers(retry_after_s: int) -> dict[str, str]:
    return {"Retry-After": str(retry_after_s)}


def overloaded(retry_after_s: int, what: str = "the model") -> ApiError:
    return ApiError(
        503,
        "overloaded",
        f"{what} is at capacity and its queue is full; retry in {retry_after_s} s",
        headers=retry_headers(retry_after_s),
    )


def invalid(errors: Sequence[dict[str, Any]], family: Family, prefix: Sequence[str] = ("body",)) -> ApiError:
    """A 4xx from pydantic's error list: 422 on native routes, 400 on OpenAI's."""
    details = [_detail(error, prefix) for error in errors]
    message = "; ".join(f"{d['field']}: {d['message']}" if d["field"] else d["message"] for d in details)
    param = details[0]["field"] or None if details else None
    status = 400 if family == "openai" else 422
    kind = "invalid_request_error" if family == "openai" else "validation_error"
    return ApiError(status, kind, message, param=param, details=details if family == "native" else None)


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
            return ApiError(413, "prompt_too_long", text, param="prompt")
        if isinstance(err, ChatTemplateError):
            return ApiError(400, "chat_template", text, param="messages")
        return ApiError(400 if family == "openai" else 422, "invalid_request", text)
    if isinstance(cause, StepFailedError):  # the engine's step failed, not this request: retry
        return ApiError(503, "engine_step_failed", str(cause), headers=retry_headers(retry_after_s))
    if isinstance(cause, RowFailedError):  # this request's own row failed; its message names no internals
        return ApiError(500, "generation_failed", str(cause))
    # The original, not Ray's wrapper: the wrapper is a PoolError too, but its text is the remote traceback.
    pool_error = _pool_error(cause if isinstance(cause, PoolError) else exc)
    if pool_error is not None:
        return pool_error
    if isinstance(exc, BackPressureError):
        return overloaded(retry_after_s)
    if isinstance(exc, TimeoutError):
        return ApiError(504, "timeout", "the model did not answer in time (REQUEST_TIMEOUT_S); retry or ask for less")
    if isinstance(exc, DeploymentUnavailableError | ActorDiedError | ActorUnavailableError | RayActorError):
        return ApiError(
            503,
            "unavailable",
            f"the model replica went away while serving this request; retry in {retry_after_s} s",
            headers=retry_headers(retry_after_s),
        )
    logger.error("unhandled error", exc_info=exc)
    return ApiError(500, "internal_error", "internal error; the server log has the details")


def _pool_error(exc: BaseException) -> ApiError | None:
    """The pool's refusals (raised in the pool controller, they cross the handle as their own types)."""
    if isinstance(exc, ModelValidationError):
        detail = {"field": exc.field, "message": exc.message}
        return ApiError(422, "validation_error", str(exc), param=exc.field, details=[detail])
    if isinstance(exc, ModelExistsError):
        return ApiError(409, "model_exists", str(exc))
    if isinstance(exc, UnknownModelError):
        return ApiError(404, "model_not_found", str(exc), param="model")
    if isinstance(exc, ModelUnavailableError):
        return ApiError(503, "no_room", str(exc), headers=retry_headers(exc.retry_after_s))
    return None
