"""Real Ray Serve on the local machine: a Ray instance and Serve proxy per test module."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from ray import serve

from ray_serve_app import build_graph
from settings import Settings, build_settings
from testing import serve as local
from testing.http import ok
from testing.polling import wait_for

APP = "llm"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if Path(str(item.fspath)).is_relative_to(Path(__file__).parent):
            item.add_marker(pytest.mark.integration)


def replica_states(model: str | None = None) -> dict[str, int]:
    """Replica count per state of a model's deployment ({} at zero; default: the one model served)."""
    name = model or model_deployment()
    return local.replica_states(name, name)


def model_deployment() -> str:
    """The one model's Serve application, which is also its deployment's name (the pool names both)."""
    names = [name for name in serve.status().applications if name != APP]
    assert len(names) == 1, f"expected one model application beside {APP}, found {names}"
    return names[0]


def running_replicas(model: str | None = None) -> int:
    return replica_states(model).get("RUNNING", 0)


@dataclass
class Service:
    url: str
    settings: Settings
    client: httpx.Client

    def generate(self, body: dict, timeout: float = 120) -> httpx.Response:
        return self.client.post(f"{self.url}/generate", json=body, timeout=timeout)

    def health(self) -> dict:
        return self.client.get(f"{self.url}/healthz", timeout=10).json()

    def model_status(self) -> dict:
        """The one model's entry in /healthz (state, replicas, last_cold_start...)."""
        (model,) = self.health()["models"]
        return model


@pytest.fixture(scope="module")
def serve_port() -> Iterator[int]:
    """A fresh local Ray instance with Serve listening on a free port, torn down after the module."""
    with local.local_serve(num_cpus=2) as port:
        yield port


def deploy(port: int, env: dict[str, str]) -> Service:
    # No packed-layer cache unless a test names one: a wake's report must not depend on which test loaded the
    # same checkpoint before (and nothing is written under the home directory).
    settings = build_settings({"PACKED_CACHE_DIR": "", **env})
    serve.run(build_graph(settings), name=APP, route_prefix="/", blocking=False)
    client = httpx.Client()
    url = f"http://127.0.0.1:{port}"
    wait_for(lambda: ok(f"{url}/healthz", client=client), timeout=60, what="the Gateway to answer")
    return Service(url=url, settings=settings, client=client)
