"""The model deployment's side of the warm pool: its options, and what a replica reports and signals.

:func:`model_options` gives the model deployment the runtime env whose setup hook warms prestarted
workers (``serving.warm_pool.worker``), and declares its pool manager actor
(``serving.warm_pool.manager.WarmPool``). A replica asks :func:`worker_report` whether it started in
a warm worker and calls :func:`replica_answered` once its first answer is out. :func:`pool_status`
and :func:`warm_pids` read a pool from outside (tests, benchmarks).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import ray

from serving.warm_pool.common import CODE_DIR, HOOK, ORPHAN_AFTER_S, ORPHAN_VARIABLE, POOL_ACTOR, unsupported_reason
from serving.warm_pool.manager import WarmPool

logger = logging.getLogger(__name__)


# --- the model deployment's side -------------------------------------------------------------------
def runtime_env() -> dict[str, Any]:
    """The runtime env the model replicas and the warm workers share (its hash must match)."""
    from ray._private.ray_constants import WORKER_PROCESS_SETUP_HOOK_ENV_VAR

    return {"env_vars": {WORKER_PROCESS_SETUP_HOOK_ENV_VAR: HOOK, "PYTHONPATH": _python_path()}}


def model_options(options: Mapping[str, Any], warm_workers: int, orphan_s: float = ORPHAN_AFTER_S) -> dict[str, Any]:
    """The model deployment's ``Deployment.options()`` with the pool added (unchanged when it is off):
    its setup hook in the replicas' runtime env, which the warm workers share, with ``orphan_s``
    (WARM_WORKER_ORPHAN_S, how long an idle warm worker outlives its pool), and its manager.

    Example::

        >>> model_options({"ray_actor_options": {"num_cpus": 1}}, warm_workers=0)
        {'ray_actor_options': {'num_cpus': 1}}
    """
    options = dict(options)
    if warm_workers <= 0:
        return options
    if cause := unsupported_reason():
        logger.warning("warm worker pool off (WARM_WORKERS=%d): %s; replicas start cold", warm_workers, cause)
        return options
    from ray._common.constants import HEAD_NODE_RESOURCE_NAME
    from ray.serve.config import DeploymentActorConfig

    actor_options = dict(options.get("ray_actor_options") or {})
    env = dict(actor_options.get("runtime_env") or {})
    env["env_vars"] = {**env.get("env_vars", {}), **runtime_env()["env_vars"], ORPHAN_VARIABLE: str(orphan_s)}
    actor_options["runtime_env"] = env
    needs = {"CPU": float(actor_options.get("num_cpus") or 0), "GPU": float(actor_options.get("num_gpus") or 0)}
    options["ray_actor_options"] = actor_options
    options["deployment_actors"] = [
        DeploymentActorConfig(
            name=POOL_ACTOR,
            actor_class=WarmPool,
            init_kwargs={"warm_workers": warm_workers, "replica_resources": needs},
            # On the head, beside Serve's controller: worker nodes come and go with the autoscaler.
            actor_options={"num_cpus": 0, "resources": {HEAD_NODE_RESOURCE_NAME: 0.001}},
        )
    ]
    return options


def _python_path() -> str:
    return f"{CODE_DIR}:${{PYTHONPATH}}"


def pool_status(app: str, deployment: str, timeout_s: float = 10.0) -> dict[str, Any] | None:
    """The status of the pool of ``deployment`` in ``app``, or None when it has none (for tests, benchmarks)."""
    from ray.serve._private.constants import SERVE_DEPLOYMENT_ACTOR_PREFIX, SERVE_NAMESPACE

    prefix = f"{SERVE_DEPLOYMENT_ACTOR_PREFIX}{app}::{deployment}::"
    names = [
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["namespace"] == SERVE_NAMESPACE and a["name"].startswith(prefix) and a["name"].endswith(POOL_ACTOR)
    ]
    for name in names:
        try:
            return ray.get(ray.get_actor(name, namespace=SERVE_NAMESPACE).status.remote(), timeout=timeout_s)
        except (ValueError, ray.exceptions.RayError):
            continue  # being replaced
    return None


def warm_pids(status: Mapping[str, Any] | None, node: str | None = None) -> list[int]:
    """Pids of the warm workers in a :func:`pool_status` (on ``node``, or on every node)."""
    nodes = (status or {}).get("nodes", {})
    return sorted(pid for n, pool in nodes.items() if node in (None, n) for pid in pool["warm_pids"])
