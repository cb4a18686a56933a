"""Service settings: read once from the environment, validated, translated to Ray's options.

Every field maps to an upper-case environment variable of the same name (``max_new_tokens`` is read
from ``MAX_NEW_TOKENS``). Build them with :func:`load_settings`, which turns pydantic's errors into
messages that name the variable, and stops the process on a bad value::

    settings = load_settings()                      # reads os.environ, exits non-zero if invalid
    settings = load_settings({"MAX_REPLICAS": "4"}) # or from a mapping (tests, tools)

Two kinds of settings: what belongs to the service (HTTP, keys, limits at the edge, the pool's
rules; this module) and what belongs to a model (:class:`ModelConfig`: checkpoint, generation
defaults, resources, replicas; ``config/model_fields.py`` and ``config/model.py``). The per-model
variables are the defaults of every model; ``MODELS`` or ``MODELS_FILE`` list several models, each
overriding what it names (``config/models_file.py``). ``settings.model_configs`` holds the result,
one ``ModelConfig`` per served model, each building its own Ray options.

This module is the facade: everything a caller needs imports from here, whatever module of
``config/`` defines it (key files: ``config/keys.py``; error wording: ``config/errors.py``; the
daily schedule: ``config/schedule.py``).

The graph (``ray_serve_app.py``) builds the settings once and hands them to the deployments through
their options and bind arguments, so replicas never read the environment themselves.
"""

from __future__ import annotations

import contextvars
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, PrivateAttr, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, EnvSettingsSource, SettingsConfigDict
from pydantic_settings.sources.utils import parse_env_vars

from config.errors import SECRET_FIELDS, SettingsError, check_aliases, describe, env_name
from config.keys import check_admin_key_is_not_a_user_key, read_admin_key, read_keys
from config.model import DRAIN_CHECK_S, NAME_PATTERN, ModelConfig, default_served_name
from config.model_fields import (
    DEFAULT_MODEL_DIR,
    IDLE_TIMEOUT_ALIAS,
    MODEL_FIELDS,
    REPO_ROOT,
    ModelFields,
    is_local_path,
)
from config.models_file import model_configs
from config.schedule import DailyTime

__all__ = [
    "ADMIN_HEADROOM",
    "DEFAULT_MODEL_DIR",
    "IDLE_TIMEOUT_ALIAS",
    "MODEL_FIELDS",
    "NAME_PATTERN",
    "REPO_ROOT",
    "SECRET_FIELDS",
    "DailyTime",
    "ModelConfig",
    "ModelFields",
    "Settings",
    "SettingsError",
    "build_settings",
    "default_served_name",
    "env_name",
    "is_local_path",
    "load_settings",
]

# Requests the Gateway holds beyond what the configured models accept: models loaded through
# /admin, and requests waiting at the pool for room.
ADMIN_HEADROOM = 256
_ENVIRON: contextvars.ContextVar[Mapping[str, str] | None] = contextvars.ContextVar("environ", default=None)


class _MappingEnvSource(EnvSettingsSource):
    """pydantic-settings' own environment source, reading a given mapping instead of os.environ."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        self._environ = environ
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return parse_env_vars(self._environ, self.case_sensitive, self.env_ignore_empty, self.env_parse_none_str)


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
    max_output_tokens_per_request: int = Field(
        default=32_768,
        ge=1,
        description="Output budget of one request: completions x max tokens x (1 + log-probability alternatives "
        "per token); more: 400 naming it. Bounds the Gateway's work and memory for one answer.",
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
        default=None,
        description="Key for the /admin API (Bearer): at least 8 characters without spaces (surrounding "
        "whitespace stripped), none of the API keys. Unset: /admin answers 404.",
    )

    admin_allow_remote_code: bool = Field(
        default=False,
        description="Whether /admin may load a model with trust_remote_code (its checkpoint's own Python code runs "
        "on a worker). Off: such a load is refused (422 naming trust_remote_code).",
    )
    admin_models: str | None = Field(
        default=None,
        min_length=1,
        description="Comma-separated shell-style patterns of the model ids /admin may load: hub ids "
        "('HuggingFaceTB/*') and directories ('/models/*'). Unset: any model id.",
    )
    docs_need_key: bool = Field(
        default=True,
        description="With API keys set, /docs, /redoc and /openapi.json need a key too (false: open, as without "
        "keys). They list every route, /admin included.",
    )
    auth_failure_delay_s: float = Field(
        default=0.5,
        ge=0,
        le=10,
        description="A request refused for its key (401) is answered this much later, nothing read or computed "
        "meanwhile: a client that retries without a valid key in a loop, or guesses keys, sends a few requests a "
        "second instead of hundreds. 0: at once.",
    )
    auth_failure_max_held: int = Field(
        default=256,
        ge=0,
        le=100_000,
        description="Most refusals held back at once (AUTH_FAILURE_DELAY_S); past it, refusals are answered at "
        "once. The Gateway's max_ongoing_requests has this much added, so held refusals never take the room of "
        "requests with a key.",
    )
    gateway_node_label: str | None = Field(
        default=None,
        description="A Ray node label 'key=value': the Gateway and the pool controller (and Serve's task that "
        "imports the graph, which reads the keys) run only on nodes that have it. On KubeRay, the head pod's label: "
        "the only pod given the keys. Unset: any node.",
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

    @field_validator("admin_api_key")
    @classmethod
    def _admin_key(cls, value: SecretStr | None) -> SecretStr | None:
        return None if value is None else read_admin_key(value)

    @field_validator("admin_models")
    @classmethod
    def _admin_models(cls, value: str | None) -> str | None:
        if value is not None and not [p for p in value.split(",") if p.strip()]:
            raise ValueError("holds no pattern (only commas or spaces); unset it to let /admin load any model id")
        return value

    @property
    def admin_model_patterns(self) -> tuple[str, ...]:
        return tuple(p.strip() for p in (self.admin_models or "").split(",") if p.strip())

    @field_validator("gateway_node_label")
    @classmethod
    def _node_label(cls, value: str | None) -> str | None:
        if value is None:
            return None
        key, sep, label = value.strip().partition("=")
        if not sep or not key or not label:
            raise ValueError(f"expected 'key=value' (a Ray node label, e.g. 'llm-serve/role=gateway'), got {value!r}")
        from ray._private.label_utils import validate_label_key, validate_label_value

        if problem := validate_label_key(key):
            raise ValueError(problem)
        validate_label_value(label)  # raises ValueError with Ray's wording
        return f"{key}={label}"

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
        self._model_configs = model_configs(
            {name: getattr(self, name) for name in MODEL_FIELDS},
            model_id=self.model_id,
            served_model_name=self.served_model_name,
            models=self.models,
            models_file=self.models_file,
        )
        budget = self.max_output_tokens_per_request
        for model in self._model_configs:
            if model.max_new_tokens_limit > budget:
                raise ValueError(
                    f"MAX_OUTPUT_TOKENS_PER_REQUEST ({budget}) is below model {model.name!r}'s "
                    f"MAX_NEW_TOKENS_LIMIT ({model.max_new_tokens_limit}): a request at the limit would be refused"
                )
        self._api_keys = read_keys(self.api_key, self.api_keys_file)
        if self.admin_api_key is not None:
            check_admin_key_is_not_a_user_key(self.admin_api_key, self._api_keys)
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

    def control_actor_options(self) -> dict[str, Any]:
        """``ray_actor_options`` of the Gateway and the pool controller: no CPU, on GATEWAY_NODE_LABEL's nodes.

        Serve imports the graph (and so reads the keys) on the nodes that every deployment's label
        selector names, when they all name the same; so the keys are needed only there."""
        if self.gateway_node_label is None:
            return {"num_cpus": 0}
        key, _, value = self.gateway_node_label.partition("=")
        return {"num_cpus": 0, "label_selector": {key: value}}

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
            # Plus room for models loaded through /admin, for requests waiting at the pool for room, and
            # for refusals held back (AUTH_FAILURE_DELAY_S).
            "max_ongoing_requests": capacity + ADMIN_HEADROOM + self.auth_failure_max_held,
            "ray_actor_options": self.control_actor_options(),
            "graceful_shutdown_timeout_s": max(m.graceful_shutdown_timeout_s for m in self._model_configs),
            "graceful_shutdown_wait_loop_s": DRAIN_CHECK_S,
            # The Gateway's own access line (serving/api/access.py) records every request; Serve's would
            # repeat it, at a cost per request that a keyless flood multiplies.
            "logging_config": {"log_level": self.log_level, "enable_access_log": False},
        }

    def env_vars(self) -> dict[str, str]:
        """The settings as environment variables, secrets left out (see deploy/)."""
        out = {}
        for name, value in self.model_dump(exclude=set(SECRET_FIELDS)).items():
            if value is None:
                continue
            out[name.upper()] = str(value).lower() if isinstance(value, bool) else str(value)
        return out


def build_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Settings from ``environ`` (default ``os.environ``); raises SettingsError naming each bad variable."""
    environ = os.environ if environ is None else environ
    check_aliases(environ)
    token = _ENVIRON.set(environ)
    try:
        return Settings()
    except ValidationError as exc:
        lines = [describe(error) for error in exc.errors(include_url=False)]
        raise SettingsError("invalid settings:\n  " + "\n  ".join(lines)) from None
    finally:
        _ENVIRON.reset(token)


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Like :func:`build_settings`, but a bad setting ends the process with a non-zero exit code."""
    try:
        return build_settings(environ)
    except SettingsError as exc:
        sys.exit(f"error: {exc}")
