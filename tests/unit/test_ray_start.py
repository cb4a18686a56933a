"""What the service asks of the Ray instance: set for a local instance, baked into the image, warned of when missing."""

from __future__ import annotations

import logging

import pytest

from serving.ray_start import RAY_START_ENV, WORKER_NICENESS_ENV, prefer_ray_start_env, warn_if_niced
from settings import REPO_ROOT
from tests.dockerfile import env_values, parse


def test_a_local_instance_gets_every_variable_unless_the_operator_set_it() -> None:
    env = {"RAY_SERVE_PROXY_USE_GRPC": "0"}
    prefer_ray_start_env(env)
    assert env == {**RAY_START_ENV, "RAY_SERVE_PROXY_USE_GRPC": "0"}


def test_the_image_sets_the_same_values_for_ray_start() -> None:
    image = env_values(parse((REPO_ROOT / "Dockerfile").read_text()))
    assert {name: image.get(name) for name in RAY_START_ENV} == RAY_START_ENV


def test_a_replica_below_the_normal_priority_says_how_to_fix_it(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="ray.serve"):
        warn_if_niced(0)
        assert not caplog.records
        warn_if_niced(15)
    [record] = caplog.records
    assert "niceness 15" in record.getMessage() and f"export {WORKER_NICENESS_ENV}=0" in record.getMessage()
