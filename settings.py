"""Service settings: read once from the environment, validated, translated to Ray's options.

Every field maps to an upper-case environment variable of the same name (``max_new_tokens`` is read
from ``MAX_NEW_TOKENS``). Build them with :func:`load_settings`, which turns pydantic's errors into
messages that name the variable, and stops the process on a bad value::

    settings = load_settings()                      # reads os.environ, exits non-zero if invalid
    settings = load_settings({"MAX_REPLICAS": "4"}) # or from a mapping (tests, tools)

Two kinds of settings: what belongs to the service (HTTP, keys, limits at the edge, the pool's
rules) and what belongs to a model (:class:`ModelConfig`: checkpoint, generation defaults,
resources, replicas). The per-model variables are the defaults of every model; ``MODELS`` or
``MODELS_FILE`` list several models, each overriding what it names. ``settings.model_configs``
holds the result, one ``ModelConfig`` per served model, each building its own Ray options.

The graph (``ray_serve_app.py``) builds the settings once and hands them to the deployments through
their options and bind arguments, so replicas never read the environment themselves.
"""

from __future__ import annotations

import contextvars
import json
import math
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, time, timedelta
from pathlib import Path
from typing import Any, ClassVar, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, EnvSettingsSource, SettingsConfigDict
from pydantic_settings.sources.utils import parse_env_vars

REPO_ROOT = Path(__file__).resolve().parent
DEFAULT_MODEL_DIR = REPO_ROOT / "models" / "pydoc-gpt-mini"

# IDLE_TIMEOUT_S also accepts the name documented by the example this service grew from.
IDLE_TIMEOUT_ALIAS = "RAY_SERVE_AUTOSCALER_IDLE_TIMEOUT_S"
# What a served model name may contain: it is the `model` clients send and names the deployment.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$"


class SettingsError(ValueError):
    """A setting is missing, malformed or inconsistent; the message names each variable."""


@dataclass(frozen=True)
class DailyTime:
    """A time of day in a time zone, e.g. ``21:00 America/Chicago`` (SCALE_TO_ZERO_AT).

    Example::

        >>> at = DailyTime.parse("21:00 UTC")
        >>> at.next_after(datetime(2026, 1, 1, 22, 30, tzinfo=ZoneInfo("UTC"))).isoformat()
        '2026-01-02T21:00:00+00:00'
    """

    at: time
    zone: str

    @classmethod
    def parse(cls, text: str) -> DailyTime:
        match = re.fullmatch(r"\s*(\d{1,2}):(\d{2})\s+(\S+)\s*", text)
        if not match:
            raise ValueError(f"expected 'HH:MM Area/City' (e.g. '21:00 America/Chicago'), got {text!r}")
        hour, minute, zone = int(match.group(1)), int(match.group(2)), match.group(3)
        if hour > 23 or minute > 59:
            raise ValueError(f"{hour:02d}:{minute:02d} is not a time of day")
        try:
            ZoneInfo(zone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(
                f"unknown time zone {zone!r} (use an IANA name such as 'Europe/Berlin' or 'UTC')"
            ) from None
        return cls(time(hour, minute), zone)

    def next_after(self, moment: datetime) -> datetime:
        """The first occurrence strictly after ``moment`` (an aware datetime)."""
        local = moment.astimezone(ZoneInfo(self.zone))
        candidate = datetime.combine(local.date(), self.at, tzinfo=ZoneInfo(self.zone))
        if candidate <= local:
            candidate = datetime.combine(local.date() + timedelta(days=1), self.at, tzinfo=ZoneInfo(self.zone))
        return candidate

    def __str__(self) -> str:
        return f"{self.at:%H:%M} {self.zone}"


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
    chat_template: str | None = Field(
        default=None,
        min_length=1,
        description="Chat template (Jinja) for /v1/chat/completions, or the path of a file holding one. "
        "Unset: the tokenizer's own template.",
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
    top_k: int = Field(default=0, ge=0, description="Default top-k filter; 0 disables it.")
    repetition_penalty: float = Field(
        default=1.0, gt=0, le=10, description="Default repetition penalty; 1.0 disables it."
    )
    max_prompt_tokens: int | None = Field(
        default=None,
        ge=1,
        description="Longest prompt in tokens (longer: 413). Unset: the model's context length is the only limit.",
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

    @field_validator("model_id")
    @classmethod
    def _local_model_exists(cls, value: str) -> str:
        # A path-like MODEL_ID must exist now, not fail minutes later inside a replica. Hub IDs
        # ("org/name") cannot be checked offline; from_pretrained reports those.
        if is_local_path(value):
            path = Path(value).expanduser()
            if not (path / "config.json").is_file():
                raise ValueError(f"no model checkpoint (config.json) in directory {str(path)!r}")
        return value

    @field_validator("chat_template")
    @classmethod
    def _template_text(cls, value: str | None) -> str | None:
        # The template travels as text: a replica on another node cannot read this machine's file.
        if value is None or "{{" in value or "{%" in value:
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


MODEL_FIELDS: tuple[str, ...] = tuple(ModelFields.model_fields)


class ModelConfig(ModelFields):
    """One served model: its name, checkpoint, generation defaults and deployment.

    Example::

        >>> config = ModelConfig(name="org/tiny", model_id="org/tiny", max_replicas=4)
        >>> config.deployment_name, config.deployment_options()["autoscaling_config"]["max_replicas"]
        ('org--tiny', 4)
    """

    model_config = ConfigDict(extra="forbid", validate_default=True, allow_inf_nan=False, frozen=True)

    name: str = Field(pattern=NAME_PATTERN, description="The id clients send as `model`.")

    @property
    def deployment_name(self) -> str:
        """The Serve deployment of this model: its name, with what Serve's names cannot hold replaced."""
        return self.name.replace("/", "--").replace(":", "-")

    def accepts(self, requested: str) -> bool:
        """Whether a request's ``model`` names this model (its served name or its MODEL_ID)."""
        return requested in (self.name, self.model_id)

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

    def deployment_options(self, log_level: str = "INFO") -> dict[str, Any]:
        """``Deployment.options()`` for this model's deployment."""
        return {
            "name": self.deployment_name,
            "autoscaling_config": self.autoscaling_config(),
            "ray_actor_options": {"num_cpus": self.num_cpus_per_replica, "num_gpus": self.num_gpus_per_replica},
            "max_ongoing_requests": self.max_ongoing_requests,
            "max_queued_requests": self.max_queued_requests,
            "graceful_shutdown_timeout_s": self.graceful_shutdown_timeout_s,
            "graceful_shutdown_wait_loop_s": 1.0,
            # Loading a large model can take minutes; Ray's 30 s default would kill a healthy replica.
            "health_check_timeout_s": max(30.0, self.model_load_timeout_s),
            "logging_config": {"log_level": log_level},
        }

    def public(self) -> dict[str, Any]:
        """The configuration as /admin shows it (a chat template as its length, not its text)."""
        out = self.model_dump()
        if self.chat_template is not None:
            out["chat_template"] = f"<{len(self.chat_template)} characters>"
        return out


class _MappingEnvSource(EnvSettingsSource):
    """pydantic-settings' own environment source, reading a given mapping instead of os.environ."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        self._environ = environ
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return parse_env_vars(self._environ, self.case_sensitive, self.env_ignore_empty, self.env_parse_none_str)


_ENVIRON: contextvars.ContextVar[Mapping[str, str] | None] = contextvars.ContextVar("environ", default=None)
SECRET_FIELDS = frozenset({"api_key", "admin_api_key"})
ADMIN_HEADROOM = 256


class Settings(BaseSettings, ModelFields):
    """Every knob of the service, one environment variable each.

    Example::

        >>> settings = Settings(max_replicas=4, models="a=org/a,b=org/b")
        >>> [(m.name, m.max_replicas) for m in settings.model_configs]
        [('a', 4), ('b', 4)]
    """

    model_config = SettingsConfigDict(
        case_sensitive=False,
        extra="ignore",
        validate_default=True,
        allow_inf_nan=False,
        frozen=True,
        populate_by_name=True,
    )

    # --- which models --------------------------------------------------------------------------
    served_model_name: str | None = Field(
        default=None,
        pattern=NAME_PATTERN,
        description="The id clients send as `model` for MODEL_ID. Unset: the checkpoint directory's name, or the "
        "hub ID.",
    )
    models: str | None = Field(
        default=None,
        min_length=1,
        description="Several models: name=model_id pairs separated by commas (or a JSON list of MODELS_FILE "
        "entries); the other model variables are their defaults.",
    )
    models_file: Path | None = Field(
        default=None,
        description="YAML or JSON file with a `models:` list (name, model_id and per-model settings in lower case).",
    )

    # --- limits at the edge ----------------------------------------------------------------
    max_prompts_per_request: int = Field(
        default=16, ge=1, description="Most completions one request may ask for (prompts times n; more: 413)."
    )
    max_prompt_chars: int = Field(
        default=32_000, ge=1, description="Longest prompt in characters, checked at the edge (longer: 413)."
    )
    max_body_bytes: int = Field(
        default=1_000_000, ge=1024, description="Largest request body in bytes (larger: 413, before it is parsed)."
    )
    request_timeout_s: float = Field(
        default=300.0, gt=0, description="A request not answered in this time gets 504 (includes a cold start)."
    )
    retry_after_s: int = Field(default=1, ge=1, description="Retry-After value sent with 429 and 503 responses.")
    stream_heartbeat_s: float = Field(
        default=2.0,
        gt=0,
        le=60,
        description="While a stream waits for its first token (a cold start), an SSE comment is sent this often.",
    )

    # --- access ----------------------------------------------------------------------------
    api_key: SecretStr | None = Field(
        default=None,
        description="API key(s) clients must send as `Authorization: Bearer <key>`; several separated by commas. "
        "Unset (and no API_KEYS_FILE): the service is open.",
    )
    api_keys_file: Path | None = Field(default=None, description="File with one API key a line (# comments allowed).")
    admin_api_key: SecretStr | None = Field(
        default=None, description="Key for the /admin API (Bearer). Unset: /admin answers 404."
    )

    # --- the model pool ----------------------------------------------------------------------
    keep_hot_priority: int = Field(
        default=2,
        ge=0,
        le=101,
        description="Models with at least this priority keep one replica and are never evicted.",
    )
    eviction_grace_s: float = Field(
        default=60.0,
        ge=0,
        description="How long a model replica may wait for room (the cluster autoscaler's chance) before "
        "lower-priority models are evicted.",
    )
    scale_to_zero_at: str | None = Field(
        default=None,
        description="Daily time with a time zone (e.g. '21:00 America/Chicago') when every model, keep-hot ones "
        "included, goes to zero.",
    )

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
        default="INFO", description="Log level of every deployment."
    )

    _model_configs: tuple[ModelConfig, ...] = PrivateAttr(default=())
    _api_keys: tuple[SecretStr, ...] = PrivateAttr(default=())

    # Fields whose value is never shown: not in error messages, not in generated files.
    secret_fields: ClassVar[frozenset[str]] = SECRET_FIELDS

    @classmethod
    def settings_customise_sources(
        cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings
    ):
        environ = _ENVIRON.get()
        env = _MappingEnvSource(settings_cls, os.environ if environ is None else environ)
        return (init_settings, env)

    @field_validator("scale_to_zero_at")
    @classmethod
    def _daily_time(cls, value: str | None) -> str | None:
        return None if value is None else str(DailyTime.parse(value))

    @field_validator("models_file", "api_keys_file")
    @classmethod
    def _readable_file(cls, value: Path | None) -> Path | None:
        if value is not None and not value.expanduser().is_file():
            raise ValueError(f"no such file: {str(value)!r}")
        return value

    @model_validator(mode="after")
    def _build_models_and_keys(self) -> Settings:
        chosen = [name for name in ("models", "models_file") if getattr(self, name) is not None]
        if len(chosen) == 2:
            raise ValueError("set MODELS or MODELS_FILE, not both")
        if chosen and self.served_model_name is not None:
            raise ValueError(f"SERVED_MODEL_NAME names the one model of MODEL_ID; with {chosen[0].upper()} each "
                             "entry has its own name")  # fmt: skip
        if chosen and "model_id" in self.model_fields_set:
            raise ValueError(f"set MODEL_ID (one model) or {chosen[0].upper()} (several), not both")
        if self.models is not None:
            configs = _models_from_pairs(self, self.models)
        elif self.models_file is not None:
            configs = _models_from_file(self, self.models_file)
        else:
            name = self.served_model_name or default_served_name(self.model_id)
            configs = (_model_from_entry(self, {"name": name, "model_id": self.model_id}, "MODEL_ID"),)
        names = [c.name for c in configs]
        deployments = [c.deployment_name for c in configs]
        duplicates = sorted(
            {n for n in names if names.count(n) > 1} | {d for d in deployments if deployments.count(d) > 1}
        )
        if duplicates:
            raise ValueError(f"model names must be unique; repeated: {', '.join(duplicates)}")
        self._model_configs = configs
        self._api_keys = _read_keys(self.api_key, self.api_keys_file)
        if self.admin_api_key is not None and not self.admin_api_key.get_secret_value().strip():
            raise ValueError("ADMIN_API_KEY is empty; unset it to turn /admin off")
        return self

    # --- derived values ----------------------------------------------------------------------
    @property
    def model_configs(self) -> tuple[ModelConfig, ...]:
        """Every served model, in the order configured."""
        return self._model_configs

    @property
    def api_keys(self) -> tuple[SecretStr, ...]:
        """Keys from API_KEY and API_KEYS_FILE; empty when the service is open."""
        return self._api_keys

    @property
    def daily_scale_to_zero(self) -> DailyTime | None:
        return None if self.scale_to_zero_at is None else DailyTime.parse(self.scale_to_zero_at)

    def model(self, requested: str) -> ModelConfig | None:
        """The model a request's ``model`` names (served name or MODEL_ID), or None."""
        return next((m for m in self._model_configs if m.accepts(requested)), None)

    def gateway_options(self) -> dict[str, Any]:
        """``Deployment.options()`` for the light HTTP ingress: one replica, no CPU reserved."""
        # The Gateway only awaits the models; it must hold every request they can accept or queue,
        # or the proxy would queue them where no limit applies.
        capacity = sum(
            m.max_replicas * m.max_ongoing_requests + (m.max_queued_requests if m.max_queued_requests > 0 else 1000)
            for m in self._model_configs
        )
        return {
            "num_replicas": 1,
            # Plus room for models loaded through /admin and for requests waiting at the pool for room.
            "max_ongoing_requests": capacity + ADMIN_HEADROOM,
            "ray_actor_options": {"num_cpus": 0},
            "graceful_shutdown_timeout_s": max(m.graceful_shutdown_timeout_s for m in self._model_configs),
            "logging_config": {"log_level": self.log_level},
        }

    def env_vars(self) -> dict[str, str]:
        """The settings as environment variables, secrets left out (see deploy/)."""
        out = {}
        for name, value in self.model_dump(exclude=set(SECRET_FIELDS)).items():
            if value is None:
                continue
            out[name.upper()] = str(value).lower() if isinstance(value, bool) else str(value)
        return out


def is_local_path(value: str) -> bool:
    return value.startswith(("/", "./", "../", "~"))


def default_served_name(model_id: str) -> str:
    """A local checkpoint is served under its directory's name; a hub model under its hub ID.

    Example::

        >>> default_served_name("/models/pydoc-gpt-mini/"), default_served_name("facebook/opt-125m")
        ('pydoc-gpt-mini', 'facebook/opt-125m')
    """
    return Path(model_id).expanduser().resolve().name if is_local_path(model_id) else model_id


def _defaults(settings: Settings) -> dict[str, Any]:
    """The per-model values of the environment (what every model entry starts from)."""
    return {name: getattr(settings, name) for name in MODEL_FIELDS}


def _model_from_entry(settings: Settings, entry: Mapping[str, Any], where: str) -> ModelConfig:
    try:
        return ModelConfig.model_validate({**_defaults(settings), **entry})
    except ValidationError as exc:
        lines = [_describe(error, env=False) for error in exc.errors(include_url=False)]
        raise ValueError(f"{where}: " + "; ".join(lines)) from None


def _models_from_pairs(settings: Settings, text: str) -> tuple[ModelConfig, ...]:
    if text.lstrip().startswith("["):  # entries as a MODELS_FILE holds them (deploy.build_config writes this)
        try:
            entries = json.loads(text)
        except ValueError as exc:
            raise ValueError(f"MODELS: not a valid JSON list of model entries ({exc})") from None
        return _models_from_entries(settings, entries, "MODELS")
    configs = []
    for pair in filter(None, (p.strip() for p in text.split(","))):
        name, sep, model_id = pair.partition("=")
        if not sep or not name.strip() or not model_id.strip():
            raise ValueError(f"MODELS: expected name=model_id pairs separated by commas, got {pair!r}")
        where = f"MODELS: model {name.strip()!r}"
        configs.append(_model_from_entry(settings, {"name": name.strip(), "model_id": model_id.strip()}, where))
    if not configs:
        raise ValueError("MODELS lists no model")
    return tuple(configs)


def _models_from_file(settings: Settings, path: Path) -> tuple[ModelConfig, ...]:
    import yaml  # JSON is YAML too

    where = f"MODELS_FILE {str(path)!r}"
    try:
        data = yaml.safe_load(path.expanduser().read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"{where}: cannot read it as YAML or JSON ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("models"), list) or not data["models"]:
        raise ValueError(f"{where}: expected a mapping with a non-empty `models:` list")
    return _models_from_entries(settings, data["models"], where)


def _models_from_entries(settings: Settings, entries: Any, where: str) -> tuple[ModelConfig, ...]:
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{where}: expected a non-empty list of model entries")
    configs = []
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: entry {index} is not a mapping")
        label = f"{where}: model {entry.get('name', f'#{index}')!r}"
        if "model_id" not in entry:  # never the embedded default by omission
            raise ValueError(f"{label}: model_id: field required")
        configs.append(_model_from_entry(settings, entry, label))
    return tuple(configs)


def _read_keys(api_key: SecretStr | None, keys_file: Path | None) -> tuple[SecretStr, ...]:
    keys: list[str] = []
    if api_key is not None:
        keys += [k.strip() for k in api_key.get_secret_value().split(",") if k.strip()]
        if not keys:
            raise ValueError("API_KEY holds no key (only commas or spaces); unset it to leave the service open")
    if keys_file is not None:
        lines = [line.strip() for line in keys_file.expanduser().read_text().splitlines()]
        from_file = [line for line in lines if line and not line.startswith("#")]
        if not from_file:
            raise ValueError(f"API_KEYS_FILE {str(keys_file)!r} holds no key")
        keys += from_file
    for key in keys:
        if any(ch.isspace() for ch in key) or len(key) < 8:
            # The key itself is never shown: only where it came from.
            raise ValueError("every API key must be at least 8 characters without spaces (API_KEY / API_KEYS_FILE)")
    return tuple(SecretStr(k) for k in dict.fromkeys(keys))


def env_name(field: str) -> str:
    """The environment variable a field is read from."""
    return field.upper()


def _describe(error: Mapping[str, Any], env: bool = True) -> str:
    loc = [str(part) for part in error.get("loc", ()) if part != "__root__"]
    message = str(error.get("msg", "invalid value"))
    message = message.removeprefix("Value error, ")
    if not loc:
        return message
    field = loc[0].lower()
    name = env_name(field) if env else field
    value = error.get("input")
    secret = field in SECRET_FIELDS
    shown = (
        f", got {value!r}"
        if not secret and isinstance(value, str | int | float | bool) and repr(value) not in message
        else ""
    )
    return f"{name}: {message[:1].lower()}{message[1:]}{shown}"


def _check_aliases(environ: Mapping[str, str]) -> None:
    upper = {key.upper(): value for key, value in environ.items()}
    primary, alias = upper.get("IDLE_TIMEOUT_S"), upper.get(IDLE_TIMEOUT_ALIAS)
    if primary is not None and alias is not None and primary.strip() != alias.strip():
        raise SettingsError(
            f"IDLE_TIMEOUT_S ({primary!r}) and its alias {IDLE_TIMEOUT_ALIAS} ({alias!r}) disagree; set one"
        )


def build_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Settings from ``environ`` (default ``os.environ``); raises SettingsError naming each bad variable."""
    environ = os.environ if environ is None else environ
    _check_aliases(environ)
    token = _ENVIRON.set(environ)
    try:
        return Settings()
    except ValidationError as exc:
        lines = [_describe(error) for error in exc.errors(include_url=False)]
        raise SettingsError("invalid settings:\n  " + "\n  ".join(lines)) from None
    finally:
        _ENVIRON.reset(token)


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Like :func:`build_settings`, but a bad setting ends the process with a non-zero exit code."""
    try:
        return build_settings(environ)
    except SettingsError as exc:
        sys.exit(f"error: {exc}")
