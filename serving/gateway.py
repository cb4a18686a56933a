"""The ingress deployment: the HTTP API, light enough to stay up while the model is at zero.

It never imports torch or transformers. It answers ``/healthz`` itself and forwards generation to
the Generator through a DeploymentHandle; while the Generator has no replica, Serve queues the
call at the handle and starts one, and the Gateway waits for it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle

from engine.params import Completion, SamplingParams
from serving.app import create_app
from serving.generator import GeneratorReply
from serving.schemas import GeneratorStatus
from settings import Settings

logger = logging.getLogger("ray.serve")

STATUS_TTL_S = 1.0  # probes every few ms still cost the controller one status call a second


class HandleBackend:
    """Reaches the Generator deployment through a Serve handle; reads replica state from Serve."""

    def __init__(self, handle: DeploymentHandle, settings: Settings, app_name: str) -> None:
        self._handle = handle
        self._settings = settings
        self._app_name = app_name
        self._deployment = handle.deployment_name
        self._cold_start: dict[str, Any] | None = None
        self._status: GeneratorStatus | None = None
        self._status_at = 0.0
        self._status_lock = asyncio.Lock()

    async def generate(self, prompts: list[str], params: SamplingParams) -> list[Completion]:
        reply: GeneratorReply = await self._handle.generate.remote(prompts, params)
        if reply.cold_start is not None:
            self._cold_start = reply.cold_start
        return reply.completions

    def last_cold_start(self) -> dict[str, Any] | None:
        return self._cold_start

    async def status(self) -> GeneratorStatus:
        async with self._status_lock:  # one controller call at a time, however many probes
            if self._status is None or time.monotonic() - self._status_at > STATUS_TTL_S:
                self._status = await asyncio.to_thread(self._read_status)
                self._status_at = time.monotonic()
            return self._status

    def _read_status(self) -> GeneratorStatus:
        states: dict[str, int] = {}
        try:
            app = serve.status().applications.get(self._app_name)
            if app is not None and self._deployment in app.deployments:
                states = {str(k): v for k, v in app.deployments[self._deployment].replica_states.items()}
        except Exception:  # the controller being briefly unreachable must not fail a probe
            logger.warning("could not read the Generator's replica states", exc_info=True)
            return self._summary("unknown", 0, 0)
        running = states.get("RUNNING", 0)
        starting = sum(states.get(s, 0) for s in ("STARTING", "UPDATING", "RECOVERING"))
        state = "running" if running else "starting" if starting else "scaled_to_zero"
        return self._summary(state, running, starting)

    def _summary(self, state: str, running: int, starting: int) -> GeneratorStatus:
        return GeneratorStatus(
            state=state,  # type: ignore[arg-type]
            running_replicas=running,
            starting_replicas=starting,
            min_replicas=self._settings.min_replicas,
            max_replicas=self._settings.max_replicas,
        )


@serve.deployment(name="Gateway")
@serve.ingress()
class Gateway:
    """HTTP ingress; see ``serving.app`` for the routes.

    Example::

        Gateway.options(**settings.gateway_options()).bind(generator, settings)
    """

    def __init__(self, generator: DeploymentHandle, settings: Settings) -> None:
        check_http_address(settings)
        app_name = serve.get_replica_context().app_name
        self._app = create_app(HandleBackend(generator, settings, app_name), settings)

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
