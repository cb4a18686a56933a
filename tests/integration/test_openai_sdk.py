"""The official `openai` client against the live service on real Ray Serve: models, completions, chat,
streaming (from zero replicas too), sixteen concurrent streams, a disconnect that frees its rows, the
error statuses as the SDK's exception classes, and vLLM's /tokenize and /detokenize (waking the model)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import openai
import pytest
from ray import serve

from ray_serve_app import build_graph
from settings import build_settings
from testing.checkpoints import build_tiny_causal
from testing.polling import wait_for
from tests.integration.conftest import APP

MODEL = "tiny-chat"
KEY = "sk-sdk-test-key-0123"
IDLE_TIMEOUT_S = 4.0
# A second application in the same Ray instance, with limits small enough to reach 503 and 504: room for one
# request on its replica and one in its queue, three seconds for an answer, and a model slow enough (its many
# layers cost about 10 ms a token here) that 1000 tokens take far longer than those three seconds.
STRICT, STRICT_MODEL = "strict", "tiny-strict"
STRICT_TIMEOUT_S = 3


@pytest.fixture(scope="module")
def slow_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_causal(tmp_path_factory.mktemp("tiny-slow"), n_positions=1100, n_layer=32)


@pytest.fixture(scope="module")
def url(serve_port: int, tiny_chat: Path, slow_model: Path) -> str:
    common = {
        "MODEL_ID": str(tiny_chat),
        "API_KEY": KEY,
        "MIN_REPLICAS": "0",
        "MAX_REPLICAS": "1",
        "AUTOSCALING_LOOK_BACK_S": "1",
        "METRICS_PUSH_INTERVAL_S": "0.5",
        "MAX_NEW_TOKENS": "16",
        "MAX_PROMPTS_PER_REQUEST": "8",
        "STREAM_HEARTBEAT_S": "0.5",
    }
    main = build_settings({**common, "SERVED_MODEL_NAME": MODEL, "IDLE_TIMEOUT_S": str(IDLE_TIMEOUT_S)})
    serve.run(build_graph(main), name=APP, route_prefix="/", blocking=False)
    strict = build_settings(
        {
            **common,
            "MODEL_ID": str(slow_model),
            "SERVED_MODEL_NAME": STRICT_MODEL,
            "MIN_REPLICAS": "1",
            "MAX_ONGOING_REQUESTS": "1",
            "MAX_QUEUED_REQUESTS": "1",
            "REQUEST_TIMEOUT_S": str(STRICT_TIMEOUT_S),
            "RETRY_AFTER_S": "2",
        }
    )
    serve.run(build_graph(strict), name=STRICT, route_prefix=f"/{STRICT}", blocking=False)
    base = f"http://127.0.0.1:{serve_port}"
    wait_for(lambda: _health(base) is not None and _health(f"{base}/{STRICT}") is not None, 120, what="both gateways")
    return base


def _health(base: str) -> dict | None:
    try:
        response = httpx.get(f"{base}/healthz", timeout=5)
    except httpx.HTTPError:
        return None
    return response.json() if response.status_code == 200 else None


def _state(base: str, model: str = MODEL) -> str | None:
    health = _health(base)
    return next((m["state"] for m in health["models"] if m["id"] == model), None) if health else None


def client(url: str, key: str = KEY, **options) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120, **options)


def aclient(url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=300)


def model_stats(model: str = MODEL) -> dict:
    name = model
    return serve.get_deployment_handle(name, name).stats.remote().result(timeout_s=30)


def test_a_stream_that_starts_at_zero_replicas(url: str) -> None:
    assert _state(url) == "scaled_to_zero"
    chunks, comments = [], []
    started = time.monotonic()
    body = {"model": MODEL, "prompt": "Return the", "max_tokens": 8, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                      timeout=300) as response:  # fmt: skip
        assert response.status_code == 200
        headers_after = time.monotonic() - started
        for line in response.iter_lines():
            if line.startswith(":"):
                comments.append(line)
            elif line.startswith("data: "):
                chunks.append(line)
    assert chunks[-1] == "data: [DONE]"
    # The headers came at once, and comments kept the connection busy while the model woke.
    assert headers_after < 5, f"headers took {headers_after:.1f}s"
    assert comments and all(c.startswith(f": waking {MODEL}") for c in comments), comments
    print(f"woke in {time.monotonic() - started:.1f}s; comments: {comments}")


def test_models_list(url: str) -> None:
    models = client(url).models.list()
    [card] = models.data
    assert card.id == MODEL and card.object == "model" and card.owned_by
    assert card.model_extra["state"] in ("running", "starting", "scaled_to_zero")


def test_completions_plain_n_stop_and_logprobs(url: str) -> None:
    sdk = client(url)
    plain = sdk.completions.create(model=MODEL, prompt="Return the", max_tokens=12, temperature=0)
    [choice] = plain.choices
    assert choice.finish_reason in ("stop", "length") and plain.usage.completion_tokens <= 12
    two = sdk.completions.create(model=MODEL, prompt="Return the", max_tokens=12, temperature=1.0, n=2, seed=5)
    assert [c.index for c in two.choices] == [0, 1]
    again = sdk.completions.create(model=MODEL, prompt="Return the", max_tokens=12, temperature=1.0, n=2, seed=5)
    assert [c.text for c in again.choices] == [c.text for c in two.choices], "seeded choices reproduce"
    if choice.text:
        stop = choice.text[len(choice.text) // 2 :][:2]
        stopped = sdk.completions.create(model=MODEL, prompt="Return the", max_tokens=12, temperature=0, stop=[stop])
        assert stop not in stopped.choices[0].text and choice.text.startswith(stopped.choices[0].text)
    scored = sdk.completions.create(model=MODEL, prompt="Return the", max_tokens=6, temperature=0, logprobs=2)
    logprobs = scored.choices[0].logprobs
    assert len(logprobs.tokens) == scored.usage.completion_tokens == len(logprobs.token_logprobs)
    assert all(lp <= 0 for lp in logprobs.token_logprobs)
    # Keyed by text, as OpenAI's legacy format is: two alternatives that decode alike share a key.
    assert all(1 <= len(top) <= 2 and max(top.values()) <= 0 for top in logprobs.top_logprobs)


def test_streamed_completion_equals_the_plain_one(url: str) -> None:
    sdk = client(url)
    plain = sdk.completions.create(model=MODEL, prompt="The socket", max_tokens=16, temperature=0)
    stream = sdk.completions.create(model=MODEL, prompt="The socket", max_tokens=16, temperature=0, stream=True)
    pieces = [chunk.choices[0].text for chunk in stream if chunk.choices]
    assert "".join(pieces) == plain.choices[0].text


def test_chat_plain_and_streamed_with_usage(url: str) -> None:
    sdk = client(url)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What does json do?"}]
    plain = sdk.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0)
    assert plain.choices[0].message.role == "assistant"
    stream = sdk.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == plain.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == plain.usage.total_tokens


def test_sixteen_concurrent_async_streams(url: str) -> None:
    words = ["number", "list", "socket", "file", "value", "item", "line", "name"]
    prompts = [f"Return the {word}" for word in words] * 2

    async def one(sdk: openai.AsyncOpenAI, prompt: str) -> tuple[str, int]:
        stream = await sdk.completions.create(
            model=MODEL,
            prompt=prompt,
            max_tokens=16,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        text, pieces = "", 0
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].text
                pieces += 1
        return text, pieces

    async def run() -> list[tuple[str, int]]:
        async with aclient(url) as sdk:
            return await asyncio.gather(*(one(sdk, p) for p in prompts))

    before = model_stats()["batches"]
    results = asyncio.run(run())
    batches = model_stats()["batches"] - before
    assert batches < len(prompts), f"sixteen concurrent streams ran in {batches} batches: they never shared one"
    sdk = client(url)
    for prompt, (text, _) in zip(prompts, results, strict=True):
        solo = sdk.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0)
        assert text == solo.choices[0].text, f"a batched stream differs from its solo answer for {prompt!r}"


def test_a_client_that_disconnects_frees_its_rows(url: str) -> None:
    sdk = client(url)
    before = model_stats()
    stream = sdk.completions.create(
        model=MODEL, prompt=["Return the", "The socket"], max_tokens=400, temperature=0, stream=True
    )
    for _, chunk in zip(range(3), stream, strict=False):
        assert chunk.choices
    stream.close()
    after = wait_for(
        lambda: (s := model_stats())["rows_running"] == 0 and s["streams_open"] == 0 and s["items_queued"] == 0 and s,
        timeout=30,
        what="the model server to let the rows go",
    )
    assert after["rows_cancelled"] - before["rows_cancelled"] == 2
    generated = after["tokens_generated"] - before["tokens_generated"]
    assert generated < 2 * 400, f"{generated} tokens: the rows ran to their end"


def test_errors_are_the_sdk_exception_classes(url: str) -> None:
    sdk = client(url)
    with pytest.raises(openai.NotFoundError) as info:
        sdk.completions.create(model="gpt-4", prompt="x")
    assert info.value.body["code"] == "model_not_found" and MODEL in info.value.body["message"]
    with pytest.raises(openai.BadRequestError) as info:
        sdk.completions.create(model=MODEL, prompt="x", temperature=3)
    assert info.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError, match="not among the tools"):
        sdk.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "x"}],
            tools=[{"type": "function", "function": {"name": "f"}}],
            tool_choice={"type": "function", "function": {"name": "g"}},
        )
    with pytest.raises(openai.AuthenticationError):
        client(url, key="sk-wrong-key-000").models.list()
    with pytest.raises(openai.APIStatusError) as info:
        sdk.completions.create(model=MODEL, prompt=["a"] * 9)
    assert info.value.status_code == 413
    with pytest.raises(openai.APIStatusError) as info:
        sdk.completions.create(model=MODEL, prompt="word " * 1200, max_tokens=4)
    assert info.value.status_code == 413 and "context" in info.value.body["message"]


def test_overload_and_timeout_are_503_and_504(url: str) -> None:
    """Six long requests at once against room for two: the first runs, the second may wait in the queue (or be
    refused while the first is still on its way to the replica), and the rest are refused at once with 503 +
    Retry-After. Those taken are out of time (504) long before their 1000 tokens.

    Nothing here depends on how fast the six arrive, short of the three seconds the first two stay taken.
    """
    wait_for(lambda: _state(f"{url}/{STRICT}", STRICT_MODEL) == "running", 120, what="the strict model")
    long = {"ignore_eos": True}  # 1000 tokens, whatever the random model writes

    async def flood() -> list[BaseException | object]:
        async with openai.AsyncOpenAI(base_url=f"{url}/{STRICT}/v1", api_key=KEY, max_retries=0) as sdk:
            calls = [
                sdk.completions.create(model=STRICT_MODEL, prompt="Return the", max_tokens=1000, extra_body=long)
                for _ in range(6)
            ]
            return await asyncio.gather(*calls, return_exceptions=True)

    began = time.monotonic()
    outcomes = asyncio.run(flood())
    took = time.monotonic() - began
    refused = [o for o in outcomes if isinstance(o, openai.InternalServerError) and o.status_code == 503]
    late = [o for o in outcomes if isinstance(o, openai.APIStatusError) and o.status_code == 504]
    assert len(refused) + len(late) == 6, f"six requests that cannot end in time: {outcomes}"
    assert refused, f"six requests against room for two were all accepted: {outcomes} in {took:.1f} s"
    assert all(o.response.headers["Retry-After"] == "2" for o in refused)
    assert all("queue is full" in o.body["message"] for o in refused), refused[0].body
    # Taken, then out of time: the one that ran, and the one that waited behind it if any.
    assert late, f"no request was taken: {outcomes}"
    assert all("REQUEST_TIMEOUT_S" in o.body["message"] and "Retry-After" not in o.response.headers for o in late)
    assert took >= STRICT_TIMEOUT_S


def test_tokenize_wakes_the_model_from_zero_and_detokenize_inverts_it(url: str, tiny_chat: Path) -> None:
    """vLLM's /tokenize and /detokenize, answered by the model's replica with its own tokenizer and template."""
    from transformers import AutoTokenizer

    wait_for(lambda: _state(url) == "scaled_to_zero", 120, what=f"{MODEL} back at zero replicas")
    headers = {"Authorization": f"Bearer {KEY}"}
    tokenizer = AutoTokenizer.from_pretrained(tiny_chat)
    text = "The socket module provides access"
    body = {"model": MODEL, "prompt": text, "return_token_strs": True}
    woke = httpx.post(f"{url}/tokenize", json=body, headers=headers, timeout=300)
    assert woke.status_code == 200 and float(woke.headers["x-cold-start"]) > 0, woke.text
    ids = tokenizer(text)["input_ids"]
    strs = tokenizer.convert_ids_to_tokens(ids)
    assert woke.json() == {"count": len(ids), "max_model_len": 1100, "tokens": ids, "token_strs": strs}
    back = httpx.post(f"{url}/detokenize", json={"model": MODEL, "tokens": ids}, headers=headers, timeout=60)
    assert back.json() == {"prompt": text}
    # A chat counts the tokens a chat completion is charged for.
    messages = [{"role": "user", "content": "What does json.dumps do?"}]
    chat = httpx.post(f"{url}/tokenize", json={"model": MODEL, "messages": messages}, headers=headers, timeout=60)
    used = client(url).chat.completions.create(model=MODEL, messages=messages, max_tokens=1)
    assert chat.json()["count"] == used.usage.prompt_tokens
    refused = httpx.post(f"{url}/detokenize", json={"model": MODEL, "tokens": [10**7]}, headers=headers, timeout=60)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "tokens.0"
    assert httpx.post(f"{url}/tokenize", json={"model": MODEL, "prompt": "a"}, timeout=60).status_code == 401
