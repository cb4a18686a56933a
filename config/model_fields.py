"""What belongs to one model: checkpoint, generation defaults, resources, replicas, batching.

As environment variables, these are the defaults of every served model (``MAX_NEW_TOKENS`` ...);
a ``MODELS_FILE`` entry overrides what it names (:mod:`config.models_file`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL_DIR = REPO_ROOT / "models" / "pydoc-gpt-mini"

# IDLE_TIMEOUT_S also accepts the name documented by the example this service grew from.
IDLE_TIMEOUT_ALIAS = "RAY_SERVE_AUTOSCALER_IDLE_TIMEOUT_S"


def is_local_path(value: str) -> bool:
    return value.startswith(("/", "./", "../", "~"))


STORED = "stored"  # validation context key: a record read back from the pool's store (no disk lookups)


def _stored(info: ValidationInfo) -> bool:
    return bool(info.context and info.context.get(STORED))


class ModelFields(BaseModel):
    """What belongs to one model. As environment variables, the defaults of every served model."""

    model_config = ConfigDict(validate_default=True, allow_inf_nan=False, frozen=True, populate_by_name=True)

    # --- model -----------------------------------------------------------------------------
    model_id: str = Field(
        default=str(DEFAULT_MODEL_DIR),
        min_length=1,
        description="Hugging Face hub ID (e.g. facebook/opt-125m) or local checkpoint directory. "
        "Defaults to the embedded model in models/pydoc-gpt-mini.",
    )
    task: Literal["generate", "embed"] = Field(
        default="generate",
        description="What the model serves: generate (text: /v1/completions, /v1/chat/completions, /generate) or "
        "embed (vectors: /v1/embeddings; the checkpoint's sentence-transformers pooling, else mean pooling).",
    )
    trust_remote_code: bool = Field(default=False, description="Allow model code shipped with a hub checkpoint to run.")
    device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto", description="Where the model runs. auto: cuda when NUM_GPUS_PER_REPLICA > 0, else cpu."
    )
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        default="auto",
        description="Weights dtype. auto: on CPU bfloat16 where the CPU has it natively (AVX512-BF16 or AMX), "
        "else float32 (a float32 checkpoint answers its first request in float32, then is converted, unless "
        "PACKED_CACHE_DIR holds its converted layers); "
        "on CUDA bfloat16 where supported, else float16.",
    )
    model_load_timeout_s: float = Field(
        default=900.0, gt=0, description="A replica that has not loaded its model in this time fails and is retried."
    )
    chat_template: str | None = Field(
        default=None,
        min_length=1,
        description="Chat template (Jinja) for /v1/chat/completions, or the path of a file holding one. "
        "Unset: the tokenizer's own template.",
    )
    tool_parser: Literal["hermes", "json"] = Field(
        default="hermes",
        description="How /v1/chat/completions reads tool calls in the model's text with tool_choice auto: "
        "hermes (<tool_call>{...}</tool_call>, Hermes and Qwen models) or json (the whole answer a JSON call or "
        "list of calls).",
    )
    priority: int = Field(
        default=0, ge=0, le=100, description="Model priority: higher may evict lower on a full cluster (0 lowest)."
    )

    # --- generation defaults (a request's own values override them) -----------------------------
    max_new_tokens: int = Field(default=256, ge=1, description="Default number of tokens to generate.")
    max_new_tokens_limit: int = Field(
        default=1024, ge=1, description="Largest max_new_tokens / max_tokens a request may ask for (larger: 4xx)."
    )
    temperature: float = Field(
        default=0.7, ge=0, le=2, description="Default sampling temperature; 0 means greedy decoding."
    )
    top_p: float = Field(default=0.9, gt=0, le=1, description="Default nucleus-sampling probability mass.")
    top_k: int = Field(default=0, ge=0, le=2**31 - 1, description="Default top-k filter; 0 disables it.")
    repetition_penalty: float = Field(
        default=1.0, gt=0, le=10, description="Default repetition penalty; 1.0 disables it."
    )
    max_prompt_tokens: int | None = Field(
        default=None,
        ge=1,
        description="Longest prompt in tokens (longer: 413). Unset: derived from the model's context, "
        "min(context, MAX_BATCH_TOKENS) - 1 (room for one new token).",
    )

    # --- replicas and autoscaling ----------------------------------------------------------
    num_gpus_per_replica: float = Field(
        default=0,
        ge=0,
        description="GPUs per model replica. Below 1: replicas share one GPU; a whole number above 1: the model's "
        "layers are spread over that many GPUs.",
    )
    gpu_memory_utilization: float = Field(
        default=0.9,
        gt=0,
        le=1,
        description="Share of each of the replica's GPUs (of its share, for a fraction) that weights and the "
        "key/value cache may take; the rest is left for activations.",
    )
    cpu_offload_gb: float = Field(
        default=0,
        ge=0,
        description="Host memory (GB) for the weights that do not fit the replica's GPUs (slow: they cross to the "
        "GPU at every step). 0: a model that does not fit fails its load.",
    )
    num_cpus_per_replica: float = Field(
        default=1, gt=0, description="CPUs per model replica; also the number of torch threads on CPU."
    )
    min_replicas: int = Field(default=0, ge=0, description="Fewest model replicas; 0 lets the model scale to zero.")
    max_replicas: int = Field(default=2, ge=1, description="Most model replicas.")
    target_ongoing_requests: float = Field(
        default=8, gt=0, description="Requests per replica the autoscaler aims for (ongoing plus queued)."
    )
    idle_timeout_s: float = Field(
        default=60.0,
        ge=0,
        validation_alias=AliasChoices("IDLE_TIMEOUT_S", "idle_timeout_s", IDLE_TIMEOUT_ALIAS),
        description=f"Seconds without traffic before the last model replica stops. Alias: {IDLE_TIMEOUT_ALIAS}.",
    )
    upscale_delay_s: float = Field(
        default=5.0, ge=0, description="Sustained load needed before adding a replica (scaling from zero is immediate)."
    )
    downscale_delay_s: float = Field(
        default=30.0, ge=0, description="Sustained low load needed before removing a replica, above one replica."
    )
    autoscaling_look_back_s: float = Field(
        default=5.0, gt=0, description="Window over which the autoscaler averages the request count."
    )
    metrics_push_interval_s: float = Field(
        default=1.0, gt=0, description="How often the Gateway reports its requests in flight to the autoscaler."
    )
    graceful_shutdown_timeout_s: float = Field(
        default=300.0, ge=0, description="How long a stopping replica may take to finish the requests it holds."
    )
    warm_workers: int = Field(
        default=1,
        ge=0,
        le=8,
        description="Idle workers kept on each node that can host a replica, with torch, transformers and the "
        "engine imported, so that a waking replica skips process start and imports (about 0.4 GB each). Models "
        "share one pool per node, of the largest WARM_WORKERS among them. 0: this model's replicas start cold.",
    )
    warm_worker_orphan_s: float = Field(
        default=30.0,
        ge=10,
        le=3600,
        description="How long an idle warm worker outlives the last pool manager it saw (they write every second, "
        "and Serve restarts a failed one within seconds); then it exits. Models whose values differ keep separate "
        "pools.",
    )

    # --- batching and backpressure ---------------------------------------------------------
    max_batch_size: int = Field(
        default=16, ge=1, description="Most prompts generated (or inputs embedded) together in one batch."
    )
    max_batch_tokens: int = Field(
        default=16384,
        ge=2,
        description="Key/value cache one batch may hold, in tokens: rows x the batch's width (the longest row, "
        "padding included, plus the tokens still to generate). A row joins a running batch only when it fits; "
        "a single prompt plus its max_new_tokens above it is refused (413).",
    )
    step_prompt_tokens: int | None = Field(
        default=None,
        ge=1,
        le=1_000_000,
        description="Prompt tokens that join a running batch per decoding step, about (a step's first prompt joins "
        "whatever its length; the rest wait for the next step). Prompts that arrive together are prefilled a "
        "share a step, so the first of them get their first token after a short step instead of all after one "
        "long pass. Unset: 64 on a CPU, 2048 on a GPU. Continuous batching only.",
    )
    batch_wait_timeout_s: float = Field(
        default=0.005, ge=0, le=1, description="How long a batch waits for more prompts once the first arrives."
    )
    stream_interval_s: float = Field(
        default=0.05,
        ge=0,
        le=1,
        description="Least time between two messages of one stream after its first token: the tokens made "
        "meanwhile leave joined, in one message (fewer messages per token, coarser inter-token latency). "
        "The first token and the end are never held. 0.05 is Ray Serve LLM's window too; 0: every message "
        "carries what is ready when it is read (one stream alone: every token).",
    )
    stream_messages_per_s: float = Field(
        default=100.0,
        ge=0,
        le=100000,
        description="Messages a model replica sends per second for all its streams together, about: with S "
        "streams open each sends at most S / this a second, joining the tokens made in between (one stream "
        "alone: a message each 1 / this s at most, so every token where steps take longer). Bounds the CPU "
        "that streaming takes from the engine under load; 0: no bound (one message per stream per step).",
    )
    engine_stall_timeout_s: float = Field(
        default=120.0,
        gt=0,
        description="A model replica whose engine has work and has not finished a decoding step in this time "
        "reports unhealthy: its requests get 503 and Serve replaces it (health checked every min(10, this / 2) s).",
    )
    kernel_cache_capacity: int = Field(
        default=32,
        ge=1,
        le=1024,
        description="CPU kernels a model replica keeps compiled (oneDNN's and ideep's caches: "
        "ONEDNN_PRIMITIVE_CACHE_CAPACITY, LRU_CACHE_CAPACITY). A batch of a new shape compiles its own; at "
        "PyTorch's 1024 a replica grew by about 300 MiB under varied batches, at 32 its steps ran as fast.",
    )
    packed_cache_dir: str = Field(
        default="~/.cache/llm-serve/packed-layers",
        description="Directory where a CPU replica keeps its model's packed layers (converted to the dtype it runs "
        "and reordered for oneDNN), so that the next wake maps them from the page cache instead of redoing that "
        "work before or after its first answer. Entries are keyed by the checkpoint's files, DTYPE, MAX_BATCH_SIZE, "
        "the CPU and torch; `~` is the node's home. Empty: none kept. The operator's: /admin cannot set it.",
    )
    packed_cache_gb: float = Field(
        default=32.0,
        ge=0,
        description="Most disk PACKED_CACHE_DIR may take, in GB (about a bfloat16 model's size per model): the "
        "entries used longest ago are removed to make room, and a model larger than this is not kept. 0: none kept.",
    )
    huge_pages: bool = Field(
        default=True,
        description="Move a CPU replica's packed layers onto 2 MB pages after its first answer, where the kernel's "
        "transparent huge pages are `always` or `madvise`: every decode step streams them, faster than on 4 KB pages. "
        "Only layers packed in the replica's own memory move (layers mapped from PACKED_CACHE_DIR read as fast). "
        "false: leave them where they are.",
    )
    max_ongoing_requests: int = Field(
        default=32, ge=1, description="Requests one model replica works on at once; more wait in the queue."
    )
    max_queued_requests: int = Field(
        default=64,
        ge=-1,
        description="Requests allowed to wait for a model replica; beyond it clients get 503 with Retry-After. "
        "-1: unbounded.",
    )

    @field_validator("packed_cache_dir")
    @classmethod
    def _absolute_cache_dir(cls, value: str) -> str:
        # A replica's working directory is Ray's session directory: a relative path would land there, per session.
        if value and not value.startswith(("/", "~")):
            raise ValueError(f"must be an absolute path (or start with ~), or empty to keep none; got {value!r}")
        return value

    @field_validator("model_id")
    @classmethod
    def _local_model_exists(cls, value: str, info: ValidationInfo) -> str:
        # A path-like MODEL_ID must exist now, not fail minutes later inside a replica. Hub IDs
        # ("org/name") cannot be checked offline; from_pretrained reports those. A stored record was
        # checked where it was written: its path may exist only on the nodes that run replicas.
        if is_local_path(value) and not _stored(info):
            path = Path(value).expanduser()
            if not (path / "config.json").is_file():
                raise ValueError(f"no model checkpoint (config.json) in directory {str(path)!r}")
        return value

    @field_validator("chat_template")
    @classmethod
    def _template_text(cls, value: str | None, info: ValidationInfo) -> str | None:
        # The template travels as text: a replica on another node cannot read this machine's file.
        if value is None or "{{" in value or "{%" in value or _stored(info):
            return value
        path = Path(value).expanduser()
        if not path.is_file():
            raise ValueError(f"neither a Jinja template (no '{{{{' or '{{%') nor a readable file: {value!r}")
        text = path.read_text()
        if "{{" not in text and "{%" not in text:
            raise ValueError(f"the file {value!r} holds no Jinja template")
        return text

    @model_validator(mode="after")
    def _check_model_consistency(self) -> ModelFields:
        problems = []
        if self.max_replicas < self.min_replicas:
            problems.append(f"MAX_REPLICAS ({self.max_replicas}) must be at least MIN_REPLICAS ({self.min_replicas})")
        if self.max_new_tokens > self.max_new_tokens_limit:
            problems.append(
                f"MAX_NEW_TOKENS ({self.max_new_tokens}) must not exceed MAX_NEW_TOKENS_LIMIT "
                f"({self.max_new_tokens_limit})"
            )
        if self.device == "cuda" and self.num_gpus_per_replica == 0:
            problems.append("DEVICE=cuda needs NUM_GPUS_PER_REPLICA > 0 so that Ray gives the replica a GPU")
        if self.device == "cpu" and self.num_gpus_per_replica > 0:
            problems.append(
                f"DEVICE=cpu with NUM_GPUS_PER_REPLICA={self.num_gpus_per_replica:g} would reserve GPUs it never uses"
            )
        if self.num_gpus_per_replica > 1 and not float(self.num_gpus_per_replica).is_integer():
            problems.append(
                f"NUM_GPUS_PER_REPLICA ({self.num_gpus_per_replica:g}) must be a whole number above 1 (Ray gives a "
                "replica either a share of one GPU or whole GPUs)"
            )
        if self.cpu_offload_gb > 0 and self.resolved_device != "cuda":
            problems.append(f"CPU_OFFLOAD_GB ({self.cpu_offload_gb:g}) applies to GPU replicas only")
        if self.autoscaling_look_back_s <= self.metrics_push_interval_s:
            problems.append(
                f"AUTOSCALING_LOOK_BACK_S ({self.autoscaling_look_back_s:g}) must be longer than "
                f"METRICS_PUSH_INTERVAL_S ({self.metrics_push_interval_s:g})"
            )
        if self.max_prompt_tokens is not None and self.max_prompt_tokens >= self.max_batch_tokens:
            problems.append(
                f"MAX_PROMPT_TOKENS ({self.max_prompt_tokens}) must be below MAX_BATCH_TOKENS "
                f"({self.max_batch_tokens}): a batch must hold the prompt and a token to generate"
            )
        if self.max_new_tokens >= self.max_batch_tokens:
            problems.append(
                f"MAX_NEW_TOKENS ({self.max_new_tokens}) must be below MAX_BATCH_TOKENS ({self.max_batch_tokens})"
            )
        if self.max_queued_requests == 0:
            problems.append("MAX_QUEUED_REQUESTS must be -1 (unbounded) or at least 1, got 0")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    # --- derived values ----------------------------------------------------------------------
    @property
    def resolved_device(self) -> Literal["cpu", "cuda"]:
        if self.device != "auto":
            return self.device
        return "cuda" if self.num_gpus_per_replica > 0 else "cpu"

    @property
    def torch_threads(self) -> int:
        """Intra-op threads for torch on CPU: the CPUs Ray reserves for the replica."""
        return max(1, math.floor(self.num_cpus_per_replica))

    @property
    def idle_hold_s(self) -> float:
        """How long a replica must see no traffic before it stops, so that it stops IDLE_TIMEOUT_S after traffic ends.

        The autoscaler only sees "no traffic" once the look-back window holds no request and the
        Gateway's handle has reported it, so those two periods are part of the idle time.
        """
        return max(0.0, self.idle_timeout_s - self.autoscaling_look_back_s - self.metrics_push_interval_s)


MODEL_FIELDS: tuple[str, ...] = tuple(ModelFields.model_fields)
