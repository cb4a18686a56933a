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

Everything here leans on Ray internals (ray==2.60.0, pinned in requirements-serve.txt): the RPC and
its protobuf fields, the setup-hook variable, the runtime-env hash the raylet gives a worker, Serve's
deployment-actor variables. tests/unit/test_warm_pool.py pins them. When one is missing the pool
logs one warning naming it and stays off, and the service runs as it would without a pool.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import json
import logging
import os
import struct
import sys
import threading
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray

logger = logging.getLogger(__name__)

# What a replica of the model deployment imports before it can load a model; in a warm worker
# these are already in sys.modules. Serve's replica module alone takes about 0.4 s, the model
# server's own module (which Serve imports to build the replica) about 0.3 s.
PRELOAD = ("engine.model", "transformers.modeling_utils", "ray.serve._private.replica", "serving.model_server")
HOOK = f"{__name__}.prepare_worker"
# The code directory: a prestarted worker runs the hook before Ray hands it the job's sys.path.
CODE_DIR = Path(__file__).resolve().parent.parent
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
LIVENESS_EVERY = 5  # ticks between checks that registered workers are still alive
MANAGER_STALE_S = 10.0  # a manager not seen for this long is gone (they write every TICK_S)

_state: dict[str, Any] = {}  # this process as a warm worker: {"key", "imports_s", "ready_at"}
_answered = threading.Event()  # the replica that took this warm worker has sent its first answer


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


# --- the model deployment's side -------------------------------------------------------------------
def runtime_env() -> dict[str, Any]:
    """The runtime env the model replicas and the warm workers share (its hash must match)."""
    from ray._private.ray_constants import WORKER_PROCESS_SETUP_HOOK_ENV_VAR

    return {"env_vars": {WORKER_PROCESS_SETUP_HOOK_ENV_VAR: HOOK, "PYTHONPATH": _python_path()}}


def model_options(options: Mapping[str, Any], warm_workers: int) -> dict[str, Any]:
    """The model deployment's ``Deployment.options()`` with the pool added (unchanged when it is off).

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
    env["env_vars"] = {**env.get("env_vars", {}), **runtime_env()["env_vars"]}
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


def worker_report() -> dict[str, Any]:
    """For a replica's cold-start report: did it start in a warm worker (whose process started long
    before the request, so that the replica had no process start of its own)?

    >>> worker_report()  # not in a warm worker
    {'warm_worker': False}
    """
    if not _state:
        return {"warm_worker": False}
    return {"warm_worker": True, "warm_imports_s": _state["imports_s"]}


def replica_answered() -> None:
    """The model server calls this once its first answer is out: its warm worker's hold on the
    node's refill ends (nothing happens in a worker that was not warm)."""
    _answered.set()


# --- inside a prestarted worker -------------------------------------------------------------------
def prepare_worker() -> None:
    """Ray setup hook: in a worker the pool prestarted, import :data:`PRELOAD` and register.

    Runs in every worker started with :func:`runtime_env`, before it takes any task. A worker the
    raylet started for a lease (a replica starting cold) has a job already and returns at once;
    its replica imports in its constructor. Raising ends a prestarted worker (Ray exits it).
    """
    try:
        prestarted = ray._private.worker.global_worker.current_job_id.is_nil()
    except Exception:  # never stop a replica's worker over the pool
        logger.warning("warm pool: cannot tell whether this worker was prestarted", exc_info=True)
        return
    if not prestarted:
        return
    started = time.perf_counter()
    _import_gently(PRELOAD)
    # Serve collects garbage once a replica is initialised (then freezes what is left): with the
    # imports frozen here, that collection skips them (0.3 s on this machine, on the cold start).
    gc.collect()
    gc.freeze()
    imports_s = round(time.perf_counter() - started, 3)
    if library := cuda_library_loaded():
        # CUDA reads CUDA_VISIBLE_DEVICES once; Ray sets it when a GPU replica lands here.
        raise RuntimeError(f"the preload imports loaded {library}; this worker cannot host a GPU replica")
    context = ray.get_runtime_context()
    env_hash = _argv_value("--runtime-env-hash")
    key = f"w/{env_hash}/{context.get_node_id()}/{os.getpid()}/{context.get_worker_id()}"
    _state.update(key=key, imports_s=imports_s, ready_at=time.time())
    _kv().put(key, json.dumps({"pid": os.getpid(), "imports_s": imports_s}))
    # Stays until the leading manager has counted it: a replica may take this worker before any
    # manager's round sees its registration or its hold.
    _kv().put("a/" + key.removeprefix("w/"), "arrived")
    threading.Thread(target=_watch, args=(key, f"hb/{env_hash}"), name="warm-pool-watch", daemon=True).start()
    logger.info("warm worker ready: pid %d, imports %.2fs", os.getpid(), imports_s)


def _import_gently(names: tuple[str, ...]) -> None:
    """Import ``names`` in a thread at the lowest CPU priority, so that a refill yields the CPUs to a
    replica loading or answering on this node; the worker's own threads keep theirs."""
    failed: list[BaseException] = []

    def run() -> None:
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)  # this thread only (Linux)
        try:
            for name in names:
                importlib.import_module(name)
        except BaseException as exc:  # re-raised in the hook's thread
            failed.append(exc)

    thread = threading.Thread(target=run, name="warm-pool-imports")
    thread.start()
    thread.join()
    if failed:
        raise failed[0]


def cuda_library_loaded(maps: str | None = None) -> str | None:
    """The CUDA driver library mapped into this process (``/proc/self/maps``), if any."""
    if maps is None:
        try:
            maps = Path("/proc/self/maps").read_text()
        except OSError:
            return None
    for line in maps.splitlines():
        path = line.rpartition(" ")[2]
        if "/libcuda.so" in path or path.startswith("libcuda.so"):
            return path
    return None


def _watch(key: str, heartbeat_key: str, poll_s: float = 0.2) -> None:
    """Leave the registry when an actor lands here; exit when no pool manager is left."""
    worker = ray._private.worker.global_worker
    last, changed_at, next_check = None, time.monotonic(), 0.0
    while True:
        if not worker.actor_id.is_nil():
            logger.info("warm worker taken by actor %s", worker.actor_id.hex())
            _hold_until_answered(key)
            return
        now = time.monotonic()
        if now >= next_check:
            next_check = now + 5.0
            beat = _kv().get(heartbeat_key)
            if beat != last:
                last, changed_at = beat, now
            elif now - changed_at > ORPHAN_AFTER_S and worker.actor_id.is_nil():
                _kv().delete(key)
                logger.info("no warm pool manager for %.0fs: this idle warm worker exits", now - changed_at)
                os._exit(0)
        time.sleep(poll_s)


def _hold_until_answered(key: str, timeout_s: float = HOLD_MAX_S) -> None:
    """Turn this worker's registry entry into a hold that keeps the pool from refilling, until the
    replica here has answered its first request (:func:`replica_answered`), or for at most ``timeout_s``."""
    hold = "t/" + key.removeprefix("w/")
    kv = _kv()
    kv.put(hold, "held")
    kv.delete(key)  # after the put: the manager never sees the node short of a worker meanwhile
    _answered.wait(timeout_s)
    kv.delete(hold)  # a replica that died meanwhile leaves it behind: the manager's liveness check drops it


def _argv_value(flag: str) -> str:
    return next((arg.partition("=")[2] for arg in sys.argv if arg.startswith(flag + "=")), "0")


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


def _kv() -> _Kv:
    return _Kv()


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


# --- the pool manager -------------------------------------------------------------------------------
@dataclass
class NodePool:
    """What the manager knows of one node's pool."""

    warm: dict[str, int] = field(default_factory=dict)  # registry key -> pid
    pending: list[float] = field(default_factory=list)  # when each prestarted, not yet warm worker was asked for
    held: int = 0  # workers just taken by a replica that is still starting: no refill yet
    seen: set[str] = field(default_factory=set)  # workers seen registered, warm or held (keys without "w/", "t/")
    failed: int = 0  # prestarted workers in a row that never became warm


class PoolPlan:
    """Decides, tick by tick, how many workers to prestart on which node (no Ray in here).

    Example::

        >>> plan = PoolPlan(target=1)
        >>> plan.update(now=0.0, nodes={"n1"}, registered={})
        {'n1': 1}
        >>> plan.update(now=1.0, nodes={"n1"}, registered={"n1": {"k": 42}})  # warm now: nothing to do
        {}
    """

    def __init__(self, target: int, start_grace_s: float = START_GRACE_S):
        self.target = target
        self.start_grace_s = start_grace_s
        self.nodes: dict[str, NodePool] = {}
        self.given_up: set[str] = set()
        self.leading = False  # whether this manager prestarts, or another one sharing its runtime env does
        self._lock = threading.Lock()  # status() reads while the refill thread updates

    def update(
        self,
        now: float,
        nodes: set[str],
        registered: Mapping[str, Mapping[str, int]],
        held: Mapping[str, Collection[str]] | None = None,
        prestart: bool = True,
        arrived: Mapping[str, Collection[str]] | None = None,
    ) -> dict[str, int]:
        """Record the registry as seen at ``now`` (warm workers, and the hold keys of taken ones, per
        node); return the workers to prestart per node (none when ``prestart`` is false: another
        manager leads). ``arrived``: arrival marks of workers that registered, seen or not."""
        with self._lock:
            return self._update(now, nodes, registered, held or {}, prestart, arrived or {})

    def _update(
        self,
        now: float,
        nodes: set[str],
        registered: Mapping[str, Mapping[str, int]],
        held: Mapping[str, Collection[str]],
        prestart: bool,
        arrived_marks: Mapping[str, Collection[str]],
    ) -> dict[str, int]:
        for gone in self.nodes.keys() - nodes:
            del self.nodes[gone]
        wanted = {}
        for node in sorted(nodes):
            pool = self.nodes.setdefault(node, NodePool())
            warm = dict(registered.get(node, {}))
            holds = {_worker_of(key) for key in held.get(node, ())}
            # A prestarted worker that a replica takes as soon as it is warm may be seen only as a
            # hold, never as warm: it arrived all the same (else its start stays pending for
            # START_GRACE_S and the refill waits that long).
            known = {_worker_of(key) for key in warm} | holds
            marked = {_worker_of(key) for key in arrived_marks.get(node, ())}
            arrived = (known | marked) - pool.seen
            pool.seen = known | marked
            pool.held = len(holds)
            del pool.pending[: len(arrived)]
            if arrived:
                pool.failed = 0
            expired = [t for t in pool.pending if now - t > self.start_grace_s]
            if expired:
                pool.pending = [t for t in pool.pending if now - t <= self.start_grace_s]
                pool.failed += len(expired)
            pool.warm = warm
            if not prestart:  # standing by: what this manager asked for is not its business any more
                pool.pending.clear()
                pool.failed = 0
                continue
            if pool.failed >= MAX_FAILED_STARTS:
                if node not in self.given_up:
                    self.given_up.add(node)
                    logger.warning(
                        "warm pool: %d workers prestarted on node %s never became warm within %.0fs; "
                        "no more prestarts there (see the node's worker-*.err logs)",
                        pool.failed,
                        node,
                        self.start_grace_s,
                    )
                continue
            missing = self.target - len(pool.warm) - len(pool.pending) - pool.held
            if missing > 0:
                pool.pending.extend([now] * missing)
                wanted[node] = missing
        return wanted

    def snapshot(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            return self._snapshot()

    def _snapshot(self) -> dict[str, dict[str, Any]]:
        return {
            node: {"warm_pids": sorted(p.warm.values()), "pending": len(p.pending), "held": p.held, "failed": p.failed}
            for node, p in self.nodes.items()
        }


def _worker_of(key: str) -> str:
    """A registry key without its kind: a warm worker ("w/..."), its hold ("t/...") and its arrival
    mark ("a/...") are one worker."""
    return key[2:] if key[:2] in ("w/", "t/", "a/") else key


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


def elect(
    manager: str, target: int, now: float, managers: Mapping[str, Mapping[str, Any]], leader: str | None
) -> tuple[bool, int]:
    """Whether ``manager`` leads the managers that share its runtime env, and the pool size to keep.

    ``managers``: each manager's last record ``{"target", "at"}``; ``leader``: the recorded leader.
    The leader stays until it is stale; then the live manager with the smallest id takes over. The
    size is the largest target of the live managers.

    >>> records = {"a": {"target": 1, "at": 99.0}, "b": {"target": 2, "at": 80.0}}  # b is gone
    >>> elect("c", 1, now=100.0, managers=records, leader="b")
    (False, 1)
    >>> elect("a", 1, now=100.0, managers=records, leader="b")
    (True, 1)
    """
    live = {m: r["target"] for m, r in managers.items() if now - r["at"] <= MANAGER_STALE_S}
    live[manager] = target
    chosen = leader if leader in live else min(live)
    return chosen == manager, max(live.values())


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
