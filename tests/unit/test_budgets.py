"""Budgets: the batch's key/value cache (MAX_BATCH_TOKENS), the derived prompt limit, and the output budget
of one request (MAX_OUTPUT_TOKENS_PER_REQUEST)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from engine.admission import BatchShape, TokenBudget
from engine.batcher import Batcher
from engine.errors import PromptTooLongError
from engine.model import EngineConfig, TextGenerator
from engine.types import Completion, SamplingParams, collect
from engine.work import WorkItem
from serving.app import create_app
from settings import build_settings
from tests.fakes import FakeBackend

PARAMS = SamplingParams(max_new_tokens=12)


@pytest.fixture(scope="module")
def causal(tiny_causal: Path) -> TextGenerator:
    return TextGenerator.load(EngineConfig(model_id=str(tiny_causal), num_threads=1, max_batch_tokens=100))


async def answered_together(
    batcher: Batcher, engine: TextGenerator, ids: list[list[int]], hook: Callable[..., None]
) -> list[Completion]:
    """Every prompt sent at once through ``batcher`` (closed after), ``hook`` seeing each forward pass's kwargs."""
    handle = engine.model.register_forward_pre_hook(hook, with_kwargs=True)

    async def read(prompt_ids: list[int]) -> Completion:
        deltas = [d for ds in [x async for x in batcher.stream([prompt_ids], [PARAMS])] for d in ds]
        return collect(deltas, 1, [len(prompt_ids)])[0]

    try:
        return await asyncio.gather(*(read(i) for i in ids))
    finally:
        handle.remove()
        await batcher.close()


def test_a_row_that_does_not_fit_holds_the_queue_and_nothing_overtakes_it() -> None:
    batcher = Batcher(lambda *args: None, max_batch_size=8, wait_timeout_s=0, budget=TokenBudget(100))
    big = WorkItem(stream=1, row=0, prompt_ids=[1] * 40, params=SamplingParams(max_new_tokens=5))
    small = WorkItem(stream=2, row=0, prompt_ids=[1] * 2, params=SamplingParams(max_new_tokens=2))
    batcher._queue.extend([big, small])
    assert batcher._take(8, BatchShape(width=10, remaining=(20,))) == []  # 2 x (40 + 20) = 120 > 100
    assert batcher.budget_waits == 1
    assert batcher._take(8, BatchShape()) == [big, small]  # the batch emptied: the big row first


def test_an_empty_batch_takes_its_first_row_whatever_its_size() -> None:
    assert TokenBudget(10).round().admit(prompt_tokens=50, max_new_tokens=50)
    assert TokenBudget(None).round(BatchShape(5, (1,) * 100)).admit(10_000, 10_000)


def test_a_poll_admits_its_prompt_tokens_and_the_rest_wait_for_the_next_poll() -> None:
    round_ = TokenBudget(None, step_prompt_tokens=25).round()
    assert round_.admit(10, 4) and round_.admit(10, 4)
    assert not round_.admit(10, 4) and round_.refused == "step"  # 30 > 25
    assert TokenBudget(None, step_prompt_tokens=4).round().admit(50, 4)  # a poll's first row: whatever its length
    batcher = Batcher(lambda *args: None, max_batch_size=8, wait_timeout_s=0, budget=TokenBudget(None, 25))
    items = [WorkItem(stream=i, row=0, prompt_ids=[1] * 10, params=PARAMS) for i in range(5)]
    batcher._queue.extend(items)
    assert batcher._take(8) == items[:2] and batcher._take(8, BatchShape(10, (12, 12))) == items[2:4]
    assert batcher._take(8) == items[4:] and batcher.budget_waits == 0  # budget_waits: the cache's only


async def test_a_wave_of_prompts_is_prefilled_a_share_a_step_and_answers_as_alone(causal) -> None:
    prompts = ["Return the number of", "Raise the error when", "A Ray Serve replica", "Scale the model to"]
    ids = [causal.encode([p], PARAMS)[0] for p in prompts]
    alone = [causal.generate([i], PARAMS)[0] for i in ids]
    tokens: list[int] = []
    longest = max(len(i) for i in ids)
    batcher = Batcher(causal.run, max_batch_size=8, wait_timeout_s=0.05, budget=TokenBudget(None, longest))
    answers = await answered_together(
        batcher, causal, ids, lambda module, args, kwargs: tokens.append(kwargs["input_ids"].numel())
    )
    assert answers == alone
    # One prompt a pass (beside at most three decoding rows' tokens), where all four arrived within the wait.
    assert max(tokens) <= longest + len(ids) - 1 < sum(len(i) for i in ids), (tokens, [len(i) for i in ids])
    assert batcher.stats()["rows_running"] == 0


def test_the_projection_counts_padding_and_the_longest_tail() -> None:
    round_ = TokenBudget(100).round(BatchShape(width=10, remaining=(20,)))
    assert round_.projected(prompt_tokens=40, max_new_tokens=5) == 2 * (40 + 20)
    assert round_.admit(10, 20) and round_.rows == 2
    assert not round_.admit(40, 5)  # 3 x (40 + 20) = 180


async def test_a_batch_at_its_token_budget_admits_the_row_later_and_it_answers_as_alone(causal) -> None:
    ids = [causal.encode([p], PARAMS)[0] for p in ("Return the number", "Raise the error", "A Ray Serve")]
    alone = [causal.generate([i], PARAMS)[0] for i in ids]
    widths: list[int] = []

    def hook(module, args, kwargs):
        mask = kwargs["attention_mask"]
        widths.append(mask.shape[0] * mask.shape[1])

    budget = TokenBudget(2 * (max(len(i) for i in ids) + PARAMS.max_new_tokens))  # two rows, never three
    batcher = Batcher(causal.run, max_batch_size=8, wait_timeout_s=0.05, budget=budget)
    answers = await answered_together(batcher, causal, ids, hook)
    assert answers == alone
    stats = batcher.stats()
    assert stats["budget_waits"] >= 1
    assert max(widths) <= budget.max_tokens, (max(widths), budget.max_tokens)
    assert stats["rows_running"] == 0 and stats["items_queued"] == 0


def test_a_row_that_can_never_fit_a_batch_is_refused_naming_the_setting(causal) -> None:
    n = len(causal.encode(["word word"], SamplingParams(max_new_tokens=1))[0])
    causal.encode(["word word"], SamplingParams(max_new_tokens=100 - n))  # exactly the budget: fits
    with pytest.raises(PromptTooLongError, match=rf"\(100 tokens, MAX_BATCH_TOKENS\).*max_new_tokens to {100 - n}\."):
        causal.encode(["word word"], SamplingParams(max_new_tokens=101 - n))  # within the context of 128


def test_max_prompt_tokens_defaults_to_the_context_and_batch_budget_less_one(causal, tiny_causal: Path) -> None:
    assert causal.context_length == 128 and causal.max_prompt_tokens == 99  # min(128, 100) - 1
    wide = TextGenerator(causal.model, causal.tokenizer, EngineConfig(model_id=str(tiny_causal)))
    assert wide.max_prompt_tokens == 127


# --- the output budget, at the Gateway ----------------------------------------------------------------


@pytest.fixture
def client(tiny_causal: Path) -> TestClient:
    settings = build_settings({"MODEL_ID": str(tiny_causal), "SERVED_MODEL_NAME": "tiny"})
    return TestClient(create_app(FakeBackend(settings), settings))


CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize("stream", [False, True])
def test_a_request_over_the_output_budget_is_400_naming_it(client, stream: bool) -> None:
    body = {**CHAT, "n": 16, "logprobs": True, "top_logprobs": 20, "max_tokens": 1024, "stream": stream}
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "output_budget_exceeded" and "MAX_OUTPUT_TOKENS_PER_REQUEST" in error["message"]
    assert "16 completion(s) x 1024 tokens x (1 + 20" in error["message"]


@pytest.mark.parametrize(
    ("route", "body"),
    [
        ("/v1/chat/completions", {**CHAT, "logprobs": True, "top_logprobs": 20, "max_tokens": 1024}),  # 21,504
        ("/v1/completions", {"model": "tiny", "prompt": "a", "n": 16, "max_tokens": 1024}),  # 16,384
        ("/generate", {"prompts": ["a"] * 16, "generation_kwargs": {"max_new_tokens": 1024}}),
    ],
)
def test_requests_within_the_budget_pass(client, route: str, body: dict) -> None:
    assert client.post(route, json=body).status_code == 200
