"""Packed layers moved onto 2 MB pages after the first answer: the same bytes, the same answers, and nothing
moved where the kernel gives no huge pages or the setting is off."""

from __future__ import annotations

import mmap
import threading
from pathlib import Path

import pytest
import torch

from engine import hugepages, onednn_bytes
from engine.cpu import PackedLinear
from engine.model import EngineConfig, TextGenerator
from engine.timing import PhaseTimer
from engine.types import SamplingParams
from testing.checkpoints import build_tiny_causal

pytestmark = pytest.mark.skipif(
    not (torch.backends.mkldnn.is_available() and onednn_bytes.supported()),
    reason="this build of torch cannot pack layers for oneDNN or make them over given bytes",
)
GREEDY = SamplingParams(max_new_tokens=12, temperature=0.0, ignore_eos=True)
PROMPTS = ["def add(a, b):", "import os", "Return the number of"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_causal(tmp_path_factory.mktemp("tiny"))


def load(path: Path, dtype: str, huge_pages: bool = True) -> tuple[TextGenerator, dict]:
    timer = PhaseTimer()
    config = EngineConfig(model_id=str(path), dtype=dtype, num_threads=1, packed_cache_dir="", huge_pages=huge_pages)
    return TextGenerator.load(config, timer), timer.facts


def packed(engine: TextGenerator) -> list[PackedLinear]:
    return [m for m in engine.model.modules() if isinstance(m, PackedLinear)]


def copied() -> None:
    """Wait for the thread that copies the layers: the engine points them at the copy at its next step boundary."""
    for thread in threading.enumerate():
        if thread.name == "huge-pages":
            thread.join(timeout=60)


def test_a_moved_layer_computes_exactly_what_it_did() -> None:
    torch.manual_seed(0)
    model = torch.nn.ModuleList(
        [PackedLinear(torch.randn(96, 80).bfloat16(), torch.randn(96).bfloat16(), rows_hint=8) for _ in range(3)]
    )
    x = torch.randn(5, 80).bfloat16()
    before = [layer(x) for layer in model]
    facts = hugepages.move_to_huge_pages(model, mode=lambda: "madvise")
    region = model[0].backing
    assert isinstance(region, mmap.mmap) and all(layer.backing is region for layer in model)
    assert facts["huge_pages"].startswith("moved 3 layers") and facts["huge_page_bytes"] >= 0
    assert all(torch.equal(layer(x), want) for layer, want in zip(model, before, strict=True))


def test_no_huge_pages_no_move() -> None:
    layer = PackedLinear(torch.randn(16, 32), None, rows_hint=4)
    old = layer.packed
    facts = hugepages.move_to_huge_pages(torch.nn.ModuleList([layer]), mode=lambda: "never")
    assert facts == {"huge_pages": "not used: transparent huge pages are never"} and layer.packed is old
    assert hugepages.move_to_huge_pages(torch.nn.Linear(2, 2)) == {}  # nothing packed: nothing to say


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_engine_moves_its_layers_after_its_first_answer_and_answers_alike(tiny: Path, dtype: str) -> None:
    engine, facts = load(tiny, dtype)
    assert facts["huge_pages"] == "after the first answer" and engine.after_first_answer is not None
    ids = engine.encode(PROMPTS, GREEDY)
    first = engine.generate(ids, GREEDY)  # float32 packs after it; then a thread copies the layers
    copied()
    reference, _ = load(tiny, dtype, huge_pages=False)
    assert engine.generate(ids, GREEDY) == reference.generate(ids, GREEDY) == reference.generate(ids, GREEDY)
    layers = packed(engine)
    moved = hugepages.thp_mode() in ("always", "madvise")
    assert layers and all(isinstance(layer.backing, mmap.mmap) == moved for layer in layers)
    assert engine.generate(ids, GREEDY) == reference.generate(ids, GREEDY)  # on the copy from its first step
    if dtype == "bfloat16":  # packed at load: the first answer ran on the same packed layers
        assert first == reference.generate(ids, GREEDY)


def test_huge_pages_off_leaves_the_layers_where_torch_put_them(tiny: Path) -> None:
    engine, facts = load(tiny, "bfloat16", huge_pages=False)
    assert "huge_pages" not in facts and engine.after_first_answer is None
    engine.generate(engine.encode(PROMPTS, GREEDY), GREEDY)
    assert all(layer.backing is None for layer in packed(engine))


def test_the_swap_waits_for_a_step_boundary_while_the_engine_decodes(tiny: Path) -> None:
    # The copy is made while the engine serves; the layers change only between two steps.
    engine, _ = load(tiny, "bfloat16")
    engine.after_first_answer = None  # moved by hand below
    apply, facts = hugepages.copy_to_huge_pages(engine.model, mode=lambda: "madvise")
    assert apply is not None and facts["huge_pages"].startswith("moved")
    steps: list[bool] = []
    engine.between_steps(lambda: (apply(), steps.append(True)))
    ids = engine.encode(PROMPTS, GREEDY)
    reference, _ = load(tiny, "bfloat16", huge_pages=False)
    assert engine.generate(ids, GREEDY) == reference.generate(ids, GREEDY)
    assert steps == [True] and all(isinstance(layer.backing, mmap.mmap) for layer in packed(engine))
    engine.between_steps(lambda: 1 / 0)  # a failing job is logged; the batch goes on
    assert engine.generate(ids, GREEDY) == reference.generate(ids, GREEDY)


def test_huge_bytes_reads_the_mapping_that_holds_an_address(tmp_path: Path) -> None:
    smaps = tmp_path / "smaps"
    smaps.write_text(
        "7f0000000000-7f0000400000 rw-p 00000000 00:00 0\nRss: 4096 kB\nAnonHugePages:      2048 kB\n"
        "7f0000400000-7f0000800000 rw-p 00000000 00:00 0\nAnonHugePages:         0 kB\n"
    )
    assert hugepages.huge_bytes(0x7F0000001000, smaps) == 2048 * 1024
    assert hugepages.huge_bytes(0x7F0000500000, smaps) == 0
    assert hugepages.huge_bytes(0x1000, smaps) == 0
    assert hugepages.huge_bytes(0x1000, tmp_path / "missing") == 0
