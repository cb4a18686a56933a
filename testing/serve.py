"""Ray Serve on this machine, owned by the caller: one local node, or a head and a worker node.

Both start a new Ray instance (never join one that some `ray start` left running) and end it on exit,
so that several people's runs on one machine never share or stop each other's Ray.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from serving.transport import prefer_grpc_proxy
from testing.http import free_port
from testing.polling import wait_for


@contextmanager
def local_serve(
    num_cpus: int = 2, num_gpus: int | None = None, metrics_report_interval_ms: int | None = None
) -> Iterator[int]:
    """A fresh local Ray instance with Serve on a free port; yields the port.

    ``metrics_report_interval_ms``: how often processes report metrics to the node's exporter
    (Ray's default is 10 s; tests that scrape want it sooner).
    """
    import ray
    from ray import serve

    prefer_grpc_proxy()  # as `serve run` of ray_serve_app does
    system = {} if metrics_report_interval_ms is None else {"metrics_report_interval_ms": metrics_report_interval_ms}
    # address="local": always a new instance, never a cluster some `ray start` left running.
    ray.init(
        address="local",
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        include_dashboard=False,
        log_to_driver=False,
        _system_config=system,
    )
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield port
    finally:
        # Also when Serve failed to start (its proxy not ready in time on a loaded machine): a Ray instance left
        # running would fail every later module of this process at its own ray.init.
        # Serve's graceful stop first (about 1 s, replicas checking every DRAIN_CHECK_S): without it, the next
        # ray.init in this process timed out now and then (its dashboard aborted at start), with or without
        # waiting for the old processes.
        instance = _descendants()
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            _wait_gone(instance)


def _descendants() -> list[Any]:
    """This process's descendants that belong to Ray (its servers, workers and replicas; not a browser a
    test keeps open)."""
    import psutil

    ours = []
    for process in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            command = process.cmdline()
            if any("/ray/" in part or part.startswith("ray::") for part in command):
                ours.append(process)
    return ours


def _wait_gone(processes: list[Any], timeout_s: float = 30.0) -> None:
    """Wait until the ended instance's processes have exited (killing any left after ``timeout_s``), so that
    the next instance never starts beside a dying one (its ports, its CPU)."""
    import psutil

    _, alive = psutil.wait_procs(processes, timeout=timeout_s)
    for process in alive:
        with contextlib.suppress(psutil.Error):
            process.kill()
    psutil.wait_procs(alive, timeout=10)


@contextmanager
def two_node_serve(worker_cpus: float = 2, worker_env: Mapping[str, str] | None = None) -> Iterator[tuple[Any, str]]:
    """A head with no CPU for replicas (the Gateway and Serve's actors need none) and a worker node with
    ``worker_cpus`` CPUs (and ``worker_env`` in its processes' environment), as ``ray.cluster_utils.Cluster``;
    Serve on a free port. Yields the cluster and the worker's node id (``cluster.add_node`` adds more)."""
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    prefer_grpc_proxy()
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 0, "include_dashboard": False, "dashboard_agent_listen_port": free_port()},
    )
    worker = cluster.add_node(num_cpus=worker_cpus, **({"env_vars": dict(worker_env)} if worker_env else {}))
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        wait_for(lambda: len([n for n in ray.nodes() if n["Alive"]]) == 2, timeout=60, what="two live nodes")
        # HeadOnly: all nodes share this machine's ports, so only one HTTP proxy can listen.
        serve.start(http_options={"host": "127.0.0.1", "port": free_port()}, proxy_location="HeadOnly")
        yield cluster, worker.node_id
    finally:
        instance = _descendants()
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()
        _wait_gone(instance)


def serve_url() -> str:
    """The base URL of the running Serve instance's HTTP proxy."""
    from ray import serve

    return f"http://127.0.0.1:{serve.context._get_global_client().http_config.port}"


def replica_states(app: str, deployment: str) -> dict[str, int]:
    """Replica count per state of ``deployment`` in ``app``, from Serve's status ({} when none)."""
    from ray import serve

    status = serve.status().applications.get(app)
    if status is None or deployment not in status.deployments:
        return {}
    return {str(k): v for k, v in status.deployments[deployment].replica_states.items()}
