"""What the HTTP layer needs from the model side, and how one request's stream is driven.

``ModelBackend`` is implemented over the pool in the Gateway (``serving.pool.backend.PoolBackend``)
and by a fake in the HTTP tests; it raises the pool's errors (``serving.pool.errors``), which the
routes map to statuses in one place (``serving.api.errors``).

:class:`ModelCall` drives one request: it waits a little for the model server to take the request
(so that errors before any token still get a proper status), makes the wait for a cold start
visible as heartbeat comments, enforces REQUEST_TIMEOUT_S, and always closes the model server's
stream, which frees the request's rows when the client goes away.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

from engine.embedding_types import EmbeddingRequest, EmbeddingResult
from engine.types import Completion, GenerationRequest, Started, StreamItem
from serving.models import ModelStatus, resolve_model
from settings import ModelConfig

__all__ = ["ModelBackend", "ModelCall", "ModelStatus", "resolve_model"]


class ModelBackend(Protocol):
    """The model side, as the HTTP layer sees it."""

    async def resolve(self, requested: str | None) -> ModelConfig:
        """The served model a request names (None: the only one); raises UnknownModelError otherwise."""
        ...

    def stream(self, model: ModelConfig, request: GenerationRequest) -> AsyncIterator[StreamItem]: ...

    async def generate(self, model: ModelConfig, request: GenerationRequest) -> tuple[Started, list[Completion]]: ...

    async def embed(self, model: ModelConfig, request: EmbeddingRequest) -> EmbeddingResult: ...

    async def statuses(self) -> list[ModelStatus]: ...

    async def status(self, model: ModelConfig) -> ModelStatus: ...

    async def waiting_for_room(self, model: ModelConfig) -> bool:
        """Whether requests for ``model`` wait for room on the cluster (a timeout is then 503, not 504)."""
        ...


Waiting = Callable[[float], Awaitable[str]]  # elapsed seconds -> what the wait is for, in words


@dataclass
class ModelCall:
    """One request's stream from a model server.

    Example::

        call = await ModelCall.open(backend.stream(model, request), deadline_s=300, wait_s=2)
        async for item in call.items(heartbeat_s=2, waiting=describe):
            ...  # str: a heartbeat comment; Started; then tuples of Delta
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
        """Heartbeat comments (str) until the model server takes the request, then its items."""
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
                    item = await asyncio.wait_for(anext(self.stream), self._remaining())
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
