"""The KubeRay manifests lock the cluster: Ray's token auth, GCS fault tolerance on the Redis of
redis.yaml, a NetworkPolicy that opens Ray's ports to the cluster's own pods only, the keys on the head
alone (where the Gateway, the pool controller and Serve's import task run). Checked offline, field by
field, against the shapes KubeRay's CRD (ray.io/v1, v1.5.1+) and Kubernetes take.

The GCS fault tolerance itself is exercised by tests/integration/test_durable_state.py (a head killed
and restarted over one Redis).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from ray.serve._private.application_state import _get_shared_build_app_label_selector
from ray.serve.schema import ServeApplicationSchema

from settings import REPO_ROOT, build_settings

KUBERAY = REPO_ROOT / "deploy" / "kuberay"


def _documents(path: Path) -> dict[tuple[str, str], dict[str, Any]]:
    return {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(path.read_text()) if d}


@pytest.fixture(scope="module")
def cluster() -> dict[str, Any]:
    return yaml.safe_load((KUBERAY / "rayservice.yaml").read_text())["spec"]["rayClusterConfig"]


@pytest.fixture(scope="module")
def policies() -> dict[str, dict[str, Any]]:
    docs = _documents(KUBERAY / "networkpolicy.yaml")
    assert {kind for kind, _ in docs} == {"NetworkPolicy"}
    return {name: doc for (_, name), doc in docs.items()}


def _pod_labels(group: dict[str, Any]) -> dict[str, str]:
    return group["template"]["metadata"]["labels"]


def _groups(cluster: dict[str, Any]) -> list[dict[str, Any]]:
    return [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A Kubernetes label selector (matchLabels only: the manifests use no expressions)."""
    assert set(selector) <= {"matchLabels"}, "only matchLabels is evaluated here"
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def _admits(policy: dict[str, Any], port: int, source: dict[str, str] | None) -> bool:
    """Whether ``policy`` lets a pod with labels ``source`` (None: outside the cluster) reach ``port``.

    Kubernetes' rules: a rule admits when one of its ``from`` peers matches (no ``from``: everyone)
    and one of its ``ports`` matches (no ``ports``: every port). Peers with a namespaceSelector match
    pods of any namespace here ({}), which is what the manifests use.
    """
    for rule in policy["spec"].get("ingress", []):
        ports = rule.get("ports")
        if ports is not None and not any(p.get("port") == port for p in ports):
            continue
        peers = rule.get("from")
        if peers is None:
            return True
        for peer in peers:
            assert "ipBlock" not in peer, "no ipBlock: pods are named by their labels"
            if source is not None and "podSelector" in peer and _selects(peer["podSelector"], source):
                return True
    return False


RAY_PORTS = [6379, 8265, 10001, 52365, 8076, 8077, 10002, 20000]  # GCS, dashboard, client, agent, raylet...
OUTSIDE = {"app": "some-other-service"}
OPERATOR = {"app.kubernetes.io/name": "kuberay-operator"}
PROMETHEUS = {"app.kubernetes.io/name": "prometheus"}


def test_rays_token_authentication_is_on(cluster: dict[str, Any]) -> None:
    assert cluster["authOptions"] == {"mode": "token"}
    assert tuple(int(x) for x in cluster["rayVersion"].split(".")) >= (2, 52, 0), "token auth needs Ray 2.52+"
    # KubeRay sets RAY_AUTH_MODE and RAY_AUTH_TOKEN from its own Secret; nothing here turns it off.
    for group in _groups(cluster):
        names = {e["name"] for c in group["template"]["spec"]["containers"] for e in c.get("env", [])}
        assert not {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"} & names


def test_only_the_clusters_own_pods_reach_rays_ports(cluster: dict[str, Any], policies: dict) -> None:
    policy = policies["llm-serve-ray"]
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    for group in _groups(cluster):  # the policy covers every pod of the cluster
        assert _selects(policy["spec"]["podSelector"], _pod_labels(group)), group.get("groupName", "head")
    own = _pod_labels(cluster["headGroupSpec"])
    for port in RAY_PORTS:
        assert _admits(policy, port, own), port
        assert not _admits(policy, port, OUTSIDE) and not _admits(policy, port, None), f"port {port} is open"
        assert not _admits(policy, port, PROMETHEUS), port
    assert _admits(policy, 8265, OPERATOR)  # KubeRay manages Serve through the dashboard (with the token)
    assert not any(_admits(policy, port, OPERATOR) for port in RAY_PORTS if port != 8265)
    # Clients reach Serve's proxy alone, where the Gateway checks the API keys; Prometheus the metrics.
    assert _admits(policy, 8000, None) and _admits(policy, 8000, OUTSIDE)
    assert _admits(policy, 8080, PROMETHEUS) and not _admits(policy, 8080, OUTSIDE)


def test_the_dashboard_and_ray_client_are_not_exposed(cluster: dict[str, Any]) -> None:
    head = cluster["headGroupSpec"]
    assert head["serviceType"] == "ClusterIP"
    ports = {p["containerPort"] for c in head["template"]["spec"]["containers"] for p in c["ports"]}
    assert 10001 not in ports, "the head Service would publish the Ray client port"
    for name in ("ingress", "headService"):
        assert name not in head


def test_gcs_fault_tolerance_uses_the_redis_of_redis_yaml(cluster: dict[str, Any], policies: dict) -> None:
    options = cluster["gcsFaultToleranceOptions"]
    host, _, port = options["redisAddress"].removeprefix("redis://").partition(":")
    redis = _documents(KUBERAY / "redis.yaml")
    service = redis[("Service", host)]
    assert [p["port"] for p in service["spec"]["ports"]] == [int(port)]
    deployment = redis[("Deployment", host)]
    assert deployment["spec"]["replicas"] == 1  # KubeRay supports a standalone Redis
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    # The GCS's password and Redis's are the same Secret key, never a value in a file.
    secret = options["redisPassword"]["valueFrom"]["secretKeyRef"]
    env = {e["name"]: e for e in container["env"]}
    assert env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == secret
    assert "--requirepass" in " ".join(container["command"]) and "--appendonly yes" in " ".join(container["command"])
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volume = next(v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == mounts["/data"])
    assert ("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"]) in redis
    # Redis answers the cluster's pods only.
    policy = policies["llm-serve-redis"]
    assert _selects(policy["spec"]["podSelector"], deployment["spec"]["template"]["metadata"]["labels"])
    assert _admits(policy, 6379, _pod_labels(cluster["headGroupSpec"]))
    assert not _admits(policy, 6379, OUTSIDE) and not _admits(policy, 6379, None)


def test_the_keys_reach_the_head_only_where_every_reader_of_them_runs(cluster: dict[str, Any]) -> None:
    head, workers = cluster["headGroupSpec"], cluster["workerGroupSpecs"]
    for group in workers:
        for container in group["template"]["spec"]["containers"]:
            names = {e["name"] for e in container.get("env", [])}
            assert not {"API_KEY", "ADMIN_API_KEY", "API_KEYS_FILE"} & names, group["groupName"]
            assert not container.get("envFrom") and not group["template"]["spec"].get("volumes", [])[1:]
    (head_container,) = head["template"]["spec"]["containers"]
    assert {"API_KEY", "ADMIN_API_KEY"} <= {e["name"] for e in head_container["env"]}

    # The Gateway and the pool controller are pinned to the head's Ray label, and so is Serve's task
    # that imports the graph (and reads the keys): Serve schedules it where every deployment's selector
    # points, when they agree.
    key, _, value = head["rayStartParams"]["labels"].partition("=")
    service = yaml.safe_load((KUBERAY / "rayservice.yaml").read_text())["spec"]
    (application,) = yaml.safe_load(service["serveConfigV2"])["applications"]
    settings = build_settings(application["runtime_env"]["env_vars"])
    assert settings.gateway_node_label == f"{key}={value}"
    for deployment in application["deployments"]:
        assert deployment["ray_actor_options"]["label_selector"] == {key: value}, deployment["name"]
    schema = ServeApplicationSchema.model_validate(application)
    assert _get_shared_build_app_label_selector(schema) == {key: value}
    for group in workers:
        assert "labels" not in group["rayStartParams"] or key not in group["rayStartParams"]["labels"]
