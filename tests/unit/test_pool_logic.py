"""The pool's rules without Ray: keep-hot floors, eviction choice, admission, SCALE_TO_ZERO_AT, states."""

from __future__ import annotations

import pytest

from serving.pool.errors import ModelValidationError
from serving.pool.logic import PoolLogic, PoolModel, Seen
from serving.pool.spec import ModelSpec

CPU1 = {"CPU": 1.0}
GPU1 = {"CPU": 1.0, "GPU": 1.0}


def pool(*models: tuple[str, int], grace: float = 10.0, resources=CPU1, **spec) -> PoolLogic:
    logic = PoolLogic(keep_hot_priority=2, eviction_grace_s=grace)
    for name, priority in models:
        logic.add(PoolModel(ModelSpec(name, f"/m/{name}", priority=priority, resources=resources, **spec)))
    return logic


def wait_past_grace(logic: PoolLogic, free: dict, grace: float = 10.0):
    """One round to notice the unplaced replica, one after the grace period."""
    assert logic.step(now=0.0, free=free).evicted == []
    return logic.step(now=grace, free=free)


def test_keep_hot_priority_keeps_one_replica_and_min_replicas_is_a_floor() -> None:
    logic = pool(("hot", 2), ("cold", 0), ("warm", 1))
    logic.models["warm"].spec = logic.models["warm"].spec.with_overrides(min_replicas=2, max_replicas=3)
    assert logic.directive("hot") == {"floor": 1, "ceiling": None, "drain": False}
    assert logic.directive("cold") == {"floor": 0, "ceiling": None, "drain": False}
    assert logic.directive("warm")["floor"] == 2


def test_a_higher_priority_model_waiting_past_the_grace_evicts_the_lowest_idle_one_first() -> None:
    logic = pool(("busy0", 0), ("idle0", 0), ("idle1", 1), ("want", 2))
    for name in ("busy0", "idle0", "idle1"):
        logic.observe(name, Seen(running=1, busy=name == "busy0"))
    logic.observe("want", Seen(starting=1))
    step = wait_past_grace(logic, free={"CPU": 0.0})
    assert step.evicted == [("idle0", "want")]
    assert logic.directive("idle0") == {"floor": 0, "ceiling": None, "drain": True}
    assert not logic.gate_open("idle0") and logic.gate_open("busy0")


def test_eviction_takes_as_many_victims_as_the_replica_needs_and_not_more() -> None:
    logic = pool(("a", 0), ("b", 0), ("c", 0), ("want", 1))
    for name in "abc":
        logic.observe(name, Seen(running=1))
    logic.models["want"].spec = logic.models["want"].spec.with_overrides(resources={"CPU": 2.0})
    logic.observe("want", Seen(starting=1))
    step = wait_past_grace(logic, free={"CPU": 0.5})
    assert [victim for victim, _ in step.evicted] == ["a", "b"]
    # While they drain, the next round counts what they will free and evicts no one else.
    assert logic.step(now=25.0, free={"CPU": 0.5}).evicted == []


def test_nothing_is_evicted_before_the_grace_period_or_when_the_replica_was_placed() -> None:
    logic = pool(("low", 0), ("high", 1))
    logic.observe("low", Seen(running=1))
    logic.observe("high", Seen(starting=1))
    assert logic.step(now=0.0, free={"CPU": 0.0}).evicted == []
    assert logic.step(now=9.9, free={"CPU": 0.0}).evicted == []
    logic.observe("high", Seen(starting=1, constructing=1))  # it reported from its constructor: placed
    assert logic.step(now=20.0, free={"CPU": 0.0}).evicted == []
    assert not logic.waiting_for_room("high")


def test_a_replica_that_would_fit_is_not_waiting_for_room() -> None:
    logic = pool(("low", 0), ("high", 1))
    logic.observe("low", Seen(running=1))
    logic.observe("high", Seen(starting=1))
    assert logic.step(now=0.0, free={"CPU": 1.0}).evicted == []
    assert logic.step(now=60.0, free={"CPU": 1.0}).evicted == []


def test_never_evicts_equal_or_higher_priority_nor_keep_hot_models() -> None:
    logic = pool(("same", 1), ("higher", 2), ("want", 1))
    logic.observe("same", Seen(running=1))
    logic.observe("higher", Seen(running=1))
    logic.observe("want", Seen(starting=1))
    step = wait_past_grace(logic, free={"CPU": 0.0})
    assert step.evicted == []
    assert logic.waiting_for_room("want")


def test_keep_hot_models_are_never_victims_even_for_a_higher_priority() -> None:
    logic = pool(("hot", 2), ("hotter", 5))
    logic.observe("hot", Seen(running=1))
    logic.observe("hotter", Seen(starting=1))
    assert wait_past_grace(logic, free={"CPU": 0.0}).evicted == []


def test_no_eviction_when_the_eligible_models_cannot_make_room() -> None:
    logic = pool(("cpu-model", 0))
    logic.add(PoolModel(ModelSpec("gpu-model", "/m/g", priority=1, resources=GPU1)))
    logic.observe("cpu-model", Seen(running=1))
    logic.observe("gpu-model", Seen(starting=1))
    assert wait_past_grace(logic, free={"CPU": 0.0, "GPU": 0.0}).evicted == []


def test_an_evicted_model_drains_then_waits_and_comes_back_once_no_higher_priority_waits() -> None:
    logic = pool(("low", 0), ("high", 1))
    logic.observe("low", Seen(running=1, busy=True))
    logic.observe("high", Seen(starting=1))
    assert wait_past_grace(logic, free={"CPU": 0.0}).evicted == [("low", "high")]
    # In flight: the policy keeps its replica (drain) and the gate holds new requests.
    assert logic.state("low") == "running" and not logic.gate_open("low")
    logic.observe("low", Seen(stopping=1))
    logic.step(now=11.0, free={"CPU": 0.0})
    logic.observe("low", Seen())
    logic.models["low"].waiters = 1  # a request for it waits at the gate
    step = logic.step(now=12.0, free={"CPU": 0.0})
    assert logic.state("low") == "evicted" and step.readmitted == []  # high still waits for room
    logic.observe("high", Seen(running=1))
    step = logic.step(now=20.0, free={"CPU": 0.0})
    assert step.readmitted == ["low"] and logic.gate_open("low")
    assert logic.directive("low") == {"floor": 0, "ceiling": None, "drain": False}


@pytest.mark.parametrize(
    ("states", "nodes", "constructing"),
    [
        ({"RUNNING": 1, "STARTING": 1}, ("n1",), 0),  # the live actor is the running one: the other waits
        ({"RUNNING": 1, "STARTING": 1}, ("n1", "n1"), 1),
        ({"STARTING": 2}, ("n1",), 1),
        ({"STOPPING": 1, "STARTING": 1}, ("n1",), 0),  # the live actor is the stopping one
        ({"STARTING": 1}, ("n1", "n2", "n3"), 1),  # never more than Serve calls starting
        ({"RUNNING": 1, "STARTING": 1}, None, 1),  # the actor table unread: the replicas' reports count
    ],
)
def test_placed_starting_replicas_come_from_the_live_actors_when_ray_can_say(states, nodes, constructing) -> None:
    seen = Seen.from_replica_states(states, constructing=1, nodes=nodes)
    assert seen.constructing == constructing and seen.nodes == (nodes or ())


def test_a_replica_serve_just_called_running_does_not_hide_its_sibling_waiting_for_room() -> None:
    # high's first replica finished its constructor a moment ago: its own report still counts it as
    # constructing, while Serve already calls it running. Its second replica has no room, so low, which
    # high evicted, stays evicted and its waiters stay at the gate.
    logic = pool(("low", 0), ("high", 1))
    logic.models["low"].evicted = True
    logic.models["low"].waiters = 1
    states = {"RUNNING": 1, "STARTING": 1}
    logic.observe("high", Seen.from_replica_states(states, constructing=1, nodes=("n1",)))
    step = logic.step(now=0.0, free={"CPU": 0.0})
    assert step.readmitted == [] and not logic.gate_open("low") and logic.waiting_for_room("high")
    # Once high's second replica is placed, nothing of higher priority waits and low is let back in.
    logic.observe("high", Seen.from_replica_states({"RUNNING": 1, "STARTING": 1}, constructing=1, nodes=("n1", "n2")))
    step = logic.step(now=1.0, free={"CPU": 0.0})
    assert step.readmitted == ["low"] and logic.gate_open("low")
    assert step.events == ["readmitting low: no model of higher priority waits for room"]


def test_a_readmitted_lower_priority_model_cannot_evict_the_one_that_evicted_it() -> None:
    logic = pool(("low", 0), ("high", 1))
    logic.observe("high", Seen(running=1))
    logic.observe("low", Seen(starting=1))  # woken again, no room
    step = wait_past_grace(logic, free={"CPU": 0.0})
    assert step.evicted == [] and logic.waiting_for_room("low")


def test_scale_to_zero_at_drains_every_model_and_keep_hot_returns_with_the_next_wake() -> None:
    logic = pool(("hot", 2), ("cold", 0))
    logic.observe("hot", Seen(running=1))
    logic.observe("cold", Seen(running=1, busy=True))
    logic.step(now=0.0, free={}, daily_due=True)
    assert logic.directive("hot") == {"floor": 0, "ceiling": None, "drain": True}
    assert logic.directive("cold")["drain"] and logic.gate_open("cold")  # a request still wakes it
    logic.observe("hot", Seen())
    logic.step(now=1.0, free={})
    assert logic.directive("hot") == {"floor": 0, "ceiling": None, "drain": False}  # at zero; wakes on demand
    logic.observe("hot", Seen(running=1))  # a request woke it
    logic.step(now=2.0, free={})
    assert logic.directive("hot")["floor"] == 1


def test_after_scale_to_zero_at_the_floor_returns_while_the_woken_replica_starts() -> None:
    """Not once it is seen running: a short answer's idle timeout could end before that round."""
    logic = pool(("hot", 2))
    logic.observe("hot", Seen(running=1))
    logic.step(now=0.0, free={}, daily_due=True)
    logic.observe("hot", Seen(stopping=1))
    logic.step(now=1.0, free={})
    assert logic.directive("hot") == {"floor": 0, "ceiling": None, "drain": True}  # still draining
    logic.observe("hot", Seen())
    logic.step(now=2.0, free={})
    assert logic.directive("hot")["floor"] == 0
    logic.observe("hot", Seen(starting=1))  # a request is waking it
    logic.step(now=3.0, free={})
    assert logic.directive("hot") == {"floor": 1, "ceiling": None, "drain": False}


def test_unload_drains_then_reports_the_model_for_deletion() -> None:
    logic = pool(("gone", 0))
    logic.observe("gone", Seen(running=1, busy=True))
    logic.begin_unload("gone")
    assert logic.step(now=0.0, free={}).unloaded == []
    logic.observe("gone", Seen())
    assert logic.step(now=1.0, free={}).unloaded == [("gone", "gone")]
    assert "gone" not in logic.models


def test_update_validates_bounds_and_says_when_serve_max_replicas_must_grow() -> None:
    logic = pool(("m", 0), max_replicas=2)
    logic.models["m"].deployed_max = 2
    assert logic.update("m", max_replicas=1) is False
    assert logic.directive("m")["ceiling"] == 1
    assert logic.update("m", max_replicas=4) is True
    with pytest.raises(ModelValidationError) as error:
        logic.update("m", min_replicas=5)
    assert error.value.field == "max_replicas"
    with pytest.raises(ModelValidationError, match="priority"):
        logic.update("m", priority=-1)
    assert logic.models["m"].spec.min_replicas == 0  # a refused change changes nothing


def test_raising_an_evicted_model_to_keep_hot_lifts_its_eviction() -> None:
    logic = pool(("m", 0))
    logic.models["m"].evicted = True
    logic.update("m", priority=3)
    assert logic.gate_open("m") and logic.directive("m")["floor"] == 1


@pytest.mark.parametrize(
    ("states", "evicted", "expected"),
    [
        ({"RUNNING": 1, "STARTING": 1}, False, "running"),
        ({"STARTING": 1}, False, "starting"),
        ({}, True, "evicted"),
        ({"STOPPING": 1}, False, "scaled_to_zero"),
        ({}, False, "scaled_to_zero"),
    ],
)
def test_states(states: dict, evicted: bool, expected: str) -> None:
    logic = pool(("m", 0))
    logic.observe("m", Seen.from_replica_states(states))
    logic.models["m"].evicted = evicted
    assert logic.state("m") == expected


def test_records_round_trip() -> None:
    logic = pool(("m", 1))
    state = logic.models["m"]
    state.evicted, state.drain = True, "evict"
    again = PoolModel.from_record(state.record())
    assert again.record() == state.record() and again.spec == state.spec


def test_a_replica_fits_only_where_one_node_has_room_for_it() -> None:
    """One free CPU on each of two nodes is no room for a 2-CPU replica: the lower priority is evicted."""
    pool = PoolLogic(keep_hot_priority=5, eviction_grace_s=0)
    pool.add(PoolModel(ModelSpec("low", "id", priority=0, resources={"CPU": 1})))
    pool.add(PoolModel(ModelSpec("big", "id", priority=1, resources={"CPU": 2})))
    pool.observe("low", Seen(running=1, nodes=("n2",)))
    pool.observe("big", Seen(starting=1))  # requested, not placed
    spread = {"n1": {"CPU": 1.0}, "n2": {"CPU": 1.0}}
    assert pool.step(now=0.0, free=spread).evicted == [("low", "big")]  # 2 CPUs free in total: not enough
    # Evicting it frees its CPU on its own node, n2: then n2 holds the replica.
    assert pool.choose_victims("big", spread) == []  # low is draining: counted as free on n2 already


def test_room_on_one_node_is_room() -> None:
    pool = PoolLogic(keep_hot_priority=5, eviction_grace_s=0)
    pool.add(PoolModel(ModelSpec("low", "id", priority=0, resources={"CPU": 1})))
    pool.add(PoolModel(ModelSpec("big", "id", priority=1, resources={"CPU": 2})))
    pool.observe("low", Seen(running=1, nodes=("n1",)))
    pool.observe("big", Seen(starting=1))
    assert pool.step(now=0.0, free={"n1": {"CPU": 0.0}, "n2": {"CPU": 2.0}}).evicted == []
    # A victim on the wrong node does not make room: with n1's CPU freed, still no node has 2.
    assert pool.choose_victims("big", {"n1": {"CPU": 0.0}, "n2": {"CPU": 1.0}}) is None
