"""Today's model deployment (``serving.generator.Generator``) as a pool model, until ModelServer lands.

Two functions the pool controller reaches by import path (``PoolSettings.app_factory`` and
``entry_parser``): one validates a model entry into a ``ModelSpec``, the other builds the model's
Serve application. Both read per-model settings with today's ``settings.Settings``; with the
per-model ``ModelConfig`` they become a few lines over it.

The wrapper deployment adds what the pool needs from a model replica and Generator does not do
yet: it reports its cold-start phases to the pool controller as they complete (read from the
Generator's own phase timer by a watcher thread) and its first generation.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError
from ray import serve
from ray.serve import Application

from serving.generator import Generator, _process_start_time
from serving.pool.errors import ModelValidationError
from serving.pool.reporter import PhaseReporter
from serving.pool.spec import ModelSpec, check_name, pooled_autoscaling_config
from settings import Settings

# The engine times config and tokenizer loading apart; the API's phase list folds them into model_code.
_PHASES = {"imports": ("imports",), "model_code": ("config", "tokenizer", "model_code"), "weights": ("weights",)}
_PHASES |= {"warmup": ("warmup",)}


def spec_from_entry(entry: Mapping[str, Any], defaults: Mapping[str, Any] | None = None) -> ModelSpec:
    """A ``MODELS_FILE`` entry or admin load body, over the per-model defaults, validated.

    >>> spec = spec_from_entry({"name": "mini", "priority": 1, "max_replicas": 3})
    >>> spec.name, spec.priority, spec.max_replicas, spec.resources
    ('mini', 1, 3, {'CPU': 1.0, 'GPU': 0.0})
    >>> try:
    ...     spec_from_entry({"name": "mini", "max_replicas": "lots"})
    ... except ModelValidationError as exc:
    ...     print(exc.field)
    max_replicas
    """
    values = dict(entry)
    name = values.pop("name", None)
    if name is None:
        raise ModelValidationError("name", "is required")
    check_name(name)
    priority = values.pop("priority", 0)
    if not isinstance(priority, int) or isinstance(priority, bool) or priority < 0:
        raise ModelValidationError("priority", f"must be an integer >= 0, got {priority!r}")
    for key in values:
        if key not in Settings.model_fields:
            raise ModelValidationError(key, "unknown field")
    try:
        settings = Settings.model_validate({**(defaults or {}), **values})
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        field = str(error["loc"][0]) if error.get("loc") else "config"
        raise ModelValidationError(field, str(error["msg"]).removeprefix("Value error, ")) from None
    return ModelSpec(
        name=name,
        model_id=settings.model_id,
        priority=priority,
        min_replicas=settings.min_replicas,
        max_replicas=settings.max_replicas,
        resources={"CPU": settings.num_cpus_per_replica, "GPU": settings.num_gpus_per_replica},
        config=settings.model_dump(mode="json", exclude_none=True),
    )


def generator_app(spec: ModelSpec, pool: str) -> Application:
    """The model's Serve application: the Generator under the pool's autoscaling policy."""
    settings = Settings.model_validate(spec.config)
    options = settings.generator_options()
    autoscaling = pooled_autoscaling_config(options["autoscaling_config"], pool, spec.name)
    options["autoscaling_config"] = autoscaling | {"max_replicas": spec.max_replicas}
    return ReportingGenerator.options(**options).bind(settings, pool, spec.name)


class _ReportingGenerator(Generator.func_or_class):
    def __init__(self, settings: Settings, pool: str, model: str) -> None:
        self._reporter = PhaseReporter(pool, model)
        started = _process_start_time()
        self._reporter.phase("process_start", round(time.time() - started, 4) if started else None)
        done = threading.Event()
        watcher = threading.Thread(target=self._watch, args=(done,), name="report-phases", daemon=True)
        watcher.start()
        try:
            super().__init__(settings)
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

    async def generate(self, prompts, params):
        reply = await super().generate(prompts, params)
        if reply.cold_start is not None:
            self._reporter.phase("first_generation", reply.cold_start.get("first_generation_s"))
        return reply


ReportingGenerator = serve.deployment(_ReportingGenerator, name="Generator")
