"""Two Ray nodes on this machine (``ray.cluster_utils.Cluster``): model replicas on the second node
run with the settings of the graph, not with that node's environment, and answer correctly."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import ray
from ray import serve
from ray.cluster_utils import Cluster

from engine.model import EngineConfig, TextGenerator
from engine.types import SamplingParams
from ray_serve_app import build_graph
from settings import build_settings
from testing.http import status
from testing.polling import wait_for
from testing.serve import serve_url, two_node_serve
from tests.integration.conftest import APP, replica_states

MODEL = "tiny"
SETTINGS = {
    "SERVED_MODEL_NAME": MODEL,
    "MAX_REPLICAS": "2",
    "MAX_NEW_TOKENS": "6",
    "TEMPERATURE": "0",
    "MAX_PROMPT_TOKENS": "12",
}
# The second node's own environment disagrees with the graph's settings; replicas must ignore it.
NODE_ENV = {"MODEL_ID": "/nonexistent/model", "MAX_NEW_TOKENS": "50", "MAX_PROMPT_TOKENS": "1000"}


@pytest.fixture(scope="module")
def two_nodes() -> Iterator[tuple[Cluster, str]]:
    """A head with no CPU for replicas (Gateway and Serve's actors need none) and a 2-CPU worker node."""
    with two_node_serve(worker_cpus=2, worker_env=NODE_ENV) as (cluster, worker):
        yield cluster, worker


def test_replicas_on_the_second_node_use_the_graph_settings(two_nodes, tiny_causal: Path) -> None:
    _, worker_node = two_nodes
    settings = build_settings({**SETTINGS, "MODEL_ID": str(tiny_causal)})
    serve.run(build_graph(settings), name=APP, route_prefix="/", blocking=False)
    url = serve_url()
    wait_for(lambda: status(f"{url}/healthz") == 200, timeout=60, what="the Gateway")

    prompts = ["Return the number", "The socket module provides", "Raise"]
    with httpx.Client(timeout=120) as client:
        response = client.post(f"{url}/generate", json={"prompts": prompts})
        assert response.status_code == 200, response.text
        too_long = client.post(f"{url}/generate", json={"prompt": "Return the number " * 10})

    assert replica_states().get("RUNNING", 0) >= 1
    nodes = _model_server_nodes()
    assert nodes and nodes <= {worker_node}, f"ModelServer replicas on {nodes}, expected only {worker_node}"

    body = response.json()
    assert body["model"] == MODEL
    assert body["generation_kwargs"]["max_new_tokens"] == 6
    # Greedy decoding: the same completions as the engine gives in this process with the same settings.
    engine = TextGenerator.load(EngineConfig(model_id=str(tiny_causal), device="cpu", dtype="auto", num_threads=1))
    params = SamplingParams(max_new_tokens=6, temperature=0.0, top_p=settings.top_p)
    expected = engine.generate(engine.encode(prompts, params), params)
    assert body["completions"] == [c.text for c in expected]
    # MAX_PROMPT_TOKENS is checked inside the replica: 12 from the graph, not 1000 from the node.
    assert too_long.status_code == 413, too_long.text
    assert "at most 12 (MAX_PROMPT_TOKENS)" in too_long.json()["error"]["message"]


def _model_server_nodes() -> set[str]:
    # The GCS actor table needs no dashboard (the state API would).
    actors = ray._private.state.actors()
    return {
        a["Address"]["NodeID"]
        for a in actors.values()
        if a["State"] == "ALIVE" and a["ActorClassName"].endswith(f"{MODEL}:{MODEL}")  # the model's own app
    }
