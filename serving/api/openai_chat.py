"""``POST /v1/chat/completions``: the chat dialect (messages rendered by the model's chat template).

A stream follows OpenAI's chunk shapes: a first chunk per choice with the role, content deltas, a
last chunk with ``finish_reason`` (``tool_calls`` after an auto or required call; a named
``tool_choice`` ends with ``stop``, as OpenAI and vLLM answer it).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

from engine.tool_parsers import Extracted
from engine.types import ChatMessage, Completion, Delta, GenerationRequest, Started, TokenLogprob, ToolCall
from serving.api.errors import invalid_value, unsupported
from serving.api.openai import OpenAIDialect, StreamState
from serving.api.openai_params import sampling_fields
from serving.api.openai_responses import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatMessageOut,
    DeltaMessage,
    FunctionCallOut,
    TokenLogprobOut,
    ToolCallOut,
    TopLogprobOut,
    finish_reason,
)
from serving.api.openai_schemas import ChatCompletionRequest, ChatMessageIn
from serving.api.openai_tools import StreamedTools, tool_call, tool_plan, tools_json
from serving.api.params import check_limits, sampling_params
from settings import ModelConfig, Settings

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}


def chat_messages(given: Sequence[ChatMessageIn]) -> tuple[ChatMessage, ...]:
    """The engine's messages; a 400 naming the field for a role, part or field this service does not take."""
    messages = []
    for i, message in enumerate(given):
        where = f"messages.{i}"
        role = ROLES.get(message.role)
        if role is None:
            what = "function messages are replaced by tool messages" if message.role == "function" else (
                f"unknown role {message.role!r}; use system, user, assistant or tool"
            )  # fmt: skip
            raise unsupported(f"{where}.role", what)
        for extra in ("function_call", "audio", "refusal"):
            if (message.model_extra or {}).get(extra):
                raise unsupported(f"{where}.{extra}", "not supported by this service")
        if message.name is not None and role != "tool":
            raise unsupported(f"{where}.name", "participant names are not supported; remove it")
        if message.tool_calls and role != "assistant":
            raise invalid_value(f"{where}.tool_calls", "only assistant messages carry tool calls")
        if role == "tool" and not message.tool_call_id:
            raise invalid_value(f"{where}.tool_call_id", "required on tool messages (the id of the call answered)")
        content = message.content
        if content is None and not message.tool_calls:
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
        calls = tuple(ToolCall(c.id, c.function.name, c.function.arguments) for c in message.tool_calls or ())
        tool_call_id = message.tool_call_id if role == "tool" else None
        name = message.name if role == "tool" else None
        messages.append(ChatMessage(role, content or "", calls, tool_call_id, name))  # type: ignore[arg-type]
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
    chunk_type = ChatCompletionChunk

    def _translate(
        self, body: ChatCompletionRequest, model: ModelConfig, settings: Settings, request_id: str
    ) -> GenerationRequest:
        if body.functions or body.function_call not in (None, "none"):
            name = "functions" if body.functions else "function_call"
            raise unsupported(name, "the legacy functions API is not supported; send tools and tool_choice")
        plan = tool_plan(body, model)
        if body.top_logprobs is not None and not body.logprobs:
            raise invalid_value("top_logprobs", "needs logprobs: true")
        if (
            body.max_tokens is not None
            and body.max_completion_tokens is not None
            and body.max_tokens != body.max_completion_tokens
        ):
            raise invalid_value("max_completion_tokens", "max_tokens and max_completion_tokens disagree; send one")
        messages = chat_messages(body.messages)
        # A chat is one prompt: its messages together count against MAX_PROMPT_CHARS.
        check_limits(["".join(m.content for m in messages)], body.n, settings, prompt_param="messages")
        new_name = body.max_completion_tokens is not None  # max_tokens is its deprecated alias
        params = sampling_params(
            model,
            max_new_tokens=body.max_completion_tokens if new_name else body.max_tokens,
            max_new_tokens_field="max_completion_tokens" if new_name else "max_tokens",
            **sampling_fields(body),
            logprobs=(body.top_logprobs or 0) if body.logprobs else None,
        )
        if plan is not None:
            params = dataclasses.replace(params, constraint=plan.constraint())
        return GenerationRequest(request_id, params, messages=messages, n=body.n, tools=tools_json(body.tools))

    def response(
        self,
        body: ChatCompletionRequest,
        model: ModelConfig,
        request: GenerationRequest,
        started: Started,
        done: list[Completion],
    ) -> ChatCompletionResponse:
        plan = tool_plan(body, model)
        choices = []
        for row, c in enumerate(done):
            answer = plan.read(c.text) if plan is not None else Extracted(c.text)
            calls = [tool_call(call) for call in answer.calls]
            reason = plan.finish_reason(c.finish_reason, bool(calls)) if plan is not None else c.finish_reason
            choices.append(
                ChatChoice(
                    index=row,
                    message=ChatMessageOut(
                        content=answer.content if calls else c.text,
                        tool_calls=[_call_out(call) for call in calls] or None,
                    ),
                    logprobs=chat_logprobs(c.logprobs) if body.logprobs else None,
                    finish_reason=reason,  # type: ignore[arg-type]
                )
            )
        return ChatCompletionResponse(choices=choices, **self._answer_fields(model, request, started, done))

    # --- streaming ---------------------------------------------------------------------------------
    def _open_row(self, state: StreamState, row: int) -> Iterable[list[ChatChunkChoice]]:
        plan = tool_plan(state.body, state.model)
        state.rows[row] = StreamedTools(plan) if plan is not None and plan.mode != "none" else None
        yield [ChatChunkChoice(index=row, delta=DeltaMessage(role="assistant", content=""))]

    def _delta_choices(self, state: StreamState, delta: Delta) -> Iterable[list[ChatChunkChoice]]:
        tools: StreamedTools | None = state.rows.get(delta.index)
        reason = finish_reason(delta)
        if tools is not None:
            for message in tools.feed(delta.text, ended=reason is not None):
                yield [ChatChunkChoice(index=delta.index, delta=message)]
            reason = tools.plan.finish_reason(reason, tools.called)
        elif delta.text or delta.logprobs:
            logprobs = chat_logprobs(delta.logprobs) if state.body.logprobs else None
            yield [ChatChunkChoice(index=delta.index, delta=DeltaMessage(content=delta.text), logprobs=logprobs)]
        if reason is not None:
            yield [ChatChunkChoice(index=delta.index, delta=DeltaMessage(), finish_reason=reason)]


def _call_out(call: ToolCall) -> ToolCallOut:
    return ToolCallOut(id=call.id, function=FunctionCallOut(name=call.name, arguments=call.arguments))


CHAT = ChatDialect()
