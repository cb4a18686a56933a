"""The Serve graph: HTTP -> Gateway (FastAPI ingress) -> the model pool. Nothing else lives here.

    serve run ray_serve_app:deployment_graph

The application holds the Gateway and the pool controller; the pool controller deploys every model
as its own Serve application, named after the model, each scaling to zero on its own.

Settings are read from the environment once, in the process that builds the graph, and reach the
replicas only through deployment options and bind arguments. ``deployment_graph`` is built on
first access (PEP 562), so importing this module for ``build_graph`` reads no environment.
"""

from typing import Any

from ray.serve import Application

from serving.gateway import Gateway
from serving.pool.apps import pool_graph
from settings import Settings, load_settings


def build_graph(settings: Settings) -> Application:
    """The application for ``settings``: a light Gateway bound to the pool controller of every model."""
    return Gateway.options(**settings.gateway_options()).bind(pool_graph(settings), settings)


def __getattr__(name: str) -> Any:
    if name == "deployment_graph":  # `serve run` / `serve build` look the graph up by this name
        graph = globals()["deployment_graph"] = build_graph(load_settings())
        return graph
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
