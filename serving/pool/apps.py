"""The service's models as pool models: ``ModelConfig`` in, ``ModelSpec`` and Serve applications out.

The pool controller reaches these by import path (``PoolSettings.entry_parser``, ``app_factory`` and
``config_view``), so that it knows nothing of the settings or of the model server. ``pool_graph``
builds the controller from the service settings, for ``ray_serve_app``.

The model server is ``ModelServer``, wrapped to report what the pool needs from a model replica
and ModelServer does not report by itself: its cold-start phases as they complete (read from its
phase timer by a watcher thread) and its first generation.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError
from ray import serve
from ray.serve import Application

from serving.model_server import ModelServer, _process_start_time
from serving.pool.controller import PoolController
from serving.pool.errors import ModelValidationError
from serving.pool.reporter import PhaseReporter
from serving.pool.spec import ModelSpec, PoolSettings, pooled_autoscaling_config
from settings import MODEL_FIELDS, ModelConfig, Settings

# The engine times config and tokenizer loading apart; the API's phase list folds them into model_code.
_PHASES = {"imports": ("imports",), "model_code": ("config", "tokenizer", "model_code"), "weights": ("weights",)}
_PHASES |= {"warmup": ("warmup",)}


def model_defaults(settings: Settings) -> dict[str, Any]:
    """The per-model values of the environment: what an admin-loaded entry starts from (JSON)."""
    return settings.model_dump(mode="json", include=set(MODEL_FIELDS))


def spec_of(config: ModelConfig) -> ModelSpec:
    return ModelSpec(
        name=config.name,
        model_id=config.model_id,
        app=config.deployment_name,
        priority=config.priority,
        min_replicas=config.min_replicas,
        max_replicas=config.max_replicas,
        resources={"CPU": config.num_cpus_per_replica, "GPU": config.num_gpus_per_replica},
        config=config.model_dump(mode="json"),
    )


def spec_from_entry(entry: Mapping[str, Any], defaults: Mapping[str, Any] | None = None) -> ModelSpec:
    """A ``MODELS_FILE`` entry or admin load body, over the per-model defaults, validated.

    >>> spec = spec_from_entry({"name": "org/mini", "priority": 1, "max_replicas": 3})
    >>> spec.name, spec.app, spec.priority, spec.max_replicas, spec.resources
    ('org/mini', 'org--mini', 1, 3, {'CPU': 1.0, 'GPU': 0.0})
    >>> try:
    ...     spec_from_entry({"name": "mini", "max_replicas": "lots"})
    ... except ModelValidationError as exc:
    ...     print(exc.field)
    max_replicas
    """
    try:
        config = ModelConfig.model_validate({**(defaults or {}), **entry})
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        field = str(error["loc"][0]) if error.get("loc") else "entry"
        message = str(error["msg"]).removeprefix("Value error, ")
        raise ModelValidationError(field, message[:1].lower() + message[1:]) from None
    return spec_of(config)


def public_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """A model's configuration as /admin shows it."""
    return ModelConfig.model_validate(config).public()


def pool_graph(settings: Settings, pool: str = "llm") -> Application:
    """The pool controller for the service's settings (bind it to the Gateway in the graph)."""
    pool_settings = PoolSettings(
        pool=pool,
        keep_hot_priority=settings.keep_hot_priority,
        eviction_grace_s=settings.eviction_grace_s,
        scale_to_zero_at=settings.scale_to_zero_at,
        request_timeout_s=settings.request_timeout_s,
        retry_after_s=settings.retry_after_s,
        log_level=settings.log_level,
    )
    specs = [spec_of(config) for config in settings.model_configs]
    return PoolController.bind(pool_settings, specs, model_defaults(settings))


def generator_app(spec: ModelSpec, pool: PoolSettings) -> Application:
    """The model's Serve application: the ModelServer under the pool's autoscaling policy."""
    config = ModelConfig.model_validate(spec.config)
    options = config.deployment_options(pool.log_level)
    autoscaling = pooled_autoscaling_config(options["autoscaling_config"], pool.pool, spec.app)
    options["autoscaling_config"] = autoscaling | {"max_replicas": spec.max_replicas}
    return ReportingGenerator.options(**options).bind(config, pool.pool, spec.name)


class _ReportingGenerator(ModelServer.func_or_class):
    def __init__(self, config: ModelConfig, pool: str, model: str) -> None:
        self._reporter = PhaseReporter(pool, model)
        started = _process_start_time()
        self._reporter.phase("process_start", round(time.time() - started, 4) if started else None)
        done = threading.Event()
        watcher = threading.Thread(target=self._watch, args=(done,), name="report-phases", daemon=True)
        watcher.start()
        try:
            super().__init__(config)
        finally:
            done.set()
            watcher.join()

    def _watch(self, done: threading.Event) -> None:
        sent: set[str] = set()
        while True:
            finished = done.wait(0.1)
            timer = getattr(self, "_timer", None)
            phases = dict(timer.phases) if timer is not None else {}
            for name, parts in _PHASES.items():
                if name not in sent and parts[-1] in phases:
                    sent.add(name)
                    self._reporter.phase(name, round(sum(phases.get(part, 0.0) for part in parts), 4))
            if finished:
                return

    def _first_generation_done(self, report: dict[str, Any]) -> None:
        self._reporter.phase("first_generation", report.get("first_generation_s"))


ReportingGenerator = serve.deployment(_ReportingGenerator, name="ModelServer")
