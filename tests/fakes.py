"""A fake model backend for HTTP-layer tests: streams deterministic text with no model and no Ray."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from engine.types import (
    Completion,
    Delta,
    GenerationRequest,
    Started,
    StreamItem,
    TokenLogprob,
    TopLogprob,
    collect,
)
from serving.backend import ModelStatus, resolve_model
from settings import ModelConfig, Settings


def fake_text(prompt: str, row: int) -> str:
    """What the fake model writes for ``prompt``: its text reversed in angle brackets, per choice."""
    return f"<{prompt[::-1]}|{row}>"


@dataclass
class FakeBackend:
    """Implements ``serving.backend.ModelBackend``.

    ``fail_before`` raises before the stream starts, ``fail_after`` after this many deltas;
    ``start_delay_s`` holds Started back (a cold start) while ``status`` reports the model waking.
    """

    settings: Settings
    fail_before: BaseException | None = None
    fail_after: tuple[int, BaseException] | None = None
    start_delay_s: float = 0.0
    delta_delay_s: float = 0.0
    state: str = "running"
    calls: list[GenerationRequest] = field(default_factory=list)
    closed: int = 0
    finished: int = 0

    async def resolve(self, requested: str | None) -> ModelConfig:
        return resolve_model(self.settings.model_configs, requested)

    def _texts(self, request: GenerationRequest) -> list[str]:
        prompts = request.prompts or ("".join(m.content for m in request.messages),)
        return [fake_text(prompts[row // request.n], row) for row in range(request.rows)]

    async def stream(self, model: ModelConfig, request: GenerationRequest) -> AsyncIterator[StreamItem]:
        self.calls.append(request)
        try:
            if self.start_delay_s:
                await asyncio.sleep(self.start_delay_s)
            if self.fail_before is not None:
                raise self.fail_before
            prompts = request.prompts or ("".join(m.content for m in request.messages),)
            yield Started("fake-replica", tuple(len(p) for p in prompts), queue_s=0.0)
            texts = self._texts(request)
            sent = 0
            width = max(len(t) for t in texts)
            for start in range(0, width, 2):
                deltas = []
                for row, text in enumerate(texts):
                    piece = text[start : start + 2]
                    if not piece:
                        continue
                    last = start + 2 >= len(text)
                    logprobs = self._logprobs(piece, request.params.logprobs)
                    deltas.append(Delta(row, piece, 1, logprobs, finish_reason="length" if last else None))
                if self.fail_after is not None and sent >= self.fail_after[0]:
                    raise self.fail_after[1]
                sent += len(deltas)
                if self.delta_delay_s:
                    await asyncio.sleep(self.delta_delay_s)
                yield tuple(deltas)
            self.finished += 1
        finally:
            self.closed += 1

    @staticmethod
    def _logprobs(piece: str, k: int | None) -> tuple[TokenLogprob, ...]:
        if k is None:
            return ()
        top = tuple(TopLogprob(f"alt{i}", f"alt{i}".encode(), -1.0 - i) for i in range(k))
        return (TokenLogprob(piece, tuple(piece.encode()), -0.5, top),)

    async def generate(self, model: ModelConfig, request: GenerationRequest) -> tuple[Started, list[Completion]]:
        started: Started | None = None
        deltas: list[Delta] = []
        async for item in self.stream(model, request):
            if isinstance(item, Started):
                started = item
            else:
                deltas.extend(item)
        assert started is not None
        return started, collect(deltas, request.rows, started.prompt_tokens, request.n)

    async def waiting_for_room(self, model: ModelConfig) -> bool:
        return self.state == "evicted"

    async def statuses(self) -> list[ModelStatus]:
        return [await self.status(m) for m in self.settings.model_configs]

    async def status(self, model: ModelConfig) -> ModelStatus:
        waking: dict[str, Any] | None = None
        if self.state == "starting":
            waking = {"since": 0.0, "phases": {"process_start_s": 0.1}, "current": "imports"}
        return ModelStatus(
            name=model.name,
            model_id=model.model_id,
            state=self.state,  # type: ignore[arg-type]
            min_replicas=model.min_replicas,
            max_replicas=model.max_replicas,
            priority=model.priority,
            waking=waking,
        )
