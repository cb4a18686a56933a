"""Faults on real Ray Serve: a model replica killed mid-request, and a flood of clients that go away.

- The replica's process is killed (SIGKILL, its pid from Ray's actor table) while it generates a long
  answer: the caller hears 503 with Retry-After (a stream: an error event and [DONE]) within seconds,
  not after REQUEST_TIMEOUT_S; Serve starts a new replica and the service answers again.
- Clients that disconnect mid-request, streamed or not, leave nothing behind in the replica: no row
  running, nothing queued, no open stream, no extra asyncio task (polled until so, with a deadline
  shorter than the abandoned requests would take to finish). The whole answers' clients leave once
  every request is in the replica, so that each one's end there is known: cancelled, and no other.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
from collections import Counter

import httpx
import pytest
import ray
from ray import serve

from testing.checkpoints import build_tiny_causal
from testing.polling import wait_for
from tests.integration.conftest import Service, deploy, running_replicas

MODEL = "long"
LONG = 1500  # tokens: seconds of work for the tiny model (greedy, it never meets its end token first)
TIMEOUT_S = 120  # REQUEST_TIMEOUT_S: a caller must hear of a dead replica long before this
RETRY_AFTER_S = 3


@pytest.fixture(scope="module")
def service(serve_port: int, tmp_path_factory: pytest.TempPathFactory) -> Service:
    model = build_tiny_causal(tmp_path_factory.mktemp("tiny-2k"), n_positions=2048)
    svc = deploy(
        serve_port,
        {
            "MODEL_ID": str(model),
            "SERVED_MODEL_NAME": MODEL,
            "MIN_REPLICAS": "1",
            "MAX_REPLICAS": "1",
            "MAX_NEW_TOKENS_LIMIT": "2000",
            "MAX_BATCH_SIZE": "32",
            "MAX_ONGOING_REQUESTS": "64",
            "REQUEST_TIMEOUT_S": str(TIMEOUT_S),
            "RETRY_AFTER_S": str(RETRY_AFTER_S),
            "GRACEFUL_SHUTDOWN_TIMEOUT_S": "5",
        },
    )
    wait_for(lambda: running_replicas() == 1, timeout=180, what="the model replica")
    return svc


def stats() -> dict:
    # The pool serves each model as its own application, named after the model like its deployment.
    return serve.get_deployment_handle(MODEL, MODEL).stats.remote().result(timeout_s=30)


def replica_pids() -> list[int]:
    """The pids of the model's live replica actors, from Ray's actor table."""
    actors = ray._private.state.actors().values()  # the GCS table; the state API needs a dashboard
    replica = f"ServeReplica:{MODEL}:{MODEL}"  # the pool's application for the model, and its deployment
    return [a["Pid"] for a in actors if a["ActorClassName"] == replica and a["State"] == "ALIVE"]


def long_body(stream: bool) -> dict:
    return {"model": MODEL, "prompt": "Return the number", "max_tokens": LONG, "temperature": 0, "stream": stream}


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_killed_replica_is_a_fast_503_and_serve_replaces_it(service: Service, stream: bool) -> None:
    (pid,) = wait_for(replica_pids, timeout=60, what="a live model replica")
    outcome: dict = {}

    def call() -> None:
        url = f"{service.url}/v1/completions"
        with httpx.stream("POST", url, json=long_body(stream), timeout=TIMEOUT_S + 30) as response:
            outcome["status"], outcome["headers"] = response.status_code, response.headers
            outcome["lines"] = [line for line in response.iter_lines() if line]
        outcome["ended"] = time.monotonic()

    caller = threading.Thread(target=call)
    caller.start()
    wait_for(lambda: stats()["rows_running"] >= 1, timeout=60, interval=0.05, what="the replica to take it")
    if stream:  # the 200 goes out once the replica's first item reaches the Gateway, a moment after it takes the row
        wait_for(lambda: "status" in outcome, timeout=60, interval=0.05, what="the stream's status line")
    killed = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    caller.join(timeout=TIMEOUT_S + 60)
    assert not caller.is_alive()
    waited = outcome["ended"] - killed
    print(f"\n{'streamed' if stream else 'whole'}: the caller heard of the dead replica {waited:.2f}s after the kill")
    assert waited < 15, f"the caller waited {waited:.1f}s for a dead replica"
    if stream:  # the 200 went out with the stream's start: the failure is its last event
        assert outcome["status"] == 200
        error = json.loads(outcome["lines"][-2].removeprefix("data: "))["error"]
        assert outcome["lines"][-1] == "data: [DONE]"
        assert error["code"] == "unavailable" and f"retry in {RETRY_AFTER_S} s" in error["message"]
    else:
        assert outcome["status"] == 503 and outcome["headers"]["Retry-After"] == str(RETRY_AFTER_S)
        error = json.loads(outcome["lines"][0])["error"]
        assert error["code"] == "unavailable" and "went away" in error["message"]

    # Serve replaces the replica, and the service answers again.
    wait_for(lambda: (pids := replica_pids()) and pids != [pid], timeout=120, what="a new replica")
    again = httpx.post(f"{service.url}/v1/completions", json={**long_body(False), "max_tokens": 4}, timeout=120)
    assert again.status_code == 200, again.text


def test_a_flood_of_clients_that_leave_leaves_nothing_behind(service: Service) -> None:
    # One answer first: a replica that has answered nothing yet (a fresh replacement after a failed test, or
    # this test run alone) has not started its batcher's loop task, which then outlives the flood and would
    # be counted as an abandoned request's task.
    answer = httpx.post(f"{service.url}/v1/completions", json={**long_body(False), "max_tokens": 4}, timeout=120)
    assert answer.status_code == 200, answer.text
    wait_for(lambda: stats()["rows_running"] == 0, timeout=60, what="an idle replica")
    before = stats()
    clients = 24  # half stream and leave after a few lines, half wait for a whole answer and are cut off
    url = f"{service.url}/v1/completions"

    async def streamed(i: int) -> None:
        async with (
            httpx.AsyncClient(timeout=120) as client,
            client.stream("POST", url, json=long_body(True)) as response,
        ):
            assert response.status_code == 200, await response.aread()
            lines = 0
            async for _ in response.aiter_lines():
                lines += 1
                if lines == 3 + i % 5:
                    return  # the client closes the connection mid-stream

    async def whole() -> None:
        async with httpx.AsyncClient(timeout=120) as client:
            response = await client.post(url, json=long_body(False))
            raise AssertionError(f"a whole answer of {LONG} tokens came before its client left: {response.text[:200]}")

    def all_reached() -> bool:
        return stats()["requests"] - before["requests"] >= clients

    async def flood() -> None:
        streams = [asyncio.create_task(streamed(i)) for i in range(0, clients, 2)]
        wholes = [asyncio.create_task(whole()) for _ in range(1, clients, 2)]
        # The whole answers' clients leave once every request is in the replica (each a row running or
        # queued), one after another, so that some leave while the streams they held back are starting.
        await asyncio.to_thread(wait_for, all_reached, 120, 0.1, "every request to reach the replica")
        for task in wholes:
            task.cancel()  # the connection closes: the client is gone
            await asyncio.sleep(0.05)
        await asyncio.gather(*streams)
        await asyncio.gather(*wholes, return_exceptions=True)
        assert all(task.cancelled() for task in wholes), [task.exception() for task in wholes if not task.cancelled()]

    asyncio.run(flood())
    gone = time.monotonic()

    def settled() -> dict | None:
        now = stats()
        idle = now["rows_running"] == 0 and now["items_queued"] == 0 and now["streams_open"] == 0
        return now if idle and now["tasks"] <= before["tasks"] else None

    after = wait_for(settled, timeout=60, interval=0.25, what="the replica to drop every abandoned request")
    print(f"\n{clients} clients gone; the replica was idle {time.monotonic() - gone:.2f}s later: {after}")
    # Every request reached the replica before its client left, and each was cancelled there: one row
    # each, none ran to its LONG tokens, and none ended any other way.
    ended = Counter(after["ended"]) - Counter(before["ended"])
    assert after["requests"] - before["requests"] == clients, (before, after)
    assert ended == {"left": clients}, (before, after)
    assert after["rows_cancelled"] - before["rows_cancelled"] == clients, (before, after)
    # And nothing turns up later.
    quiet_until = time.monotonic() + 3
    while time.monotonic() < quiet_until:
        now = stats()
        assert now["requests"] == after["requests"] and now["rows_running"] == 0, now
        time.sleep(0.25)
    assert httpx.post(f"{service.url}/v1/completions", json={**long_body(False), "max_tokens": 4}).status_code == 200
