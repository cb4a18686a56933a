"""Loading weights where :mod:`engine.placement` decides, and saying where they went.

``load_weights`` checks a quantized checkpoint's method (:mod:`engine.quantization`), measures the
replica's GPUs, plans the placement, then calls ``from_pretrained`` with the device map and the
per-device budgets. ``placement_facts`` reads back where every weight is (bytes per device, dtype,
quantization) for the cold-start report and /v1/models; ``touch_weights`` maps every page of a
CPU model's weights in one call per tensor, so no request pays page faults.
"""

from __future__ import annotations

import ctypes
import json
import logging
import mmap
import struct
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from engine import placement, quantization
from engine.placement import DeviceMemory, Placement, PlacementError, PlacementRequest

logger = logging.getLogger(__name__)

GB = 1e9
_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}  # stored floats take the load dtype; other tensors keep their size
_SAFETENSORS_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "U32": 4, "I16": 2, "U16": 2}
MADV_POPULATE_READ = 22  # Linux 5.14+: fault in a range's pages in one call


def checkpoint_bytes(model_id: str, dtype_bytes: int | None) -> int | None:
    """Bytes the weights take once loaded, read from a local checkpoint's safetensors headers.

    Floating tensors count at ``dtype_bytes`` (None: as stored); None when there is no local
    safetensors file (a hub ID not downloaded yet; the caller falls back to the model's shape).
    """
    path = Path(model_id).expanduser()
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else []
    if not files:
        return None
    total = 0
    for file in files:
        with file.open("rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            numel = 1
            for dim in entry["shape"]:
                numel *= dim
            stored = entry["data_offsets"][1] - entry["data_offsets"][0]
            total += numel * dtype_bytes if dtype_bytes and entry["dtype"] in _FLOAT_DTYPES else stored
    return total


def shape_bytes(model_cls: Any, model_config: Any, dtype: torch.dtype) -> int | None:
    """Bytes of the model's parameters and buffers at ``dtype``, from a copy built on the meta device.

    None when the model cannot be built that way: its fit is then checked after loading.
    """
    try:
        with torch.device("meta"):
            if hasattr(model_cls, "_from_config"):
                model = model_cls._from_config(model_config, dtype=dtype)
            else:  # an Auto class: the checkpoint's own code (TRUST_REMOTE_CODE)
                model = model_cls.from_config(model_config, dtype=dtype, trust_remote_code=True)
    except Exception:
        logger.warning("could not size the model from its config; its fit is checked after loading", exc_info=True)
        return None
    return _tensor_bytes(_unique_tensors(model))


def gpu_memory() -> list[DeviceMemory]:
    """The GPUs this process sees (Ray sets CUDA_VISIBLE_DEVICES to the replica's), size and free bytes."""
    out = []
    for index in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(index)
        out.append(DeviceMemory(total=total, free=free))
    return out


def load_weights(model_cls: Any, model_config: Any, config: Any, dtype: torch.dtype) -> tuple[Any, Placement]:
    """``from_pretrained`` with the placement ``config`` (an :class:`engine.model.EngineConfig`) asks for.

    Raises QuantizationError or PlacementError (both ValueError) before reading any weight when
    the checkpoint cannot load here, with a message that names the settings to change.
    """
    label = config.label or f"model {config.model_id!r}"
    quant = quantization.check(model_config, config.device, label)
    request = _request(model_cls, model_config, config, dtype, label, quant is not None)
    decided = placement.plan(request)
    kwargs: dict[str, Any] = {}
    if decided.device_map is not None:
        kwargs["device_map"] = decided.device_map
    if decided.max_memory is not None:
        kwargs["max_memory"] = decided.max_memory
    offload_dir = None
    if decided.offload == "disk":
        offload_dir = tempfile.TemporaryDirectory(prefix="offload-")  # lives as long as the model (kept on it)
        kwargs["offload_folder"] = offload_dir.name
    logger.info("placing %s: %s", label, {**decided.describe(), "weights_gb": _gb(request.weights_bytes)})
    model = model_cls.from_pretrained(
        config.model_id, config=model_config, dtype=dtype, trust_remote_code=config.trust_remote_code, **kwargs
    )
    model._offload_dir = offload_dir
    if model.device.type == "meta":  # the engine feeds inputs to the first module's device
        raise PlacementError(
            f"{label}: the memory budgets {decided.describe()['budgets_gb']} GB leave its first layers on disk; "
            f"raise them (room for the embeddings and the largest layer at least)"
        )
    _check_landed(model, decided, label, request)
    return model, decided


def _request(
    model_cls: Any, model_config: Any, config: Any, dtype: torch.dtype, label: str, quantized: bool
) -> PlacementRequest:
    on_gpu = config.device == "cuda"
    if not on_gpu and config.max_memory is None:
        return PlacementRequest(device="cpu", label=label)  # the plain CPU load: nothing to measure
    dtype_bytes = torch.finfo(dtype).bits // 8
    weights = checkpoint_bytes(config.model_id, None if quantized else dtype_bytes)
    if weights is None and not quantized:
        weights = shape_bytes(model_cls, model_config, dtype)
    kv, note = 0, ""
    if on_gpu:
        tokens = placement.row_tokens(_context(model_config), config.max_prompt_tokens, config.max_new_tokens_limit)
        if tokens:
            rows = config.max_batch_size
            kv = placement.kv_cache_bytes(model_config, dtype_bytes, rows, tokens)
            note = f"MAX_BATCH_SIZE={rows} rows of {tokens} tokens"
    return PlacementRequest(
        device=config.device,
        label=label,
        num_gpus=config.num_gpus or 1.0,
        gpus=gpu_memory() if on_gpu else (),
        weights_bytes=weights,
        kv_cache_bytes=kv,
        kv_cache_note=note,
        gpu_memory_utilization=config.gpu_memory_utilization,
        cpu_offload_bytes=int(config.cpu_offload_gb * GB),
        max_memory=config.max_memory,
    )


def _check_landed(model: Any, decided: Placement, label: str, request: PlacementRequest) -> None:
    """A split that spilled past what was allowed (accelerate places whole blocks) fails here, plainly."""
    landed = set(placement_facts(model)["devices"])
    allowed = set(decided.devices) | ({decided.offload} if decided.offload else set())
    spilled = landed - allowed - {"meta"}
    if spilled:
        raise PlacementError(
            f"{label} did not fit its devices ({', '.join(decided.devices)}): weights landed on "
            f"{', '.join(sorted(spilled))}. It needs {_gb(request.weights_bytes)} of weights; the budgets were "
            f"{decided.describe()['budgets_gb']} GB. Raise NUM_GPUS_PER_REPLICA (num_gpus_per_replica in the "
            f"model's entry) or allow CPU_OFFLOAD_GB."
        )


def placement_facts(model: Any) -> dict[str, Any]:
    """Where the weights are: ``{"devices": {device: bytes}, "dtype": ..., "quantization": ...}``.

    With a device map (a split, or offload), each module's tensors count on the device the map
    gives it: offloaded weights sit on the meta device while host memory or disk holds them.
    """
    per_device: dict[str, int] = {}
    seen: set[int] = set()
    device_map = getattr(model, "hf_device_map", None)
    groups: Iterable[tuple[str, Any]]
    if device_map and len(set(device_map.values())) > 1:
        groups = [(_device_name(dev), model.get_submodule(name) if name else model) for name, dev in device_map.items()]
    else:
        groups = [("", model)]
    for device, module in groups:
        for tensor in _plain(module.parameters(), module.buffers()):
            if id(tensor) in seen:
                continue
            seen.add(id(tensor))
            name = device or str(tensor.device)
            per_device[name] = per_device.get(name, 0) + tensor.numel() * tensor.element_size()
    dtypes = {str(p.dtype).removeprefix("torch.") for p in model.parameters() if p.is_floating_point()}
    return {
        "devices": per_device,
        "dtype": sorted(dtypes)[0] if len(dtypes) == 1 else sorted(dtypes),
        "quantization": quantization.describe(model.config),
    }


def touch_weights(model: Any) -> dict[str, Any]:
    """Map every page of the CPU weights now (one ``madvise`` per tensor), so that no request pays page faults.

    Weights loaded from safetensors on CPU are the file's pages mapped into memory: without this,
    the first forward pass maps them one fault at a time (and reads them from disk when the page
    cache does not hold them). GPU weights were copied to the device: nothing to do there.
    """
    tensors = [t for t in _unique_tensors(model) if t.device.type == "cpu" and t.numel() > 0]
    size = _tensor_bytes(tensors)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        madvise = libc.madvise
    except (OSError, AttributeError):
        return {"touched_bytes": 0, "touch": "unavailable"}
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    page = mmap.PAGESIZE
    failed = 0
    for tensor in tensors:
        start = tensor.data_ptr()
        aligned = start - start % page
        if madvise(aligned, tensor.numel() * tensor.element_size() + (start - aligned), MADV_POPULATE_READ) != 0:
            failed += 1
    if failed:  # an old kernel (EINVAL): read one byte per page instead
        for tensor in tensors:
            flat = tensor.detach().reshape(-1).view(torch.uint8)
            flat[::page].sum()
    return {"touched_bytes": size, "touch": "read" if failed else "madvise"}


def _unique_tensors(model: Any) -> list[torch.Tensor]:
    """The plain tensors that hold the model's data: tied weights once, quantized ones by their parts."""
    return list({id(t): t for t in _plain(model.parameters(), model.buffers())}.values())


def _plain(*groups: Iterable[torch.Tensor]) -> Iterable[torch.Tensor]:
    for group in groups:
        for tensor in group:
            if type(tensor) in (torch.Tensor, torch.nn.Parameter) or not hasattr(tensor, "__tensor_flatten__"):
                yield tensor
            else:  # a tensor subclass (torchao's int8 weights): its data and scales are plain tensors inside
                names, _ = tensor.__tensor_flatten__()
                yield from _plain([getattr(tensor, name) for name in names])


def _tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _device_name(device: Any) -> str:
    return f"cuda:{device}" if isinstance(device, int) else str(device)


def _context(model_config: Any) -> int | None:
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(text, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _gb(n: int | None) -> str:
    return "unknown" if n is None else f"{n / GB:.2f} GB"


def weights_facts(model: Any, seconds: float) -> dict[str, Any]:
    """Bytes of the loaded weights and the load rate, for the cold-start report."""
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}.values()  # tied weights once
    size = sum(t.numel() * t.element_size() for t in tensors)
    return {
        "weights_bytes": size,
        "weights_gb_per_s": round(size / seconds / 1e9, 3) if seconds > 0 else None,
        "device": str(next(iter(tensors)).device) if tensors else None,
    }
