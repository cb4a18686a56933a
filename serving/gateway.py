"""The ingress deployment: the HTTP API, light enough to stay up while every model is at zero.

It never imports torch or transformers. It talks to the pool controller (``serving.pool``), which
keeps every model's state and its own Serve application; a request for a model goes straight to
that model's handle (``handle.options(stream=True)``), and while the model has no replica Serve
queues the call and starts one. ``/healthz`` and ``/v1/models`` come from the pool's snapshot and
never wake a model.
"""

from __future__ import annotations

import logging
import sys

from ray import serve
from ray.serve.handle import DeploymentHandle

from serving.app import create_app
from serving.pool.client import PoolBackend
from serving.transport import warn_if_proxy_by_reference
from settings import Settings

logger = logging.getLogger("ray.serve")
# How long a thread may keep the GIL while another waits for it (Python's default is 5 ms). The Gateway's
# event loop waits each time a render thread holds it (serving/api/openai.py); every request's latency
# pays those waits, so the loop gets the GIL back sooner.
SWITCH_INTERVAL_S = 0.001


@serve.deployment(name="Gateway")
@serve.ingress()
class Gateway:
    """HTTP ingress; see ``serving.app`` for the routes.

    Example::

        Gateway.options(**settings.gateway_options()).bind(pool_graph(settings), settings)  # ray_serve_app
    """

    def __init__(self, pool: DeploymentHandle, settings: Settings) -> None:
        check_http_address(settings)
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        warn_if_proxy_by_reference()
        if not settings.api_keys:
            logger.warning("no API_KEY or API_KEYS_FILE set: /generate and /v1 are open to anyone who can reach them")
        self._app = create_app(PoolBackend(pool, settings), settings)

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
