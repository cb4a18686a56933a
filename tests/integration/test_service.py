"""The whole graph on real Ray Serve: health without waking, cold start, prompts, errors, idle to zero."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from engine.cpu import auto_cpu_dtype
from serving.pool.progress import PHASES
from testing.polling import wait_for
from tests.integration.conftest import Service, deploy, replica_states, running_replicas

IDLE_TIMEOUT_S = 6.0


@pytest.fixture(scope="module")
def packed_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("packed-layers")


@pytest.fixture(scope="module")
def service(serve_port: int, tiny_causal: Path, packed_cache: Path) -> Service:
    return deploy(
        serve_port,
        {
            "MODEL_ID": str(tiny_causal),
            "MIN_REPLICAS": "0",
            "MAX_REPLICAS": "1",
            "IDLE_TIMEOUT_S": str(IDLE_TIMEOUT_S),
            "AUTOSCALING_LOOK_BACK_S": "1",
            "METRICS_PUSH_INTERVAL_S": "0.5",
            "MAX_PROMPTS_PER_REQUEST": "4",
            "MAX_NEW_TOKENS": "8",
            "REQUEST_TIMEOUT_S": "120",
            "PACKED_CACHE_DIR": str(packed_cache),
        },
    )


def test_healthz_answers_without_waking_the_model(service: Service) -> None:
    assert replica_states() == {}
    started = time.monotonic()
    for _ in range(20):
        body = service.health()
        assert body["status"] == "ok"
        assert body["models"][0]["state"] == "scaled_to_zero"
    assert time.monotonic() - started < 10
    # Give the autoscaler time to react to anything the probes might have queued: it must not.
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        assert replica_states() == {}, "a health probe started a model replica"
        time.sleep(0.25)


def test_first_generate_from_zero_replicas(service: Service) -> None:
    assert running_replicas() == 0
    started = time.monotonic()
    response = service.generate({"prompt": "Return the number", "generation_kwargs": {"temperature": 0}})
    elapsed = time.monotonic() - started
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["completions"][0] and body["usage"]["completion_tokens"] <= 8
    assert running_replicas() == 1
    # Listings come from the pool's view of Serve, which follows within a second or two.
    health = wait_for(
        lambda: (
            (status := service.model_status())["state"] == "running"
            and (status["last_cold_start"] or {}).get("finished_at")
            and status
        ),
        timeout=60,
        what="the listing to show the model running with its cold start",
    )
    report = health["last_cold_start"]
    phases = report["phases"]
    assert list(phases) == [f"{p}_s" for p in PHASES], phases
    assert phases["weights_s"] >= 0 and phases["first_generation_s"] > 0
    assert report["details"]["weights_bytes"] > 0 and report["total_s"] <= elapsed + 1
    # DTYPE=auto: bfloat16 where the CPU has it, after a first answer in the checkpoint's float32.
    placement = {"devices": {"cpu": report["details"]["weights_bytes"]}, "dtype": "float32", "quantization": None}
    if auto_cpu_dtype()[0] == torch.bfloat16:
        placement["dtype_after_first_answer"] = "bfloat16"
    assert report["details"]["dtype_reason"].startswith("auto: ")
    assert health["placement"] == report["details"]["placement"] and health["placement"].items() >= placement.items()
    assert report["details"]["touched_bytes"] == report["details"]["weights_bytes"]  # the warm-up mapped them all
    assert report["details"]["packed_cache"] == "miss"  # a new PACKED_CACHE_DIR: packed, then written
    assert report["details"]["huge_pages"] == "after the first answer"  # packed in the replica's own memory
    print(f"cold start to first answer: {elapsed:.2f}s; phases: {report}")


def test_prompt_and_prompts_agree(service: Service) -> None:
    prompts = ["Return the number", "The socket module provides", "Raise"]
    greedy = {"temperature": 0, "max_new_tokens": 6}
    batch = service.generate({"prompts": prompts, "generation_kwargs": greedy}).json()
    singles = [service.generate({"prompt": p, "generation_kwargs": greedy}).json() for p in prompts]
    assert batch["prompts"] == prompts
    assert batch["completions"] == [s["completions"][0] for s in singles]
    assert batch["usage"]["prompt_tokens"] == sum(s["usage"]["prompt_tokens"] for s in singles)


def test_seeded_sampling_reproduces_through_the_service(service: Service) -> None:
    body = {"prompt": "Return the", "generation_kwargs": {"temperature": 1.0, "seed": 11, "max_new_tokens": 8}}
    first, second = service.generate(body).json(), service.generate(body).json()
    assert first["completions"] == second["completions"]
    unseeded = service.generate({"prompt": "Return the", "generation_kwargs": {"temperature": 1.0}}).json()
    replay = {"prompt": "Return the", "generation_kwargs": unseeded["generation_kwargs"]}
    assert service.generate(replay).json()["completions"] == unseeded["completions"]


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        ({"prompts": []}, 422, "prompts"),
        ({"prompt": "a", "prompts": ["b"]}, 422, "not both"),
        ({"prompt": "a", "generation_kwargs": {"temperature": -1}}, 422, "temperature"),
        ({"prompt": "a", "unknown": True}, 422, "unknown: Extra inputs"),
        ({"prompts": ["a"] * 5}, 413, "MAX_PROMPTS_PER_REQUEST"),
        ({"prompt": "word " * 200}, 413, "context of 128 tokens"),
        ({"prompt": "a", "generation_kwargs": {"max_new_tokens": 5000}}, 422, "MAX_NEW_TOKENS_LIMIT"),
    ],
)
def test_bad_requests_get_4xx_and_the_service_keeps_serving(service: Service, body, status, fragment) -> None:
    response = service.generate(body)
    assert response.status_code == status, response.text
    assert fragment in response.json()["error"]["message"]
    assert service.generate({"prompt": "Raise"}).status_code == 200


def test_malformed_json_is_400(service: Service) -> None:
    response = service.client.post(
        f"{service.url}/generate", content=b"{oops", headers={"Content-Type": "application/json"}, timeout=30
    )
    assert response.status_code == 400


def test_model_scales_to_zero_after_idle_timeout(service: Service, packed_cache: Path) -> None:
    # Traffic for longer than the handle's metrics push period: an answer of a few milliseconds can fall
    # between two of the autoscaler's samples and then does not restart its idle countdown (README, Limitations).
    started = time.monotonic()
    for _ in range(200):
        assert service.generate({"prompt": "Raise"}).status_code == 200
        if time.monotonic() - started > 1.5:
            break
    last_answer = time.monotonic()
    assert running_replicas() == 1
    wait_for(lambda: replica_states() == {}, timeout=IDLE_TIMEOUT_S + 30, interval=0.25, what="scale to zero")
    idle = time.monotonic() - last_answer
    print(f"model replica gone {idle:.1f}s after the last answer (IDLE_TIMEOUT_S={IDLE_TIMEOUT_S})")
    assert idle >= IDLE_TIMEOUT_S * 0.7, "the replica stopped well before the idle timeout"
    first = wait_for(
        lambda: service.model_status()["state"] == "scaled_to_zero" and service.model_status()["last_cold_start"],
        timeout=60,
        what="the listing",
    )
    # and it wakes again, its packed layers mapped from the cache the first wake wrote
    written = lambda: [e for e in packed_cache.iterdir() if not e.name.startswith(".")]  # noqa: E731 - renamed whole
    wait_for(written, timeout=30, what="the first replica's cache entry")
    assert service.generate({"prompt": "Raise"}).status_code == 200
    report = wait_for(
        lambda: (r := service.model_status()["last_cold_start"])["finished_at"] != first["finished_at"] and r,
        timeout=60,
        what="the second wake's report",
    )
    assert report["details"]["packed_cache"] == "hit"
    assert report["details"]["huge_pages"].startswith("not needed")  # the file's pages stay
    assert report["details"]["placement"]["dtype"] == str(auto_cpu_dtype()[0]).removeprefix("torch.")
