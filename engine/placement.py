"""Where a model's weights go: the replica's devices, a memory budget for each, and whether it fits.

Pure (no torch): :func:`plan` decides from numbers that the loader measures (GPUs visible to the
replica and their memory, the weights' size, the key/value cache to keep room for), so unit tests
drive it with fake device counts and budgets.

Why ``device_map="auto"`` and not tensor parallelism: transformers' tensor-parallel plans run one
process per GPU (``torchrun``: RANK, WORLD_SIZE, a process group), and a Ray Serve replica is one
process. ``device_map="auto"`` (accelerate's dispatch) splits the layers over every GPU the
replica was given, inside that one process: the GPUs take turns (one is busy at a time), so it
buys memory, not speed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

GB = 1e9


class PlacementError(ValueError):
    """The model cannot be placed on the replica's devices (raised before any weight is read)."""


@dataclass(frozen=True)
class DeviceMemory:
    """One device's memory in bytes: its size and what is free now."""

    total: int
    free: int


@dataclass(frozen=True)
class PlacementRequest:
    """What decides a placement. ``label`` names the model in messages (e.g. ``model 'big'``).

    ``max_memory`` (device -> bytes, ``"cpu"`` included) replaces the computed budgets: the way
    to force a split between a GPU and host memory, or, on CPU, an offload of the rest to disk.
    """

    device: Literal["cpu", "cuda"]
    label: str = "the model"
    num_gpus: float = 0.0
    gpus: Sequence[DeviceMemory] = ()
    weights_bytes: int | None = None
    kv_cache_bytes: int = 0
    kv_cache_note: str = ""
    gpu_memory_utilization: float = 0.9
    cpu_offload_bytes: int = 0
    max_memory: Mapping[int | str, int] | None = None


@dataclass(frozen=True)
class Placement:
    """The decision: what to pass to ``from_pretrained`` and what to expect.

    ``device_map`` is None for a plain CPU load, ``{"": "cuda:0"}`` for one device, ``"auto"``
    with ``max_memory`` (bytes per device) for a split. ``offload`` says where weights may go
    beyond the accelerators: ``"cpu"`` (host memory) or ``"disk"`` (needs an offload folder).
    """

    device_map: str | dict[str, str] | None
    max_memory: dict[int | str, int] | None = None
    devices: tuple[str, ...] = ("cpu",)
    offload: Literal["cpu", "disk"] | None = None
    budgets: dict[str, int] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        """The decision as data, for the load log and the cold-start report."""
        mode = "split" if self.device_map == "auto" else "single"
        budgets = {k: round(v / GB, 3) for k, v in self.budgets.items()}
        return {"mode": mode, "budgets_gb": budgets, "offload": self.offload}


def gpus_needed(num_gpus: float) -> int:
    """Devices a replica holds: a fraction shares one; a whole number uses that many."""
    return max(1, math.ceil(num_gpus - 1e-9))


def plan(request: PlacementRequest) -> Placement:
    """Decide where the weights go, or raise :class:`PlacementError` saying what it needs and had.

    >>> plan(PlacementRequest(device="cpu")).device_map is None
    True
    >>> gpu = DeviceMemory(total=80 * 10**9, free=79 * 10**9)
    >>> p = plan(PlacementRequest(device="cuda", num_gpus=2, gpus=[gpu, gpu], weights_bytes=100 * 10**9))
    >>> p.device_map, p.devices, p.max_memory[0] // 10**9
    ('auto', ('cuda:0', 'cuda:1'), 72)
    """
    if request.max_memory is not None:
        return _explicit(request)
    if request.device == "cpu":
        return Placement(device_map=None)
    return _on_gpus(request)


def _explicit(request: PlacementRequest) -> Placement:
    budgets = {_device_name(key): int(value) for key, value in request.max_memory.items()}
    if any(v <= 0 for v in budgets.values()):
        raise PlacementError(f"{request.label}: every device budget must be positive, got {_gb_map(budgets)}")
    if request.device == "cuda":
        missing = [k for k in request.max_memory if isinstance(k, int) and k >= len(request.gpus)]
        if missing:
            raise PlacementError(
                f"{request.label}: a memory budget names GPU {missing[0]} but the replica sees {len(request.gpus)}"
            )
        gpus = {k: v for k, v in request.max_memory.items() if isinstance(k, int)}
        if not gpus:
            raise PlacementError(f"{request.label}: on cuda the memory budgets must name at least one GPU")
        offload = "cpu" if "cpu" in request.max_memory else None
        max_memory = {k: int(v) for k, v in gpus.items()}
        if offload:
            max_memory["cpu"] = int(request.max_memory["cpu"])
        have = sum(max_memory.values())
    else:
        if set(request.max_memory) != {"cpu"}:
            names = list(request.max_memory)
            raise PlacementError(f"{request.label}: on cpu the only memory budget is 'cpu', got {names}")
        max_memory = {"cpu": int(request.max_memory["cpu"])}
        offload = "disk"  # what does not fit host memory is read from disk when used
        have = None
    devices = tuple(_device_name(k) for k in max_memory if k != "cpu") or ("cpu",)
    if have is not None and request.weights_bytes is not None and request.weights_bytes > have:
        raise PlacementError(
            f"{request.label} cannot fit: it needs {_gb(request.weights_bytes)} of weights and the memory budgets "
            f"give {_gb(have)} ({_gb_map(budgets)})"
        )
    return Placement(device_map="auto", max_memory=max_memory, devices=devices, offload=offload, budgets=budgets)


def _on_gpus(request: PlacementRequest) -> Placement:
    need = gpus_needed(request.num_gpus)
    if len(request.gpus) < need:
        raise PlacementError(
            f"{request.label}: NUM_GPUS_PER_REPLICA={request.num_gpus:g} asks for {need} GPU(s) but the replica sees "
            f"{len(request.gpus)} (CUDA_VISIBLE_DEVICES, or a node without enough GPUs)"
        )
    share = min(request.num_gpus, 1.0) if request.num_gpus > 0 else 1.0  # a fraction shares its device
    kv_each = math.ceil(request.kv_cache_bytes / need)  # the layers, hence the cache, spread evenly
    budgets: dict[int | str, int] = {}
    for index, gpu in enumerate(request.gpus[:need]):
        # Never more than is free now: another replica may share the device (fractional GPUs).
        usable = min(int(gpu.total * request.gpu_memory_utilization * share), gpu.free)
        budgets[index] = usable - kv_each
    have_total = sum(min(int(g.total * request.gpu_memory_utilization * share), g.free) for g in request.gpus[:need])
    weights = request.weights_bytes
    offload = request.cpu_offload_bytes
    if min(budgets.values()) <= 0 or (weights is not None and weights + request.kv_cache_bytes > have_total + offload):
        raise PlacementError(_no_fit(request, need, share, have_total))
    names = tuple(f"cuda:{i}" for i in range(need))
    named = {f"cuda:{i}": b for i, b in budgets.items()}
    if need == 1 and not offload:
        return Placement(device_map={"": "cuda:0"}, devices=names, budgets=named)
    max_memory = dict(budgets)
    if offload:
        max_memory["cpu"] = offload
        named["cpu"] = offload
    return Placement(
        device_map="auto", max_memory=max_memory, devices=names, offload="cpu" if offload else None, budgets=named
    )


def _no_fit(request: PlacementRequest, need: int, share: float, have: int) -> str:
    size = request.weights_bytes
    weights = "an unknown size of weights" if size is None else f"{_gb(size)} of weights"
    kv = f" + {_gb(request.kv_cache_bytes)} of key/value cache"
    kv += f" ({request.kv_cache_note})" if request.kv_cache_note else ""
    per_gpu = f"{need} GPU(s) x {_gb(request.gpus[0].total)}"
    share_note = f" x {share:g} of a shared GPU" if share < 1 else ""
    offload = f" + CPU_OFFLOAD_GB={request.cpu_offload_bytes / GB:g}" if request.cpu_offload_bytes else ""
    return (
        f"{request.label} cannot fit: it needs {weights}{kv} and has {_gb(have)} "
        f"({per_gpu}{share_note} x GPU_MEMORY_UTILIZATION={request.gpu_memory_utilization:g}, less what is in use"
        f"{offload}; NUM_GPUS_PER_REPLICA={request.num_gpus:g}). Raise NUM_GPUS_PER_REPLICA (num_gpus_per_replica "
        f"in the model's entry), lower MAX_BATCH_SIZE, MAX_PROMPT_TOKENS or MAX_NEW_TOKENS_LIMIT, allow "
        f"CPU_OFFLOAD_GB, or serve a quantized checkpoint."
    )


def kv_cache_bytes(model_config: Any, dtype_bytes: int, rows: int, tokens: int) -> int:
    """Bytes of keys and values for ``rows`` sequences of ``tokens`` (0 when the shape is unknown).

    >>> from types import SimpleNamespace as C
    >>> kv_cache_bytes(C(num_hidden_layers=2, num_attention_heads=4, hidden_size=64), 2, rows=3, tokens=10)
    15360
    """
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    layers = _first(text, "num_hidden_layers", "n_layer", "num_layers")
    heads = _first(text, "num_attention_heads", "n_head")
    hidden = _first(text, "hidden_size", "n_embd", "d_model")
    if not (layers and heads and hidden):
        return 0
    kv_heads = _first(text, "num_key_value_heads") or heads
    head_dim = _first(text, "head_dim") or hidden // heads
    return 2 * layers * kv_heads * head_dim * dtype_bytes * rows * tokens


def row_tokens(context: int | None, max_prompt_tokens: int | None, max_new_tokens: int | None) -> int | None:
    """The longest sequence one row can hold: the model's context, or less when the limits say so.

    >>> row_tokens(8192, 1000, 24), row_tokens(8192, None, 24), row_tokens(None, None, 24)
    (1024, 8192, None)
    """
    if max_prompt_tokens is not None and max_new_tokens is not None:
        longest = max_prompt_tokens + max_new_tokens
        return min(longest, context) if context else longest
    return context


def _first(config: Any, *names: str) -> int | None:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _device_name(key: int | str) -> str:
    return f"cuda:{key}" if isinstance(key, int) else str(key)


def _gb(n: int | float) -> str:
    return f"{n / GB:.2f} GB"


def _gb_map(budgets: Mapping[str, int]) -> str:
    return ", ".join(f"{k}: {_gb(v)}" for k, v in budgets.items())
