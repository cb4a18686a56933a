"""The model deployment: loads the engine once per replica, batches concurrent prompts.

torch and transformers are imported inside the constructor, not at module level, so that the
Gateway (which imports this module for the reply type) and ``serve run`` stay light.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from ray import serve

from engine.batcher import Batcher
from engine.errors import ChatTemplateError
from engine.params import Completion, SamplingParams
from engine.types import Completion as Finished
from engine.types import Delta, GenerationRequest, Started
from settings import ModelConfig

logger = logging.getLogger("ray.serve")


@dataclass
class GeneratorReply:
    """Completions in prompt order, plus the replica's cold-start report on its first reply."""

    completions: list[Completion]
    cold_start: dict[str, Any] | None = field(default=None)


def _process_start_time() -> float | None:
    """Epoch time this process started (Linux), to time the replica process start-up."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rpartition(")")[2].split()[19])
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, StopIteration):
        return None


@serve.deployment(name="Generator")
class Generator:
    """Holds one model; ``generate`` batches the prompts of concurrent calls together.

    Example (inside a Serve graph)::

        generator = Generator.options(**model.deployment_options()).bind(model)
    """

    def __init__(self, settings: ModelConfig) -> None:
        self._constructed_at = time.time()
        process_started = _process_start_time()
        from engine.timing import PhaseTimer

        self._timer = PhaseTimer()
        with self._timer.phase("imports"):  # torch, transformers and the engine: the first import in this process
            from engine.model import EngineConfig, TextGenerator

        config = EngineConfig(
            model_id=settings.model_id,
            device=settings.resolved_device,
            dtype=settings.dtype,
            trust_remote_code=settings.trust_remote_code,
            num_threads=settings.torch_threads,
            max_prompt_tokens=settings.max_prompt_tokens,
        )
        self._engine = _load_with_timeout(
            lambda: TextGenerator.load(config, self._timer), settings.model_load_timeout_s, settings.model_id
        )
        self._batcher = Batcher(self._engine.generate, settings.max_batch_size, settings.batch_wait_timeout_s)
        ready = time.time()
        self._cold_start: dict[str, Any] | None = {
            "replica": serve.get_replica_context().replica_id.unique_id,
            "process_start_s": round(self._constructed_at - process_started, 4) if process_started else None,
            **self._timer.report(),
            "constructor_s": round(ready - self._constructed_at, 4),
            "process_started_at": process_started,
            "ready_at": ready,
        }
        self._first_reply_lock = asyncio.Lock()
        logger.info("Generator ready: %s", self._cold_start)

    async def generate_prompts(self, prompts: list[str], params: SamplingParams) -> GeneratorReply:
        from engine.model import WorkItem

        started = time.perf_counter()
        ids = self._engine.encode(prompts, params)  # raises PromptTooLongError before any work
        completions = await asyncio.gather(*(self._batcher.submit(WorkItem(i, params)) for i in ids))
        reply = GeneratorReply(list(completions))
        if self._cold_start is not None:
            # The first reply carries the start-up report, completed with its own generation time.
            report, self._cold_start = self._cold_start, None
            report["first_generation_s"] = round(time.perf_counter() - started, 4)
            logger.info("cold start phases: %s", report)
            reply.cold_start = report
        return reply

    async def _run(self, request: GenerationRequest) -> tuple[Started, list[Finished]]:
        # Until the engine streams, a request's rows are generated whole and sent as one delta each.
        if request.messages:
            raise ChatTemplateError("chat is not available from this model server yet")
        params = SamplingParams(
            max_new_tokens=request.params.max_new_tokens,
            temperature=request.params.temperature,
            top_p=request.params.top_p,
            top_k=request.params.top_k,
            repetition_penalty=request.params.repetition_penalty,
            seed=request.params.seed,
            stop=request.params.stop,
        )
        reply = await self.generate_prompts(list(request.prompts), params)
        started = Started(
            replica=serve.get_replica_context().replica_id.unique_id,
            prompt_tokens=tuple(c.prompt_tokens for c in reply.completions),
            cold_start=reply.cold_start,
        )
        done = [Finished(c.text, c.prompt_tokens, c.completion_tokens, c.finish_reason) for c in reply.completions]
        return started, done

    async def generate(self, request: GenerationRequest) -> tuple[Started, list[Finished]]:
        return await self._run(request)

    async def stream(self, request: GenerationRequest):
        started, done = await self._run(request)
        yield started
        yield tuple(Delta(i, c.text, c.completion_tokens, finish_reason=c.finish_reason) for i, c in enumerate(done))

    async def stats(self) -> dict[str, Any]:
        """Batching counters of this replica (for benchmarks and debugging)."""
        sizes = self._batcher.batch_sizes
        return {
            "batches": sum(sizes.values()),
            "prompts": sum(size * n for size, n in sizes.items()),
            "batch_sizes": dict(sorted(sizes.items())),
            "busy_s": round(self._batcher.busy_s, 3),
        }


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
