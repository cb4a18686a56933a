"""The warm worker pool without a cluster: the Ray internals it relies on, its decisions, failing soft.

tests/integration/test_warm_pool.py runs it on real Ray Serve.
"""

from __future__ import annotations

import doctest
import importlib.util
import logging
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
import ray
from ray._private import ray_constants
from ray.core.generated import node_manager_pb2, node_manager_pb2_grpc
from ray.core.generated.runtime_environment_pb2 import RuntimeEnvInfo

from serving import warm_pool
from serving.pool.apps import model_app, model_defaults, spec_from_entry, spec_of
from serving.pool.spec import PoolSettings
from serving.warm_pool import PoolOff, PoolPlan
from settings import REPO_ROOT, ModelConfig, build_settings
from testing.polling import holds_for, wait_for

# --- what a Ray upgrade must not change silently ------------------------------------------------------


def test_ray_is_the_pinned_version() -> None:
    assert ray.__version__ == "2.60.0"
    assert "ray[serve]==2.60.0" in (REPO_ROOT / "requirements-serve.txt").read_text().splitlines()


def test_the_protobuf_fields_and_rpcs_the_pool_uses() -> None:
    fields = node_manager_pb2.PrestartWorkersRequest.DESCRIPTOR.fields_by_name
    f = fields["language"]  # for the descriptor's type constants
    assert {name: (field.type, field.is_repeated) for name, field in fields.items() if name != "job_id"} == {
        "language": (f.TYPE_ENUM, False),
        "runtime_env_info": (f.TYPE_MESSAGE, False),
        "keep_alive_duration_secs": (f.TYPE_UINT64, False),
        "num_workers": (f.TYPE_UINT64, False),
    }
    assert fields["language"].enum_type.full_name == "ray.rpc.Language"
    assert fields["runtime_env_info"].message_type.full_name == RuntimeEnvInfo.DESCRIPTOR.full_name
    assert "serialized_runtime_env" in RuntimeEnvInfo.DESCRIPTOR.fields_by_name
    pids = node_manager_pb2.GetWorkerPIDsReply.DESCRIPTOR.fields_by_name["pids"]
    assert pids.is_repeated and pids.type == pids.TYPE_INT32
    service = node_manager_pb2.DESCRIPTOR.services_by_name["NodeManagerService"].methods_by_name
    assert service["PrestartWorkers"].input_type.name == "PrestartWorkersRequest"
    assert service["GetWorkerPIDs"].input_type.name == "GetWorkerPIDsRequest"
    assert hasattr(node_manager_pb2_grpc, "NodeManagerServiceStub")
    assert warm_pool.unsupported_reason() is None


def test_the_setup_hook_variable_and_serves_deployment_actor_variables() -> None:
    # Committed Serve configs carry this name, and Ray's worker runs the hook it names.
    assert ray_constants.WORKER_PROCESS_SETUP_HOOK_ENV_VAR == "__RAY_WORKER_PROCESS_SETUP_HOOK_ENV_VAR"
    source = Path(importlib.util.find_spec("ray._private.workers.default_worker").origin).read_text()
    assert "ray_constants.WORKER_PROCESS_SETUP_HOOK_ENV_VAR" in source and "load_and_execute_setup_hook" in source
    # The manager drops exactly what Serve adds to a deployment actor's env to find the replicas' env.
    from ray.serve._private import constants
    from ray.serve._private.common import DeploymentID
    from ray.serve._private.deployment_state import _inject_internal_deployment_context_env_vars

    env = _inject_internal_deployment_context_env_vars({"env_vars": {"A": "1"}}, DeploymentID("G", "app"), "p", "v")
    added = set(env["env_vars"]) - {"A"}
    assert added == {getattr(constants, name) for name in warm_pool.SERVE_ACTOR_VARIABLES}


def test_runtime_env_hash_is_the_raylets() -> None:
    # The --runtime-env-hash that ray 2.60.0's raylet gave a worker started with this env.
    serialized = (
        '{"env_vars": {"PYTHONPATH": "/tmp/exp:${PYTHONPATH}", '
        '"__RAY_WORKER_PROCESS_SETUP_HOOK_ENV_VAR": "exp_hook.hook"}}'
    )
    assert warm_pool.runtime_env_hash(serialized) == 1420669959
    assert warm_pool.runtime_env_hash("{}") == warm_pool.runtime_env_hash("") == 0


# --- failing soft -----------------------------------------------------------------------------------


def _fake_pb2(drop_field: str | None = None, drop_method: str | None = None) -> Any:
    messages = {}
    for name, fields in warm_pool.PROTO_FIELDS.items():
        present = {f: object() for f in fields if f != drop_field}
        messages[name] = SimpleNamespace(DESCRIPTOR=SimpleNamespace(fields_by_name=present))
    methods = {m: object() for m in warm_pool.STUB_METHODS if m != drop_method}
    service = SimpleNamespace(methods_by_name=methods)
    return SimpleNamespace(**messages, DESCRIPTOR=SimpleNamespace(services_by_name={"NodeManagerService": service}))


def test_a_missing_field_or_rpc_is_named() -> None:
    grpc_module = SimpleNamespace(NodeManagerServiceStub=object)
    assert warm_pool.unsupported_reason(_fake_pb2(), grpc_module) is None
    reason = warm_pool.unsupported_reason(_fake_pb2(drop_field="keep_alive_duration_secs"), grpc_module)
    assert reason == "protobuf field ray.rpc.PrestartWorkersRequest.keep_alive_duration_secs is missing"
    reason = warm_pool.unsupported_reason(_fake_pb2(drop_method="PrestartWorkers"), grpc_module)
    assert reason == "RPC NodeManagerService.PrestartWorkers is missing"


def test_without_support_the_model_deployment_is_unchanged_and_one_warning_says_why(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    missing = "RPC NodeManagerService.PrestartWorkers is missing"
    monkeypatch.setattr(warm_pool.replica, "unsupported_reason", lambda: missing)
    options = {"ray_actor_options": {"num_cpus": 1}}
    with caplog.at_level(logging.WARNING, logger=warm_pool.__name__):
        assert warm_pool.model_options(options, warm_workers=2) == options
    (record,) = caplog.records
    assert "warm worker pool off" in record.message and "PrestartWorkers is missing" in record.message


class _Unimplemented(grpc.RpcError):
    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNIMPLEMENTED


class _FakeCluster:
    """Nodes and a registry in memory; prestart goes through a stub that may fail."""

    def __init__(self, nodes: set[str], stub: Any = None) -> None:
        self.node_ids, self.stub = nodes, stub
        self.registry: dict[str, tuple[str, int]] = {}
        self.prestarted: list[tuple[str, int]] = []
        self.alive: set[int] = set()

    def nodes(self) -> set[str]:
        return set(self.node_ids)

    def registrations(self) -> list[tuple[str, str, int]]:
        return [(key, node, pid) for key, (node, pid) in self.registry.items()]

    def forget(self, key: str) -> None:
        self.registry.pop(key, None)

    def heartbeat(self, beat: int) -> None:
        pass

    def lead(self, target: int) -> tuple[bool, int]:
        return self.leads, target

    leads = True

    def worker_pids(self, node: str) -> set[int]:
        return set(self.alive)

    def prestart(self, node: str, count: int) -> None:
        if self.stub is not None:
            warm_pool.call_raylet(self.stub, "PrestartWorkers", object())
        self.prestarted.append((node, count))


def test_a_raylet_without_the_rpc_turns_the_pool_off_with_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    def prestart(request: Any, timeout: float) -> None:
        raise _Unimplemented()

    cluster = _FakeCluster({"n1", "n2"}, stub=SimpleNamespace(PrestartWorkers=prestart))
    with caplog.at_level(logging.WARNING, logger=warm_pool.__name__):
        reason = warm_pool.run_pool(cluster, PoolPlan(target=1), tick_s=0, rounds=5)
    assert reason == "the raylet does not implement NodeManagerService.PrestartWorkers"
    assert [r.message for r in caplog.records] == [f"warm worker pool off: {reason}; replicas start cold"]


def test_call_raylet_passes_other_errors_on() -> None:
    class Unavailable(grpc.RpcError):
        def code(self) -> grpc.StatusCode:
            return grpc.StatusCode.UNAVAILABLE

    def fail(request: Any, timeout: float) -> None:
        raise Unavailable()

    with pytest.raises(Unavailable):
        warm_pool.call_raylet(SimpleNamespace(GetWorkerPIDs=fail), "GetWorkerPIDs", object())
    with pytest.raises(PoolOff):
        warm_pool.call_raylet(SimpleNamespace(GetWorkerPIDs=lambda r, timeout: (_ for _ in ()).throw(_Unimplemented())),
                              "GetWorkerPIDs", object())  # fmt: skip


# --- decisions ----------------------------------------------------------------------------------------


def test_each_fitting_node_gets_the_target_once_while_workers_start() -> None:
    plan = PoolPlan(target=2)
    assert plan.update(0.0, {"a", "b"}, {}) == {"a": 2, "b": 2}
    assert plan.update(1.0, {"a", "b"}, {"a": {"k1": 11}}) == {}  # one warm, one still starting: nothing more
    assert plan.update(2.0, {"a", "b", "c"}, {"a": {"k1": 11, "k2": 12}}) == {"c": 2}  # a node joined


def test_a_worker_taken_by_a_starting_replica_holds_the_refill_back() -> None:
    plan = PoolPlan(target=1)
    plan.update(0.0, {"a"}, {})
    plan.update(1.0, {"a"}, {"a": {"w/1/a/11/x": 11}})
    assert plan.update(10.0, {"a"}, {}, held={"a": {"t/1/a/11/x"}}) == {}  # taken: the replica loads, answers
    assert plan.update(12.0, {"a"}, {}, held={"a": {"t/1/a/11/x"}}) == {}
    assert plan.update(13.0, {"a"}, {}, held={}) == {"a": 1}  # its replica has answered


def test_a_worker_taken_the_moment_it_is_warm_counts_as_arrived() -> None:
    """A replica waiting for a worker takes the prestarted one as soon as it registers: the manager may
    only ever see its hold. Its start is over all the same, so the refill follows its replica's answer."""
    plan = PoolPlan(target=1, start_grace_s=120.0)
    assert plan.update(0.0, {"a"}, {}) == {"a": 1}
    assert plan.update(5.0, {"a"}, {}, held={"a": {"t/1/a/11/x"}}) == {}  # seen only as taken
    assert plan.snapshot()["a"]["pending"] == 0
    assert plan.update(6.0, {"a"}, {}, held={}) == {"a": 1}  # answered: refill now, not after 120 s


def test_starts_that_never_become_warm_stop_the_pool_on_that_node(caplog: pytest.LogCaptureFixture) -> None:
    plan = PoolPlan(target=1, start_grace_s=10.0)
    asked = [plan.update(t, {"a"}, {}) for t in (0.0, 11.0, 22.0, 33.0, 44.0)]
    assert asked == [{"a": 1}, {"a": 1}, {"a": 1}, {}, {}]  # the third expiry gives up
    assert len([r for r in caplog.records if "never became warm" in r.message]) == 1


def test_refill_round_forgets_dead_workers_and_workers_of_gone_nodes() -> None:
    cluster = _FakeCluster({"a"})
    cluster.registry = {"w/1/a/11/x": ("a", 11), "w/1/a/12/y": ("a", 12), "w/1/gone/13/z": ("gone", 13)}
    cluster.alive = {11}
    plan = PoolPlan(target=2)
    assert warm_pool.refill_round(cluster, plan, 0.0, check_liveness=True) == {"a": 1}
    assert cluster.registry == {"w/1/a/11/x": ("a", 11)} and cluster.prestarted == [("a", 1)]
    cluster.registry["t/1/a/14/h"] = ("a", 14)  # a hold counts against the refill, as long as its process lives
    assert warm_pool.refill_round(cluster, PoolPlan(target=2), 1.0, check_liveness=False) == {}
    assert warm_pool.refill_round(cluster, PoolPlan(target=2), 2.0, check_liveness=True) == {"a": 1}


class _MemoryKv:
    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}

    def put(self, key: str, value: str) -> None:
        self.data[key] = value.encode()

    def get(self, key: str) -> bytes | None:
        return self.data.get(key)

    def delete(self, key: str) -> None:
        self.data.pop(key, None)

    def keys(self, prefix: str) -> list[str]:
        return [k for k in self.data if k.startswith(prefix)]


def test_managers_sharing_a_runtime_env_keep_one_pool_led_by_one_of_them(monkeypatch: pytest.MonkeyPatch) -> None:
    kv, clock = _MemoryKv(), [1000.0]
    monkeypatch.setattr(warm_pool.manager.time, "time", lambda: clock[0])
    managers = {}
    for name in ("a", "b"):  # two model deployments: same runtime env, so the same hash
        managers[name] = warm_pool.RayletCluster(None, 7, {"CPU": 1}, manager=name)
        managers[name]._kv = kv
    assert managers["a"].lead(1) == (True, 1)
    assert managers["b"].lead(2) == (False, 2)  # a leads, and keeps the larger of the two sizes
    assert managers["a"].lead(1) == (True, 2)
    clock[0] += warm_pool.MANAGER_STALE_S + 1  # a is gone (its deployment deleted)
    assert managers["b"].lead(2) == (True, 2)
    clock[0] += 1
    assert managers["a"].lead(1) == (False, 2)  # back: b leads until it is gone


def test_a_taken_warm_worker_holds_the_refill_until_its_replica_has_answered(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    kv = _MemoryKv()
    monkeypatch.setattr(warm_pool.worker, "_kv", lambda: kv)
    monkeypatch.setattr(warm_pool.worker, "_answered", threading.Event())
    kv.put("w/7/n1/42/x", "{}")
    holder = threading.Thread(target=warm_pool.worker._hold_until_answered, args=("w/7/n1/42/x",))
    holder.start()
    wait_for(lambda: "t/7/n1/42/x" in kv.data, timeout=10, interval=0.01, what="the worker to be taken")
    assert list(kv.data) == ["t/7/n1/42/x"]  # held: no longer warm, and the manager does not refill yet
    # Still loading or answering: the hold must last. An absence, watched for 0.3 s, every look asserting it.
    holds_for(lambda: holder.is_alive() and list(kv.data) == ["t/7/n1/42/x"], seconds=0.3, interval=0.02, what="hold")
    warm_pool.replica_answered()
    holder.join(5)
    assert not holder.is_alive() and kv.data == {}


def test_a_hold_ends_after_its_time_limit_without_an_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    kv = _MemoryKv()
    monkeypatch.setattr(warm_pool.worker, "_kv", lambda: kv)
    monkeypatch.setattr(warm_pool.worker, "_answered", threading.Event())
    warm_pool.worker._hold_until_answered("w/7/n1/42/x", timeout_s=0.05)
    assert kv.data == {}


def test_a_manager_that_stands_by_prestarts_nothing_but_sees_the_pool() -> None:
    cluster = _FakeCluster({"a"})
    cluster.leads = False
    plan = PoolPlan(target=1)
    assert warm_pool.run_pool(cluster, plan, tick_s=0, rounds=3) == "stopped"
    assert cluster.prestarted == [] and plan.snapshot() == {
        "a": {"warm_pids": [], "pending": 0, "held": 0, "failed": 0}
    }
    cluster.registry, cluster.alive = {"w/1/a/11/x": ("a", 11)}, {11}
    warm_pool.run_pool(cluster, plan, tick_s=0, rounds=1)
    assert plan.snapshot()["a"]["warm_pids"] == [11] and not plan.leading
    cluster.leads = True
    cluster.registry = {}
    warm_pool.run_pool(cluster, plan, tick_s=0, rounds=1)
    assert cluster.prestarted == [("a", 1)] and plan.leading


# --- the model deployment's options -----------------------------------------------------------------


def test_model_options_add_the_shared_runtime_env_and_the_pool_manager() -> None:
    options = {"ray_actor_options": {"num_cpus": 2, "num_gpus": 0.5, "runtime_env": {"env_vars": {"A": "1"}}}}
    out = warm_pool.model_options(options, warm_workers=3, orphan_s=12.0)
    env_vars = out["ray_actor_options"]["runtime_env"]["env_vars"]
    # the worker reads WARM_WORKER_ORPHAN_S from this env (serving.warm_pool.worker.orphan_after_s)
    assert env_vars == {"A": "1", **warm_pool.runtime_env()["env_vars"], "WARM_WORKER_ORPHAN_S": "12.0"}
    assert env_vars[ray_constants.WORKER_PROCESS_SETUP_HOOK_ENV_VAR] == "serving.warm_pool.prepare_worker"
    assert env_vars["PYTHONPATH"] == f"{REPO_ROOT}:${{PYTHONPATH}}"
    (manager,) = out["deployment_actors"]
    assert manager.init_kwargs == {"warm_workers": 3, "replica_resources": {"CPU": 2.0, "GPU": 0.5}}
    # It holds no CPU (nor do its idle workers), on the head, which outlives the worker nodes.
    assert manager.actor_options == {"num_cpus": 0, "resources": {"node:__internal_head__": 0.001}}
    assert options["ray_actor_options"]["runtime_env"] == {"env_vars": {"A": "1"}}  # not modified in place


def test_each_model_deployment_gets_the_pool_unless_its_warm_workers_is_zero() -> None:
    caches = {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "32", "LRU_CACHE_CAPACITY": "32"}  # every replica's, pooled or not
    pooled = model_app(spec_of(ModelConfig(name="org/m", warm_workers=2)), PoolSettings())._bound_deployment
    orphan = {"WARM_WORKER_ORPHAN_S": "30.0"}  # WARM_WORKER_ORPHAN_S's default, for the warm workers only
    pool_env = warm_pool.runtime_env()["env_vars"] | orphan
    assert pooled.ray_actor_options["runtime_env"] == {"env_vars": caches | pool_env}
    (manager,) = pooled._deployment_config.deployment_actors
    assert manager.name == "warm-pool" and manager.init_kwargs["warm_workers"] == 2
    cold = model_app(spec_of(ModelConfig(name="org/m", warm_workers=0)), PoolSettings())._bound_deployment
    assert (
        cold.ray_actor_options["runtime_env"] == {"env_vars": caches} and not cold._deployment_config.deployment_actors
    )
    assert ModelConfig(name="m").warm_workers == 1  # WARM_WORKERS's default


@pytest.mark.parametrize(("env", "expected"), [({}, 1), ({"WARM_WORKERS": "2"}, 2), ({"WARM_WORKERS": "0"}, 0)])
def test_warm_workers_reaches_every_model_the_pool_deploys(env: dict[str, str], expected: int) -> None:
    settings = build_settings({"MODELS": "a=org/a,b=org/b", **env})
    # Models of the environment, and a model loaded through the admin API (it starts from the same defaults).
    specs = [spec_of(config) for config in settings.model_configs]
    specs.append(spec_from_entry({"name": "added", "model_id": "org/c"}, model_defaults(settings)))
    for spec in specs:
        deployment = model_app(spec, PoolSettings())._bound_deployment
        managers = deployment._deployment_config.deployment_actors or []
        assert [m.init_kwargs["warm_workers"] for m in managers] == ([expected] if expected else []), spec.name
    # An admin entry may set its own.
    spec = spec_from_entry({"name": "own", "model_id": "org/d", "warm_workers": 3}, model_defaults(settings))
    (manager,) = model_app(spec, PoolSettings())._bound_deployment._deployment_config.deployment_actors
    assert manager.init_kwargs["warm_workers"] == 3


def test_every_module_the_warm_workers_import_exists() -> None:
    # A renamed module would end every warm worker (and the pool would give up): fail here instead.
    missing = [name for name in warm_pool.PRELOAD if importlib.util.find_spec(name) is None]
    assert not missing


def test_a_process_that_is_not_a_warm_worker_says_so() -> None:
    assert warm_pool.worker_report() == {"warm_worker": False}


def test_the_cuda_guard_spots_the_driver_library() -> None:
    maps = "7f00-7f01 r-xp 00000000 08:01 42 /usr/lib/x86_64-linux-gnu/libcuda.so.550.54.15\n"
    assert warm_pool.cuda_library_loaded(maps) == "/usr/lib/x86_64-linux-gnu/libcuda.so.550.54.15"
    assert warm_pool.cuda_library_loaded("7f00-7f01 r-xp 00000000 08:01 42 /usr/lib/libcudart.so.12\n") is None


def test_the_examples_in_the_module_run() -> None:
    parts = (warm_pool.common, warm_pool.replica, warm_pool.worker, warm_pool.plan, warm_pool.manager)
    results = [doctest.testmod(part) for part in parts]
    assert sum(r.attempted for r in results) >= 4 and sum(r.failed for r in results) == 0


def test_a_worker_seen_by_no_round_still_arrives_by_its_mark() -> None:
    """Registered, taken and answered between two rounds: only its arrival mark is left to count."""
    plan = PoolPlan(target=1, start_grace_s=120.0)
    assert plan.update(0.0, {"a"}, {}) == {"a": 1}
    assert plan.update(1.0, {"a"}, {}) == {}  # still starting
    assert plan.update(2.0, {"a"}, {}, arrived={"a": {"a/1/a/11/x"}}) == {"a": 1}  # gone already: refill
    assert plan.update(3.0, {"a"}, {"a": {"w/1/a/12/y": 12}}) == {}  # the refill is warm


def test_the_leading_manager_consumes_arrival_marks_and_a_standby_leaves_them() -> None:
    class Cluster:
        def __init__(self) -> None:
            self.keys = {"a/7/n1/11/x": ("n1", 11)}
            self.started: list[tuple[str, int]] = []

        def nodes(self) -> set[str]:
            return {"n1"}

        def registrations(self) -> list[tuple[str, str, int]]:
            return [(key, node, pid) for key, (node, pid) in self.keys.items()]

        def forget(self, key: str) -> None:
            self.keys.pop(key, None)

        def prestart(self, node: str, count: int) -> None:
            self.started.append((node, count))

    cluster, plan = Cluster(), PoolPlan(target=1)
    plan.update(0.0, {"n1"}, {})  # asked for one worker, pending
    warm_pool.refill_round(cluster, plan, 1.0, check_liveness=False, prestart=False)
    assert "a/7/n1/11/x" in cluster.keys and cluster.started == []
    warm_pool.refill_round(cluster, plan, 2.0, check_liveness=False, prestart=True)
    assert cluster.keys == {} and cluster.started == [("n1", 1)]
