"""A fake model backend for HTTP-layer tests: streams deterministic text with no model and no Ray."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from engine.embedding_types import EmbeddingRequest, EmbeddingResult
from engine.tokenization import DetokenizeRequest, TokenizeRequest, TokenizeResult
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
from serving.models import ModelState
from serving.pool.progress import PHASES, ColdStartBoard
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
    finish_reason: str = "length"  # how every row of the fake model ends
    calls: list[GenerationRequest] = field(default_factory=list)
    closed: int = 0
    finished: int = 0

    # model name -> a real ModelServer (no Ray), for what the fake cannot answer: embeddings, /tokenize, /detokenize
    servers: dict[str, Any] = field(default_factory=dict)

    async def resolve(self, requested: str | None) -> ModelConfig:
        return resolve_model(self.settings.model_configs, requested)

    async def embed(self, model: ModelConfig, request: EmbeddingRequest) -> EmbeddingResult:
        if self.fail_before is not None:
            raise self.fail_before
        return await self.servers[model.name].embed(request)

    async def tokenize(self, model: ModelConfig, request: TokenizeRequest) -> TokenizeResult:
        if self.fail_before is not None:
            raise self.fail_before
        return await self.servers[model.name].tokenize(request)

    async def detokenize(self, model: ModelConfig, request: DetokenizeRequest) -> str:
        if self.fail_before is not None:
            raise self.fail_before
        return await self.servers[model.name].detokenize(request)

    @staticmethod
    def _prompts(request: GenerationRequest) -> tuple[str, ...]:
        """Text prompts; a chat is its contents joined; token ids as their numbers joined by spaces."""
        if request.token_prompts:
            return tuple(" ".join(map(str, ids)) for ids in request.token_prompts)
        return request.prompts or ("".join(m.content for m in request.messages),)

    def _texts(self, request: GenerationRequest) -> list[str]:
        prompts = self._prompts(request)
        return [fake_text(prompts[row // request.n], row) for row in range(request.rows)]

    async def stream(self, model: ModelConfig, request: GenerationRequest) -> AsyncIterator[StreamItem]:
        self.calls.append(request)
        try:
            if self.start_delay_s:
                await asyncio.sleep(self.start_delay_s)
            if self.fail_before is not None:
                raise self.fail_before
            prompts = self._prompts(request)
            texts = prompts if request.token_prompts else None  # the replica decodes token-id prompts for echo
            scored = None
            if request.params.prompt_logprobs is not None:  # one "token" per character, the first unscored
                scored = tuple(
                    tuple(TokenLogprob(ch, tuple(ch.encode()), 0.0 if i == 0 else -1.0 - i) for i, ch in enumerate(p))
                    for p in prompts
                )
            yield Started(
                "fake-replica", tuple(len(p) for p in prompts), queue_s=0.0, prompt_texts=texts, prompt_logprobs=scored
            )
            if request.params.max_new_tokens == 0:  # scoring only, as the model server answers it
                yield tuple(Delta(row, "", 0, finish_reason="length") for row in range(request.rows))
                self.finished += 1
                return
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
                    deltas.append(Delta(row, piece, 1, logprobs, finish_reason=self.finish_reason if last else None))
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
            task=model.task,
            min_replicas=model.min_replicas,
            max_replicas=model.max_replicas,
            priority=model.priority,
            waking=waking,
        )


# Words with characters of 2, 3 and 4 bytes in UTF-8, so that pieces of text carry multi-byte characters.
TEXT = (
    "The replica loads its weights, warms up, and answers token by token; a café → a naïve "
    "docstring returns the value 𝑥 and the socket module provides access to the interface."
)
WORDS = TEXT.split()


@dataclass
class WakingBackend(FakeBackend):
    """A :class:`FakeBackend` whose model answers like a slow one and wakes from zero like a real one.

    It writes one word per token, ``token_delay_s`` apart, for the ``max_tokens`` asked (finish reason
    ``length``). At zero (``scale_to_zero()``), the first request starts a replica that goes through the
    cold-start phases ``phase_s`` each and reports them to the pool's own :class:`ColdStartBoard`, so that
    ``waking`` and ``last_cold_start`` in the listings have the service's real shape; every request waits
    for that one start. ``fail_next`` and ``break_next`` make the next call fail before its first token or
    after some; ``cancelled`` counts the streams the HTTP layer closed before their end (a client left).

    >>> from engine.types import SamplingParams
    >>> from settings import build_settings
    >>> backend = WakingBackend(build_settings({"MODEL_ID": "org/m"}), phase_s=0, token_delay_s=0)
    >>> model = backend.settings.model_configs[0]
    >>> backend.scale_to_zero()
    >>> async def ask() -> list:
    ...     request = GenerationRequest("t", SamplingParams(max_new_tokens=3), prompts=("Hi",))
    ...     return [item async for item in backend.stream(model, request)]
    >>> started, *tokens = asyncio.run(ask())
    >>> "".join(d.text for step in tokens for d in step), tokens[-1][0].finish_reason
    (' and the socket', 'length')
    >>> status = asyncio.run(backend.status(model))
    >>> status.state, list(status.last_cold_start["phases"])  # doctest: +NORMALIZE_WHITESPACE
    (<ModelState.RUNNING: 'running'>,
     ['process_start_s', 'imports_s', 'model_code_s', 'weights_s', 'warmup_s', 'first_generation_s'])
    """

    token_delay_s: float = 0.05
    phase_s: float = 0.7
    cancelled: int = 0
    board: ColdStartBoard = field(default_factory=ColdStartBoard)
    _failure: BaseException | None = None
    _break: tuple[int, BaseException] | None = None
    _wake: asyncio.Task | None = None
    _replica: str = "fake-replica-0"
    _first_generation: float | None = None  # when the woken replica's first request began, until it answers

    def scale_to_zero(self) -> None:
        """The model's replica goes away (its idle timeout passed)."""
        self.state = "scaled_to_zero"
        self._wake = None
        self.board.observe(self.settings.model_configs[0].name, starting=0, running=0, now=time.time())

    def fail_next(self, error: BaseException) -> None:
        """The next call raises ``error`` before its first token."""
        self._failure = error

    def break_next(self, after_tokens: int, error: BaseException) -> None:
        """The next stream sends ``after_tokens`` tokens, then raises ``error``."""
        self._break = (after_tokens, error)

    async def stream(self, model: ModelConfig, request: GenerationRequest) -> AsyncIterator[StreamItem]:
        self.calls.append(request)
        failure, self._failure = self._failure, None
        broken, self._break = self._break, None
        try:
            if failure is not None:
                raise failure
            if self.state != "running":
                await self._woken(model)
            prompts = request.prompts or ("".join(m.content for m in request.messages),)
            yield Started(self._replica, tuple(len(p) for p in prompts), queue_s=0.0)
            limit = request.params.max_new_tokens
            start = sum(map(ord, prompts[0])) % len(WORDS)
            for index in range(limit):
                if broken is not None and index == broken[0]:
                    raise broken[1]
                await asyncio.sleep(self.token_delay_s)
                self._first_token(model)
                word = " " + WORDS[(start + index) % len(WORDS)]
                finish = "length" if index + 1 == limit else None
                yield tuple(Delta(row, word, 1, (), finish_reason=finish) for row in range(request.rows))
            self.finished += 1
        except (GeneratorExit, asyncio.CancelledError):
            self.cancelled += 1
            raise
        finally:
            self.closed += 1

    async def _woken(self, model: ModelConfig) -> None:
        """Wait for the model's replica, starting it (once, however many requests wait)."""
        if self._wake is None or self._wake.done():
            self._wake = asyncio.get_running_loop().create_task(self._start_replica(model))
        await asyncio.shield(self._wake)

    async def _start_replica(self, model: ModelConfig) -> None:
        self.state = "starting"
        self._replica = f"fake-replica-{time.monotonic_ns()}"
        self.board.observe(model.name, starting=1, running=0, now=time.time())
        for phase in PHASES[:-1]:  # first_generation ends with the first answer
            await asyncio.sleep(self.phase_s)
            self.board.report(model.name, self._replica, phase, self.phase_s, at=time.time())
        self.state = "running"
        self._first_generation = time.monotonic()

    def _first_token(self, model: ModelConfig) -> None:
        if self._first_generation is not None:
            seconds, self._first_generation = time.monotonic() - self._first_generation, None
            self.board.report(model.name, self._replica, "first_generation", seconds, at=time.time())

    async def status(self, model: ModelConfig) -> ModelStatus:
        running, starting = int(self.state == "running"), int(self.state == "starting")
        return ModelStatus(
            name=model.name,
            model_id=model.model_id,
            state=ModelState(self.state),
            running=running,
            starting=starting,
            min_replicas=model.min_replicas,
            max_replicas=model.max_replicas,
            priority=model.priority,
            last_cold_start=self.board.last_cold_start(model.name),
            waking=self.board.waking(model.name, starting=starting, running=running, now=time.time()),
        )
