"""One replica under concurrency: requests are batched, and past the limits clients are told to retry."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from ray import serve

from testing.polling import wait_for
from tests.integration.conftest import Service, deploy, model_deployment, running_replicas

# The batching test's requests fit in the replica at once, and in the queue: Ray counts every
# request not yet assigned to a replica as queued, so simultaneous arrivals fill the queue for a
# moment even when the replica has room.
MAX_ONGOING = 4
MAX_QUEUED = 4
PROMPTS = [
    "Return the number of items",
    "The socket module",
    "Raise ValueError if the argument is negative or not an integer, and",
    "Write",
]


@pytest.fixture(scope="module")
def service(serve_port: int, tiny_causal: Path) -> Service:
    svc = deploy(
        serve_port,
        {
            "MODEL_ID": str(tiny_causal),
            "MIN_REPLICAS": "1",
            "MAX_REPLICAS": "1",
            "MAX_ONGOING_REQUESTS": str(MAX_ONGOING),
            "MAX_QUEUED_REQUESTS": str(MAX_QUEUED),
            "MAX_BATCH_SIZE": "8",
            "RETRY_AFTER_S": "2",
        },
    )
    wait_for(lambda: running_replicas() == 1, timeout=120, what="the model replica")
    return svc


def body(prompt: str, max_new_tokens: int = 48) -> dict:
    return {"prompt": prompt, "generation_kwargs": {"max_new_tokens": max_new_tokens, "temperature": 0}}


def stats() -> dict:
    name = model_deployment()
    return serve.get_deployment_handle(name, name).stats.remote().result(timeout_s=30)


def alone(service: Service) -> dict[str, str]:
    """Each prompt's greedy completion, sent one at a time."""
    out = {}
    for prompt in PROMPTS:
        response = service.generate(body(prompt))
        assert response.status_code == 200, response.text
        out[prompt] = response.json()["completions"][0]
    return out


def test_concurrent_requests_share_batches_and_match_their_solo_answers(service: Service) -> None:
    expected = alone(service)
    before = stats()
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        responses = list(pool.map(lambda p: service.generate(body(p)), PROMPTS))
    for prompt, response in zip(PROMPTS, responses, strict=True):
        assert response.status_code == 200, response.text
        assert response.json()["completions"][0] == expected[prompt], f"batched answer differs for {prompt!r}"
    after = stats()
    assert after["rows"] - before["rows"] == len(PROMPTS)
    batches = after["batches"] - before["batches"]
    assert batches < len(PROMPTS), f"{len(PROMPTS)} concurrent requests ran in {batches} batches: none were shared"


def test_a_flood_past_the_limits_gets_fast_retry_answers_and_every_accepted_request_is_served(
    service: Service,
) -> None:
    expected = alone(service)
    flood = 6 * (MAX_ONGOING + MAX_QUEUED)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(flood)]

    def send(prompt: str) -> tuple[httpx.Response, float]:
        started = time.monotonic()
        with httpx.Client() as client:  # one connection each, all at once
            response = client.post(f"{service.url}/generate", json=body(prompt, 96), timeout=120)
        return response, time.monotonic() - started

    with ThreadPoolExecutor(flood) as pool:
        results = list(pool.map(send, prompts))

    served = rejected = 0
    for prompt, (response, seconds) in zip(prompts, results, strict=True):
        if response.status_code == 200:
            served += 1
            # the same prompt at 96 tokens starts with its 48-token answer (greedy)
            assert response.json()["completions"][0].startswith(expected[prompt])
        else:
            rejected += 1
            assert response.status_code in (429, 503), response.text
            assert response.headers["Retry-After"] == "2"
            assert "retry" in response.json()["error"]["message"].lower()
            assert seconds < 10, f"a rejection took {seconds:.1f}s: clients must hear 'busy' quickly"
    assert served >= MAX_ONGOING, "the service turned away requests it had room for"
    assert rejected > 0, f"{flood} simultaneous requests never hit the limit of {MAX_ONGOING + MAX_QUEUED}"
    print(f"flood of {flood}: {served} served, {rejected} told to retry")
    # and afterwards the service serves as before
    assert alone(service) == expected
