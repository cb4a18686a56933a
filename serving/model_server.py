"""The model deployment: loads the engine it is given once per replica, streams each request's tokens.

The engine is an argument (``engine``: a loader, like ray.llm's ``LLMServer(engine_cls=...)``), so a
test hands the server a fake engine and runs it without Ray. The default, :func:`text_generator`,
imports torch and transformers inside the constructor, not at module level, so that the graph and
``serve run`` stay light; no request imports them either (the batcher and work items are plain Python).

Called through a Serve DeploymentHandle::

    async for item in handle.options(stream=True).stream.remote(request):
        ...  # first a Started, then tuples of Delta as the engine makes them
    started, completions = await handle.generate.remote(request)   # the same stream, collected here
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, Protocol

from ray import serve
from ray.serve.exceptions import RayServeException

from engine.admission import STEP_PROMPT_TOKENS, TokenBudget
from engine.batcher import Batcher, RequestStream
from engine.embedding_types import EmbeddingRequest, EmbeddingResult
from engine.errors import InvalidFieldError, StepFailedError
from engine.timing import PhaseTimer
from engine.tokenization import DetokenizeRequest, TokenizeRequest, TokenizeResult, detokenize, tokenize
from engine.types import ChatMessage, Completion, Delta, GenerationRequest, SamplingParams, Started, StreamItem, collect
from engine.work import OnStep, Poll, WorkItem
from observability import metrics
from serving import warm_pool
from serving.pool.reporter import PhaseReporter
from settings import ModelConfig

logger = logging.getLogger("ray.serve")

# The start-up phases a replica reports as they end (process_start first, first_generation last).
REPORTED_PHASES = ("imports", "model_code", "weights", "warmup")


class Engine(Protocol):
    """What the model server needs of an engine (``engine.model.TextGenerator`` is the real one)."""

    continuous: bool  # run() takes polled rows between its steps (continuous batching)

    def run(
        self, items: Sequence[WorkItem], on_step: OnStep, poll: Poll | None = None, max_batch_size: int | None = None
    ) -> None: ...

    def encode(self, prompts: Sequence[str], params: SamplingParams) -> list[list[int]]: ...

    def encode_chat(
        self, messages: Sequence[ChatMessage], params: SamplingParams, template: str | None = None
    ) -> list[int]: ...


# (the model's config, the replica's phase timer) -> a loaded engine; runs under MODEL_LOAD_TIMEOUT_S.
EngineLoader = Callable[[ModelConfig, PhaseTimer], Engine]


def _loading_fields(config: ModelConfig) -> dict[str, Any]:
    """What every engine's config takes from the model's: checkpoint, device, dtype, threads, prompt bound."""
    return {
        "model_id": config.model_id,
        "device": config.resolved_device,
        "dtype": config.dtype,
        "trust_remote_code": config.trust_remote_code,
        "num_threads": config.torch_threads,
        "max_prompt_tokens": config.max_prompt_tokens,
    }


def text_generator() -> EngineLoader:
    """The real engine's loader. Importing it (torch, transformers) is the replica's "imports" phase."""
    from engine.model import EngineConfig, TextGenerator

    def load(config: ModelConfig, timer: PhaseTimer) -> Engine:
        engine_config = EngineConfig(
            **_loading_fields(config),
            max_batch_tokens=config.max_batch_tokens,
            num_gpus=config.num_gpus_per_replica,
            gpu_memory_utilization=config.gpu_memory_utilization,
            cpu_offload_gb=config.cpu_offload_gb,
            max_batch_size=config.max_batch_size,
            max_new_tokens_limit=config.max_new_tokens_limit,
            label=f"model {config.name!r}",
            packed_cache_dir=config.packed_cache_dir or None,
            packed_cache_gb=config.packed_cache_gb,
            huge_pages=config.huge_pages,
        )
        return TextGenerator.load(engine_config, timer)

    return load


def embedder() -> EngineLoader:
    """The loader of an ``embed`` model: an encoder, its pooling, no generation (``engine.embeddings``)."""
    from engine.embeddings import Embedder, EmbedderConfig

    def load(config: ModelConfig, timer: PhaseTimer) -> Any:
        return Embedder.load(EmbedderConfig(**_loading_fields(config)), timer)

    return load


@serve.deployment(name="ModelServer")
class ModelServer:
    """Holds one model; concurrent requests share its batches, and every request is a stream.

    ``config.chat_template`` (the text of a Jinja chat template), when set, replaces the tokenizer's
    own for chat requests. With ``pool`` (the application of the pool controller), the replica
    reports each start-up phase to it as the phase ends, so that listings show a wake-up as it
    happens. ``engine`` loads the engine (default: :func:`text_generator`, the real one). Example
    (inside a Serve graph; one deployment per model)::

        server = ModelServer.options(**model.deployment_options()).bind(model, "llm")

    and without Ray, with a fake engine (``ModelServer.func_or_class`` is the plain class)::

        server = ModelServer.func_or_class(model, engine=lambda config, timer: FakeEngine())
    """

    def __init__(self, config: ModelConfig, pool: str | None = None, engine: EngineLoader | None = None) -> None:
        self._constructed_at = time.time()
        warm = warm_pool.worker_report()  # a warm worker's process started long before this replica
        process_started = None if warm["warm_worker"] else warm_pool.process_started_at()
        self._name = config.name
        self._reporter = PhaseReporter(pool, config.name) if pool else None
        self._report("process_start", round(self._constructed_at - process_started, 4) if process_started else None)
        self._timer = PhaseTimer(on_phase=self._phase_ended)
        with self._timer.phase("imports"):  # torch, transformers and the engine: the first import in this process
            from engine.chat import check_template

            load = engine or (embedder() if config.task == "embed" else text_generator())

        if config.chat_template is not None:
            check_template(config.chat_template)
        self._chat_template = config.chat_template
        self._engine = _load_with_timeout(
            lambda: load(config, self._timer), config.model_load_timeout_s, config.model_id
        )
        self._task = config.task
        if config.task == "embed":  # an encoder: /v1/embeddings only, batched by its own small batcher
            from engine.embeddings import EmbeddingBatcher

            self._embeddings = EmbeddingBatcher(self._engine.embed, config.max_batch_size)
        else:
            self._engine.rules.on_compile = lambda s, cached: metrics.grammar_compiled(self._name, s, cached)
            self._batcher = Batcher(
                self._engine.run,
                config.max_batch_size,
                config.batch_wait_timeout_s,
                budget=TokenBudget(config.max_batch_tokens, step_prompt_tokens(config, self._engine)),
                stream_interval_s=config.stream_interval_s,
                stream_messages_per_s=config.stream_messages_per_s,
            )
            self._sampler = metrics.BatchSampler(self._name, self._batcher.stats)
        self._stall_timeout_s = config.engine_stall_timeout_s
        self._requests = 0
        self._ended = Counter[str]()  # generation requests by how their stream ended: completed, left, failed
        self._replica = _replica_id()
        ready = time.time()
        self._cold_start: dict[str, Any] | None = {
            "replica": self._replica,
            "process_start_s": round(self._constructed_at - process_started, 4) if process_started else None,
            **warm,
            **self._timer.report(),
            "constructor_s": round(ready - self._constructed_at, 4),
            "process_started_at": process_started,
            "ready_at": ready,
        }
        logger.info("ModelServer ready: %s", self._cold_start)

    async def stream(self, request: GenerationRequest) -> AsyncIterator[StreamItem]:
        """A :class:`Started`, then tuples of :class:`Delta` as the engine makes them, until every row ends.

        The request is validated and encoded first: PromptTooLongError and ChatTemplateError are
        raised before anything is yielded. Stopping the stream early cancels the request's rows.
        Under load each tuple joins the steps made since the last (STREAM_MESSAGES_PER_S).
        """
        async for item in self._answer(request, streamed=True):
            yield item

    async def _answer(self, request: GenerationRequest, streamed: bool) -> AsyncIterator[StreamItem]:
        if self._task == "embed":
            raise InvalidFieldError(f"model {self._name!r} is an embedding model; it serves /v1/embeddings", "model")
        arrived = time.monotonic()
        self._requests += 1
        self._sampler.ensure_running()
        prompt_ids = self._encode(request)
        extras = await self._prompt_extras(request, prompt_ids)
        if request.params.max_new_tokens == 0:  # scoring only (echo with logprobs): nothing to generate
            yield self._started(prompt_ids, None, arrived, extras)
            yield tuple(Delta(row, "", 0, finish_reason="length") for row in range(request.rows))
            metrics.request_finished(self._name, 0, {"length": request.rows})
            return
        rows = request.row_inputs(prompt_ids)  # row p * n + c: choice c of prompt p
        stream = self._batcher.open(
            [ids for ids, _ in rows], [params for _, params in rows], request.request_id, streamed=streamed
        )
        started: Started | None = None
        generated, reasons = 0, Counter[str]()
        ended = "failed"
        try:
            async for deltas in stream:
                if started is None:
                    started = self._started(prompt_ids, stream, arrived, extras)
                    yield started
                generated += sum(d.tokens for d in deltas)
                reasons.update(d.finish_reason for d in deltas if d.finish_reason is not None)
                if sum(reasons.values()) == request.rows and started.cold_start is not None:
                    # Every row has ended: the first request's report is complete before its last deltas go out.
                    report = {**started.cold_start, "first_generation_s": round(time.monotonic() - arrived, 4)}
                    logger.info("cold start phases: %s", report)
                    self._first_generation_done(report)
                yield deltas
            ended = "completed"
        except (asyncio.CancelledError, GeneratorExit):
            ended = "left"  # the reader went away: cancelled, or the stream closed early
            raise
        except Exception as exc:
            # Serve's request context names the request; the id is passed too, for any other context.
            logger.warning("request %s failed: %r", request.request_id, exc, extra={"request_id": request.request_id})
            raise
        finally:
            stream.close()  # a reader that went away (disconnect, cancel) frees its rows
            self._ended[ended] += 1
            reasons["cancelled"] += request.rows - sum(reasons.values())
            metrics.request_finished(self._name, generated, reasons)
            first = stream.first_token_at
            metrics.engine_timing(self._name, None if first is None else first - arrived, stream.token_gaps)

    async def generate(self, request: GenerationRequest) -> tuple[Started, list[Completion]]:
        """The whole answer: the same stream, collected in the replica (no per-token traffic).

        The replica's first answer carries its cold-start report completed with
        ``first_generation_s`` (a stream's ``Started`` goes out before that is known).
        """
        begun = time.monotonic()
        started: Started | None = None
        deltas: list[Delta] = []
        async for item in self._answer(request, streamed=False):
            if isinstance(item, Started):
                started = item
            else:
                deltas.extend(item)
        assert started is not None
        if started.cold_start is not None:
            report = {**started.cold_start, "first_generation_s": round(time.monotonic() - begun, 4)}
            started = dataclasses.replace(started, cold_start=report)
        return started, collect(deltas, request.rows, started.prompt_tokens, request.n)

    async def embed(self, request: EmbeddingRequest) -> EmbeddingResult:
        """Unit vectors for every input (an ``embed`` model); bad inputs raise ``InvalidFieldError``."""
        if self._task != "embed":
            raise InvalidFieldError(f"model {self._name!r} generates text; it serves no embeddings", "model")
        arrived = time.monotonic()
        self._requests += 1
        self._engine.check_dimensions(request.dimensions)
        engine = self._engine
        ids = engine.encode_texts(request.texts) if request.texts else engine.check_ids(request.token_inputs)
        vectors = await self._embeddings.embed(ids, request.dimensions)
        cold_start, self._cold_start = self._cold_start, None
        if cold_start is not None:
            cold_start = {**cold_start, "first_generation_s": round(time.monotonic() - arrived, 4)}
            self._first_generation_done(cold_start)
        tokens = sum(len(row) for row in ids)
        metrics.prompt_tokens(self._name, tokens)
        return EmbeddingResult(vectors, tokens, replica=self._replica, cold_start=cold_start)

    async def tokenize(self, request: TokenizeRequest) -> TokenizeResult:
        """``/tokenize``: the prompt's or chat's ids with this model's tokenizer and chat template."""
        context = self._engine.max_tokens if self._task == "embed" else self._engine.context_length
        return tokenize(self._engine.tokenizer, request, self._chat_template, context)

    async def detokenize(self, request: DetokenizeRequest) -> str:
        """``/detokenize``: the text of token ids (``InvalidFieldError`` for one outside the vocabulary)."""
        return detokenize(self._engine.tokenizer, request.tokens)

    async def check_health(self) -> None:
        """Serve's health check: unhealthy when the engine has work and no step has ended for ENGINE_STALL_TIMEOUT_S.

        A hung engine thread cannot be stopped from here; its requests are failed at once (503,
        retryable) rather than left to hang, and Serve replaces the replica.
        """
        if self._task == "embed":  # one forward pass per batch, no decoding loop to stall
            return
        stalled = self._batcher.stalled_s()
        if stalled <= self._stall_timeout_s:
            return
        failed = self._batcher.fail_open_streams(
            StepFailedError(
                f"the model's engine made no progress for {stalled:.0f}s (ENGINE_STALL_TIMEOUT_S="
                f"{self._stall_timeout_s:g}); this replica is being replaced, retry the request"
            )
        )
        logger.error("engine stalled for %.1fs: failed %d open requests, reporting unhealthy", stalled, failed)
        raise RuntimeError(f"engine made no progress for {stalled:.0f}s (ENGINE_STALL_TIMEOUT_S)")

    async def stats(self) -> dict[str, Any]:
        """This replica's counters: batches, rows running and cancelled, queue, open streams, tokens,
        requests received and how those that reached the engine ended (``ended``: completed, left, failed),
        and the asyncio tasks alive on its event loop (``tasks``: this call's own included)."""
        counters = self._embeddings.stats() if self._task == "embed" else self._batcher.stats()
        return {**counters, "requests": self._requests, "ended": dict(self._ended), "tasks": len(asyncio.all_tasks())}

    def _encode(self, request: GenerationRequest) -> list[list[int]]:
        self._engine.rules.check(request.params)  # logit bias ids, grammar compiled (cached) before queueing
        if request.messages:
            return [self._engine.encode_chat(request.messages, request.params, self._chat_template, request.tools)]
        if request.token_prompts:
            return self._engine.encode_ids(request.token_prompts, request.params)
        return self._engine.encode(list(request.prompts), request.params)

    async def _prompt_extras(self, request: GenerationRequest, prompt_ids: list[list[int]]) -> dict[str, Any]:
        """What Started carries beside the counts: prompt log-probabilities, token-id prompts' text."""
        from engine.scoring import prompt_logprobs

        extras: dict[str, Any] = {}
        if request.token_prompts:
            extras["prompt_texts"] = tuple(self._engine.tokenizer.decode(ids) for ids in prompt_ids)
        top = request.params.prompt_logprobs
        if top is not None:  # one forward pass per prompt, beside the batch loop's thread
            extras["prompt_logprobs"] = tuple(
                [await asyncio.to_thread(prompt_logprobs, self._engine, ids, top) for ids in prompt_ids]
            )
        return extras

    def _started(
        self, prompt_ids: list[list[int]], stream: RequestStream | None, arrived: float, extras: dict[str, Any]
    ) -> Started:
        admitted = stream.admitted_at if stream is not None else arrived
        cold_start, self._cold_start = self._cold_start, None  # the first request served carries it
        started = Started(
            replica=self._replica,
            prompt_tokens=tuple(len(ids) for ids in prompt_ids),
            queue_s=round(max(0.0, (admitted or arrived) - arrived), 6),
            cold_start=cold_start,
            **extras,
        )
        metrics.queued(self._name, started.queue_s)
        metrics.prompt_tokens(self._name, sum(started.prompt_tokens))
        return started

    def _first_generation_done(self, report: dict[str, Any]) -> None:
        """The replica's first request has finished (``report`` is its complete cold-start report)."""
        self._report("first_generation", report.get("first_generation_s"), report)
        warm_pool.replica_answered()  # a warm worker's pool may refill now: this cold start is over

    def _phase_ended(self, name: str, seconds: float) -> None:
        # The API's phases fold the engine's config and tokenizer loading into model_code.
        if name == "model_code":
            seconds = round(sum(self._timer.phases.get(part, 0.0) for part in ("config", "tokenizer", name)), 4)
        if name in REPORTED_PHASES:
            self._report(name, seconds)

    def _report(self, name: str, seconds: float | None, details: dict[str, Any] | None = None) -> None:
        metrics.cold_start(self._name, {name: seconds})  # each phase as it ends (first_generation has none)
        if self._reporter is not None:
            self._reporter.phase(name, seconds, details)


def step_prompt_tokens(config: ModelConfig, engine: Engine) -> int | None:
    """Prompt tokens one poll admits (``engine.admission``): ``STEP_PROMPT_TOKENS``, else the device's default.

    None for an engine that batches statically: its batches take no rows once they run, so its first poll
    takes every queued row that fits.
    """
    if not engine.continuous:
        return None
    return config.step_prompt_tokens or STEP_PROMPT_TOKENS[config.resolved_device]


def _replica_id() -> str:
    """The Serve replica's id; "local" when the server runs outside Serve (a test with a fake engine)."""
    try:
        return serve.get_replica_context().replica_id.unique_id
    except RayServeException:  # not inside a replica
        return "local"


def _load_with_timeout(load: Any, timeout_s: float, model_id: str) -> Any:
    """Run ``load`` with a time limit; a replica stuck loading fails and Serve retries it."""
    result: dict[str, Any] = {}

    def target() -> None:
        try:
            result["engine"] = load()
        except BaseException as exc:  # re-raised in the constructor's thread
            result["error"] = exc

    thread = threading.Thread(target=target, name="load-model", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise TimeoutError(f"loading {model_id} took longer than MODEL_LOAD_TIMEOUT_S={timeout_s:g}s")
    if "error" in result:
        raise result["error"]
    return result["engine"]
