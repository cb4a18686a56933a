"""Every metric of the service, defined once and recorded through Ray Serve's metrics.

Each process (the Gateway replica, each model replica) records into Ray's metrics, and every Ray
node's metrics agent exports them at its Prometheus endpoint beside Serve's own ``ray_serve_*``
series, so whatever already scrapes the cluster sees them; there is no second exporter. Ray adds
the ``ray_`` prefix (and ``_total`` to counters), and ``ray.serve.metrics`` adds the labels
``application``, ``deployment`` and ``replica``. Names and buckets are vLLM's where the meaning is
the same (``vllm:time_to_first_token_seconds`` here is ``ray_llm_serve_time_to_first_token_seconds``:
Ray's names may not hold a colon).

Where each is recorded, at the edge of its layer:

- the Gateway (``serving.api.access``, ``serving.app``): requests by route, model and status, their
  end-to-end latency, time to first token and inter-token latency of streamed requests, requests
  rejected at capacity, and model wakes caused by a request;
- the model replica: for every request, streamed or whole, the engine's own timings (time queued
  before the engine took it, time to its first token, time between its tokens, stamped when the
  engine's step ends, so no network hop or coalescing is in them), prompt and generated tokens,
  rows running and waiting, finished rows by reason, and its cold-start phases.

Call sites stay one line (``metrics.request_done(...)``). Recording never raises: a metric that
cannot be recorded is logged once and skipped, and the request goes on (``observability.sinks``).
Tests swap the sink::

    >>> sink = MemorySink()
    >>> with use_sink(sink):
    ...     model_woke("tiny", "request")
    >>> sink.values[("llm_serve_model_wakes", (("cause", "request"), ("model", "tiny")))]
    1.0
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import Callable, Mapping, Sequence

from observability.sinks import MemorySink, Metric, RaySink, Sink, record, use_sink

logger = logging.getLogger("ray.serve")

PREFIX = "llm_serve_"
NO_MODEL = "-"  # the model label of a request refused before it named a served model (401, 404, bad body)

# vLLM's buckets (vllm/v1/metrics/loggers.py).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)  # fmt: skip
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
               40.0, 80.0)  # fmt: skip
# A request's wait in the replica for the engine is a fraction of a step to a few steps (tens of ms on a
# CPU), under vLLM's smallest request-latency bucket (0.3 s), where histogram_quantile can only
# interpolate: its own buckets, from 1 ms (those of the time to first token).
QUEUE_BUCKETS = TTFT_BUCKETS
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                           120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)  # fmt: skip
# vLLM's build_1_2_5_buckets, up to the longest context a served model is likely to have.
TOKEN_BUCKETS = tuple(float(m * 10**e) for e in range(6) for m in (1, 2, 5) if m * 10**e <= 200_000)
# Start-up phases last from milliseconds (warm-up) to many minutes (a large model's weights).
PHASE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0,
                 300.0, 600.0, 1200.0)  # fmt: skip
COLD_START_PHASES = ("process_start", "imports", "model_code", "weights", "warmup")
WAKE_CAUSES = ("request",)  # a request arrived for a model at zero replicas
REJECT_REASONS = ("queue_full", "no_room")  # Serve's max_queued_requests reached; the pool found no room


def _counter(name: str, description: str, tags: tuple[str, ...]) -> Metric:
    return Metric(PREFIX + name, "counter", description, tags)


def _gauge(name: str, description: str, tags: tuple[str, ...]) -> Metric:
    return Metric(PREFIX + name, "gauge", description, tags)


def _histogram(name: str, description: str, tags: tuple[str, ...], buckets: tuple[float, ...]) -> Metric:
    return Metric(PREFIX + name, "histogram", description, tags, buckets)


# --- the Gateway ------------------------------------------------------------------------------------
REQUESTS = _counter(
    "requests",
    "HTTP requests answered, by route, served model ('-' when refused before naming one) and status "
    "(499: the client went away before the answer began).",
    ("route", "model", "status"),
)
E2E_LATENCY = _histogram(
    "e2e_request_latency_seconds",
    "Time from a request's arrival at the Gateway to the end of its answer (a stream: its last byte).",
    ("route", "model"),
    REQUEST_LATENCY_BUCKETS,
)
TTFT = _histogram(
    "time_to_first_token_seconds",
    "Streamed requests: time from arrival at the Gateway to the first generated text (a cold start included).",
    ("route", "model"),
    TTFT_BUCKETS,
)
ITL = _histogram(
    "inter_token_latency_seconds",
    "Streamed requests: time between generated tokens as the Gateway passes them on.",
    ("model",),
    ITL_BUCKETS,
)
REJECTED = _counter(
    "requests_rejected",
    "Requests turned away at capacity with 503 and Retry-After: queue_full (MAX_QUEUED_REQUESTS reached), "
    "no_room (the pool found no room for the model in time).",
    ("route", "model", "reason"),
)
WAKES = _counter("model_wakes", "Model wake-ups from zero replicas, by cause.", ("model", "cause"))

# --- the model replica --------------------------------------------------------------------------------
QUEUE_TIME = _histogram(
    "request_queue_time_seconds",
    "Every request, streamed or not: time it waited in the model replica before the engine took it.",
    ("model",),
    QUEUE_BUCKETS,
)
ENGINE_TTFT = _histogram(
    "engine_time_to_first_token_seconds",
    "Every request, streamed or not: time from its arrival at the model replica to the engine step that made "
    "its first token (vLLM's time_to_first_token_seconds; the Gateway's adds the hops and a cold start).",
    ("model",),
    TTFT_BUCKETS,
)
ENGINE_ITL = _histogram(
    "engine_inter_token_latency_seconds",
    "Every request, streamed or not: time between the engine steps that made a row's consecutive tokens.",
    ("model",),
    ITL_BUCKETS,
)
PROMPT_TOKENS = _counter("prompt_tokens", "Prompt tokens of the requests the engine took.", ("model",))
GENERATION_TOKENS = _counter("generation_tokens", "Tokens generated, cancelled rows included.", ("model",))
REQUEST_PROMPT_TOKENS = _histogram("request_prompt_tokens", "Prompt tokens per request.", ("model",), TOKEN_BUCKETS)
REQUEST_GENERATION_TOKENS = _histogram(
    "request_generation_tokens", "Tokens generated per request (all its rows).", ("model",), TOKEN_BUCKETS
)
ROWS_FINISHED = _counter(
    "request_success",
    "Rows (one per prompt and choice) that ended, by finished_reason: stop, length, or abort (the caller left).",
    ("model", "finished_reason"),
)
RUNNING = _gauge(
    "num_requests_running",
    "Rows (one per prompt and choice) in the replica's running batch.",
    ("model",),
)
WAITING = _gauge("num_requests_waiting", "Rows waiting in the replica for the engine.", ("model",))
GRAMMAR_COMPILE = _histogram(
    "grammar_compile_seconds",
    "Time to have a request's grammar constraint (response_format, a tool's parameters) ready: a compile, "
    "or a lookup when cached is 'true'.",
    ("model", "cached"),
    TTFT_BUCKETS,
)
COLD_START = {
    phase: _histogram(
        f"cold_start_{phase}_seconds",
        f"Model replica start-up: the {phase.replace('_', ' ')} phase.",
        ("model",),
        PHASE_BUCKETS,
    )
    for phase in COLD_START_PHASES
}

ALL: tuple[Metric, ...] = (
    REQUESTS, E2E_LATENCY, TTFT, ITL, REJECTED, WAKES, QUEUE_TIME, ENGINE_TTFT, ENGINE_ITL, PROMPT_TOKENS,
    GENERATION_TOKENS,
    REQUEST_PROMPT_TOKENS, REQUEST_GENERATION_TOKENS, ROWS_FINISHED, RUNNING, WAITING, GRAMMAR_COMPILE,
    *COLD_START.values(),
)  # fmt: skip


__all__ = ["ALL", "MemorySink", "Metric", "RaySink", "Sink", "use_sink"]


# --- the Gateway's recorders --------------------------------------------------------------------------
def request_done(route: str, model: str, status: int, seconds: float) -> None:
    """One answered HTTP request (status 499: the client left before the answer began)."""
    record(REQUESTS, 1, route=route, model=model, status=str(status))
    record(E2E_LATENCY, seconds, route=route, model=model)


def first_token(route: str, model: str, seconds: float) -> None:
    record(TTFT, seconds, route=route, model=model)


def inter_token(model: str, seconds: float, tokens: int = 1) -> None:
    """``seconds`` since the previous chunk, which carried ``tokens`` tokens (each gets an equal share)."""
    for _ in range(max(1, tokens)):
        record(ITL, seconds / max(1, tokens), model=model)


def rejected(route: str, model: str, reason: str) -> None:
    record(REJECTED, 1, route=route, model=model, reason=reason)


def model_woke(model: str, cause: str) -> None:
    record(WAKES, 1, model=model, cause=cause)


# --- the model replica's recorders --------------------------------------------------------------------
def queued(model: str, seconds: float) -> None:
    record(QUEUE_TIME, seconds, model=model)


def engine_timing(model: str, first_token_s: float | None, gaps: Sequence[float]) -> None:
    """A request's timings as its engine steps made them: first token (None: it made none), then the gaps."""
    if first_token_s is not None:
        record(ENGINE_TTFT, first_token_s, model=model)
    for gap in gaps:
        record(ENGINE_ITL, gap, model=model)


def prompt_tokens(model: str, tokens: int) -> None:
    if tokens > 0:
        record(PROMPT_TOKENS, tokens, model=model)
        record(REQUEST_PROMPT_TOKENS, tokens, model=model)


def generated_tokens(model: str, tokens: int) -> None:
    """Tokens as the engine makes them (counted even if the caller leaves before reading them)."""
    if tokens > 0:
        record(GENERATION_TOKENS, tokens, model=model)


def request_finished(model: str, generated: int, reasons: Mapping[str, int]) -> None:
    """A request's stream ended: its tokens, and its rows by finished reason (``cancelled`` is vLLM's abort)."""
    record(REQUEST_GENERATION_TOKENS, generated, model=model)
    for reason, rows in reasons.items():
        if rows > 0:
            record(ROWS_FINISHED, rows, model=model, finished_reason="abort" if reason == "cancelled" else reason)


def grammar_compiled(model: str, seconds: float, cached: bool) -> None:
    record(GRAMMAR_COMPILE, seconds, model=model, cached="true" if cached else "false")


def batch(model: str, running: int, waiting: int) -> None:
    record(RUNNING, running, model=model)
    record(WAITING, waiting, model=model)


def cold_start(model: str, phases: Mapping[str, float | None]) -> None:
    """A replica finished starting: ``phases`` maps ``<phase>_s`` (or ``<phase>``) to seconds."""
    for phase, metric in COLD_START.items():
        seconds = phases.get(f"{phase}_s", phases.get(phase))
        if seconds is not None:
            record(metric, seconds, model=model)


class BatchSampler:
    """Samples a replica's batcher counters: rows running and waiting (gauges), tokens generated (counter).

    Once a second rather than at every decoding step, and the token count is the engine's own, so
    tokens made for a caller who left before reading them count too. Start it from a request
    (``ensure_running()``: it needs the replica's event loop), or call ``sample()`` directly::

        >>> counters = {"rows_running": 2, "items_queued": 1, "tokens_generated": 40}
        >>> sampler = BatchSampler("tiny", lambda: counters)
        >>> with use_sink(MemorySink()) as sink:
        ...     sampler.sample()
        ...     counters["tokens_generated"] = 45
        ...     sampler.sample()
        >>> sink.total(GENERATION_TOKENS), sink.total(RUNNING), sink.total(WAITING)
        (45.0, 2.0, 1.0)
    """

    def __init__(self, model: str, stats: Callable[[], Mapping[str, int]], interval_s: float = 1.0) -> None:
        self.model = model
        self.interval_s = interval_s
        self._stats = stats
        self._tokens = 0
        self._task: asyncio.Task | None = None

    def ensure_running(self) -> None:
        if self._task is None or self._task.done():
            # A context of its own: the task must not carry the request (and its id) that started it.
            loop = asyncio.get_running_loop()
            self._task = loop.create_task(self._run(), name="metrics-sampler", context=contextvars.Context())

    async def _run(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(self.interval_s)

    def sample(self) -> None:
        try:
            stats = self._stats()
        except Exception:
            logger.warning("could not read the batcher's counters", exc_info=True)
            return
        batch(self.model, stats["rows_running"], stats["items_queued"])
        tokens = stats["tokens_generated"]
        generated_tokens(self.model, tokens - self._tokens)
        self._tokens = tokens
