"""The OpenAI dialect: translation of completions and chat requests, JSON and SSE rendering.

Choices are numbered as OpenAI numbers them: choice ``p * n + c`` is the c-th completion of prompt
p, which is the model server's row number. Streams follow OpenAI's chunk shapes (chat: a first
chunk with the role, content deltas, a last chunk with ``finish_reason``; a usage chunk when
``stream_options.include_usage`` asks; then ``data: [DONE]``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

from engine.types import ChatMessage, Completion, Delta, GenerationRequest, Started, TokenLogprob
from serving.api import sse
from serving.api.errors import ApiError
from serving.api.openai_schemas import (
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatMessageOut,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    TokenLogprobOut,
    TopLogprobOut,
    Usage,
)
from serving.api.params import check_limits, sampling_params
from settings import ModelConfig, Settings

logger = logging.getLogger("ray.serve")

MAX_LOGGED_FIELDS = 10
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def _unsupported(param: str, what: str) -> ApiError:
    return ApiError(400, "unsupported_parameter", f"{param}: {what}", param=param)


def _log_unknown(body: CompletionRequest | ChatCompletionRequest, request_id: str) -> None:
    if unknown := body.unknown_fields():
        # The names are the client's text: quoted (no line breaks or control characters reach the log), a few.
        names = ", ".join(ascii(name)[:80] for name in unknown[:MAX_LOGGED_FIELDS])
        more = f" and {len(unknown) - MAX_LOGGED_FIELDS} more" if len(unknown) > MAX_LOGGED_FIELDS else ""
        logger.info("request %s: ignoring fields this API does not define: %s%s", request_id, names, more)


def _common_checks(body: CompletionRequest | ChatCompletionRequest) -> None:
    if body.stream_options is not None and not body.stream:
        raise ApiError(
            400, "invalid_request_error", "stream_options: only allowed with stream: true", param="stream_options"
        )
    if body.logit_bias:
        raise _unsupported("logit_bias", "not supported by this service; remove it")


# --- /v1/completions ---------------------------------------------------------------------------------


def translate_completion(
    body: CompletionRequest, model: ModelConfig, settings: Settings, request_id: str
) -> GenerationRequest:
    _log_unknown(body, request_id)
    _common_checks(body)
    prompts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
    if not prompts:  # [] passes the schema as an empty list of token ids
        raise ApiError(400, "invalid_request_error", "prompt: send a prompt (the list is empty)", param="prompt")
    if any(not isinstance(p, str) for p in prompts):
        raise _unsupported("prompt", "token-id prompts are not supported; send the prompt as text")
    if body.suffix is not None:
        raise _unsupported("suffix", "insertion (suffix) is not supported; remove it")
    if body.best_of is not None and body.best_of != body.n:
        raise _unsupported("best_of", f"only best_of == n is supported (got best_of={body.best_of}, n={body.n})")
    if body.echo and body.logprobs is not None:
        raise _unsupported("echo", "echo with logprobs (prompt log-probabilities) is not supported")
    check_limits(prompts, body.n, settings)  # type: ignore[arg-type]
    params = sampling_params(
        model,
        max_tokens=body.max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        repetition_penalty=body.repetition_penalty,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        seed=body.seed,
        stop=body.stop,
        logprobs=body.logprobs,
    )
    return GenerationRequest(request_id, params, prompts=tuple(prompts), n=body.n)  # type: ignore[arg-type]


def _completion_logprobs(logprobs: Sequence[TokenLogprob], offset: int) -> CompletionLogprobs:
    offsets = []
    for entry in logprobs:
        offsets.append(offset)
        offset += len(entry.token)
    return CompletionLogprobs(
        tokens=[e.token for e in logprobs],
        token_logprobs=[e.logprob for e in logprobs],
        top_logprobs=[_top_by_text(e.top) for e in logprobs],
        text_offset=offsets,
    )


def _top_by_text(top: Sequence) -> dict[str, float]:
    """The legacy format keys alternatives by their text: two tokens that decode alike (two halves of a
    multi-byte character both read "\ufffd") share one key, which keeps the likelier (first) of them."""
    by_text: dict[str, float] = {}
    for alt in top:
        by_text.setdefault(alt.token, alt.logprob)
    return by_text


def _usage(started: Started, completions_tokens: int) -> Usage:
    prompt = sum(started.prompt_tokens)
    return Usage(prompt_tokens=prompt, completion_tokens=completions_tokens, total_tokens=prompt + completions_tokens)


def completion_response(
    body: CompletionRequest, model: ModelConfig, request: GenerationRequest, started: Started, done: list[Completion]
) -> CompletionResponse:
    choices = []
    for row, completion in enumerate(done):
        prefix = request.prompts[row // request.n] if body.echo else ""
        choices.append(
            CompletionChoice(
                index=row,
                text=prefix + completion.text,
                logprobs=_completion_logprobs(completion.logprobs, len(prefix)) if body.logprobs is not None else None,
                finish_reason=completion.finish_reason,  # type: ignore[arg-type]
            )
        )
    return CompletionResponse(
        id=f"cmpl-{request.request_id}",
        created=int(time.time()),
        model=model.name,
        choices=choices,
        usage=_usage(started, sum(c.completion_tokens for c in done)),
    )


async def stream_completion(
    body: CompletionRequest, model: ModelConfig, request: GenerationRequest, items: AsyncIterator[Any]
) -> AsyncIterator[str]:
    base = {
        "id": f"cmpl-{request.request_id}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": model.name,
    }
    offsets = [0] * request.rows
    tokens = 0
    started: Started | None = None
    async for item in items:
        if isinstance(item, str):
            yield sse.comment(item)
            continue
        if isinstance(item, Started):
            started = item
            if body.echo:
                for row in range(request.rows):
                    prompt = request.prompts[row // request.n]
                    offsets[row] = len(prompt)
                    yield sse.data({**base, "choices": [_text_choice(row, prompt, None, None)]})
            continue
        for delta in item:
            tokens += delta.tokens
            if not delta.text and delta.finish_reason is None and not delta.logprobs:
                continue
            logprobs = None
            if body.logprobs is not None:
                logprobs = _completion_logprobs(delta.logprobs, offsets[delta.index]).model_dump()
            offsets[delta.index] += len(delta.text)
            choice = _text_choice(delta.index, delta.text, logprobs, _reason(delta))
            yield sse.data({**base, "choices": [choice]})
    if started is not None and body.stream_options is not None and body.stream_options.include_usage:
        yield sse.data({**base, "choices": [], "usage": _usage(started, tokens).model_dump()})
    yield sse.DONE


def _text_choice(index: int, text: str, logprobs: Any, finish_reason: str | None) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def _reason(delta: Delta) -> str | None:
    return delta.finish_reason if delta.finish_reason in ("stop", "length") else None


# --- /v1/chat/completions ----------------------------------------------------------------------------


def _chat_messages(body: ChatCompletionRequest) -> tuple[ChatMessage, ...]:
    messages = []
    for i, message in enumerate(body.messages):
        where = f"messages.{i}"
        role = ROLES.get(message.role)
        if role is None:
            what = "tool and function messages are not supported" if message.role in ("tool", "function") else (
                f"unknown role {message.role!r}; use system, user or assistant"
            )  # fmt: skip
            raise _unsupported(f"{where}.role", what)
        for extra in ("tool_calls", "function_call", "audio", "refusal"):
            if (message.model_extra or {}).get(extra):
                raise _unsupported(f"{where}.{extra}", "not supported by this service")
        if message.name is not None:
            raise _unsupported(f"{where}.name", "participant names are not supported; remove it")
        content = message.content
        if content is None:
            raise ApiError(400, "invalid_request_error", f"{where}.content: required", param=f"{where}.content")
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if part.type != "text":
                    raise _unsupported(f"{where}.content.{j}.type", f"{part.type!r} parts are not supported; send text")
                if part.text is None:
                    raise ApiError(
                        400,
                        "invalid_request_error",
                        f"{where}.content.{j}.text: required",
                        param=f"{where}.content.{j}.text",
                    )
                texts.append(part.text)
            content = "".join(texts)
        messages.append(ChatMessage(role, content))  # type: ignore[arg-type]
    return tuple(messages)


def translate_chat(
    body: ChatCompletionRequest, model: ModelConfig, settings: Settings, request_id: str
) -> GenerationRequest:
    _log_unknown(body, request_id)
    _common_checks(body)
    if body.tools or body.functions:
        raise _unsupported("tools" if body.tools else "functions", "tool calling is not supported; remove it")
    for name in ("tool_choice", "function_call"):
        value = getattr(body, name)
        if value is not None and value != "none":
            raise _unsupported(name, "tool calling is not supported; remove it")
    if body.response_format is not None and body.response_format.type != "text":
        raise _unsupported("response_format", f"{body.response_format.type!r} is not supported; only 'text'")
    if body.top_logprobs is not None and not body.logprobs:
        raise ApiError(400, "invalid_request_error", "top_logprobs: needs logprobs: true", param="top_logprobs")
    if (
        body.max_tokens is not None
        and body.max_completion_tokens is not None
        and body.max_tokens != body.max_completion_tokens
    ):
        raise ApiError(
            400,
            "invalid_request_error",
            "max_tokens and max_completion_tokens disagree; send one",
            param="max_completion_tokens",
        )
    messages = _chat_messages(body)
    # A chat is one prompt: its messages together count against MAX_PROMPT_CHARS.
    check_limits(["".join(m.content for m in messages)], body.n, settings, prompt_param="messages")
    limit = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    params = sampling_params(
        model,
        max_tokens=limit,
        max_tokens_param="max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens",
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        repetition_penalty=body.repetition_penalty,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        seed=body.seed,
        stop=body.stop,
        logprobs=(body.top_logprobs or 0) if body.logprobs else None,
    )
    return GenerationRequest(request_id, params, messages=messages, n=body.n)


def _chat_logprobs(logprobs: Sequence[TokenLogprob]) -> ChatLogprobs:
    return ChatLogprobs(
        content=[
            TokenLogprobOut(
                token=e.token,
                logprob=e.logprob,
                bytes=list(e.bytes),
                top_logprobs=[TopLogprobOut(token=a.token, logprob=a.logprob, bytes=list(a.bytes)) for a in e.top],
            )
            for e in logprobs
        ]
    )


def chat_response(
    body: ChatCompletionRequest,
    model: ModelConfig,
    request: GenerationRequest,
    started: Started,
    done: list[Completion],
) -> ChatCompletionResponse:
    return ChatCompletionResponse(
        id=f"chatcmpl-{request.request_id}",
        created=int(time.time()),
        model=model.name,
        choices=[
            ChatChoice(
                index=row,
                message=ChatMessageOut(content=c.text),
                logprobs=_chat_logprobs(c.logprobs) if body.logprobs else None,
                finish_reason=c.finish_reason,  # type: ignore[arg-type]
            )
            for row, c in enumerate(done)
        ],
        usage=_usage(started, sum(c.completion_tokens for c in done)),
    )


async def stream_chat(
    body: ChatCompletionRequest, model: ModelConfig, request: GenerationRequest, items: AsyncIterator[Any]
) -> AsyncIterator[str]:
    base = {
        "id": f"chatcmpl-{request.request_id}",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model.name,
    }
    tokens = 0
    started: Started | None = None
    async for item in items:
        if isinstance(item, str):
            yield sse.comment(item)
            continue
        if isinstance(item, Started):
            started = item
            for row in range(request.rows):
                yield sse.data(
                    {**base, "choices": [_chat_choice(row, {"role": "assistant", "content": ""}, None, None)]}
                )
            continue
        for delta in item:
            tokens += delta.tokens
            if delta.text or delta.logprobs:
                logprobs = _chat_logprobs(delta.logprobs).model_dump() if body.logprobs else None
                yield sse.data(
                    {**base, "choices": [_chat_choice(delta.index, {"content": delta.text}, logprobs, None)]}
                )
            if _reason(delta) is not None:
                yield sse.data({**base, "choices": [_chat_choice(delta.index, {}, None, _reason(delta))]})
    if started is not None and body.stream_options is not None and body.stream_options.include_usage:
        yield sse.data({**base, "choices": [], "usage": _usage(started, tokens).model_dump()})
    yield sse.DONE


def _chat_choice(index: int, delta: dict[str, Any], logprobs: Any, finish_reason: str | None) -> dict[str, Any]:
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}


def stream_error(error: ApiError) -> str:
    """A failure after the stream began: an error event, then the end marker."""
    return sse.data(error.openai_body()) + sse.DONE
