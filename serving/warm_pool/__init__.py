"""Warm worker pool: idle Python workers, imports done, that a waking model replica starts in.

A model replica woken from zero spends most of its start in Python, not in the model: Ray starts a
worker process, then the replica imports torch, transformers, transformers' loading code and Serve's
replica module. The raylet puts a new actor into an *idle* worker only if that worker fits (same
language and worker type, same runtime-env hash; the job is not compared for actors under a detached
actor, which Serve replicas are), and it kills idle workers beyond the free CPUs after a second.
So this module:

1. gives the model deployment a runtime env (:func:`model_options`) whose Ray setup hook,
   :func:`prepare_worker`, imports :data:`PRELOAD` in workers the raylet *prestarted* (they have no
   job yet) and does nothing in any other worker;
2. declares one :class:`WarmPool` actor per model deployment (a Serve deployment-scoped actor with
   0 CPU on the head node, started and restarted by Serve's controller, removed with the
   deployment). It asks the raylet of every node that can host a replica, nodes that join later
   included, to prestart ``WARM_WORKERS`` workers with that runtime env
   (``NodeManagerService.PrestartWorkers`` with a keep-alive, which the idle killer respects), and
   refills a node's pool after a replica took one.

The managers of all model deployments give their replicas the same runtime env, so they share one
pool per node: one of them (the first, until it is gone) prestarts and refills, keeping the largest
``WARM_WORKERS`` among the live managers; the others stand by (:func:`elect`). Without this, every
model would refill the shared pool and a node would keep one warm worker per model.

Warm workers register in the GCS key-value store. One that a replica takes holds the node's refill
back until the replica has sent its first answer (its cold start over), so that starting the
next worker does not slow that cold start. Idle warm workers exit when no pool manager has been
seen for :data:`ORPHAN_AFTER_S`. They hold no CPU or GPU lease and
never initialise CUDA (a worker that did is ended before it can host a GPU replica).

The package is split by where each part runs:

- ``replica``: in the process that builds the graph and in a model replica (:func:`model_options`,
  :func:`worker_report`, :func:`replica_answered`; :func:`pool_status` for tests and benchmarks);
- ``worker``: inside a prestarted worker (:func:`prepare_worker`, the Ray setup hook);
- ``manager``: the :class:`WarmPool` actor and its raylet calls; ``plan``: its decisions (no Ray);
- ``common``: constants, the Ray internals the pool relies on (``unsupported_reason``), the registry.

Everything here leans on Ray internals (ray==2.60.0, pinned in requirements-serve.txt): the RPC and
its protobuf fields, the setup-hook variable, the runtime-env hash the raylet gives a worker, Serve's
deployment-actor variables. tests/unit/test_warm_pool.py pins them. When one is missing the pool
logs one warning naming it and stays off, and the service runs as it would without a pool.
"""

from serving.warm_pool.common import (
    HOOK,
    MANAGER_STALE_S,
    ORPHAN_AFTER_S,
    PRELOAD,
    PROTO_FIELDS,
    SERVE_ACTOR_VARIABLES,
    STUB_METHODS,
    unsupported_reason,
)
from serving.warm_pool.manager import (
    PoolOff,
    RayletCluster,
    WarmPool,
    call_raylet,
    refill_round,
    run_pool,
    runtime_env_hash,
)
from serving.warm_pool.plan import NodePool, PoolPlan, elect
from serving.warm_pool.replica import model_options, pool_status, runtime_env, warm_pids
from serving.warm_pool.worker import (
    cuda_library_loaded,
    prepare_worker,
    process_started_at,
    replica_answered,
    worker_report,
)

__all__ = [
    "HOOK",
    "MANAGER_STALE_S",
    "ORPHAN_AFTER_S",
    "PRELOAD",
    "PROTO_FIELDS",
    "SERVE_ACTOR_VARIABLES",
    "STUB_METHODS",
    "NodePool",
    "PoolOff",
    "PoolPlan",
    "RayletCluster",
    "WarmPool",
    "call_raylet",
    "cuda_library_loaded",
    "elect",
    "model_options",
    "pool_status",
    "prepare_worker",
    "process_started_at",
    "refill_round",
    "replica_answered",
    "run_pool",
    "runtime_env",
    "runtime_env_hash",
    "unsupported_reason",
    "warm_pids",
    "worker_report",
]
