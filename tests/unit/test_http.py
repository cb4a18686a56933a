"""The native dialect (/generate, /healthz) with a fake model backend: schemas, limits, errors, streaming."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from ray.serve.exceptions import BackPressureError

from engine.errors import ChatTemplateError, PromptTooLongError
from serving.app import create_app
from settings import build_settings
from tests.fakes import FakeBackend, fake_text


@pytest.fixture
def settings(tiny_causal: Path):
    return build_settings(
        {
            "MODEL_ID": str(tiny_causal),
            "MAX_PROMPTS_PER_REQUEST": "3",
            "MAX_PROMPT_CHARS": "50",
            "MAX_NEW_TOKENS": "20",
            "MAX_NEW_TOKENS_LIMIT": "100",
            # Long enough that a loaded machine never runs into it; the timeout test sets its own.
            "REQUEST_TIMEOUT_S": "60",
            "RETRY_AFTER_S": "4",
        }
    )


def client_for(settings, backend: FakeBackend | None = None) -> TestClient:
    return TestClient(create_app(backend or FakeBackend(settings), settings), raise_server_exceptions=False)


def sse_events(text: str) -> list[tuple[str, dict]]:
    """(event name, data) of each server-sent event in ``text``; comments skipped."""
    events = []
    for block in text.strip().split("\n\n"):
        lines = [line for line in block.splitlines() if not line.startswith(":")]
        if not lines:
            continue
        name = next((line[7:] for line in lines if line.startswith("event: ")), "message")
        data = "".join(line[6:] for line in lines if line.startswith("data: "))
        events.append((name, json.loads(data)))
    return events


def test_generate_single_prompt_shape_and_defaults(settings) -> None:
    backend = FakeBackend(settings)
    response = client_for(settings, backend).post("/generate", json={"prompt": "hi"})
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"model", "prompts", "completions", "finish_reasons", "generation_kwargs", "usage"}
    assert body["prompts"] == ["hi"] and body["completions"] == [fake_text("hi", 0)]
    assert body["model"] == settings.model_configs[0].name
    kwargs = body["generation_kwargs"]
    assert kwargs["max_new_tokens"] == 20 and kwargs["temperature"] == 0.7 and kwargs["top_p"] == 0.9
    assert isinstance(kwargs["seed"], int), "sampling always reports the seed it used"
    tokens = (len(fake_text("hi", 0)) + 1) // 2
    assert body["usage"] == {"prompt_tokens": 2, "completion_tokens": tokens, "total_tokens": 2 + tokens}
    assert backend.calls[0].params.seed == kwargs["seed"]


def test_generate_prompts_list_and_explicit_kwargs(settings) -> None:
    backend = FakeBackend(settings)
    kwargs = {"max_new_tokens": 5, "temperature": 0, "top_p": 0.5, "top_k": 3, "stop": "\n", "seed": 9}
    response = client_for(settings, backend).post(
        "/generate", json={"prompts": ["a", "b"], "generation_kwargs": kwargs}
    )
    assert response.status_code == 200
    body = response.json()
    assert body["completions"] == [fake_text("a", 0), fake_text("b", 1)]
    assert body["generation_kwargs"] == {
        "max_new_tokens": 5,
        "temperature": 0.0,
        "top_p": 0.5,
        "top_k": 3,
        "repetition_penalty": 1.0,
        "seed": 9,
        "stop": ["\n"],
    }


def test_greedy_request_has_no_invented_seed(settings) -> None:
    body = client_for(settings).post("/generate", json={"prompt": "a", "generation_kwargs": {"temperature": 0}}).json()
    assert body["generation_kwargs"]["seed"] is None


def test_curl_style_body_without_json_content_type_is_415(settings) -> None:
    response = client_for(settings).post(
        "/generate", content=b'{"prompt": "hi"}', headers={"Content-Type": "application/x-www-form-urlencoded"}
    )
    assert response.status_code == 415, response.text
    assert "Content-Type: application/json" in response.json()["error"]["message"]


BAD_REQUESTS = [
    ({}, 422, "send a 'prompt'"),
    ({"prompt": ""}, 422, "prompt: String should have at least 1 character"),
    ({"prompt": "a", "prompts": ["b"]}, 422, "not both"),
    ({"prompts": []}, 422, "prompts: List should have at least 1 item"),
    ({"prompts": ["a", 3]}, 422, "prompts.1: Input should be a valid string"),
    ({"prompts": "a"}, 422, "prompts: Input should be a valid list"),
    ({"prompt": 5}, 422, "prompt: Input should be a valid string"),
    ({"prompt": "a", "extra": 1}, 422, "extra: Extra inputs are not permitted"),
    ({"prompt": "a", "generation_kwargs": {"beams": 4}}, 422, "generation_kwargs.beams: Extra inputs"),
    ({"prompt": "a", "generation_kwargs": {"temperature": 2.5}}, 422, "temperature: Input should be less than"),
    ({"prompt": "a", "generation_kwargs": {"temperature": "hot"}}, 422, "temperature: Input should be a valid number"),
    ({"prompt": "a", "generation_kwargs": {"top_p": 0}}, 422, "top_p: Input should be greater than 0"),
    ({"prompt": "a", "generation_kwargs": {"top_k": -1}}, 422, "top_k: Input should be greater than or equal"),
    ({"prompt": "a", "generation_kwargs": {"max_new_tokens": 0}}, 422, "max_new_tokens: Input should be greater"),
    ({"prompt": "a", "generation_kwargs": {"max_new_tokens": "5"}}, 422, "max_new_tokens: Input should be a valid"),
    ({"prompt": "a", "generation_kwargs": {"max_new_tokens": 101}}, 422, "limit of 100 (MAX_NEW_TOKENS_LIMIT)"),
    ({"prompt": "a", "model": "other"}, 404, "does not exist"),
    ({"prompt": "a", "stream": "yes"}, 422, "stream: Input should be a valid boolean"),
    ({"prompt": "a", "generation_kwargs": {"seed": -1}}, 422, "seed: Input should be greater than or equal"),
    ({"prompt": "a", "generation_kwargs": {"stop": [""]}}, 422, "stop.0: String should have at least 1"),
    ({"prompt": "a", "generation_kwargs": {"repetition_penalty": 0}}, 422, "repetition_penalty: Input should"),
    ({"prompt": "a", "generation_kwargs": []}, 422, "generation_kwargs: Input should be a valid dictionary"),
    ({"prompts": ["a", "b", "c", "d"]}, 413, "at most 3 (MAX_PROMPTS_PER_REQUEST)"),
    ({"prompt": "x" * 51}, 413, "at most 50 (MAX_PROMPT_CHARS)"),
    ({"prompts": ["ok", "x" * 51]}, 413, "prompt 1 has 51 characters"),
]


@pytest.mark.parametrize(("body", "status", "fragment"), BAD_REQUESTS)
def test_bad_request_gets_clear_4xx_and_never_reaches_the_model(settings, body, status, fragment) -> None:
    backend = FakeBackend(settings)
    client = client_for(settings, backend)
    response = client.post("/generate", json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == status and fragment in error["message"]
    assert backend.calls == []
    assert client.post("/generate", json={"prompt": "still fine"}).status_code == 200


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [(b"{not json", "not valid JSON"), (b'{"prompt": "a",}', "not valid JSON"), (b"[1, 2", "not valid JSON"),
     (b"\xff\xfe", "not valid UTF-8")],
)  # fmt: skip
def test_malformed_json_is_400(settings, raw: bytes, fragment: str) -> None:
    response = client_for(settings).post("/generate", content=raw, headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    assert fragment in response.json()["error"]["message"]


def test_prompt_too_long_from_the_model_is_413(settings) -> None:
    backend = FakeBackend(settings, fail_before=PromptTooLongError("the prompt has 300 tokens ... context of 128."))
    response = client_for(settings, backend).post("/generate", json={"prompt": "a"})
    assert response.status_code == 413
    assert response.json()["error"] == {
        "code": 413,
        "type": "prompt_too_long",
        "message": "the prompt has 300 tokens ... context of 128.",
    }


def test_backpressure_is_503_with_retry_after(settings) -> None:
    error = BackPressureError(num_queued_requests=5, max_queued_requests=5)
    response = client_for(settings, FakeBackend(settings, fail_before=error)).post("/generate", json={"prompt": "a"})
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "4"
    assert response.json()["error"]["type"] == "overloaded"


def test_timeout_is_504(settings) -> None:
    settings = settings.model_copy(update={"request_timeout_s": 0.2})
    response = client_for(settings, FakeBackend(settings, start_delay_s=5)).post("/generate", json={"prompt": "a"})
    assert response.status_code == 504
    assert "REQUEST_TIMEOUT_S" in response.json()["error"]["message"]


def test_unexpected_error_is_a_generic_500(settings) -> None:
    backend = FakeBackend(settings, fail_before=KeyError("secret internals"))
    response = client_for(settings, backend).post("/generate", json={"prompt": "a"})
    assert response.status_code == 500
    assert "secret" not in response.text


def test_unknown_route_and_method(settings) -> None:
    client = client_for(settings)
    assert client.get("/nope").json()["error"]["code"] == 404
    assert client.get("/generate").json()["error"]["code"] == 405


def test_healthz_never_calls_the_model(settings) -> None:
    backend = FakeBackend(settings, state="scaled_to_zero")
    client = client_for(settings, backend)
    for _ in range(5):
        body = client.get("/healthz").json()
    assert body["status"] == "ok" and body["auth"] == "none"
    [model] = body["models"]
    assert model["id"] == settings.model_configs[0].name and model["root"] == settings.model_id
    assert model["state"] == "scaled_to_zero" and model["replicas"]["max"] == settings.max_replicas
    assert backend.calls == []


def test_streamed_generate_sends_deltas_then_the_whole_answer(settings) -> None:
    client = client_for(settings)
    body = {"prompts": ["ab", "xyz"], "generation_kwargs": {"temperature": 0}}
    plain = client.post("/generate", json=body).json()
    response = client.post("/generate", json={**body, "stream": True})
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response.text)
    names = [name for name, _ in events]
    assert names[-1] == "done" and set(names[:-1]) == {"delta"} and len(names) > 3
    for index in (0, 1):
        joined = "".join(data["text"] for name, data in events if name == "delta" and data["index"] == index)
        assert joined == plain["completions"][index]
    assert events[-1][1] == plain


def test_a_failure_after_the_stream_began_is_an_error_event(settings) -> None:
    backend = FakeBackend(settings, fail_after=(2, RuntimeError("boom")))
    response = client_for(settings, backend).post("/generate", json={"prompt": "abcdef", "stream": True})
    assert response.status_code == 200
    events = sse_events(response.text)
    assert [name for name, _ in events][-1] == "error"
    assert events[-1][1]["error"]["code"] == 500 and "boom" not in response.text
    assert backend.closed == 1


def test_chat_template_missing_is_400(settings) -> None:
    backend = FakeBackend(settings, fail_before=ChatTemplateError("no chat template; set CHAT_TEMPLATE"))
    response = client_for(settings, backend).post(
        "/v1/chat/completions",
        json={"model": settings.model_configs[0].name, "messages": [{"role": "user", "content": "hi"}]},
    )
    assert response.status_code == 400
    assert "CHAT_TEMPLATE" in response.json()["error"]["message"]


def test_openapi_documents_every_route_with_examples(settings) -> None:
    client = client_for(settings)
    spec = client.get("/openapi.json").json()
    assert {"/generate", "/healthz", "/v1/models", "/v1/completions", "/v1/chat/completions"} <= set(spec["paths"])
    request_schema = spec["components"]["schemas"]["GenerateRequest"]
    assert request_schema.get("examples") and request_schema["additionalProperties"] is False
    assert {"413", "422", "503"} <= set(spec["paths"]["/generate"]["post"]["responses"])
    assert client.get("/docs").status_code == 200


def test_gateway_modules_do_not_import_torch() -> None:
    import subprocess

    code = (
        "import sys, serving.gateway, serving.app, ray_serve_app; "
        "heavy = [m for m in ('torch', 'transformers') if m in sys.modules]; "
        "print(heavy); sys.exit(1 if heavy else 0)"
    )
    env = {"PATH": "/usr/bin:/bin", "MODEL_ID": "facebook/opt-125m"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
