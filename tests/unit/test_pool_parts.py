"""SCALE_TO_ZERO_AT parsing and crossing (zones, DST), the cold-start board, specs, the policy's decision."""

from __future__ import annotations

import doctest
import importlib
import traceback
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from ray.serve.config import AutoscalingConfig

from serving.pool.errors import ModelExistsError, ModelValidationError, UnknownModelError
from serving.pool.policy import decide
from serving.pool.progress import ColdStartBoard
from serving.pool.schedule import ShiftedClock, crossed
from serving.pool.spec import ModelSpec, PoolSettings, pooled_autoscaling_config
from settings import DailyTime

CHICAGO = ZoneInfo("America/Chicago")


@pytest.mark.parametrize("module", ["spec", "schedule", "progress", "logic", "errors", "policy", "apps"])
def test_examples_in_docstrings_run(module: str) -> None:
    result = doctest.testmod(importlib.import_module(f"serving.pool.{module}"))
    assert result.failed == 0 and result.attempted > 0


@pytest.mark.parametrize("text", ["21:00", "25:00 UTC", "21:00 Mars/Olympus", "nine pm UTC"])
def test_a_bad_daily_time_names_the_variable(text: str) -> None:
    with pytest.raises(ValueError, match="SCALE_TO_ZERO_AT"):
        PoolSettings(scale_to_zero_at=text)


def test_the_daily_time_is_crossed_once_a_day_in_its_own_zone() -> None:
    daily = DailyTime.parse("21:00 America/Chicago")
    before = datetime(2026, 1, 5, 20, 59, 59, tzinfo=CHICAGO)
    at = datetime(2026, 1, 5, 21, 0, 0, tzinfo=CHICAGO)
    assert not crossed(daily, before - timedelta(minutes=5), before)
    assert crossed(daily, before, at)
    assert not crossed(daily, at, at + timedelta(hours=23))
    assert crossed(daily, at, at + timedelta(hours=24))
    assert crossed(daily, before.astimezone(UTC), at.astimezone(UTC))  # the same instants in UTC


def test_the_daily_time_follows_daylight_saving_time() -> None:
    daily = DailyTime.parse("21:00 America/Chicago")
    winter = daily.next_after(datetime(2026, 1, 5, tzinfo=UTC))
    summer = daily.next_after(datetime(2026, 7, 5, tzinfo=UTC))
    assert winter.astimezone(UTC).hour == 3 and summer.astimezone(UTC).hour == 2
    # A day whose 02:30 does not exist (spring forward) still has its occurrence.
    early = DailyTime.parse("02:30 America/Chicago")
    day = datetime(2026, 3, 8, 12, 0, tzinfo=CHICAGO)
    assert crossed(early, day - timedelta(hours=12), day)


def test_a_shifted_clock_runs_at_the_system_clocks_pace() -> None:
    start = datetime(2026, 1, 5, 20, 59, 58, tzinfo=CHICAGO)
    clock = ShiftedClock.starting_at(start)
    first = clock()
    assert abs((first - start).total_seconds()) < 1
    assert clock() >= first


def test_the_board_shows_phases_as_they_complete_and_keeps_the_last_cold_start() -> None:
    board = ColdStartBoard()
    board.observe("m", starting=1, running=0, now=99.0)
    assert board.waking("m", starting=1, running=0, now=100.0) == {"since": 99.0, "phases": {}, "current": None}
    board.report("m", "r1", "process_start", 1.2, at=101.2)
    assert board.constructing("m", now=101.3) == 1
    board.report("m", "r1", "imports", 2.5, at=103.7)
    waking = board.waking("m", starting=1, running=0, now=104.0)
    assert waking == {"since": 100.0, "phases": {"process_start_s": 1.2, "imports_s": 2.5}, "current": "model_code"}
    for phase, seconds in (("model_code", 1.6), ("weights", 0.2), ("warmup", 0.1)):
        board.report("m", "r1", phase, seconds, at=106.0)
    assert board.constructing("m", now=107.0) == 1  # ready; Serve has yet to call it running
    assert board.constructing("m", now=117.0) == 0
    assert board.waking("m", starting=0, running=1, now=106.1) is None
    board.report("m", "r1", "first_generation", 0.4, at=106.5)
    last = board.last_cold_start("m")
    assert last == {
        "total_s": 6.0,
        "phases": {"process_start_s": 1.2, "imports_s": 2.5, "model_code_s": 1.6, "weights_s": 0.2,
                   "warmup_s": 0.1, "first_generation_s": 0.4},
        "finished_at": 106.5,
    }  # fmt: skip
    with pytest.raises(ValueError, match="unknown cold-start phase 'tokenize'"):
        board.report("m", "r1", "tokenize", 1.0, at=107.0)


def test_the_board_forgets_replicas_that_never_finished() -> None:
    board = ColdStartBoard()
    board.report("m", "dead", "process_start", 1.0, at=10.0)
    board.observe("m", starting=0, running=0, now=20.0)
    assert board.constructing("m", now=20.0) == 0 and board.last_cold_start("m") is None


@pytest.mark.parametrize(
    ("changes", "field"),
    [({"name": "a#b"}, "name"), ({"priority": -1}, "priority"), ({"max_replicas": 0}, "max_replicas"),
     ({"min_replicas": 3, "max_replicas": 2}, "max_replicas")],
)  # fmt: skip
def test_a_bad_spec_names_its_field(changes: dict, field: str) -> None:
    with pytest.raises(ModelValidationError) as error:
        ModelSpec(**{"name": "m", "model_id": "/m", **changes})
    assert error.value.field == field


def test_the_pooled_autoscaling_config_is_valid_for_serve() -> None:
    base = {"min_replicas": 1, "max_replicas": 3, "initial_replicas": 1, "downscale_to_zero_delay_s": 54.0}
    config = AutoscalingConfig(**pooled_autoscaling_config(base, "llm", "m"))
    assert (config.min_replicas, config.max_replicas, config.downscale_to_zero_delay_s) == (0, 3, 0.0)
    assert config.initial_replicas is None
    assert config.policy.policy_function == "serving.pool.policy:PoolAutoscalingPolicy"
    assert config.policy.policy_kwargs == {"pool": "llm", "model": "m", "idle_hold_s": 54.0}


@pytest.mark.parametrize(
    ("directive", "desired", "running", "busy", "idle_s", "expected"),
    [
        ({}, 0.2, 1, False, 59.0, 1),  # within the idle timeout
        ({}, 0.0, 1, False, 61.0, 0),  # past it
        ({}, 3.0, 2, True, 0.0, 3.0),  # load decides
        ({"ceiling": 2}, 3.0, 2, True, 0.0, 2),
        ({"floor": 1}, 0.0, 1, False, 999.0, 1),
        ({"floor": 1, "drain": True}, 0.0, 1, False, 0.0, 0),  # drain wins over the floor
        ({"drain": True}, 2.0, 2, True, 0.0, 2),  # drain keeps what runs while busy
        ({}, 1.0, 0, False, 0.0, 0),  # a replica still starting whose request was cancelled
        ({"floor": 1}, 1.0, 0, False, 0.0, 1),
    ],
)
def test_the_policy_decision(directive: dict, desired: float, running: int, busy: bool, idle_s: float, expected):
    assert decide(directive, desired, running, busy, idle_s, idle_hold_s=60.0) == expected


@pytest.mark.parametrize(
    ("error", "status", "kind"),
    [
        (ModelExistsError("model 'urgent' is already in the pool"), 409, "model_exists"),
        (UnknownModelError("ghost", ["mini"]), 404, "model_not_found"),
        (ModelValidationError("max_replicas", "must be at least 1"), 422, "validation_error"),
    ],
)
def test_a_pool_refusal_from_the_controller_replica_reads_as_its_own_message(error, status, kind) -> None:
    """Ray delivers a remote exception as a wrapper that is also the original's type, and whose text is the
    remote traceback (paths, pids, actor ids): the answer carries the original's message only."""
    from ray.exceptions import RayTaskError

    from serving.api.errors import from_exception

    try:
        raise error
    except type(error) as raised:
        wrapped = RayTaskError("PoolController.add", traceback.format_exc(), raised).as_instanceof_cause()
    assert isinstance(wrapped, type(error)) and "pid=" in str(wrapped)
    api_error = from_exception(wrapped, "openai", retry_after_s=1)
    assert (api_error.status, api_error.kind) == (status, kind)
    assert api_error.message == str(error) and "pid=" not in api_error.message
