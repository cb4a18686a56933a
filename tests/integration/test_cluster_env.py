"""Settings exported *after* `ray start` still reach the replicas: they travel with the graph."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from settings import REPO_ROOT, Settings
from tests.integration.conftest import free_port, wait_for

RAY = str(Path(sys.executable).with_name("ray"))
SERVE = str(Path(sys.executable).with_name("serve"))


def clean_env() -> dict[str, str]:
    """The environment without any of the service's variables, as a cluster started earlier has."""
    ours = {name.upper() for name in Settings.model_fields} | {"RAY_SERVE_AUTOSCALER_IDLE_TIMEOUT_S"}
    return {k: v for k, v in os.environ.items() if k.upper() not in ours and not k.startswith("RAY_")}


def run(cmd: list[str], env: dict[str, str], timeout: float = 180) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture
def ray_cluster() -> Iterator[str]:
    """`ray start --head` with none of our variables set; stopped after the test."""
    env = clean_env()
    port = free_port()
    started = run(
        [
            RAY,
            "start",
            "--head",
            f"--port={port}",
            "--num-cpus=2",
            "--include-dashboard=false",
            "--disable-usage-stats",
        ],
        env,
    )
    assert "Ray runtime started" in started.stdout + started.stderr
    try:
        # "auto" (what `serve run` uses by default) joins the cluster `ray start` just made, with its
        # auth token, and fails rather than starting a fresh instance if there is none.
        yield "auto"
    finally:
        subprocess.run([RAY, "stop", "--force"], env=env, capture_output=True, timeout=120)


def test_settings_exported_after_ray_start_take_effect(ray_cluster: str, tiny_causal: Path) -> None:
    http_port = free_port()
    env = clean_env()
    run([SERVE, "start", "-a", ray_cluster, "--http-port", str(http_port)], env)
    exported = {**env, "MODEL_ID": str(tiny_causal), "MAX_NEW_TOKENS": "5", "TEMPERATURE": "0", "TOP_K": "7"}
    run([SERVE, "run", "-a", ray_cluster, "--non-blocking", "ray_serve_app:deployment_graph"], exported)

    url = f"http://127.0.0.1:{http_port}"
    health = wait_for(lambda: _json(f"{url}/healthz"), timeout=60, what="the Gateway")
    assert health["model"] == str(tiny_causal)
    response = httpx.post(f"{url}/generate", json={"prompt": "Return the"}, timeout=120)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == str(tiny_causal)
    assert body["generation_kwargs"]["max_new_tokens"] == 5
    assert body["generation_kwargs"]["temperature"] == 0.0 and body["generation_kwargs"]["top_k"] == 7
    assert body["usage"]["completion_tokens"] <= 5


def _json(url: str) -> dict | None:
    try:
        response = httpx.get(url, timeout=5)
    except httpx.HTTPError:
        return None
    return response.json() if response.status_code == 200 else None
