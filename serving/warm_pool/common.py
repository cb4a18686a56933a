"""What every side of the warm pool shares: its constants, the Ray internals it needs, its registry.

Everything here leans on Ray internals (ray==2.60.0, pinned in requirements-serve.txt): the RPC and
its protobuf fields, the setup-hook variable, the runtime-env hash the raylet gives a worker, Serve's
deployment-actor variables. tests/unit/test_warm_pool.py pins them. When one is missing the pool
logs one warning naming it and stays off, and the service runs as it would without a pool.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# What a replica of the model deployment imports before it can load a model; in a warm worker
# these are already in sys.modules. Serve's replica module alone takes about 0.4 s, the model
# server's own module (which Serve imports to build the replica) about 0.3 s.
PRELOAD = ("engine.model", "transformers.modeling_utils", "ray.serve._private.replica", "serving.model_server")
HOOK = "serving.warm_pool.prepare_worker"  # the package re-exports it (serving.warm_pool.worker)
# The code directory: a prestarted worker runs the hook before Ray hands it the job's sys.path.
CODE_DIR = Path(__file__).resolve().parents[2]
POOL_ACTOR = "warm-pool"
KV_NAMESPACE = "llm_serve_warm_pool"
KEEP_ALIVE_S = 3600  # a warm worker older than this may be reaped by Ray's idle killer, then refilled
TICK_S = 1.0
# A replica that takes a warm worker holds back the refill until it has sent its first answer (its
# cold start is over) or HOLD_MAX_S passed (a replica that gets no request): starting and importing
# a new worker on the node meanwhile would slow exactly the cold start the pool saves.
HOLD_MAX_S = 30.0
START_GRACE_S = 120.0  # a prestarted worker not warm by then counts as a failed start
MAX_FAILED_STARTS = 3  # in a row, per node: then the pool stops asking that node
ORPHAN_AFTER_S = 30.0  # far above a manager's restart by Serve's controller, which takes seconds
ORPHAN_VARIABLE = "WARM_WORKER_ORPHAN_S"  # a model's setting of it, in its replicas' (and warm workers') env
LIVENESS_EVERY = 5  # ticks between checks that registered workers are still alive
MANAGER_STALE_S = 10.0  # a manager not seen for this long is gone (they write every TICK_S)


# --- what the pool relies on ---------------------------------------------------------------------
PROTO_FIELDS = {
    "PrestartWorkersRequest": ("language", "runtime_env_info", "keep_alive_duration_secs", "num_workers"),
    "GetWorkerPIDsRequest": (),
    "GetWorkerPIDsReply": ("pids",),
}
STUB_METHODS = ("PrestartWorkers", "GetWorkerPIDs")
# Serve's variables for deployment actors, which the pool manager drops from its own runtime env.
SERVE_ACTOR_VARIABLES = tuple(
    f"RAY_SERVE_INTERNAL_DEPLOYMENT_{part}_ENV_VAR" for part in ("APP_NAME", "NAME", "ACTOR_NAME", "CODE_VERSION")
)


def unsupported_reason(node_manager_pb2: Any = None, node_manager_pb2_grpc: Any = None) -> str | None:
    """Why this Ray cannot run the pool (a missing RPC, field or helper), or None when it can.

    Example::

        >>> unsupported_reason() is None  # ray==2.60.0
        True
    """
    try:
        if node_manager_pb2 is None or node_manager_pb2_grpc is None:
            from ray.core.generated import node_manager_pb2, node_manager_pb2_grpc
        from ray._common import constants as common_constants
        from ray._private import ray_constants
        from ray._private.grpc_utils import init_grpc_channel  # noqa: F401
        from ray._private.utils import get_runtime_env_info  # noqa: F401
        from ray.core.generated.common_pb2 import Language
        from ray.experimental import internal_kv
        from ray.serve._private import constants as serve_constants
        from ray.serve.config import DeploymentActorConfig  # noqa: F401
    except ImportError as exc:
        return f"cannot import {exc.name or exc}"
    for message, fields in PROTO_FIELDS.items():
        descriptor = getattr(getattr(node_manager_pb2, message, None), "DESCRIPTOR", None)
        if descriptor is None:
            return f"protobuf message ray.rpc.{message} is missing"
        for name in fields:
            if name not in descriptor.fields_by_name:
                return f"protobuf field ray.rpc.{message}.{name} is missing"
    service = node_manager_pb2.DESCRIPTOR.services_by_name.get("NodeManagerService")
    for method in STUB_METHODS:
        if service is None or method not in service.methods_by_name:
            return f"RPC NodeManagerService.{method} is missing"
    needed = [
        (node_manager_pb2_grpc, ("NodeManagerServiceStub",)),
        (ray_constants, ("WORKER_PROCESS_SETUP_HOOK_ENV_VAR",)),
        (common_constants, ("HEAD_NODE_RESOURCE_NAME",)),
        (serve_constants, ("SERVE_NAMESPACE", "SERVE_DEPLOYMENT_ACTOR_PREFIX", *SERVE_ACTOR_VARIABLES)),
        (internal_kv, ("_internal_kv_put", "_internal_kv_get", "_internal_kv_del", "_internal_kv_list")),
    ]
    for module, names in needed:
        for name in names:
            if not hasattr(module, name):
                return f"{getattr(module, '__name__', module)}.{name} is missing"
    if "PYTHON" not in Language.DESCRIPTOR.values_by_name:
        return "ray.rpc.Language.PYTHON is missing"
    return None


class _Kv:
    """The pool's namespace of the GCS key-value store."""

    def __init__(self) -> None:
        from ray.experimental import internal_kv

        self._kv = internal_kv

    def put(self, key: str, value: str) -> None:
        self._kv._internal_kv_put(key, value, overwrite=True, namespace=KV_NAMESPACE)

    def get(self, key: str) -> bytes | None:
        return self._kv._internal_kv_get(key, namespace=KV_NAMESPACE)

    def delete(self, key: str) -> None:
        self._kv._internal_kv_del(key, namespace=KV_NAMESPACE)

    def keys(self, prefix: str) -> list[str]:
        return [k.decode() for k in self._kv._internal_kv_list(prefix, namespace=KV_NAMESPACE)]
