"""One row fails alone: a neighbour's sampling, detokenizer, scores or prompt cannot change another row.

The tiny random checkpoint decodes real batches; each fault is injected into one row only, and
every other row must produce exactly what it produces alone.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from engine import sampling, token_choice
from engine.batcher import Batcher
from engine.errors import RowFailedError, StepFailedError
from engine.model import EngineConfig, TextGenerator
from engine.types import MAX_SEED, Completion, Delta, GenerationRequest, SamplingParams, collect
from engine.work import WorkItem

PROMPTS = ["Return the number", "Raise", "A Ray Serve deployment scales between"]
GREEDY = SamplingParams(max_new_tokens=10)
SEEDED = SamplingParams(max_new_tokens=10, temperature=1.2, top_k=30, seed=7)
# A long prompt marks the hostile row: the injected faults look for its positions or its width.
HOSTILE_PROMPT = " ".join(["socket"] * 40)


@pytest.fixture(scope="module")
def causal(tiny_causal: Path) -> TextGenerator:
    return TextGenerator.load(EngineConfig(model_id=str(tiny_causal), num_threads=1))


def ids_of(engine: TextGenerator, prompts: list[str]) -> list[list[int]]:
    return [engine.encode([p], GREEDY)[0] for p in prompts]


def solo(engine: TextGenerator, ids: list[int], params: SamplingParams) -> Completion:
    return engine.generate([ids], params)[0]


@pytest.fixture
def poison_long_rows(causal: TextGenerator) -> Iterator[None]:
    """NaN scores for every row at position >= 30 (only the hostile prompt gets there)."""

    def hook(module, args, kwargs, output):
        positions, kept = kwargs["position_ids"], kwargs.get("logits_to_keep")
        if isinstance(kept, torch.Tensor):  # a packed prefill: one sequence, each row's last token kept
            output.logits[0, positions[0, kept] >= 30] = float("nan")
        else:  # a decoding step: a row per sequence
            output.logits[positions[:, -1] >= 30] = float("nan")
        return output

    handle = causal.model.register_forward_hook(hook, with_kwargs=True)
    yield
    handle.remove()


def test_nan_scores_end_only_their_row(causal: TextGenerator, poison_long_rows: None) -> None:
    ids = ids_of(causal, [*PROMPTS[:2], HOSTILE_PROMPT])
    params = [GREEDY, SEEDED, GREEDY]
    alone = [solo(causal, i, p) for i, p in zip(ids[:2], params[:2], strict=True)]
    together = causal.generate(ids, params)
    assert together[:2] == alone
    assert together[2].finish_reason == "error" and together[2].completion_tokens == 0


def test_a_failing_detokenizer_ends_only_its_row(causal: TextGenerator, monkeypatch) -> None:
    ids = ids_of(causal, PROMPTS)
    alone = [solo(causal, i, SEEDED) for i in ids[:2]]
    make_row = causal._row

    def row(item: WorkItem) -> sampling.Row:
        made = make_row(item)
        if item.row == 2:
            assert made.detokenizer is not None
            made.detokenizer.add = lambda token: 1 / 0  # type: ignore[method-assign]
        return made

    monkeypatch.setattr(causal, "_row", row)
    together = causal.generate(ids, [SEEDED] * 3)
    assert together[:2] == alone and together[2].finish_reason == "error"


def test_a_row_whose_sampling_raises_fails_alone_and_seeded_neighbours_draw_nothing_twice(
    causal: TextGenerator, monkeypatch
) -> None:
    ids = ids_of(causal, PROMPTS)
    hostile = replace(SEEDED, presence_penalty=1.5, seed=99)
    alone = [solo(causal, i, SEEDED) for i in ids[:2]]
    apply = token_choice._presence_frequency_penalties

    def flaky(logits, index, rows):
        if any(row.params.presence_penalty == 1.5 for row in rows):
            raise RuntimeError("sampling failed for this row")
        apply(logits, index, rows)

    monkeypatch.setattr(token_choice, "_presence_frequency_penalties", flaky)
    together = causal.generate(ids, [SEEDED, SEEDED, hostile])
    # The hostile row fails at its second step (it has output to penalise then), after the batch
    # had drawn its uniforms: the row-by-row retry reuses them, so the seeded rows match.
    assert together[:2] == alone
    assert together[2].finish_reason == "error" and together[2].completion_tokens == 1


def test_a_joining_rows_failed_prefill_aborts_them_and_the_running_rows_go_on(causal: TextGenerator) -> None:
    ids = ids_of(causal, [*PROMPTS[:2], HOSTILE_PROMPT])
    alone = [solo(causal, i, GREEDY) for i in ids[:2]]

    def hook(module, args, kwargs):
        if kwargs["input_ids"].shape[1] > 30:
            raise MemoryError("out of memory in the joining rows' prefill")

    handle = causal.model.register_forward_pre_hook(hook, with_kwargs=True)
    items = [WorkItem(stream=0, row=i, prompt_ids=p, params=GREEDY) for i, p in enumerate(ids)]
    polls = 0

    def poll(free: int, shape: object = None) -> list[WorkItem]:
        nonlocal polls
        polls += 1
        return [items[2]] if polls == 2 else []

    events: list[tuple[WorkItem, Delta]] = []
    try:
        causal.run(items[:2], events.extend, poll=poll, max_batch_size=4)
    finally:
        handle.remove()
    done = collect((d for _, d in events), 3, [len(i) for i in ids])
    assert done[:2] == alone
    assert done[2].finish_reason == "aborted"


@pytest.mark.parametrize(
    "hostile",
    [
        {"top_k": 2**40},  # beyond the vocabulary (and int32): keeps everything
        {"temperature": 1e-30},  # underflows in float32: greedy
        {"temperature": 1.0, "top_p": 1e-50},  # 0 in float32: the most likely token alone
        {"temperature": 1.0, "seed": 2**70},  # reduced into the generator's range
        {"temperature": 1.0, "seed": -5},
    ],
)
def test_extreme_parameters_never_fail_a_row(causal: TextGenerator, hostile: dict) -> None:
    ids = ids_of(causal, PROMPTS)
    params = replace(GREEDY, **hostile)
    together = causal.generate(ids, [GREEDY, GREEDY, params])
    assert together[:2] == [solo(causal, i, GREEDY) for i in ids[:2]]
    assert together[2].finish_reason in ("stop", "length")
    if hostile.get("temperature", 0) < 1e-5 or "top_p" in hostile:
        assert together[2] == solo(causal, ids[2], GREEDY)  # treated as greedy, not as the least likely token


def test_seeds_of_the_n_choices_stay_in_range() -> None:
    request = GenerationRequest("r", SamplingParams(4, temperature=1.0, seed=MAX_SEED), prompts=("a",), n=3)
    assert [request.row_params(c).seed for c in range(3)] == [MAX_SEED, 0, 1]


# --- through the batcher: the request of the failed row fails, the others complete -----------------


async def read(batcher: Batcher, ids: list[int], params: SamplingParams) -> list[Completion]:
    deltas = [d for ds in [x async for x in batcher.stream([ids], [params])] for d in ds]
    return collect(deltas, 1, [len(ids)])


async def test_a_poisoned_request_fails_with_its_own_error_and_its_neighbours_answer(
    causal: TextGenerator, poison_long_rows: None
) -> None:
    ids = ids_of(causal, [*PROMPTS[:2], HOSTILE_PROMPT])
    alone = [solo(causal, i, GREEDY) for i in ids[:2]]
    batcher = Batcher(causal.run, max_batch_size=4, wait_timeout_s=0.05)
    results = await asyncio.gather(*(read(batcher, i, GREEDY) for i in ids), return_exceptions=True)
    assert results[:2] == [[a] for a in alone]
    assert isinstance(results[2], RowFailedError) and "FloatingPointError" in str(results[2])
    assert batcher.stats()["rows_running"] == 0 and batcher.stats()["streams_open"] == 0
    await batcher.close()


async def test_a_failed_step_fails_its_requests_retryably_and_the_next_batch_runs(causal: TextGenerator) -> None:
    ids = ids_of(causal, PROMPTS[:2])
    calls = 0

    def hook(module, args, kwargs):
        nonlocal calls
        calls += 1
        if calls == 3:  # a decoding step, after the prefill
            raise MemoryError("out of memory")

    handle = causal.model.register_forward_pre_hook(hook, with_kwargs=True)
    batcher = Batcher(causal.run, max_batch_size=4, wait_timeout_s=0.05)
    try:
        results = await asyncio.gather(*(read(batcher, i, GREEDY) for i in ids), return_exceptions=True)
        assert all(isinstance(r, StepFailedError) and "MemoryError" in str(r) for r in results), results
        assert await read(batcher, ids[0], GREEDY) == [solo(causal, ids[0], GREEDY)]
    finally:
        handle.remove()
        await batcher.close()


def test_the_gateway_maps_a_row_failure_to_500_and_a_step_failure_to_a_retryable_503() -> None:
    from serving.api.errors import from_exception

    row = from_exception(RowFailedError("generating this request's row failed (ValueError)"), "openai", 7)
    step = from_exception(StepFailedError("the engine failed a step"), "native", 7)
    assert (row.status, row.kind, row.headers) == (500, "generation_failed", None)
    assert (step.status, step.kind, step.headers) == (503, "engine_step_failed", {"Retry-After": "7"})


@pytest.mark.parametrize(("route", "field"), [("/v1/completions", "top_k"), ("/generate", "generation_kwargs.top_k")])
def test_top_k_beyond_int32_is_refused_naming_the_field(tiny_causal: Path, route: str, field: str) -> None:
    from fastapi.testclient import TestClient

    from serving.app import create_app
    from settings import build_settings
    from tests.fakes import FakeBackend

    settings = build_settings({"MODEL_ID": str(tiny_causal), "SERVED_MODEL_NAME": "tiny"})
    client = TestClient(create_app(FakeBackend(settings), settings))
    body = {"model": "tiny", "prompt": "a", "top_k": 2**63}
    if route == "/generate":
        body = {"prompt": "a", "generation_kwargs": {"top_k": 2**63}}
    response = client.post(route, json=body)
    assert response.status_code in (400, 422) and field in response.text, response.text
