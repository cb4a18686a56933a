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
from tests.integration.conftest import APP, free_port, replica_states, wait_for

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
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 0,
            "include_dashboard": False,
            "dashboard_agent_listen_port": free_port(),
        },
    )
    worker = cluster.add_node(num_cpus=2, env_vars=NODE_ENV)
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        wait_for(lambda: len([n for n in ray.nodes() if n["Alive"]]) == 2, timeout=60, what="two live nodes")
        # HeadOnly: both nodes share this machine's ports, so only one HTTP proxy can listen.
        serve.start(http_options={"host": "127.0.0.1", "port": free_port()}, proxy_location="HeadOnly")
        yield cluster, worker.node_id
    finally:
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()


def test_replicas_on_the_second_node_use_the_graph_settings(two_nodes, tiny_causal: Path) -> None:
    _, worker_node = two_nodes
    settings = build_settings({**SETTINGS, "MODEL_ID": str(tiny_causal)})
    serve.run(build_graph(settings), name=APP, route_prefix="/", blocking=False)
    url = f"http://127.0.0.1:{serve.context._get_global_client().http_config.port}"
    wait_for(lambda: _status(f"{url}/healthz") == 200, timeout=60, what="the Gateway")

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


def _status(url: str) -> int | None:
    try:
        return httpx.get(url, timeout=5).status_code
    except httpx.HTTPError:
        return None
