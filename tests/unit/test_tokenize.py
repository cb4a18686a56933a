"""/tokenize and /detokenize: vLLM's shapes, the model's own tokenizer and chat template, and the same key
check, limits and error shape as the /v1 routes (HTTP with real model servers, no Ray)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from transformers import AutoTokenizer

from engine.chat import encode_chat, render_chat
from engine.types import ChatMessage
from serving.app import create_app
from serving.model_server import ModelServer
from settings import build_settings
from testing.checkpoints import CHAT_TEMPLATE, build_tiny_causal
from tests.fakes import FakeBackend

KEY = "sk-tokenize-0123"
AUTH = {"Authorization": f"Bearer {KEY}"}
CHAT = [{"role": "user", "content": "What does json.dumps do?"}]


@pytest.fixture(scope="module")
def tiny_bos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny GPT-2 whose tokenizer adds a BOS token and whose chat template writes one."""
    return build_tiny_causal(tmp_path_factory.mktemp("tiny-bos"), chat_template=CHAT_TEMPLATE, add_bos=True)


@pytest.fixture(scope="module")
def service(tiny_bos: Path, tiny_encoder: Path):
    entries = [
        {"name": "gen", "model_id": str(tiny_bos), "dtype": "float32"},
        {"name": "enc", "model_id": str(tiny_encoder), "task": "embed", "dtype": "float32"},
    ]
    env = {"MODELS": json.dumps(entries), "API_KEY": KEY, "MAX_PROMPT_CHARS": "200", "AUTH_FAILURE_DELAY_S": "0"}
    settings = build_settings(env)
    backend = FakeBackend(settings)
    for config in settings.model_configs:
        backend.servers[config.name] = ModelServer.func_or_class(config)  # the real engines, no Ray
    client = TestClient(create_app(backend, settings), raise_server_exceptions=False, headers=AUTH)
    return client, backend, AutoTokenizer.from_pretrained(tiny_bos)


def test_a_prompt_is_encoded_as_vllm_answers_it(service) -> None:
    client, _, tokenizer = service
    out = client.post("/tokenize", json={"model": "gen", "prompt": "Return the value"}).json()
    ids = tokenizer("Return the value")["input_ids"]
    assert out == {"count": len(ids), "max_model_len": 128, "tokens": ids, "token_strs": None}
    assert ids[0] == tokenizer.bos_token_id
    bare = client.post("/tokenize", json={"model": "gen", "prompt": "Return the value", "add_special_tokens": False})
    assert bare.json()["tokens"] == ids[1:]
    named = client.post("/tokenize", json={"model": "gen", "prompt": "Return the", "return_token_strs": True}).json()
    assert named["token_strs"] == tokenizer.convert_ids_to_tokens(named["tokens"]) == ["<s>", "Return", "Ġthe"]


def test_a_chat_is_encoded_as_chat_completions_encodes_it(service) -> None:
    client, _, tokenizer = service
    out = client.post("/tokenize", json={"model": "gen", "messages": CHAT}).json()
    messages = [ChatMessage("user", CHAT[0]["content"])]
    expected = encode_chat(tokenizer, render_chat(tokenizer, messages))
    assert out["tokens"] == expected and expected.count(tokenizer.bos_token_id) == 1  # the template's BOS only
    doubled = client.post("/tokenize", json={"model": "gen", "messages": CHAT, "add_special_tokens": True}).json()
    assert doubled["tokens"] == [tokenizer.bos_token_id, *expected]  # asked for: the tokenizer's BOS too
    no_turn = client.post("/tokenize", json={"model": "gen", "messages": CHAT, "add_generation_prompt": False}).json()
    assert tokenizer.decode(expected).endswith("<|assistant|>")
    assert not tokenizer.decode(no_turn["tokens"]).endswith("<|assistant|>") and no_turn["count"] < out["count"]
    body = {"model": "gen", "messages": CHAT, "add_generation_prompt": False, "continue_final_message": True}
    opened = client.post("/tokenize", json=body).json()
    assert tokenizer.decode(opened["tokens"]).endswith("json.dumps do?")  # the last message left open
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]
    assert client.post("/tokenize", json={"model": "gen", "messages": CHAT, "tools": tools}).status_code == 200


def test_detokenize_inverts_tokenize_and_keeps_special_tokens(service) -> None:
    client, _, _ = service
    ids = client.post("/tokenize", json={"model": "gen", "prompt": "Café → naïve"}).json()["tokens"]
    assert client.post("/detokenize", json={"model": "gen", "tokens": ids}).json() == {"prompt": "<s>Café → naïve"}
    assert client.post("/detokenize", json={"model": "gen", "tokens": []}).json() == {"prompt": ""}
    # An embedding model is tokenized by its own tokenizer too, as vLLM serves it.
    enc = client.post("/tokenize", json={"model": "enc", "prompt": "hello"}).json()
    assert enc["max_model_len"] > 0 and len(enc["tokens"]) == enc["count"] >= 3  # [CLS] hello [SEP]


TOOL = {"type": "function", "function": {"name": "f"}}
BAD = [
    ("/tokenize", {"prompt": "a", "messages": CHAT}, 400, "prompt", "one of them"),
    ("/tokenize", {}, 400, "prompt", "one of them"),
    ("/tokenize", {"prompt": "a", "tools": [TOOL]}, 400, "tools", "with messages"),
    ("/tokenize", {"messages": CHAT, "continue_final_message": True}, 400, "continue_final_message", "generation"),
    ("/tokenize", {"prompt": "x" * 201}, 413, "prompt", "MAX_PROMPT_CHARS"),
    ("/tokenize", {"messages": [{"role": "user", "content": "x" * 201}]}, 413, "messages", "MAX_PROMPT_CHARS"),
    ("/tokenize", {"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages.0.role", "unknown role"),
    ("/tokenize", {"prompt": 7}, 400, "prompt", "string"),
    ("/detokenize", {"tokens": [1, 10**6]}, 400, "tokens.1", "outside this model's vocabulary"),
    ("/detokenize", {"tokens": [-1]}, 400, "tokens.0", "greater than or equal to 0"),
    ("/detokenize", {"tokens": [1] * 201}, 413, "tokens", "MAX_PROMPT_CHARS"),
    ("/detokenize", {"tokens": "1 2"}, 400, "tokens", "list"),
]  # fmt: skip


@pytest.mark.parametrize(("route", "body", "status", "param", "words"), BAD)
def test_bad_requests_get_the_openai_error_shape_naming_the_field(service, route, body, status, param, words) -> None:
    client, _, _ = service
    response = client.post(route, json={"model": "gen", **body})
    error = response.json()["error"]
    assert response.status_code == status and set(error) == {"message", "type", "param", "code"}, error
    assert error["param"] == param and words in error["message"], error


def test_the_key_the_model_and_the_chat_template_are_checked_like_every_route(service) -> None:
    client, _, _ = service
    keyless = TestClient(client.app, raise_server_exceptions=False)
    refused = keyless.post("/tokenize", json={"model": "gen", "prompt": "a"})
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
    assert keyless.post("/detokenize", json={"model": "gen", "tokens": [1]}).status_code == 401
    unknown = client.post("/detokenize", json={"model": "gpt-4", "tokens": [1]})
    assert unknown.status_code == 404 and "gen" in unknown.json()["error"]["message"]
    assert client.post("/tokenize", json={"prompt": "a"}).json()["error"]["code"] == "model_required"
    no_template = client.post("/tokenize", json={"model": "enc", "messages": CHAT})
    assert no_template.status_code == 400 and no_template.json()["error"]["code"] == "chat_template"
    assert client.get("/tokenize").status_code == 405


def test_a_model_at_zero_is_woken_and_the_answer_says_so(service) -> None:
    client, backend, _ = service
    backend.state = "scaled_to_zero"
    try:
        response = client.post("/tokenize", json={"model": "gen", "prompt": "a"})
    finally:
        backend.state = "running"
    assert response.status_code == 200 and float(response.headers["x-cold-start"]) >= 0


def test_both_routes_are_in_the_openapi_schema(service) -> None:
    client, _, _ = service
    paths = client.get("/openapi.json").json()["paths"]
    assert set(paths["/tokenize"]) == {"post"} and set(paths["/detokenize"]) == {"post"}
    schema = paths["/tokenize"]["post"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert schema["$ref"].endswith("/TokenizeResponse")
