"""The call driver: how a translated request reaches its model and comes back, within REQUEST_TIMEOUT_S.

A dialect translates its body, then calls :class:`Calls`: ``unary`` for a whole answer, ``stream``
for the items it renders as SSE. ``stream`` waits a little for the model server to take the
request (so that errors before any token keep their status), then hands back the items: heartbeat
text while a model wakes, ``Started``, tuples of ``Delta``. A failure after that is the dialect's
to send as an error event, made by ``failed`` (counted, on the access record). A request that finds
its model at zero counts a wake once. Everything a call learns (the model, its tokens, queue time,
first token) goes to the request's access record (``serving.api.access``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

from fastapi import Request

from engine.embedding_types import EmbeddingRequest, EmbeddingResult
from engine.types import Completion, GenerationRequest, Started, StreamItem
from observability import metrics
from serving.api import access
from serving.api.budget import check_output_budget
from serving.api.errors import ApiError, Family, api_error, from_exception
from serving.backend import ModelBackend
from settings import ModelConfig, Settings

T = TypeVar("T")
Waiting = Callable[[float], Awaitable[str]]  # elapsed seconds -> what the wait is for, in words


class Calls:
    """How a dialect reaches a model, streamed or not.

    Example (in a dialect)::

        items = await calls.stream(request, model, call, "openai")   # ApiError before the stream begins
        try:
            async for item in items: ...                             # str heartbeat, Started, (Delta, ...)
        except Exception as exc:
            yield error_event(await calls.failed(request, model, exc, "openai"))
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
        record, (started, done), headers = await self._whole(
            request, model, lambda: self.backend.generate(model, call), family
        )
        record.started(started)
        record.finished(done)
        return started, done, headers

    async def embedded(
        self, request: Request, model: ModelConfig, call: EmbeddingRequest
    ) -> tuple[EmbeddingResult, dict[str, str]]:
        """An embedding model's vectors, within REQUEST_TIMEOUT_S; ``x-cold-start`` as for ``unary``."""
        return await self.answered(request, model, lambda: self.backend.embed(model, call))

    async def answered(
        self, request: Request, model: ModelConfig, call: Callable[[], Awaitable[T]]
    ) -> tuple[T, dict[str, str]]:
        """``call()``'s answer from the model's replica (waking it) for a route of OpenAI's error shape
        (embeddings, /tokenize, /detokenize), with ``x-cold-start`` as for ``unary``."""
        _, result, headers = await self._whole(request, model, call, "openai")
        return result, headers

    async def _whole(
        self, request: Request, model: ModelConfig, answer: Callable[[], Awaitable[T]], family: Family
    ) -> tuple[access.Access, T, dict[str, str]]:
        """``answer()`` within REQUEST_TIMEOUT_S, its failures as statuses; ``x-cold-start`` when the model was
        not running as the request arrived (how long the request waited for it)."""
        record, cold = await self._begin(request, model, stream=False)
        try:
            result = await asyncio.wait_for(answer(), self.settings.request_timeout_s)
        except TimeoutError:
            raise self._counted(record, await self.timed_out(model, family)) from None
        except Exception as exc:  # the model's failures become statuses here, not in Starlette's error path
            raise self._failure(record, exc, family) from None
        finally:
            self._waking.discard(model.name)  # the model is up, or this wake failed
        if not cold:
            return record, result, {}
        record.cold_start_s = time.monotonic() - record.arrived
        return record, result, {"x-cold-start": f"{record.cold_start_s:.3f}"}

    async def stream(
        self, request: Request, model: ModelConfig, call: GenerationRequest, family: Family
    ) -> AsyncIterator[str | StreamItem]:
        """The model's items (heartbeat text first while it wakes); errors before the model server
        takes the request are raised here, as ApiError, so they still get their own status."""
        settings = self.settings
        check_output_budget(call, settings.max_output_tokens_per_request)
        record, cold = await self._begin(request, model, stream=True)
        try:
            opened = await ModelCall.open(
                self.backend.stream(model, call), settings.request_timeout_s, wait_s=settings.stream_heartbeat_s
            )
        except TimeoutError:
            self._waking.discard(model.name)
            raise self._counted(record, await self.timed_out(model, family)) from None
        except Exception as exc:
            self._waking.discard(model.name)
            raise self._failure(record, exc, family) from None
        return self._items(record, model, opened, cold)

    async def _items(
        self, record: access.Access, model: ModelConfig, opened: ModelCall, cold: bool
    ) -> AsyncIterator[str | StreamItem]:
        async def waiting(elapsed: float) -> str:
            status = await self.backend.status(model)
            phase = (status.waking or {}).get("current") or status.state.replace("_", " ")
            return f"waking {model.name}: {phase} ({elapsed:.0f} s)"

        try:
            async with contextlib.aclosing(opened.items(self.settings.stream_heartbeat_s, waiting)) as model_items:
                async for item in model_items:
                    if isinstance(item, Started):
                        record.started(item)
                        self._waking.discard(model.name)
                        if cold:
                            record.cold_start_s = time.monotonic() - record.arrived
                    elif isinstance(item, tuple):
                        record.deltas(item)
                    yield item
        finally:
            self._waking.discard(model.name)

    async def failed(self, request: Request, model: ModelConfig, exc: Exception, family: Family) -> ApiError:
        """A failure after the stream began (the status is sent already): the error its event carries."""
        self._waking.discard(model.name)
        record = access.of(request)
        if isinstance(exc, TimeoutError):
            error = self._counted(record, await self.timed_out(model, family))
        else:
            error = self._failure(record, exc, family)
        record.error = error.kind
        return error

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


@dataclass
class ModelCall:
    """One request's stream from a model server.

    It makes the wait for a cold start visible as heartbeat text, enforces REQUEST_TIMEOUT_S, and
    always closes the model server's stream, which frees the request's rows when the client goes away.

    Example::

        call = await ModelCall.open(backend.stream(model, request), deadline_s=300, wait_s=2)
        async for item in call.items(heartbeat_s=2, waiting=describe):
            ...  # str: a heartbeat; Started; then tuples of Delta
    """

    stream: AsyncIterator[StreamItem]
    deadline: float
    started: Started | None = None
    arrived: float = field(default_factory=time.monotonic)
    started_after_s: float | None = None
    _pending: asyncio.Future | None = None

    @classmethod
    async def open(cls, stream: AsyncIterator[StreamItem], deadline_s: float, wait_s: float) -> ModelCall:
        """Start the call; wait up to ``wait_s`` for the model server to take it.

        Errors raised in that time (a full queue, a prompt too long, no chat template) propagate,
        so the route can still answer with their status instead of a 200 stream.
        """
        call = cls(stream=aiter(stream), deadline=time.monotonic() + deadline_s)
        call._pending = asyncio.ensure_future(anext(call.stream))
        try:
            await asyncio.wait({call._pending}, timeout=min(wait_s, deadline_s))
            if call._pending.done():
                call._take_started(call._pending.result())
        except BaseException:
            await call.close()
            raise
        return call

    def _take_started(self, item: StreamItem) -> None:
        if not isinstance(item, Started):
            raise RuntimeError(f"a model stream must begin with Started, got {type(item).__name__}")
        self.started = item
        self.started_after_s = time.monotonic() - self.arrived
        self._pending = None

    def _remaining(self) -> float:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("REQUEST_TIMEOUT_S passed")
        return remaining

    async def items(self, heartbeat_s: float, waiting: Waiting | None = None) -> AsyncIterator[str | StreamItem]:
        """Heartbeat text (str) until the model server takes the request, then its items."""
        try:
            while self.started is None:
                assert self._pending is not None
                done, _ = await asyncio.wait({self._pending}, timeout=min(heartbeat_s, self._remaining()))
                if done:
                    self._take_started(self._pending.result())
                else:
                    self._remaining()  # raises once the deadline has passed
                    elapsed = time.monotonic() - self.arrived
                    yield await waiting(elapsed) if waiting else f"waiting for the model ({elapsed:.0f} s)"
            yield self.started
            while True:
                try:
                    async with asyncio.timeout(self._remaining()):  # no task per item, as wait_for would make
                        item = await anext(self.stream)
                except StopAsyncIteration:
                    return
                yield item
        finally:
            await self.close()

    async def close(self) -> None:
        """Stop listening; the model server hears of it and frees the request's rows."""
        if self._pending is not None and not self._pending.done():
            self._pending.cancel()
            with contextlib.suppress(BaseException):
                await self._pending
        self._pending = None
        close = getattr(self.stream, "aclose", None)
        if close is not None:
            with contextlib.suppress(BaseException):
                await close()
