"""Requests for an evicted model wait in bounded numbers: past the model's bound, 503 with Retry-After at once,
and listings never wait behind the waiters; a burst of requests that finds the models' configurations stale
waits for one controller call, not one each."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import pytest

from serving.api.errors import from_exception
from serving.models import ModelStatus
from serving.pool.client import PoolBackend, PoolClient
from serving.pool.errors import TooManyWaitersError
from settings import ModelConfig


class Method:
    def __init__(self, fn: Any) -> None:
        self.fn = fn

    def remote(self, *args: Any) -> Any:
        return self.fn(*args)


class Controller:
    """The pool controller's two calls the client makes: an evicted model whose room comes on ``room``."""

    def __init__(self) -> None:
        self.room = asyncio.Event()
        self.acquires = 0
        self.snapshot = Method(self._snapshot)
        self.acquire = Method(self._acquire)

    async def _snapshot(self) -> list[ModelStatus]:
        admitted = self.room.is_set()
        return [
            ModelStatus(
                "big", "org/big", "running" if admitted else "evicted", admitted=admitted, app="big", deployment="big"
            )
        ]

    async def _acquire(self, name: str, timeout_s: float) -> bool:
        self.acquires += 1
        try:
            await asyncio.wait_for(self.room.wait(), timeout_s)
        except TimeoutError:
            return False
        return True


async def test_past_the_bound_a_request_is_refused_at_once_and_listings_stay_quick(monkeypatch) -> None:
    controller = Controller()
    client = PoolClient(controller, refresh_s=0.0, retry_after_s=3)  # type: ignore[arg-type]

    async def handle(app: str, deployment: str | None) -> str:
        return f"handle of {app}"

    monkeypatch.setattr(client, "_handle", handle)
    waiting = [asyncio.create_task(client.acquire("big", timeout_s=30, max_waiters=4)) for _ in range(4)]
    while client.waiters("big") < 4:
        await asyncio.sleep(0.001)
    began = time.monotonic()
    with pytest.raises(TooManyWaitersError) as refused:
        await client.acquire("big", timeout_s=30, max_waiters=4)
    assert time.monotonic() - began < 0.5  # at once: it never waited for room
    error = from_exception(refused.value, "openai", 1)
    assert (error.status, error.kind, error.headers) == (503, "too_many_waiters", {"Retry-After": "3"})
    assert "MAX_QUEUED_REQUESTS" in error.message
    assert [m.name for m in await client.snapshot()] == ["big"]  # the listing does not wait behind them
    assert controller.acquires == 4
    controller.room.set()
    assert await asyncio.gather(*waiting) == ["handle of big"] * 4
    assert client.waiters("big") == 0
    assert await client.acquire("big", timeout_s=1, max_waiters=0) == "handle of big"  # admitted: no bound


async def test_minus_one_is_unbounded_and_a_timed_out_waiter_leaves_the_count(monkeypatch) -> None:
    controller = Controller()
    client = PoolClient(controller, refresh_s=0.0, retry_after_s=1)  # type: ignore[arg-type]
    from serving.pool.errors import ModelUnavailableError

    results = await asyncio.gather(
        *(client.acquire("big", timeout_s=0.05, max_waiters=-1) for _ in range(50)), return_exceptions=True
    )
    assert all(isinstance(r, ModelUnavailableError) for r in results)
    assert client.waiters("big") == 0


async def test_requests_arriving_together_share_one_handle_so_serve_counts_one_queue(monkeypatch) -> None:
    """Serve bounds MAX_QUEUED_REQUESTS per handle (its router): a second handle would be a second queue."""
    import threading

    from serving.pool import client as module

    made: list[tuple[str, str]] = []
    lookup = threading.Event()

    @dataclass(frozen=True)
    class Handle:
        name: str
        options_set: tuple = ()

        def options(self, **options: object) -> Handle:
            return Handle(self.name, (*self.options_set, *sorted(options.items())))

    def get_deployment_handle(deployment: str, app: str) -> Handle:
        lookup.wait(5)  # Serve's controller answers slowly: the other requests arrive meanwhile
        made.append((deployment, app))
        return Handle(f"handle {len(made)}")

    monkeypatch.setattr(module.serve, "get_deployment_handle", get_deployment_handle)
    controller = Controller()
    controller.room.set()  # admitted
    client = PoolClient(controller, refresh_s=0.0)  # type: ignore[arg-type]
    waiting = [asyncio.create_task(client.acquire("big", timeout_s=5)) for _ in range(8)]
    await asyncio.sleep(0.05)
    lookup.set()
    # One handle, asking for Serve's gRPC transport (serving.transport), for all eight.
    assert await asyncio.gather(*waiting) == [Handle("handle 1", (("_by_reference", False),))] * 8
    assert made == [("big", "big")]


async def test_a_burst_that_finds_the_configurations_stale_waits_for_one_controller_call() -> None:
    stored = ModelConfig(name="big", model_id="org/big").model_dump(mode="json")
    calls = Counter()

    async def snapshot() -> list[ModelStatus]:
        return [ModelStatus("big", "org/big", "running", admitted=True, app="big", deployment="big")]

    async def configs() -> dict:
        calls["configs"] += 1
        await asyncio.sleep(0.05)  # the controller's answer takes a moment: the burst arrives meanwhile
        return {"big": stored}

    controller = SimpleNamespace(snapshot=Method(snapshot), configs=Method(configs))
    backend = PoolBackend(controller, SimpleNamespace(retry_after_s=1, request_timeout_s=5), refresh_s=60)  # type: ignore[arg-type]
    resolved = await asyncio.gather(*(backend.resolve("big") for _ in range(24)))
    assert {model.name for model in resolved} == {"big"} and calls["configs"] == 1


async def test_the_model_list_and_the_configurations_are_fetched_at_once() -> None:
    # Each call waits (up to a second) for the other to have begun: one after the other, the first would time out.
    stored = ModelConfig(name="big", model_id="org/big").model_dump(mode="json")
    begun = {"snapshot": asyncio.Event(), "configs": asyncio.Event()}
    overlapped: list[str] = []

    def call(name: str, other: str, answer: Any) -> Method:
        async def fn() -> Any:
            begun[name].set()
            try:
                await asyncio.wait_for(begun[other].wait(), timeout=1)
                overlapped.append(name)
            except TimeoutError:
                pass
            return answer

        return Method(fn)

    status = ModelStatus("big", "org/big", "running", admitted=True, app="big", deployment="big")
    controller = SimpleNamespace(
        snapshot=call("snapshot", "configs", [status]), configs=call("configs", "snapshot", {"big": stored})
    )
    backend = PoolBackend(controller, SimpleNamespace(retry_after_s=1, request_timeout_s=5), refresh_s=60)  # type: ignore[arg-type]
    assert (await backend.resolve("big")).name == "big"
    assert sorted(overlapped) == ["configs", "snapshot"]


async def test_a_model_the_fetched_configurations_lack_is_fetched_again() -> None:
    # The configurations answered before the model list: it names a model loaded in between.
    stored = {name: ModelConfig(name=name, model_id=f"org/{name}").model_dump(mode="json") for name in ("a", "b")}
    answers = [{"a": stored["a"]}, stored]
    listed = asyncio.Event()

    async def snapshot() -> list[ModelStatus]:
        await asyncio.wait_for(listed.wait(), timeout=1)
        return [ModelStatus(name, f"org/{name}", "running", admitted=True, app=name, deployment=name) for name in "ab"]

    async def configs() -> dict:
        listed.set()  # the list is answered after these configurations
        return answers.pop(0)

    controller = SimpleNamespace(snapshot=Method(snapshot), configs=Method(configs))
    backend = PoolBackend(controller, SimpleNamespace(retry_after_s=1, request_timeout_s=5), refresh_s=60)  # type: ignore[arg-type]
    assert (await backend.resolve("b")).model_id == "org/b"
    assert answers == []  # fetched twice
