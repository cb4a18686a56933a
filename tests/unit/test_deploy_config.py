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
from settings import ADMIN_HEADROOM, REPO_ROOT, SettingsError, build_settings
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

    # The application holds the Gateway and the pool controller; the pool deploys the model from the
    # carried settings, so the model's options are what those variables give on the cluster.
    deployments = _deployments(config)
    assert set(deployments) == {"Gateway", "PoolController"}
    (model,) = build_settings(application["runtime_env"]["env_vars"]).model_configs
    options = model.deployment_options("DEBUG")
    caches = {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "32", "LRU_CACHE_CAPACITY": "32"}  # kernel_cache_capacity
    assert options["ray_actor_options"] == {"num_cpus": 2.0, "num_gpus": 0.5, "runtime_env": {"env_vars": caches}}
    assert options["max_ongoing_requests"] == 8 and options["max_queued_requests"] == 20
    autoscaling = options["autoscaling_config"]
    assert (autoscaling["min_replicas"], autoscaling["initial_replicas"], autoscaling["max_replicas"]) == (1, 1, 4)
    assert autoscaling["target_ongoing_requests"] == 4.0
    # IDLE_TIMEOUT_S less the look-back window (5 s) and the metrics push period (1 s)
    assert autoscaling["downscale_to_zero_delay_s"] == 114.0
    gateway, pool = deployments["Gateway"], deployments["PoolController"]
    assert gateway["logging_config"]["log_level"] == "DEBUG"
    assert gateway["num_replicas"] == 1 and gateway["ray_actor_options"] == {"num_cpus": 0.0}
    assert pool["num_replicas"] == 1 and pool["ray_actor_options"] == {"num_cpus": 0.0}
    # all the model can hold or queue, plus room for admin-loaded models and requests waiting for room, and
    # for the refusals held back (AUTH_FAILURE_MAX_HELD, 256 by default)
    assert gateway["max_ongoing_requests"] == 4 * 8 + 20 + ADMIN_HEADROOM + 256
    assert config["http_options"] == {"host": "0.0.0.0", "port": 8000}


def test_a_models_file_travels_inline(tmp_path: Path, tiny_causal: Path) -> None:
    template = tmp_path / "chat.jinja"
    template.write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    path = tmp_path / "models.yaml"
    path.write_text(
        f"models:\n  - {{name: a, model_id: org/a, priority: 2}}\n"
        f"  - {{name: b, model_id: org/b, max_replicas: 3, chat_template: {template}}}\n"
    )
    env_vars = build_serve_config({"MODELS_FILE": str(path), "MAX_REPLICAS": "1"})["applications"][0]["runtime_env"][
        "env_vars"
    ]
    assert "MODELS_FILE" not in env_vars and str(tmp_path) not in env_vars["MODELS"]
    a, b = build_settings(env_vars).model_configs
    assert (a.name, a.priority, a.max_replicas, b.name, b.max_replicas) == ("a", 2, 1, "b", 3)
    assert b.chat_template == template.read_text()


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
    serve_config = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    models = build_settings(serve_config["applications"][0]["runtime_env"]["env_vars"]).model_configs
    assert len(models) >= 2, "the manifest shows a pool of models"

    # Model replicas never land on the head: it offers Ray no CPU; the Gateway and the pool need none.
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    for name in ("Gateway", "PoolController"):
        assert _deployments(serve_config)[name]["ray_actor_options"]["num_cpus"] == 0.0
    (group,) = cluster["workerGroupSpecs"]
    pod_cpus = float(group["rayStartParams"]["num-cpus"])
    pod_gpus = float(group["rayStartParams"].get("num-gpus", "0"))
    assert all(m.num_gpus_per_replica <= pod_gpus for m in models), "a GPU model needs a GPU group"
    assert all(m.num_cpus_per_replica <= pod_cpus for m in models), "a worker pod cannot hold a model's replica"
    # Every model at its max_replicas at once fits the group at its maxReplicas.
    needed = sum(m.max_replicas * m.num_cpus_per_replica for m in models)
    assert group["maxReplicas"] * pod_cpus >= needed, "too few pods for the models' max_replicas"
    floor = sum(m.min_replicas * m.num_cpus_per_replica for m in models)
    assert group["minReplicas"] == math.ceil(floor / pod_cpus), "idle pods beyond the models' min_replicas"
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
