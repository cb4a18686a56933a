"""What the HTTP layer needs from the model side, and how one request's stream is driven.

``ModelBackend`` is implemented with Serve handles in the Gateway (``serving.gateway``) and by a
fake in the HTTP tests. :class:`ModelCall` drives one request: it waits a little for the model
server to take the request (so that errors before any token still get a proper status), makes the
wait for a cold start visible as heartbeat comments, enforces REQUEST_TIMEOUT_S, and always closes
the model server's stream, which frees the request's rows when the client goes away.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from engine.types import Completion, Delta, GenerationRequest, Started, StreamItem
from serving.api.errors import ApiError
from settings import ModelConfig

ModelState = Literal["running", "starting", "scaled_to_zero", "evicted", "unknown"]


@dataclass(frozen=True)
class ModelStatus:
    """A model's state as the Gateway reports it; reading it never wakes the model."""

    name: str
    model_id: str
    state: ModelState
    running: int = 0
    starting: int = 0
    min_replicas: int = 0
    max_replicas: int = 1
    priority: int = 0
    created: int = 0
    last_cold_start: dict[str, Any] | None = None
    waking: dict[str, Any] | None = None

    def entry(self) -> dict[str, Any]:
        """The model as an OpenAI model object, with its state (``/v1/models``, ``/healthz``)."""
        return {
            "id": self.name,
            "object": "model",
            "created": self.created,
            "owned_by": "llm-serve",
            "root": self.model_id,
            "state": self.state,
            "replicas": {
                "running": self.running,
                "starting": self.starting,
                "min": self.min_replicas,
                "max": self.max_replicas,
            },
            "priority": self.priority,
            "last_cold_start": self.last_cold_start,
            "waking": self.waking,
        }


class ModelBackend(Protocol):
    """The model side, as the HTTP layer sees it."""

    async def resolve(self, requested: str | None) -> ModelConfig:
        """The served model a request names (None: the only one); raises ApiError 404 otherwise."""
        ...

    def stream(self, model: ModelConfig, request: GenerationRequest) -> AsyncIterator[StreamItem]: ...

    async def generate(self, model: ModelConfig, request: GenerationRequest) -> tuple[Started, list[Completion]]: ...

    async def statuses(self) -> list[ModelStatus]: ...

    async def status(self, model: ModelConfig) -> ModelStatus: ...

    async def waiting_for_room(self, model: ModelConfig) -> bool:
        """Whether requests for ``model`` wait for room on the cluster (a timeout is then 503, not 504)."""
        ...


def resolve_model(models: Sequence[ModelConfig], requested: str | None) -> ModelConfig:
    """The model a request names by its served name or MODEL_ID (None: the only one), else a 4xx."""
    if requested is None:
        if len(models) == 1:
            return models[0]
        raise ApiError(
            422,
            "model_required",
            f"this service serves several models; name one in `model`: {', '.join(m.name for m in models)}",
            param="model",
        )
    for model in models:
        if model.accepts(requested):
            return model
    raise ApiError(
        404,
        "model_not_found",
        f"the model {requested!r} does not exist; this service serves: {', '.join(m.name for m in models)}",
        param="model",
    )


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

    async def deltas(self) -> AsyncIterator[tuple[Delta, ...]]:
        """The delta tuples only (after ``started``), for routes that do not stream heartbeats."""
        async for item in self.items(heartbeat_s=3600):
            if isinstance(item, tuple):
                yield item

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
