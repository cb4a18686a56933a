"""The HTTP API (FastAPI), built around a backend that reaches the models.

``create_app`` takes the backend as an argument, so the whole HTTP layer runs in tests with a fake
one; in the service the backend holds a Ray Serve handle per model (``serving.gateway``). Routes
stay short: a route resolves its model and hands the body to its dialect (``serving.api.native``,
``serving.api.openai``: the completions and chat dialects), which translates, reaches the model
through the call driver (``serving.api.calls``: REQUEST_TIMEOUT_S, heartbeats while a model wakes)
and renders; ``serving.api.errors`` maps every failure.
This module must not import torch or transformers: it runs in the light Gateway.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

from fastapi import Depends, FastAPI, Request, Security

from serving.api import access, native, openai_embeddings, openai_tokenize
from serving.api.admin import admin_router
from serving.api.auth import BEARER, KeyCheck, bearer_token, require
from serving.api.body import StrictJSONMiddleware
from serving.api.calls import Calls
from serving.api.errors import install_error_handlers
from serving.api.gate import HeaderGate, guards
from serving.api.json_body import json_response, off_the_loop
from serving.api.native_schemas import ErrorResponse, GenerateRequest, GenerateResponse, HealthResponse
from serving.api.openai import CHAT, COMPLETIONS
from serving.api.openai_embeddings import EmbeddingsRequest, EmbeddingsResponse
from serving.api.openai_responses import ChatCompletionResponse, CompletionResponse
from serving.api.openai_schemas import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList, OpenAIError
from serving.api.openai_tokenize import DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse
from serving.backend import ModelBackend
from serving.models import check_route
from serving.page import mount_page
from settings import ModelConfig, Settings

logger = logging.getLogger("ray.serve")
Route = TypeVar("Route", bound=Callable[..., Any])


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
    """The FastAPI app: ``/v1/*`` (OpenAI), ``/tokenize`` and ``/detokenize`` (vLLM's), ``/generate``,
    ``/healthz`` and the docs at ``/docs``."""
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

    async def resolve(request: Request, requested: str | None, route: str | None = None) -> ModelConfig:
        """The model a request names; with ``route``, one that route serves (WrongTaskError otherwise)."""
        model = await backend.resolve(requested)
        access.of(request).model = model.name  # the access line names it even if the request fails later
        if route is not None:
            check_route(model, route)
        return model

    install_error_handlers(app, settings.retry_after_s)
    if settings.admin_api_key is not None:  # without the key the admin API does not exist (404)
        app.include_router(admin_router(backend, KeyCheck([settings.admin_api_key])))  # type: ignore[arg-type]
    app.add_middleware(StrictJSONMiddleware, max_body_bytes=settings.max_body_bytes)
    # Added after (so run before) the body checks: a request without its key never has its body read.
    admin_keys = KeyCheck([settings.admin_api_key]) if settings.admin_api_key is not None else None
    app.add_middleware(
        HeaderGate,
        rules=guards(keys, admin_keys, docs=settings.docs_need_key),
        delay_s=settings.auth_failure_delay_s,
        max_held=settings.auth_failure_max_held,
    )
    # Outermost of ours: it sees every answer, the body checks' and the gate's refusals included.
    app.add_middleware(access.AccessLog, routes=app.router.routes, retry_after_s=settings.retry_after_s)
    calls = Calls(backend, settings)

    @app.get("/healthz", response_model=HealthResponse, summary="Liveness and every model's state")
    async def healthz(request: Request) -> HealthResponse:
        """Answered by the Gateway alone: probes never start a model replica. With keys set, a caller
        without one gets only each model's id and state; details (model ids, paths, replicas, timings)
        need a key."""
        statuses = await backend.statuses()
        token = bearer_token(request) or ""
        detailed = not keys.required or keys.accepts(token) or (admin_keys is not None and admin_keys.accepts(token))
        models = [s.card() if detailed else {"id": s.name, "state": str(s.state)} for s in statuses]
        return HealthResponse(status="ok", auth="required" if keys.required else "none", models=models)

    def post(path: str, answer: type, summary: str, native: bool = False) -> Callable[[Route], Route]:
        """A model route: its answer's schema and its family's errors in the docs, the key required."""
        errors = NATIVE_ERRORS if native else OPENAI_ERRORS
        return app.post(path, response_model=answer, responses=errors, dependencies=auth, summary=summary)

    @app.get("/v1/models", response_model=ModelList, responses=OPENAI_ERRORS, dependencies=auth, summary="Models")
    async def list_models() -> ModelList:
        """Every served model with its state; never wakes one."""
        return ModelList(data=[ModelCard(**s.card()) for s in await backend.statuses()])

    @app.get("/v1/models/{model:path}", response_model=ModelCard, responses=OPENAI_ERRORS, dependencies=auth)
    async def get_model(model: str, request: Request) -> ModelCard:
        config = await resolve(request, model)
        return ModelCard(**(await backend.status(config)).card())

    @post("/v1/completions", CompletionResponse, "OpenAI completions (streams with stream: true)")
    async def completions(body: CompletionRequest, request: Request) -> Any:
        return await COMPLETIONS.serve(body, await resolve(request, body.model, "/v1/completions"), request, calls)

    @post("/v1/chat/completions", ChatCompletionResponse, "OpenAI chat completions (streams with stream: true)")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        return await CHAT.serve(body, await resolve(request, body.model, "/v1/chat/completions"), request, calls)

    @post(
        "/generate", GenerateResponse, "Generate a completion for each prompt (streams with stream: true)", native=True
    )
    async def generate(body: GenerateRequest, request: Request) -> Any:
        """Completions for `prompt` or `prompts`. A model at zero replicas starts first (the call waits)."""
        return await native.serve(body, await resolve(request, body.model, "/generate"), request, calls)

    @post("/v1/embeddings", EmbeddingsResponse, "OpenAI embeddings (a model with TASK=embed)")
    async def embeddings(body: EmbeddingsRequest, request: Request) -> Any:
        """Unit vectors for `input` (text, texts or token ids), pooled as the checkpoint declares."""
        model = await resolve(request, body.model, "/v1/embeddings")
        result, headers = await calls.embedded(request, model, openai_embeddings.translate(body, request_id(request)))
        # Up to 2,048 vectors of thousands of numbers: rendered off the event loop.
        return await off_the_loop(lambda: json_response(openai_embeddings.response(body, model, result), headers))

    @post("/tokenize", TokenizeResponse, "Token ids of a prompt or a chat, with the model's tokenizer (vLLM's)")
    async def tokenize(body: TokenizeRequest, request: Request) -> Any:
        """`count`, `max_model_len` and `tokens` (and `token_strs` with `return_token_strs`). Wakes the model."""
        model = await resolve(request, body.model)
        call = openai_tokenize.translate(body, settings, request_id(request))
        result, headers = await calls.answered(request, model, lambda: backend.tokenize(model, call))
        return json_response(openai_tokenize.response(result), headers)

    @post("/detokenize", DetokenizeResponse, "The text of token ids, with the model's tokenizer (vLLM's)")
    async def detokenize(body: DetokenizeRequest, request: Request) -> Any:
        """`{"prompt": text}`; special tokens are kept in the text. Wakes the model."""
        model = await resolve(request, body.model)
        call = openai_tokenize.translate_detokenize(body, settings, request_id(request))
        text, headers = await calls.answered(request, model, lambda: backend.detokenize(model, call))
        return json_response(DetokenizeResponse(prompt=text), headers)

    mount_page(app)
    return app


__all__ = ["create_app"]
