"""The model pool on real Ray Serve, with room for one model replica: eviction, keep-hot, SCALE_TO_ZERO_AT, admin.

The pool controller is deployed on its own (the Gateway that will hold a ``PoolClient`` is being
rewritten); the test process plays the Gateway through ``PoolClient``. The models are the real
``ModelServer`` (via ``serving.pool.apps``) over tiny checkpoints.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from ray import serve

from engine.types import GenerationRequest, SamplingParams, Started
from serving.api.errors import from_exception
from serving.pool.apps import MODEL_APPS, spec_from_entry
from serving.pool.client import PoolBackend, PoolClient
from serving.pool.controller import PoolController, replica_states
from serving.pool.errors import ModelExistsError, ModelUnavailableError, ModelValidationError, UnknownModelError
from serving.pool.spec import PoolSettings
from serving.pool.store import PoolStore
from settings import build_settings
from testing.checkpoints import build_tiny_causal
from testing.polling import wait_for, wait_for_async
from testing.serve import local_serve
from tests.integration.pool_support import FileClock

SHORT = SamplingParams(max_new_tokens=2)
LONG_TOKENS = 900


@pytest.fixture(scope="module")
def one_cpu() -> Iterator[int]:
    """A local Ray with one CPU: room for one model replica of 1 CPU (the pool controller takes none)."""
    with local_serve(num_cpus=1) as port:
        yield port


@pytest.fixture(scope="module")
def slow_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Deep enough and with a long enough context that one long request outlasts an eviction's decision
    by several seconds, on a fast machine too."""
    return build_tiny_causal(tmp_path_factory.mktemp("slow-gpt2"), n_positions=1024, n_layer=24)


def defaults(model: Path, **extra: object) -> dict:
    return {
        "model_id": str(model),
        "num_cpus_per_replica": 1,
        "max_replicas": 1,
        "idle_timeout_s": 120,
        "autoscaling_look_back_s": 0.5,
        "metrics_push_interval_s": 0.25,
        "max_new_tokens_limit": LONG_TOKENS,
        "packed_cache_dir": "",  # no packed-layer cache (conftest's deploy)
        **extra,
    }


@pytest.fixture
def pools(one_cpu: int) -> Iterator[Callable[..., PoolClient]]:
    """Deploys pool controllers; afterwards deletes them, which deletes their models."""
    deployed: list[str] = []

    def deploy(pool: str, entries: list[dict], base: dict, clock=None, **settings) -> PoolClient:
        specs = [spec_from_entry(entry, base) for entry in entries]
        bound = PoolController.bind(PoolSettings(pool=pool, **settings), specs, base, clock, apps=MODEL_APPS)
        handle = serve.run(bound, name=pool, route_prefix=None)
        deployed.append(pool)
        return PoolClient(handle, refresh_s=0.1)

    yield deploy
    for pool in deployed:
        serve.delete(pool)
    wait_for(lambda: not serve.status().applications, 60, what="the pools' models to be deleted with them")
    for pool in deployed:
        PoolStore(pool).clear()


async def state(client: PoolClient, name: str) -> str:
    return (await client.entry(name, max_age_s=0)).state


async def generate(client: PoolClient, name: str, prompts: list[str], params: SamplingParams = SHORT):
    handle = await client.acquire(name, timeout_s=120)
    _, completions = await handle.generate.remote(GenerationRequest(name, params, prompts=tuple(prompts)))
    return completions


async def test_priority_1_evicts_priority_0_after_its_request_and_priority_0_never_evicts_priority_1(
    pools, slow_model: Path
) -> None:
    client = pools("evict", [{"name": "low"}, {"name": "high", "priority": 1}], defaults(slow_model),
                   eviction_grace_s=2.0)  # fmt: skip
    await generate(client, "low", ["Return the"])  # wake it, so the long request is all generation
    long_params = SamplingParams(max_new_tokens=LONG_TOKENS)
    in_flight = asyncio.ensure_future(generate(client, "low", ["Return the"] * 4, long_params))
    await wait_for_async(lambda: busy(client, "low"), 30, what="low to be busy with the long request")

    high = asyncio.ensure_future(generate(client, "high", ["Write"]))
    await wait_for_async(lambda: not_admitted(client, "low"), 60, what="low to be evicted for high")
    # While high waits for the room low is giving up, a request for low waits and gets no room.
    with pytest.raises(ModelUnavailableError) as unavailable:
        await client.acquire("low", timeout_s=1)
    assert unavailable.value.retry_after_s > 0 and unavailable.value.waited_s >= 1
    assert not in_flight.done() and not high.done()
    seen: list[tuple[str, str, bool]] = []
    while not high.done():
        seen.append((await state(client, "low"), await state(client, "high"), in_flight.done()))
        await asyncio.sleep(0.1)  # the sampling rate of the watcher
    assert (await high)[0].text is not None
    long_answer = await in_flight
    assert [c.finish_reason for c in long_answer] == ["length"] * 4
    # low went away only after its request completed, and high started only after that.
    first_evicted = next(i for i, s in enumerate(seen) if s[0] == "evicted")
    assert all(done for _, _, done in seen[first_evicted:]), seen
    assert all(low_state in ("starting", "running") for low_state, _, done in seen if not done), seen
    assert await state(client, "low") == "evicted"

    # A request for low now waits for room; high (priority 1) is never evicted for it.
    started = time.monotonic()
    handle = await client.acquire("low", timeout_s=10)
    response = handle.generate.remote(GenerationRequest("low", SHORT, prompts=("Write",)))
    done, _ = await asyncio.wait({asyncio.ensure_future(answer_of(response))}, timeout=8)
    assert not done and time.monotonic() - started >= 8
    response.cancel()  # what the Gateway does past REQUEST_TIMEOUT_S (then answers 503 + Retry-After)
    assert await client.waiting_for_room("low")
    assert await state(client, "high") == "running"
    assert (await client.entry("high", 0)).running == 1
    # Its replica waited for room without taking any; cancelled, the request leaves nothing behind.
    await wait_for_async(lambda: no_replicas(client, "low"), 30, what="low's unplaced replica to go")
    assert await state(client, "high") == "running"


async def not_admitted(client: PoolClient, name: str) -> bool:
    return not (await client.entry(name, max_age_s=0)).admitted


async def answer_of(response):
    return await response


async def busy(client: PoolClient, name: str) -> bool:
    return bool((PoolStore("evict").stats(name) or {}).get("busy"))


async def no_replicas(client: PoolClient, name: str) -> bool:
    entry = await client.entry(name, max_age_s=0)
    return entry.running == entry.starting == 0


async def test_a_keep_hot_model_starts_by_itself_and_stays_up_past_its_idle_timeout(pools, tiny_causal) -> None:
    base = defaults(tiny_causal, num_cpus_per_replica=0.5, idle_timeout_s=2)
    client = pools("keephot", [{"name": "hot", "priority": 2}, {"name": "cold"}], base)
    await wait_for_async(lambda: is_running(client, "hot"), 90, what="the keep-hot model to start without a request")
    assert (await client.entry("hot")).last_cold_start is not None
    await generate(client, "hot", ["Write"])
    await generate(client, "cold", ["Write"])
    answered = time.monotonic()
    hot_states = []
    while await state(client, "cold") != "scaled_to_zero":  # cold goes after its idle timeout ...
        hot_states.append(await state(client, "hot"))
        assert time.monotonic() - answered < 60, "cold never scaled to zero"
        await asyncio.sleep(0.1)
    while time.monotonic() - answered < 3 * 2:  # ... while hot stays, well past the same timeout
        hot_states.append(await state(client, "hot"))
        await asyncio.sleep(0.1)
    assert set(hot_states) == {"running"}
    # The pool's loop counts replicas from Serve's plain answer: the counts serve.status() gives.
    hot, cold = await client.entry("hot", max_age_s=0), await client.entry("cold", max_age_s=0)
    seen = {
        app: {name: d.replica_states for name, d in a.deployments.items()}
        for app, a in serve.status().applications.items()
    }
    assert replica_states() == seen
    assert seen[hot.app][hot.deployment] == {"RUNNING": 1} and not seen[cold.app][cold.deployment]


async def backend_state(backend: PoolBackend, name: str, wanted: str) -> bool:
    return {status.name: status.state for status in await backend.statuses()}[name] == wanted


async def is_running(client: PoolClient, name: str) -> bool:
    return await state(client, name) == "running"


async def test_scale_to_zero_at_takes_every_model_to_zero_and_they_wake_on_demand(
    pools, tiny_causal, tmp_path: Path
) -> None:
    chicago = ZoneInfo("America/Chicago")
    clock = FileClock(str(tmp_path / "now"))
    clock.set(datetime(2026, 1, 5, 20, 59, 50, tzinfo=chicago))
    base = defaults(tiny_causal, num_cpus_per_replica=0.5, idle_timeout_s=2)
    entries = [{"name": "hot", "priority": 2}, {"name": "warm", "idle_timeout_s": 300}]
    client = pools("daily", entries, base, clock=clock, scale_to_zero_at="21:00 America/Chicago")
    await wait_for_async(lambda: is_running(client, "hot"), 90, what="the keep-hot model to start")
    await generate(client, "warm", ["Write"])
    await wait_for_async(
        lambda: is_running(client, "warm"), 30, what="the pool to see warm running"
    )  # it looks every 0.5 s

    clock.set(datetime(2026, 1, 5, 21, 0, 1, tzinfo=chicago))
    await wait_for_async(lambda: all_at_zero(client), 30, what="every model to go to zero at 21:00")
    went = time.monotonic()
    while time.monotonic() - went < 3:  # the keep-hot floor does not bring it back by itself
        assert await state(client, "hot") == "scaled_to_zero"
        await asyncio.sleep(0.1)

    await generate(client, "hot", ["Write"])  # a request wakes it, and it keeps its floor again
    await wait_for_async(lambda: is_running(client, "hot"), 30, what="the pool to see hot running")
    woke = time.monotonic()
    while time.monotonic() - woke < 3 * 2:
        assert await state(client, "hot") == "running"
        await asyncio.sleep(0.1)


async def all_at_zero(client: PoolClient) -> bool:
    return all(m.state == "scaled_to_zero" for m in await client.snapshot(max_age_s=0))


async def test_admin_load_use_update_unload_and_the_pool_survives_its_controller_restarting(pools, tiny_causal) -> None:
    base = defaults(tiny_causal, num_cpus_per_replica=0.5, idle_timeout_s=2)
    client = pools("admin", [{"name": "base"}], base)
    controller = serve.get_deployment_handle("PoolController", "admin")

    entry = await controller.load.remote({"name": "team/extra", "priority": 1, "max_replicas": 2})
    assert (entry["id"], entry["app"], entry["priority"], entry["replicas"]["max"]) == (
        "team/extra",
        "team--extra",
        1,
        2,
    )
    with pytest.raises(ModelValidationError) as error:
        await controller.load.remote({"name": "bad", "max_replicas": "many"})
    assert error.value.field == "max_replicas"
    with pytest.raises(ModelExistsError):
        await controller.load.remote({"name": "team/extra"})
    listed = {m["id"]: m for m in await controller.list_models.remote()}
    assert listed["team/extra"]["source"] == "admin" and listed["team/extra"]["config"]["max_replicas"] == 2

    # The Gateway's backend over the pool: the loaded model is resolved, listed and answers.
    backend = PoolBackend(controller, build_settings({"MODEL_ID": str(tiny_causal)}), refresh_s=0.1)
    model = await backend.resolve("team/extra")
    assert model.name == "team/extra" and model.max_replicas == 2
    request = GenerationRequest(request_id="r1", params=SamplingParams(max_new_tokens=2), prompts=("Write",))
    started, completions = await backend.generate(model, request)
    assert started.cold_start is not None and len(completions) == 1
    items = [item async for item in backend.stream(model, request)]
    assert isinstance(items[0], Started) and items[0].cold_start is None and len(items) >= 2
    await wait_for_async(
        lambda: backend_state(backend, "team/extra", "running"), 30, what="the backend to list extra running"
    )
    with pytest.raises(UnknownModelError) as unknown:  # the pool's error; the routes map it to 404
        await backend.resolve("nope")
    error = from_exception(unknown.value, "native", retry_after_s=1)
    assert error.status == 404 and "base, team/extra" in error.message

    await controller.update.remote("team/extra", priority=3, max_replicas=1)
    await wait_for_async(lambda: is_running(client, "team/extra"), 30, what="extra to stay up as a keep-hot model")
    # A new controller replica (an upgrade, a crash) finds the same pool in Ray's GCS store.
    specs = [spec_from_entry({"name": "base"}, base)]
    again = PoolController.bind(PoolSettings(pool="admin"), specs, base, apps=MODEL_APPS)
    serve.run(again, name="admin", route_prefix=None)
    restored = {m.name: m for m in await client.snapshot(max_age_s=0)}
    assert set(restored) == {"base", "team/extra"}
    assert (restored["team/extra"].priority, restored["team/extra"].max_replicas) == (3, 1)
    assert restored["team/extra"].last_cold_start is not None

    result = await controller.unload.remote("team/extra", wait_s=60)
    assert result == {"id": "team/extra", "unloaded": True}
    wait_for(lambda: "team--extra" not in serve.status().applications, 30, what="extra's application to be deleted")
    assert [m.name for m in await client.snapshot(max_age_s=0)] == ["base"]
    with pytest.raises(UnknownModelError, match="served models: base"):
        await client.acquire("team/extra", timeout_s=1)
