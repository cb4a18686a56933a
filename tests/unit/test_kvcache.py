"""The in-place key/value cache: answers equal the model's own ``generate``, slots stay in place."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

from engine.kvcache import WIDTH_STEP, SlotCache
from engine.model import EngineConfig, TextGenerator
from engine.types import Delta, SamplingParams, collect
from engine.work import WorkItem

PROMPTS = [
    "Return the number",
    "The socket module provides access to the BSD socket interface and",
    "Raise",
    "A Ray Serve deployment scales between",
    "x",
]


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def pair(request: pytest.FixtureRequest, tiny_causal: Path) -> tuple[TextGenerator, torch.nn.Module]:
    """The engine and, loaded on its own, the same checkpoint as transformers gives it (the reference)."""
    engine = TextGenerator.load(EngineConfig(model_id=str(tiny_causal), num_threads=1, dtype=request.param))
    reference = AutoModelForCausalLM.from_pretrained(tiny_causal, dtype=getattr(torch, request.param)).eval()
    return engine, reference


def reference_text(engine: TextGenerator, reference: torch.nn.Module, ids: list[int], new: int) -> tuple[str, int]:
    """Greedy text and token count from transformers' own ``generate`` on one prompt."""
    with torch.inference_mode():
        out = reference.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=new,
            do_sample=False,
            pad_token_id=engine.pad_id,
        )[0, len(ids) :].tolist()
    return engine.tokenizer.decode(out, skip_special_tokens=True), len(out)


def test_greedy_equals_generate_alone_and_joined_mid_batch(pair) -> None:
    engine, reference = pair
    params = SamplingParams(max_new_tokens=24)
    ids = [engine.encode([p], params)[0] for p in PROMPTS]
    expected = [reference_text(engine, reference, i, 24) for i in ids]
    alone = [engine.generate([i], params)[0] for i in ids]
    assert [(c.text, c.completion_tokens) for c in alone] == expected
    # Joined one by one at different steps, so rows of different lengths share every step.
    items = [WorkItem(stream=0, row=i, prompt_ids=p, params=params) for i, p in enumerate(ids)]
    joins = {2: [items[1]], 5: [items[2], items[3]], 9: [items[4]]}
    polls = 0

    def poll(free: int, shape: object = None) -> list[WorkItem]:
        nonlocal polls
        polls += 1
        return joins.get(polls, [])

    events: list[tuple[WorkItem, Delta]] = []
    engine.run(items[:1], events.extend, poll=poll, max_batch_size=8)
    joined = collect((d for _, d in events), len(items), [len(i) for i in ids])
    assert [(c.text, c.completion_tokens) for c in joined] == expected


def test_rows_leaving_out_of_order_keep_the_others_answers(pair) -> None:
    engine, reference = pair
    lengths = [3, 17, 1, 9, 24]  # rows end at different steps, slots are refilled from the back
    ids = [engine.encode([p], SamplingParams(max_new_tokens=24))[0] for p in PROMPTS]
    params = [SamplingParams(max_new_tokens=n) for n in lengths]
    got = engine.generate(ids, params)
    for completion, prompt, n in zip(got, ids, lengths, strict=True):
        assert (completion.text, completion.completion_tokens) == reference_text(engine, reference, prompt, n)


def test_buffers_are_kept_between_batches_and_grow_only_when_a_row_outgrows_them(tiny_causal: Path) -> None:
    engine = TextGenerator.load(EngineConfig(model_id=str(tiny_causal), num_threads=1))
    cache = engine.slots
    assert cache is not None
    [ids] = engine.encode(["Return"], SamplingParams(max_new_tokens=4))
    engine.generate([ids], SamplingParams(max_new_tokens=4))
    first = cache.slot_layers[0].keys
    assert first is not None and cache.capacity == 64
    engine.generate([ids], SamplingParams(max_new_tokens=4))
    assert cache.slot_layers[0].keys is first  # same buffer: no allocation for the next request
    long = engine.generate([ids], SamplingParams(max_new_tokens=100, stop=()))[0]
    assert cache.capacity == 128 and long.completion_tokens > 0
    assert (
        engine.generate([ids], SamplingParams(max_new_tokens=4))[0].text
        == engine.generate([ids], SamplingParams(max_new_tokens=4))[0].text
    )


def test_a_step_writes_one_entry_per_row_at_its_own_position() -> None:
    prefill = DynamicCache()
    keys = torch.arange(2 * 1 * 3 * 2, dtype=torch.float32).reshape(2, 1, 3, 2)
    prefill.update(keys, -keys, 0)
    cache = SlotCache(num_layers=1)
    cache.reserve(2, 3, like=prefill)
    cache.load(0, prefill, source_row=0, start=1, length=2)  # left-padded prompt of 2 tokens
    cache.load(1, prefill, source_row=1, start=0, length=3)
    mask, positions = cache.begin_step(2, torch.float32, additive=False)
    # The width is the longest row (4 positions) rounded up to WIDTH_STEP: the rest is masked.
    assert positions.tolist() == [2, 3] and mask.shape == (2, 1, 1, WIDTH_STEP)
    assert mask[:, 0, 0].tolist() == [[1, 1, 1] + [0] * (WIDTH_STEP - 3), [1, 1, 1, 1] + [0] * (WIDTH_STEP - 4)]
    new = torch.full((2, 1, 1, 2), 100.0)
    k, _ = cache.update(new, new, 0)
    cache.end_step(2)
    assert k.shape == (2, 1, WIDTH_STEP, 2)
    assert k[0, 0, :3].tolist() == [[2, 3], [4, 5], [100, 100]]
    assert k[1, 0, :4].tolist() == [[6, 7], [8, 9], [10, 11], [100, 100]]
    cache.move(1, 0)  # the last row fills the hole of a row that left
    assert cache.host_lengths[:2] == [4, 0] and cache.slot_layers[0].keys[0, 0, 3].tolist() == [100, 100]


def test_the_attention_width_changes_once_every_width_step_not_every_step() -> None:
    # oneDNN compiles and keeps a kernel per shape: a width that grew with every token made one per step.
    prefill = DynamicCache()
    prefill.update(torch.zeros(1, 1, 3, 2), torch.zeros(1, 1, 3, 2), 0)
    cache = SlotCache(num_layers=1)
    cache.reserve(1, 3, like=prefill)
    cache.load(0, prefill, source_row=0, start=0, length=3)
    widths = []
    for _ in range(3 * WIDTH_STEP - 3):
        mask, _ = cache.begin_step(1, torch.float32, additive=False)
        cache.update(torch.ones(1, 1, 1, 2), torch.ones(1, 1, 1, 2), 0)
        cache.end_step(1)
        widths.append(mask.shape[-1])
        assert int(mask.sum()) == cache.host_lengths[0]  # the row's own positions, and only those
    assert sorted(set(widths)) == [WIDTH_STEP, 2 * WIDTH_STEP, 3 * WIDTH_STEP] and widths == sorted(widths)


def test_a_whole_step_reads_the_buffers_whole_once_the_longest_row_fills_half_of_them() -> None:
    # Whole steps (bfloat16's batched products) read one dense block: no copy of a strided view per step.
    prefill = DynamicCache()
    prefill.update(torch.zeros(2, 1, 3, 2), torch.zeros(2, 1, 3, 2), 0)
    cache = SlotCache(num_layers=1)
    cache.reserve(2, 3, like=prefill)
    assert cache.capacity == 64
    cache.load(0, prefill, source_row=0, start=0, length=3)
    cache.load(1, prefill, source_row=1, start=0, length=1)
    seen = []
    for _ in range(40):
        mask, _ = cache.begin_step(2, torch.bfloat16, additive=False, whole=True)
        k, v = cache.update(torch.ones(2, 1, 1, 2), torch.ones(2, 1, 1, 2), 0)
        cache.end_step(2)
        longest = -(-(max(cache.host_lengths[:2])) // WIDTH_STEP) * WIDTH_STEP  # this step's rows, rounded
        seen.append((longest, mask.shape[-1], k.is_contiguous() and v.is_contiguous()))
        assert mask[:, 0, 0].sum(-1).tolist() == cache.host_lengths[:2]  # each row's own positions only
    assert (16, 16, False) in seen and (32, 64, True) in seen and (48, 64, True) in seen
    assert all(width == (64 if 2 * longest >= 64 else longest) for longest, width, _ in seen)
    assert all(dense == (width == 64) for _, width, dense in seen)


def test_packed_prefill_groups_hold_their_token_budget() -> None:
    from engine.continuous import _groups

    assert _groups([3, 4, 5, 2], budget=8) == [[0, 1], [2, 2 + 1]]
    assert _groups([9, 1, 1], budget=8) == [[0], [1, 2]]  # a prompt over the budget runs alone
    assert _groups([], budget=8) == []
