"""The native dialect, ``POST /generate``: translation to a GenerationRequest, JSON and SSE rendering.

Streamed (``"stream": true``), the answer is server-sent events::

    event: delta
    data: {"index": 0, "text": " the"}

    event: done
    data: {...the same body as the non-streamed answer...}

and on a failure after the stream began, ``event: error`` with the error body in the native shape.
The route hands its body to :func:`serve`; the call driver (``serving.api.calls``) reaches the model.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence

from fastapi import Request
from fastapi.responses import Response

from engine.types import Completion, Delta, GenerationRequest, SamplingParams, Started, collect
from serving.api import access, sse
from serving.api.calls import Calls
from serving.api.errors import ApiError
from serving.api.json_body import json_response
from serving.api.native_schemas import GenerateRequest, GenerateResponse, Usage
from serving.api.params import check_limits, sampling_params
from settings import ModelConfig, Settings


async def serve(body: GenerateRequest, model: ModelConfig, request: Request, calls: Calls) -> Response:
    """The route's whole work: translate, then answer whole or stream."""
    call = translate(body, model, calls.settings, access.of(request).request_id)
    if not body.stream:
        _, done, headers = await calls.unary(request, model, call, "native")
        return json_response(response(model, call, done), headers)
    items = await calls.stream(request, model, call, "native")  # ApiError (a status) until the model takes it

    async def events() -> AsyncIterator[str]:
        async with contextlib.aclosing(items):  # a client gone frees the request's rows at once
            try:
                async for text in stream(model, call, items):
                    yield text
            except Exception as exc:  # the status is sent already: the error becomes an event
                yield stream_error(await calls.failed(request, model, exc, "native"))

    return sse.response(events())


def translate(body: GenerateRequest, model: ModelConfig, settings: Settings, request_id: str) -> GenerationRequest:
    """The request as the model server takes it; raises ApiError for what the limits forbid."""
    prompts = body.prompt_list()
    check_limits(prompts, 1, settings, prompt_param="prompts" if body.prompts is not None else "prompt")
    kwargs = body.generation_kwargs
    params = sampling_params(
        model,
        max_new_tokens=kwargs.max_new_tokens,
        max_new_tokens_field="generation_kwargs.max_new_tokens",
        temperature=kwargs.temperature,
        top_p=kwargs.top_p,
        top_k=kwargs.top_k,
        repetition_penalty=kwargs.repetition_penalty,
        seed=kwargs.seed,
        stop=kwargs.stop,
        family="native",
    )
    return GenerationRequest(request_id, params, prompts=tuple(prompts))


# SamplingParams fields only the OpenAI routes set (the native response does not echo them).
OPENAI_ONLY = ("presence_penalty", "frequency_penalty", "logprobs", "logit_bias", "min_tokens", "stop_token_ids",
               "ignore_eos", "min_p", "constraint", "prompt_logprobs")  # fmt: skip


def echoed_kwargs(params: SamplingParams) -> dict:
    """The generation_kwargs a response echoes: the values used, defaults included."""
    out = params.as_dict()
    for extension in OPENAI_ONLY:
        out.pop(extension)
    return out


def response(model: ModelConfig, request: GenerationRequest, completions: Sequence[Completion]) -> GenerateResponse:
    prompt_tokens = sum(c.prompt_tokens for c in completions)
    completion_tokens = sum(c.completion_tokens for c in completions)
    return GenerateResponse(
        model=model.name,
        prompts=list(request.prompts),
        completions=[c.text for c in completions],
        finish_reasons=[c.finish_reason for c in completions],  # type: ignore[misc]
        generation_kwargs=echoed_kwargs(request.params),
        usage=Usage(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        ),
    )


async def stream(
    model: ModelConfig, request: GenerationRequest, items: AsyncIterator[str | Started | tuple[Delta, ...]]
) -> AsyncIterator[str]:
    """SSE for a streamed /generate: heartbeats as comments, deltas, then the whole answer."""
    started: Started | None = None
    seen: list[Delta] = []
    async for item in items:
        if isinstance(item, str):
            yield sse.comment(item)
        elif isinstance(item, Started):
            started = item
        else:
            seen.extend(item)
            for delta in item:
                if delta.text:
                    yield sse.event("delta", {"index": delta.index, "text": delta.text})
    assert started is not None
    completions = collect(seen, request.rows, started.prompt_tokens, request.n)
    yield sse.event("done", response(model, request, completions).model_dump(mode="json"))


def stream_error(error: ApiError) -> str:
    return sse.event("error", error.native_body())
