"""The OpenAI dialects: one object per route (completions, chat) that translates, answers and streams.

Choices are numbered as OpenAI numbers them: choice ``p * n + c`` is the c-th completion of prompt
p, which is the model server's row number. A route hands its body to its dialect, and the rest of
the request's way is read from here, downwards::

    return await CHAT.serve(body, model, request, calls)    # or COMPLETIONS

``serve`` translates (``translate``: the shared checks, the route's ``_translate``, the extras of
``serving.api.openai_params``), reaches the model through the call driver (``serving.api.calls``),
and renders: the JSON answer (``response``) or the stream (``stream``: heartbeats become comments,
each row opens (``_open_row``), each delta becomes chunk choices (``_delta_choices``), a usage
chunk follows when ``stream_options.include_usage`` asks, then ``data: [DONE]``; a failure after
the start is an error event). Both routes live in this module; what they call is leaves only:
schemas, prompts, responses, params, tools.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, TypeVar

from fastapi import Request
from fastapi.responses import Response
from pydantic import BaseModel

from engine.tool_parsers import Extracted
from engine.types import Completion, Delta, GenerationRequest, Started, TokenLogprob
from serving.api import access, sse
from serving.api.calls import Calls
from serving.api.errors import ApiError, invalid_value, unsupported
from serving.api.json_body import json_response, off_the_loop
from serving.api.openai_params import sampling_extras, sampling_fields
from serving.api.openai_prompts import chat_messages, completion_prompts
from serving.api.openai_responses import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatMessageOut,
    Chunk,
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionResponse,
    DeltaMessage,
    Usage,
    call_out,
    chat_logprobs,
    completion_logprobs,
    echoed,
    finish_reason,
    prompt_entries,
    usage,
    wire,
)
from serving.api.openai_schemas import ChatCompletionRequest, CompletionRequest, OpenAIRequest
from serving.api.openai_tools import StreamedTools, tool_call, tool_plan, tools_json
from serving.api.params import check_limits, sampling_params
from settings import ModelConfig, Settings

logger = logging.getLogger("ray.serve")

MAX_LOGGED_FIELDS = 10
RequestT = TypeVar("RequestT", bound=OpenAIRequest)


@dataclass
class StreamState:
    """One streamed answer's identity and progress, handed to the dialect's chunk builders."""

    body: Any
    model: ModelConfig
    request: GenerationRequest
    id: str
    created: int = field(default_factory=lambda: int(time.time()))
    started: Started | None = None
    tokens: int = 0
    rows: dict[int, Any] = field(default_factory=dict)  # per-row state a dialect keeps (offsets, parsers)


class OpenAIDialect(ABC, Generic[RequestT]):
    """Schemas, translation and rendering of one OpenAI route."""

    id_prefix: ClassVar[str]
    chunk_type: ClassVar[type[CompletionChunk] | type[ChatCompletionChunk]]  # the route's stream chunk

    async def serve(self, body: RequestT, model: ModelConfig, request: Request, calls: Calls) -> Response:
        """The route's whole work: translate, then answer whole or stream, in this route's shapes."""
        call = self.translate(body, model, calls.settings, access.of(request).request_id)
        if not body.stream:
            started, done, headers = await calls.unary(request, model, call, "openai")

            def render() -> Response:
                return json_response(self.response(body, model, call, started, done), headers)

            if call.params.logprobs is None and call.params.prompt_logprobs is None:
                return render()
            # n x tokens x alternatives entries: built here, they would hold the event loop for hundreds of ms.
            return await off_the_loop(render)
        items = await calls.stream(request, model, call, "openai")  # ApiError (a status) until the model takes it

        async def events() -> AsyncIterator[str]:
            async with contextlib.aclosing(items):  # a client gone frees the request's rows at once
                try:
                    async for text in self.stream(body, model, call, items):
                        yield text
                except Exception as exc:  # the status is sent already: the error becomes an event
                    yield self.stream_error(await calls.failed(request, model, exc, "openai"))

        return sse.response(events())

    # --- translation ----------------------------------------------------------------------------
    def translate(self, body: RequestT, model: ModelConfig, settings: Settings, request_id: str) -> GenerationRequest:
        """The request as the model server takes it; raises ApiError naming the field at fault."""
        self._log_unknown(body, request_id)
        if body.stream_options is not None and not body.stream:
            raise invalid_value("stream_options", "only allowed with stream: true")
        request = self._translate(body, model, settings, request_id)
        extras = sampling_extras(body, request.params.max_new_tokens)
        if request.params.constraint is not None:  # the dialect's own (a tool choice)
            if extras["constraint"] is not None:
                param = extras["constraint"].param.split(".")[0]
                raise invalid_value(param, f"cannot be combined with {request.params.constraint.param}")
            extras["constraint"] = request.params.constraint
        return dataclasses.replace(request, params=dataclasses.replace(request.params, **extras))

    @abstractmethod
    def _translate(
        self, body: RequestT, model: ModelConfig, settings: Settings, request_id: str
    ) -> GenerationRequest: ...

    @staticmethod
    def _log_unknown(body: OpenAIRequest, request_id: str) -> None:
        if unknown := body.unknown_fields():
            # The names are the client's text: quoted (no line breaks or control characters reach the log), a few.
            names = ", ".join(ascii(name)[:80] for name in unknown[:MAX_LOGGED_FIELDS])
            more = f" and {len(unknown) - MAX_LOGGED_FIELDS} more" if len(unknown) > MAX_LOGGED_FIELDS else ""
            logger.info("request %s: ignoring fields this API does not define: %s%s", request_id, names, more)

    # --- answers --------------------------------------------------------------------------------
    @abstractmethod
    def response(
        self, body: RequestT, model: ModelConfig, request: GenerationRequest, started: Started, done: list[Completion]
    ) -> BaseModel: ...

    def _answer_fields(
        self, model: ModelConfig, request: GenerationRequest, started: Started, done: list[Completion]
    ) -> dict[str, Any]:
        """What a whole answer carries beside its choices: its id, time, model and token usage."""
        return {
            "id": f"{self.id_prefix}-{request.request_id}",
            "created": int(time.time()),
            "model": model.name,
            "usage": usage(started, sum(c.completion_tokens for c in done)),
        }

    async def stream(
        self, body: RequestT, model: ModelConfig, request: GenerationRequest, items: AsyncIterator[Any]
    ) -> AsyncIterator[str]:
        state = StreamState(body, model, request, f"{self.id_prefix}-{request.request_id}")
        async for item in items:
            if isinstance(item, str):
                yield sse.comment(item)
                continue
            if isinstance(item, Started):
                state.started = item
                for row in range(request.rows):
                    if text := from_chunks(self._chunk(state, choices) for choices in self._open_row(state, row)):
                        yield text
                continue
            for delta in item:
                state.tokens += delta.tokens
                if text := from_chunks(self._chunk(state, choices) for choices in self._delta_choices(state, delta)):
                    yield text
        if state.started is not None and body.stream_options is not None and body.stream_options.include_usage:
            yield sse.data(wire(self._chunk(state, [], usage(state.started, state.tokens))))
        yield sse.DONE

    @abstractmethod
    def _open_row(self, state: StreamState, row: int) -> Iterable[list[Any]]:
        """The choices lists (one chunk each) that open a row's stream."""

    @abstractmethod
    def _delta_choices(self, state: StreamState, delta: Delta) -> Iterable[list[Any]]:
        """The choices lists (one chunk each) for a row's delta."""

    def _chunk(self, state: StreamState, choices: list[Any], usage: Usage | None = None) -> Chunk:
        return self.chunk_type(id=state.id, created=state.created, model=state.model.name, choices=choices, usage=usage)

    @staticmethod
    def stream_error(error: ApiError) -> str:
        """A failure after the stream began: an error event, then the end marker."""
        return sse.data(error.openai_body()) + sse.DONE


def from_chunks(chunks: Iterable[Chunk]) -> str:
    """Several chunks as one write (the events of one step leave together)."""
    return "".join(sse.data(wire(chunk)) for chunk in chunks)


# --- the two routes ---------------------------------------------------------------------------


class CompletionsDialect(OpenAIDialect[CompletionRequest]):
    """``POST /v1/completions``: text or token-id prompts, ``echo``, legacy logprobs (an echoed prompt's too)."""

    id_prefix = "cmpl"
    chunk_type = CompletionChunk

    def _translate(
        self, body: CompletionRequest, model: ModelConfig, settings: Settings, request_id: str
    ) -> GenerationRequest:
        prompts, token_prompts = completion_prompts(body.prompt)
        if body.suffix is not None:
            raise unsupported("suffix", "insertion (suffix) is not supported; remove it")
        if body.best_of is not None and body.best_of != body.n:
            raise unsupported("best_of", f"only best_of == n is supported (got best_of={body.best_of}, n={body.n})")
        # Token-id prompts count against MAX_PROMPTS_PER_REQUEST here, and MAX_PROMPT_TOKENS in the replica.
        check_limits(prompts or [""] * len(token_prompts), body.n, settings)
        params = sampling_params(
            model,
            max_new_tokens=body.max_tokens,
            **sampling_fields(body),
            logprobs=body.logprobs,
        )
        if body.echo and body.logprobs is not None:
            params = dataclasses.replace(params, prompt_logprobs=body.logprobs)
        return GenerationRequest(request_id, params, prompts=prompts, n=body.n, token_prompts=token_prompts)

    def response(
        self,
        body: CompletionRequest,
        model: ModelConfig,
        request: GenerationRequest,
        started: Started,
        done: list[Completion],
    ) -> CompletionResponse:
        choices = []
        for row, completion in enumerate(done):
            prefix = echoed(request, started, row) if body.echo else ""
            logprobs = None
            if body.logprobs is not None:
                logprobs = self._logprobs(request, started, row, completion.logprobs)
            choices.append(
                CompletionChoice(
                    index=row,
                    text=prefix + completion.text,
                    logprobs=logprobs,
                    finish_reason=completion.finish_reason,  # type: ignore[arg-type]
                )
            )
        return CompletionResponse(choices=choices, **self._answer_fields(model, request, started, done))

    def _logprobs(
        self, request: GenerationRequest, started: Started | None, row: int, generated: Sequence[TokenLogprob]
    ) -> CompletionLogprobs:
        """A row's legacy logprobs: the echoed prompt's tokens first (with echo), then the generated ones."""
        prompt = prompt_entries(started, request, row)
        return completion_logprobs((*prompt, *generated), 0, unscored=1 if prompt else 0)

    # --- streaming ---------------------------------------------------------------------------------
    def _open_row(self, state: StreamState, row: int) -> Iterable[list[CompletionChoice]]:
        state.rows[row] = 0  # the text offset of the row's next token
        if state.body.echo:
            prompt = echoed(state.request, state.started, row)
            logprobs = None
            if state.body.logprobs is not None:
                logprobs = self._logprobs(state.request, state.started, row, ())
                state.rows[row] = sum(len(t) for t in logprobs.tokens)
            else:
                state.rows[row] = len(prompt)
            yield [CompletionChoice(index=row, text=prompt, logprobs=logprobs, finish_reason=None)]

    def _delta_choices(self, state: StreamState, delta: Delta) -> Iterable[list[CompletionChoice]]:
        if not delta.text and delta.finish_reason is None and not delta.logprobs:
            return
        logprobs = None
        if state.body.logprobs is not None:
            logprobs = completion_logprobs(delta.logprobs, state.rows.get(delta.index, 0))
        state.rows[delta.index] = state.rows.get(delta.index, 0) + len(delta.text)
        reason = finish_reason(delta)
        yield [CompletionChoice(index=delta.index, text=delta.text, logprobs=logprobs, finish_reason=reason)]


COMPLETIONS = CompletionsDialect()


class ChatDialect(OpenAIDialect[ChatCompletionRequest]):
    """``POST /v1/chat/completions``: messages rendered by the model's chat template, tools.

    A stream follows OpenAI's chunk shapes: a first chunk per choice with the role, content deltas, a
    last chunk with ``finish_reason`` (``tool_calls`` after an auto or required call; a named
    ``tool_choice`` ends with ``stop``, as OpenAI and vLLM answer it).
    """

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
                        tool_calls=[call_out(call) for call in calls] or None,
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


CHAT = ChatDialect()
