"""SCALE_TO_ZERO_AT parsing and crossing (zones, DST), the cold-start board, specs, the policy's decision."""

from __future__ import annotations

import doctest
import importlib
import itertools
import traceback
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from ray.serve.config import AutoscalingConfig

from serving.pool.errors import (
    ModelExistsError,
    ModelRequiredError,
    ModelUnavailableError,
    ModelValidationError,
    TooManyWaitersError,
    UnknownModelError,
    WrongTaskError,
)
from serving.pool.policy import decide
from serving.pool.progress import ColdStartBoard
from serving.pool.schedule import ShiftedClock, crossed
from serving.pool.spec import ModelSpec, PoolSettings, pooled_autoscaling_config
from settings import DailyTime

CHICAGO = ZoneInfo("America/Chicago")


@pytest.mark.parametrize("module", ["spec", "schedule", "progress", "logic", "errors", "policy", "apps", "admin"])
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


def test_a_process_older_than_the_wake_counts_from_when_the_model_was_last_seen_quiet() -> None:
    """Ray may hand a new replica an idle worker process it started long before: that start is not the wake's."""
    board = ColdStartBoard()
    board.observe("m", starting=0, running=0, now=200.5, checked_at=200.0)
    board.observe("m", starting=1, running=0, now=201.0)
    board.report("m", "old", "process_start", 150.0, at=202.0)  # its process started at 52.0
    assert board.waking("m", starting=1, running=0, now=202.5)["since"] == 200.0
    board.report("m", "old", "warmup", 0.5, at=202.5)
    assert board.last_cold_start("m")["phases"] == {"process_start_s": 2.0, "warmup_s": 0.5}
    # A process that started within the wake keeps its own time.
    board.observe("m", starting=0, running=1, now=300.0)
    board.report("m", "new", "process_start", 1.5, at=302.0)
    board.report("m", "new", "warmup", 0.5, at=302.5)
    assert board.last_cold_start("m")["phases"] == {"process_start_s": 1.5, "warmup_s": 0.5}


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


@pytest.mark.parametrize(
    ("error", "fields"),
    [
        (ModelValidationError("max_replicas", "must be at least 1"), {"field": "max_replicas"}),
        (ModelExistsError("model 'urgent' is already in the pool"), {}),
        (UnknownModelError("ghost", ["mini"]), {"name": "ghost", "served": ["mini"]}),
        (UnknownModelError("ghost", ["mini"], message="gone"), {"served": ["mini"]}),
        (ModelRequiredError(["a", "b"]), {"served": ["a", "b"]}),
        (ModelUnavailableError("mini", 2.5, retry_after_s=3), {"waited_s": 2.5, "retry_after_s": 3}),
        (TooManyWaitersError("mini", 64, 1), {"bound": 64, "retry_after_s": 1}),
        (WrongTaskError("model 'e' serves /v1/embeddings only"), {}),
    ],
)
def test_a_pool_refusal_crosses_pickling_with_its_fields(error, fields: dict) -> None:
    """Ray pickles what the controller raises: the copy has the same type, message and fields."""
    from ray import cloudpickle

    copy = cloudpickle.loads(cloudpickle.dumps(error))
    assert type(copy) is type(error) and str(copy) == str(error)
    assert {name: getattr(copy, name) for name in fields} == fields


# The 2026 changes: America/Chicago springs forward on 8 March (02:00 CST -> 03:00 CDT) and falls back on
# 1 November (02:00 CDT -> 01:00 CST); Europe/Berlin on 29 March (02:00 CET -> 03:00 CEST) and 25 October
# (03:00 CEST -> 02:00 CET).
DST_DAYS = [
    ("America/Chicago", datetime(2026, 3, 8).date()),
    ("America/Chicago", datetime(2026, 11, 1).date()),
    ("Europe/Berlin", datetime(2026, 3, 29).date()),
    ("Europe/Berlin", datetime(2026, 10, 25).date()),
]


@pytest.mark.parametrize(("zone", "day"), DST_DAYS, ids=[f"{z}-{d}" for z, d in DST_DAYS])
@pytest.mark.parametrize("at", ["00:30", "01:30", "02:00", "02:30", "02:59", "03:00", "21:00"])
def test_scale_to_zero_at_fires_once_per_calendar_day_across_daylight_saving_changes(zone: str, day, at: str) -> None:
    """The pool's loop (a tick every minute, as `crossed(daily, previous tick, this tick)`) over the day
    before, the day of the change and the day after fires exactly once per calendar day, on the first tick
    whose local clock reads the time or later that day: at the wall time when the day has it once, its
    first occurrence when the autumn change repeats it, the jump when the spring change skips it."""
    daily, local = DailyTime.parse(f"{at} {zone}"), ZoneInfo(zone)
    start = datetime.combine(day - timedelta(days=1), datetime.min.time(), tzinfo=local).astimezone(UTC)
    end = datetime.combine(day + timedelta(days=2), datetime.min.time(), tzinfo=local).astimezone(UTC)
    tick = timedelta(minutes=1)
    ticks = [start + tick * i for i in range(int((end - start) / tick) + 1)]
    fired = [now for since, now in itertools.pairwise(ticks) if crossed(daily, since, now)]

    expected = {}  # the oracle: scan the local clock's readings, tick by tick
    for moment in ticks[1:]:
        wall = moment.astimezone(local)
        if wall.time() >= daily.at and wall.date() not in expected:
            expected[wall.date()] = moment
    assert sorted(expected) == [day - timedelta(days=1), day, day + timedelta(days=1)]
    assert fired == list(expected.values()), [m.astimezone(local).isoformat() for m in fired]


def test_a_repeated_wall_time_fires_at_its_first_occurrence_and_a_skipped_one_at_the_jump() -> None:
    chicago_back = DailyTime.parse("01:30 America/Chicago").on(datetime(2026, 11, 1).date())
    assert chicago_back == datetime(2026, 11, 1, 6, 30, tzinfo=UTC)  # 01:30 CDT, not 01:30 CST an hour later
    chicago_skip = DailyTime.parse("02:30 America/Chicago").on(datetime(2026, 3, 8).date())
    assert chicago_skip == datetime(2026, 3, 8, 8, 0, tzinfo=UTC)  # 03:00 CDT, the jump
    berlin_back = DailyTime.parse("02:30 Europe/Berlin").on(datetime(2026, 10, 25).date())
    assert berlin_back == datetime(2026, 10, 25, 0, 30, tzinfo=UTC)  # 02:30 CEST
    berlin_skip = DailyTime.parse("02:30 Europe/Berlin").on(datetime(2026, 3, 29).date())
    assert berlin_skip == datetime(2026, 3, 29, 1, 0, tzinfo=UTC)  # 03:00 CEST, the jump
    # Once a day fired, no tick of the repeated hour fires it again.
    daily = DailyTime.parse("01:30 America/Chicago")
    second_pass = datetime(2026, 11, 1, 7, 5, tzinfo=UTC)  # 01:05 CST, the hour's second pass
    assert not crossed(daily, second_pass, second_pass + timedelta(minutes=40))


def test_the_controller_deletes_models_only_on_a_confirmed_delete_of_its_application(monkeypatch) -> None:
    """Serve's status call failing (a GCS blip, a head restart) is no confirmation: nothing is deleted.

    Serve cannot be made to fail its status call on demand, so the call is replaced here; the rest of
    the path (a real delete of the main application) runs on real Serve in tests/integration/test_pool.py.
    """
    from types import SimpleNamespace

    from serving.pool import controller as module

    deleted: list[str] = []
    cleared: list[bool] = []
    spec = ModelSpec("mini", model_id="/models/mini")
    fake = SimpleNamespace(
        _pool="llm",
        _logic=SimpleNamespace(models={"mini": SimpleNamespace(spec=spec)}),
        _store=SimpleNamespace(clear=lambda: cleared.append(True)),
    )
    monkeypatch.setattr(module.serve, "delete", lambda app, _blocking=False: deleted.append(app))
    teardown = module.PoolController.func_or_class.__del__

    def status_fails():
        raise ConnectionError("GCS unavailable")

    monkeypatch.setattr(module.serve, "status", status_fails)
    teardown(fake)
    assert deleted == [] and cleared == []  # kept: the next controller replica restores them

    running = SimpleNamespace(applications={"llm": SimpleNamespace(status="RUNNING")})
    monkeypatch.setattr(module.serve, "status", lambda: running)
    teardown(fake)
    assert deleted == [] and cleared == []  # an upgrade or a restart of the replica

    for gone in ({}, {"llm": SimpleNamespace(status="DELETING")}):
        monkeypatch.setattr(module.serve, "status", lambda gone=gone: SimpleNamespace(applications=gone))
        teardown(fake)
    assert deleted == ["mini", "mini"] and cleared == [True, True]  # confirmed: the models go with it
