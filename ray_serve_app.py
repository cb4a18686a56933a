"""The Serve graph: HTTP -> Gateway (FastAPI ingress) -> the model pool. Nothing else lives here.

    serve run ray_serve_app:deployment_graph

The application holds the Gateway and the pool controller; the pool controller deploys every model
as its own Serve application, named after the model, each scaling to zero on its own. The graph is
assembled here and only here: the controller receives the service's model factory
(``serving.pool.apps.MODEL_APPS``) as an argument, the Gateway the controller's handle.

Settings are read from the environment once, in the process that builds the graph, and reach the
replicas only through deployment options and bind arguments. ``deployment_graph`` is built on
first access (PEP 562), so importing this module for ``build_graph`` reads no environment.
"""

from typing import Any

from ray.serve import Application

from serving.gateway import Gateway
from serving.pool.apps import MODEL_APPS, model_defaults, spec_of
from serving.pool.controller import PoolController
from serving.pool.spec import PoolSettings
from serving.transport import prefer_grpc_proxy
from settings import Settings, load_settings

# `serve run` imports this module before it starts a local Ray instance, which inherits the variable.
prefer_grpc_proxy()


def pool_graph(settings: Settings) -> Application:
    """The pool controller for the service's settings, with every configured model."""
    pool_settings = PoolSettings(
        keep_hot_priority=settings.keep_hot_priority,
        eviction_grace_s=settings.eviction_grace_s,
        scale_to_zero_at=settings.scale_to_zero_at,
        request_timeout_s=settings.request_timeout_s,
        retry_after_s=settings.retry_after_s,
        log_level=settings.log_level,
        admin_allow_remote_code=settings.admin_allow_remote_code,
        admin_models=settings.admin_model_patterns,
    )
    specs = [spec_of(config) for config in settings.model_configs]
    controller = PoolController.options(ray_actor_options=settings.control_actor_options())
    return controller.bind(pool_settings, specs, model_defaults(settings), apps=MODEL_APPS)


def build_graph(settings: Settings) -> Application:
    """The application for ``settings``: a light Gateway bound to the pool controller of every model."""
    return Gateway.options(**settings.gateway_options()).bind(pool_graph(settings), settings)


def __getattr__(name: str) -> Any:
    if name == "deployment_graph":  # `serve run` / `serve build` look the graph up by this name
        graph = globals()["deployment_graph"] = build_graph(load_settings())
        return graph
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
