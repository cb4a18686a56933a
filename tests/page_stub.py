"""A stand-in for the service's HTTP API, for driving the playground page in a browser without Ray.

It speaks the API contract the page relies on (``/healthz``, ``/v1/models``, streamed ``/v1/chat/completions``
and ``/v1/completions``, OpenAI error shapes, optional Bearer auth) with a fake model: tokens come one by one
after a delay, and a model at zero goes through the cold-start phases, reporting them in ``waking`` and in SSE
comments, before its first token. Controls under ``/_stub`` let a test put a model to zero, make the next call
fail with a given status, and read how many streams the client cancelled.

>>> stub = StubService(api_key=None, token_delay_s=0.0)
>>> from fastapi.testclient import TestClient
>>> client = TestClient(stub.create_app())
>>> client.get("/v1/models").json()["data"][0]["state"]
'running'
>>> stub.scale_to_zero("stub-model")
>>> client.get("/healthz").json()["models"][0]["state"]
'scaled_to_zero'
"""

from __future__ import annotations

import asyncio
import json
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from serving.page import mount_page

PHASES = ("process_start", "imports", "model_code", "weights", "warmup")
MAX_TOKENS_LIMIT = 1024
MAX_PROMPT_CHARS = 4000
# Words with characters of 2, 3 and 4 bytes in UTF-8, so that splitting events mid-character is exercised.
TEXT = (
    "The replica loads its weights, warms up, and answers token by token; a café → a naïve "
    "docstring returns the value 𝑥 and the socket module provides access to the interface."
)
WORDS = TEXT.split()


@dataclass
class StubModel:
    id: str
    state: str = "running"
    last_cold_start: dict[str, Any] | None = None
    waking: dict[str, Any] | None = None
    created: int = field(default_factory=lambda: int(time.time()))

    def entry(self) -> dict[str, Any]:
        running = 1 if self.state == "running" else 0
        starting = 1 if self.state == "starting" else 0
        return {
            "id": self.id,
            "object": "model",
            "created": self.created,
            "owned_by": "llm-serve",
            "root": f"/models/{self.id}",
            "state": self.state,
            "replicas": {"running": running, "starting": starting, "min": 0, "max": 2},
            "priority": 0,
            "last_cold_start": self.last_cold_start,
            "waking": self.waking,
        }


@dataclass
class Stats:
    streams_started: int = 0
    streams_finished: int = 0
    streams_cancelled: int = 0


class StubService:
    """The fake service's state and its FastAPI app (see the module docstring)."""

    def __init__(
        self,
        api_key: str | None = None,
        models: tuple[str, ...] = ("stub-model",),
        token_delay_s: float = 0.05,
        phase_s: float = 0.6,
        comment_every_s: float = 1.0,
    ) -> None:
        self.api_key = api_key
        self.models = {name: StubModel(name) for name in models}
        self.token_delay_s = token_delay_s
        self.phase_s = phase_s
        self.comment_every_s = comment_every_s
        self.stats = Stats()
        self._failure: tuple[int, str, str | None, int | None] | None = None
        self._break_after: tuple[int, str] | None = None
        self._wakes: dict[str, asyncio.Task] = {}

    # ------------------------------------------------------------------ controls
    def scale_to_zero(self, model: str) -> None:
        self.models[model].state = "scaled_to_zero"
        self.models[model].waking = None

    def fail_next(self, status: int, message: str, code: str | None = None, retry_after: int | None = None) -> None:
        self._failure = (status, message, code, retry_after)

    def break_next_stream(self, after_tokens: int, message: str) -> None:
        """The next stream sends ``after_tokens`` tokens, then an error event and the end marker."""
        self._break_after = (after_tokens, message)

    # ------------------------------------------------------------------ app
    def create_app(self) -> FastAPI:
        app = FastAPI(title="page stub")
        mount_page(app)
        app.add_middleware(RequestIdMiddleware)

        @app.get("/healthz")
        async def healthz() -> dict[str, Any]:
            return {
                "status": "ok",
                "auth": "required" if self.api_key else "none",
                "models": [m.entry() for m in self.models.values()],
            }

        @app.get("/v1/models")
        async def list_models(request: Request) -> Response:
            if denied := self._check_key(request):
                return denied
            return JSONResponse({"object": "list", "data": [m.entry() for m in self.models.values()]})

        @app.post("/v1/chat/completions")
        async def chat(request: Request) -> Response:
            return await self._complete(request, chat=True)

        @app.post("/v1/completions")
        async def completions(request: Request) -> Response:
            return await self._complete(request, chat=False)

        @app.post("/_stub/scale_to_zero")
        async def control_zero(body: dict[str, str]) -> dict[str, str]:
            self.scale_to_zero(body["model"])
            return {"ok": "true"}

        @app.post("/_stub/fail_next")
        async def control_fail(body: dict[str, Any]) -> dict[str, str]:
            self.fail_next(body["status"], body["message"], body.get("code"), body.get("retry_after"))
            return {"ok": "true"}

        @app.get("/_stub/stats")
        async def control_stats() -> dict[str, int]:
            return self.stats.__dict__

        return app

    # ------------------------------------------------------------------ requests
    def _check_key(self, request: Request) -> Response | None:
        if self.api_key is None:
            return None
        given = request.headers.get("authorization", "")
        if secrets.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
            return None
        message = "Missing API key." if not given else "Invalid API key."
        response = _error(401, message + " Send it as 'Authorization: Bearer <key>'.", code="invalid_api_key")
        response.headers["WWW-Authenticate"] = "Bearer"
        return response

    async def _complete(self, request: Request, chat: bool) -> Response:
        if denied := self._check_key(request):
            return denied
        if self._failure is not None:
            status, message, code, retry_after = self._failure
            self._failure = None
            response = _error(status, message, code=code)
            if retry_after is not None:
                response.headers["Retry-After"] = str(retry_after)
            return response
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "The body is not valid JSON.")
        model = self.models.get(body.get("model", ""))
        if model is None:
            served = ", ".join(self.models)
            return _error(
                404, f"The model '{body.get('model')}' does not exist. Served: {served}.", "model", "model_not_found"
            )
        max_tokens = body.get("max_tokens", 16)
        if not isinstance(max_tokens, int) or max_tokens < 1 or max_tokens > MAX_TOKENS_LIMIT:
            return _error(400, f"max_tokens must be between 1 and {MAX_TOKENS_LIMIT}; got {max_tokens}.", "max_tokens")
        if chat:
            messages = body.get("messages") or []
            prompt = "\n".join(str(m.get("content", "")) for m in messages)
        else:
            prompt = str(body.get("prompt", ""))
        if len(prompt) > MAX_PROMPT_CHARS:
            return _error(413, f"The prompt has {len(prompt)} characters; the limit is {MAX_PROMPT_CHARS}.", "messages")
        tokens = self._answer(prompt, body.get("seed"), max_tokens, body.get("stop") or [])
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        usage = {"prompt_tokens": len(prompt.split()), "completion_tokens": len(tokens)}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        finish = "length" if len(tokens) == max_tokens else "stop"
        if not body.get("stream"):
            await self._wake(model)
            return JSONResponse(_whole(model.id, chat, "".join(tokens), finish, usage))
        events = self._events(model, chat, tokens, finish, usage if include_usage else None, self._break_after)
        self._break_after = None
        return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    def _answer(self, prompt: str, seed: Any, max_tokens: int, stop: list[str]) -> list[str]:
        start = (sum(map(ord, prompt)) + (seed or 0)) % len(WORDS)
        tokens = [" " + WORDS[(start + i) % len(WORDS)] for i in range(max_tokens)]
        text = ""
        for i, token in enumerate(tokens):
            text += token
            if any(s and s in text for s in stop):
                return tokens[:i]
        return tokens

    async def _wake(self, model: StubModel) -> None:
        """Wait for the model to be up, starting it (once, however many requests wait) when it is at zero."""
        if model.state == "running":
            return
        task = self._wakes.get(model.id)
        if task is None or task.done():
            task = self._wakes[model.id] = asyncio.create_task(self._start_replica(model))
        await asyncio.shield(task)

    async def _start_replica(self, model: StubModel) -> None:
        model.state = "starting"
        model.waking = {"since": time.time(), "phases": {}, "current": PHASES[0]}
        for index, phase in enumerate(PHASES):
            began = time.monotonic()
            await asyncio.sleep(self.phase_s)
            model.waking["phases"][f"{phase}_s"] = round(time.monotonic() - began, 3)
            model.waking["current"] = PHASES[index + 1] if index + 1 < len(PHASES) else "first_generation"
        model.state = "running"

    async def _events(
        self,
        model: StubModel,
        chat: bool,
        tokens: list[str],
        finish: str,
        usage: dict[str, int] | None,
        break_after: tuple[int, str] | None = None,
    ) -> AsyncIterator[bytes]:
        self.stats.streams_started += 1
        finished = False
        try:
            if model.state != "running":
                since = time.monotonic()
                wake = asyncio.ensure_future(self._wake(model))
                while not wake.done():
                    await asyncio.wait({wake}, timeout=self.comment_every_s)
                    if not wake.done():
                        current = (model.waking or {}).get("current")
                        yield f": waking {model.id}: {current} ({time.monotonic() - since:.1f} s)\n\n".encode()
                await wake
            rid = f"chatcmpl-{uuid.uuid4().hex[:12]}" if chat else f"cmpl-{uuid.uuid4().hex[:12]}"
            if chat:
                async for piece in _split(_chunk(rid, model.id, chat, {"role": "assistant"}, None)):
                    yield piece
            for index, token in enumerate(tokens):
                if break_after is not None and index == break_after[0]:
                    # Once a stream has started its status is fixed: the failure travels as an event.
                    yield _sse(
                        {"error": {"message": break_after[1], "type": "server_error", "param": None, "code": "timeout"}}
                    )
                    yield b"data: [DONE]\n\n"
                    finished = True
                    return
                await asyncio.sleep(self.token_delay_s)
                if index == 0 and model.waking is not None:
                    self._finish_cold_start(model)
                async for piece in _split(_chunk(rid, model.id, chat, token, None)):
                    yield piece
            async for piece in _split(_chunk(rid, model.id, chat, "", finish)):
                yield piece
            if usage is not None:
                yield _sse(
                    {
                        "id": rid,
                        "object": _object(chat),
                        "created": int(time.time()),
                        "model": model.id,
                        "choices": [],
                        "usage": usage,
                    }
                )
            yield b"data: [DONE]\n\n"
            finished = True
        finally:
            # Starlette cancels this generator when the client disconnects: count it as a cancelled stream.
            if finished:
                self.stats.streams_finished += 1
            else:
                self.stats.streams_cancelled += 1

    def _finish_cold_start(self, model: StubModel) -> None:
        assert model.waking is not None
        phases = dict(model.waking["phases"])
        phases["first_generation_s"] = round(self.token_delay_s, 3)
        model.last_cold_start = {
            "total_s": round(sum(phases.values()), 3),
            "phases": phases,
            "finished_at": time.time(),
        }
        model.waking = None


class RequestIdMiddleware:
    """Echo the client's X-Request-Id or give a new one (plain ASGI: streams and disconnects pass untouched)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"x-request-id")
        rid = given or uuid.uuid4().hex.encode()

        async def send_with_id(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", rid)]}
            await send(message)

        await self.app(scope, receive, send_with_id)


def _object(chat: bool) -> str:
    return "chat.completion.chunk" if chat else "text_completion"


def _chunk(rid: str, model: str, chat: bool, content: Any, finish: str | None) -> bytes:
    if chat:
        delta = content if isinstance(content, dict) else ({"content": content} if content else {})
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    else:
        choice = {
            "index": 0,
            "text": content if isinstance(content, str) else "",
            "logprobs": None,
            "finish_reason": finish,
        }
    return _sse({"id": rid, "object": _object(chat), "created": int(time.time()), "model": model, "choices": [choice]})


def _sse(payload: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n".encode()


async def _split(event: bytes) -> AsyncIterator[bytes]:
    """Send one event in two writes, cut in its middle (often inside a UTF-8 character): clients must reassemble."""
    middle = len(event) // 2
    yield event[:middle]
    await asyncio.sleep(0.002)
    yield event[middle:]


def _whole(model: str, chat: bool, text: str, finish: str, usage: dict[str, int]) -> dict[str, Any]:
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
    else:
        choice = {"index": 0, "text": text, "finish_reason": finish}
    kind = "chat.completion" if chat else "text_completion"
    return {
        "id": uuid.uuid4().hex,
        "object": kind,
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
        "usage": usage,
    }


def _error(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status_code=status)


@contextmanager
def serve_stub(stub: StubService, port: int, app: FastAPI | None = None) -> Iterator[str]:
    """Run the stub (or ``app``, which holds it) with uvicorn on 127.0.0.1:``port`` in a thread; yields its URL."""
    app = app or stub.create_app()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="page-stub", daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the page stub did not start on port {port}")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
