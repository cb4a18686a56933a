"""The pool controller: a light Serve deployment (0 CPU, no torch) that runs the model pool.

One replica in the main application. Every ``loop_interval_s`` it reads Serve's replica states, the
autoscaling policy's stats and the cluster's free resources, lets ``PoolLogic`` decide, and writes
each model's directive for the policy. Each model is a Serve application of its own, named after
it, which this controller deploys (``serve.run_many``) and deletes (``serve.delete``).

State lives in Ray's GCS store (``serving.pool.store``): a new replica of this controller (after a
crash, an upgrade) rebuilds the pool from it and from Serve's applications, and every Gateway
replica asks this one replica. Requests for an evicted model wait here (``acquire``) for room.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections import Counter
from datetime import UTC, datetime
from typing import Any

from ray import serve

from config.model import DRAIN_CHECK_S
from serving.models import ModelStatus
from serving.pool.admin import AdminMixin
from serving.pool.logic import PoolLogic, PoolModel, Seen
from serving.pool.progress import ColdStartBoard
from serving.pool.reporter import CONTROLLER
from serving.pool.schedule import Clock, crossed, system_clock
from serving.pool.spec import ModelApps, ModelSpec, PoolSettings
from serving.pool.store import PoolStore

logger = logging.getLogger("ray.serve")


@serve.deployment(
    name=CONTROLLER,
    num_replicas=1,
    ray_actor_options={"num_cpus": 0},
    max_ongoing_requests=10_000,  # mostly requests waiting for room, each an idle coroutine
    graceful_shutdown_timeout_s=10,
    graceful_shutdown_wait_loop_s=DRAIN_CHECK_S,
)
class PoolController(AdminMixin):
    """Runs the pool; the Gateway calls it through ``serving.pool.client.PoolClient``.

    Example (the graph, with the settings' per-model configs turned into specs)::

        pool = PoolController.bind(PoolSettings(pool="llm"), [spec_from_entry({"name": "mini"})], {}, apps=MODEL_APPS)
        gateway = Gateway.bind(pool, settings)
    """

    async def __init__(
        self,
        settings: PoolSettings,
        models: list[ModelSpec],
        defaults: dict[str, Any],
        clock: Clock | None = None,
        *,
        apps: ModelApps,
    ) -> None:
        # The pool is named after the application it runs in (`serve run` names it "default" unless
        # told otherwise): the model replicas report to it there, and its store keys carry the name.
        settings = dataclasses.replace(settings, pool=serve.get_replica_context().app_name)
        self._settings = settings
        self._pool = settings.pool
        self._clock = clock or system_clock
        self._store = PoolStore(self._pool)
        self._logic = PoolLogic(settings.keep_hot_priority, settings.eviction_grace_s)
        self._board = ColdStartBoard()
        self._apps = apps
        self._defaults = defaults
        self._written: dict[str, Any] = {}  # what the store holds, to write changes only
        self._deployments: dict[str, str] = {}  # model -> its deployment's name, as Serve reports it
        self._failed: dict[str, str] = {}  # stored records that could not be restored -> why (listed by /admin)
        self._deleting: set[str] = set()  # applications of models this pool unloaded, until Serve has removed them
        self._changed = asyncio.Condition()
        self._lock = asyncio.Lock()  # one writer of the pool's state at a time: the loop or an admin call
        async with self._lock:
            await self._restore(models)
        self._daily_since = await asyncio.to_thread(self._store.daily_done_at)
        if self._daily_since is None:
            self._daily_since = self._clock().timestamp()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _restore(self, static: list[ModelSpec]) -> None:
        """The pool from the store's records and the configured models; deploy what is missing or changed."""
        records = await asyncio.to_thread(self._store.records)
        live = set(await asyncio.to_thread(lambda: serve.status().applications))  # application names
        wanted = {spec.name: spec for spec in static}
        for name, record in records.items():
            state = self._restorable(name, record, live)
            if state is None:
                continue
            if state.source == "static" and name not in wanted:
                self._logic.add(state)
                self._logic.begin_unload(name)  # no longer configured: drained, then deleted
                logger.info("pool: %s is no longer configured; unloading it", name)
            elif state.source == "static" and state.base != wanted[name].to_json():
                continue  # configured differently now: deployed afresh below
            else:
                self._logic.add(state)
                self._board.restore(name, state.last_cold_start)
                if state.spec.app not in live:
                    await self._deploy(state)
        for name, spec in wanted.items():
            if spec.app == self._pool:
                self._failed[name] = f"reserved: Serve application {spec.app!r} is the service's own; rename the model"
                logger.error("pool: configured model %s not deployed: %s", name, self._failed[name])
            elif name not in self._logic.models:
                state = PoolModel(spec, source="static", base=spec.to_json(), created=time.time())
                self._logic.add(state)
                await self._deploy(state)
        await self._publish()

    def _restorable(self, name: str, record: dict[str, Any], live: set[str]) -> PoolModel | None:
        """The stored record as a model, or None (listed as failed, with why) when it no longer validates
        (written by another version, say) or names a reserved application. Never raises: one bad record
        must not keep the pool, or the service, from starting."""
        try:
            state = PoolModel.from_record(record)
            self._apps.public_config(state.spec.config)  # the stored configuration's shape, no disk lookups
        except Exception as exc:
            self._failed[name] = f"stored record no longer valid: {_why(exc)}"
        else:
            if state.spec.app != self._pool:
                return state
            self._failed[name] = f"reserved: Serve application {state.spec.app!r} is the service's own"
        logger.error("pool: stored model %s skipped: %s", name, self._failed[name])
        return None

    async def _deploy(self, state: PoolModel) -> None:
        spec = state.spec
        app = self._apps.app(spec, self._settings)
        target = serve.RunTarget(app, name=spec.app, route_prefix=None)
        # Written before the app exists, so that its policy reads the right floor from its first tick.
        await asyncio.to_thread(self._store.put_directive, spec.app, self._logic.directive(spec.name))
        await asyncio.to_thread(serve.run_many, [target], wait_for_applications_running=False)
        state.deployed_max = spec.max_replicas
        logger.info("pool: deployed %s (priority %d, %s replicas)", spec.name, spec.priority, spec.max_replicas)

    # --- the loop --------------------------------------------------------------------------------
    async def _run(self) -> None:
        while True:
            try:
                await self._tick()
            except Exception:
                logger.exception("pool: a round of the pool loop failed; retrying")
            await asyncio.sleep(self._settings.loop_interval_s)

    def _observe(self) -> tuple[dict[str, dict[str, int]], dict[str, bool], dict[str, dict[str, float]]]:

        apps = {state.spec.app: name for name, state in list(self._logic.models.items())}
        states: dict[str, dict[str, int]] = {}
        for app_name, deployments in replica_states().items():
            if app_name not in apps:
                continue
            for deployment, counts in deployments.items():
                states[apps[app_name]] = counts
                self._deployments[apps[app_name]] = deployment
        busy = {name: bool((self._store.stats(app) or {}).get("busy")) for app, name in apps.items()}
        return states, busy, free_per_node()

    def _replica_nodes(self) -> dict[str, tuple[str, ...]] | None:
        """The node of each live replica actor, by model (None when Ray cannot say: placement then unknown)."""
        apps = {state.spec.app: name for name, state in list(self._logic.models.items())}
        try:
            from ray._private import state as ray_state  # the GCS's actor table; no dashboard needed

            actors = ray_state.actors(actor_state_name="ALIVE")
        except Exception:
            logger.warning("pool: could not read the replicas' nodes; eviction assumes nothing of placement")
            return None
        out: dict[str, list[str]] = {}
        for actor in actors.values():
            kind, _, rest = str(actor.get("ActorClassName", "")).partition(":")
            app = rest.partition(":")[0]
            if kind == "ServeReplica" and app in apps:
                out.setdefault(apps[app], []).append(str(actor.get("Address", {}).get("NodeID", "")))
        return {name: tuple(nodes) for name, nodes in out.items()}

    async def _tick(self) -> None:
        checked_at = time.time()  # before Serve's status is read: a replica that starts later is not in it
        states, busy, free = await asyncio.to_thread(self._observe)
        nodes = await asyncio.to_thread(self._replica_nodes)
        now = time.time()
        today = self._clock().timestamp()
        daily = self._settings.daily
        async with self._lock:
            for name in list(self._logic.models):
                constructing = self._board.constructing(name, now)
                seen = Seen.from_replica_states(
                    states.get(name, {}),
                    constructing,
                    busy.get(name, False),
                    None if nodes is None else nodes.get(name, ()),
                )
                self._board.observe(name, seen.starting, seen.running, now, checked_at)
                self._logic.observe(name, seen)
                self._logic.models[name].last_cold_start = self._board.last_cold_start(name)
            due = daily is not None and self._clock_crossed(daily, today)
            step = self._logic.step(now, free, daily_due=due)
            for event in step.events:
                logger.info("pool: %s", event)
            for name, app in step.unloaded:
                self._deleting.add(app)
                await asyncio.to_thread(serve.delete, app, _blocking=False)
                await asyncio.to_thread(self._store.delete_model, name, app)
                self._board.forget(name)
                self._written = {key: v for key, v in self._written.items() if key[1] != name}
                logger.info("pool: unloaded %s", name)
            if due:
                await asyncio.to_thread(self._store.put_daily_done_at, today)
            await self._publish()

    def _clock_crossed(self, daily, today: float) -> bool:
        since, self._daily_since = self._daily_since, today
        return crossed(daily, datetime.fromtimestamp(since, UTC), datetime.fromtimestamp(today, UTC))

    async def _publish(self) -> None:
        """Write changed directives and records to the store; wake requests waiting at the gate."""
        writes = []
        for name, state in self._logic.models.items():
            for kind, value in (("directive", self._logic.directive(name)), ("record", state.record())):
                if self._written.get((kind, name)) != value:
                    writes.append((kind, name, value))
        if writes:
            await asyncio.to_thread(self._write, writes)
        async with self._changed:
            self._changed.notify_all()

    def _write(self, writes: list[tuple[str, str, Any]]) -> None:
        for kind, name, value in writes:
            if kind == "directive":
                self._store.put_directive(self._logic.models[name].spec.app, value)
            else:
                self._store.put_record(name, value)
            self._written[(kind, name)] = value

    # --- what the Gateway and the model replicas call ---------------------------------------------
    async def snapshot(self) -> list[ModelStatus]:
        """Every served model's status (what /v1/models shows, plus ``admitted`` and ``waiting_for_room``)."""
        now = time.time()
        return [self._status(name, now) for name, s in sorted(self._logic.models.items()) if s.drain != "unload"]

    def _status(self, name: str, now: float) -> ModelStatus:
        state, seen = self._logic.models[name], self._logic.models[name].seen
        spec = state.spec
        return ModelStatus(
            name=name,
            model_id=spec.model_id,
            state=self._logic.state(name),
            task=spec.config.get("task", "generate"),
            running=seen.running,
            starting=seen.starting,
            min_replicas=spec.min_replicas,
            max_replicas=spec.max_replicas,
            priority=spec.priority,
            created=int(state.created),
            last_cold_start=self._board.last_cold_start(name),
            waking=self._board.waking(name, seen.starting, seen.running, now),
            admitted=self._logic.gate_open(name),
            waiting_for_room=self._logic.waiting_for_room(name),
            app=spec.app,
            deployment=self._deployments.get(name),
        )

    async def acquire(self, name: str, timeout_s: float) -> bool:
        """Wait until requests for ``name`` may go to its handle; False when ``timeout_s`` passes first."""
        self._require(name)
        state = self._logic.models[name]
        if self._logic.gate_open(name):
            return True
        state.waiters += 1
        try:
            async with self._changed:
                await asyncio.wait_for(
                    self._changed.wait_for(lambda: name not in self._logic.models or self._logic.gate_open(name)),
                    timeout_s,
                )
        except TimeoutError:
            return False
        finally:
            state.waiters -= 1
        self._require(name)
        return True

    async def configs(self) -> dict[str, dict[str, Any]]:
        """Every served model's full configuration (for the Gateway's request defaults and limits)."""
        return {name: dict(s.spec.config) for name, s in self._logic.models.items() if s.drain != "unload"}

    async def report_phase(
        self, model: str, replica: str, phase: str, seconds: float | None, at: float, details: dict | None = None
    ) -> None:
        """A model replica finished a start-up phase (``serving.pool.reporter.PhaseReporter``)."""
        self._board.report(model, replica, phase, seconds, at, details)

    def __del__(self) -> None:
        """When the main application is deleted (not redeployed), its models go with it.

        Only on a confirmed delete: Serve must answer that the application is gone or being deleted.
        A status call that fails (a GCS blip, a head restart) deletes nothing: the models and their
        records stay, and the next controller replica restores them."""
        try:
            app = serve.status().applications.get(self._pool)
        except Exception:
            logger.warning(
                "pool: stopping without a confirmed delete of %s; its models and records are kept", self._pool
            )
            return
        if app is not None and app.status != "DELETING":
            return  # an upgrade or a restart of this replica: the pool carries on
        for state in list(self._logic.models.values()):
            try:
                serve.delete(state.spec.app, _blocking=False)
            except Exception:
                logger.warning("pool: could not delete %s", state.spec.app, exc_info=True)
        self._store.clear()


def replica_states() -> dict[str, dict[str, dict[str, int]]]:
    """Each Serve application's deployments' replicas, counted by state (``{"RUNNING": 1, ...}``).

    What ``serve.status()`` reports, read from the Serve controller's plain answer. ``serve.status()``
    validates that answer into pydantic models, and with Ray 2.60 that cloudpickles every
    deployment's request-router class: 7% of a core at this loop's two reads a second, on a node
    whose models may all be scaled to zero.
    """
    from ray.serve.context import _get_global_client

    details = _get_global_client().get_serve_details()
    return {
        app: {
            name: dict(Counter(_name(replica["state"]) for replica in deployment.get("replicas") or ()))
            for name, deployment in (details_of_app.get("deployments") or {}).items()
        }
        for app, details_of_app in (details.get("applications") or {}).items()
    }


def _name(state: Any) -> str:
    """A replica state's name: the answer holds Serve's ``ReplicaState`` members (``str()`` of one is
    ``'ReplicaState.RUNNING'``), or their values once serialized."""
    return str(getattr(state, "value", state))


def free_per_node() -> dict[str, dict[str, float]]:
    """Each alive node's free resources: a replica fits only where one node has room for all of it."""
    from ray._private import state as ray_state

    return ray_state.available_resources_per_node()


def _why(exc: Exception) -> str:
    """A short reason for a record that failed to load: the fields and pydantic's messages, no values."""
    errors = getattr(exc, "errors", None)
    if callable(errors):
        try:
            parts = [f"{'.'.join(str(p) for p in e.get('loc', ())) or 'record'}: {e.get('msg')}" for e in errors()]
            return "; ".join(parts[:3])
        except Exception:
            pass
    return f"{type(exc).__name__}: {str(exc)[:200]}"
