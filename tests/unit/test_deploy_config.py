"""The Serve config for `serve deploy` (deploy/build_config.py) and the KubeRay manifest, checked offline.

tests/integration/test_serve_deploy.py deploys a generated config onto a running `ray start --head`.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from deploy.build_config import build_serve_config, exported_env, render
from settings import REPO_ROOT, SettingsError
from tests.docs import code_lines, section
from tests.raycluster import clean_env

SERVE_CONFIG = REPO_ROOT / "deploy" / "serve_config.yaml"
RAYSERVICE = REPO_ROOT / "deploy" / "kuberay" / "rayservice.yaml"
EXPORTED = {
    "MIN_REPLICAS": "1",
    "MAX_REPLICAS": "4",
    "NUM_CPUS_PER_REPLICA": "2",
    "NUM_GPUS_PER_REPLICA": "0.5",
    "TARGET_ONGOING_REQUESTS": "4",
    "MAX_ONGOING_REQUESTS": "8",
    "MAX_QUEUED_REQUESTS": "20",
    "RAY_SERVE_AUTOSCALER_IDLE_TIMEOUT_S": "120",  # the alias: carried as IDLE_TIMEOUT_S
    "MAX_NEW_TOKENS": "64",
    "LOG_LEVEL": "DEBUG",
}


def _deployments(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    (application,) = config["applications"]
    return {d["name"]: d for d in application["deployments"]}


def test_the_generated_file_carries_the_exported_settings(tmp_path: Path) -> None:
    output = tmp_path / "serve_config.yaml"
    env = {**clean_env(), **EXPORTED, "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "deploy.build_config", "-o", str(output)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load(output.read_text())
    ServeDeploySchema.model_validate(config)  # what `serve deploy` checks first

    (application,) = config["applications"]
    assert application["import_path"] == "ray_serve_app:deployment_graph" and application["route_prefix"] == "/"
    expected_env = {k: v for k, v in EXPORTED.items() if not k.startswith("RAY_")}
    expected_env |= {"IDLE_TIMEOUT_S": "120.0", "NUM_CPUS_PER_REPLICA": "2.0", "NUM_GPUS_PER_REPLICA": "0.5"}
    expected_env |= {"TARGET_ONGOING_REQUESTS": "4.0"}
    assert application["runtime_env"] == {"env_vars": expected_env}  # only what was exported, nothing else

    generator, gateway = _deployments(config)["pydoc-gpt-mini"], _deployments(config)["Gateway"]
    assert generator["ray_actor_options"] == {"num_cpus": 2.0, "num_gpus": 0.5}
    assert generator["max_ongoing_requests"] == 8 and generator["max_queued_requests"] == 20
    assert "num_replicas" not in generator
    autoscaling = generator["autoscaling_config"]
    assert (autoscaling["min_replicas"], autoscaling["initial_replicas"], autoscaling["max_replicas"]) == (1, 1, 4)
    assert autoscaling["target_ongoing_requests"] == 4.0
    # IDLE_TIMEOUT_S less the look-back window (5 s) and the metrics push period (1 s)
    assert autoscaling["downscale_to_zero_delay_s"] == 114.0
    assert generator["logging_config"]["log_level"] == "DEBUG"
    assert gateway["num_replicas"] == 1 and gateway["ray_actor_options"] == {"num_cpus": 0.0}
    assert gateway["max_ongoing_requests"] == 4 * 8 + 20 + 16  # all the Generators can hold, plus queue
    assert config["http_options"] == {"host": "0.0.0.0", "port": 8000}


def test_only_exported_variables_travel_and_host_port_become_http_options() -> None:
    assert exported_env({"MAX_REPLICAS": "3", "PATH": "/usr/bin", "RAY_ADDRESS": "auto"}) == {"MAX_REPLICAS": "3"}
    config = build_serve_config({"HOST": "127.0.0.1", "PORT": "8123"})
    assert config["http_options"] == {"host": "127.0.0.1", "port": 8123}
    assert config["applications"][0]["runtime_env"] == {"env_vars": {"HOST": "127.0.0.1", "PORT": "8123"}}


def test_a_bad_variable_is_named_and_nothing_is_written(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="MAX_REPLICAS"):
        build_serve_config({"MAX_REPLICAS": "lots"})
    output = tmp_path / "serve_config.yaml"
    env = {**clean_env(), "MIN_REPLICAS": "3", "MAX_REPLICAS": "2", "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "deploy.build_config", "-o", str(output)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2 and "MAX_REPLICAS (2) must be at least MIN_REPLICAS (3)" in result.stderr
    assert not output.exists()


def test_the_committed_serve_config_is_what_the_defaults_generate() -> None:
    # deploy/serve_config.yaml is `python -m deploy.build_config -o deploy/serve_config.yaml` with no
    # variable set; regenerate it when the settings or their translation change.
    assert SERVE_CONFIG.read_text() == render(build_serve_config({})), "deploy/serve_config.yaml is stale"


# --- KubeRay ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rayservice() -> dict[str, Any]:
    return yaml.safe_load(RAYSERVICE.read_text())


def test_the_rayservice_has_the_fields_kuberay_requires(rayservice: dict[str, Any]) -> None:
    assert rayservice["apiVersion"] == "ray.io/v1" and rayservice["kind"] == "RayService"
    assert rayservice["metadata"]["name"]
    spec = rayservice["spec"]
    assert isinstance(spec["serveConfigV2"], str)  # KubeRay takes the Serve config as a YAML string
    cluster = spec["rayClusterConfig"]
    import ray

    assert cluster["rayVersion"] == ray.__version__
    head = cluster["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    assert all(isinstance(v, str) for v in head["rayStartParams"].values()), "rayStartParams values are strings"
    _check_pod(head["template"])
    assert any(p["containerPort"] == 8000 for p in head["template"]["spec"]["containers"][0]["ports"])
    for group in cluster["workerGroupSpecs"]:
        assert group["groupName"] and isinstance(group["rayStartParams"], dict)
        assert all(isinstance(v, str) for v in group["rayStartParams"].values())
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        _check_pod(group["template"])


def _check_pod(template: dict[str, Any]) -> None:
    spec = template["spec"]
    assert spec["securityContext"]["runAsNonRoot"] is True  # the image's USER is numeric
    volumes = {v["name"]: v for v in spec["volumes"]}
    for container in spec["containers"]:
        assert container["name"] and container["image"]
        assert container["resources"]["limits"]["memory"] == container["resources"]["requests"]["memory"]
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        # Ray's object store needs a /dev/shm larger than a container's default 64 MiB.
        assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"


def test_the_rayservice_serve_config_is_generated_from_its_env_vars(rayservice: dict[str, Any]) -> None:
    serve_config = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    env_vars = serve_config["applications"][0]["runtime_env"]["env_vars"]
    assert "MODEL_ID" not in env_vars  # the image's embedded model, at its path inside the image
    assert serve_config == build_serve_config(env_vars), "serveConfigV2 is not what deploy.build_config generates"


def test_the_rayservice_pods_fit_the_replicas_and_autoscaling(rayservice: dict[str, Any]) -> None:
    cluster = rayservice["spec"]["rayClusterConfig"]
    generator = _deployments(yaml.safe_load(rayservice["spec"]["serveConfigV2"]))["pydoc-gpt-mini"]
    cpus, gpus = generator["ray_actor_options"]["num_cpus"], generator["ray_actor_options"]["num_gpus"]
    autoscaling = generator["autoscaling_config"]

    # Model replicas never land on the head: it offers Ray no CPU; the Gateway needs none.
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    assert _deployments(yaml.safe_load(rayservice["spec"]["serveConfigV2"]))["Gateway"]["ray_actor_options"] == {
        "num_cpus": 0.0
    }
    (group,) = cluster["workerGroupSpecs"]
    pod_cpus = float(group["rayStartParams"]["num-cpus"])
    pod_gpus = float(group["rayStartParams"].get("num-gpus", "0"))
    per_pod = math.floor(pod_cpus / cpus) if not gpus else min(math.floor(pod_cpus / cpus), math.floor(pod_gpus / gpus))
    assert per_pod >= 1, "a worker pod cannot hold one model replica"
    assert group["maxReplicas"] * per_pod >= autoscaling["max_replicas"], "too few pods for MAX_REPLICAS"
    assert group["minReplicas"] == math.ceil(autoscaling["min_replicas"] / per_pod), "idle pods beyond MIN_REPLICAS"
    container = group["template"]["spec"]["containers"][0]
    assert _cpu(container["resources"]["requests"]["cpu"]) >= pod_cpus  # Ray's CPUs are backed by the pod's
    assert int(container["resources"].get("limits", {}).get("nvidia.com/gpu", 0)) == pod_gpus
    # The Ray autoscaler adds and removes worker pods as Serve adds and removes replicas.
    assert cluster["enableInTreeAutoscaling"] is True


def _cpu(quantity: str) -> float:
    return float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def test_the_docs_show_how_to_generate_deploy_and_run_on_kuberay(rayservice: dict[str, Any]) -> None:
    document, text = section("Cluster deployment")
    commands = code_lines(text)
    for command in (
        "python -m deploy.build_config -o deploy/serve_config.yaml",
        "serve deploy deploy/serve_config.yaml",
        "kubectl apply -f deploy/kuberay/rayservice.yaml",
    ):
        assert any(line.startswith(command) for line in commands), f"{document.name} does not show `{command}`"
    service = f"{rayservice['metadata']['name']}-serve-svc"  # the Service KubeRay creates for Serve
    assert f"kubectl port-forward svc/{service} 8000:8000" in commands
