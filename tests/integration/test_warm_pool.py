"""The warm worker pool on real Ray Serve: a cluster of a head with no CPU for replicas (Serve's
actors, the Gateway, the pool controller and the warm pool's manager live there) and worker nodes
that can host a model replica, the second one added while the service runs. The tests run in order
and share the cluster."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest
import ray
from ray import serve
from ray.cluster_utils import Cluster

from ray_serve_app import build_graph
from serving import warm_pool
from settings import build_settings
from testing.http import get_json
from testing.polling import wait_for
from testing.serve import serve_url, two_node_serve
from tests.integration.conftest import APP, replica_states

MODEL = "tiny"  # its Serve application and deployment are named after it
REPLICA = f"ServeReplica:{MODEL}:{MODEL}"  # a model replica's actor class
SETTINGS = {
    "SERVED_MODEL_NAME": MODEL,
    "MAX_REPLICAS": "1",
    "NUM_CPUS_PER_REPLICA": "1",
    "IDLE_TIMEOUT_S": "2",
    "AUTOSCALING_LOOK_BACK_S": "1",
    "METRICS_PUSH_INTERVAL_S": "0.5",
    "MAX_NEW_TOKENS": "4",
    "TEMPERATURE": "0",
    "WARM_WORKER_ORPHAN_S": "10",  # idle warm workers of a deleted pool exit after 10 to 15 s, not 30 to 35
}
ORPHAN_S = 10.0
# Importing torch and transformers in a fresh worker takes 5 to 20 s on a busy 2-core machine.
POOL_DEADLINE_S = 180


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    with two_node_serve(worker_cpus=1) as (cluster, _):
        yield cluster


@pytest.fixture(scope="module")
def url(cluster: Cluster, tiny_causal: Path) -> str:
    serve.run(build_graph(build_settings({**SETTINGS, "MODEL_ID": str(tiny_causal)})), name=APP, route_prefix="/")
    url = serve_url()
    wait_for(lambda: get_json(f"{url}/healthz") is not None, timeout=60, what="the Gateway")
    return url


def test_a_cold_start_lands_in_a_warm_worker_and_the_pool_refills(url: str) -> None:
    warm = _wait_for_warm(MODEL)
    answer = httpx.post(f"{url}/generate", json={"prompt": "Return the"}, timeout=120)
    assert answer.status_code == 200, answer.text
    (replica_pid,) = _actor_pids(REPLICA)
    assert replica_pid in warm, f"the replica runs in pid {replica_pid}, not in a warm worker {warm}"
    report = _last_cold_start(url)  # the replica's own report, with the phases the Gateway shows
    assert report["details"]["warm_worker"] is True and report["details"]["process_start_s"] is None
    assert report["phases"]["process_start_s"] == 0  # no process of its own to start
    assert report["phases"]["imports_s"] < 0.05, report  # torch, transformers and the engine were imported
    assert report["details"]["model_code_s"] < 1.0, report  # transformers' loading code too (seconds when cold)
    # The taken worker left the pool, and a new one replaces it once the replica has answered.
    refilled = _wait_for_warm(MODEL, lambda pids: replica_pid not in pids)
    assert refilled and replica_pid not in refilled


def test_only_warm_workers_and_model_replicas_import_torch(url: str) -> None:
    answer = httpx.post(f"{url}/generate", json={"prompt": "Raise"}, timeout=120)
    assert answer.status_code == 200, answer.text
    light = {
        name: _actor_pids(name)
        for name in ("ServeController", "ProxyActor", f"ServeReplica:{APP}:Gateway", "PoolController", "WarmPool")
    }
    assert all(light.values()), light
    assert not {pid for pids in light.values() for pid in pids if _imported_torch(pid)}, light
    # Once the replica has stopped and the pool is full again, only its warm workers hold torch.
    wait_for(lambda: replica_states() == {}, timeout=60, what="zero model replicas")
    warm = _wait_for_warm(MODEL, lambda pids: _pool_settled())
    with_torch = {pid for pid in _session_pids() if _imported_torch(pid)}
    assert with_torch == set(warm), f"torch in {with_torch}, warm workers {warm}"


def test_the_pool_holds_no_cpu_and_no_gpu(url: str) -> None:
    wait_for(lambda: replica_states() == {}, timeout=60, what="zero model replicas")
    _wait_for_warm(MODEL)
    wait_for(
        lambda: ray.available_resources().get("CPU") == ray.cluster_resources()["CPU"],
        timeout=30,
        what="every CPU free with the pool full",
    )
    assert ray.available_resources().get("GPU", 0) == ray.cluster_resources().get("GPU", 0)
    for pid in _wait_for_warm(MODEL):
        maps = Path(f"/proc/{pid}/maps").read_text()
        assert warm_pool.cuda_library_loaded(maps) is None  # CUDA untouched (a GPU node's would hold no memory)


def test_a_node_added_later_gets_a_pool_and_a_replica_there_starts_in_it(cluster: Cluster, url: str) -> None:
    wait_for(lambda: replica_states() == {}, timeout=60, what="zero model replicas")
    (first,) = [n for n in cluster.worker_nodes]
    added = cluster.add_node(num_cpus=1)
    warm_there = _wait_for_warm(MODEL, node=added.node_id)
    cluster.remove_node(first)  # the next replica can only go to the new node
    answer = httpx.post(f"{url}/generate", json={"prompt": "The socket module"}, timeout=120)
    assert answer.status_code == 200, answer.text
    (replica_pid,) = _actor_pids(REPLICA)
    assert replica_pid in warm_there and _last_cold_start(url)["details"]["warm_worker"] is True
    wait_for(
        lambda: first.node_id not in (warm_pool.pool_status(MODEL, MODEL) or {"nodes": [first.node_id]})["nodes"],
        timeout=60,
        what="the removed node's pool to be forgotten",
    )


def test_warm_workers_exit_once_their_pool_is_gone(url: str) -> None:
    warm = _wait_for_warm(MODEL)
    # The model's setting reaches its warm workers through the runtime env they share with its replicas.
    assert {psutil.Process(pid).environ().get("WARM_WORKER_ORPHAN_S") for pid in warm} == {str(ORPHAN_S)}
    serve.delete(APP)
    if MODEL in serve.status().applications:  # the model's own application, with the pool's manager
        serve.delete(MODEL)
    deadline = ORPHAN_S + 30
    wait_for(lambda: not any(psutil.pid_exists(pid) for pid in warm), timeout=deadline, what="warm workers to exit")


def test_a_replica_whose_model_fails_to_load_is_replaced_and_never_answers(
    cluster: Cluster, url: str, tiny_causal: Path, tmp_path: Path
) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tiny_causal, broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    env = {**SETTINGS, "SERVED_MODEL_NAME": "broken", "MODEL_ID": str(broken), "REQUEST_TIMEOUT_S": "20"}
    serve.run(build_graph(build_settings(env)), name=APP, route_prefix="/", blocking=False)
    wait_for(lambda: get_json(f"{url}/healthz") is not None, timeout=60, what="the Gateway")
    statuses = []

    def replaced() -> bool:
        statuses.append(httpx.post(f"{url}/generate", json={"prompt": "Return the"}, timeout=60).status_code)
        # Each replica failed to load, and Serve started another in its place.
        return len(_dead_replicas("ServeReplica:broken:broken")) >= 2

    wait_for(replaced, timeout=180, interval=1.0, what="failed replicas replaced")
    assert statuses and all(status >= 500 for status in statuses), statuses


def _wait_for_warm(app: str, accept=lambda pids: True, node: str | None = None) -> list[int]:
    def warm() -> list[int] | None:
        pids = warm_pool.warm_pids(warm_pool.pool_status(app, app), node)
        return pids if pids and accept(pids) else None

    return wait_for(warm, timeout=POOL_DEADLINE_S, interval=0.5, what=f"a warm worker of {app} on {node or 'a node'}")


def _actor_pids(class_name: str) -> list[int]:
    actors = ray._private.state.actors().values()
    return [a["Pid"] for a in actors if a["State"] == "ALIVE" and a["ActorClassName"].endswith(class_name)]


def _dead_replicas(name: str) -> list[str]:
    actors = ray._private.state.actors().values()
    return [a["ActorID"] for a in actors if a["State"] == "DEAD" and a["ActorClassName"] == name]


def _last_cold_start(url: str) -> dict:
    """The model's last cold start in /healthz, once complete (the replica reports it after its first answer)."""

    def complete() -> dict | None:
        (model,) = get_json(f"{url}/healthz")["models"]
        last = model["last_cold_start"]
        return last if last and "details" in last else None

    return wait_for(complete, timeout=30, what="the cold-start report")


def _pool_settled() -> bool:
    status = warm_pool.pool_status(MODEL, MODEL)
    return bool(status) and not any(node["pending"] or node["held"] for node in status["nodes"].values())


def _session_pids() -> set[int]:
    """This cluster's processes: those whose command line names its session (raylets, GCS...) and their
    children (workers, which retitle themselves ``ray::...``), not this test's own."""
    session = ray._private.worker._global_node.session_name
    pids = set()
    for proc in psutil.process_iter(["pid", "cmdline"]):
        if any(session in arg for arg in proc.info["cmdline"] or ()):
            pids |= {proc.pid, *(child.pid for child in proc.children(recursive=True))}
    return pids - {os.getpid()}


def _imported_torch(pid: int) -> bool:
    try:
        maps = Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False
    return "/libtorch_cpu.so" in maps or "/libtorch_cuda.so" in maps


def test_models_share_one_pool_per_node(url: str, tiny_causal: Path) -> None:
    env = {k: v for k, v in SETTINGS.items() if k != "SERVED_MODEL_NAME"}
    env |= {"MODELS": f"one={tiny_causal},two={tiny_causal}", "WARM_WORKERS": "1"}
    earlier: set[int] = set()
    for app in {"broken", MODEL} & set(serve.status().applications):  # earlier tests' models: their own pools
        earlier |= set(warm_pool.warm_pids(warm_pool.pool_status(app, app)))
        serve.delete(app)
    # Their idle warm workers outlive them by up to ORPHAN_S; counted here, they would read as a second pool.
    wait_for(
        lambda: not any(psutil.pid_exists(pid) for pid in earlier),
        timeout=ORPHAN_S + 30,
        what="the earlier pools' warm workers to exit",
    )
    serve.run(build_graph(build_settings(env)), name=APP, route_prefix="/", blocking=False)
    nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU")]

    def shared() -> list[int] | None:
        """Both managers see the same warm workers, one per node, settled; exactly one of them prestarts."""
        one, two = (warm_pool.pool_status(m, m) for m in ("one", "two"))
        if not (one and two) or [one["leading"], two["leading"]].count(True) != 1:
            return None
        pools = [p for status in (one, two) for p in status["nodes"].values()]
        if any(p["pending"] or p["held"] for p in pools) or set(one["nodes"]) != set(nodes):
            return None
        pids = warm_pool.warm_pids(one)
        return pids if len(pids) >= len(nodes) and pids == warm_pool.warm_pids(two) else None

    warm = wait_for(shared, timeout=POOL_DEADLINE_S, interval=0.5, what="one pool shared by both models")
    assert len(warm) == len(nodes), f"{warm} on {len(nodes)} node(s): the managers both refilled"
