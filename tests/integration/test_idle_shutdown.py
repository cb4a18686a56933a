"""Scale down honestly: a request longer than the idle timeout completes, then the model goes to zero."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from testing.checkpoints import build_tiny_causal
from testing.polling import wait_for
from tests.integration.conftest import Service, deploy, replica_states

IDLE_TIMEOUT_S = 1.5
NEW_TOKENS = 900


@pytest.fixture(scope="module")
def slow_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Deep enough and with a long enough context that one request takes a few seconds."""
    return build_tiny_causal(tmp_path_factory.mktemp("slow-gpt2"), n_positions=1024, n_layer=8)


@pytest.fixture(scope="module")
def service(serve_port: int, slow_model: Path) -> Service:
    return deploy(
        serve_port,
        {
            "MODEL_ID": str(slow_model),
            "MIN_REPLICAS": "0",
            "MAX_REPLICAS": "1",
            "IDLE_TIMEOUT_S": str(IDLE_TIMEOUT_S),
            "AUTOSCALING_LOOK_BACK_S": "0.5",
            "METRICS_PUSH_INTERVAL_S": "0.25",
            "MAX_NEW_TOKENS_LIMIT": str(NEW_TOKENS),
            "GRACEFUL_SHUTDOWN_TIMEOUT_S": "60",
        },
    )


def test_a_request_outlasting_the_idle_timeout_completes_then_the_model_scales_to_zero(service: Service) -> None:
    # Wake the model first, so that the slow request below is all generation.
    assert service.generate({"prompt": "Write", "generation_kwargs": {"max_new_tokens": 2}}).status_code == 200

    seen: list[dict[str, int]] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            seen.append(replica_states())
            time.sleep(0.1)  # sampling rate of the watcher, not a wait for a condition

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    started = time.monotonic()
    prompts = ["Return the number of items", "The socket module", "Raise ValueError if", "Write a haiku"]
    response = service.generate(
        {"prompts": prompts, "generation_kwargs": {"max_new_tokens": NEW_TOKENS, "temperature": 0}}, timeout=300
    )
    elapsed = time.monotonic() - started
    done.set()
    watcher.join()

    assert response.status_code == 200, response.text
    answer = response.json()
    assert len(answer["completions"]) == len(prompts) and all(answer["completions"])
    assert elapsed > 2 * IDLE_TIMEOUT_S, f"the request took {elapsed:.1f}s: too short to outlast the idle timeout"
    assert seen and all(states.get("RUNNING") == 1 for states in seen), f"replica states during the request: {seen}"

    # With the request answered, the idle timeout applies again.
    answered = time.monotonic()
    wait_for(lambda: replica_states() == {}, timeout=IDLE_TIMEOUT_S + 30, interval=0.1, what="scale to zero")
    to_zero = time.monotonic() - answered
    print(f"request took {elapsed:.1f}s (IDLE_TIMEOUT_S={IDLE_TIMEOUT_S}); model at zero {to_zero:.1f}s later")
