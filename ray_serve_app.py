"""The Serve graph: HTTP -> Gateway (FastAPI ingress) -> one model deployment per model. Nothing else lives here.

    serve run ray_serve_app:deployment_graph

Settings are read from the environment once, in the process that builds the graph, and reach the
replicas only through deployment options and bind arguments. ``deployment_graph`` is built on
first access (PEP 562), so importing this module for ``build_graph`` reads no environment.
"""

from typing import Any

from ray.serve import Application

from serving.gateway import Gateway
from serving.model_server import ModelServer
from settings import Settings, load_settings


def build_graph(settings: Settings) -> Application:
    """The application for ``settings``: a light Gateway bound to one autoscaled deployment per model."""
    models = {
        model.name: ModelServer.options(**model.deployment_options(settings.log_level)).bind(model)
        for model in settings.model_configs
    }
    return Gateway.options(**settings.gateway_options()).bind(models, settings)


def __getattr__(name: str) -> Any:
    if name == "deployment_graph":  # `serve run` / `serve build` look the graph up by this name
        graph = globals()["deployment_graph"] = build_graph(load_settings())
        return graph
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
