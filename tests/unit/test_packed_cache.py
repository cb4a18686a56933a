"""Packed layers kept on disk: a second load maps them, answers as the first load's packed model did, and a stale,
damaged or oversized entry is never used."""

from __future__ import annotations

import ctypes
import json
import logging
import os
import threading
from pathlib import Path

import pytest
import torch

from engine import onednn_bytes, packed_cache
from engine.cpu import NATIVE_BF16_FLAGS, PackedLinear, cpu_flags
from engine.model import EngineConfig, TextGenerator
from engine.packed_cache import PackedCache, open_cache
from engine.timing import PhaseTimer
from engine.types import SamplingParams
from testing.checkpoints import build_tiny_causal, build_tiny_llama
from testing.polling import wait_for

pytestmark = pytest.mark.skipif(
    not (torch.backends.mkldnn.is_available() and onednn_bytes.supported()),
    reason="this build of torch cannot pack layers for oneDNN or map them back",
)
DTYPES = ["float32", "auto"] + (["bfloat16"] if cpu_flags() & set(NATIVE_BF16_FLAGS) else [])
GREEDY = SamplingParams(max_new_tokens=10, temperature=0.0, ignore_eos=True)
PROMPTS = ["def add(a, b):", "import os", "Return the number of"]


def load(path: Path, cache: Path, dtype: str = "auto", huge_pages: bool = False) -> tuple[TextGenerator, dict]:
    timer = PhaseTimer()
    config = EngineConfig(
        model_id=str(path), dtype=dtype, num_threads=1, packed_cache_dir=str(cache), huge_pages=huge_pages
    )
    return TextGenerator.load(config, timer), timer.facts


def entries(cache: Path) -> list[Path]:
    """Whole entries (a write in progress is a hidden directory until it is renamed)."""
    return sorted(p for p in cache.iterdir() if not p.name.startswith(".")) if cache.exists() else []


def packed_answers(engine: TextGenerator) -> list:
    """Answers once the engine's layers are packed: a first answer runs any packing left for after it."""
    ids = engine.encode(PROMPTS, GREEDY)
    packed = engine.after_first_answer is None and _all_packed(engine)
    first = engine.generate(ids, GREEDY)
    return first if packed else engine.generate(ids, GREEDY)


def activations(engine: TextGenerator) -> list:
    """Each packed layer's folded activation, and each activation module's type, in module order."""
    return [
        m.activation if isinstance(m, PackedLinear) else type(m).__name__
        for m in engine.model.modules()
        if isinstance(m, PackedLinear) or "GELU" in type(m).__name__ or isinstance(m, torch.nn.Identity)
    ]


def _all_packed(engine: TextGenerator) -> bool:
    return not any(isinstance(m, torch.nn.Linear) and not isinstance(m, PackedLinear) for m in engine.model.modules())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_packed_weights_bytes_and_layout_make_the_same_layer_again(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    layer = PackedLinear(torch.randn(48, 80).to(dtype), torch.randn(48).to(dtype), rows_hint=8)
    copy = bytearray(ctypes.string_at(onednn_bytes.address(layer.packed), onednn_bytes.size(layer.packed)))
    address = ctypes.addressof(ctypes.c_char.from_buffer(copy))
    again = PackedLinear.mapped(
        onednn_bytes.tensor_over(address, [48, 80], dtype, onednn_bytes.layout(layer.packed)), layer.bias, dtype, copy
    )
    x = torch.randn(5, 80).to(dtype)
    assert torch.equal(again(x), layer(x))


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_a_second_load_maps_the_packed_layers_and_answers_the_same(
    kind: str, dtype: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    root = tmp_path_factory.mktemp(f"{kind}-{dtype}")
    path = build_tiny_causal(root / "model") if kind == "gpt2" else build_tiny_llama(root / "model")
    cache = root / "cache"
    engine, facts = load(path, cache, dtype)
    assert facts["packed_cache"] == "miss"  # a new directory (bfloat16 packs at load: its entry follows at once)
    expected = packed_answers(engine)
    wait_for(lambda: entries(cache), timeout=30, what="the entry written after packing")
    assert oct(cache.stat().st_mode & 0o777) == oct(0o700)

    again, facts = load(path, cache, dtype)
    assert facts["packed_cache"] == "hit" and facts["packed_linears"] > 0
    assert again.after_first_answer is None and _all_packed(again)  # nothing left to convert or pack
    assert again.model.dtype == engine.model.dtype  # auto: bfloat16 (or float32) from the first answer on
    assert facts["placement"]["dtype"] == str(again.model.dtype).removeprefix("torch.")
    assert "dtype_after_first_answer" not in facts["placement"]
    if dtype == "auto" and again.model.dtype == torch.bfloat16:
        assert facts["dtype_reason"].endswith("its packed bfloat16 layers came from the cache")
    assert again.generate(again.encode(PROMPTS, GREEDY), GREEDY) == expected
    # The same computation as the packing load's, GELUs folded into their layers alike.
    assert facts["folded_activations"] == (2 if kind == "gpt2" else 0)
    assert activations(again) == activations(engine)
    layer = next(m for m in again.model.modules() if isinstance(m, PackedLinear))
    assert isinstance(layer.backing, packed_cache.mmap.mmap)  # the file's pages, not a copy
    assert len(entries(cache)) == 1  # a hit writes nothing


@pytest.mark.parametrize("dtype", DTYPES)
def test_moved_layers_write_the_same_entry_and_a_hit_stays_on_the_files_pages(dtype: str, tmp_path: Path) -> None:
    # The move frees the bytes the cache's writer reads: it waits for the writer (packed at load) or runs
    # before it (packed after the first answer); either way the entry is the packed layers' own bytes.
    from engine.hugepages import thp_mode

    path, cache = build_tiny_causal(tmp_path / "model"), tmp_path / "cache"
    plain, _ = load(path, tmp_path / "other-cache", dtype)
    expected = packed_answers(plain)
    engine, facts = load(path, cache, dtype, huge_pages=True)
    assert facts["packed_cache"] == "miss" and facts["huge_pages"] == "after the first answer"
    assert packed_answers(engine) == expected
    wait_for(lambda: entries(cache), timeout=30, what="the entry written after packing")
    for thread in threading.enumerate():  # the copy onto huge pages waits for the writer
        if thread.name == "huge-pages":
            thread.join(timeout=60)
    assert engine.generate(engine.encode(PROMPTS, GREEDY), GREEDY) == expected  # the swap, at its first step
    moved = thp_mode() in ("always", "madvise")
    layers = [m for m in engine.model.modules() if isinstance(m, PackedLinear)]
    assert all(isinstance(layer.backing, packed_cache.mmap.mmap) == moved for layer in layers)

    again, facts = load(path, cache, dtype, huge_pages=True)
    # The cache's file pages read as fast as huge ones: a hit leaves them where they are.
    assert facts["packed_cache"] == "hit" and facts["huge_pages"].startswith("not needed")
    assert again.after_first_answer is None
    layer = next(m for m in again.model.modules() if isinstance(m, PackedLinear))
    file_pages = layer.backing
    assert again.generate(again.encode(PROMPTS, GREEDY), GREEDY) == expected and layer.backing is file_pages


def test_a_changed_checkpoint_gets_its_own_entry(tmp_path: Path) -> None:
    path, cache = build_tiny_causal(tmp_path / "model"), tmp_path / "cache"
    packed_answers(load(path, cache, "float32")[0])
    wait_for(lambda: entries(cache), timeout=30, what="the first entry")
    weights = path / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 1))  # a new file, same size
    engine, facts = load(path, cache, "float32")
    assert facts["packed_cache"] == "miss"
    packed_answers(engine)
    wait_for(lambda: len(entries(cache)) == 2, timeout=30, what="the second entry")


@pytest.mark.parametrize("damage", ["values", "shape", "resealed", "truncated", "index", "layout"])
def test_a_damaged_entry_is_not_used_and_the_load_packs_instead(
    damage: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path, cache = build_tiny_causal(tmp_path / "model"), tmp_path / "cache"
    expected = packed_answers(load(path, cache, "float32")[0])
    [entry] = wait_for(lambda: entries(cache), timeout=30, what="the entry")
    index = json.loads((entry / "index.json").read_text())
    if damage == "values":  # other numbers where the first layer's weight was
        first = index["layers"][0]
        with open(entry / "weights.bin", "r+b") as file:
            file.seek(first["offset"])
            file.write(torch.randn(first["bytes"] // 4).numpy().tobytes())
    elif damage in ("shape", "resealed"):  # resealed: a consistent index, of another model's layer
        index["layers"][1]["shape"] = [1, 1]
        if damage == "resealed":
            index["digest"] = packed_cache._digest(index["layers"])
    elif damage == "truncated":
        os.truncate(entry / "weights.bin", index["layers"][-1]["offset"])
    elif damage == "index":
        (entry / "index.json").write_text("{not json")
    else:
        index["layers"][0]["layout"] = "AAAA"
    if damage in ("shape", "resealed", "layout"):
        (entry / "index.json").write_text(json.dumps(index))
    with caplog.at_level(logging.WARNING, logger="engine.packed_cache"):
        engine, facts = load(path, cache, "float32")
    assert facts["packed_cache"] == "miss"
    if damage != "index":  # an unreadable index is no entry at all
        why = {"values": "computes differently", "resealed": "does not match", "truncated": "outside weights.bin"}
        assert "not used: " in caplog.text and why.get(damage, "its index is damaged") in caplog.text
    assert packed_answers(engine) == expected


def test_the_limit_removes_the_entries_used_longest_ago(tmp_path: Path, tiny_causal: Path) -> None:
    engine, _ = load(tiny_causal, tmp_path / "first", "float32")
    packed_answers(engine)
    layers = [(name, m) for name, m in engine.model.named_modules() if isinstance(m, PackedLinear)]
    size = sum(-(-torch.ops.mkldnn._nbytes(m.packed) // packed_cache.PAGE) * packed_cache.PAGE for _, m in layers)
    cache = PackedCache(tmp_path / "cache", max_bytes=2 * size)
    assert cache.store(layers, "a") and cache.store(layers, "b")
    os.utime(cache.directory / "a" / "index.json", ns=(0, 0))  # "a" used longest ago
    assert cache.store(layers, "c")
    assert [p.name for p in entries(cache.directory)] == ["b", "c"]
    assert not cache.store(layers, "c")  # there already
    assert not PackedCache(tmp_path / "small", max_bytes=size - 1).store(layers, "d")  # larger than the limit
    assert not (tmp_path / "small").exists()


def test_no_cache_without_a_directory_or_with_a_limit_of_zero(tmp_path: Path) -> None:
    assert open_cache(None, 32) is None and open_cache("", 32) is None and open_cache(str(tmp_path), 0) is None
    assert open_cache("~/packed", 1).directory == Path.home() / "packed"
