"""The service's metrics at the local Ray node's Prometheus endpoint, after traffic and a cold start.

The endpoint is the one every Ray node runs (its port is in the node's info); the text is parsed with
prometheus_client's parser. Counts are compared with what the test sent and what the answers said.
Also: the request id a client sends reaches the access line and the model replica's log.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import ray
from prometheus_client.parser import text_string_to_metric_families

from observability import metrics
from testing.polling import wait_for
from testing.serve import local_serve
from tests.integration.conftest import Service, deploy

MODEL = "tiny"
Samples = list[tuple[str, dict[str, str], float]]


@pytest.fixture(scope="module")
def port() -> Iterator[int]:
    with local_serve(num_cpus=2, metrics_report_interval_ms=500) as port:
        yield port


@pytest.fixture(scope="module")
def service(port: int, tiny_causal: Path) -> Service:
    return deploy(
        port,
        {
            "MODEL_ID": str(tiny_causal),
            "SERVED_MODEL_NAME": MODEL,
            "MIN_REPLICAS": "0",
            "MAX_REPLICAS": "1",
            "MAX_NEW_TOKENS": "6",
            "CHAT_TEMPLATE": "{% for m in messages %}{{ m['content'] }}\n{% endfor %}",
            # No warm pool: the wake-up is a full cold start, in a process of its own. With one, the replica
            # lands in a warm worker whenever the worker's imports end before the first request arrives
            # (which comes first depends on how busy the machine is), and a warm worker has no process
            # start to observe: the test would depend on which of the two came first.
            "WARM_WORKERS": "0",
        },
    )


def metrics_url() -> str:
    (node,) = [n for n in ray.nodes() if n["Alive"]]
    return f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"


def scrape() -> Samples:
    text = httpx.get(metrics_url(), timeout=10).text
    return [(s.name, s.labels, s.value) for family in text_string_to_metric_families(text) for s in family.samples]


def total(samples: Samples, name: str, **labels: str) -> float:
    return sum(value for sample, have, value in samples if sample == name and labels.items() <= have.items())


def series(samples: Samples, name: str) -> list[dict[str, str]]:
    return [labels for sample, labels, _ in samples if sample == name]


@pytest.fixture(scope="module")
def traffic(service: Service) -> dict:
    """A cold start, then streamed and whole answers on every route, and refusals."""
    sent: dict = {"usage": [], "streamed": {"/v1/completions": 0, "/v1/chat/completions": 0}, "unary": {}}
    url = service.url

    def stream(route: str, body: dict) -> None:
        body = {**body, "model": MODEL, "stream": True, "stream_options": {"include_usage": True}}
        with httpx.stream("POST", f"{url}{route}", json=body, timeout=180) as response:
            assert response.status_code == 200
            events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
        sent["usage"].append(events[-1]["usage"])
        sent["streamed"][route] += 1

    def unary(route: str, body: dict) -> None:
        response = httpx.post(f"{url}{route}", json=body, timeout=180)
        assert response.status_code == 200, response.text
        sent["usage"].append(response.json()["usage"])
        sent["unary"][route] = sent["unary"].get(route, 0) + 1

    stream("/v1/completions", {"prompt": "Return the"})  # wakes the model from zero
    for prompt in ("Raise", "The socket module", "Write"):
        unary("/generate", {"prompt": prompt, "generation_kwargs": {"temperature": 0}})
    unary("/v1/completions", {"model": MODEL, "prompt": ["a", "b"], "max_tokens": 4})
    stream("/v1/chat/completions", {"messages": [{"role": "user", "content": "hello"}]})
    stream("/v1/completions", {"prompt": "Return the", "n": 2})
    assert httpx.post(f"{url}/v1/completions", json={"model": "nope", "prompt": "a"}).status_code == 404
    assert httpx.post(f"{url}/generate", json={"prompt": 7}).status_code == 422
    sent["rows"] = 1 + 3 + 2 + 1 + 2
    return sent


EXPECTED = {"/generate": 3, "/v1/completions": 3, "/v1/chat/completions": 1}  # 200s per route


@pytest.fixture(scope="module")
def samples(traffic: dict) -> Samples:
    """A scrape once every count the tests read has reached the endpoint.

    Each process reports on its own clock (every 0.5 s; the replica samples its batcher every second),
    and a busy machine delays some more than others: a scrape taken when the Gateway's counts are in may
    still lack the replica's. After the wait, a count still off is left to the tests, which name it.
    """
    usage = traffic["usage"]
    generated = sum(u["completion_tokens"] for u in usage)
    wanted = [
        *((metrics.REQUESTS.exported, {"route": r, "model": MODEL, "status": "200"}, n) for r, n in EXPECTED.items()),
        *((f"{metrics.E2E_LATENCY.exported}_count", {"route": r, "model": MODEL}, n) for r, n in EXPECTED.items()),
        *((f"{metrics.TTFT.exported}_count", {"route": r, "model": MODEL}, n) for r, n in traffic["streamed"].items()),
        (metrics.REQUESTS.exported, {"model": metrics.NO_MODEL, "status": "404"}, 1),
        (metrics.REQUESTS.exported, {"model": metrics.NO_MODEL, "status": "422"}, 1),
        (metrics.WAKES.exported, {"model": MODEL, "cause": "request"}, 1),
        *((f"{metric.exported}_count", {"model": MODEL}, 1) for metric in metrics.COLD_START.values()),
        (metrics.GENERATION_TOKENS.exported, {"model": MODEL}, generated),
        (metrics.PROMPT_TOKENS.exported, {"model": MODEL}, sum(u["prompt_tokens"] for u in usage)),
        (f"{metrics.QUEUE_TIME.exported}_count", {"model": MODEL}, len(usage)),
        (f"{metrics.ENGINE_TTFT.exported}_count", {"model": MODEL}, len(usage)),
        (f"{metrics.ENGINE_ITL.exported}_count", {"model": MODEL}, generated - traffic["rows"]),
        (metrics.ROWS_FINISHED.exported, {"model": MODEL}, traffic["rows"]),
        (metrics.RUNNING.exported, {"model": MODEL}, 0),
    ]

    def settled() -> Samples | None:
        s = scrape()
        done = series(s, metrics.RUNNING.exported) and all(total(s, n, **labels) == v for n, labels, v in wanted)
        return s if done else None

    try:
        return wait_for(settled, timeout=60, interval=0.5, what="the traffic's counts at the metrics endpoint")
    except AssertionError:
        return scrape()


def test_request_counters_and_latency_by_route_model_and_status(samples: Samples) -> None:
    requests = metrics.REQUESTS.exported
    for route, count in EXPECTED.items():
        assert total(samples, requests, route=route, model=MODEL, status="200") == count, route
        assert total(samples, f"{metrics.E2E_LATENCY.exported}_count", route=route, model=MODEL) == count
    assert total(samples, requests, route="/v1/completions", model=metrics.NO_MODEL, status="404") == 1
    assert total(samples, requests, route="/generate", model=metrics.NO_MODEL, status="422") == 1
    for labels in series(samples, requests):  # recorded by the Gateway, with Serve's labels added
        assert labels["application"] == "llm" and labels["deployment"] == "Gateway" and labels["replica"]
    assert any(name.startswith("ray_serve_") for name, _, _ in samples), "Serve's own series are beside ours"


def test_time_to_first_token_counts_the_streamed_requests(traffic: dict, samples: Samples) -> None:
    for route, count in traffic["streamed"].items():
        assert total(samples, f"{metrics.TTFT.exported}_count", route=route, model=MODEL) == count
    buckets = series(samples, f"{metrics.TTFT.exported}_bucket")
    assert {b["le"] for b in buckets} == {str(b) for b in metrics.TTFT_BUCKETS} | {"+Inf"}
    tokens = sum(u["completion_tokens"] for u in traffic["usage"][:1] + traffic["usage"][-2:])
    assert 0 < total(samples, f"{metrics.ITL.exported}_count", model=MODEL) <= tokens


def test_the_cold_start_is_one_observation_per_phase_and_one_wake(samples: Samples) -> None:
    for phase, metric in metrics.COLD_START.items():
        assert total(samples, f"{metric.exported}_count", model=MODEL) == 1, phase
        found = [(labels, value) for name, labels, value in samples if name == f"{metric.exported}_count"]
        assert len(found) == 1, found
        assert found[0][0]["deployment"] == MODEL  # recorded in the model replica
    assert total(samples, metrics.WAKES.exported, model=MODEL, cause="request") == 1


def test_the_replica_counts_what_the_answers_say(traffic: dict, samples: Samples) -> None:
    served = len(traffic["usage"])
    prompt = sum(u["prompt_tokens"] for u in traffic["usage"])
    generated = sum(u["completion_tokens"] for u in traffic["usage"])
    assert total(samples, metrics.GENERATION_TOKENS.exported, model=MODEL) == generated
    assert total(samples, metrics.PROMPT_TOKENS.exported, model=MODEL) == prompt
    assert total(samples, f"{metrics.QUEUE_TIME.exported}_count", model=MODEL) == served
    # The engine's own timings cover every request, whole answers (/generate, unary completions) included.
    assert total(samples, f"{metrics.ENGINE_TTFT.exported}_count", model=MODEL) == served
    assert total(samples, f"{metrics.ENGINE_ITL.exported}_count", model=MODEL) == generated - traffic["rows"]
    assert total(samples, f"{metrics.REQUEST_GENERATION_TOKENS.exported}_sum", model=MODEL) > 0
    assert total(samples, metrics.ROWS_FINISHED.exported, model=MODEL) == traffic["rows"]
    assert total(samples, metrics.ROWS_FINISHED.exported, model=MODEL, finished_reason="abort") == 0
    running = series(samples, metrics.RUNNING.exported)
    assert running and all(labels["model"] == MODEL for labels in running)
    assert total(samples, metrics.RUNNING.exported, model=MODEL) == 0  # nothing in flight now
    assert total(samples, metrics.WAITING.exported, model=MODEL) == 0


def test_a_request_id_reaches_the_access_line_and_the_model_replica(service: Service, traffic: dict) -> None:
    request_id = f"trace-{time.time_ns()}"
    response = httpx.post(f"{service.url}/generate", json={"prompt": "Raise"}, headers={"X-Request-Id": request_id})
    assert response.status_code == 200 and response.headers["x-request-id"] == request_id
    logs = Path(ray._private.worker._global_node.get_logs_dir_path()) / "serve"

    def lines(deployment: str) -> list[str]:
        return [
            line
            for path in logs.glob(f"replica_*_{deployment}_*.log")
            for line in path.read_text(errors="replace").splitlines()
            if request_id in line
        ]

    access = wait_for(lambda: [x for x in lines("Gateway") if "access route=/generate" in x], timeout=30,
                      what="the access line")  # fmt: skip
    (line,) = access
    assert f"model={MODEL} status=200 stream=false" in line and f"request_id={request_id}" in line
    assert wait_for(lambda: lines(MODEL), timeout=30, what="the model replica's lines for the request")
