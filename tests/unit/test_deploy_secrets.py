"""API keys never land in a generated file: the Serve config, `serve build`'s output, the KubeRay manifest.

The keys reach a cluster through its nodes' environment (a Kubernetes Secret on KubeRay);
tests/integration/test_deploy_keys.py deploys a generated config onto a cluster that has them.
"""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest
import yaml

from settings import REPO_ROOT
from tests.raycluster import SERVE, clean_env

RAYSERVICE = REPO_ROOT / "deploy" / "kuberay" / "rayservice.yaml"
KEYS = ["sk-live-first-0123456789", "sk-live-second-abcdefgh"]
ADMIN_KEY = "adm-live-9876543210"
FILE_KEY = "sk-from-file-5555aaaa"
SECRETS = [*KEYS, ADMIN_KEY, FILE_KEY]


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Every file generated with keys in the environment (and what the tools printed), by name."""
    tmp = tmp_path_factory.mktemp("generated")
    keys_file = tmp / "api-keys"
    keys_file.write_text(f"# keys\n{FILE_KEY}\n")
    env = {
        **clean_env(),
        "PYTHONPATH": str(REPO_ROOT),
        "API_KEY": ",".join(KEYS),
        "ADMIN_API_KEY": ADMIN_KEY,
        "API_KEYS_FILE": str(keys_file),
        "MAX_REPLICAS": "3",
    }
    out: dict[str, str] = {}
    written = tmp / "serve_config.yaml"
    to_file = _run([sys.executable, "-m", "deploy.build_config", "-o", str(written)], env)
    out["build_config -o"] = written.read_text()
    out["build_config -o (printed)"] = to_file.stdout + to_file.stderr
    to_stdout = _run([sys.executable, "-m", "deploy.build_config"], env)
    out["build_config (stdout)"] = to_stdout.stdout
    out["build_config (stderr)"] = to_stdout.stderr
    built = tmp / "serve_build.yaml"
    serve_build = _run([SERVE, "build", "ray_serve_app:deployment_graph", "-o", str(built)], env)
    out["serve build"] = built.read_text()
    out["serve build (printed)"] = serve_build.stdout + serve_build.stderr
    # The manifest as the README says to make it: the generated config pasted under serveConfigV2.
    manifest = yaml.safe_load(RAYSERVICE.read_text())
    manifest["spec"]["serveConfigV2"] = to_stdout.stdout
    out["rayservice.yaml"] = yaml.safe_dump(manifest)
    return out


def _run(cmd: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result


def test_no_generated_file_or_tool_output_holds_a_key(generated: dict[str, str]) -> None:
    assert len(generated) == 7
    for name, text in generated.items():
        leaked = [secret for secret in SECRETS if secret in text]
        assert not leaked, f"{name} shows API keys"


def test_the_config_still_carries_the_other_settings_and_says_where_keys_go(generated: dict[str, str]) -> None:
    config = yaml.safe_load(generated["build_config -o"])
    env_vars = config["applications"][0]["runtime_env"]["env_vars"]
    assert env_vars["MAX_REPLICAS"] == "3"
    assert "API_KEY" not in env_vars and "ADMIN_API_KEY" not in env_vars
    assert env_vars["API_KEYS_FILE"].endswith("api-keys")  # a path: the file must exist on the cluster's nodes
    assert "API keys are never written here" in generated["build_config -o"]
    assert "ADMIN_API_KEY and API_KEY left out of the config" in generated["build_config (stderr)"]


def _containers(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    cluster = manifest["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    return [c for group in groups for c in group["template"]["spec"]["containers"]]


def test_the_head_gets_the_keys_from_a_secret_and_none_by_value() -> None:
    manifest = yaml.safe_load(RAYSERVICE.read_text())
    (head,) = manifest["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"]
    env = {entry["name"]: entry for entry in head["env"]}
    for name, key, optional in (("API_KEY", "api-key", False), ("ADMIN_API_KEY", "admin-api-key", True)):
        assert "value" not in env[name], f"{head['name']}: {name} given by value"
        ref = env[name]["valueFrom"]["secretKeyRef"]
        assert (ref["name"], ref["key"], ref.get("optional", False)) == ("llm-serve-keys", key, optional)
    for container in _containers(manifest):  # every pod: no key by value
        assert all("value" not in e for e in container["env"] if e["name"] in ("API_KEY", "ADMIN_API_KEY"))
    serve_config = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    env_vars = serve_config["applications"][0]["runtime_env"]["env_vars"]
    assert not {"API_KEY", "ADMIN_API_KEY"} & set(env_vars)
    assert "kubectl create secret generic llm-serve-keys" in RAYSERVICE.read_text()
