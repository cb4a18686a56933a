"""The HTTP API (FastAPI), built around a backend that reaches the models.

``create_app`` takes the backend as an argument, so the whole HTTP layer runs in tests with a fake
one; in the service the backend holds a Ray Serve handle per model (``serving.gateway``). Routes
stay short: each dialect (``serving.api.native``, ``serving.api.openai*``) translates and renders,
``serving.backend.ModelCall`` drives a request's stream, ``serving.api.errors`` maps failures.
This module must not import torch or transformers: it runs in the light Gateway.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine.types import Completion, GenerationRequest, Started
from observability import metrics
from serving.api import access, native, sse
from serving.api.admin import admin_router
from serving.api.auth import BEARER, KeyCheck, require
from serving.api.body import StrictJSONMiddleware
from serving.api.budget import check_output_budget
from serving.api.errors import ApiError, Family, api_error, family_of, from_exception, http_error, invalid
from serving.api.gate import HeaderGate, guards
from serving.api.native_schemas import ErrorResponse, GenerateRequest, GenerateResponse, HealthResponse
from serving.api.openai import OpenAIDialect
from serving.api.openai_chat import CHAT
from serving.api.openai_completions import COMPLETIONS
from serving.api.openai_responses import ChatCompletionResponse, CompletionResponse
from serving.api.openai_schemas import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList, OpenAIError
from serving.backend import ModelBackend, ModelCall
from serving.page import mount_page
from settings import ModelConfig, Settings

logger = logging.getLogger("ray.serve")


def _responses(model: type, codes: dict[int, str]) -> dict[int | str, dict[str, Any]]:
    return {code: {"model": model, "description": text} for code, text in codes.items()}


NATIVE_ERRORS = _responses(
    ErrorResponse,
    {
        400: "Body is not valid JSON.",
        401: "Missing or wrong API key.",
        404: "Unknown model.",
        413: "Body, prompt or number of prompts over the limits, or prompt too long for the model.",
        415: "Body is not JSON.",
        422: "Request does not match the schema, or a value is out of range.",
        503: "At capacity (Retry-After says when to retry), or the model replica went away.",
        504: "No answer within REQUEST_TIMEOUT_S.",
    },
)
OPENAI_ERRORS = _responses(
    OpenAIError,
    {
        400: "Invalid value, or a feature this service does not support (the message names the field).",
        401: "Missing or wrong API key.",
        404: "Unknown model (the message lists the served ones).",
        413: "Body, prompt or n over the limits, or prompt too long for the model.",
        415: "Body is not JSON.",
        503: "At capacity (Retry-After says when to retry), or the model replica went away.",
        504: "No answer within REQUEST_TIMEOUT_S.",
    },
)


def request_id(request: Request) -> str:
    """Serve's proxy gives every request an x-request-id (the client's own, or a new one)."""
    return access.of(request).request_id


def create_app(backend: ModelBackend, settings: Settings) -> FastAPI:
    """The FastAPI app: ``/v1/*`` (OpenAI), ``/generate``, ``/healthz`` and the docs at ``/docs``."""
    app = FastAPI(
        title="Scale-to-zero LLM service",
        description="OpenAI-compatible and native text generation on Ray Serve. Every model scales to zero when "
        "idle; `/healthz` and `/v1/models` never wake one. With API keys set, send `Authorization: Bearer <key>`.",
        version="2.0.0",
    )
    keys = KeyCheck(settings.api_keys)
    checked = require(keys)

    async def api_key(request: Request, _: Annotated[Any, Security(BEARER)]) -> None:
        await checked(request)

    auth = [Depends(api_key)]

    async def resolve(request: Request, requested: str | None) -> ModelConfig:
        model = await backend.resolve(requested)
        access.of(request).model = model.name  # the access line names it even if the request fails later
        return model

    _install_error_handlers(app, settings.retry_after_s)
    if settings.admin_api_key is not None:  # without the key the admin API does not exist (404)
        app.include_router(admin_router(backend, KeyCheck([settings.admin_api_key])))  # type: ignore[arg-type]
    app.add_middleware(StrictJSONMiddleware, max_body_bytes=settings.max_body_bytes)
    # Added after (so run before) the body checks: a request without its key never has its body read.
    admin_keys = KeyCheck([settings.admin_api_key]) if settings.admin_api_key is not None else None
    app.add_middleware(HeaderGate, rules=guards(keys, admin_keys))
    # Outermost of ours: it sees every answer, the body checks' and the gate's refusals included.
    app.add_middleware(access.AccessLog, routes=app.router.routes, retry_after_s=settings.retry_after_s)
    calls = Calls(backend, settings)

    @app.get("/healthz", response_model=HealthResponse, summary="Liveness and every model's state")
    async def healthz() -> HealthResponse:
        """Answered by the Gateway alone: probes never start a model replica."""
        statuses = await backend.statuses()
        return HealthResponse(
            status="ok", auth="required" if keys.required else "none", models=[s.card() for s in statuses]
        )

    @app.get("/v1/models", response_model=ModelList, responses=OPENAI_ERRORS, dependencies=auth, summary="Models")
    async def list_models() -> ModelList:
        """Every served model with its state; never wakes one."""
        return ModelList(data=[ModelCard(**s.card()) for s in await backend.statuses()])

    @app.get("/v1/models/{model:path}", response_model=ModelCard, responses=OPENAI_ERRORS, dependencies=auth)
    async def get_model(model: str, request: Request) -> ModelCard:
        config = await resolve(request, model)
        return ModelCard(**(await backend.status(config)).card())

    async def openai_route(dialect: OpenAIDialect, body: Any, request: Request) -> Any:
        """Both OpenAI routes: translate, then stream or answer whole, in the dialect's shapes."""
        model = await resolve(request, body.model)
        call = dialect.translate(body, model, settings, request_id(request))
        if body.stream:
            render = lambda items: dialect.stream(body, model, call, items)  # noqa: E731
            return await calls.streamed(request, model, call, render, dialect.stream_error, "openai")
        started, done, headers = await calls.unary(request, model, call, "openai")
        return _json(dialect.response(body, model, call, started, done), headers)

    @app.post(
        "/v1/completions",
        response_model=CompletionResponse,
        responses=OPENAI_ERRORS,
        dependencies=auth,
        summary="OpenAI completions (streams with stream: true)",
    )
    async def completions(body: CompletionRequest, request: Request) -> Any:
        return await openai_route(COMPLETIONS, body, request)

    @app.post(
        "/v1/chat/completions",
        response_model=ChatCompletionResponse,
        responses=OPENAI_ERRORS,
        dependencies=auth,
        summary="OpenAI chat completions (streams with stream: true)",
    )
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        return await openai_route(CHAT, body, request)

    @app.post(
        "/generate",
        response_model=GenerateResponse,
        responses=NATIVE_ERRORS,
        dependencies=auth,
        summary="Generate a completion for each prompt (streams with stream: true)",
    )
    async def generate(body: GenerateRequest, request: Request) -> Any:
        """Completions for `prompt` or `prompts`. A model at zero replicas starts first (the call waits)."""
        model = await resolve(request, body.model)
        call = native.translate(body, model, settings, request_id(request))
        if body.stream:
            render = lambda items: native.stream(model, call, items)  # noqa: E731
            return await calls.streamed(request, model, call, render, native.stream_error, "native")
        _, done, headers = await calls.unary(request, model, call, "native")
        return _json(native.response(model, call, done), headers)

    mount_page(app)
    return app


def _json(body: Any, headers: dict[str, str]) -> JSONResponse:
    return JSONResponse(body.model_dump(mode="json"), headers=headers)


class Calls:
    """How a route reaches a model, streamed or not, within REQUEST_TIMEOUT_S.

    What a call learns (the model, its tokens, queue time, first token) goes to the request's
    access record (``serving.api.access``); a request that finds its model at zero counts a wake.
    """

    def __init__(self, backend: ModelBackend, settings: Settings) -> None:
        self.backend = backend
        self.settings = settings
        self._waking: set[str] = set()  # models whose current wake a request has counted already

    async def _begin(self, request: Request, model: ModelConfig, stream: bool) -> tuple[access.Access, bool]:
        """The request's access record, and whether its model was not running when it arrived."""
        record = access.of(request)
        record.model, record.stream = model.name, stream
        state = (await self.backend.status(model)).state
        if state in ("scaled_to_zero", "evicted") and model.name not in self._waking:
            self._waking.add(model.name)
            metrics.model_woke(model.name, "request")
        return record, state != "running"

    def _failure(self, record: access.Access, exc: Exception, family: Family) -> ApiError:
        return self._counted(record, from_exception(exc, family, self.settings.retry_after_s), exc)

    @staticmethod
    def _counted(record: access.Access, error: ApiError, exc: BaseException | None = None) -> ApiError:
        """``error``, counted as a rejection when it turns the request away at capacity."""
        from ray.serve.exceptions import BackPressureError

        if isinstance(exc, BackPressureError):
            metrics.rejected(record.route, record.model, "queue_full")
        elif error.kind == "no_room":  # the pool found the model no room in time
            metrics.rejected(record.route, record.model, "no_room")
        return error

    async def unary(
        self, request: Request, model: ModelConfig, call: GenerationRequest, family: Family
    ) -> tuple[Started, list[Completion], dict]:
        """The whole answer; ``x-cold-start`` says how long it waited for a replica to start."""
        check_output_budget(call, self.settings.max_output_tokens_per_request)
        record, cold = await self._begin(request, model, stream=False)
        try:
            started, done = await asyncio.wait_for(self.backend.generate(model, call), self.settings.request_timeout_s)
        except TimeoutError:
            raise self._counted(record, await self.timed_out(model, family)) from None
        except Exception as exc:  # the model's failures become statuses here, not in Starlette's error path
            raise self._failure(record, exc, family) from None
        finally:
            self._waking.discard(model.name)  # the model is up, or this wake failed
        record.started(started)
        record.finished(done)
        if not cold:
            return started, done, {}
        record.cold_start_s = time.monotonic() - record.arrived
        return started, done, {"x-cold-start": f"{record.cold_start_s:.3f}"}

    async def streamed(
        self,
        request: Request,
        model: ModelConfig,
        call: GenerationRequest,
        render: Callable[[AsyncIterator[Any]], AsyncIterator[str]],
        render_error: Callable[[ApiError], str],
        family: Family,
    ) -> StreamingResponse:
        """SSE; errors before the model server takes the request still get their own status."""
        settings = self.settings
        check_output_budget(call, self.settings.max_output_tokens_per_request)
        record, cold = await self._begin(request, model, stream=True)
        try:
            stream = await ModelCall.open(
                self.backend.stream(model, call), settings.request_timeout_s, wait_s=settings.stream_heartbeat_s
            )
        except TimeoutError:
            self._waking.discard(model.name)
            raise self._counted(record, await self.timed_out(model, family)) from None
        except Exception as exc:
            self._waking.discard(model.name)
            raise self._failure(record, exc, family) from None

        async def waiting(elapsed: float) -> str:
            status = await self.backend.status(model)
            phase = (status.waking or {}).get("current") or status.state.replace("_", " ")
            return f"waking {model.name}: {phase} ({elapsed:.0f} s)"

        async def watched(items: AsyncIterator[Any]) -> AsyncIterator[Any]:
            async for item in record.meter(items):
                if isinstance(item, Started):
                    self._waking.discard(model.name)
                    if cold:
                        record.cold_start_s = time.monotonic() - record.arrived
                yield item

        async def body() -> AsyncIterator[str]:
            try:
                async for chunk in render(watched(stream.items(settings.stream_heartbeat_s, waiting))):
                    yield chunk
            except TimeoutError:
                error = self._counted(record, await self.timed_out(model, family))
                record.error = error.kind
                yield render_error(error)
            except Exception as exc:  # the status is sent already: the error becomes an event
                error = self._failure(record, exc, family)
                record.error = error.kind
                yield render_error(error)
            finally:
                self._waking.discard(model.name)

        return StreamingResponse(body(), media_type=sse.MEDIA_TYPE, headers=sse.HEADERS)

    async def timed_out(self, model: ModelConfig, family: Family) -> ApiError:
        """504 for a slow answer; 503 with Retry-After when the model was still waiting for room."""
        if await self.backend.waiting_for_room(model):
            retry = self.settings.retry_after_s
            message = (
                f"model {model.name!r} found no room on the cluster within REQUEST_TIMEOUT_S "
                f"(models of higher priority hold it); retry in {retry} s"
            )
            return api_error("no_room", message, retry_after_s=retry)
        return from_exception(TimeoutError(), family, self.settings.retry_after_s)


def _install_error_handlers(app: FastAPI, retry_after_s: int) -> None:
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


__all__ = ["create_app"]
