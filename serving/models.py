"""The model view the whole service shares: a config, a status, and the card rendered from them.

- config: ``settings.ModelConfig``, validated once where it is written (the settings, a MODELS_FILE
  entry, an /admin load) and read back as data (``ModelConfig.from_stored``), never validated again.
- status: :class:`ModelStatus` with one state enum (:class:`ModelState`); the pool controller
  returns it, the Gateway lists and probes it.
- card: :meth:`ModelStatus.card`, the OpenAI model object (``/v1/models``, ``/healthz``).

Plain data, no Ray and no HTTP, so the pool, the Gateway and the tests' fakes all import it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from serving.pool.errors import ModelRequiredError, UnknownModelError, WrongTaskError
from settings import ModelConfig


class ModelState(StrEnum):
    """Where a model is between zero and serving (a ``str``: it compares and serialises as its value)."""

    RUNNING = "running"
    STARTING = "starting"
    SCALED_TO_ZERO = "scaled_to_zero"
    EVICTED = "evicted"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class ModelStatus:
    """A model's state as the pool controller reports it; reading it never wakes the model.

    >>> status = ModelStatus("mini", "/models/mini", ModelState.SCALED_TO_ZERO, max_replicas=2)
    >>> status.card()["state"], status.card()["replicas"]
    ('scaled_to_zero', {'running': 0, 'starting': 0, 'min': 0, 'max': 2})
    """

    name: str
    model_id: str
    state: ModelState
    task: str = "generate"  # generate or embed: which routes serve the model
    running: int = 0
    starting: int = 0
    min_replicas: int = 0
    max_replicas: int = 1
    priority: int = 0
    created: int = 0
    last_cold_start: dict[str, Any] | None = None
    waking: dict[str, Any] | None = None
    # The pool's side (not in the card): may requests go to the model's handle now, does it wait for
    # room on the cluster, and where Serve runs it.
    admitted: bool = True
    waiting_for_room: bool = False
    app: str = ""
    deployment: str | None = None

    def card(self) -> dict[str, Any]:
        """The model as an OpenAI model object, with its state (``/v1/models``, ``/healthz``)."""
        return {
            "id": self.name,
            "object": "model",
            "created": self.created,
            "owned_by": "llm-serve",
            "root": self.model_id,
            "task": self.task,
            "routes": list(routes_of(self.task)),
            "state": str(self.state),
            "replicas": {
                "running": self.running,
                "starting": self.starting,
                "min": self.min_replicas,
                "max": self.max_replicas,
            },
            "priority": self.priority,
            "last_cold_start": self.last_cold_start,
            "waking": self.waking,
            # Where the last started replica put the weights (devices, bytes each, dtype, quantization).
            "placement": ((self.last_cold_start or {}).get("details") or {}).get("placement"),
        }

    def admin_view(self) -> dict[str, Any]:
        """The card plus the pool's side, as ``/admin`` shows it."""
        pool = {"admitted": self.admitted, "waiting_for_room": self.waiting_for_room, "app": self.app}
        return self.card() | pool | {"deployment": self.deployment}


TASK_ROUTES = {
    "generate": ("/v1/completions", "/v1/chat/completions", "/generate"),
    "embed": ("/v1/embeddings",),
}


def routes_of(task: str) -> tuple[str, ...]:
    """The routes that serve a model of ``task`` (``generate`` or ``embed``)."""
    return TASK_ROUTES[task]


def check_route(model: ModelConfig, route: str) -> None:
    """Raise ``WrongTaskError`` when ``model`` is not served by ``route`` (an embedding model on /generate...)."""
    if route not in routes_of(model.task):
        served = ", ".join(routes_of(model.task))
        what = "an embedding model" if model.task == "embed" else "a text generation model"
        raise WrongTaskError(
            f"model {model.name!r} is {what} (task {model.task}); it is served by {served}, not {route}"
        )


def resolve_model(models: Sequence[ModelConfig], requested: str | None) -> ModelConfig:
    """The model a request names by its served name or MODEL_ID (None: the only one).

    Raises ``ModelRequiredError`` (several served, none named) or ``UnknownModelError``.
    """
    served = [m.name for m in models]
    if requested is None:
        if len(models) == 1:
            return models[0]
        raise ModelRequiredError(served)
    for model in models:
        if model.accepts(requested):
            return model
    raise UnknownModelError(
        requested, served, f"the model {requested!r} does not exist; this service serves: {', '.join(served)}"
    )
