"""The service's models as pool models: ``ModelConfig`` in, ``ModelSpec`` and Serve applications out.

The graph (``ray_serve_app``) hands ``MODEL_APPS`` to the pool controller, so that the controller
knows nothing of the settings or of the model server, and nothing imports back.

The model server is ``ModelServer``, which reports its start-up phases to the pool controller as
they end.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError
from ray.serve import Application

from serving import warm_pool
from serving.model_server import ModelServer
from serving.pool.errors import ModelValidationError
from serving.pool.spec import ModelApps, ModelSpec, PoolSettings, pooled_autoscaling_config
from settings import MODEL_FIELDS, ModelConfig, Settings


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
    return ModelConfig.from_stored(config).public()


def model_app(spec: ModelSpec, pool: PoolSettings) -> Application:
    """The model's Serve application: the ModelServer under the pool's autoscaling policy."""
    config = ModelConfig.from_stored(spec.config)
    options = config.deployment_options(pool.log_level)
    autoscaling = pooled_autoscaling_config(options["autoscaling_config"], pool.pool, spec.app, config.idle_hold_s)
    options["autoscaling_config"] = autoscaling | {"max_replicas": spec.max_replicas}
    # start replicas in warm workers
    options = warm_pool.model_options(options, config.warm_workers, config.warm_worker_orphan_s)
    return ModelServer.options(**options).bind(config, pool.pool)


MODEL_APPS = ModelApps(app=model_app, spec_from_entry=spec_from_entry, public_config=public_config)
