"""One place that turns every failure into an HTTP status and one JSON error shape.

    {"error": {"code": 413, "type": "prompt_too_long", "message": "...", "details": [...]}}

Validation -> 422 (malformed JSON -> 400), too large -> 413, overloaded -> 503 with Retry-After,
timeout -> 504, anything else -> 500 with a generic message (the traceback goes to the log only).
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray.exceptions import ActorDiedError, ActorUnavailableError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine.errors import EngineRequestError, PromptTooLongError

logger = logging.getLogger("ray.serve")


class ServiceError(Exception):
    """An error with a status code, a machine-readable type and a message a person can act on."""

    def __init__(
        self,
        status_code: int,
        kind: str,
        message: str,
        details: list[dict[str, Any]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.kind = kind
        self.message = message
        self.details = details
        self.headers = headers


def error_response(error: ServiceError) -> JSONResponse:
    body: dict[str, Any] = {"code": error.status_code, "type": error.kind, "message": error.message}
    if error.details is not None:
        body["details"] = jsonable_encoder(error.details)
    return JSONResponse({"error": body}, status_code=error.status_code, headers=error.headers)


def from_validation(exc: RequestValidationError) -> ServiceError:
    errors = list(exc.errors())
    if any(e.get("type") == "json_invalid" for e in errors):
        reason = next((e.get("ctx", {}).get("error") for e in errors if e.get("type") == "json_invalid"), None)
        return ServiceError(400, "invalid_json", f"the request body is not valid JSON ({reason or 'parse error'})")
    details = [_detail(e) for e in errors]
    message = "; ".join(f"{d['field']}: {d['message']}" if d["field"] else d["message"] for d in details)
    return ServiceError(422, "validation_error", message, details)


def _detail(error: dict[str, Any]) -> dict[str, Any]:
    loc = [str(part) for part in error.get("loc", ()) if part != "body"]
    message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
    detail: dict[str, Any] = {"field": ".".join(loc), "message": message, "type": error.get("type")}
    value = error.get("input")
    if isinstance(value, str | int | float | bool) and len(repr(value)) <= 80 and error.get("type") != "missing":
        detail["input"] = value
    return detail


def from_exception(exc: BaseException, retry_after_s: int) -> ServiceError:
    """Map anything the Gateway catches (including errors raised inside a model replica)."""
    if isinstance(exc, ServiceError):
        return exc
    cause = getattr(exc, "cause", None) or exc  # Ray wraps replica errors; .cause is the original
    if isinstance(exc, EngineRequestError):
        kind = "prompt_too_long" if isinstance(exc, PromptTooLongError) else "invalid_request"
        return ServiceError(exc.status_code, kind, str(cause.args[0] if cause.args else cause))
    retry = {"Retry-After": str(retry_after_s)}
    if isinstance(exc, BackPressureError):
        return ServiceError(
            503, "overloaded", "the model is at capacity and its queue is full; retry shortly", headers=retry
        )
    if isinstance(exc, TimeoutError):
        return ServiceError(504, "timeout", "the model did not answer in time (REQUEST_TIMEOUT_S)")
    if isinstance(exc, DeploymentUnavailableError | ActorDiedError | ActorUnavailableError):
        return ServiceError(503, "unavailable", "the model replica became unavailable; retry", headers=retry)
    logger.error("unhandled error", exc_info=exc)
    return ServiceError(500, "internal_error", "internal error; the server log has the details")


def install_error_handlers(app: FastAPI, retry_after_s: int) -> None:
    """Route every error a FastAPI app can raise through the one error shape."""

    async def on_validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(from_validation(exc))

    async def on_http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        error = ServiceError(exc.status_code, kind, str(exc.detail), headers=getattr(exc, "headers", None))
        return error_response(error)

    async def on_error(_: Request, exc: Exception) -> JSONResponse:
        return error_response(from_exception(exc, retry_after_s))

    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(Exception, on_error)
