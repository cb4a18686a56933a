"""Service settings: read once from the environment, validated, translated to Ray's options.

Every field maps to an upper-case environment variable of the same name (``max_new_tokens`` is read
from ``MAX_NEW_TOKENS``). Build them with :func:`load_settings`, which turns pydantic's errors into
messages that name the variable, and stops the process on a bad value::

    settings = load_settings()                      # reads os.environ, exits non-zero if invalid
    settings = load_settings({"MAX_REPLICAS": "4"}) # or from a mapping (tests, tools)

The graph (``ray_serve_app.py``) builds the settings once and hands them to the deployments through
their options and bind arguments, so replicas never read the environment themselves.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parent
DEFAULT_MODEL_DIR = REPO_ROOT / "models" / "pydoc-gpt-mini"

# IDLE_TIMEOUT_S also accepts the name documented by the example this service grew from.
IDLE_TIMEOUT_ALIAS = "RAY_SERVE_AUTOSCALER_IDLE_TIMEOUT_S"


class SettingsError(ValueError):
    """A setting is missing, malformed or inconsistent; the message names each variable."""


class Settings(BaseSettings):
    """Every knob of the service, one environment variable each.

    Example::

        >>> Settings(max_replicas=4).autoscaling_config()["max_replicas"]
        4
    """

    model_config = SettingsConfigDict(
        case_sensitive=False,
        extra="ignore",
        validate_default=True,
        allow_inf_nan=False,
        frozen=True,
        populate_by_name=True,
    )

    # --- model -----------------------------------------------------------------------------
    model_id: str = Field(
        default=str(DEFAULT_MODEL_DIR),
        min_length=1,
        description="Hugging Face hub ID (e.g. facebook/opt-125m) or local checkpoint directory. "
        "Defaults to the embedded model in models/pydoc-gpt-mini.",
    )
    trust_remote_code: bool = Field(default=False, description="Allow model code shipped with a hub checkpoint to run.")
    device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto", description="Where the model runs. auto: cuda when NUM_GPUS_PER_REPLICA > 0, else cpu."
    )
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        default="auto",
        description="Weights dtype. auto: float32 on CPU; bfloat16 on CUDA where supported, else float16.",
    )
    model_load_timeout_s: float = Field(
        default=900.0, gt=0, description="A replica that has not loaded its model in this time fails and is retried."
    )

    # --- generation defaults (a request's generation_kwargs override them) -----------------------
    max_new_tokens: int = Field(default=256, ge=1, description="Default number of tokens to generate.")
    max_new_tokens_limit: int = Field(
        default=1024, ge=1, description="Largest max_new_tokens a request may ask for (larger: 422)."
    )
    temperature: float = Field(
        default=0.7, ge=0, le=2, description="Default sampling temperature; 0 means greedy decoding."
    )
    top_p: float = Field(default=0.9, gt=0, le=1, description="Default nucleus-sampling probability mass.")
    top_k: int = Field(default=0, ge=0, description="Default top-k filter; 0 disables it.")
    repetition_penalty: float = Field(
        default=1.0, gt=0, le=10, description="Default repetition penalty; 1.0 disables it."
    )

    # --- request limits --------------------------------------------------------------------
    max_prompts_per_request: int = Field(
        default=16, ge=1, description="Most prompts one request may carry in `prompts` (more: 413)."
    )
    max_prompt_chars: int = Field(
        default=32_000, ge=1, description="Longest prompt in characters, checked at the edge (longer: 413)."
    )
    max_prompt_tokens: int | None = Field(
        default=None,
        ge=1,
        description="Longest prompt in tokens (longer: 413). Unset: the model's context length is the only limit.",
    )
    request_timeout_s: float = Field(
        default=300.0, gt=0, description="A request not answered in this time gets 504 (includes a cold start)."
    )

    # --- replicas and autoscaling ----------------------------------------------------------
    num_gpus_per_replica: float = Field(default=0, ge=0, description="GPUs per model replica (fractions allowed).")
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
        validation_alias=AliasChoices("IDLE_TIMEOUT_S", IDLE_TIMEOUT_ALIAS),
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

    # --- batching and backpressure ---------------------------------------------------------
    max_batch_size: int = Field(default=16, ge=1, description="Most prompts generated together in one batch.")
    batch_wait_timeout_s: float = Field(
        default=0.005, ge=0, le=1, description="How long a batch waits for more prompts once the first arrives."
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
    retry_after_s: int = Field(default=1, ge=1, description="Retry-After value sent with 503 responses.")

    # --- HTTP and logging ------------------------------------------------------------------
    host: str | None = Field(
        default=None,
        min_length=1,
        description="Address Serve's HTTP proxy must listen on. Unset: Serve's own (127.0.0.1 for serve run).",
    )
    port: int | None = Field(
        default=None, ge=1, le=65535, description="Port Serve's HTTP proxy must listen on. Unset: Serve's own (8000)."
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        default="INFO", description="Log level of both deployments."
    )

    @field_validator("model_id")
    @classmethod
    def _local_model_exists(cls, value: str) -> str:
        # A path-like MODEL_ID must exist now, not fail minutes later inside a replica. Hub IDs
        # ("org/name") cannot be checked offline; from_pretrained reports those.
        if value.startswith(("/", "./", "../", "~")):
            path = Path(value).expanduser()
            if not (path / "config.json").is_file():
                raise ValueError(f"no model checkpoint (config.json) in directory {str(path)!r}")
        return value

    @model_validator(mode="after")
    def _check_consistency(self) -> Settings:
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
        if self.autoscaling_look_back_s <= self.metrics_push_interval_s:
            problems.append(
                f"AUTOSCALING_LOOK_BACK_S ({self.autoscaling_look_back_s:g}) must be longer than "
                f"METRICS_PUSH_INTERVAL_S ({self.metrics_push_interval_s:g})"
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
    def scale_to_zero_delay_s(self) -> float:
        """Ray's downscale_to_zero_delay_s such that the last replica stops IDLE_TIMEOUT_S after traffic ends.

        The autoscaler only sees "no traffic" once the look-back window holds no request and the
        Gateway's handle has reported it, so those two periods are part of the idle time.
        """
        return max(0.0, self.idle_timeout_s - self.autoscaling_look_back_s - self.metrics_push_interval_s)

    # --- translation to Ray's vocabulary -------------------------------------------------------------
    def autoscaling_config(self) -> dict[str, Any]:
        """Keys of ``ray.serve.config.AutoscalingConfig`` (a test checks Ray reads every one)."""
        return {
            "min_replicas": self.min_replicas,
            "max_replicas": self.max_replicas,
            "initial_replicas": self.min_replicas,
            "target_ongoing_requests": self.target_ongoing_requests,
            "upscale_delay_s": self.upscale_delay_s,
            "downscale_delay_s": self.downscale_delay_s,
            "downscale_to_zero_delay_s": self.scale_to_zero_delay_s,
            "look_back_period_s": self.autoscaling_look_back_s,
            # How often the Gateway's handle reports queued and running requests to the controller.
            # Ray marks the key deprecated in favour of environment variables, but the installed
            # Ray (2.60) reads only this key for the handle's push period; its default of 10 s
            # would delay both the idle countdown and upscaling under load.
            "metrics_interval_s": self.metrics_push_interval_s,
        }

    def generator_options(self) -> dict[str, Any]:
        """``Deployment.options()`` for the model deployment."""
        return {
            "autoscaling_config": self.autoscaling_config(),
            "ray_actor_options": {"num_cpus": self.num_cpus_per_replica, "num_gpus": self.num_gpus_per_replica},
            "max_ongoing_requests": self.max_ongoing_requests,
            "max_queued_requests": self.max_queued_requests,
            "graceful_shutdown_timeout_s": self.graceful_shutdown_timeout_s,
            "graceful_shutdown_wait_loop_s": 1.0,
            # Loading a large model can take minutes; Ray's 30 s default would kill a healthy replica.
            "health_check_timeout_s": max(30.0, self.model_load_timeout_s),
            "logging_config": {"log_level": self.log_level},
        }

    def gateway_options(self) -> dict[str, Any]:
        """``Deployment.options()`` for the light HTTP ingress: one replica, no CPU reserved."""
        queue = self.max_queued_requests if self.max_queued_requests > 0 else 1000
        return {
            "num_replicas": 1,
            # The Gateway only awaits the Generator; it must hold every request the Generator can
            # accept or queue, or the proxy would queue them where no limit applies.
            "max_ongoing_requests": self.max_replicas * self.max_ongoing_requests + queue + 16,
            "ray_actor_options": {"num_cpus": 0},
            "graceful_shutdown_timeout_s": self.graceful_shutdown_timeout_s,
            "logging_config": {"log_level": self.log_level},
        }

    def env_vars(self) -> dict[str, str]:
        """The settings as environment variables, for a Serve config's runtime_env (see deploy/)."""
        out = {}
        for name, value in self.model_dump().items():
            if value is None:
                continue
            out[name.upper()] = str(value).lower() if isinstance(value, bool) else str(value)
        return out


def env_name(field: str) -> str:
    """The environment variable a field is read from."""
    return field.upper()


def _describe(error: Mapping[str, Any]) -> str:
    loc = [str(part) for part in error.get("loc", ()) if part != "__root__"]
    message = str(error.get("msg", "invalid value"))
    message = message.removeprefix("Value error, ")
    if not loc:
        return message
    name = env_name(loc[0])
    value = error.get("input")
    shown = f", got {value!r}" if isinstance(value, str | int | float | bool) and repr(value) not in message else ""
    return f"{name}: {message[:1].lower()}{message[1:]}{shown}"


def _check_aliases(environ: Mapping[str, str]) -> None:
    primary, alias = environ.get("IDLE_TIMEOUT_S"), environ.get(IDLE_TIMEOUT_ALIAS)
    if primary is not None and alias is not None and primary.strip() != alias.strip():
        raise SettingsError(
            f"IDLE_TIMEOUT_S ({primary!r}) and its alias {IDLE_TIMEOUT_ALIAS} ({alias!r}) disagree; set one"
        )


def build_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Settings from ``environ`` (default ``os.environ``); raises SettingsError naming each bad variable."""
    environ = os.environ if environ is None else environ
    upper = {key.upper(): value for key, value in environ.items()}
    _check_aliases(upper)
    values: dict[str, Any] = {}
    for field in Settings.model_fields:
        if env_name(field) in upper:
            values[field] = upper[env_name(field)]
    if "idle_timeout_s" not in values and IDLE_TIMEOUT_ALIAS in upper:
        values["idle_timeout_s"] = upper[IDLE_TIMEOUT_ALIAS]
    try:
        # model_validate, unlike Settings(), reads nothing but `values`: the mapping is the only source.
        return Settings.model_validate(values)
    except ValidationError as exc:
        lines = [_describe(error) for error in exc.errors(include_url=False)]
        raise SettingsError("invalid settings:\n  " + "\n  ".join(lines)) from None


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Like :func:`build_settings`, but a bad setting ends the process with a non-zero exit code."""
    try:
        return build_settings(environ)
    except SettingsError as exc:
        sys.exit(f"error: {exc}")
