"""The served models: ``MODEL_ID`` (one), ``MODELS`` (name=model_id pairs or JSON) or ``MODELS_FILE`` (YAML).

Each entry starts from the per-model values of the environment (``defaults``) and is validated
once, here, into a :class:`ModelConfig`; an error names the entry and the field.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from config.errors import describe
from config.model import ModelConfig, default_served_name


def model_configs(
    defaults: Mapping[str, Any],
    *,
    model_id: str,
    served_model_name: str | None = None,
    models: str | None = None,
    models_file: Path | None = None,
) -> tuple[ModelConfig, ...]:
    """Every served model, validated, with unique names and deployments (ValueError otherwise)."""
    if models is not None:
        configs, where = _models_from_pairs(defaults, models), "MODELS"
    elif models_file is not None:
        configs, where = _models_from_file(defaults, models_file), f"MODELS_FILE {str(models_file)!r}"
    else:
        name = served_model_name or default_served_name(model_id)
        configs, where = (_model_from_entry(defaults, {"name": name, "model_id": model_id}, "MODEL_ID"),), "MODEL_ID"
    names = [c.name for c in configs]
    deployments = [c.deployment_name for c in configs]
    duplicates = sorted({n for n in names if names.count(n) > 1} | {d for d in deployments if deployments.count(d) > 1})
    if duplicates:
        raise ValueError(f"{where}: model names must be unique; repeated: {', '.join(duplicates)}")
    return configs


def _model_from_entry(defaults: Mapping[str, Any], entry: Mapping[str, Any], where: str) -> ModelConfig:
    try:
        return ModelConfig.model_validate({**defaults, **entry})
    except ValidationError as exc:
        lines = [describe(error, env=False) for error in exc.errors(include_url=False)]
        raise ValueError(f"{where}: " + "; ".join(lines)) from None


def _models_from_pairs(defaults: Mapping[str, Any], text: str) -> tuple[ModelConfig, ...]:
    if text.lstrip().startswith("["):  # entries as a MODELS_FILE holds them (deploy.build_config writes this)
        try:
            entries = json.loads(text)
        except ValueError as exc:
            raise ValueError(f"MODELS: not a valid JSON list of model entries ({exc})") from None
        return _models_from_entries(defaults, entries, "MODELS")
    configs = []
    for pair in filter(None, (p.strip() for p in text.split(","))):
        name, sep, model_id = pair.partition("=")
        if not sep or not name.strip() or not model_id.strip():
            raise ValueError(f"MODELS: expected name=model_id pairs separated by commas, got {pair!r}")
        where = f"MODELS: model {name.strip()!r}"
        configs.append(_model_from_entry(defaults, {"name": name.strip(), "model_id": model_id.strip()}, where))
    if not configs:
        raise ValueError("MODELS lists no model")
    return tuple(configs)


def _models_from_file(defaults: Mapping[str, Any], path: Path) -> tuple[ModelConfig, ...]:
    import yaml  # JSON is YAML too

    where = f"MODELS_FILE {str(path)!r}"
    try:
        data = yaml.safe_load(path.expanduser().read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"{where}: cannot read it as YAML or JSON ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("models"), list) or not data["models"]:
        raise ValueError(f"{where}: expected a mapping with a non-empty `models:` list")
    return _models_from_entries(defaults, data["models"], where)


def _models_from_entries(defaults: Mapping[str, Any], entries: Any, where: str) -> tuple[ModelConfig, ...]:
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{where}: expected a non-empty list of model entries")
    configs = []
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: entry {index} is not a mapping")
        label = f"{where}: model {entry.get('name', f'#{index}')!r}"
        if "model_id" not in entry:  # never the embedded default by omission
            raise ValueError(f"{label}: model_id: field required")
        configs.append(_model_from_entry(defaults, entry, label))
    return tuple(configs)
