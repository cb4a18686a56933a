"""The model server with a fake engine handed to it: no Ray, no model (the real engine: tests/integration)."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from engine.admission import STEP_PROMPT_TOKENS
from engine.errors import PromptTooLongError
from engine.timing import PhaseTimer
from engine.types import ChatMessage, Delta, GenerationRequest, SamplingParams, Started
from engine.work import OnStep, Poll, WorkItem
from observability import metrics
from observability.sinks import MemorySink, use_sink
from serving.model_server import ModelServer, step_prompt_tokens
from settings import ModelConfig

TEMPLATE = "{% for m in messages %}{{ m.content }}{% endfor %}"


class NoRules:
    """The engine's logits rules with nothing to refuse (the real ones: tests/unit/test_processors.py)."""

    on_compile = None

    def check(self, params: SamplingParams) -> None:
        pass


class FakeEngine:
    """One token a step per row: the row's prompt length as text; prompts of over 8 words are too long."""

    continuous = False  # a batch runs to its end with the rows it began with

    def __init__(self) -> None:
        self.chats: list[tuple[Sequence[ChatMessage], str | None]] = []
        self.rules = NoRules()

    def encode(self, prompts: Sequence[str], params: SamplingParams) -> list[list[int]]:
        if any(len(p.split()) > 8 for p in prompts):
            raise PromptTooLongError("the prompt has more than 8 tokens")
        return [list(range(len(p.split()))) for p in prompts]

    def encode_chat(
        self, messages: Sequence[ChatMessage], params: SamplingParams, template: str | None = None, tools=None
    ):
        self.chats.append((messages, template))
        return [0] * len(messages)

    def run(self, items: Sequence[WorkItem], on_step: OnStep, poll: Poll | None = None, max_batch_size=None) -> None:
        for step in range(max(item.params.max_new_tokens for item in items)):
            events = []
            for item in items:
                if step < item.params.max_new_tokens:
                    last = step == item.params.max_new_tokens - 1
                    delta = Delta(item.row, f"{len(item.prompt_ids)} ", 1, finish_reason="length" if last else None)
                    events.append((item, delta))
            on_step(events)


@pytest.fixture
def loaded() -> list[tuple[ModelConfig, PhaseTimer]]:
    return []


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def server(engine: FakeEngine, loaded: list) -> ModelServer:
    config = ModelConfig(name="fake", model_id="org/fake", chat_template=TEMPLATE, max_batch_size=4)

    def load(config: ModelConfig, timer: PhaseTimer) -> FakeEngine:
        loaded.append((config, timer))
        with timer.phase("weights"):
            pass
        return engine

    return ModelServer.func_or_class(config, engine=load)  # the plain class: no Serve, no Ray


def request(*prompts: str, max_new: int = 3, n: int = 1) -> GenerationRequest:
    return GenerationRequest(request_id="r", params=SamplingParams(max_new_tokens=max_new), prompts=prompts, n=n)


def test_the_server_loads_the_engine_it_is_given_with_its_config(server: ModelServer, loaded: list) -> None:
    ((config, timer),) = loaded
    assert config.name == "fake" and isinstance(timer, PhaseTimer)
    assert set(server._cold_start) >= {"imports_s", "weights_s", "constructor_s"}
    assert server._cold_start["replica"] == "local"


def test_a_continuous_engine_takes_a_waves_prompts_a_share_a_step(engine: FakeEngine) -> None:
    config = ModelConfig(name="fake", model_id="org/fake")
    assert step_prompt_tokens(config, engine) is None  # a static batch takes no rows later: it takes all at once
    engine.continuous = True
    assert step_prompt_tokens(config, engine) == STEP_PROMPT_TOKENS["cpu"] == 64
    assert step_prompt_tokens(ModelConfig(name="fake", model_id="org/fake", step_prompt_tokens=512), engine) == 512


async def test_a_stream_is_started_then_the_engine_deltas(server: ModelServer) -> None:
    items = [item async for item in server.stream(request("a b", "c d e", max_new=2))]
    started, *steps = items
    assert isinstance(started, Started) and started.prompt_tokens == (2, 3) and started.cold_start is not None
    texts = {0: "", 1: ""}
    for deltas in steps:
        for delta in deltas:
            texts[delta.index] += delta.text
    assert texts == {0: "2 2 ", 1: "3 3 "}
    # The first request served carries the cold start; the next one does not.
    again = [item async for item in server.stream(request("a"))]
    assert again[0].cold_start is None


async def test_generate_collects_every_choice(server: ModelServer) -> None:
    started, completions = await server.generate(request("a b c", max_new=3, n=2))
    assert [c.text for c in completions] == ["3 3 3 ", "3 3 3 "]
    assert [c.finish_reason for c in completions] == ["length", "length"]
    assert started.cold_start is not None and "first_generation_s" in started.cold_start


async def test_a_whole_answer_is_timed_by_the_engine_like_a_stream(server: ModelServer) -> None:
    with use_sink(MemorySink()) as sink:
        await server.generate(request("a b", "c", max_new=4))  # two rows, not streamed
    (queued,) = sink.observations(metrics.QUEUE_TIME, model="fake")
    (first,) = sink.observations(metrics.ENGINE_TTFT, model="fake")
    gaps = sink.observations(metrics.ENGINE_ITL, model="fake")
    assert 0 <= queued <= first
    assert len(gaps) == 2 * 3 and all(gap >= 0 for gap in gaps)  # each row's tokens after its first


async def test_a_chat_is_encoded_with_the_configured_template(server: ModelServer, engine: FakeEngine) -> None:
    messages = (ChatMessage("user", "hi"), ChatMessage("assistant", "hello"), ChatMessage("user", "again"))
    chat = GenerationRequest(request_id="c", params=SamplingParams(max_new_tokens=1), messages=messages)
    started, completions = await server.generate(chat)
    assert engine.chats == [(messages, TEMPLATE)]
    assert started.prompt_tokens == (3,) and completions[0].text == "3 "


async def test_an_engine_refusal_comes_before_anything_is_streamed(server: ModelServer) -> None:
    stream = server.stream(request("one two three four five six seven eight nine"))
    with pytest.raises(PromptTooLongError):
        await anext(stream)
    assert (await server.stats())["requests"] == 1
