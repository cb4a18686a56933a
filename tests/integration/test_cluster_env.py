"""Settings exported *after* `ray start` still reach the replicas: they travel with the graph."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from testing.http import free_port, get_json
from testing.polling import wait_for
from tests.raycluster import SERVE, RayHead, run_cli


@pytest.fixture
def ray_head() -> Iterator[RayHead]:
    """`ray start --head` with none of our variables set, stopped after the test."""
    with RayHead(free_port()) as head:
        yield head


def test_settings_exported_after_ray_start_take_effect(ray_head: RayHead, tiny_causal: Path) -> None:
    http_port = free_port()
    run_cli([SERVE, "start", "--http-port", str(http_port)], ray_head.client_env())
    exported = ray_head.client_env(MODEL_ID=str(tiny_causal), MAX_NEW_TOKENS="5", TEMPERATURE="0", TOP_K="7")
    run_cli([SERVE, "run", "--non-blocking", "ray_serve_app:deployment_graph"], exported)

    url = f"http://127.0.0.1:{http_port}"
    health = wait_for(lambda: get_json(f"{url}/healthz"), timeout=60, what="the Gateway")
    assert [m["root"] for m in health["models"]] == [str(tiny_causal)]
    response = httpx.post(f"{url}/generate", json={"prompt": "Return the"}, timeout=120)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == tiny_causal.name
    assert body["generation_kwargs"]["max_new_tokens"] == 5
    assert body["generation_kwargs"]["temperature"] == 0.0 and body["generation_kwargs"]["top_k"] == 7
    assert body["usage"]["completion_tokens"] <= 5
