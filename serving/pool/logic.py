"""The pool's decisions, as plain Python: priorities, keep-hot floors, eviction, admission, states.

Nothing here talks to Ray. The controller feeds in what it observed (replica counts per model, busy
or idle, the cluster's free resources, whether SCALE_TO_ZERO_AT has passed) and applies what comes
out: each model's *directive* for the autoscaling policy, and the models to delete.

Rules (issue 10):
- priority >= keep_hot_priority keeps >= 1 replica and is never evicted; MIN_REPLICAS is a floor too.
- A model whose replica has waited ``eviction_grace_s`` for room (not placed, and the cluster's free
  resources do not hold one) evicts models of *lower* priority, lowest first, idle before busy, until
  one replica fits. A victim drains: what it has in flight or queued finishes, then it goes to zero.
- An evicted model's requests wait at the pool's gate; it is let back in once no model of higher
  priority waits for room, and it may then evict only models below its own priority.
- At SCALE_TO_ZERO_AT every model drains to zero; a keep-hot one keeps its floor again once a request
  has woken it (from the moment its replica is seen starting).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from serving.models import ModelState
from serving.pool.spec import ModelSpec, Resources, add, check_bounds, fits_on_a_node, per_node

Drain = Literal["evict", "daily", "unload"]


@dataclass
class Seen:
    """What the controller observed of one model's replicas this round."""

    running: int = 0
    starting: int = 0
    stopping: int = 0
    constructing: int = 0  # starting replicas that reported from their constructor: placed on a node
    busy: bool = False  # requests in flight or queued (the policy's view over its look-back window)
    nodes: tuple[str, ...] = ()  # the node of each replica that holds resources (when known)

    @classmethod
    def from_replica_states(
        cls,
        states: dict[str, int],
        constructing: int = 0,
        busy: bool = False,
        nodes: tuple[str, ...] | None = None,
    ) -> Seen:
        """``nodes``: the node of each of the model's live replica actors, from Ray's actor table (None when
        it could not be read). A replica actor is alive once it holds its resources on a node (its
        constructor is light; the model loads after), so the live ones past those Serve calls running or
        stopping are the starting replicas that were placed, and they replace ``constructing``, the
        replicas' own reports. The reports lag: one that finished counts a while longer, for Serve calls
        it running a moment later, and meanwhile it would hide a replica that still waits for room."""
        running = states.get("RUNNING", 0) + states.get("UPDATING", 0)
        starting = states.get("STARTING", 0) + states.get("RECOVERING", 0)
        stopping = states.get("STOPPING", 0) + states.get("PENDING_MIGRATION", 0)
        if nodes is not None:
            constructing = min(starting, max(0, len(nodes) - running - stopping))
        return cls(running, starting, stopping, constructing, busy, nodes or ())


@dataclass
class PoolModel:
    """One model as the pool keeps it: its spec, where it came from, and what the pool decided for it."""

    spec: ModelSpec
    source: Literal["static", "admin"] = "static"
    base: dict[str, Any] | None = None  # a static model's spec as configured, to tell a new configuration
    deployed_max: int = 1  # max_replicas Serve was given: the directive's ceiling can only lower it
    created: float = 0.0
    evicted: bool = False
    suspended: bool = False  # SCALE_TO_ZERO_AT passed; the floor returns with the next wake
    drain: Drain | None = None
    last_cold_start: dict[str, Any] | None = None  # kept with the record, so a restart does not lose it
    seen: Seen = field(default_factory=Seen)
    pending_since: float | None = None  # a replica has been waiting for room since
    waiters: int = 0  # requests waiting at the gate

    @property
    def placed(self) -> int:
        """Replicas that hold resources on a node."""
        return self.seen.running + min(self.seen.starting, self.seen.constructing) + self.seen.stopping

    def record(self) -> dict[str, Any]:
        """What survives a restart of the pool controller (kept in Ray's GCS store)."""
        keys = ("source", "base", "deployed_max", "created", "evicted", "suspended", "drain", "last_cold_start")
        return {"spec": self.spec.to_json(), **{key: getattr(self, key) for key in keys}}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> PoolModel:
        return cls(spec=ModelSpec.from_json(record["spec"]), **{k: v for k, v in record.items() if k != "spec"})


@dataclass
class Step:
    """What one round decided; the controller applies it."""

    evicted: list[tuple[str, str]] = field(default_factory=list)  # (victim, for model)
    readmitted: list[str] = field(default_factory=list)
    unloaded: list[tuple[str, str]] = field(default_factory=list)  # drained: (model, application) to delete
    events: list[str] = field(default_factory=list)


class PoolLogic:
    """The models and the rules.

    >>> from serving.pool.spec import ModelSpec
    >>> pool = PoolLogic(keep_hot_priority=2, eviction_grace_s=10)
    >>> for name, priority in (("small", 0), ("big", 1)):
    ...     pool.add(PoolModel(ModelSpec(name, "id", priority=priority, resources={"CPU": 1})))
    >>> pool.observe("small", Seen(running=1))
    >>> pool.observe("big", Seen(starting=1))  # requested, not placed
    >>> pool.step(now=0.0, free={"CPU": 0}).evicted
    []
    >>> pool.step(now=10.0, free={"CPU": 0}).evicted
    [('small', 'big')]
    >>> pool.directive("small"), pool.gate_open("small")
    ({'floor': 0, 'ceiling': None, 'drain': True}, False)
    """

    def __init__(self, keep_hot_priority: int = 2, eviction_grace_s: float = 30.0) -> None:
        self.keep_hot_priority = keep_hot_priority
        self.eviction_grace_s = eviction_grace_s
        self.models: dict[str, PoolModel] = {}

    # --- membership --------------------------------------------------------------------------
    def add(self, state: PoolModel) -> None:
        self.models[state.spec.name] = state

    def keep_hot(self, name: str) -> bool:
        return self.models[name].spec.priority >= self.keep_hot_priority

    def begin_unload(self, name: str) -> None:
        self.models[name].drain = "unload"

    def update(
        self, name: str, priority: int | None = None, min_replicas: int | None = None, max_replicas: int | None = None
    ) -> bool:
        """Change priority or replica bounds; True when Serve's max_replicas must grow (a redeploy)."""
        state = self.models[name]
        spec = state.spec.with_overrides(priority=priority, min_replicas=min_replicas, max_replicas=max_replicas)
        check_bounds(spec.priority, spec.min_replicas, spec.max_replicas)
        state.spec = spec
        if spec.priority >= self.keep_hot_priority:
            state.evicted = False
            if state.drain == "evict":
                state.drain = None
        return spec.max_replicas > state.deployed_max

    # --- observation and decision ------------------------------------------------------------
    def observe(self, name: str, seen: Seen) -> None:
        self.models[name].seen = seen

    def step(self, now: float, free: Resources | Mapping[str, Resources], daily_due: bool = False) -> Step:
        """One round. ``free``: the free resources of each node (``{node: {"CPU": ...}}``); a flat
        mapping is one node. A replica fits only where one node has room for all of it."""
        free = per_node(free)
        step = Step()
        if daily_due:
            for state in self.models.values():
                state.suspended = True
                state.drain = state.drain or "daily"
            step.events.append("SCALE_TO_ZERO_AT: every model drains to zero")
        for name, state in list(self.models.items()):
            self._settle(name, state, step)
        for state in self.models.values():
            self._track_pending(state, free, now)
        for state in sorted(self.models.values(), key=lambda s: -s.spec.priority):
            if state.pending_since is not None and now - state.pending_since >= self.eviction_grace_s:
                victims = self.choose_victims(state.spec.name, free)
                for victim in victims or ():
                    self.models[victim].evicted = True
                    self.models[victim].drain = "evict"
                    step.evicted.append((victim, state.spec.name))
                    step.events.append(
                        f"evicting {victim} (priority {self.models[victim].spec.priority}) "
                        f"for {state.spec.name} (priority {state.spec.priority})"
                    )
                state.pending_since = now  # the next round of evictions, if any, after another grace
        for name, state in self.models.items():
            wanted = state.waiters > 0 or self._base_floor(state) > 0
            if state.evicted and state.drain is None and wanted and not self._higher_waits_for_room(state):
                state.evicted = False
                step.readmitted.append(name)
                step.events.append(f"readmitting {name}: no model of higher priority waits for room")
        return step

    def _settle(self, name: str, state: PoolModel, step: Step) -> None:
        seen = state.seen
        at_zero = seen.running == seen.starting == seen.stopping == 0
        if state.drain is not None and at_zero:
            if state.drain == "unload":
                del self.models[name]
                step.unloaded.append((name, state.spec.app))
                return
            state.drain = None
        if state.suspended and state.drain is None and (seen.running or seen.starting):
            # Woken on demand after SCALE_TO_ZERO_AT (after the drain only a request starts a replica):
            # the floor holds again from the replica's start, not from the first round that sees it
            # running, which on a loaded machine could come after a short answer's idle timeout.
            state.suspended = False

    def _track_pending(self, state: PoolModel, free: dict[str, dict[str, float]], now: float) -> None:
        unplaced = state.seen.starting - min(state.seen.starting, state.seen.constructing)
        if unplaced > 0 and not fits_on_a_node(state.spec.resources, free) and state.drain is None:
            if state.pending_since is None:
                state.pending_since = now
        else:
            state.pending_since = None

    def choose_victims(self, name: str, free: Resources | Mapping[str, Resources]) -> list[str] | None:
        """Models to evict so that one replica of ``name`` fits on one node; [] if it will fit, None if
        it cannot."""
        wanting = self.models[name]
        need = wanting.spec.resources
        # Victims already draining will free what they hold: count it before choosing more.
        available = per_node(free)
        for state in self.models.values():
            if state.drain == "evict":
                _release(available, state)
        if fits_on_a_node(need, available):
            return []
        candidates = [
            state
            for state in self.models.values()
            if state.spec.name != name
            and state.spec.priority < wanting.spec.priority
            and state.spec.priority < self.keep_hot_priority
            and state.drain is None
            and state.placed > 0
            and any(state.spec.resources.get(kind, 0) > 0 for kind, amount in need.items() if amount > 0)
        ]
        candidates.sort(key=lambda s: (s.spec.priority, s.seen.busy, s.spec.name))
        chosen = []
        for state in candidates:
            chosen.append(state.spec.name)
            _release(available, state)
            if fits_on_a_node(need, available):
                return chosen
        return None

    def _higher_waits_for_room(self, state: PoolModel) -> bool:
        return any(
            other.pending_since is not None and other.spec.priority > state.spec.priority
            for other in self.models.values()
        )

    # --- what the policy, the gate and /v1/models see -------------------------------------------
    def _base_floor(self, state: PoolModel) -> int:
        return max(state.spec.min_replicas, 1 if state.spec.priority >= self.keep_hot_priority else 0)

    def directive(self, name: str) -> dict[str, Any]:
        """The autoscaling policy's input for ``name`` (see ``serving.pool.policy``)."""
        state = self.models[name]
        floor = 0 if (state.evicted or state.suspended or state.drain) else self._base_floor(state)
        ceiling = state.spec.max_replicas if state.spec.max_replicas < state.deployed_max else None
        return {"floor": floor, "ceiling": ceiling, "drain": state.drain is not None}

    def gate_open(self, name: str) -> bool:
        """Whether requests for ``name`` may go to its Serve handle now (else they wait for room)."""
        state = self.models[name]
        return not state.evicted and state.drain not in ("evict", "unload")

    def waiting_for_room(self, name: str) -> bool:
        state = self.models[name]
        return state.pending_since is not None or (state.evicted and state.waiters > 0)

    def state(self, name: str) -> ModelState:
        seen = self.models[name].seen
        if seen.running > 0:
            return ModelState.RUNNING
        if seen.starting > 0:
            return ModelState.STARTING
        return ModelState.EVICTED if self.models[name].evicted else ModelState.SCALED_TO_ZERO


def _release(nodes: dict[str, dict[str, float]], state: PoolModel) -> None:
    """Count what ``state``'s placed replicas hold as free on their nodes (on the one node, when the
    observation did not say where, and nothing is credited when several nodes leave that unknown)."""
    where = list(state.seen.nodes[: state.placed])
    if not where and len(nodes) == 1:
        where = [next(iter(nodes))] * state.placed
    for node in where:
        if node in nodes:
            nodes[node] = add(nodes[node], state.spec.resources)
