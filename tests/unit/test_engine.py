"""The engine on tiny random checkpoints: batching correctness, per-row parameters, streaming, limits."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from engine import continuous as engine_continuous
from engine import cpu as engine_cpu
from engine.cpu import CpuHead
from engine.errors import PromptTooLongError
from engine.model import EngineConfig, TextGenerator
from engine.types import Delta, GenerationRequest, SamplingParams, collect
from engine.work import WorkItem
from testing.checkpoints import build_tiny_causal_that_stops

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
    return TextGenerator.load(EngineConfig(model_id=str(tiny_causal), num_threads=1, dtype="float32"))


@pytest.fixture(scope="module")
def stops_at_once(tmp_path_factory: pytest.TempPathFactory) -> TextGenerator:
    """A model whose answers are their end of text at once: the checks below see answers that stop too."""
    path = build_tiny_causal_that_stops(tmp_path_factory.mktemp("tiny-stops"))
    return TextGenerator.load(EngineConfig(model_id=str(path), num_threads=1))


@pytest.fixture(scope="module")
def seq2seq(tiny_seq2seq: Path) -> TextGenerator:
    return TextGenerator.load(EngineConfig(model_id=str(tiny_seq2seq), num_threads=1))


def run(engine: TextGenerator, prompts: list[str], params: list[SamplingParams]):
    ids = [engine.encode([p], q)[0] for p, q in zip(prompts, params, strict=True)]
    return engine.generate(ids, params)


def items_for(ids: list[list[int]], params: SamplingParams, stream: int = 0) -> list[WorkItem]:
    return [WorkItem(stream=stream, row=i, prompt_ids=p, params=params) for i, p in enumerate(ids)]


def completions(events: list[tuple[WorkItem, Delta]], items: list[WorkItem]):
    """The completions of ``items`` from the engine's events (items told apart by their key)."""
    order = {item.key: i for i, item in enumerate(items)}
    deltas = [Delta(order[item.key], d.text, d.tokens, d.logprobs, d.finish_reason) for item, d in events]
    return collect(deltas, len(items), [len(item.prompt_ids) for item in items])


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
    items = [WorkItem(0, 0, ids[0], long), WorkItem(0, 1, ids[1], short)]
    ended: list[int] = []
    events: list[tuple[WorkItem, Delta]] = []

    def on_step(step: list[tuple[WorkItem, Delta]]) -> None:
        events.extend(step)
        ended.extend(item.row for item, delta in step if delta.finish_reason is not None)

    causal.run(items, on_step)
    results = completions(events, items)
    assert ended[0] == 1, "the short row is reported before the long one ends"
    assert results[1].completion_tokens <= 2 and results[1].finish_reason in {"length", "stop"}
    assert results[0].completion_tokens <= 10


def test_every_step_reports_one_delta_per_running_row_in_one_call(causal: TextGenerator) -> None:
    params = SamplingParams(max_new_tokens=6)
    items = items_for(causal.encode(PROMPTS[:3], params), params)
    steps: list[list[tuple[WorkItem, Delta]]] = []
    causal.run(items, steps.append)
    assert len(steps) == 6  # prefill, then one decode step per further token
    for step in steps:
        rows = [item.row for item, _ in step]
        assert len(rows) == len(set(rows)) and all(delta.tokens == 1 for _, delta in step)
    assert completions([e for step in steps for e in step], items) == causal.generate(
        [i.prompt_ids for i in items], params
    )


@pytest.mark.parametrize("model", ["causal", "stops_at_once"])
def test_completion_is_the_generated_text_only(request: pytest.FixtureRequest, model: str) -> None:
    causal: TextGenerator = request.getfixturevalue(model)
    [completion] = run(causal, [PROMPTS[1]], [GREEDY])
    assert not completion.text.startswith(PROMPTS[1])
    assert completion.prompt_tokens == len(causal.encode([PROMPTS[1]], GREEDY)[0])
    ids = causal.encode([PROMPTS[1]], GREEDY)[0]
    full = causal.model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, pad_token_id=causal.pad_id)[
        0
    ].tolist()
    assert completion.text == causal.tokenizer.decode(full[len(ids) :], skip_special_tokens=True)
    # transformers' greedy answer counts the tokens: up to and with its end of text, if it draws one.
    generated = full[len(ids) :]
    eos = causal.tokenizer.eos_token_id
    drawn = generated[: generated.index(eos) + 1] if eos in generated else generated
    assert completion.completion_tokens == len(drawn), (completion, generated)
    assert completion.finish_reason == ("stop" if eos in generated else "length"), (completion, generated)


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
    [item] = items_for([ids], SamplingParams(max_new_tokens=50))
    item.cancelled = True
    events: list[tuple[WorkItem, Delta]] = []
    causal.run([item], events.extend)
    [result] = completions(events, [item])
    assert result.finish_reason == "cancelled" and result.completion_tokens <= 1


def test_a_row_cancelled_mid_generation_leaves_at_the_next_step(causal: TextGenerator) -> None:
    params = SamplingParams(max_new_tokens=60)
    items = items_for(causal.encode(PROMPTS[:2], params), params)
    tokens = {0: 0, 1: 0}
    after_cancel = 0

    def on_step(step: list[tuple[WorkItem, Delta]]) -> None:
        nonlocal after_cancel
        for item, delta in step:
            tokens[item.row] += delta.tokens
            after_cancel += delta.tokens if item.cancelled else 0
        if tokens[0] == 5:
            items[0].cancelled = True  # as the batcher does when a reader goes away

    causal.run(items, on_step)
    assert tokens[0] == 5 and after_cancel == 0, "the engine kept generating for a cancelled row"
    assert tokens[1] > 5 and items[1].cancelled is False  # the other row ran on by itself


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
    assert EngineConfig(model_id="x", dtype="float32").resolved_dtype() == torch.float32
    assert EngineConfig(model_id="x", dtype="bfloat16").resolved_dtype() == torch.bfloat16


def test_decoder_only_uses_continuous_batching_seq2seq_static(causal: TextGenerator, seq2seq: TextGenerator) -> None:
    assert causal.continuous and not seq2seq.continuous


def test_prompts_joining_mid_generation_match_their_solo_output(causal: TextGenerator) -> None:
    long = SamplingParams(max_new_tokens=20)
    ids = [causal.encode([p], long)[0] for p in PROMPTS]
    solo = [causal.generate([i], long)[0] for i in ids]
    items = items_for(ids, long)
    joins = {3: items[1], 6: items[2], 7: items[3]}  # poll -> item
    polls = 0

    def poll(free: int, shape: object = None) -> list[WorkItem]:
        nonlocal polls
        polls += 1
        return [joins[polls]] if polls in joins else []

    events: list[tuple[WorkItem, Delta]] = []
    causal.run(items[:1], events.extend, poll=poll, max_batch_size=4)
    assert completions(events, items) == solo


def test_joining_respects_max_batch_size(causal: TextGenerator) -> None:
    params = SamplingParams(max_new_tokens=6)
    items = items_for(causal.encode(PROMPTS, params), params)
    queue = items[1:]
    asked: list[int] = []

    def poll(free: int, shape: object = None) -> list[WorkItem]:
        asked.append(free)
        taken, queue[:] = queue[:free], queue[free:]
        return taken

    events: list[tuple[WorkItem, Delta]] = []
    causal.run(items[:1], events.extend, poll=poll, max_batch_size=2)
    assert len(completions(events, items)) == 4 and asked and max(asked) <= 2 and asked[0] == 1


def test_a_request_that_comes_during_a_step_joins_the_very_next_pass(causal: TextGenerator) -> None:
    # The engine asks for new rows after each step: one that came while a step ran gets its first token
    # from the very next pass, which prefills it while the running row decodes its next token, and
    # the answers are the ones each request gets alone.
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)
    first, joining = items_for(causal.encode(PROMPTS[:2], params), params)
    alone = {item.key: causal.generate([item.prompt_ids], params)[0].text for item in (first, joining)}
    tokens = {first.key: 0, joining.key: 0}
    texts = {first.key: "", joining.key: ""}
    passes: list[tuple[int, int]] = []  # each pass: how many tokens each of the two rows had after it
    queue: list[WorkItem] = []

    def on_step(events: list[tuple[WorkItem, Delta]]) -> None:
        for item, delta in events:
            tokens[item.key] += delta.tokens
            texts[item.key] += delta.text
        passes.append((tokens[first.key], tokens[joining.key]))
        if tokens[first.key] == 2 and not tokens[joining.key]:
            queue[:] = [joining]  # it arrives during the first decoding step

    def poll(free: int, shape: object = None) -> list[WorkItem]:
        taken, queue[:] = queue[:], []
        return taken

    causal.run([first], on_step, poll=poll, max_batch_size=2)
    assert passes[:3] == [(1, 0), (2, 0), (3, 1)]  # a prefill, a step, then one pass for both rows
    assert tokens == {first.key: 8, joining.key: 8} and texts == alone


def test_requests_that_keep_coming_each_join_the_next_pass(causal: TextGenerator) -> None:
    # Each arrival joins the pass after the one it came during, beside the rows already decoding: a
    # stream of arrivals costs no pass of its own, and no running row waits for another's prefill.
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)
    first, joining, later = items_for(causal.encode(PROMPTS[:3], params), params)
    alone = {item.key: causal.generate([item.prompt_ids], params)[0].text for item in (first, joining, later)}
    tokens = {first.key: 0, joining.key: 0, later.key: 0}
    texts = {first.key: "", joining.key: "", later.key: ""}
    passes: list[tuple[int, int, int]] = []  # each pass: how many tokens each row had after it
    arrivals = [[joining], [later]]  # one during each of the first two passes
    queue: list[WorkItem] = []

    def on_step(events: list[tuple[WorkItem, Delta]]) -> None:
        for item, delta in events:
            tokens[item.key] += delta.tokens
            texts[item.key] += delta.text
        passes.append((tokens[first.key], tokens[joining.key], tokens[later.key]))
        if arrivals:
            queue[:] = arrivals.pop(0)

    def poll(free: int, shape: object = None) -> list[WorkItem]:
        taken, queue[:] = queue[:], []
        return taken

    causal.run([first], on_step, poll=poll, max_batch_size=3)
    assert passes[:3] == [(1, 0, 0), (2, 1, 0), (3, 2, 1)]
    assert tokens == {first.key: 8, joining.key: 8, later.key: 8} and texts == alone


def test_prompts_too_long_to_join_a_step_are_prefilled_in_a_pass_of_their_own(
    causal: TextGenerator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(engine_continuous, "JOINING_STEP_TOKENS", 3)  # every prompt here is longer
    params = SamplingParams(max_new_tokens=4, ignore_eos=True)
    first, joining = items_for(causal.encode(PROMPTS[:2], params), params)
    alone = {item.key: causal.generate([item.prompt_ids], params)[0].text for item in (first, joining)}
    passes: list[tuple[int, int]] = []
    tokens = {first.key: 0, joining.key: 0}
    texts = {first.key: "", joining.key: ""}
    queue: list[WorkItem] = [joining]

    def on_step(events: list[tuple[WorkItem, Delta]]) -> None:
        for item, delta in events:
            tokens[item.key] += delta.tokens
            texts[item.key] += delta.text
        passes.append((tokens[first.key], tokens[joining.key]))

    def poll(free: int, shape: object = None) -> list[WorkItem]:
        taken, queue[:] = queue[:], []
        return taken

    causal.run([first], on_step, poll=poll, max_batch_size=2)
    assert passes[:3] == [(1, 0), (1, 1), (2, 2)]  # the joining prompt's own prefill, then a step for both
    assert texts == alone


def test_a_failed_joining_pass_leaves_each_row_as_it_would_be_alone(
    causal: TextGenerator, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The step that would prefill the joining row fails: the joining row is prefilled on its own and
    # the running row steps again; both answers are still their solo ones.
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    first, joining = items_for(causal.encode(PROMPTS[:2], params), params)
    alone = {item.key: causal.generate([item.prompt_ids], params)[0].text for item in (first, joining)}

    def fail(self: object, rows: object) -> None:
        raise RuntimeError("out of memory")

    monkeypatch.setattr(engine_continuous.ContinuousBatch, "_joining_pass", fail)
    queue: list[WorkItem] = [joining]
    events: list[tuple[WorkItem, Delta]] = []

    def poll(free: int, shape: object = None) -> list[WorkItem]:
        taken, queue[:] = queue[:], []
        return taken

    causal.run([first], events.extend, poll=poll, max_batch_size=2)
    texts = {first.key: "", joining.key: ""}
    for item, delta in events:
        texts[item.key] += delta.text
    assert texts == alone


def test_rows_that_keep_arriving_still_let_the_running_rows_decode(causal: TextGenerator) -> None:
    # Arrivals that end in their prefill (one token) free their slot at once; the rows that join between two
    # steps are bounded by max_batch_size, so a stream of them cannot hold the running row back.
    long, one = SamplingParams(max_new_tokens=6), SamplingParams(max_new_tokens=1)
    [first] = items_for(causal.encode(PROMPTS[:1], long), long)
    arrivals = iter(items_for(causal.encode(PROMPTS[1:2] * 40, one), one))
    joined_between: list[int] = []  # rows that joined between two of the first row's tokens
    joined = 0

    def on_step(events: list[tuple[WorkItem, Delta]]) -> None:
        nonlocal joined
        for item, _ in events:
            if item is first:
                joined_between.append(joined)
                joined = 0
            else:
                joined += 1

    def poll(free: int, shape: object = None) -> list[WorkItem]:
        item = next(arrivals, None) if free else None  # one arrival each time the engine asks
        return [item] if item is not None else []

    causal.run([first], on_step, poll=poll, max_batch_size=4)
    # Six passes for the first row's six tokens; the arrivals rode along in them (or, in a model whose steps
    # cannot take joining prompts, at most max_batch_size prefilled between two of them).
    assert len(joined_between) == 6 and 1 <= max(joined_between) <= 4


def test_n_choices_with_a_seed_differ_and_each_reproduces_alone(causal: TextGenerator) -> None:
    params = SamplingParams(max_new_tokens=12, temperature=1.5, seed=21)
    request = GenerationRequest("r", params, prompts=(PROMPTS[0], PROMPTS[2]), n=3)
    rows = request.row_inputs(causal.encode(list(request.prompts), params))
    together = causal.generate([ids for ids, _ in rows], [p for _, p in rows])
    assert [p.seed for _, p in rows] == [21, 22, 23, 21, 22, 23]
    assert len({c.text for c in together[:3]}) > 1, "the n choices of a prompt are all the same"
    for (ids, row_params), completion in zip(rows, together, strict=True):
        assert causal.generate([ids], row_params)[0] == completion


def test_presence_and_frequency_penalties_change_the_output_per_row(causal: TextGenerator) -> None:
    plain = run(causal, [PROMPTS[0]], [GREEDY])[0]
    for penalty in ({"presence_penalty": 2.0}, {"frequency_penalty": 2.0}):
        penalised = replace(GREEDY, **penalty)
        alone = run(causal, [PROMPTS[0]], [penalised])[0]
        batched = run(causal, [PROMPTS[0], PROMPTS[1]], [penalised, GREEDY])
        assert batched[0] == alone and alone.text != plain.text
        assert batched[1] == run(causal, [PROMPTS[1]], [GREEDY])[0]


@pytest.mark.parametrize("model", ["causal", "stops_at_once"])
@pytest.mark.parametrize("sampled", [False, True])
def test_logprobs_are_the_raw_distribution_of_a_direct_forward_pass(
    request: pytest.FixtureRequest, model: str, sampled: bool
) -> None:
    causal: TextGenerator = request.getfixturevalue(model)
    # Sampling, temperature and penalties change the choice, never the reported log-probabilities.
    params = SamplingParams(max_new_tokens=8, logprobs=3)
    if sampled:
        params = replace(params, temperature=1.3, top_k=20, seed=5, presence_penalty=0.5, repetition_penalty=1.3)
    ids = causal.encode([PROMPTS[1]], params)[0]
    [completion] = causal.generate([ids], params)
    steps = completion.logprobs
    assert len(steps) == completion.completion_tokens
    with torch.no_grad():
        chosen_ids = _chosen_ids(causal, steps)
        full = torch.tensor([ids + chosen_ids])
        expected = causal.model(full).logits[0, len(ids) - 1 : -1].float().log_softmax(-1)
    for position, entry in enumerate(steps):
        row = expected[position]
        assert entry.logprob == pytest.approx(float(row[chosen_ids[position]]), abs=1e-4)
        values, top_ids = row.topk(3)
        assert [t.logprob for t in entry.top] == pytest.approx(values.tolist(), abs=1e-4)
        assert [t.token for t in entry.top] == [causal.texts.get(i)[0] for i in top_ids.tolist()]
        if not sampled:
            assert entry.top[0].token == entry.token  # greedy takes the most likely token
    # The entries' bytes are the text. An answer that drew its end of text has that token's entry last,
    # and the text leaves it out; an answer cut at the limit has one entry per token of it.
    if completion.finish_reason == "stop":
        assert steps[-1].token == causal.tokenizer.eos_token, steps[-1]
        steps = steps[:-1]
    else:
        assert completion.finish_reason == "length" and len(steps) == params.max_new_tokens, completion
    text_bytes = b"".join(bytes(entry.bytes) for entry in steps)
    assert text_bytes.decode("utf-8", errors="replace") == completion.text


def _chosen_ids(engine: TextGenerator, steps) -> list[int]:
    """Token ids from the logprob entries' bytes (each entry's bytes are one token of the vocabulary)."""
    vocabulary = range(len(engine.tokenizer))
    ids = []
    for entry in steps:
        [token] = [i for i in vocabulary if engine.texts.get(i)[1] == entry.bytes]
        ids.append(token)
    return ids


def test_only_rows_that_ask_get_logprobs(causal: TextGenerator) -> None:
    asked = replace(GREEDY, logprobs=0)
    results = run(causal, PROMPTS[:2], [asked, GREEDY])
    assert len(results[0].logprobs) == results[0].completion_tokens and results[1].logprobs == ()
    assert all(entry.top == () for entry in results[0].logprobs)
    assert [replace(r, logprobs=()) for r in results] == run(causal, PROMPTS[:2], [GREEDY, GREEDY])


def test_seq2seq_static_batches_stream_logprobs_and_honour_penalties(seq2seq: TextGenerator) -> None:
    params = replace(GREEDY, logprobs=2, presence_penalty=1.0)
    alone = run(seq2seq, [PROMPTS[0]], [params])[0]
    batched = run(seq2seq, PROMPTS[:2], [params, GREEDY])
    assert batched[0] == alone and len(alone.logprobs) == alone.completion_tokens
    assert batched[1].logprobs == ()


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


def test_a_cpu_engine_that_cannot_pack_uses_the_cpu_head_on_the_tied_weights(tiny_causal: Path, monkeypatch) -> None:
    monkeypatch.setattr(engine_cpu, "can_pack", lambda model: False)  # e.g. a torch built without oneDNN
    engine = TextGenerator.load(EngineConfig(model_id=str(tiny_causal), num_threads=1, dtype="float32"))
    assert engine.after_first_answer is None
    head = engine.model.get_output_embeddings()
    assert type(head) is CpuHead
    assert head.weight is engine.model.get_input_embeddings().weight  # still tied, no copy
