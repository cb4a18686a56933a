"""The engine on tiny random checkpoints: batching correctness, per-row parameters, limits."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from engine.errors import PromptTooLongError
from engine.model import CpuHead, EngineConfig, TextGenerator, WorkItem
from engine.params import SamplingParams

PROMPTS = [
    "Return the number",
    "The socket module provides access to the BSD socket interface and",
    "Raise",
    "A Ray Serve deployment scales between",
]
GREEDY = SamplingParams(max_new_tokens=12)
SAMPLED = SamplingParams(max_new_tokens=12, temperature=0.9, top_p=0.9, top_k=40, seed=1234)


@pytest.fixture(scope="module")
def causal(tiny_causal: Path) -> TextGenerator:
    return TextGenerator.load(EngineConfig(model_id=str(tiny_causal), num_threads=1))


@pytest.fixture(scope="module")
def seq2seq(tiny_seq2seq: Path) -> TextGenerator:
    return TextGenerator.load(EngineConfig(model_id=str(tiny_seq2seq), num_threads=1))


def run(engine: TextGenerator, prompts: list[str], params: list[SamplingParams]):
    ids = [engine.encode([p], q)[0] for p, q in zip(prompts, params, strict=True)]
    return engine.generate([WorkItem(i, q) for i, q in zip(ids, params, strict=True)])


def test_loads_causal_model_on_cpu_in_float32(causal: TextGenerator) -> None:
    assert not causal.is_encoder_decoder
    assert causal.model.dtype == torch.float32 and causal.device.type == "cpu"
    assert causal.context_length == 128


def test_greedy_is_identical_alone_and_in_a_padded_batch(causal: TextGenerator) -> None:
    alone = [run(causal, [p], [GREEDY])[0] for p in PROMPTS]
    batched = run(causal, PROMPTS, [GREEDY] * len(PROMPTS))
    assert [c.text for c in batched] == [c.text for c in alone]
    assert batched == alone
    assert len({len(causal.encode([p], GREEDY)[0]) for p in PROMPTS}) > 1  # lengths really differ


def test_greedy_is_deterministic(causal: TextGenerator) -> None:
    assert run(causal, PROMPTS[:2], [GREEDY] * 2) == run(causal, PROMPTS[:2], [GREEDY] * 2)


def test_seeded_sampling_is_reproducible_alone_and_batched(causal: TextGenerator) -> None:
    alone = run(causal, [PROMPTS[0]], [SAMPLED])[0]
    again = run(causal, [PROMPTS[0]], [SAMPLED])[0]
    mixed = run(causal, PROMPTS, [SAMPLED, GREEDY, replace(SAMPLED, seed=7), GREEDY])
    assert alone == again == mixed[0]
    assert mixed[1] == run(causal, [PROMPTS[1]], [GREEDY])[0]


def test_different_seeds_sample_differently(causal: TextGenerator) -> None:
    texts = {run(causal, [PROMPTS[0]], [replace(SAMPLED, seed=s, temperature=1.5)])[0].text for s in range(5)}
    assert len(texts) > 1


def test_per_row_max_new_tokens_and_early_release(causal: TextGenerator) -> None:
    short, long = SamplingParams(max_new_tokens=2), SamplingParams(max_new_tokens=10)
    ids = [causal.encode([p], long)[0] for p in PROMPTS[:2]]
    items = [WorkItem(ids[0], long), WorkItem(ids[1], short)]
    order: list[tuple[int, int]] = []
    results = causal.generate(items, on_done=lambda item, c: order.append((items.index(item), c.completion_tokens)))
    by_row = dict(order)
    assert order[0][0] == 1, "the short row is reported before the long one ends"
    assert by_row[1] <= 2 and results[1].finish_reason in {"length", "stop"}
    assert results[0].completion_tokens <= 10


def test_completion_is_the_generated_text_only(causal: TextGenerator) -> None:
    [completion] = run(causal, [PROMPTS[1]], [GREEDY])
    assert not completion.text.startswith(PROMPTS[1])
    assert completion.prompt_tokens == len(causal.encode([PROMPTS[1]], GREEDY)[0])
    assert completion.completion_tokens == 12 or completion.finish_reason == "stop"
    ids = causal.encode([PROMPTS[1]], GREEDY)[0]
    full = causal.model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, pad_token_id=causal.pad_id)[
        0
    ].tolist()
    assert completion.text == causal.tokenizer.decode(full[len(ids) :], skip_special_tokens=True)


def test_stop_string_ends_generation_and_is_cut(causal: TextGenerator) -> None:
    [free] = run(causal, [PROMPTS[0]], [GREEDY])
    stop = free.text[4:7]
    assert stop and len(free.text) > 7
    [stopped] = run(causal, [PROMPTS[0]], [replace(GREEDY, stop=(stop,))])
    assert stopped.finish_reason == "stop"
    assert stop not in stopped.text and free.text.startswith(stopped.text)
    assert stopped.completion_tokens < free.completion_tokens


def test_repetition_penalty_is_per_row_and_batch_independent(causal: TextGenerator) -> None:
    penalised = replace(GREEDY, repetition_penalty=1.8)
    alone = run(causal, [PROMPTS[0]], [penalised])[0]
    batched = run(causal, [PROMPTS[0], PROMPTS[1]], [penalised, GREEDY])
    assert batched[0] == alone
    assert alone.text != run(causal, [PROMPTS[0]], [GREEDY])[0].text


def test_cancelled_row_stops(causal: TextGenerator) -> None:
    ids = causal.encode([PROMPTS[0]], GREEDY)[0]
    item = WorkItem(ids, SamplingParams(max_new_tokens=50))
    item.cancelled = True
    [result] = causal.generate([item])
    assert result.finish_reason == "cancelled" and result.completion_tokens <= 1


def test_prompt_plus_new_tokens_beyond_context_is_rejected(causal: TextGenerator) -> None:
    with pytest.raises(PromptTooLongError, match="exceed the model's context of 128 tokens"):
        causal.encode(["word " * 60], SamplingParams(max_new_tokens=100))
    with pytest.raises(PromptTooLongError, match="prompt 1 has"):
        causal.encode(["ok", "word " * 200], SamplingParams(max_new_tokens=1))


def test_configured_prompt_token_limit(tiny_causal: Path) -> None:
    engine = TextGenerator.load(EngineConfig(model_id=str(tiny_causal), max_prompt_tokens=4))
    engine.encode(["Raise"], GREEDY)
    with pytest.raises(PromptTooLongError, match="MAX_PROMPT_TOKENS"):
        engine.encode([PROMPTS[1]], GREEDY)


def test_seq2seq_model_serves_the_same_api(seq2seq: TextGenerator) -> None:
    assert seq2seq.is_encoder_decoder
    assert type(seq2seq.model).__name__ == "BartForConditionalGeneration"
    alone = [run(seq2seq, [p], [GREEDY])[0] for p in PROMPTS]
    batched = run(seq2seq, PROMPTS, [GREEDY] * len(PROMPTS))
    assert batched == alone
    assert all(c.completion_tokens >= 1 and c.prompt_tokens > 0 for c in batched)
    ids = seq2seq.encode([PROMPTS[0]], GREEDY)[0]
    reference = seq2seq.model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)[0].tolist()
    assert alone[0].text == seq2seq.tokenizer.decode(reference, skip_special_tokens=True)
    sampled = run(seq2seq, [PROMPTS[0]], [SAMPLED])[0]
    assert sampled == run(seq2seq, [PROMPTS[0]], [SAMPLED])[0]


def test_resolved_dtype() -> None:
    assert EngineConfig(model_id="x").resolved_dtype() == torch.float32
    assert EngineConfig(model_id="x", dtype="bfloat16").resolved_dtype() == torch.bfloat16


def test_decoder_only_uses_continuous_batching_seq2seq_static(causal: TextGenerator, seq2seq: TextGenerator) -> None:
    assert causal.continuous and not seq2seq.continuous


def test_prompts_joining_mid_generation_match_their_solo_output(causal: TextGenerator) -> None:
    long = SamplingParams(max_new_tokens=20)
    ids = [causal.encode([p], long)[0] for p in PROMPTS]
    solo = [causal.generate([WorkItem(i, long)])[0] for i in ids]
    joins = {3: WorkItem(ids[1], long), 6: WorkItem(ids[2], long), 7: WorkItem(ids[3], long)}  # poll -> item
    polls = 0

    def poll(free: int) -> list[WorkItem]:
        nonlocal polls
        polls += 1
        return [joins[polls]] if polls in joins else []

    results = causal.generate([WorkItem(ids[0], long)], poll=poll, max_batch_size=4)
    assert results == solo


def test_joining_respects_max_batch_size(causal: TextGenerator) -> None:
    params = SamplingParams(max_new_tokens=6)
    ids = causal.encode(PROMPTS, params)
    queue = [WorkItem(i, params) for i in ids[1:]]
    asked: list[int] = []

    def poll(free: int) -> list[WorkItem]:
        asked.append(free)
        taken, queue[:] = queue[:free], queue[free:]
        return taken

    results = causal.generate([WorkItem(ids[0], params)], poll=poll, max_batch_size=2)
    assert len(results) == 4 and asked and max(asked) <= 2 and asked[0] == 1


@pytest.mark.parametrize("shape", [(1, 48), (5, 48), (3, 4, 48), (2, 1, 48)])
@pytest.mark.parametrize("bias", [False, True])
def test_cpu_head_computes_what_linear_computes(shape: tuple[int, ...], bias: bool) -> None:
    torch.manual_seed(0)
    plain = torch.nn.Linear(48, 300, bias=bias)
    head = torch.nn.Linear(48, 300, bias=bias)
    head.load_state_dict(plain.state_dict())
    head.__class__ = CpuHead
    x = torch.randn(shape)
    out = head(x)
    assert out.shape == (*shape[:-1], 300)
    torch.testing.assert_close(out, plain(x), rtol=1e-5, atol=1e-5)


def test_cpu_engine_uses_the_cpu_head_on_the_tied_weights(causal: TextGenerator) -> None:
    head = causal.model.get_output_embeddings()
    assert type(head) is CpuHead
    assert head.weight is causal.model.get_input_embeddings().weight  # still tied, no copy
