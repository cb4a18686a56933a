"""The Gateway's side of the pool: the ``ModelBackend`` the routes call, over a cached view of the models.

``PoolBackend(pool_handle, settings)`` is the ``serving.backend.ModelBackend`` the Gateway hands to
``create_app``: it resolves a request's model from the pool's stored configurations (validated where
written, read back as data), streams a request to that model's handle, and raises the pool's errors
(``serving.pool.errors``); no HTTP here. Below it, ``PoolClient`` keeps the snapshot and the handles.

Every Gateway replica holds one ``PoolClient`` over the pool controller's handle. Listings
(/v1/models, /healthz) read a snapshot at most ``refresh_s`` old, one controller call however many
probes. A request takes ``await client.acquire(name, timeout_s)``: for a model that is admitted (the
usual case) it returns the model's handle at once; for an evicted one it waits at the pool controller
for room and raises ``ModelUnavailableError`` (503 + Retry-After) when ``timeout_s`` passes first. The
waiters per model are bounded (the model's MAX_QUEUED_REQUESTS): past the bound a request gets
``TooManyWaitersError`` (503 + Retry-After) at once, so a burst for an evicted model cannot pile up
in the Gateway; probes and listings never wait behind them (they read the snapshot).

A request whose model was admitted but has no room yet waits in Serve's handle queue (its replica is
requested, so the cluster autoscaler may add a node). When the Gateway gives up on it, it must call
``response.cancel()``: only that takes it out of the queue (a cancelled ``await`` does not), and the
model's unplaced replica goes with the last queued request. ``waiting_for_room(name)`` then tells a
503 (no room) from a 504 (slow generation).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle

from engine.embedding_types import EmbeddingRequest, EmbeddingResult
from engine.tokenization import DetokenizeRequest, TokenizeRequest, TokenizeResult
from engine.types import Completion, GenerationRequest, Started, StreamItem
from serving.models import ModelState, ModelStatus, resolve_model
from serving.pool.errors import ModelUnavailableError, PoolError, TooManyWaitersError, UnknownModelError
from serving.transport import MODEL_HANDLE_OPTIONS
from settings import ModelConfig, Settings

logger = logging.getLogger("ray.serve")


class PoolClient:
    """Example (inside the Gateway)::

    client = PoolClient(pool_handle, retry_after_s=settings.retry_after_s)
    models = await client.snapshot()                     # for /v1/models and /healthz
    handle = await client.acquire("mini", timeout_s=300)  # UnknownModelError -> 404, ModelUnavailableError -> 503
    stream = handle.options(stream=True).generate.remote(...)
    """

    def __init__(self, controller: DeploymentHandle, refresh_s: float = 0.5, retry_after_s: int = 5) -> None:
        self._controller = controller
        self._refresh_s = refresh_s
        self._retry_after_s = retry_after_s
        self._snapshot: list[ModelStatus] = []
        self._at = float("-inf")
        self._lock = asyncio.Lock()
        self._waiters: Counter[str] = Counter()  # model -> requests waiting for room in acquire()
        self._handles: dict[str, asyncio.Future[DeploymentHandle]] = {}  # model application -> its handle

    async def snapshot(self, max_age_s: float | None = None) -> list[ModelStatus]:
        """Every model's status, as the pool controller last reported it."""
        max_age = self._refresh_s if max_age_s is None else max_age_s
        async with self._lock:  # one controller call at a time, however many callers
            if time.monotonic() - self._at > max_age:
                try:
                    self._snapshot = await self._controller.snapshot.remote()
                    self._at = time.monotonic()
                except Exception:
                    if self._at == float("-inf"):
                        raise
                    # The pool controller is restarting: probes and listings get the last view meanwhile.
                    logger.warning("pool controller unreachable; serving a snapshot %.1fs old", self.age_s())
            return self._snapshot

    def age_s(self) -> float:
        return time.monotonic() - self._at

    async def entry(self, name: str, max_age_s: float | None = None) -> ModelStatus:
        models = await self.snapshot(max_age_s)
        for model in models:
            if model.name == name:
                return model
        raise UnknownModelError(name, [model.name for model in models])

    async def acquire(self, name: str, timeout_s: float, max_waiters: int = -1) -> DeploymentHandle:
        """The handle of ``name`` once it may take requests; waits for room up to ``timeout_s``.

        At most ``max_waiters`` requests (-1: no bound) wait for room for one model in this Gateway
        replica; one more gets TooManyWaitersError (503 + Retry-After) at once, without waiting.
        """
        entry = await self.entry(name)
        if entry.admitted:
            return await self._handle(entry.app, entry.deployment)
        if 0 <= max_waiters <= self._waiters[name]:
            raise TooManyWaitersError(name, max_waiters, self._retry_after_s)
        self._waiters[name] += 1
        try:
            return await self._wait_for_room(name, timeout_s)
        finally:
            self._waiters[name] -= 1

    def waiters(self, name: str) -> int:
        """Requests of this Gateway replica waiting for room for ``name`` now."""
        return self._waiters[name]

    async def _wait_for_room(self, name: str, timeout_s: float) -> DeploymentHandle:
        started = time.monotonic()
        deadline = started + timeout_s
        entry = await self.entry(name, max_age_s=0)
        while not entry.admitted:
            try:
                if not await self._controller.acquire.remote(name, max(0.0, deadline - time.monotonic())):
                    raise ModelUnavailableError(name, time.monotonic() - started, self._retry_after_s)
            except PoolError:
                raise
            except Exception:  # the pool controller restarted under the wait: wait again on the new one
                if time.monotonic() >= deadline:
                    raise ModelUnavailableError(name, time.monotonic() - started, self._retry_after_s) from None
                logger.warning("pool controller unreachable while %s waits for room; retrying", name)
                await asyncio.sleep(0.5)
            entry = await self.entry(name, max_age_s=0)
        return await self._handle(entry.app, entry.deployment)

    async def waiting_for_room(self, name: str) -> bool:
        """Whether ``name`` waits for room now: a request for it that timed out gets 503, not 504."""
        try:
            return (await self.entry(name, max_age_s=0)).waiting_for_room
        except UnknownModelError:
            return False

    async def _handle(self, app: str, deployment: str | None) -> DeploymentHandle:
        # One handle per model application, made once however many requests arrive together: each handle
        # has its own router, and Serve counts MAX_QUEUED_REQUESTS per router, so a second handle would
        # let a second queue's worth wait for a model that has no replica yet.
        if app not in self._handles:
            self._handles[app] = asyncio.ensure_future(_model_handle(app, deployment))
        try:
            return await asyncio.shield(self._handles[app])  # a caller that leaves does not cancel the others'
        except Exception:
            self._handles.pop(app, None)  # Serve did not know the application (yet): the next request asks again
            raise


async def _model_handle(app: str, deployment: str | None) -> DeploymentHandle:
    if deployment is None:  # not seen by the pool yet (just loaded): ask Serve for the ingress
        handle = await asyncio.to_thread(serve.get_app_handle, app)
    else:  # the model's application has this one deployment
        handle = await asyncio.to_thread(serve.get_deployment_handle, deployment, app)
    return handle.options(**MODEL_HANDLE_OPTIONS)  # tokens over Serve's gRPC channel (serving.transport)


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
        self._configs_lock = asyncio.Lock()
        self._refresh_s = refresh_s
        self._streams: dict[str, DeploymentHandle] = {}

    async def _models(self) -> list[ModelConfig]:
        # The model list and the configurations are both refreshed every refresh_s: when both are due, their two
        # controller calls run at once, so that a burst of requests that finds them stale waits for one round trip.
        statuses = asyncio.ensure_future(self._client.snapshot())
        try:
            await self._refresh_configs()
            names = [status.name for status in await statuses]
        except BaseException:
            statuses.cancel()
            raise
        await self._refresh_configs(names)  # a name the configurations did not have yet (just loaded): fetched now
        return [self._configs[name] for name in names if name in self._configs]

    async def _refresh_configs(self, names: list[str] | None = None) -> None:
        """Fetch the configurations when refresh_s has passed (or one of ``names`` is missing), so that a model
        reloaded under the same name (new limits, new defaults) is served with its new configuration within one
        refresh. One fetch at a time: a burst of requests that finds them stale waits for one controller call."""
        async with self._configs_lock:
            stale = time.monotonic() - self._configs_at >= self._refresh_s
            if not stale and not any(name not in self._configs for name in names or ()):
                return
            configs = await self._controller.configs.remote()
            self._configs_at = time.monotonic()
            self._configs = {}
            for name, config in configs.items():
                try:  # validated where written; read back as data, no disk lookups
                    self._configs[name] = ModelConfig.from_stored(config)
                except ValueError:  # pydantic's ValidationError: the controller lists it as failed
                    logger.exception("gateway: the stored configuration of %s does not validate; skipped", name)

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
        return await self._whole(model, "generate", request)

    async def embed(self, model: ModelConfig, request: EmbeddingRequest) -> EmbeddingResult:
        return await self._whole(model, "embed", request)

    async def tokenize(self, model: ModelConfig, request: TokenizeRequest) -> TokenizeResult:
        return await self._whole(model, "tokenize", request)

    async def detokenize(self, model: ModelConfig, request: DetokenizeRequest) -> str:
        return await self._whole(model, "detokenize", request)

    async def _whole(self, model: ModelConfig, method: str, request: Any) -> Any:
        """One model server call answered whole; a caller gone cancels it (also out of a room queue)."""
        response = getattr(await self._handle(model), method).remote(request)
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
