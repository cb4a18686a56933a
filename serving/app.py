"""The HTTP API (FastAPI), built around a backend that reaches the model.

``create_app`` takes the backend as an argument, so the whole HTTP layer runs in tests with a fake
one; in the service the backend is a Ray Serve handle to the Generator (see ``serving.gateway``).
This module must not import torch or transformers: it runs in the light Gateway.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from typing import Any, Protocol

from fastapi import FastAPI
from fastapi.responses import JSONResponse

from engine.params import Completion, SamplingParams
from serving.errors import ServiceError, error_response, from_exception, install_error_handlers
from serving.schemas import (
    ErrorResponse,
    GenerateRequest,
    GenerateResponse,
    GenerationKwargs,
    GeneratorStatus,
    HealthResponse,
    Usage,
)
from settings import Settings

logger = logging.getLogger("ray.serve")

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in {
        400: "Body is not valid JSON.",
        413: "Too many prompts, or a prompt too long for the limits or the model's context.",
        422: "Request does not match the schema, or a value is out of range.",
        503: "At capacity (Retry-After says when to retry), or the model replica went away.",
        504: "No answer within REQUEST_TIMEOUT_S.",
    }.items()
}


class GeneratorBackend(Protocol):
    """What the Gateway needs from the model side."""

    async def generate(self, prompts: list[str], params: SamplingParams) -> list[Completion]: ...

    async def status(self) -> GeneratorStatus: ...

    def last_cold_start(self) -> dict[str, Any] | None: ...


def resolve_params(kwargs: GenerationKwargs, settings: Settings) -> SamplingParams:
    """Fill a request's generation kwargs from the service defaults and check them against the cap."""
    max_new = kwargs.max_new_tokens if kwargs.max_new_tokens is not None else settings.max_new_tokens
    if max_new > settings.max_new_tokens_limit:
        raise ServiceError(
            422,
            "validation_error",
            f"generation_kwargs.max_new_tokens: {max_new} is above this service's limit of "
            f"{settings.max_new_tokens_limit} (MAX_NEW_TOKENS_LIMIT)",
            [{"field": "generation_kwargs.max_new_tokens", "message": "above the limit", "input": max_new}],
        )
    temperature = kwargs.temperature if kwargs.temperature is not None else settings.temperature
    seed = kwargs.seed
    if seed is None and temperature > 0:
        # Sampling always runs from a known seed, echoed back, so any answer can be reproduced.
        seed = secrets.randbelow(2**31)
    return SamplingParams(
        max_new_tokens=max_new,
        temperature=temperature,
        top_p=kwargs.top_p if kwargs.top_p is not None else settings.top_p,
        top_k=kwargs.top_k if kwargs.top_k is not None else settings.top_k,
        repetition_penalty=(
            kwargs.repetition_penalty if kwargs.repetition_penalty is not None else settings.repetition_penalty
        ),
        seed=seed,
        stop=tuple(kwargs.stop or ()),
    )


def check_limits(prompts: list[str], settings: Settings) -> None:
    """Limits the Gateway enforces before any model replica is involved."""
    if len(prompts) > settings.max_prompts_per_request:
        raise ServiceError(
            413,
            "too_many_prompts",
            f"{len(prompts)} prompts in one request; this service accepts at most "
            f"{settings.max_prompts_per_request} (MAX_PROMPTS_PER_REQUEST). Split the list.",
        )
    for index, prompt in enumerate(prompts):
        if len(prompt) > settings.max_prompt_chars:
            which = f"prompt {index}" if len(prompts) > 1 else "the prompt"
            raise ServiceError(
                413,
                "prompt_too_long",
                f"{which} has {len(prompt)} characters; this service accepts at most "
                f"{settings.max_prompt_chars} (MAX_PROMPT_CHARS).",
            )


class JSONBodyMiddleware:
    """Reads every POST body as JSON, whatever its Content-Type says.

    ``curl -d '{...}'`` labels its body application/x-www-form-urlencoded, and FastAPI would then
    refuse to parse it; our API only ever takes JSON, so the label is corrected before routing.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
            original = next((v for k, v in scope["headers"] if k == b"content-type"), b"")
            if b"json" not in original:
                scope = {**scope, "headers": [*headers, (b"content-type", b"application/json")]}
        await self.app(scope, receive, send)


def create_app(backend: GeneratorBackend, settings: Settings) -> FastAPI:
    """The FastAPI app: ``POST /generate``, ``GET /healthz`` and the OpenAPI docs at ``/docs``."""
    app = FastAPI(
        title="Scale-to-zero LLM service",
        description=f"Text generation with `{settings.model_id}` on Ray Serve. The model scales to zero "
        "when idle; `/healthz` never wakes it.",
        version="1.0.0",
    )
    install_error_handlers(app, settings.retry_after_s)
    app.add_middleware(JSONBodyMiddleware)

    @app.get("/healthz", response_model=HealthResponse, summary="Liveness and model replica state")
    async def healthz() -> HealthResponse:
        """Answered by the Gateway alone: probes never start a model replica."""
        return HealthResponse(
            status="ok",
            model=settings.model_id,
            generator=await backend.status(),
            last_cold_start=backend.last_cold_start(),
        )

    @app.post(
        "/generate",
        response_model=GenerateResponse,
        responses=ERROR_RESPONSES,
        summary="Generate a completion for each prompt",
    )
    async def generate(request: GenerateRequest) -> GenerateResponse | JSONResponse:
        """Completions for `prompt` or `prompts`. A cold model replica starts first (the call waits)."""
        try:
            prompts = request.prompt_list()
            check_limits(prompts, settings)
            params = resolve_params(request.generation_kwargs, settings)
            completions = await asyncio.wait_for(backend.generate(prompts, params), settings.request_timeout_s)
        except Exception as exc:
            return error_response(from_exception(exc, settings.retry_after_s))
        return _response(settings.model_id, prompts, params, completions)

    return app


def _response(model: str, prompts: list[str], params: SamplingParams, done: list[Completion]) -> GenerateResponse:
    prompt_tokens = sum(c.prompt_tokens for c in done)
    completion_tokens = sum(c.completion_tokens for c in done)
    return GenerateResponse(
        model=model,
        prompts=prompts,
        completions=[c.text for c in done],
        finish_reasons=[c.finish_reason for c in done],  # type: ignore[misc]
        generation_kwargs=params.as_dict(),
        usage=Usage(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        ),
    )
