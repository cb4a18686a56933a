"""The ``>>>`` examples of the light modules run and hold."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "engine.types",
    "engine.work",
    "engine.detokenize",
    "engine.timing",
    "engine.placement",
    "engine.cpu",
    "engine.hugepages",
    "engine.quantization",
    "engine.token_choice",
    "observability.metrics",
    "deploy.grafana.evaluate",
    "serving.api.access",
    "serving.api.errors",
    "serving.api.json_body",
    "serving.models",
    "serving.transport",
    "serving.warm_pool.worker",
    "benchmarks.stream_cost",
    "config.schedule",
    "config.model",
    "testing.polling",
    "tests.fakes",
]


@pytest.mark.parametrize("name", MODULES)
def test_examples_hold(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0, f"{name} has no examples"
    assert result.failed == 0
