"""How streamed tokens travel inside Ray Serve: over Serve's gRPC channels, not Ray object references.

A streamed answer crosses two hops per token: model replica -> Gateway (a deployment handle) and
Gateway -> Serve's HTTP proxy. By default each hop sends every item as a Ray object reference, one
object and one report per item; Serve can send the same items over the gRPC channel that every
replica opens for calls between deployments. Measured here (benchmarks/results/stream_cost.md), the
two hops then cost the Gateway and the proxy about 40% less CPU per streamed request.

- The Gateway's handles to model replicas ask for it themselves (``MODEL_HANDLE_OPTIONS``).
- Serve's proxy reads ``RAY_SERVE_PROXY_USE_GRPC`` from its own environment, the environment of the
  node's raylet: it must be set where Ray starts. ``prefer_grpc_proxy`` sets it (unless the operator
  set it) in a process about to start a local Ray instance (``serve run``, the tests, the benchmarks);
  the container image sets it for ``ray start`` (the KubeRay manifest's pods run that image).
"""

from __future__ import annotations

import logging
import os
from collections.abc import MutableMapping
from typing import Any

logger = logging.getLogger("ray.serve")

PROXY_GRPC_ENV = "RAY_SERVE_PROXY_USE_GRPC"
# Serve's own switch for a handle's transport (what RAY_SERVE_USE_GRPC_BY_DEFAULT sets for every handle).
MODEL_HANDLE_OPTIONS: dict[str, Any] = {"_by_reference": False}


def prefer_grpc_proxy(environ: MutableMapping[str, str] = os.environ) -> None:
    """Ask for the gRPC proxy in a Ray instance that this process is about to start (an operator's value wins).

    >>> env = {}
    >>> prefer_grpc_proxy(env); env
    {'RAY_SERVE_PROXY_USE_GRPC': '1'}
    >>> env = {"RAY_SERVE_PROXY_USE_GRPC": "0"}
    >>> prefer_grpc_proxy(env); env
    {'RAY_SERVE_PROXY_USE_GRPC': '0'}
    """
    environ.setdefault(PROXY_GRPC_ENV, "1")


def proxy_transport(environ: MutableMapping[str, str] = os.environ) -> str:
    """What Serve's proxy on this node uses towards the Gateway, read from a process on the same node.

    A replica inherits its raylet's environment, as the proxy does, so the Gateway sees the proxy's
    setting (unless a runtime_env set the variable for the application only, which the proxy does not see).

    >>> proxy_transport({"RAY_SERVE_PROXY_USE_GRPC": "1"}), proxy_transport({})
    ('grpc', 'object references')
    """
    return "grpc" if environ.get(PROXY_GRPC_ENV) == "1" else "object references"


def warn_if_proxy_by_reference(environ: MutableMapping[str, str] = os.environ) -> None:
    if proxy_transport(environ) != "grpc":
        logger.warning(
            "Serve's HTTP proxy sends streamed tokens to the Gateway as Ray object references "
            "(%s is not 1 where Ray started), which costs about twice the proxy's and Gateway's CPU per "
            "streamed token; export %s=1 before `ray start` (the container image sets it)",
            PROXY_GRPC_ENV,
            PROXY_GRPC_ENV,
        )
