"""Admin state survives a head restart when the GCS keeps its tables in an external Redis.

As on KubeRay with GCS fault tolerance (deploy/kuberay/rayservice.yaml): Debian's `redis-server`,
started here, holds the GCS's tables; `ray start --head` runs against it (RAY_REDIS_ADDRESS and
--redis-password, as Ray documents for `ray start`); the service is deployed with `serve deploy`,
a model is loaded and changed through /admin, and then every process of the head is killed
(SIGKILL, as when a head pod dies) and a new head started on the same Redis. The model must be
served again, with the configuration and priority it was given, without anyone loading it again.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import httpx
import pytest

from settings import REPO_ROOT
from testing.http import free_port
from testing.polling import wait_for
from tests.raycluster import SERVE, RayHead, clean_env, run_cli
from tests.redisserver import RedisServer

logger = logging.getLogger(__name__)

API_KEY = "sk-durable-user-0123456789"
ADMIN_KEY = "adm-durable-admin-0123456789"
ENTRY = {
    "name": "durable",
    "priority": 3,
    "max_replicas": 1,
    "idle_timeout_s": 600,
    "max_new_tokens": 32,
    "max_new_tokens_limit": 48,
}


@pytest.fixture(scope="module")
def redis_available() -> None:
    if shutil.which("redis-server") is None:
        reason = "the durable-state test needs Debian's redis-server (apt-get install redis-server)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason}. CI must run it: .ci/run installs it.", pytrace=False)
        pytest.skip(reason)


def _served(url: str, model: str) -> httpx.Response | None:
    """A completed generation from ``model`` (None while the service is not back yet)."""
    try:
        answer = httpx.post(
            f"{url}/generate",
            json={"model": model, "prompt": "Return the", "generation_kwargs": {"max_new_tokens": 2}},
            headers={"Authorization": f"Bearer {API_KEY}"},
            timeout=60,
        )
    except httpx.HTTPError:
        return None
    return answer if answer.status_code == 200 else None


def _admin_list(url: str) -> list[dict] | None:
    """Every model as /admin lists it (None while the service is not up)."""
    try:
        listed = httpx.get(f"{url}/admin/models", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=10)
    except httpx.HTTPError:
        return None
    return listed.json()["data"] if listed.status_code == 200 else None


def _admin_entry(url: str, model: str) -> dict | None:
    return next((m for m in _admin_list(url) or [] if m["id"] == model), None)


def test_an_admin_loaded_model_is_served_again_after_the_head_restarts(
    redis_available: None, tmp_path: Path, tiny_causal: Path
) -> None:
    http_port, gcs_port, dashboard_port = free_port(), free_port(), free_port()
    url = f"http://127.0.0.1:{http_port}"
    config = tmp_path / "serve_config.yaml"
    exported = {"MODEL_ID": str(tiny_causal), "HOST": "127.0.0.1", "PORT": str(http_port), "IDLE_TIMEOUT_S": "600"}
    run_cli([sys.executable, "-m", "deploy.build_config", "-o", str(config)], {**clean_env(), **exported})
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}

    with RedisServer(free_port(), tmp_path) as redis:
        # What KubeRay sets on a head pod with gcsFaultToleranceOptions (and what the Secret gives it).
        node_env = {
            "PYTHONPATH": str(REPO_ROOT),
            "API_KEY": API_KEY,
            "ADMIN_API_KEY": ADMIN_KEY,
            "RAY_REDIS_ADDRESS": redis.address,
            "RAY_external_storage_namespace": f"durable-{gcs_port}",
        }
        head_args = (f"--redis-password={redis.password}",)

        def head(token: str | None = None) -> RayHead:
            return RayHead(gcs_port, dashboard_port=dashboard_port, env=node_env, extra_args=head_args,
                           auth_token=token)  # fmt: skip

        first = head()
        with first:
            run_cli([SERVE, "deploy", str(config), "--address", first.dashboard_url], first.client_env())
            wait_for(lambda: _admin_list(url), 180, what="the deployed service")
            loaded = httpx.post(f"{url}/admin/models", json={**ENTRY, "model_id": str(tiny_causal)}, headers=admin,
                                timeout=60)  # fmt: skip
            assert loaded.status_code == 201, loaded.text
            changed = httpx.patch(f"{url}/admin/models/durable", json={"priority": 4}, headers=admin, timeout=60)
            assert changed.status_code == 200 and changed.json()["priority"] == 4, changed.text
            assert wait_for(lambda: _served(url, "durable"), 180, what="the admin-loaded model's first answer")
            before = _admin_entry(url, "durable")
            assert before is not None
            killed = time.monotonic()
        # Every process of that head is gone (the `with` killed them all); Redis still runs.
        assert redis.ping()

        with head(first.auth["RAY_AUTH_TOKEN"]):
            head_up = time.monotonic()
            after = wait_for(lambda: _admin_entry(url, "durable"), 300, what="the model listed after the restart")
            listed = time.monotonic()
            answer = wait_for(lambda: _served(url, "durable"), 300, what="the model's answer after the restart")
            served = time.monotonic()
            assert answer.json()["model"] == "durable"
            assert after["priority"] == 4 and after["source"] == "admin"
            assert after["config"] == before["config"]
            assert after["config"]["max_new_tokens_limit"] == 48 and after["config"]["idle_timeout_s"] == 600
            # The restored model is still the pool's: /admin changes it and unloads it.
            unloaded = httpx.delete(f"{url}/admin/models/durable", params={"wait_s": 60}, headers=admin, timeout=90)
            assert unloaded.status_code == 200 and unloaded.json()["unloaded"] is True, unloaded.text

    timings = {
        "head_started_s": round(head_up - killed, 2),
        "model_listed_s": round(listed - killed, 2),
        "model_served_s": round(served - killed, 2),
    }
    logger.warning("head restart over Redis, seconds after the kill: %s", json.dumps(timings))
