"""The Gateway's ``ModelBackend`` over the pool: every model the pool serves, admin-loaded ones included.

A drop-in for ``serving.gateway.HandleBackend``: the Gateway binds the pool controller's handle
instead of one handle per model and builds ``PoolBackend(pool_handle, settings)``. Listings come
from the pool (state, replicas, priority, last cold start, waking); a request for an evicted model
waits at the pool for room and gets 503 with Retry-After when none comes in REQUEST_TIMEOUT_S.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from ray.serve.handle import DeploymentHandle

from engine.types import Completion, GenerationRequest, Started, StreamItem
from serving.api.errors import ApiError
from serving.backend import ModelStatus, resolve_model
from serving.pool.client import PoolClient
from serving.pool.errors import ModelUnavailableError, UnknownModelError
from settings import ModelConfig, Settings


class PoolBackend:
    """``serving.backend.ModelBackend`` with the pool behind it.

    Example (in the Gateway's constructor)::

        backend = PoolBackend(pool_handle, settings)
        app = create_app(backend, settings)
    """

    def __init__(self, controller: DeploymentHandle, settings: Settings, refresh_s: float = 0.5) -> None:
        self._controller = controller
        self._client = PoolClient(controller, refresh_s=refresh_s, retry_after_s=settings.retry_after_s)
        self._timeout_s = settings.request_timeout_s
        self._configs: dict[str, ModelConfig] = {}
        self._streams: dict[str, DeploymentHandle] = {}

    async def _models(self) -> list[ModelConfig]:
        names = [entry["id"] for entry in await self._client.snapshot()]
        if any(name not in self._configs for name in names):  # a model loaded since: fetch its configuration
            configs = await self._controller.configs.remote()
            self._configs = {name: ModelConfig.model_validate(config) for name, config in configs.items()}
        return [self._configs[name] for name in names if name in self._configs]

    async def resolve(self, requested: str | None) -> ModelConfig:
        return resolve_model(await self._models(), requested)

    async def _handle(self, model: ModelConfig) -> DeploymentHandle:
        try:
            return await self._client.acquire(model.name, timeout_s=self._timeout_s)
        except ModelUnavailableError as exc:
            raise ApiError(503, "overloaded", str(exc), headers={"Retry-After": str(exc.retry_after_s)}) from None
        except UnknownModelError as exc:  # unloaded between resolve and here
            raise ApiError(404, "model_not_found", str(exc), param="model") from None

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
        return [_status(entry) for entry in await self._client.snapshot()]

    async def status(self, model: ModelConfig) -> ModelStatus:
        try:
            return _status(await self._client.entry(model.name))
        except UnknownModelError:
            return ModelStatus(name=model.name, model_id=model.model_id, state="unknown")


def _status(entry: dict) -> ModelStatus:
    replicas = entry["replicas"]
    return ModelStatus(
        name=entry["id"],
        model_id=entry["root"],
        state=entry["state"],
        running=replicas["running"],
        starting=replicas["starting"],
        min_replicas=replicas["min"],
        max_replicas=replicas["max"],
        priority=entry["priority"],
        created=entry["created"],
        last_cold_start=entry["last_cold_start"],
        waking=entry["waking"],
    )
