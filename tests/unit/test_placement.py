"""The placement decision over fake GPUs: which devices, what budget each, and the refusals' wording."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from engine.placement import DeviceMemory, PlacementError, PlacementRequest, kv_cache_bytes, plan, row_tokens

GB = 10**9
H100 = DeviceMemory(total=80 * GB, free=79 * GB)


def gpu_request(**changes: object) -> PlacementRequest:
    base: dict[str, object] = {
        "device": "cuda",
        "label": "model 'big'",
        "num_gpus": 1,
        "gpus": [H100],
        "weights_bytes": 10 * GB,
    }
    return PlacementRequest(**{**base, **changes})  # type: ignore[arg-type]


def test_cpu_replica_loads_plainly() -> None:
    placed = plan(PlacementRequest(device="cpu"))
    assert placed.device_map is None and placed.max_memory is None and placed.devices == ("cpu",)


def test_one_gpu_takes_the_whole_model_without_a_split() -> None:
    placed = plan(gpu_request())
    assert placed.device_map == {"": "cuda:0"} and placed.devices == ("cuda:0",) and placed.offload is None
    assert placed.budgets == {"cuda:0": 72 * GB}  # 0.9 of 80 GB, below the 79 GB free


def test_four_gpus_split_the_model_over_all_of_them_leaving_room_for_the_cache() -> None:
    placed = plan(gpu_request(num_gpus=4, gpus=[H100] * 4, weights_bytes=140 * GB, kv_cache_bytes=40 * GB))
    assert placed.device_map == "auto" and placed.devices == ("cuda:0", "cuda:1", "cuda:2", "cuda:3")
    assert placed.max_memory == {i: 72 * GB - 10 * GB for i in range(4)}  # each keeps a quarter of the cache
    assert "cpu" not in placed.max_memory and placed.offload is None


def test_only_the_replicas_share_of_the_visible_gpus_is_used() -> None:
    placed = plan(gpu_request(num_gpus=2, gpus=[H100] * 8, weights_bytes=100 * GB))
    assert placed.devices == ("cuda:0", "cuda:1") and set(placed.max_memory) == {0, 1}


def test_a_fraction_shares_one_device_within_its_share_and_what_is_free() -> None:
    placed = plan(gpu_request(num_gpus=0.5, gpu_memory_utilization=1.0))
    assert placed.device_map == {"": "cuda:0"} and placed.budgets == {"cuda:0": 40 * GB}
    crowded = DeviceMemory(total=80 * GB, free=30 * GB)  # the other half's replica already holds 50 GB
    placed = plan(gpu_request(num_gpus=0.5, gpus=[crowded], gpu_memory_utilization=1.0, weights_bytes=20 * GB))
    assert placed.budgets == {"cuda:0": 30 * GB}


def test_a_model_too_big_for_its_gpus_fails_saying_what_it_needs_and_had() -> None:
    request = gpu_request(
        num_gpus=2, gpus=[H100] * 2, weights_bytes=140 * GB, kv_cache_bytes=8 * GB, kv_cache_note="MAX_BATCH_SIZE=16"
    )
    with pytest.raises(PlacementError) as info:
        plan(request)
    message = str(info.value)
    assert message.startswith("model 'big' cannot fit: it needs 140.00 GB of weights + 8.00 GB of key/value cache")
    assert "has 144.00 GB" in message and "2 GPU(s) x 80.00 GB" in message
    assert "NUM_GPUS_PER_REPLICA=2" in message and "num_gpus_per_replica in the model's entry" in message
    assert "GPU_MEMORY_UTILIZATION=0.9" in message and "(MAX_BATCH_SIZE=16)" in message


def test_the_cache_alone_can_make_a_model_not_fit() -> None:
    with pytest.raises(PlacementError, match=r"cannot fit.*72\.00 GB of key/value cache"):
        plan(gpu_request(weights_bytes=1 * GB, kv_cache_bytes=72 * GB))


def test_host_memory_takes_what_the_gpus_cannot_when_allowed() -> None:
    placed = plan(gpu_request(weights_bytes=100 * GB, cpu_offload_bytes=40 * GB))
    assert placed.device_map == "auto" and placed.max_memory == {0: 72 * GB, "cpu": 40 * GB}
    assert placed.offload == "cpu" and placed.budgets == {"cuda:0": 72 * GB, "cpu": 40 * GB}
    with pytest.raises(PlacementError, match=r"\+ CPU_OFFLOAD_GB=20"):
        plan(gpu_request(weights_bytes=100 * GB, cpu_offload_bytes=20 * GB))


def test_fewer_visible_gpus_than_the_replica_asked_for() -> None:
    with pytest.raises(PlacementError, match=r"NUM_GPUS_PER_REPLICA=4 asks for 4 GPU\(s\) but the replica sees 2"):
        plan(gpu_request(num_gpus=4, gpus=[H100] * 2))


def test_an_unknown_size_is_placed_and_left_to_the_loaders_check() -> None:
    placed = plan(gpu_request(num_gpus=2, gpus=[H100] * 2, weights_bytes=None))
    assert placed.device_map == "auto" and set(placed.max_memory) == {0, 1}


def test_explicit_budgets_force_a_split_between_gpu_and_host() -> None:
    placed = plan(gpu_request(weights_bytes=3 * GB, max_memory={0: 1 * GB, "cpu": 8 * GB}))
    assert placed.device_map == "auto" and placed.max_memory == {0: 1 * GB, "cpu": 8 * GB}
    assert placed.offload == "cpu" and placed.devices == ("cuda:0",)
    with pytest.raises(PlacementError, match=r"needs 3\.00 GB of weights and the memory budgets give 2\.00 GB"):
        plan(gpu_request(weights_bytes=3 * GB, max_memory={0: 1 * GB, "cpu": 1 * GB}))
    with pytest.raises(PlacementError, match="names GPU 1 but the replica sees 1"):
        plan(gpu_request(max_memory={1: GB}))


def test_a_cpu_budget_sends_the_rest_to_disk() -> None:
    placed = plan(PlacementRequest(device="cpu", weights_bytes=5 * GB, max_memory={"cpu": 1 * GB}))
    assert placed.device_map == "auto" and placed.max_memory == {"cpu": GB} and placed.offload == "disk"
    with pytest.raises(PlacementError, match="only memory budget is 'cpu'"):
        plan(PlacementRequest(device="cpu", max_memory={0: GB}))


def test_cache_size_from_the_models_config() -> None:
    llama_70b = SimpleNamespace(num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8, hidden_size=8192)
    # 2 (keys, values) x 80 layers x 8 heads x 128 dims x 2 bytes = 320 KiB per token
    assert kv_cache_bytes(llama_70b, 2, rows=1, tokens=1) == 327_680
    assert kv_cache_bytes(llama_70b, 2, rows=16, tokens=8192) == 327_680 * 16 * 8192
    gpt2 = SimpleNamespace(n_layer=12, n_head=12, n_embd=768)
    assert kv_cache_bytes(gpt2, 4, rows=1, tokens=1) == 2 * 12 * 768 * 4
    assert kv_cache_bytes(SimpleNamespace(), 4, rows=1, tokens=1) == 0


def test_a_row_is_as_long_as_the_limits_allow() -> None:
    assert row_tokens(131072, None, 1024) == 131072  # any prompt up to the context
    assert row_tokens(131072, 4096, 1024) == 5120
    assert row_tokens(1024, 4096, 1024) == 1024
