"""What the OpenAI routes answer: whole responses and the typed chunks of their streams.

Every chunk is a pydantic model serialised once by :func:`wire` (never a dict built by hand). A
stream chunk carries ``usage`` only when it is the usage chunk (``stream_options.include_usage``),
and a chat delta carries only the fields it sets, as OpenAI's stream does::

    >>> wire(ChatCompletionChunk(id="c", created=0, model="m", choices=[ChatChunkChoice(index=0,
    ...     delta=DeltaMessage(content="Hi"))]))["choices"][0]["delta"]
    {'content': 'Hi'}
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, field_serializer
from typing_extensions import TypedDict

from engine.types import Delta, GenerationRequest, Started, TokenLogprob, ToolCall
from serving.api.json_body import Records

FinishReason = Literal["stop", "length", "tool_calls"]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class _Envelope(BaseModel):
    """What every answer and stream chunk begins with; each one fixes its ``object`` and adds its choices."""

    id: str
    object: str
    created: int
    model: str


# --- /v1/completions ------------------------------------------------------------------------------


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]  # an echoed prompt's first token has none
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None


class CompletionResponse(_Envelope):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: Usage


class CompletionChunk(CompletionResponse):
    usage: Usage | None = None  # the usage chunk's only


# --- /v1/chat/completions -------------------------------------------------------------------------


# A chat answer's entries are plain dicts (typed, for the schema): one answer can hold 1,024 tokens x 20
# alternatives per choice, and a model per alternative cost more to build and to walk than to write.
class TopLogprobOut(TypedDict):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprobOut(TopLogprobOut):
    top_logprobs: list[TopLogprobOut]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprobOut]


class FunctionCallOut(BaseModel):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCallOut] | None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason


class ChatCompletionResponse(_Envelope):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: Usage


class FunctionCallDelta(BaseModel):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(BaseModel):
    """One tool call's piece in a stream: the first piece has its id, type and name."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallDelta


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = None

    @field_serializer("delta")
    def _only_what_is_set(self, delta: DeltaMessage) -> dict[str, Any]:
        return delta.model_dump(exclude_none=True)


class ChatCompletionChunk(_Envelope):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]
    usage: Usage | None = None  # the usage chunk's only


Chunk = CompletionChunk | ChatCompletionChunk


def usage(started: Started, completion_tokens: int) -> Usage:
    prompt = sum(started.prompt_tokens)
    return Usage(prompt_tokens=prompt, completion_tokens=completion_tokens, total_tokens=prompt + completion_tokens)


def finish_reason(delta: Delta) -> str | None:
    """What a client sees of a row's end ("cancelled" is never sent: nobody is listening)."""
    return delta.finish_reason if delta.finish_reason in ("stop", "length") else None


def wire(chunk: Chunk) -> dict[str, Any]:
    """A chunk as it goes out: without ``usage`` unless it is the usage chunk."""
    return chunk.model_dump(mode="json", exclude={"usage"} if chunk.usage is None else None)


# --- rendering helpers the dialects share ------------------------------------------------------


def completion_logprobs(logprobs: Sequence[TokenLogprob], offset: int, unscored: int = 0) -> CompletionLogprobs:
    """The legacy logprobs of ``logprobs``, their text offsets counted from ``offset``. The first
    ``unscored`` entries (an echoed prompt's first token) have no log-probability: null."""
    offsets = []
    for entry in logprobs:
        offsets.append(offset)
        offset += len(entry.token)
    return CompletionLogprobs.model_construct(  # unvalidated, as chat_logprobs
        tokens=[e.token for e in logprobs],
        token_logprobs=[e.logprob if i >= unscored else None for i, e in enumerate(logprobs)],
        top_logprobs=Records(_top_by_text(e.top) if i >= unscored else None for i, e in enumerate(logprobs)),
        text_offset=offsets,
    )


def _top_by_text(top: Sequence) -> dict[str, float]:
    """The legacy format keys alternatives by their text: two tokens that decode alike (two halves of a
    multi-byte character both read "\ufffd") share one key, which keeps the likelier (first) of them."""
    by_text: dict[str, float] = {}
    for alt in top:
        by_text.setdefault(alt.token, alt.logprob)
    return by_text


def echoed(request: GenerationRequest, started: Started | None, row: int) -> str:
    """The prompt of ``row`` as echo shows it (a token-id prompt: its decoded text)."""
    prompt = row // request.n
    if started is not None and started.prompt_texts is not None:
        return started.prompt_texts[prompt]
    return request.prompts[prompt]


def prompt_entries(started: Started | None, request: GenerationRequest, row: int) -> tuple:
    if started is None or started.prompt_logprobs is None:
        return ()
    return started.prompt_logprobs[row // request.n]


def chat_logprobs(logprobs: Sequence[TokenLogprob]) -> ChatLogprobs:
    """The chat form of ``logprobs``: built unvalidated (the engine's entries are typed already) as
    :class:`Records`, which the whole answer's writer writes without walking them."""
    content = Records(
        {
            "token": e.token,
            "logprob": e.logprob,
            "bytes": list(e.bytes),
            "top_logprobs": [{"token": a.token, "logprob": a.logprob, "bytes": list(a.bytes)} for a in e.top],
        }
        for e in logprobs
    )
    return ChatLogprobs.model_construct(content=content)


def call_out(call: ToolCall) -> ToolCallOut:
    return ToolCallOut(id=call.id, function=FunctionCallOut(name=call.name, arguments=call.arguments))
