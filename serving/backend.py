"""What the HTTP layer needs from the model side: the ``ModelBackend`` protocol.

It is implemented over the pool in the Gateway (``serving.pool.client.PoolBackend``) and by a fake
in the HTTP tests; it raises the pool's errors (``serving.pool.errors``), which the routes map to
statuses in one place (``serving.api.errors``). The call driver is ``serving.api.calls``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

from engine.embedding_types import EmbeddingRequest, EmbeddingResult
from engine.tokenization import DetokenizeRequest, TokenizeRequest, TokenizeResult
from engine.types import Completion, GenerationRequest, Started, StreamItem
from serving.models import ModelStatus, resolve_model
from settings import ModelConfig

__all__ = ["ModelBackend", "ModelStatus", "resolve_model"]


class ModelBackend(Protocol):
    """The model side, as the HTTP layer sees it."""

    async def resolve(self, requested: str | None) -> ModelConfig:
        """The served model a request names (None: the only one); raises UnknownModelError otherwise."""
        ...

    def stream(self, model: ModelConfig, request: GenerationRequest) -> AsyncIterator[StreamItem]: ...

    async def generate(self, model: ModelConfig, request: GenerationRequest) -> tuple[Started, list[Completion]]: ...

    async def embed(self, model: ModelConfig, request: EmbeddingRequest) -> EmbeddingResult: ...

    async def tokenize(self, model: ModelConfig, request: TokenizeRequest) -> TokenizeResult: ...

    async def detokenize(self, model: ModelConfig, request: DetokenizeRequest) -> str: ...

    async def statuses(self) -> list[ModelStatus]: ...

    async def status(self, model: ModelConfig) -> ModelStatus: ...

    async def waiting_for_room(self, model: ModelConfig) -> bool:
        """Whether requests for ``model`` wait for room on the cluster (a timeout is then 503, not 504)."""
        ...
