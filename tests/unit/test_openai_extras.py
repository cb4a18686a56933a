"""The OpenAI fields beyond text in, text out, translated with a fake backend: logit bias, vLLM's
sampling extras, response_format and guided_* constraints, token-id prompts, echo with logprobs,
max_tokens 0, and the metadata fields the SDK sends."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from engine.types import Constraint
from serving.app import create_app
from settings import build_settings
from tests.fakes import FakeBackend

MODEL = "tiny"


@pytest.fixture
def backend(tiny_causal: Path) -> FakeBackend:
    return FakeBackend(build_settings({"MODEL_ID": str(tiny_causal), "SERVED_MODEL_NAME": MODEL}))


@pytest.fixture
def client(backend: FakeBackend) -> TestClient:
    return TestClient(create_app(backend, backend.settings), raise_server_exceptions=False)


def chat(**extra) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **extra}


def test_sampling_extras_reach_the_engine_on_both_routes(client, backend) -> None:
    extras = {"logit_bias": {"7": -100, "12": 5.5}, "min_tokens": 2, "stop_token_ids": [3, 4], "ignore_eos": True,
              "min_p": 0.1, "top_k": 5, "repetition_penalty": 1.2, "max_tokens": 8}  # fmt: skip
    assert client.post("/v1/completions", json={"model": MODEL, "prompt": "a", **extras}).status_code == 200
    assert client.post("/v1/chat/completions", json=chat(**extras)).status_code == 200
    for call in backend.calls:
        p = call.params
        assert p.logit_bias == ((7, -100.0), (12, 5.5)) and p.min_tokens == 2 and p.stop_token_ids == (3, 4)
        assert p.ignore_eos and p.min_p == 0.1 and p.top_k == 5 and p.repetition_penalty == 1.2


def test_requests_without_extras_ask_for_no_processor(client, backend) -> None:
    client.post("/v1/chat/completions", json=chat())
    p = backend.calls[0].params
    assert (p.logit_bias, p.min_tokens, p.stop_token_ids, p.ignore_eos, p.min_p, p.constraint) == (
        (),
        0,
        (),
        False,
        0.0,
        None,
    )


def test_sdk_metadata_fields_are_never_a_400(client, backend) -> None:
    metadata = {"store": True, "metadata": {"team": "rag"}, "service_tier": "auto", "prompt_cache_key": "k1",
                "safety_identifier": "u-1", "parallel_tool_calls": False, "user": "u", "verbosity": "low"}  # fmt: skip
    assert client.post("/v1/chat/completions", json=chat(**metadata)).status_code == 200
    assert client.post("/v1/completions", json={"model": MODEL, "prompt": "a", **metadata}).status_code == 200


RESPONSE_FORMATS = [
    ({"type": "json_object"}, Constraint("json_object")),
    ({"type": "json_schema", "json_schema": {"name": "P", "schema": {"type": "object"}, "strict": True}},
     Constraint("json_schema", '{"type": "object"}', True, "response_format.json_schema.schema")),
    ({"type": "json_schema", "json_schema": {"name": "P", "schema": {"type": "object"}}},
     Constraint("json_schema", '{"type": "object"}', False, "response_format.json_schema.schema")),
]  # fmt: skip


@pytest.mark.parametrize(("fmt", "expected"), RESPONSE_FORMATS)
def test_response_format_becomes_a_constraint(client, backend, fmt, expected) -> None:
    assert client.post("/v1/chat/completions", json=chat(response_format=fmt)).status_code == 200
    assert backend.calls[0].params.constraint == expected


def test_guided_extras_become_constraints(client, backend) -> None:
    guided = [
        ({"guided_choice": ["a", "b"]}, "choice"),
        ({"guided_regex": "a+"}, "regex"),
        ({"guided_json": {"type": "object"}}, "json_schema"),
        ({"guided_grammar": 'root ::= "x"'}, "grammar"),
    ]
    for extra, kind in guided:
        assert client.post("/v1/completions", json={"model": MODEL, "prompt": "a", **extra}).status_code == 200
        assert backend.calls[-1].params.constraint.kind == kind
    assert json.loads(backend.calls[0].params.constraint.spec) == ["a", "b"]


BAD = [
    ({"logit_bias": {"the": 1}}, "logit_bias", "keys are token ids"),
    ({"logit_bias": {"5": 101}}, "logit_bias", "from -100 to 100"),
    ({"min_tokens": 30, "max_tokens": 10}, "min_tokens", "more than the 10 tokens"),
    ({"min_p": 2}, "min_p", "less than or equal to 1"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema.schema", "required"),
    ({"response_format": {"type": "yaml"}}, "response_format.type", "json_schema"),
    ({"response_format": {"type": "json_object"}, "guided_regex": "a"}, "guided_regex", "one constraint per request"),
    ({"guided_json": "{not json"}, "guided_json", "not valid JSON"),
]  # fmt: skip


@pytest.mark.parametrize(("extra", "param", "fragment"), BAD)
def test_bad_extras_are_400_naming_the_field(client, backend, extra, param, fragment) -> None:
    response = client.post("/v1/chat/completions", json=chat(**extra))
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and fragment in error["message"], error
    assert backend.calls == []


def test_token_id_prompts_reach_the_engine_as_ids(client, backend) -> None:
    one = client.post("/v1/completions", json={"model": MODEL, "prompt": [5, 6, 7], "echo": True}).json()
    assert backend.calls[0].token_prompts == ((5, 6, 7),) and backend.calls[0].prompts == ()
    client.post("/v1/completions", json={"model": MODEL, "prompt": [[5, 6], [7]], "n": 2})
    assert backend.calls[1].token_prompts == ((5, 6), (7,)) and backend.calls[1].rows == 4
    assert one["choices"][0]["text"].startswith("5 6 7<")  # echo shows the text the replica decoded


def test_echo_with_logprobs_asks_for_the_prompts_logprobs(client, backend) -> None:
    body = {"model": MODEL, "prompt": "abc", "echo": True, "logprobs": 1, "max_tokens": 0}
    assert client.post("/v1/completions", json=body).status_code == 200
    assert backend.calls[0].params.prompt_logprobs == 1 and backend.calls[0].params.max_new_tokens == 0
    client.post("/v1/completions", json={**body, "echo": False, "max_tokens": 3})
    assert backend.calls[1].params.prompt_logprobs is None


def test_echoed_prompt_logprobs_come_first_with_the_first_null_whole_and_streamed(client) -> None:
    body = {"model": MODEL, "prompt": "abc", "echo": True, "logprobs": 1, "max_tokens": 0}
    [choice] = client.post("/v1/completions", json=body).json()["choices"]
    lp = choice["logprobs"]
    assert choice["text"] == "abc" and lp["tokens"] == ["a", "b", "c"] and lp["text_offset"] == [0, 1, 2]
    assert lp["token_logprobs"] == [None, -2.0, -3.0] and lp["top_logprobs"][0] is None
    more = client.post("/v1/completions", json={**body, "max_tokens": 4}).json()["choices"][0]["logprobs"]
    assert more["token_logprobs"][:3] == [None, -2.0, -3.0] and len(more["tokens"]) > 3
    assert more["text_offset"][3] == 3  # the generated tokens' offsets follow the prompt's
    text = client.post("/v1/completions", json={**body, "max_tokens": 4, "stream": True}).text
    parts = [json.loads(b[6:]) for b in text.split("\n\n") if b.startswith("data: {")]
    first = parts[0]["choices"][0]
    assert first["text"] == "abc" and first["logprobs"]["token_logprobs"] == [None, -2.0, -3.0]
    assert parts[1]["choices"][0]["logprobs"]["text_offset"][0] == 3
