"""The ModelServer deployment alone on real Ray Serve, called through its handle as the Gateway calls it:
tokens stream as the engine makes them, streamed equals collected, a reader that stops frees its rows."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from ray import serve
from ray.serve.handle import DeploymentHandle

from engine.errors import ChatTemplateError, PromptTooLongError
from engine.types import ChatMessage, Delta, GenerationRequest, SamplingParams, Started, collect
from serving.model_server import ModelServer
from settings import build_settings
from testing.checkpoints import CHAT_TEMPLATE, build_tiny_causal
from testing.polling import wait_for

APP = "model-server"
LONG = 400  # tokens: long enough that a stream is visibly under way while the engine still works


@pytest.fixture(scope="module")
def handle(serve_port: int, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DeploymentHandle]:
    # A context of 512 tokens, so one request can generate for a while; no chat template of its
    # own: CHAT_TEMPLATE gives it one (the model's config carries the template's text).
    model = build_tiny_causal(tmp_path_factory.mktemp("tiny-long"), n_positions=512)
    env = {"MODEL_ID": str(model), "MIN_REPLICAS": "1", "MAX_REPLICAS": "1", "MAX_BATCH_SIZE": "8"}
    [config] = build_settings({**env, "CHAT_TEMPLATE": CHAT_TEMPLATE}).model_configs
    assert config.chat_template == CHAT_TEMPLATE
    app = ModelServer.options(**config.deployment_options()).bind(config)
    yield serve.run(app, name=APP, route_prefix=None)
    serve.delete(APP)


def request(prompts=("Return the number",), max_new: int = 24, **kwargs) -> GenerationRequest:
    params = SamplingParams(max_new_tokens=max_new, **{k: v for k, v in kwargs.items() if k not in {"n", "messages"}})
    if "messages" in kwargs:
        return GenerationRequest("t", params, messages=kwargs["messages"], n=kwargs.get("n", 1))
    return GenerationRequest("t", params, prompts=tuple(prompts), n=kwargs.get("n", 1))


def stats(handle: DeploymentHandle) -> dict:
    return handle.stats.remote().result(timeout_s=30)


def streamed(handle: DeploymentHandle, req: GenerationRequest) -> tuple[Started, list[tuple[Delta, ...]]]:
    items = list(handle.options(stream=True).stream.remote(req))
    assert isinstance(items[0], Started) and all(isinstance(i, tuple) for i in items[1:])
    return items[0], items[1:]


def test_the_first_request_carries_the_cold_start_report(handle: DeploymentHandle) -> None:
    started, completions = handle.generate.remote(request()).result(timeout_s=120)
    assert started.cold_start is not None and started.cold_start["weights_s"] >= 0
    assert started.cold_start["first_generation_s"] > 0 and started.cold_start["replica"] == started.replica
    assert started.prompt_tokens == (completions[0].prompt_tokens,) and started.queue_s >= 0
    again, _ = handle.generate.remote(request()).result(timeout_s=60)
    assert again.cold_start is None and again.replica == started.replica


def test_tokens_arrive_while_the_engine_is_still_generating(handle: DeploymentHandle) -> None:
    generator = handle.options(stream=True).stream.remote(request(max_new=LONG))
    started = next(generator)
    assert isinstance(started, Started)
    first = next(generator)
    at_first = stats(handle)
    assert at_first["rows_running"] == 1, "the first delta came only after the generation ended"
    assert at_first["streams_open"] == 1
    rest = list(generator)
    deltas = [d for step in (first, *rest) for d in step]
    assert len(rest) >= 10, f"{LONG} tokens came in {len(rest) + 1} pieces"
    tokens, finish = sum(d.tokens for d in deltas), deltas[-1].finish_reason
    # Greedy: the same request answered whole draws the same tokens, and a stream that lost some cannot match it.
    _, [whole] = handle.generate.remote(request(max_new=LONG)).result(timeout_s=120)
    assert (tokens, finish) == (whole.completion_tokens, whole.finish_reason)
    assert tokens == LONG if finish == "length" else (finish == "stop" and tokens < LONG), (tokens, finish)


def test_greedy_streamed_joined_equals_the_collected_answer(handle: DeploymentHandle) -> None:
    for req in (
        request(("Return the number", "Raise"), max_new=30, n=2),
        request(max_new=30, logprobs=2),
        request(max_new=30, stop=(" the",)),
        request(messages=(ChatMessage("system", "Be brief."), ChatMessage("user", "Return the")), max_new=20),
    ):
        started, steps = streamed(handle, req)
        collected_started, completions = handle.generate.remote(req).result(timeout_s=60)
        joined = collect([d for step in steps for d in step], req.rows, started.prompt_tokens, req.n)
        assert joined == completions
        assert started.prompt_tokens == collected_started.prompt_tokens
    # n greedy choices of one prompt are the same text; rows are numbered prompt by prompt
    _, completions = handle.generate.remote(request(("Return the number", "Raise"), n=2)).result(timeout_s=60)
    assert completions[0] == completions[1] and completions[2] == completions[3]
    assert completions[0].text != completions[2].text


def test_a_reader_that_stops_early_frees_its_rows(handle: DeploymentHandle) -> None:
    before = stats(handle)
    generator = handle.options(stream=True).stream.remote(request(("Return the number", "Raise"), max_new=LONG))
    assert isinstance(next(generator), Started)
    next(generator)
    generator.cancel()  # what the Gateway's handle call gets when its client disconnects
    wait_for(lambda: stats(handle)["rows_running"] == 0, timeout=30, what="the rows to leave the batch")
    after = stats(handle)
    assert after["streams_open"] == 0 and after["items_queued"] == 0
    assert after["rows_cancelled"] - before["rows_cancelled"] == 2
    made = after["tokens_generated"] - before["tokens_generated"]
    assert made < LONG, f"{made} tokens for two rows of {LONG}: the engine went on after the reader left"


def test_requests_the_model_cannot_serve_fail_before_anything_is_streamed(handle: DeploymentHandle) -> None:
    too_long = handle.options(stream=True).stream.remote(request(("word " * 300,), max_new=300))
    with pytest.raises(PromptTooLongError, match="context of 512 tokens"):
        next(too_long)
    alternating = (ChatMessage("user", "a"), ChatMessage("user", "b"))
    refused = handle.options(stream=True).stream.remote(request(messages=alternating))
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        next(refused)
    with pytest.raises(PromptTooLongError):
        handle.generate.remote(request(("word " * 300,), max_new=300)).result(timeout_s=60)
    assert stats(handle)["streams_open"] == 0
