"""The OpenAI dialect with a fake model backend: schemas, translation of every field, rendering, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from ray.serve.exceptions import BackPressureError

from engine.errors import PromptTooLongError
from serving.app import create_app
from settings import build_settings
from tests.fakes import FakeBackend, fake_text

MODEL = "tiny"


@pytest.fixture
def settings(tiny_causal: Path):
    return build_settings(
        {
            "MODEL_ID": str(tiny_causal),
            "SERVED_MODEL_NAME": MODEL,
            "MAX_PROMPTS_PER_REQUEST": "4",
            "MAX_NEW_TOKENS": "20",
            "MAX_NEW_TOKENS_LIMIT": "100",
            "TEMPERATURE": "0.5",
            "TOP_P": "0.8",
            "REQUEST_TIMEOUT_S": "5",
            "RETRY_AFTER_S": "3",
            "STREAM_HEARTBEAT_S": "0.1",
        }
    )


@pytest.fixture
def backend(settings) -> FakeBackend:
    return FakeBackend(settings)


@pytest.fixture
def client(settings, backend) -> TestClient:
    return TestClient(create_app(backend, settings), raise_server_exceptions=False)


def chunks(text: str) -> tuple[list[dict], list[str]]:
    """The JSON chunks of an OpenAI stream (checking it ends with [DONE]) and its comment lines."""
    blocks = [b for b in text.split("\n\n") if b]
    comments = [b[2:] for b in blocks if b.startswith(": ")]
    data = [b.removeprefix("data: ") for b in blocks if b.startswith("data: ")]
    assert data[-1] == "[DONE]", text[-200:]
    assert all(b.startswith((": ", "data: ")) for b in blocks)
    return [json.loads(d) for d in data[:-1]], comments


def chat(content: str = "hello", **extra) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], **extra}


# --- /v1/models ---------------------------------------------------------------------------------------


def test_models_lists_the_served_model_with_its_state(client, settings, backend) -> None:
    body = client.get("/v1/models").json()
    assert body["object"] == "list"
    [card] = body["data"]
    assert card["id"] == MODEL and card["object"] == "model" and card["owned_by"] and isinstance(card["created"], int)
    assert card["state"] == "running" and card["root"] == settings.model_id
    assert client.get(f"/v1/models/{MODEL}").json()["id"] == MODEL
    missing = client.get("/v1/models/nope")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    assert backend.calls == []


# --- /v1/completions ----------------------------------------------------------------------------------


def test_completion_translates_every_field(client, backend) -> None:
    body = {
        "model": MODEL,
        "prompt": "abc",
        "max_tokens": 7,
        "temperature": 0.9,
        "top_p": 0.5,
        "n": 2,
        "stop": ["\n", "END"],
        "seed": 42,
        "presence_penalty": 0.5,
        "frequency_penalty": -0.5,
        "top_k": 3,
        "repetition_penalty": 1.1,
        "user": "someone",
    }
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    [request] = backend.calls
    params = request.params
    assert request.prompts == ("abc",) and request.n == 2
    assert (params.max_new_tokens, params.temperature, params.top_p, params.seed) == (7, 0.9, 0.5, 42)
    assert (params.presence_penalty, params.frequency_penalty, params.top_k, params.repetition_penalty) == (
        0.5,
        -0.5,
        3,
        1.1,
    )
    assert params.stop == ("\n", "END") and params.logprobs is None
    out = response.json()
    assert out["object"] == "text_completion" and out["model"] == MODEL and out["id"].startswith("cmpl-")
    assert [c["index"] for c in out["choices"]] == [0, 1]
    assert [c["text"] for c in out["choices"]] == [fake_text("abc", 0), fake_text("abc", 1)]
    assert out["usage"]["prompt_tokens"] == 3
    assert out["usage"]["total_tokens"] == out["usage"]["prompt_tokens"] + out["usage"]["completion_tokens"]


def test_completion_defaults_come_from_the_settings(client, backend) -> None:
    client.post("/v1/completions", json={"model": MODEL, "prompt": "x"})
    params = backend.calls[0].params
    assert (params.max_new_tokens, params.temperature, params.top_p) == (20, 0.5, 0.8)
    assert isinstance(params.seed, int), "sampling runs from a known seed"


def test_model_id_is_accepted_as_the_model_name(client, settings) -> None:
    response = client.post("/v1/completions", json={"model": settings.model_id, "prompt": "x"})
    assert response.status_code == 200 and response.json()["model"] == MODEL


def test_completion_list_of_prompts_and_echo(client) -> None:
    out = client.post("/v1/completions", json={"model": MODEL, "prompt": ["ab", "cd"], "echo": True}).json()
    assert [c["text"] for c in out["choices"]] == ["ab" + fake_text("ab", 0), "cd" + fake_text("cd", 1)]


def test_completion_logprobs(client, backend) -> None:
    out = client.post("/v1/completions", json={"model": MODEL, "prompt": "abc", "logprobs": 2}).json()
    assert backend.calls[0].params.logprobs == 2
    logprobs = out["choices"][0]["logprobs"]
    assert "".join(logprobs["tokens"]) == out["choices"][0]["text"]
    assert len(logprobs["token_logprobs"]) == len(logprobs["tokens"]) == len(logprobs["text_offset"])
    assert all(len(top) == 2 for top in logprobs["top_logprobs"])
    assert logprobs["text_offset"][0] == 0 and logprobs["text_offset"][1] == len(logprobs["tokens"][0])


def test_streamed_completion_joins_to_the_plain_one(client) -> None:
    plain = client.post("/v1/completions", json={"model": MODEL, "prompt": "hello", "n": 2, "seed": 1}).json()
    response = client.post(
        "/v1/completions",
        json={
            "model": MODEL,
            "prompt": "hello",
            "n": 2,
            "seed": 1,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    assert response.headers["content-type"].startswith("text/event-stream")
    parts, _ = chunks(response.text)
    usage = parts[-1]
    assert usage["choices"] == [] and usage["usage"] == plain["usage"]
    for index in (0, 1):
        mine = [p["choices"][0] for p in parts[:-1] if p["choices"][0]["index"] == index]
        assert "".join(c["text"] for c in mine) == plain["choices"][index]["text"]
        assert mine[-1]["finish_reason"] == "length" and all(c["finish_reason"] is None for c in mine[:-1])
    assert all(p["object"] == "text_completion" and p["id"] == parts[0]["id"] for p in parts)


def test_stream_without_include_usage_has_no_usage_chunk(client) -> None:
    parts, _ = chunks(client.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "stream": True}).text)
    assert all(p["choices"] for p in parts) and all("usage" not in p for p in parts)


UNSUPPORTED_COMPLETION = [
    ({"prompt": "a", "suffix": "z"}, "suffix", "not supported"),
    ({"prompt": "a", "best_of": 3}, "best_of", "best_of == n"),
    ({"prompt": "a", "stream_options": {"include_usage": True}}, "stream_options", "stream: true"),
    ({"prompt": []}, "prompt", "the list is empty"),
    ({"prompt": [[1], []]}, "prompt", "is empty"),
]


@pytest.mark.parametrize(("extra", "param", "fragment"), UNSUPPORTED_COMPLETION)
def test_unsupported_completion_features_are_400_naming_the_field(client, backend, extra, param, fragment) -> None:
    response = client.post("/v1/completions", json={"model": MODEL, **extra})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and fragment in error["message"] and error["type"] == "invalid_request_error"
    assert backend.calls == []


INVALID_COMPLETION = [
    ({"prompt": "a", "temperature": 3}, "temperature", "less than or equal to 2"),
    ({"prompt": "a", "top_p": 0}, "top_p", "greater than 0"),
    ({"prompt": "a", "n": 0}, "n", "greater than or equal to 1"),
    ({"prompt": "a", "logprobs": 6}, "logprobs", "less than or equal to 5"),
    ({"prompt": "a", "max_tokens": 101}, "max_tokens", "MAX_NEW_TOKENS_LIMIT"),
    ({"prompt": "a", "max_tokens": "5"}, "max_tokens", "valid integer"),
    ({"prompt": "a", "presence_penalty": 2.5}, "presence_penalty", "less than or equal to 2"),
    ({"prompt": "a", "seed": -1}, "seed", "greater than or equal to 0"),
    ({"prompt": "", "max_tokens": 5}, "prompt", "at least 1 character"),
    ({"prompt": "a", "stop": ["x"] * 9}, "stop", "at most 8"),
    ({}, "prompt", "Field required"),
]


@pytest.mark.parametrize(("extra", "param", "fragment"), INVALID_COMPLETION)
def test_invalid_values_are_400_with_the_param(client, extra, param, fragment) -> None:
    response = client.post("/v1/completions", json={"model": MODEL, **extra})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"].split(".")[0] == param and fragment in error["message"]


def test_unknown_fields_are_accepted(client) -> None:
    assert client.post("/v1/completions", json={"model": MODEL, "prompt": "a", "mystery": 1}).status_code == 200


def test_unknown_model_is_404_naming_the_served_ones(client) -> None:
    response = client.post("/v1/completions", json={"model": "gpt-4", "prompt": "a"})
    assert response.status_code == 404
    error = response.json()["error"]
    assert error["code"] == "model_not_found" and MODEL in error["message"] and error["param"] == "model"


def test_too_many_completions_is_413(client) -> None:
    response = client.post("/v1/completions", json={"model": MODEL, "prompt": ["a", "b", "c"], "n": 2})
    assert response.status_code == 413 and response.json()["error"]["param"] == "n"


# --- /v1/chat/completions -----------------------------------------------------------------------------


def test_chat_translates_messages_and_content_parts(client, backend) -> None:
    body = chat(
        max_completion_tokens=9,
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "What is "}, {"type": "text", "text": "json?"}]},
            {"role": "assistant", "content": "A format."},
            {"role": "developer", "content": "Answer in English."},
            {"role": "user", "content": "And yaml?"},
        ],
    )
    out = client.post("/v1/chat/completions", json=body).json()
    [request] = backend.calls
    assert [(m.role, m.content) for m in request.messages] == [
        ("system", "Be brief."),
        ("user", "What is json?"),
        ("assistant", "A format."),
        ("system", "Answer in English."),
        ("user", "And yaml?"),
    ]
    assert request.params.max_new_tokens == 9
    assert out["object"] == "chat.completion" and out["id"].startswith("chatcmpl-")
    assert out["choices"][0]["message"]["role"] == "assistant" and out["choices"][0]["finish_reason"] == "length"


def test_chat_logprobs_and_top_logprobs(client, backend) -> None:
    out = client.post("/v1/chat/completions", json=chat(logprobs=True, top_logprobs=3)).json()
    assert backend.calls[0].params.logprobs == 3
    content = out["choices"][0]["logprobs"]["content"]
    assert "".join(t["token"] for t in content) == out["choices"][0]["message"]["content"]
    assert all(len(t["top_logprobs"]) == 3 and isinstance(t["bytes"], list) for t in content)
    client.post("/v1/chat/completions", json=chat(logprobs=True))
    assert backend.calls[1].params.logprobs == 0
    client.post("/v1/chat/completions", json=chat())
    assert backend.calls[2].params.logprobs is None


def test_streamed_chat_has_role_then_content_then_finish_then_usage(client) -> None:
    plain = client.post("/v1/chat/completions", json=chat(seed=3)).json()
    response = client.post(
        "/v1/chat/completions", json=chat(seed=3, stream=True, stream_options={"include_usage": True})
    )
    parts, _ = chunks(response.text)
    assert all(p["object"] == "chat.completion.chunk" for p in parts)
    first = parts[0]["choices"][0]
    assert first["delta"] == {"role": "assistant", "content": ""} and first["finish_reason"] is None
    content = "".join(p["choices"][0]["delta"].get("content", "") for p in parts[1:-1])
    assert content == plain["choices"][0]["message"]["content"]
    last = parts[-2]["choices"][0]
    assert last["delta"] == {} and last["finish_reason"] == "length"
    assert parts[-1]["choices"] == [] and parts[-1]["usage"] == plain["usage"]


UNSUPPORTED_CHAT = [
    ({"tool_choice": "required"}, "tool_choice", "needs tools"),
    ({"messages": [{"role": "function", "content": "x"}]}, "messages.0.role", "replaced by tool messages"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role", "unknown role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages.0.content.0.type", "'image_url' parts"),
    ({"messages": [{"role": "user", "content": "x", "name": "bob"}]}, "messages.0.name", "names are not supported"),
    ({"top_logprobs": 2}, "top_logprobs", "needs logprobs"),
    ({"max_tokens": 5, "max_completion_tokens": 6}, "max_completion_tokens", "disagree"),
    ({"messages": [{"role": "user"}]}, "messages.0.content", "required"),
]  # fmt: skip


@pytest.mark.parametrize(("extra", "param", "fragment"), UNSUPPORTED_CHAT)
def test_unsupported_chat_features_are_400_naming_the_field(client, backend, extra, param, fragment) -> None:
    response = client.post("/v1/chat/completions", json=chat(**extra))
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and fragment in error["message"]
    assert backend.calls == []


def test_response_format_text_is_accepted(client) -> None:
    assert client.post("/v1/chat/completions", json=chat(response_format={"type": "text"})).status_code == 200


# --- errors and the wait for a cold start ---------------------------------------------------------------


def test_errors_before_the_stream_keep_their_status(settings) -> None:
    error = BackPressureError(num_queued_requests=1, max_queued_requests=1)
    client = TestClient(create_app(FakeBackend(settings, fail_before=error), settings))
    response = client.post("/v1/chat/completions", json=chat(stream=True))
    assert response.status_code == 503 and response.headers["Retry-After"] == "3"
    assert response.json()["error"]["code"] == "overloaded"
    too_long = FakeBackend(settings, fail_before=PromptTooLongError("the prompt has 300 tokens"))
    response = TestClient(create_app(too_long, settings)).post("/v1/completions", json={"model": MODEL, "prompt": "a"})
    assert response.status_code == 413 and response.json()["error"]["param"] == "prompt"


def test_a_failure_mid_stream_is_an_error_event_then_done(settings) -> None:
    backend = FakeBackend(settings, fail_after=(2, RuntimeError("internal detail")))
    response = TestClient(create_app(backend, settings)).post(
        "/v1/chat/completions", json=chat("a long prompt", stream=True)
    )
    assert response.status_code == 200
    blocks = [b for b in response.text.split("\n\n") if b]
    assert blocks[-1] == "data: [DONE]"
    error = json.loads(blocks[-2].removeprefix("data: "))["error"]
    assert error["type"] == "server_error" and "internal detail" not in response.text
    assert backend.closed == 1


def test_a_stream_waiting_for_a_cold_start_sends_comments_at_once(settings) -> None:
    backend = FakeBackend(settings, start_delay_s=0.5, state="starting")
    client = TestClient(create_app(backend, settings))
    with client.stream("POST", "/v1/chat/completions", json=chat(stream=True)) as response:
        assert response.status_code == 200
        text = "".join(response.iter_text())
    parts, comments = chunks(text)
    assert len(comments) >= 2 and all(c.startswith(f"waking {MODEL}: imports") for c in comments)
    assert text.index(": waking") < text.index("data: ")
    assert parts[0]["choices"][0]["delta"]["role"] == "assistant"


def test_a_non_streamed_answer_that_waited_for_a_cold_start_says_so(settings) -> None:
    client = TestClient(create_app(FakeBackend(settings, start_delay_s=0.2, state="scaled_to_zero"), settings))
    response = client.post("/v1/completions", json={"model": MODEL, "prompt": "a"})
    assert float(response.headers["x-cold-start"]) >= 0.2
    warm = TestClient(create_app(FakeBackend(settings), settings)).post(
        "/v1/completions", json={"model": MODEL, "prompt": "a"}
    )
    assert "x-cold-start" not in warm.headers


def test_legacy_logprobs_keep_the_likelier_of_two_alternatives_that_decode_alike() -> None:
    from engine.types import TokenLogprob, TopLogprob
    from serving.api.openai_responses import completion_logprobs as _completion_logprobs

    halves = (
        TopLogprob("\ufffd", (0xE2,), -0.5),
        TopLogprob("\ufffd", (0xE2, 0x82), -1.5),
        TopLogprob("a", (97,), -2.0),
    )
    out = _completion_logprobs([TokenLogprob("\ufffd", (0xE2,), -0.5, top=halves)], offset=3)
    assert out.top_logprobs == [{"\ufffd": -0.5, "a": -2.0}] and out.text_offset == [3]
