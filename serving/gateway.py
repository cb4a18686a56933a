"""The ingress deployment: the HTTP API, light enough to stay up while every model is at zero.

It never imports torch or transformers. It holds one Serve handle per model (``handle.options(
stream=True)`` configured once) and forwards each request to the model it names; while a model has
no replica, Serve queues the call at the handle and starts one, and the Gateway waits for it. It
answers ``/healthz`` and ``/v1/models`` from Serve's status, never waking a model.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle

from engine.types import Completion, GenerationRequest, Started, StreamItem
from serving.app import create_app
from serving.backend import ModelStatus, resolve_model
from settings import ModelConfig, Settings

logger = logging.getLogger("ray.serve")

STATUS_TTL_S = 1.0  # probes every few ms still cost the controller one status call a second


class HandleBackend:
    """Reaches each model's deployment through its Serve handle; reads replica states from Serve."""

    def __init__(self, handles: dict[str, DeploymentHandle], settings: Settings, app_name: str) -> None:
        self._settings = settings
        self._app_name = app_name
        self._models = {m.name: m for m in settings.model_configs}
        self._unary = dict(handles)
        self._streams = {name: handle.options(stream=True) for name, handle in handles.items()}
        self._cold_starts: dict[str, dict[str, Any]] = {}
        self._states: dict[str, dict[str, int]] = {}
        self._states_at = 0.0
        self._lock = asyncio.Lock()
        self._created = int(time.time())

    async def resolve(self, requested: str | None) -> ModelConfig:
        return resolve_model(self._settings.model_configs, requested)

    async def stream(self, model: ModelConfig, request: GenerationRequest) -> AsyncIterator[StreamItem]:
        response = self._streams[model.name].stream.remote(request)
        try:
            async for item in response:
                if isinstance(item, Started) and item.cold_start is not None:
                    self._cold_starts[model.name] = item.cold_start
                yield item
        finally:
            response.cancel()  # no-op once finished; frees the rows of a caller that went away

    async def generate(self, model: ModelConfig, request: GenerationRequest) -> tuple[Started, list[Completion]]:
        started, completions = await self._unary[model.name].generate.remote(request)
        if started.cold_start is not None:
            self._cold_starts[model.name] = started.cold_start
        return started, completions

    async def statuses(self) -> list[ModelStatus]:
        states = await self._replica_states()
        return [self._status(model, states.get(model.deployment_name)) for model in self._models.values()]

    async def status(self, model: ModelConfig) -> ModelStatus:
        states = await self._replica_states()
        return self._status(model, states.get(model.deployment_name))

    async def _replica_states(self) -> dict[str, dict[str, int]]:
        async with self._lock:  # one controller call at a time, however many probes
            if time.monotonic() - self._states_at > STATUS_TTL_S:
                self._states = await asyncio.to_thread(self._read_states)
                self._states_at = time.monotonic()
            return self._states

    def _read_states(self) -> dict[str, dict[str, int]]:
        try:
            app = serve.status().applications.get(self._app_name)
        except Exception:  # the controller being briefly unreachable must not fail a probe
            logger.warning("could not read the models' replica states", exc_info=True)
            return {}
        if app is None:
            return {}
        return {
            name: {str(k): v for k, v in deployment.replica_states.items()}
            for name, deployment in app.deployments.items()
        }

    def _status(self, model: ModelConfig, states: dict[str, int] | None) -> ModelStatus:
        if states is None:
            state, running, starting = "unknown", 0, 0
        else:
            running = states.get("RUNNING", 0)
            starting = sum(states.get(s, 0) for s in ("STARTING", "UPDATING", "RECOVERING"))
            state = "running" if running else "starting" if starting else "scaled_to_zero"
        return ModelStatus(
            name=model.name,
            model_id=model.model_id,
            state=state,  # type: ignore[arg-type]
            running=running,
            starting=starting,
            min_replicas=model.min_replicas,
            max_replicas=model.max_replicas,
            priority=model.priority,
            created=self._created,
            last_cold_start=self._cold_starts.get(model.name),
        )


@serve.deployment(name="Gateway")
@serve.ingress()
class Gateway:
    """HTTP ingress; see ``serving.app`` for the routes.

    Example::

        Gateway.options(**settings.gateway_options()).bind({"my-model": model_app}, settings)
    """

    def __init__(self, models: dict[str, DeploymentHandle], settings: Settings) -> None:
        check_http_address(settings)
        if not settings.api_keys:
            logger.warning("no API_KEY or API_KEYS_FILE set: /generate and /v1 are open to anyone who can reach them")
        app_name = serve.get_replica_context().app_name
        self._app = create_app(HandleBackend(models, settings, app_name), settings)

    def __serve_build_asgi_app__(self):
        return self._app


def check_http_address(settings: Settings) -> None:
    """Fail loudly when HOST/PORT ask for an address that Serve's HTTP proxy does not listen on.

    Serve fixes its HTTP address when it starts (``serve start --http-host/--http-port`` or a
    config file's http_options), before any application is deployed, so a deployment cannot move it.
    """
    if settings.host is None and settings.port is None:
        return
    from ray.serve.context import _get_global_client

    http = _get_global_client().http_config
    wrong = []
    if settings.host is not None and settings.host != http.host:
        wrong.append(f"HOST={settings.host} but Serve listens on host {http.host}")
    if settings.port is not None and settings.port != http.port:
        wrong.append(f"PORT={settings.port} but Serve listens on port {http.port}")
    if wrong:
        raise ValueError(
            "; ".join(wrong) + ". Serve's HTTP address is set when Serve starts: run "
            f"`serve start --http-host {settings.host or http.host} --http-port {settings.port or http.port}` "
            "before `serve run`, or deploy with a config file whose http_options match."
        )
