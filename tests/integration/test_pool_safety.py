"""What the pool refuses and how it survives bad state, on real Ray Serve (one live pool for the module).

The pool controller runs as the service deploys it (``MODEL_APPS``, the real ``ModelServer`` over a tiny
checkpoint); the test plays the Gateway through ``PoolBackend``. Before the pool starts, the store
already holds records it must not trust: one written by an older version (a field since renamed), one
that names the service's own application. A bystander Serve application, not the pool's, runs beside it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from ray import serve

from engine.types import GenerationRequest, SamplingParams
from serving.pool.apps import MODEL_APPS, spec_from_entry
from serving.pool.client import PoolBackend
from serving.pool.controller import PoolController
from serving.pool.errors import ModelExistsError, ModelValidationError
from serving.pool.spec import PoolSettings
from serving.pool.store import PoolStore
from settings import build_settings
from testing.serve import local_serve

POOL = "guarded"


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0})
class Bystander:
    """A Serve application someone else deployed: the pool must never replace or delete it."""

    def __call__(self) -> str:
        return "still here"


def base(model: Path, **extra: object) -> dict:
    return {"model_id": str(model), "num_cpus_per_replica": 0.5, "max_replicas": 1, "idle_timeout_s": 120,
            "packed_cache_dir": "", **extra}  # fmt: skip


@pytest.fixture(scope="module")
def pool(tiny_causal: Path) -> Iterator[object]:
    with local_serve(num_cpus=1):
        serve.run(Bystander.bind(), name="bystander", route_prefix=None)
        store = PoolStore(POOL)
        good = spec_from_entry({"name": "kept"}, base(tiny_causal))
        stale = good.to_json() | {"name": "stale", "app": "stale"}
        stale["config"] = dict(stale["config"], name="stale", old_field_renamed_since=1)
        store.put_record("stale", {"spec": stale, "source": "admin", "created": 1.0})
        own = good.to_json() | {"name": POOL, "app": POOL}
        own["config"] = dict(own["config"], name=POOL)
        store.put_record(POOL, {"spec": own, "source": "admin", "created": 1.0})
        settings = PoolSettings(pool=POOL, admin_models=(f"{tiny_causal.parent}/*", "HuggingFaceTB/*"))
        bound = PoolController.bind(settings, [good], base(tiny_causal), apps=MODEL_APPS)
        yield serve.run(bound, name=POOL, route_prefix=None)
        serve.delete(POOL)
        store.clear()


async def test_stale_and_reserved_records_are_listed_failed_and_skipped(pool) -> None:
    listed = {m["id"]: m for m in await pool.list_models.remote()}
    assert listed["kept"]["state"] != "failed" and listed["kept"]["source"] == "static"
    assert listed["stale"]["state"] == "failed"
    assert "old_field_renamed_since" in listed["stale"]["error"] and "no longer valid" in listed["stale"]["error"]
    assert listed[POOL]["state"] == "failed" and "reserved" in listed[POOL]["error"]
    # Neither was deployed, and the service's own application is still the pool's controller.
    applications = serve.status().applications
    assert "stale" not in applications and applications[POOL].deployments.keys() == {"PoolController"}
    assert [s.name for s in await pool.snapshot.remote()] == ["kept"]  # clients see only what serves
    # An operator removes a failed record through /admin's unload.
    assert await pool.unload.remote("stale") == {"id": "stale", "unloaded": True}
    assert "stale" not in {m["id"] for m in await pool.list_models.remote()}
    assert "stale" not in PoolStore(POOL).records()


async def test_admin_loads_refuse_remote_code_and_model_ids_outside_the_allow_list(pool, tiny_causal) -> None:
    with pytest.raises(ModelValidationError) as error:
        await pool.load.remote({"name": "remote", "model_id": str(tiny_causal), "trust_remote_code": True})
    assert error.value.field == "trust_remote_code" and "ADMIN_ALLOW_REMOTE_CODE" in error.value.message
    for model_id in ("someone/else", f"{tiny_causal.parent}/../../etc", "/elsewhere/model"):
        with pytest.raises(ModelValidationError) as error:
            await pool.load.remote({"name": "outside", "model_id": model_id})
        assert error.value.field == "model_id" and "ADMIN_MODELS" in error.value.message, model_id
    # Where a replica writes on its node is the operator's to say, not an admin client's.
    for field, value in (("packed_cache_dir", "/etc/cron.d"), ("packed_cache_gb", 1000)):
        with pytest.raises(ModelValidationError) as error:
            await pool.load.remote({"name": "writer", "model_id": str(tiny_causal), field: value})
        assert error.value.field == field and field.upper() in error.value.message
    assert {m["id"] for m in await pool.list_models.remote()} & {"remote", "outside", "writer"} == set()


async def test_reserved_names_are_refused_at_load_and_the_bystander_keeps_running(pool, tiny_causal) -> None:
    for name in (POOL, "bystander"):
        with pytest.raises(ModelExistsError) as error:
            await pool.load.remote({"name": name, "model_id": str(tiny_causal)})
        assert "reserved" in str(error.value), name
    assert serve.status().applications["bystander"].status == "RUNNING"
    assert await serve.get_app_handle("bystander").remote() == "still here"


async def test_the_gateway_serves_a_reloaded_models_new_limits_within_one_refresh(pool, tiny_causal) -> None:
    backend = PoolBackend(pool, build_settings({"MODEL_ID": str(tiny_causal)}), refresh_s=0.2)
    await pool.load.remote({"name": "limits", "model_id": str(tiny_causal), "max_new_tokens_limit": 16,
                            "max_new_tokens": 8})  # fmt: skip
    assert (await backend.resolve("limits")).max_new_tokens_limit == 16
    request = GenerationRequest(request_id="r1", params=SamplingParams(max_new_tokens=2), prompts=("Write",))
    _, completions = await backend.generate(await backend.resolve("limits"), request)
    assert len(completions) == 1
    assert (await pool.unload.remote("limits", wait_s=60))["unloaded"]
    await pool.load.remote({"name": "limits", "model_id": str(tiny_causal), "max_new_tokens_limit": 64,
                            "max_new_tokens": 8})  # fmt: skip
    await asyncio.sleep(0.25)  # one refresh (refresh_s) after the reload; the same backend, no Gateway restart
    assert (await backend.resolve("limits")).max_new_tokens_limit == 64
