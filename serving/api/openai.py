"""The OpenAI dialects: one object per route (completions, chat) that translates, answers and streams.

Choices are numbered as OpenAI numbers them: choice ``p * n + c`` is the c-th completion of prompt
p, which is the model server's row number. A route hands its body to its dialect, and the rest of
the request's way is read from here, downwards::

    return await CHAT.serve(body, model, request, calls)    # or COMPLETIONS

``serve`` translates (``translate``: the shared checks, the route's ``_translate`` hook, the
extras of ``serving.api.openai_params``), reaches the model through the call driver
(``serving.api.calls``), and renders: the JSON answer (``response``) or the stream
(``stream``: heartbeats become comments, each row opens (``_open_row``), each delta becomes chunk
choices (``_delta_choices``), a usage chunk follows when ``stream_options.include_usage`` asks,
then ``data: [DONE]``; a failure after the start is an error event). The route's hooks
(``openai_completions.py``, ``openai_chat.py``) call only leaves: schemas, responses, params, tools.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel

from engine.types import Completion, Delta, GenerationRequest, Started
from serving.api import access, sse
from serving.api.calls import Calls
from serving.api.errors import ApiError, invalid_value
from serving.api.openai_params import sampling_extras
from serving.api.openai_responses import ChatCompletionChunk, Chunk, CompletionChunk, Usage, usage, wire
from serving.api.openai_schemas import OpenAIRequest
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

            def render() -> JSONResponse:
                return JSONResponse(
                    self.response(body, model, call, started, done).model_dump(mode="json"), headers=headers
                )

            if call.params.logprobs is None and call.params.prompt_logprobs is None:
                return render()
            # An answer with log-probabilities can hold tens of thousands of entries (n x tokens x alternatives):
            # built and serialised here it would hold the Gateway's event loop, which serves every other
            # request, for hundreds of milliseconds. On a worker thread the loop keeps its turns.
            return await asyncio.to_thread(render)
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
