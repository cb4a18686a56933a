"""The Gateway's ``ModelBackend`` over the pool: every model the pool serves, admin-loaded ones included.

The Gateway binds the pool controller's handle and builds ``PoolBackend(pool_handle, settings)``.
Listings come from the pool's typed statuses (state, replicas, priority, last cold start, waking);
a request for an evicted model waits at the pool for room and raises ``ModelUnavailableError`` when
none comes in REQUEST_TIMEOUT_S (the routes answer 503 with Retry-After). No HTTP here.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator

from ray.serve.handle import DeploymentHandle

from engine.embedding_types import EmbeddingRequest, EmbeddingResult
from engine.types import Completion, GenerationRequest, Started, StreamItem
from serving.models import ModelState, ModelStatus, resolve_model
from serving.pool.client import PoolClient
from serving.pool.errors import UnknownModelError
from settings import ModelConfig, Settings

logger = logging.getLogger("ray.serve")


class PoolBackend:
    """``serving.backend.ModelBackend`` with the pool behind it; raises the pool's errors.

    Example (in the Gateway's constructor)::

        backend = PoolBackend(pool_handle, settings)
        app = create_app(backend, settings)
    """

    def __init__(self, controller: DeploymentHandle, settings: Settings, refresh_s: float = 0.5) -> None:
        self._controller = controller
        self._client = PoolClient(controller, refresh_s=refresh_s, retry_after_s=settings.retry_after_s)
        self._timeout_s = settings.request_timeout_s
        self._configs: dict[str, ModelConfig] = {}
        self._configs_at = -math.inf  # when they were fetched (monotonic)
        self._refresh_s = refresh_s
        self._streams: dict[str, DeploymentHandle] = {}

    async def _models(self) -> list[ModelConfig]:
        names = [status.name for status in await self._client.snapshot()]
        # Fetched again for a new name and at most every refresh_s, so that a model reloaded under the
        # same name (new limits, new defaults) is served with its new configuration within one refresh.
        stale = time.monotonic() - self._configs_at >= self._refresh_s
        if stale or any(name not in self._configs for name in names):
            configs = await self._controller.configs.remote()
            self._configs_at = time.monotonic()
            self._configs = {}
            for name, config in configs.items():
                try:  # validated where written; read back as data, no disk lookups
                    self._configs[name] = ModelConfig.from_stored(config)
                except ValueError:  # pydantic's ValidationError: the controller lists it as failed
                    logger.exception("gateway: the stored configuration of %s does not validate; skipped", name)
        return [self._configs[name] for name in names if name in self._configs]

    async def resolve(self, requested: str | None) -> ModelConfig:
        return resolve_model(await self._models(), requested)

    async def _handle(self, model: ModelConfig) -> DeploymentHandle:
        # ModelUnavailableError (no room in time) and UnknownModelError (unloaded since resolve) go up as they are.
        return await self._client.acquire(model.name, timeout_s=self._timeout_s, max_waiters=model.max_queued_requests)

    async def stream(self, model: ModelConfig, request: GenerationRequest) -> AsyncIterator[StreamItem]:
        handle = await self._handle(model)
        if model.name not in self._streams:
            self._streams[model.name] = handle.options(stream=True)
        response = self._streams[model.name].stream.remote(request)
        try:
            async for item in response:
                yield item
        finally:
            response.cancel()  # also takes a request still queued for room out of the model's queue

    async def generate(self, model: ModelConfig, request: GenerationRequest) -> tuple[Started, list[Completion]]:
        handle = await self._handle(model)
        response = handle.generate.remote(request)
        try:
            return await response
        except asyncio.CancelledError:
            response.cancel()
            raise

    async def embed(self, model: ModelConfig, request: EmbeddingRequest) -> EmbeddingResult:
        handle = await self._handle(model)
        response = handle.embed.remote(request)
        try:
            return await response
        except asyncio.CancelledError:
            response.cancel()
            raise

    # --- /admin ------------------------------------------------------------------------------------
    async def list_models(self) -> list[dict]:
        return await self._controller.list_models.remote()

    async def load(self, entry: dict) -> dict:
        return await self._controller.load.remote(entry)

    async def unload(self, name: str, wait_s: float) -> dict:
        return await self._controller.unload.remote(name, wait_s)

    async def update(self, name: str, priority: int | None, min_replicas: int | None, max_replicas: int | None) -> dict:
        return await self._controller.update.remote(
            name, priority=priority, min_replicas=min_replicas, max_replicas=max_replicas
        )

    async def waiting_for_room(self, model: ModelConfig) -> bool:
        """Whether a request for ``model`` that timed out waited for room (503) rather than for tokens (504)."""
        return await self._client.waiting_for_room(model.name)

    async def statuses(self) -> list[ModelStatus]:
        return await self._client.snapshot()

    async def status(self, model: ModelConfig) -> ModelStatus:
        try:
            return await self._client.entry(model.name)
        except UnknownModelError:
            return ModelStatus(name=model.name, model_id=model.model_id, state=ModelState.UNKNOWN)
