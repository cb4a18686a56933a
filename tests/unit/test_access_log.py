"""One access log line and the Gateway's metrics for every request, with a fake model (no Ray cluster)."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from ray.serve.exceptions import BackPressureError

from observability import metrics
from observability.metrics import MemorySink, use_sink
from serving.app import create_app
from settings import build_settings
from tests.fakes import FakeBackend, fake_text

KEY = "sk-test-0123456789"


@pytest.fixture
def settings(tiny_causal: Path):
    return build_settings({"MODEL_ID": str(tiny_causal), "SERVED_MODEL_NAME": "tiny", "MAX_BODY_BYTES": "2000"})


@pytest.fixture
def sink():
    with use_sink(MemorySink()) as sink:
        yield sink


@pytest.fixture
def lines(caplog: pytest.LogCaptureFixture):
    """The access lines logged so far, each as a dict of its fields."""
    caplog.set_level(logging.INFO, logger="ray.serve")

    def read() -> list[dict[str, str]]:
        out = []
        for record in caplog.records:
            message = record.getMessage()
            if message.startswith("access "):
                out.append(dict(field.split("=", 1) for field in message.split()[1:]))
                assert record.request_id == out[-1]["request_id"]  # Serve's formatter prints it
        return out

    return read


def test_a_whole_answer_logs_one_line_with_its_tokens_and_the_request_id(settings, sink, lines) -> None:
    backend = FakeBackend(settings)
    client = TestClient(create_app(backend, settings))
    response = client.post("/generate", json={"prompts": ["ab", "cde"]}, headers={"X-Request-Id": "req-42"})
    assert response.status_code == 200
    assert backend.calls[0].request_id == "req-42"  # the model server hears the same id
    (line,) = lines()
    assert line["route"] == "/generate" and line["model"] == "tiny" and line["status"] == "200"
    assert line["stream"] == "false" and line["request_id"] == "req-42"
    usage = response.json()["usage"]
    assert int(line["prompt_tokens"]) == usage["prompt_tokens"]
    assert int(line["completion_tokens"]) == usage["completion_tokens"]
    assert float(line["total_s"]) >= 0 and "ttft_s" not in line and "error" not in line
    assert sink.total(metrics.REQUESTS, route="/generate", model="tiny", status="200") == 1
    assert len(sink.observations(metrics.E2E_LATENCY, route="/generate")) == 1
    assert sink.observations(metrics.TTFT) == []  # only streams have a first token to time


def test_a_stream_is_logged_when_it_ends_with_time_to_first_token(settings, sink, lines) -> None:
    client = TestClient(create_app(FakeBackend(settings), settings))
    body = {"model": "tiny", "prompt": "hello", "stream": True, "stream_options": {"include_usage": True}}
    with client.stream("POST", "/v1/completions", json=body) as response:
        events = [json.loads(x[6:]) for x in response.iter_lines() if x.startswith("data: {")]
    (line,) = lines()
    usage = events[-1]["usage"]
    assert line["route"] == "/v1/completions" and line["stream"] == "true" and line["status"] == "200"
    assert int(line["completion_tokens"]) == usage["completion_tokens"]
    assert float(line["ttft_s"]) <= float(line["total_s"]) and "error" not in line
    chunks = -(-len(fake_text("hello", 0)) // 2)  # the fake sends 2 characters a chunk, 1 token each
    assert len(sink.observations(metrics.TTFT, route="/v1/completions", model="tiny")) == 1
    assert len(sink.observations(metrics.ITL, model="tiny")) == chunks - 1


@pytest.mark.parametrize(
    ("method", "path", "body", "headers", "status", "route"),
    [
        ("POST", "/generate", {"prompt": "a"}, {}, 401, "/generate"),
        ("POST", "/v1/completions", {"model": "nope", "prompt": "a"}, {"Authorization": f"Bearer {KEY}"}, 404,
         "/v1/completions"),
        ("POST", "/v1/chat/completions", {"model": "tiny", "messages": "x" * 3000}, {"Authorization": f"Bearer {KEY}"},
         413, "/v1/chat/completions"),
        ("POST", "/generate", {"prompt": 5}, {"Authorization": f"Bearer {KEY}"}, 422, "/generate"),
        ("GET", "/generate", None, {"Authorization": f"Bearer {KEY}"}, 405, "/generate"),
        ("GET", "/no/such%0Apath", None, {}, 404, "other"),
    ],
)  # fmt: skip
def test_refusals_are_logged_and_counted_without_a_model(
    tiny_causal, sink, lines, method, path, body, headers, status, route
) -> None:
    settings = build_settings({"MODEL_ID": str(tiny_causal), "SERVED_MODEL_NAME": "tiny", "API_KEY": KEY,
                               "MAX_BODY_BYTES": "2000"})  # fmt: skip
    client = TestClient(create_app(FakeBackend(settings), settings))
    response = client.request(method, path, json=body, headers=headers)
    assert response.status_code == status, response.text
    (line,) = lines()
    assert (line["status"], line["route"], line["model"]) == (str(status), route, metrics.NO_MODEL)
    assert "such" not in json.dumps(line) and KEY not in json.dumps(line)  # neither the typed path nor a key
    assert sink.total(metrics.REQUESTS, route=route, status=str(status), model=metrics.NO_MODEL) == 1


@pytest.mark.parametrize("stream", [False, True])
def test_a_full_queue_is_a_counted_rejection(settings, sink, lines, stream) -> None:
    backend = FakeBackend(settings, fail_before=BackPressureError(num_queued_requests=4, max_queued_requests=4))
    client = TestClient(create_app(backend, settings))
    response = client.post("/v1/completions", json={"model": "tiny", "prompt": "a", "stream": stream})
    assert response.status_code == 503 and response.headers["Retry-After"] == "1"
    assert sink.total(metrics.REJECTED, route="/v1/completions", model="tiny", reason="queue_full") == 1
    assert lines()[0]["status"] == "503"


def test_a_stream_that_breaks_logs_its_error_and_an_unhandled_error_is_a_logged_500(settings, sink, lines) -> None:
    client = TestClient(create_app(FakeBackend(settings, fail_after=(2, RuntimeError("boom"))), settings))
    with client.stream("POST", "/generate", json={"prompt": "abcdef", "stream": True}) as response:
        assert response.status_code == 200 and "internal error" in response.read().decode()
    assert lines()[-1]["error"] == "internal_error" and lines()[-1]["status"] == "200"

    class Broken(FakeBackend):
        async def statuses(self):
            raise RuntimeError("controller unreachable")

    client = TestClient(create_app(Broken(settings), settings), raise_server_exceptions=False)
    response = client.get("/healthz")
    assert response.status_code == 500 and response.json()["error"]["type"] == "internal_error"
    assert lines()[-1]["status"] == "500" and lines()[-1]["route"] == "/healthz"
    assert sink.total(metrics.REQUESTS, route="/healthz", status="500") == 1


async def test_concurrent_requests_to_a_model_at_zero_count_one_wake(settings, sink, lines) -> None:
    backend = FakeBackend(settings, state="scaled_to_zero", start_delay_s=0.3)
    transport = httpx.ASGITransport(app=create_app(backend, settings))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        answers = await asyncio.gather(
            *(client.post("/generate", json={"prompt": "a", "stream": i % 2 == 1}) for i in range(4))
        )
    assert [a.status_code for a in answers] == [200] * 4
    assert sink.total(metrics.WAKES, model="tiny", cause="request") == 1
    assert float(answers[0].headers["x-cold-start"]) >= 0.3
    assert all(float(line["cold_start_s"]) >= 0.3 for line in lines())


async def test_a_client_that_leaves_mid_stream_is_logged_and_its_model_stream_closed(settings, sink, lines) -> None:
    backend = FakeBackend(settings, delta_delay_s=0.05)
    app = create_app(backend, settings)
    body = json.dumps({"prompt": "a long prompt to reverse", "stream": True}).encode()
    sent: list[dict] = []
    leave = asyncio.Event()
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict:
        if messages:
            return messages.pop()
        await leave.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)
        if sum(m["type"] == "http.response.body" for m in sent) == 3:
            leave.set()  # the client goes away after two chunks

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/generate", "raw_path": b"/generate", "root_path": "", "query_string": b"",
             "headers": [(b"content-type", b"application/json"), (b"x-request-id", b"gone-1")],
             "client": ("127.0.0.1", 1), "server": ("test", 80)}  # fmt: skip
    await asyncio.wait_for(app(scope, receive, send), timeout=10)
    (line,) = lines()
    assert line["status"] == "200" and line["error"] == "client_gone" and line["request_id"] == "gone-1"
    assert backend.closed == 1 and backend.finished == 0  # the model's stream was stopped, not run to its end
    assert re.fullmatch(r"\d+", line["completion_tokens"])


class AdminFake(FakeBackend):
    """The fake backend with the admin calls /admin makes."""

    async def list_models(self) -> list[dict]:
        return []

    async def load(self, entry: dict) -> dict:
        return {"id": entry["name"]}

    async def unload(self, name: str, wait_s: float) -> dict:
        return {"id": name, "unloaded": True}


def test_every_admin_call_leaves_an_audit_line_without_the_key(tiny_causal: Path, caplog) -> None:
    admin_key = "adm-audit-0123456789"
    settings = build_settings({"MODEL_ID": str(tiny_causal), "API_KEY": KEY, "ADMIN_API_KEY": admin_key})
    client = TestClient(create_app(AdminFake(settings), settings), raise_server_exceptions=False)
    caplog.set_level(logging.INFO, logger="ray.serve")
    admin = {"Authorization": f"Bearer {admin_key}"}
    calls = [
        client.get("/admin/models", headers=admin),
        client.post("/admin/models", json={"name": "mini", "model_id": "org/mini"}, headers=admin),
        client.delete("/admin/models/mini", headers=admin),
        client.post("/admin/models", json={"name": "mini"}, headers={"Authorization": f"Bearer {KEY}"}),
    ]
    assert [c.status_code for c in calls] == [200, 201, 200, 401]
    audits = [r for r in caplog.records if r.name == "ray.serve.audit"]
    fields = [dict(f.split("=", 1) for f in r.getMessage().split()[1:]) for r in audits]
    assert [(f["action"], f["model"], f["result"], f["status"]) for f in fields] == [
        ("list", "-", "ok", "200"),
        ("load", "mini", "ok", "201"),
        ("unload", "mini", "ok", "200"),
        ("load", "-", "refused", "401"),  # refused before the body was read: no name to give
    ]
    access = [r.getMessage() for r in caplog.records if r.getMessage().startswith("access ")]
    assert [f["request_id"] for f in fields] == [line.rsplit("request_id=", 1)[1] for line in access]
    assert [f["route"] for f in fields] == ["/admin/models", "/admin/models", "/admin/models/{name:path}",
                                            "/admin/models"]  # fmt: skip
    assert not any(admin_key in r.getMessage() or KEY in r.getMessage() for r in caplog.records)
