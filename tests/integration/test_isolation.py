"""One shared service on real Ray Serve, and clients that try to hurt each other: a hostile neighbour in the same
batch as greedy requests, a keyless flood of 1 MB bodies, an oversized output, a batch at its token budget, more
requests than a model's bound waiting for a model that has no room (evicted, or starting on a full cluster), and
(on an application of its own) an engine that hangs and is replaced.

The shared model is keep-hot (PRIORITY 2), so that the models the waiting tests load beside it can be evicted and
it never is; the cluster has 2 CPUs, 1 of them the shared model's."""

from __future__ import annotations

import contextlib
import statistics
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import ray
from ray import serve

from engine.errors import StepFailedError
from engine.timing import PhaseTimer
from engine.types import GenerationRequest, SamplingParams, Started
from engine.work import OnStep, Poll, WorkItem
from serving.model_server import ModelServer
from serving.models import ModelStatus
from serving.pool.errors import UnknownModelError
from serving.pool.reporter import CONTROLLER
from settings import ModelConfig, build_settings
from testing.checkpoints import build_tiny_causal
from testing.polling import wait_for
from tests.integration.conftest import Service, deploy, model_deployment
from tests.unit.test_model_server import FakeEngine

KEY = "sk-isolation-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
BATCH_TOKENS = 1000


@pytest.fixture(scope="module")
def service(serve_port: int, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    model = build_tiny_causal(tmp_path_factory.mktemp("tiny-512"), n_positions=512)
    env = {
        "MODEL_ID": str(model), "SERVED_MODEL_NAME": "tiny", "API_KEY": KEY, "MIN_REPLICAS": "1",
        "MAX_REPLICAS": "1", "MAX_BATCH_SIZE": "16", "MAX_NEW_TOKENS": "16", "MAX_BATCH_TOKENS": str(BATCH_TOKENS),
        "BATCH_WAIT_TIMEOUT_S": "0.05", "WARM_WORKERS": "0", "PRIORITY": "2", "EVICTION_GRACE_S": "1",
        "RETRY_AFTER_S": "2",
    }  # fmt: skip
    svc = deploy(serve_port, env)
    wait_for(lambda: svc.model_status()["state"] == "running", timeout=180, what="the model to run")
    # DTYPE=auto on a CPU with native bfloat16: the replica's first answer is float32's, the later ones
    # bfloat16's (engine.cpu). The greedy answers compared below are all made after that first one.
    assert complete(svc, "Hello").status_code == 200
    yield svc
    svc.client.close()


def complete(svc: Service, prompt: str, max_tokens: int = 24, **extra) -> httpx.Response:
    body = {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **extra}
    return svc.client.post(f"{svc.url}/v1/completions", json=body, headers=AUTH, timeout=120)


def text(response: httpx.Response) -> list[str]:
    assert response.status_code == 200, response.text
    return [choice["text"] for choice in response.json()["choices"]]


def model_stats() -> dict:
    name = model_deployment()
    return serve.get_deployment_handle(name, name).stats.remote().result(timeout_s=30)


HOSTILE = {
    "n": 8, "temperature": 1e-30, "top_p": 1e-50, "top_k": 2**31 - 1, "seed": 2**63 - 1, "logprobs": 5,
    "presence_penalty": 2, "frequency_penalty": -2, "stop": ["\ud7ff", "}}}", " "], "max_tokens": 40,
}  # fmt: skip


def test_a_hostile_neighbour_in_the_same_batch_leaves_greedy_answers_as_they_are_alone(service: Service) -> None:
    prompts = ["Return the number of", "The socket module provides"]
    alone = [text(complete(service, p)) for p in prompts]
    before = model_stats()["batches"]
    with ThreadPoolExecutor(6) as pool:
        for _ in range(3):
            hostile = [pool.submit(complete, service, "x" * 50, **HOSTILE) for _ in range(2)]
            greedy = [pool.submit(complete, service, p) for p in prompts]
            assert [text(f.result()) for f in greedy] == alone
            for f in hostile:
                assert len(text(f.result())) == 8
    stats = model_stats()
    # They shared batches: fewer engine calls than the requests sent.
    assert stats["batches"] - before < 3 * 4, stats


def test_an_output_over_the_budget_is_400_naming_it(service: Service) -> None:
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "n": 16, "logprobs": True,
            "top_logprobs": 20, "max_tokens": 480}  # fmt: skip
    response = service.client.post(f"{service.url}/v1/chat/completions", json=body, headers=AUTH, timeout=30)
    assert response.status_code == 400, response.text
    assert "MAX_OUTPUT_TOKENS_PER_REQUEST" in response.json()["error"]["message"]


def test_a_batch_at_its_token_budget_admits_the_row_later(service: Service) -> None:
    prompts = ["Return the", "Raise the", "A Ray"]  # 2 x (prompt + 400) fits 1000 tokens; 3 rows do not
    alone = [text(complete(service, p, max_tokens=400)) for p in prompts]
    waits = model_stats()["budget_waits"]
    with ThreadPoolExecutor(3) as pool:
        together = [text(f.result()) for f in [pool.submit(complete, service, p, max_tokens=400) for p in prompts]]
    assert together == alone
    assert model_stats()["budget_waits"] > waits


def test_a_keyless_flood_of_1mb_bodies_leaves_an_authorised_clients_latency_flat(service: Service) -> None:
    def authorised_latencies(n: int) -> list[float]:
        times = []
        for _ in range(n):
            began = time.monotonic()
            text(complete(service, "Return the", max_tokens=2))
            times.append(time.monotonic() - began)
        return times

    alone = statistics.median(authorised_latencies(8))
    body = b"[" + b",".join([b"[[[[[[[[1]]]]]]]]"] * 58_000) + b"]"  # ~1 MB of small lists: costly to parse
    stop = threading.Event()
    refused: list[int] = []

    def flood() -> None:
        with httpx.Client() as client:
            while not stop.is_set():
                r = client.post(f"{service.url}/v1/chat/completions", content=body,
                                headers={"Content-Type": "application/json"}, timeout=30)  # fmt: skip
                refused.append(r.status_code)

    threads = [threading.Thread(target=flood) for _ in range(6)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: len(refused) >= 6, timeout=30, what="the flood to start")
        during = statistics.median(authorised_latencies(8))
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert set(refused) == {401}
    # Each keyless request costs a header lookup: the authorised client's median stays near its own.
    assert during <= max(3 * alone, alone + 0.5), (alone, during, len(refused))


# --- more waiters than a model's bound, for a model with no room --------------------------------------------

BOUND = 3  # the waiting model's MAX_QUEUED_REQUESTS
EXCESS = 4


@ray.remote(num_cpus=1)
class Squatter:
    """Holds the cluster's free CPU, as another team's job would: a model that starts now finds no room."""

    def ready(self) -> bool:
        return True


def pool_controller():
    return serve.get_deployment_handle(CONTROLLER, "llm")


def pool_status(controller, name: str) -> ModelStatus:
    """The pool controller's own view of ``name`` (what the Gateway decides on)."""
    return next(m for m in controller.snapshot.remote().result(timeout_s=30) if m.name == name)


def state_of(svc: Service, name: str) -> dict:
    """The model's card in /healthz ({} when not listed); with the key, so that it has the replica counts."""
    models = svc.client.get(f"{svc.url}/healthz", headers=AUTH, timeout=10).json()["models"]
    return next((m for m in models if m["id"] == name), {})


def send(svc: Service, model: str) -> tuple[int, dict, dict, float]:
    """One request for ``model`` on its own connection: (status, headers, body, seconds)."""
    began = time.monotonic()
    body = {"model": model, "prompt": "Return the", "max_tokens": 2, "temperature": 0}
    with httpx.Client() as client:
        response = client.post(f"{svc.url}/v1/completions", json=body, headers=AUTH, timeout=300)
    return response.status_code, dict(response.headers), response.json(), time.monotonic() - began


def probe(svc: Service) -> list[float]:
    """Seconds each of /healthz and /v1/models took (both must answer 200)."""
    times = []
    for path in ("/healthz", "/v1/models"):
        began = time.monotonic()
        response = svc.client.get(f"{svc.url}{path}", headers=AUTH, timeout=30)
        times.append(time.monotonic() - began)
        assert response.status_code == 200, response.text
    return times


def refused_at_once_while_the_others_wait(
    svc: Service, model: str, code: str, release, still_waiting=lambda: None
) -> list[tuple]:
    """Send BOUND + EXCESS requests for ``model``, which has no room: EXCESS are refused with 503 + Retry-After
    while the BOUND others still wait (they cannot be answered before ``release`` is called), and probes answer
    meanwhile; ``still_waiting()`` checks where they wait; then ``release()`` makes room and the BOUND waiting
    ones are answered."""
    with ThreadPoolExecutor(BOUND + EXCESS) as pool:
        futures = [pool.submit(send, svc, model) for _ in range(BOUND + EXCESS)]

        def refused() -> list[Future]:
            done = [f for f in futures if f.done()]
            return done if len(done) >= EXCESS else []

        done = wait_for(refused, timeout=60, interval=0.05, what=f"{EXCESS} requests to be refused")
        probes = [probe(svc) for _ in range(5)]
        waiting = [f for f in futures if not f.done()]
        assert len(done) == EXCESS and len(waiting) == BOUND, [f.result() for f in done]
        for status, headers, body, seconds in (f.result() for f in done):
            assert (status, headers.get("retry-after"), body["error"]["code"]) == (503, "2", code), body
            assert "retry" in body["error"]["message"].lower()
            assert seconds < 10, f"a refusal took {seconds:.1f}s: it must not wait for room"
        # Answered while the admitted requests still wait: the probes never queue behind them.
        assert not any(f.done() for f in waiting)
        worst = max(max(p) for p in probes)
        assert worst < 5, probes
        still_waiting()
        print(f"\n{model}: refusals in {sorted(round(f.result()[3], 3) for f in done)} s; "
              f"probes /healthz, /v1/models median {statistics.median(p[0] for p in probes):.3f} s, "
              f"{statistics.median(p[1] for p in probes):.3f} s, worst {worst:.3f} s")  # fmt: skip
        release()
        answered = [f.result(timeout=240) for f in waiting]
    assert [status for status, *_ in answered] == [200] * BOUND, answered
    return answered


def test_waiters_past_a_models_bound_get_503_at_once_whether_it_starts_or_was_evicted(service: Service) -> None:
    controller = pool_controller()
    squatter = Squatter.remote()
    ray.get(squatter.ready.remote(), timeout=120)  # the cluster is full: tiny holds the other CPU
    # The service's settings are the defaults of a loaded model: priority, floor and bound are set here.
    entry = {"name": "low", "priority": 0, "min_replicas": 0, "max_replicas": 1, "max_queued_requests": BOUND,
             "idle_timeout_s": 600}  # fmt: skip
    controller.load.remote(entry).result(timeout_s=60)
    try:
        # A starting model: admitted by the pool, its replica not placed. Its requests wait in Serve's queue,
        # whose bound (MAX_QUEUED_REQUESTS) refuses the rest through the service's error shape.
        refused_at_once_while_the_others_wait(service, "low", "overloaded", lambda: ray.kill(squatter))
        wait_for(lambda: state_of(service, "low").get("state") == "running", 60, what="low to run")

        # An evicted model: a priority-1 model wants two replicas; low's CPU goes to one, and the other waits
        # for room for good, so low stays evicted. Its requests wait at the pool, bounded in the Gateway.
        high = {"name": "high", "priority": 1, "min_replicas": 2, "max_replicas": 2}
        controller.load.remote(high).result(timeout_s=60)

        def evicted() -> bool:
            low, high = state_of(service, "low"), state_of(service, "high")
            return low.get("state") == "evicted" and high.get("replicas", {}).get("running") == 1

        wait_for(evicted, timeout=180, interval=0.25, what="low to be evicted for high's first replica")

        def at_the_gate() -> None:
            # Once the pool sees high's second replica wait for room, low stays evicted: its waiters are not
            # let through to a replica that could not be placed (as when high's first replica, just called
            # running, was still counted as one being placed and hid the second).
            wait_for(lambda: pool_status(controller, "high").waiting_for_room, 30, what="high to wait for room")
            assert not pool_status(controller, "low").admitted

        refused_at_once_while_the_others_wait(
            service,
            "low",
            "too_many_waiters",
            lambda: controller.unload.remote("high", 0).result(timeout_s=60),
            still_waiting=at_the_gate,
        )
    finally:
        ray.kill(squatter)
        for name in ("high", "low"):
            with contextlib.suppress(UnknownModelError):  # already unloaded
                controller.unload.remote(name, 0).result(timeout_s=60)
        wait_for(lambda: set(serve.status().applications) == {"llm", "tiny"}, 120, what="low and high to be deleted")


# --- an engine that hangs: Serve replaces its replica ---------------------------------------------------


class HangingEngine(FakeEngine):
    """The model server tests' fake engine; a batch holding a row of exactly 5 prompt tokens hangs (for good)."""

    def run(self, items: Sequence[WorkItem], on_step: OnStep, poll: Poll | None = None, max_batch_size=None) -> None:
        if any(len(item.prompt_ids) == 5 for item in items):
            threading.Event().wait()
        super().run(items, on_step, poll, max_batch_size)


def hanging_engine(config: ModelConfig, timer: PhaseTimer) -> HangingEngine:
    return HangingEngine()


def test_a_hung_engine_fails_its_requests_with_503_and_serve_replaces_the_replica(
    service: Service, tmp_path: Path
) -> None:
    env = {"MODEL_ID": str(Path(service.settings.model_configs[0].model_id)), "MIN_REPLICAS": "1",
           "MAX_REPLICAS": "1", "ENGINE_STALL_TIMEOUT_S": "2", "GRACEFUL_SHUTDOWN_TIMEOUT_S": "1"}  # fmt: skip
    [config] = build_settings(env).model_configs
    options = {**config.deployment_options(), "name": "hanging"}
    handle = serve.run(ModelServer.options(**options).bind(config, engine=hanging_engine), name="hanging",
                       route_prefix=None)  # fmt: skip
    try:
        ok = GenerationRequest("ok", SamplingParams(max_new_tokens=1), prompts=("a b",))
        first, _ = handle.generate.remote(ok).result(timeout_s=60)
        hang = GenerationRequest("hang", SamplingParams(max_new_tokens=1), prompts=("a b c d e",))
        began = time.monotonic()
        with pytest.raises(StepFailedError, match="no progress"):
            handle.generate.remote(hang).result(timeout_s=60)
        assert time.monotonic() - began < 30  # failed by the health check, not left to hang

        def replaced() -> Started | None:
            try:
                started, _ = handle.generate.remote(ok).result(timeout_s=10)
            except Exception:
                return None
            return started if started.replica != first.replica else None

        wait_for(replaced, timeout=120, interval=1, what="Serve to replace the unhealthy replica")
    finally:
        serve.delete("hanging")
