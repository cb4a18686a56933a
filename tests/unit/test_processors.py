"""Per-row logits processors and grammar constraints on a tiny random model: a random model never
writes valid JSON by chance, so only the constraint makes these answers parse."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from engine.errors import ConstraintError, InvalidFieldError
from engine.model import EngineConfig, TextGenerator
from engine.scoring import prompt_logprobs
from engine.types import Constraint, SamplingParams

SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "pattern": "^[A-Z][a-z]{2,5}$"},
        "rank": {"type": "integer", "minimum": 0, "maximum": 99},
        "open": {"type": "boolean"},
        "kind": {"enum": ["a", "b"]},
    },
    "required": ["city", "rank", "open", "kind"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def engine(tiny_causal: Path) -> TextGenerator:
    return TextGenerator.load(EngineConfig(model_id=str(tiny_causal), dtype="float32"))


def ids(engine: TextGenerator, text: str = "Return the") -> list[int]:
    return engine.encode([text], SamplingParams(max_new_tokens=1))[0]


def constrained(kind: str, spec: str = "", **params) -> SamplingParams:
    return SamplingParams(max_new_tokens=80, constraint=Constraint(kind, spec), **params)  # type: ignore[arg-type]


def valid(text: str) -> dict:
    value = json.loads(text)
    assert set(value) == {"city", "rank", "open", "kind"} and isinstance(value["rank"], int)
    assert 0 <= value["rank"] <= 99 and isinstance(value["open"], bool) and value["kind"] in ("a", "b")
    assert isinstance(value["city"], str) and 3 <= len(value["city"]) <= 6 and value["city"].isalpha()
    return value


def test_a_free_row_has_no_processors(engine: TextGenerator) -> None:
    assert engine.rules.for_row(SamplingParams(max_new_tokens=4, temperature=0.7, top_k=5)) is None


def test_the_unconstrained_model_writes_no_json(engine: TextGenerator) -> None:
    [free] = engine.generate([ids(engine)], SamplingParams(max_new_tokens=40))
    with pytest.raises(ValueError):
        json.loads(free.text)


@pytest.mark.parametrize("continuous", [True, False])
def test_json_schema_rows_match_beside_free_and_sampled_rows(engine: TextGenerator, continuous: bool) -> None:
    engine.continuous = continuous  # False: the static path through generate()
    try:
        schema = constrained("json_schema", json.dumps(SCHEMA))
        sampled = replace(schema, temperature=1.0, seed=5)
        free = SamplingParams(max_new_tokens=12)
        done = engine.generate([ids(engine)] * 4, [schema, free, sampled, free])
    finally:
        engine.continuous = True
    valid(done[0].text) and valid(done[2].text)
    assert done[0].finish_reason == done[2].finish_reason == "stop"
    [alone] = engine.generate([ids(engine)], SamplingParams(max_new_tokens=12))
    assert done[1].text == done[3].text == alone.text  # free rows are untouched by their neighbours


def test_length_bounded_strings_never_hold_control_characters(engine: TextGenerator) -> None:
    # xgrammar 0.2.8 lets a maxLength string hold raw control characters; the schema is rewritten to bar them.
    schema = {"type": "object", "properties": {"s": {"type": "string", "maxLength": 8}}, "required": ["s"]}
    params = [replace(constrained("json_schema", json.dumps(schema)), temperature=1.0, seed=s) for s in range(4, 10)]
    for done in engine.generate([ids(engine)] * len(params), params):
        assert set(json.loads(done.text)) == {"s"}  # json.loads refuses control characters in strings


def test_json_object_choice_and_regex(engine: TextGenerator) -> None:
    kinds = [
        constrained("json_object"),
        constrained("choice", '["yes", "no way"]'),
        constrained("regex", r"[a-c]{3}-\d"),
    ]
    out = engine.generate([ids(engine)] * 3, kinds)
    assert isinstance(json.loads(out[0].text), dict)
    assert out[1].text in ("yes", "no way")
    assert len(out[2].text) == 5 and set(out[2].text[:3]) <= set("abc") and out[2].text[3] == "-"


def test_a_schema_the_library_refuses_names_the_field_and_the_reason(engine: TextGenerator) -> None:
    bad = Constraint("json_schema", json.dumps({"type": "objectx"}), param="response_format.json_schema.schema")
    with pytest.raises(ConstraintError) as caught:
        engine.rules.check(SamplingParams(max_new_tokens=4, constraint=bad))
    assert caught.value.param == "response_format.json_schema.schema"
    assert 'Unsupported type "objectx"' in str(caught.value) and ".cc:" not in str(caught.value)


def test_compiles_are_cached_and_reported(engine: TextGenerator) -> None:
    seen: list[bool] = []
    engine.rules.on_compile = lambda seconds, cached: seen.append(cached)
    params = constrained("regex", r"x{2}\d+")
    engine.rules.check(params)
    engine.rules.check(params)
    engine.rules.on_compile = None
    assert seen == [False, True]


def test_logit_bias_forces_and_bars_tokens(engine: TextGenerator) -> None:
    target = engine.tokenizer.convert_tokens_to_ids("Ġthe")
    [forced] = engine.generate([ids(engine)], SamplingParams(max_new_tokens=5, logit_bias=((target, 100.0),)))
    assert forced.text == " the" * 5
    [free] = engine.generate([ids(engine)], SamplingParams(max_new_tokens=5))
    first = engine.tokenizer(free.text)["input_ids"][0]
    [barred] = engine.generate([ids(engine)], SamplingParams(max_new_tokens=5, logit_bias=((first, -100.0),)))
    assert engine.tokenizer(barred.text)["input_ids"][0] != first
    with pytest.raises(InvalidFieldError, match="logit_bias: token id 99999"):
        engine.rules.check(SamplingParams(max_new_tokens=1, logit_bias=((99999, 1.0),)))


def test_stop_token_ids_min_tokens_and_ignore_eos(engine: TextGenerator) -> None:
    [free] = engine.generate([ids(engine)], SamplingParams(max_new_tokens=6))
    third = engine.tokenizer(free.text)["input_ids"][2]
    [stopped] = engine.generate([ids(engine)], SamplingParams(max_new_tokens=6, stop_token_ids=(third,)))
    assert stopped.finish_reason == "stop" and stopped.completion_tokens <= 3
    eos = engine.eos_ids[0]
    early = SamplingParams(max_new_tokens=6, logit_bias=((eos, 100.0),))  # EOS first, at once
    [ends] = engine.generate([ids(engine)], early)
    assert ends.completion_tokens == 1 and ends.finish_reason == "stop"
    [held] = engine.generate([ids(engine)], replace(early, min_tokens=4))
    assert held.completion_tokens == 5 and held.finish_reason == "stop"  # EOS barred for 4 tokens
    [ignored] = engine.generate([ids(engine)], replace(early, ignore_eos=True))
    assert ignored.completion_tokens == 6 and ignored.finish_reason == "length"


def test_min_tokens_holds_back_stop_strings_as_vllm_does(engine: TextGenerator) -> None:
    the = engine.tokenizer.convert_tokens_to_ids("Ġthe")
    forced = SamplingParams(max_new_tokens=8, logit_bias=((the, 100.0),))  # " the the the ..."
    [ends] = engine.generate([ids(engine)], replace(forced, stop=("the",)))
    assert (ends.text, ends.completion_tokens, ends.finish_reason) == (" ", 1, "stop")
    # "the" within the first 3 tokens' text (" the the the") does not count; the 4th token's does.
    [held] = engine.generate([ids(engine)], replace(forced, stop=("the",), min_tokens=3))
    assert (held.text, held.completion_tokens, held.finish_reason) == (" the the the ", 4, "stop")
    # A stop string that begins within them and ends past them counts (" the th|e t|he").
    [spans] = engine.generate([ids(engine)], replace(forced, stop=("e t",), min_tokens=2))
    assert (spans.text, spans.completion_tokens, spans.finish_reason) == (" the th", 3, "stop")
    [never] = engine.generate([ids(engine)], replace(forced, stop=("the",), min_tokens=8))
    assert (never.text, never.finish_reason) == (" the" * 8, "length")


def test_min_p_keeps_only_the_likely_tokens(engine: TextGenerator) -> None:
    params = SamplingParams(max_new_tokens=8, temperature=1.0, min_p=1.0)  # only the likeliest survives
    [greedy] = engine.generate([ids(engine)], SamplingParams(max_new_tokens=8))
    assert [engine.generate([ids(engine)], replace(params, seed=s))[0].text for s in (1, 2)] == [greedy.text] * 2


def test_prompt_logprobs_are_the_models_log_softmax(engine: TextGenerator) -> None:
    prompt = ids(engine, "The socket module provides access")
    entries = prompt_logprobs(engine, prompt, top=1)
    with torch.no_grad():
        expected = engine.model(torch.tensor([prompt])).logits[0].log_softmax(-1)
    assert len(entries) == len(prompt) and entries[0].logprob == 0.0 and entries[0].top == ()
    for j in range(1, len(prompt)):
        assert entries[j].logprob == pytest.approx(float(expected[j - 1, prompt[j]]), abs=1e-5)
        assert entries[j].top[0].logprob == pytest.approx(float(expected[j - 1].max()), abs=1e-5)


def test_token_id_prompts_answer_as_their_text(engine: TextGenerator) -> None:
    prompt = ids(engine)
    params = SamplingParams(max_new_tokens=6)
    assert engine.encode_ids([prompt], params) == [prompt]
    assert engine.generate(engine.encode_ids([prompt], params), params) == engine.generate([prompt], params)
    with pytest.raises(InvalidFieldError, match="outside this model's vocabulary"):
        engine.encode_ids([[1, 10**6]], params)


def test_a_grammar_that_can_only_end_wins_over_min_tokens(engine: TextGenerator) -> None:
    [out] = engine.generate([ids(engine)], [constrained("choice", '["yes"]', min_tokens=10)])
    assert out.text == "yes" and out.finish_reason == "stop" and out.completion_tokens < 10


def test_min_tokens_gives_the_end_back_when_the_grammar_allows_nothing_else(monkeypatch) -> None:
    from types import SimpleNamespace

    from engine import processors as module
    from engine.processors import RowProcessors, apply_row_processors

    class Batch:  # xgrammar's batch filler, for matchers that are not xgrammar's own
        def batch_fill_next_token_bitmask(self, matchers, bitmask, indices) -> None:
            for matcher, index in zip(matchers, indices, strict=True):
                matcher.fill_next_token_bitmask(bitmask, index)

    monkeypatch.setattr(module, "_batch_matcher", lambda xgrammar: Batch())

    class OnlyTheEnd:  # a grammar that is complete: only token 5 (the end) may follow
        def is_terminated(self) -> bool:
            return False

        def fill_next_token_bitmask(self, bitmask: torch.Tensor, index: int) -> None:
            bitmask[index] = 0
            bitmask[index, 0] = 1 << 5

    processors = RowProcessors(SamplingParams(max_new_tokens=8, min_tokens=3), [5], OnlyTheEnd())
    rows = [SimpleNamespace(processors=processors)]
    logits = torch.randn(1, 64)
    end = float(logits[0, 5])
    apply_row_processors(logits, rows)
    assert logits[0, 5] == end and torch.isneginf(torch.cat([logits[0, :5], logits[0, 6:]])).all()


def test_the_cpu_bitmask_masks_exactly_what_xgrammars_kernel_masks() -> None:
    import xgrammar

    from engine.processors import apply_bitmask

    generator = torch.Generator().manual_seed(3)
    vocab = 1000  # not a multiple of 32: the last word's high bits lie past the vocabulary
    bitmask = torch.randint(-(2**31), 2**31 - 1, (4, (vocab + 31) // 32), dtype=torch.int32, generator=generator)
    with torch.inference_mode():
        steps = torch.randn(4, 3, vocab, generator=generator)
        ours = steps[:, -1]  # a decode step's logits: a strided view, written in place
        assert not ours.is_contiguous()
        theirs = steps[:, -1].contiguous()
        apply_bitmask(ours, bitmask, [0, 2, 3])
    xgrammar.apply_token_bitmask_inplace(theirs, bitmask, indices=[0, 2, 3])
    assert torch.equal(ours, theirs) and torch.equal(steps[:, -1], theirs)
    assert torch.isneginf(ours[0]).any() and not torch.isneginf(ours[1]).any()  # row 1 was not asked for
