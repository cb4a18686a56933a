"""The pool manager actor: one per model deployment, on the head node, refilling every node's pool.

:class:`WarmPool` is a Serve deployment-scoped actor (0 CPU, started and restarted by Serve's
controller, removed with the deployment). Each round it reads the registry, drops dead entries,
lets :class:`~serving.warm_pool.plan.PoolPlan` decide, and asks each node's raylet to prestart
workers (``NodeManagerService.PrestartWorkers``) with the replicas' runtime env, whose hash it
computes as the raylet does (:func:`runtime_env_hash`).
"""

from __future__ import annotations

import json
import logging
import struct
import threading
import time
from collections.abc import Mapping
from typing import Any

import ray

from serving.warm_pool.common import (
    HOOK,
    KEEP_ALIVE_S,
    LIVENESS_EVERY,
    MANAGER_STALE_S,
    SERVE_ACTOR_VARIABLES,
    TICK_S,
    _Kv,
    unsupported_reason,
)
from serving.warm_pool.plan import PoolPlan, elect

logger = logging.getLogger(__name__)


def runtime_env_hash(serialized: str) -> int:
    """The hash the raylet gives a worker's runtime env (``--runtime-env-hash``): 32 bits of
    libstdc++'s ``std::hash<std::string>`` (``_Hash_bytes``, seed 0xc70f6907), 0 for an empty env."""
    if serialized in ("", "{}"):
        return 0
    data, mask, mul = serialized.encode(), (1 << 64) - 1, 0xC6A4A7935BD1E995
    h = (0xC70F6907 ^ (len(data) * mul)) & mask
    end = len(data) & ~7
    for (word,) in struct.iter_unpack("<Q", data[:end]):
        word = (word * mul) & mask
        h = ((h ^ ((word ^ (word >> 47)) * mul & mask)) * mul) & mask
    if tail := data[end:]:
        h = ((h ^ int.from_bytes(tail, "little")) * mul) & mask
    h = ((h ^ (h >> 47)) * mul) & mask
    h ^= h >> 47
    low = h & 0xFFFFFFFF
    return low - (1 << 32) if low >= 1 << 31 else low


class PoolOff(Exception):
    """This Ray cannot run the pool; the message names the cause."""


def refill_round(
    cluster: Any, plan: PoolPlan, now: float, check_liveness: bool, prestart: bool = True
) -> dict[str, int]:
    """One round: read the registry, drop dead or stranded entries, prestart what is missing
    (when this manager leads: ``prestart``).

    ``cluster`` is a :class:`RayletCluster` (or a test's stand-in); returns what it prestarted.
    """
    nodes = cluster.nodes()
    entries: dict[str, dict[str, int]] = {}  # node -> {key: pid}, warm workers ("w/") and holds ("t/")
    arrivals: dict[str, set[str]] = {}  # node -> arrival marks ("a/") not yet counted
    for key, node, pid in cluster.registrations():
        if node not in nodes:
            cluster.forget(key)  # the node left, or no longer fits a replica
        elif key.startswith("a/"):
            arrivals.setdefault(node, set()).add(key)
        else:
            entries.setdefault(node, {})[key] = pid
    if check_liveness:
        for node, workers in entries.items():
            alive = cluster.worker_pids(node)
            for key in [k for k, pid in workers.items() if pid not in alive]:
                cluster.forget(key)
                del workers[key]
    warm = {node: {k: pid for k, pid in e.items() if k.startswith("w/")} for node, e in entries.items()}
    held = {node: {k for k in e if k.startswith("t/")} for node, e in entries.items()}
    wanted = plan.update(now, set(nodes), warm, held, prestart=prestart, arrived=arrivals if prestart else None)
    if prestart:  # counted: only the leading manager consumes them
        for key in set().union(*arrivals.values()):
            cluster.forget(key)
    for node, count in wanted.items():
        cluster.prestart(node, count)
        logger.info("warm pool: prestarting %d worker(s) on node %s", count, node)
    return wanted


def run_pool(cluster: Any, plan: PoolPlan, tick_s: float = TICK_S, rounds: int | None = None) -> str:
    """Refill rounds every ``tick_s`` (forever, or ``rounds`` times); returns why it stopped."""
    failures, beat, own_target = 0, 0, plan.target
    while rounds is None or beat < rounds:
        beat += 1
        try:
            cluster.heartbeat(beat)
            leads, plan.target = cluster.lead(own_target)
            plan.leading = leads
            check = beat % LIVENESS_EVERY == 1
            refill_round(cluster, plan, time.monotonic(), check_liveness=check, prestart=leads)
            failures = 0
        except PoolOff as exc:
            logger.warning("warm worker pool off: %s; replicas start cold", exc)
            return str(exc)
        except Exception:
            failures += 1
            if failures == 1:  # once per run of failures, not every second
                logger.exception("warm pool: a refill round failed; retrying")
        time.sleep(tick_s)
    return "stopped"


class RayletCluster:
    """The pool's view of the Ray cluster: nodes, the registry, and each node's raylet."""

    def __init__(self, env_info: Any, env_hash: int, needs: Mapping[str, float], manager: str) -> None:
        self._env_info, self._env_hash, self._needs = env_info, env_hash, dict(needs)
        self._manager = manager
        self._kv = _Kv()
        self._addresses: dict[str, str] = {}
        self._stubs: dict[str, Any] = {}

    def nodes(self) -> set[str]:
        """Alive nodes with the resources of one model replica."""
        fits = [n for n in ray.nodes() if n.get("Alive") and self._fits(n.get("Resources", {}))]
        self._addresses = {n["NodeID"]: f"{n['NodeManagerAddress']}:{n['NodeManagerPort']}" for n in fits}
        return set(self._addresses)

    def registrations(self) -> list[tuple[str, str, int]]:
        """(key, node, pid) of every warm worker ("w/..."), hold ("t/...") and arrival mark ("a/...") of this pool."""
        out = []
        for kind in ("w", "t", "a"):
            for key in self._kv.keys(f"{kind}/{self._env_hash}/"):
                _, _, node, pid, _ = key.split("/", 4)
                out.append((key, node, int(pid)))
        return out

    def forget(self, key: str) -> None:
        self._kv.delete(key)

    def heartbeat(self, beat: int) -> None:
        self._kv.put(f"hb/{self._env_hash}", str(beat))

    def lead(self, target: int) -> tuple[bool, int]:
        """Record this manager (its target, now); whether it leads, and the pool size (:func:`elect`)."""
        now, prefix = time.time(), f"m/{self._env_hash}/"  # the managers share the head node's clock
        self._kv.put(prefix + self._manager, json.dumps({"target": target, "at": now}))
        managers = {}
        for key in self._kv.keys(prefix):
            if (raw := self._kv.get(key)) is not None:
                managers[key.removeprefix(prefix)] = json.loads(raw)
        leader_key = f"lead/{self._env_hash}"
        leader = self._kv.get(leader_key)
        leads, size = elect(self._manager, target, now, managers, leader.decode() if leader else None)
        if leads:
            self._kv.put(leader_key, self._manager)
        for gone in [m for m, r in managers.items() if now - r["at"] > 10 * MANAGER_STALE_S]:
            self._kv.delete(prefix + gone)  # long gone: keep the key list short
        return leads, size

    def worker_pids(self, node: str) -> set[int]:
        from ray.core.generated import node_manager_pb2

        return set(self._rpc(node, "GetWorkerPIDs", node_manager_pb2.GetWorkerPIDsRequest()).pids)

    def prestart(self, node: str, count: int) -> None:
        from ray.core.generated import common_pb2, node_manager_pb2

        request = node_manager_pb2.PrestartWorkersRequest(
            language=common_pb2.PYTHON,
            runtime_env_info=self._env_info,
            keep_alive_duration_secs=KEEP_ALIVE_S,
            num_workers=count,
        )
        self._rpc(node, "PrestartWorkers", request)

    def _fits(self, resources: Mapping[str, float]) -> bool:
        return all(resources.get(name, 0) >= amount for name, amount in self._needs.items() if amount > 0)

    def _rpc(self, node: str, method: str, request: Any) -> Any:
        from ray._private.grpc_utils import init_grpc_channel
        from ray.core.generated import node_manager_pb2_grpc

        address = self._addresses[node]
        if address not in self._stubs:
            self._stubs[address] = node_manager_pb2_grpc.NodeManagerServiceStub(init_grpc_channel(address))
        return call_raylet(self._stubs[address], method, request)


def call_raylet(stub: Any, method: str, request: Any, timeout_s: float = 10.0) -> Any:
    """``stub.method(request)``; raises :class:`PoolOff` when the raylet does not implement it."""
    import grpc

    try:
        return getattr(stub, method)(request, timeout=timeout_s)
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
            raise PoolOff(f"the raylet does not implement NodeManagerService.{method}") from exc
        raise


@ray.remote(num_cpus=0)
class WarmPool:
    """Keeps ``warm_workers`` warm workers on every node that can host a model replica.

    Serve creates it with the model deployment (see :func:`model_options`). It inherits the
    deployment's runtime env, from which it derives the env that Serve gives the replicas.
    """

    def __init__(self, warm_workers: int, replica_resources: Mapping[str, float], tick_s: float = TICK_S) -> None:
        self._plan = PoolPlan(warm_workers)
        self.env_hash: int | None = None
        self.off = unsupported_reason()
        if self.off is None:
            env_info, self.env_hash, self.off = _replica_env_info()
        if self.off is not None:
            logger.warning("warm worker pool off: %s; replicas start cold", self.off)
            return
        manager = ray.get_runtime_context().get_actor_id()
        cluster = RayletCluster(env_info, self.env_hash, replica_resources, manager)
        logger.info("warm pool: %d per node, runtime env hash %s", warm_workers, self.env_hash)
        threading.Thread(target=self._run, args=(cluster, tick_s), name="warm-pool", daemon=True).start()

    def _run(self, cluster: RayletCluster, tick_s: float) -> None:
        self.off = run_pool(cluster, self._plan, tick_s)

    def status(self) -> dict[str, Any]:
        """The pool as this manager sees it (for benchmarks, tests and debugging)."""
        return {
            "off": self.off,
            "runtime_env_hash": self.env_hash,
            "leading": self._plan.leading,
            "nodes": self._plan.snapshot(),
        }


def _replica_env_info() -> tuple[Any, int, str | None]:
    """The runtime env (as RuntimeEnvInfo), and its hash, that Serve gives the model's replicas.

    This actor inherits the deployment's runtime env (with the app's merged in, as for replicas)
    plus Serve's variables for deployment actors; without those it is the replicas' env.
    """
    from ray._private.ray_constants import WORKER_PROCESS_SETUP_HOOK_ENV_VAR
    from ray._private.utils import get_runtime_env_info
    from ray.runtime_env import RuntimeEnv
    from ray.serve._private import constants

    internal = {getattr(constants, name) for name in SERVE_ACTOR_VARIABLES}
    env = json.loads(ray.get_runtime_context().get_runtime_env_string() or "{}")
    env_vars = {k: v for k, v in env.get("env_vars", {}).items() if k not in internal}
    if env_vars.get(WORKER_PROCESS_SETUP_HOOK_ENV_VAR) != HOOK:
        return None, 0, "the model deployment's runtime_env lacks the pool's setup hook (overridden by a config?)"
    env["env_vars"] = env_vars
    info = get_runtime_env_info(RuntimeEnv(**env), is_job_runtime_env=False, serialize=False)
    return info, runtime_env_hash(info.serialized_runtime_env), None
