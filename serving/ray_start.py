"""What the service asks of the Ray instance it runs on: variables read where Ray starts.

Ray's processes (the raylet, and every worker it starts) take these from the environment of
``ray start`` or of the process that starts a local instance, so they cannot be service settings.
:func:`prefer_ray_start_env` sets each one the operator has not set, in a process about to start a
local Ray instance (``serve run`` of this app, the tests, the benchmarks); the container image sets
them for ``ray start`` (the KubeRay manifest's pods run that image). An operator's value always wins.

- ``RAY_SERVE_PROXY_USE_GRPC=1``: Serve's proxy takes streamed tokens from the Gateway over gRPC
  (``serving/transport.py``).
- ``RAY_worker_niceness=0``: Ray starts its workers at niceness 15 by default, below the raylet, the
  GCS, the dashboard and every other process at the normal priority (0). A model replica's engine
  thread then gives up its core to each of them as they wake. On the 2-core AMD VM, 16 streamed
  clients kept the engine thread waiting for a core 5.6-8.2% of the time it had work (whole answers:
  2.7-4.7%), 32 clients 9-11%; at niceness 0 the same streams waited 3.0%
  (benchmarks/results/stream_cost.md). At 0 Ray's workers (model replicas, the Gateway, Serve's proxy
  and controller alike) share the CPU with Ray's own processes as equals, as a server outside Ray
  does; those processes keep their share, they no longer take it first.
"""

from __future__ import annotations

import logging
import os
from collections.abc import MutableMapping

from serving.transport import PROXY_GRPC_ENV

logger = logging.getLogger("ray.serve")

WORKER_NICENESS_ENV = "RAY_worker_niceness"
RAY_START_ENV = {PROXY_GRPC_ENV: "1", WORKER_NICENESS_ENV: "0"}


def prefer_ray_start_env(environ: MutableMapping[str, str] = os.environ) -> None:
    """Set :data:`RAY_START_ENV` in a process about to start a local Ray instance (an operator's value wins).

    >>> env = {"RAY_worker_niceness": "15"}
    >>> prefer_ray_start_env(env); env
    {'RAY_worker_niceness': '15', 'RAY_SERVE_PROXY_USE_GRPC': '1'}
    """
    for name, value in RAY_START_ENV.items():
        environ.setdefault(name, value)


def warn_if_niced(niceness: int | None = None) -> None:
    """Warn when this process (a model replica) runs below the normal priority.

    >>> warn_if_niced(0)  # nothing to say
    """
    if niceness is None:
        niceness = os.getpriority(os.PRIO_PROCESS, 0)
    if niceness > 0:
        logger.warning(
            "this model replica runs at niceness %d (%s where Ray started): every process at the normal "
            "priority (Ray's raylet, GCS and dashboard, a local client) takes the engine's core first, which "
            "cost 5-10%% of streamed requests/s at 16-32 clients on 2 cores; export %s=0 before `ray start` "
            "(the container image sets it)",
            niceness,
            WORKER_NICENESS_ENV,
            WORKER_NICENESS_ENV,
        )
