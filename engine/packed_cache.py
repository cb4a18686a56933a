"""Packed linear layers kept on disk, so that a wake maps them instead of converting and reordering every weight.

:func:`engine.cpu.pack_linears` reorders each linear layer's weight into oneDNN's blocked layout, and
``DTYPE=auto`` first converts a float32 checkpoint to bfloat16. Both cost a wake time in proportion to
the model's size, and both give the same bytes every time for the same checkpoint files, dtype,
batch size (the layout is chosen for it), CPU and build of torch. So the result is kept: each packed
weight's bytes as oneDNN holds them, beside oneDNN's own description of their layout, which is how
torch's ahead-of-time compiler stores packed constants. A later load with the same key maps the file
and hands oneDNN the bytes as they are: nothing converted, nothing reordered, and the pages are the
page cache's, shared by every replica of that model on the node.

An entry is a directory ``DIR/<key>/`` holding ``index.json`` (each layer's name, shape, dtype, offset,
size and layout) and ``weights.bin`` (the bytes, each layer at a page boundary). It is written under
a temporary name and renamed, so a reader sees a whole entry or none. Nothing in it is code: JSON and
raw bytes. Entries not used for longest are removed to keep the directory under its limit.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import hashlib
import json
import logging
import mmap
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy
import torch

from engine import onednn_bytes
from engine.cpu import (
    PackedLinear,
    can_pack,
    cpu_flags,
    packable_layers,
    prepare_cpu_model,
    to_bfloat16,
)
from engine.hugepages import move_later, move_to_huge_pages
from engine.loading import MADV_POPULATE_READ

logger = logging.getLogger(__name__)

FORMAT = 1
PAGE = mmap.PAGESIZE
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".json")


def checkpoint_files(model_id: str) -> tuple[Path, list[list[Any]]] | None:
    """The checkpoint's directory and what identifies its files (name, size, modification time, target).

    A local directory, or a hub ID's snapshot in the local cache; None when neither is on this node
    (then nothing is cached). A hub snapshot's files are links to blobs named by their content hash.
    """
    path = Path(model_id).expanduser()
    if not path.is_dir():
        try:
            from huggingface_hub import try_to_load_from_cache

            found = try_to_load_from_cache(model_id, "config.json")
        except Exception:  # an id the hub's cache cannot hold
            return None
        if not isinstance(found, str):
            return None
        path = Path(found).parent
    files = []
    for file in sorted(path.iterdir()):
        if file.suffix in _WEIGHT_SUFFIXES and file.is_file():
            stat = file.stat()
            files.append([file.name, stat.st_size, stat.st_mtime_ns, file.resolve().name])
    return path.resolve(), files


def cache_key(model: Any, model_id: str, dtype: torch.dtype, rows_hint: int) -> str | None:
    """The entry a model's packed layers belong to, or None when its checkpoint cannot be identified."""
    found = checkpoint_files(model_id)
    if found is None:
        return None
    directory, files = found
    key = {
        "format": FORMAT,
        "checkpoint": str(directory),
        "files": files,
        "class": type(model).__name__,
        "dtype": str(dtype).removeprefix("torch."),
        "rows_hint": rows_hint,
        "torch": torch.__version__,
        "cpu": sorted(cpu_flags()),
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]


def open_cache(directory: str | None, max_gb: float) -> PackedCache | None:
    """The cache ``PACKED_CACHE_DIR`` names (``~``: this node's home), or None: unset, a limit of 0, unsupported."""
    if not directory or max_gb <= 0:
        return None
    if not onednn_bytes.supported():
        logger.info("packed-layer cache off: this build of torch cannot map packed layers (%s)", torch.__version__)
        return None
    return PackedCache(Path(directory).expanduser(), int(max_gb * 1e9))


def prepare_cached(
    model: Any,
    cache: PackedCache | None,
    model_id: str,
    *,
    split: bool,
    rows_hint: int,
    then_bfloat16: bool,
    touch: Callable[[Any], dict[str, Any]],
    huge_pages: bool = False,
    between_steps: Callable[[Callable[[], None]], None] | None = None,
) -> tuple[dict[str, Any], Callable[[], None] | None]:
    """:func:`engine.cpu.prepare_cpu_model`, the packed layers taken from ``cache`` when it has them, kept when not.

    A hit replaces the layers before ``touch`` maps the weights' pages, so a float32 checkpoint's
    plain layers are never read; ``DTYPE=auto``'s bfloat16 then holds from the first answer on (the
    rest of the model is converted at once: embeddings, norms, biases). A miss packs as without a
    cache, at load or after the first answer, and a thread writes the entry once it is packed.
    ``huge_pages``: after the first answer (and the packing then, if any, and once the entry is
    written), a thread copies the packed layers onto 2 MB pages and hands ``between_steps`` the swap
    (:mod:`engine.hugepages`); without ``between_steps`` they move at once.
    """
    key = target = None
    quantized = getattr(model.config, "quantization_config", None) is not None
    if cache is not None and not split and not quantized and can_pack(model):
        target = torch.bfloat16 if then_bfloat16 else model.dtype
        key = cache_key(model, model_id, target, rows_hint)
    restored = cache.restore(model, key, target) if cache is not None and key is not None else {}
    if restored and then_bfloat16:
        restored["converted_to_bfloat16"] = to_bfloat16(model)
    facts = touch(model)
    cpu_facts, later = prepare_cpu_model(
        model, split, rows_hint, then_bfloat16=then_bfloat16 and not restored, packed=bool(restored)
    )
    facts.update(cpu_facts)
    facts.update(restored)
    writer = None  # the thread writing an entry packed at load
    store_after = False  # an entry to write once the first answer's packing is done
    if cache is not None and key is not None and not restored:
        facts["packed_cache"] = "miss"
        if later is None:  # packed at load
            writer = cache.store_later(model, key)
        else:
            store_after = True
    # Packed in torch's memory, now or after the first answer. Layers mapped from the cache stay: its file
    # pages read as fast as 2 MB pages (engine.hugepages), and a node's replicas share them.
    packs = bool(facts.get("packed_linears")) or str(facts.get("packing", "")).startswith("after")
    move = huge_pages and packs and not restored
    if move:
        facts["huge_pages"] = "after the first answer"
    elif huge_pages and restored:
        facts["huge_pages"] = "not needed: the layers are the cache's file pages"
    if not move and not store_after:
        return facts, later
    pack = later

    def after_first_answer() -> None:
        if pack is not None:
            pack()
        written = writer
        if store_after:
            assert cache is not None and key is not None
            written = cache.store_later(model, key)
        if not move:
            return
        if between_steps is None:
            if written is not None:
                written.join()  # it reads the layers' bytes, which the move frees
            move_to_huge_pages(model)
        else:
            move_later(model, between_steps, after=written)

    return facts, after_first_answer


class PackedCache:
    """A directory of packed layers, at most ``max_bytes`` in all.

    Example::

        cache = PackedCache(Path("~/.cache/llm/packed").expanduser(), max_bytes=32 * 10**9)
        key = cache_key(model, "models/pydoc-gpt-mini", torch.bfloat16, rows_hint=16)
        facts = cache.restore(model, key, torch.bfloat16)  # {} when there is no entry: pack, then
        cache.store_later(model, key)                      # written by a thread
    """

    def __init__(self, directory: Path, max_bytes: int) -> None:
        self.directory = directory
        self.max_bytes = max_bytes

    # --- reading -----------------------------------------------------------------------------
    def restore(self, model: Any, key: str, dtype: torch.dtype) -> dict[str, Any]:
        """Put the entry's packed layers in the model's place (every one, or none); facts, or {} for none.

        The entry must hold exactly the layers :func:`engine.cpu.packable_layers` finds, with their
        shapes, in ``dtype``; a layer is checked against its own weight before anything is replaced.
        Biases come from the model, converted to ``dtype``.
        """
        started = time.monotonic()
        entry = self.directory / key
        try:
            index = json.loads((entry / "index.json").read_text())
            with open(entry / "weights.bin", "rb") as file:
                size = os.fstat(file.fileno()).st_size
                mapping = mmap.mmap(file.fileno(), size, prot=mmap.PROT_READ) if size else None
        except (OSError, ValueError):
            return {}
        layers = {name: (parent, attr, child) for name, parent, attr, child in packable_layers(model)}
        try:
            built = self._layers(index, layers, mapping, size, dtype)
        except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as exc:
            return self._miss(key, str(exc) or type(exc).__name__)
        first = next(iter(built))
        if not _agrees(built[first], layers[first][2], dtype):
            return self._miss(key, f"layer {first} computes differently from the checkpoint's weight")
        for name, layer in built.items():
            parent, attr, _ = layers[name]
            setattr(parent, attr, layer)
        _populate(mapping)
        with contextlib.suppress(OSError):  # most recently used: kept longest (a read-only directory keeps all)
            os.utime(entry / "index.json")
        return {
            "packed_linears": len(built),
            "packed_cache": "hit",
            "packed_cache_bytes": size,
            "packing": f"from the cache, {time.monotonic() - started:.2f}s",
        }

    @staticmethod
    def _layers(
        index: Any, layers: dict[str, Any], mapping: mmap.mmap | None, size: int, dtype: torch.dtype
    ) -> dict[str, PackedLinear]:
        """The entry's layers over ``mapping``, by name; ValueError (or a lookup error) where they do not fit."""
        stored = {layer["name"]: layer for layer in index["layers"]}
        if index["format"] != FORMAT or index["digest"] != _digest(index["layers"]):
            raise ValueError("its index is damaged")  # oneDNN does not check a layout it is handed
        if mapping is None or set(stored) != set(layers):
            raise ValueError("its layers are not this model's")
        base = numpy.frombuffer(mapping, dtype=numpy.uint8).ctypes.data
        built = {}
        for name, layer in stored.items():
            child = layers[name][2]
            end = layer["offset"] + layer["bytes"]
            if layer["shape"] != list(_shape(child)) or layer["dtype"] != str(dtype).removeprefix("torch."):
                raise ValueError(f"layer {name} does not match")
            if not 0 <= layer["offset"] <= end <= size:
                raise ValueError(f"layer {name} lies outside weights.bin")
            packed = onednn_bytes.tensor_over(
                base + layer["offset"], layer["shape"], dtype, base64.b64decode(layer["layout"])
            )
            if packed is None or onednn_bytes.size(packed) != layer["bytes"]:
                raise ValueError(f"layer {name}'s layout is not readable here")
            bias = None if child.bias is None else child.bias.detach().to(dtype)
            built[name] = PackedLinear.mapped(packed, bias, dtype, mapping)
        return built

    def _miss(self, key: str, why: str) -> dict[str, Any]:
        logger.warning("packed-layer cache entry %s not used: %s; packing instead", key, why)
        return {}

    # --- writing -----------------------------------------------------------------------------
    def store_later(self, model: Any, key: str) -> threading.Thread:
        """Write the model's packed layers as entry ``key`` from a thread; the engine goes on meanwhile."""
        layers = [(name, module) for name, module in model.named_modules() if isinstance(module, PackedLinear)]
        thread = threading.Thread(target=self._store_logged, args=(layers, key), name="packed-cache", daemon=True)
        thread.start()
        return thread

    def _store_logged(self, layers: list[tuple[str, PackedLinear]], key: str) -> None:
        try:
            self.store(layers, key)
        except OSError as exc:
            logger.warning("packed-layer cache: could not write entry %s in %s (%s)", key, self.directory, exc)

    def store(self, layers: list[tuple[str, PackedLinear]], key: str) -> bool:
        """Write ``layers`` as entry ``key`` unless it exists or cannot fit under the limit; whether written."""
        final = self.directory / key
        if final.exists() or not layers:
            return False
        entries, offset = [], 0
        for name, layer in layers:
            size = onednn_bytes.size(layer.packed)
            layout = onednn_bytes.layout(layer.packed)
            entries.append(
                {
                    "name": name,
                    "shape": [layer.out_features, layer.in_features],
                    "dtype": str(layer.dtype).removeprefix("torch."),
                    "offset": offset,
                    "bytes": size,
                    "layout": base64.b64encode(layout).decode(),
                }
            )
            offset += -(-size // PAGE) * PAGE
        if offset > self.max_bytes:
            logger.info("packed-layer cache: %.2f GB is over its %.2f GB; not kept", offset / 1e9, self.max_bytes / 1e9)
            return False
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._make_room(offset)
        temporary = self.directory / f".writing-{key}-{uuid.uuid4().hex[:8]}"
        temporary.mkdir(mode=0o700)
        try:
            with open(temporary / "weights.bin", "wb") as file:
                for (_, layer), entry in zip(layers, entries, strict=True):
                    file.seek(entry["offset"])
                    file.write(
                        memoryview((ctypes.c_char * entry["bytes"]).from_address(onednn_bytes.address(layer.packed)))
                    )
                file.truncate(offset)
                os.fsync(file.fileno())  # on disk before the rename: a crash leaves no renamed, unwritten entry
            with open(temporary / "index.json", "w") as file:
                json.dump({"format": FORMAT, "layers": entries, "digest": _digest(entries)}, file)
                file.flush()
                os.fsync(file.fileno())
            os.rename(temporary, final)  # whole or not at all; another writer's entry wins
        except OSError:
            shutil.rmtree(temporary, ignore_errors=True)
            if not final.exists():
                raise
            return False
        logger.info("packed-layer cache: wrote entry %s (%.2f GB) in %s", key, offset / 1e9, self.directory)
        return True

    def _make_room(self, needed: int) -> None:
        """Remove the entries used longest ago (and writes abandoned over an hour ago) until ``needed`` fits."""
        entries = []
        for path in self.directory.iterdir():
            try:
                if path.name.startswith(".writing-"):
                    if time.time() - path.stat().st_mtime > 3600:
                        shutil.rmtree(path, ignore_errors=True)
                    continue
                entries.append(((path / "index.json").stat().st_mtime, (path / "weights.bin").stat().st_size, path))
            except OSError:
                continue
        total = sum(size for _, size, _ in entries)
        for _, size, path in sorted(entries):
            if total + needed <= self.max_bytes:
                break
            shutil.rmtree(path, ignore_errors=True)  # a replica that maps it keeps its pages
            total -= size
            logger.info("packed-layer cache: removed entry %s to make room", path.name)


def _digest(layers: Any) -> str:
    """A checksum of the index's layers (shapes, offsets, layouts): a damaged index is not used."""
    return hashlib.sha256(json.dumps(layers, sort_keys=True).encode()).hexdigest()


def _shape(child: Any) -> tuple[int, int]:
    """(out, in) of a layer :func:`engine.cpu.packable_layers` found (GPT-2's ``Conv1D`` stores [in, out])."""
    rows, cols = child.weight.shape
    return (rows, cols) if isinstance(child, torch.nn.Linear) else (cols, rows)


def _agrees(layer: PackedLinear, child: Any, dtype: torch.dtype) -> bool:
    """Whether the restored layer computes what the checkpoint's weight does (a stale entry would not)."""
    weight = child.weight.detach().to(dtype)
    weight = weight if isinstance(child, torch.nn.Linear) else weight.t()
    x = torch.randn(4, layer.in_features, generator=torch.Generator().manual_seed(0)).to(dtype)
    bias = None if child.bias is None else child.bias.detach().to(dtype)
    expected = torch.nn.functional.linear(x, weight, bias).float()
    return bool(torch.allclose(layer(x).float(), expected, rtol=2e-2, atol=2e-2 * expected.abs().max().item()))


def _populate(mapping: mmap.mmap) -> None:
    """Map every page of the entry now, so that no request pays page faults (as ``touch_weights`` does)."""
    try:
        mapping.madvise(MADV_POPULATE_READ)
    except OSError:  # an old kernel: read one byte per page instead
        numpy.frombuffer(mapping, dtype=numpy.uint8)[::PAGE].sum()
