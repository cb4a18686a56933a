"""``POST /v1/chat/completions``: the chat dialect (messages rendered by the model's chat template).

A stream follows OpenAI's chunk shapes: a first chunk per choice with the role, content deltas, a
last chunk with ``finish_reason``.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence

from engine.types import ChatMessage, Completion, Delta, GenerationRequest, Started, TokenLogprob
from serving.api.openai import OpenAIDialect, StreamState, finish_reason, invalid_value, unsupported, usage
from serving.api.openai_responses import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatMessageOut,
    DeltaMessage,
    TokenLogprobOut,
    TopLogprobOut,
    Usage,
)
from serving.api.openai_schemas import ChatCompletionRequest
from serving.api.params import check_limits, sampling_params
from settings import ModelConfig, Settings

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def chat_messages(body: ChatCompletionRequest) -> tuple[ChatMessage, ...]:
    messages = []
    for i, message in enumerate(body.messages):
        where = f"messages.{i}"
        role = ROLES.get(message.role)
        if role is None:
            what = "tool and function messages are not supported" if message.role in ("tool", "function") else (
                f"unknown role {message.role!r}; use system, user or assistant"
            )  # fmt: skip
            raise unsupported(f"{where}.role", what)
        for extra in ("tool_calls", "function_call", "audio", "refusal"):
            if (message.model_extra or {}).get(extra):
                raise unsupported(f"{where}.{extra}", "not supported by this service")
        if message.name is not None:
            raise unsupported(f"{where}.name", "participant names are not supported; remove it")
        content = message.content
        if content is None:
            raise invalid_value(f"{where}.content", "required")
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if part.type != "text":
                    raise unsupported(f"{where}.content.{j}.type", f"{part.type!r} parts are not supported; send text")
                if part.text is None:
                    raise invalid_value(f"{where}.content.{j}.text", "required")
                texts.append(part.text)
            content = "".join(texts)
        messages.append(ChatMessage(role, content))  # type: ignore[arg-type]
    return tuple(messages)


def chat_logprobs(logprobs: Sequence[TokenLogprob]) -> ChatLogprobs:
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


class ChatDialect(OpenAIDialect[ChatCompletionRequest]):
    id_prefix = "chatcmpl"

    def _translate(
        self, body: ChatCompletionRequest, model: ModelConfig, settings: Settings, request_id: str
    ) -> GenerationRequest:
        if body.tools or body.functions:
            raise unsupported("tools" if body.tools else "functions", "tool calling is not supported; remove it")
        for name in ("tool_choice", "function_call"):
            value = getattr(body, name)
            if value is not None and value != "none":
                raise unsupported(name, "tool calling is not supported; remove it")
        if body.top_logprobs is not None and not body.logprobs:
            raise invalid_value("top_logprobs", "needs logprobs: true")
        if (
            body.max_tokens is not None
            and body.max_completion_tokens is not None
            and body.max_tokens != body.max_completion_tokens
        ):
            raise invalid_value("max_completion_tokens", "max_tokens and max_completion_tokens disagree; send one")
        messages = chat_messages(body)
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

    def response(
        self,
        body: ChatCompletionRequest,
        model: ModelConfig,
        request: GenerationRequest,
        started: Started,
        done: list[Completion],
    ) -> ChatCompletionResponse:
        return ChatCompletionResponse(
            id=f"{self.id_prefix}-{request.request_id}",
            created=int(time.time()),
            model=model.name,
            choices=[
                ChatChoice(
                    index=row,
                    message=ChatMessageOut(content=c.text),
                    logprobs=chat_logprobs(c.logprobs) if body.logprobs else None,
                    finish_reason=c.finish_reason,  # type: ignore[arg-type]
                )
                for row, c in enumerate(done)
            ],
            usage=usage(started, sum(c.completion_tokens for c in done)),
        )

    # --- streaming ---------------------------------------------------------------------------------
    def _open_row(self, state: StreamState, row: int) -> Iterable[list[ChatChunkChoice]]:
        yield [ChatChunkChoice(index=row, delta=DeltaMessage(role="assistant", content=""))]

    def _delta_choices(self, state: StreamState, delta: Delta) -> Iterable[list[ChatChunkChoice]]:
        if delta.text or delta.logprobs:
            logprobs = chat_logprobs(delta.logprobs) if state.body.logprobs else None
            yield [ChatChunkChoice(index=delta.index, delta=DeltaMessage(content=delta.text), logprobs=logprobs)]
        if (reason := finish_reason(delta)) is not None:
            yield [ChatChunkChoice(index=delta.index, delta=DeltaMessage(), finish_reason=reason)]

    def _chunk(self, state: StreamState, choices: list, usage: Usage | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(
            id=state.id, created=state.created, model=state.model.name, choices=choices, usage=usage
        )


CHAT = ChatDialect()
