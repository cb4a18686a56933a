"""Headers first: the key is checked before any byte of the body is read, bodies cost what their size
costs, only JSON is read, request ids are safe to log, and Serve's disconnect opt-out is refused."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from serving.api import body as body_module
from serving.api.auth import KeyCheck
from serving.api.body import BodyError, nesting_exceeds, parse_strict
from serving.api.gate import HeaderGate, guards
from serving.app import create_app
from settings import build_settings
from tests.fakes import FakeBackend

KEY, ADMIN_KEY = "sk-test-0123456789", "sk-admin-0123456789"


@pytest.fixture
def locked(tiny_causal: Path):
    return build_settings(
        {"MODEL_ID": str(tiny_causal), "SERVED_MODEL_NAME": "tiny", "API_KEY": KEY, "ADMIN_API_KEY": ADMIN_KEY,
         "AUTH_FAILURE_DELAY_S": "0"}  # refusals at once, except in the tests of the hold below
    )  # fmt: skip


def call_raw(app: Any, method: str, path: str, headers: list[tuple[bytes, bytes]]) -> tuple[int, bytes, int]:
    """(status, body, how many times the app asked for the request body) of one ASGI call."""
    reads = 0
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        nonlocal reads
        reads += 1
        return {"type": "http.request", "body": b'{"prompt": "' + b"a" * 1000 + b'"}', "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
        "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"", "headers": headers,
        "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 8000),
    }  # fmt: skip
    asyncio.run(app(scope, receive, send))
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    return status, b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body"), reads


JSON = [(b"content-type", b"application/json")]


@pytest.mark.parametrize(
    ("method", "path", "auth", "family"),
    [
        ("POST", "/generate", None, "native"),
        ("POST", "/v1/chat/completions", b"Bearer wrong-key-000", "openai"),
        ("POST", "/v1/completions", b"Basic " + KEY.encode(), "openai"),
        ("POST", "/no/such/route", None, "native"),
        ("POST", "/admin/models", b"Bearer " + KEY.encode(), "native"),  # the API key is not the admin key
    ],
)
def test_a_request_without_a_valid_key_gets_401_before_its_body_is_read(locked, method, path, auth, family) -> None:
    app = create_app(FakeBackend(locked), locked)
    headers = JSON + ([(b"authorization", auth)] if auth else [])
    status, body, reads = call_raw(app, method, path, headers)
    assert (status, reads) == (401, 0), body
    error = json.loads(body)["error"]
    assert (error["code"] == "invalid_api_key") if family == "openai" else (error["type"] == "invalid_api_key")
    assert KEY not in body.decode() and ADMIN_KEY not in body.decode()


def test_with_the_key_the_body_is_read_and_probes_stay_open(locked) -> None:
    app = create_app(FakeBackend(locked), locked)
    status, _, reads = call_raw(app, "POST", "/generate", [*JSON, (b"authorization", f"Bearer {KEY}".encode())])
    assert status == 200 and reads >= 1
    assert call_raw(app, "GET", "/healthz", [])[0] == 200
    assert call_raw(app, "GET", "/v1/models", [])[0] == 401


class Sleeps:
    """A stand-in for asyncio.sleep that records each wait and ends it only when told to."""

    def __init__(self) -> None:
        self.waits: list[float] = []
        self.release = asyncio.Event()

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)
        await self.release.wait()


def test_refusals_for_the_key_are_held_back_a_bounded_number_at_a_time() -> None:
    """AUTH_FAILURE_DELAY_S: a 401 waits out the delay before it is sent (its body still unread); at most
    AUTH_FAILURE_MAX_HELD wait at once, later ones are answered at once; requests with the key never wait."""
    served: list[str] = []

    async def inner(scope: dict[str, Any], receive: Any, send: Any) -> None:
        served.append(scope["path"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    rules = guards(KeyCheck([SecretStr(KEY)]), None)

    async def scenario() -> None:
        sleeps = Sleeps()
        gate = HeaderGate(inner, rules, delay_s=0.5, max_held=2, sleep=sleeps)
        held = [asyncio.create_task(asgi_call(gate, "/v1/completions", None)) for _ in range(2)]
        while gate.held < 2:
            await asyncio.sleep(0)
        assert sleeps.waits == [0.5, 0.5] and not any(t.done() for t in held)
        # a third refusal finds the bound taken: answered at once, unread
        assert await asyncio.wait_for(asgi_call(gate, "/v1/completions", b"Bearer wrong-key-000"), 5) == (401, 0)
        # a request with the key is never held
        assert (await asyncio.wait_for(asgi_call(gate, "/v1/completions", f"Bearer {KEY}".encode()), 5))[0] == 200
        assert len(sleeps.waits) == 2 and not any(t.done() for t in held)
        sleeps.release.set()
        assert [await t for t in held] == [(401, 0), (401, 0)]
        assert gate.held == 0
        # a client that leaves while held frees its place too
        sleeps.release.clear()
        leaving = asyncio.create_task(asgi_call(gate, "/v1/completions", None))
        while gate.held < 1:
            await asyncio.sleep(0)
        leaving.cancel()
        with pytest.raises(asyncio.CancelledError):
            await leaving
        assert gate.held == 0
        # delay 0: never held
        at_once = HeaderGate(inner, rules, delay_s=0.0, max_held=2, sleep=sleeps)
        assert await asyncio.wait_for(asgi_call(at_once, "/v1/completions", None), 5) == (401, 0)
        assert len(sleeps.waits) == 3

    asyncio.run(scenario())
    assert served == ["/v1/completions"]


async def asgi_call(app: Any, path: str, auth: bytes | None) -> tuple[int, int]:
    """(status, how many times the body was asked for) of one POST through ``app``."""
    reads, sent = 0, []

    async def receive() -> dict[str, Any]:
        nonlocal reads
        reads += 1
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    headers = JSON + ([(b"authorization", auth)] if auth else [])
    scope = {"type": "http", "method": "POST", "path": path, "root_path": "", "headers": headers}
    await app(scope, receive, send)
    return next(m["status"] for m in sent if m["type"] == "http.response.start"), reads


def test_the_settings_reach_the_gate(tiny_causal: Path) -> None:
    env = {"MODEL_ID": str(tiny_causal), "API_KEY": KEY, "AUTH_FAILURE_DELAY_S": "1.5", "AUTH_FAILURE_MAX_HELD": "7"}
    app = create_app(FakeBackend(build_settings(env)), build_settings(env))
    [gate] = [m for m in app.user_middleware if m.cls is HeaderGate]
    assert (gate.kwargs["delay_s"], gate.kwargs["max_held"]) == (1.5, 7)


def test_an_open_service_reads_bodies_without_a_key(tiny_causal: Path) -> None:
    settings = build_settings({"MODEL_ID": str(tiny_causal), "SERVED_MODEL_NAME": "tiny"})
    assert call_raw(create_app(FakeBackend(settings), settings), "POST", "/generate", JSON)[0] == 200


@pytest.mark.parametrize(("route", "family"), [("/generate", "native"), ("/v1/completions", "openai")])
def test_the_disconnect_opt_out_header_is_refused(tiny_causal: Path, route: str, family: str) -> None:
    settings = build_settings({"MODEL_ID": str(tiny_causal), "SERVED_MODEL_NAME": "tiny"})
    client = TestClient(create_app(FakeBackend(settings), settings))
    body = {"model": "tiny", "prompt": "a"}
    response = client.post(route, json=body, headers={"x-request-disconnect-disabled": "?1"})
    assert response.status_code == 400 and "x-request-disconnect-disabled" in response.text
    assert client.post(route, json=body, headers={"x-request-disconnect-disabled": "?0"}).status_code == 200


# --- bodies: nesting measured on the text, surrogates walked for only when escaped ------------------


@pytest.mark.parametrize(
    ("text", "limit", "exceeds"),
    [
        ("[]", 1, False),
        ("[[]]", 1, True),
        ('{"a": "[[[[[[", "b": [1, {"c": "}}}]]]"}]}', 3, False),
        ('{"a": "\\"[[[[\\"", "b": [[[]]]}', 3, True),
        ('{"a": "\\\\", "b": [[[]]]}', 4, False),  # an escaped backslash ends the string where it should
        ("[" * 65 + "]" * 65, 64, True),
        ("[" * 64 + "]" * 64, 64, False),
        ("[" * 5000, 64, True),  # unbalanced, but already too deep: refused before parsing
    ],
)
def test_nesting_is_measured_on_the_text(text: str, limit: int, exceeds: bool) -> None:
    assert nesting_exceeds(text, limit) is exceeds


def test_no_walk_of_the_value_without_a_surrogate_escape(monkeypatch) -> None:
    walked: list[Any] = []
    walk = body_module._lone_surrogate
    monkeypatch.setattr(body_module, "_lone_surrogate", lambda value: walked.append(value) or walk(value))
    big = json.dumps({"prompts": [[["x"] * 10] * 100] * 100}).encode()
    parse_strict(big)
    assert walked == []
    with pytest.raises(BodyError, match=r"body\.prompts\.1: invalid Unicode: lone surrogate \\udc00"):
        parse_strict(b'{"prompts": ["\\ud83d\\ude00 fine", "\\udc00"]}')
    assert walked[0] == {"prompts": ["\U0001f600 fine", "\udc00"]}  # walked once the escape was seen


# --- request ids ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "kept"),
    [("abc-123_x.y:z", True), ("a" * 128, True), ("a b status=200", False), ("a" * 129, False), ("é", False)],
)
def test_request_ids_outside_the_safe_set_are_replaced_and_the_replacement_logged(
    tiny_causal: Path, caplog: pytest.LogCaptureFixture, given: str, kept: bool
) -> None:
    settings = build_settings({"MODEL_ID": str(tiny_causal), "SERVED_MODEL_NAME": "tiny"})
    backend = FakeBackend(settings)
    client = TestClient(create_app(backend, settings))
    with caplog.at_level(logging.INFO, logger="ray.serve"):
        response = client.post("/generate", json={"prompt": "a"}, headers={"x-request-id": given.encode()})
    assert response.status_code == 200
    used = backend.calls[0].request_id
    access = [r.getMessage() for r in caplog.records if r.getMessage().startswith("access ")]
    assert access and access[-1].endswith(f"request_id={used}")
    replaced = [r.getMessage() for r in caplog.records if "replaced a client request id" in r.getMessage()]
    if kept:
        assert used == given and not replaced
    else:
        assert used != given and len(used) == 32 and used.isalnum()
        assert len(replaced) == 1 and used in replaced[0] and given not in replaced[0]
        assert all(given not in message for message in access)
