"""What the pool knows of a model (``ModelSpec``) and of itself (``PoolSettings``); plain data, no Ray.

``ModelSpec`` is the pool's view of a per-model configuration: the few fields it decides with, plus
the whole configuration as JSON (``config``), which it stores and hands back to the app factory that
builds the model's Serve application. It is JSON all the way, so that it can live in Ray's GCS store.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from serving.pool.errors import ModelValidationError
from settings import NAME_PATTERN, DailyTime

POLICY_PATH = "serving.pool.policy:PoolAutoscalingPolicy"
_NAME = re.compile(NAME_PATTERN)

Resources = Mapping[str, float]


@dataclass(frozen=True)
class ModelSpec:
    """One model of the pool.

    >>> spec = ModelSpec("mini", model_id="/models/mini", priority=2, resources={"CPU": 1.0})
    >>> ModelSpec.from_json(spec.to_json()) == spec
    True
    """

    name: str  # the id clients send as `model`
    model_id: str
    app: str = ""  # its Serve application (and deployment) name; "" means the model's name
    priority: int = 0
    min_replicas: int = 0
    max_replicas: int = 1
    resources: Mapping[str, float] = field(default_factory=dict)  # one replica's Ray resources
    config: Mapping[str, Any] = field(default_factory=dict)  # the full per-model configuration (JSON)

    def __post_init__(self) -> None:
        check_bounds(self.priority, self.min_replicas, self.max_replicas)
        check_name(self.name)
        if not self.app:
            object.__setattr__(self, "app", self.name)

    def to_json(self) -> dict[str, Any]:
        return asdict(self) | {"resources": dict(self.resources), "config": dict(self.config)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ModelSpec:
        return cls(**data)

    def with_overrides(self, **changes: Any) -> ModelSpec:
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


@dataclass(frozen=True)
class PoolSettings:
    """Service-level settings of the pool (from the environment, via the service settings).

    >>> str(PoolSettings(scale_to_zero_at="21:00 America/Chicago").daily)
    '21:00 America/Chicago'
    """

    pool: str = "llm"  # the main application's name (the controller sets it): prefixes the pool's keys
    keep_hot_priority: int = 2  # KEEP_HOT_PRIORITY
    eviction_grace_s: float = 30.0  # EVICTION_GRACE_S
    scale_to_zero_at: str | None = None  # SCALE_TO_ZERO_AT
    request_timeout_s: float = 300.0  # REQUEST_TIMEOUT_S: the longest wait for room
    retry_after_s: int = 5  # Retry-After when no room came in time
    loop_interval_s: float = 0.5  # how often the controller observes Serve and decides
    log_level: str = "INFO"  # LOG_LEVEL, for the model deployments the pool deploys
    admin_allow_remote_code: bool = False  # ADMIN_ALLOW_REMOTE_CODE: may /admin load trust_remote_code models
    admin_models: tuple[str, ...] = ()  # ADMIN_MODELS: model id patterns /admin may load (empty: any)

    def __post_init__(self) -> None:
        if self.keep_hot_priority < 0:
            raise ValueError(f"KEEP_HOT_PRIORITY must be at least 0, got {self.keep_hot_priority}")
        if not self.eviction_grace_s >= 0:
            raise ValueError(f"EVICTION_GRACE_S must be >= 0, got {self.eviction_grace_s}")
        if self.scale_to_zero_at is not None:
            try:
                DailyTime.parse(self.scale_to_zero_at)
            except ValueError as exc:
                raise ValueError(f"SCALE_TO_ZERO_AT: {exc}") from None

    @property
    def daily(self) -> DailyTime | None:
        return None if self.scale_to_zero_at is None else DailyTime.parse(self.scale_to_zero_at)


@dataclass(frozen=True)
class ModelApps:
    """What the pool needs from the service's models, handed to the controller (``serving.pool.apps.MODEL_APPS``).

    The pool knows nothing of the settings or of the model server: the graph passes these in.
    """

    app: Callable[[ModelSpec, PoolSettings], Any]  # (spec, pool settings) -> the model's serve.Application
    spec_from_entry: Callable[[Mapping[str, Any], Mapping[str, Any]], ModelSpec]  # an /admin load -> ModelSpec
    public_config: Callable[[Mapping[str, Any]], dict[str, Any]]  # spec.config -> what /admin shows


def check_name(name: str) -> None:
    if not isinstance(name, str) or not _NAME.match(name):
        raise ModelValidationError(
            "name",
            f"must be 1-128 characters of letters, digits and . _ : / - (starting with one of the first two), "
            f"got {name!r}",
        )


def check_bounds(priority: int, min_replicas: int, max_replicas: int) -> None:
    lows = (("priority", priority, 0), ("min_replicas", min_replicas, 0), ("max_replicas", max_replicas, 1))
    for name, value, low in lows:
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ModelValidationError(name, f"must be an integer >= {low}, got {value!r}")
    if max_replicas < min_replicas:
        message = f"must be at least min_replicas ({min_replicas}), got {max_replicas}"
        raise ModelValidationError("max_replicas", message)


def fits(need: Resources, available: Resources) -> bool:
    """Whether ``available`` covers ``need`` (resource names as Ray spells them: CPU, GPU, memory, ...).

    >>> fits({"CPU": 1, "GPU": 0}, {"CPU": 1.0}), fits({"GPU": 1}, {"CPU": 8})
    (True, False)
    """
    return all(available.get(name, 0.0) + 1e-9 >= amount for name, amount in need.items() if amount > 0)


def per_node(free: Resources | Mapping[str, Resources]) -> dict[str, dict[str, float]]:
    """Free resources by node; a flat mapping (one node, or tests) is one node named ``cluster``.

    >>> per_node({"CPU": 2.0}), per_node({"n1": {"CPU": 1.0}})
    ({'cluster': {'CPU': 2.0}}, {'n1': {'CPU': 1.0}})
    """
    if all(isinstance(value, Mapping) for value in free.values()) and free:
        return {node: dict(resources) for node, resources in free.items()}  # type: ignore[union-attr]
    return {"cluster": dict(free)}  # type: ignore[arg-type]


def fits_on_a_node(need: Resources, nodes: Mapping[str, Resources]) -> bool:
    """Whether one node has room for ``need``: a replica cannot span nodes.

    >>> fits_on_a_node({"CPU": 2}, {"n1": {"CPU": 1.0}, "n2": {"CPU": 1.0}})  # two free CPUs, on two nodes
    False
    >>> fits_on_a_node({"CPU": 2}, {"n1": {"CPU": 1.0}, "n2": {"CPU": 2.0}})
    True
    """
    return any(fits(need, available) for available in nodes.values())


def add(a: Resources, b: Resources, times: float = 1) -> dict[str, float]:
    out = dict(a)
    for name, amount in b.items():
        out[name] = out.get(name, 0.0) + amount * times
    return out


def pooled_autoscaling_config(
    base: Mapping[str, Any], pool: str, model: str, idle_hold_s: float | None = None
) -> dict[str, Any]:
    """A model's Serve ``autoscaling_config`` handed to the pool's policy.

    The floor (MIN_REPLICAS, keep-hot) moves into the policy's directive, so that an eviction or
    SCALE_TO_ZERO_AT can take the model to zero; the idle timeout (``ModelConfig.idle_hold_s``, else
    what ``base`` gave Serve as its 1 -> 0 delay) moves into the policy, so that Serve's own delay
    (now 0) never holds up an eviction.

    >>> base = {"min_replicas": 1, "max_replicas": 2, "downscale_to_zero_delay_s": 54}
    >>> cfg = pooled_autoscaling_config(base, "llm", "m")
    >>> cfg["min_replicas"], cfg["downscale_to_zero_delay_s"], cfg["policy"]["policy_kwargs"]["idle_hold_s"]
    (0, 0.0, 54.0)
    """
    config = {key: value for key, value in base.items() if key not in ("initial_replicas", "policy")}
    idle_hold = idle_hold_s if idle_hold_s is not None else base.get("downscale_to_zero_delay_s")
    if idle_hold is None:
        idle_hold = base.get("downscale_delay_s", 600.0)
    if not math.isfinite(float(idle_hold)):
        raise ValueError(f"idle hold of {model} must be finite, got {idle_hold}")
    config.update(
        min_replicas=0,
        downscale_to_zero_delay_s=0.0,
        policy={
            "policy_function": POLICY_PATH,
            "policy_kwargs": {"pool": pool, "model": model, "idle_hold_s": float(idle_hold)},
        },
    )
    return config
