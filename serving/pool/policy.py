"""The autoscaling policy of every pool model: Serve's request-based policy plus the pool's directive.

It runs inside the Serve controller, once per control-loop tick and model, so it stays cheap and
self-contained: Serve pickles this module by value, and the controller process need not be able to
import the rest of the service. Its run-time input is the model's *directive*, a small JSON record
the pool controller writes to Ray's GCS key-value store (``serving.pool.store``):

- ``floor``: replicas to keep at least (keep-hot, MIN_REPLICAS); 0 while the model is evicted or after
  SCALE_TO_ZERO_AT until its next wake.
- ``ceiling``: replicas to keep at most (an admin's lowered MAX_REPLICAS); null: Serve's max_replicas.
- ``drain``: go to zero as soon as nothing is in flight, without waiting for the idle timeout
  (eviction, SCALE_TO_ZERO_AT, unload). Requests in flight or queued at a handle finish first.

The idle timeout lives here and not in Serve's ``downscale_to_zero_delay_s`` (which pool models set
to 0): Serve applies that delay to every 1 -> 0 decision, and an eviction must not wait for it.

Serve itself still decides two things the directive cannot override: a model at zero with requests
queued at its handle is woken at once (Serve's cold-start fast path skips the policy), and
``min_replicas``/``max_replicas`` of the deployment clip the result (pool models deploy min 0).
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from ray.serve.autoscaling_policy import replica_queue_length_autoscaling_policy
from ray.serve.config import AutoscalingContext

logger = logging.getLogger("ray.serve")

# Kept in step with serving.pool.store (this module must not import it: see the docstring).
KV_NAMESPACE = "llm_pool"
# Serve's controller ticks every 0.1 s; a GCS read costs ~0.5 ms, so read a model's directive at most
# twice a second: 20 models cost the controller ~2% of its loop, and a directive acts within 0.5 s.
DIRECTIVE_TTL_S = 0.5


def directive_key(pool: str, model: str) -> str:
    return f"{pool}/directive/{model}"


def stats_key(pool: str, model: str) -> str:
    return f"{pool}/stats/{model}"


def decide(
    directive: dict[str, Any], desired: float, running: int, busy: bool, idle_s: float, idle_hold_s: float
) -> float:
    """Serve's request-based ``desired`` count under the pool's directive.

    >>> decide({"drain": True}, desired=1, running=1, busy=True, idle_s=0, idle_hold_s=60)  # in flight: finish
    1
    >>> decide({"drain": True}, desired=1, running=1, busy=False, idle_s=0, idle_hold_s=60)  # then zero at once
    0
    >>> decide({}, desired=0, running=1, busy=False, idle_s=10, idle_hold_s=60)  # idle timeout not reached
    1
    >>> decide({"floor": 1}, desired=0, running=0, busy=False, idle_s=999, idle_hold_s=60)  # keep-hot
    1
    >>> decide({}, desired=1, running=0, busy=False, idle_s=0, idle_hold_s=60)  # its request went away
    0
    """
    if directive.get("drain"):
        # Keep what runs while anything is in flight or queued; then straight to zero.
        return running if busy else 0
    if running == 0 and not busy:
        # Serve's own policy keeps a replica that has yet to start; with nothing to serve, that replica
        # would still ask the cluster for room (and the cluster autoscaler for a node): drop it.
        desired = 0
    elif running >= 1 and idle_s < idle_hold_s:
        desired = max(desired, 1)  # the idle timeout
    desired = max(desired, int(directive.get("floor") or 0))
    if directive.get("ceiling") is not None:
        desired = min(desired, int(directive["ceiling"]))
    return desired


class PoolAutoscalingPolicy:
    """Class-callable Serve autoscaling policy (``AutoscalingPolicy(policy_function=..., policy_kwargs=...)``).

    Serve builds one instance per deployment with ``policy_kwargs`` and calls it every tick.

    Example (the directive is read from the GCS store; none written means plain autoscaling)::

        autoscaling_config = {
            "min_replicas": 0, "max_replicas": 2, "downscale_to_zero_delay_s": 0,
            "policy": {"policy_function": "serving.pool.policy:PoolAutoscalingPolicy",
                       "policy_kwargs": {"pool": "llm", "model": "gpt-mini", "idle_hold_s": 54.0}},
        }
    """

    def __init__(self, pool: str, model: str, idle_hold_s: float) -> None:
        self._directive_key = directive_key(pool, model)
        self._stats_key = stats_key(pool, model)
        self._idle_hold_s = idle_hold_s
        self._directive: dict[str, Any] = {}
        self._read_at = float("-inf")
        self._reported: tuple | None = None

    def __call__(self, ctx: AutoscalingContext) -> tuple[float, dict[str, Any]]:
        now = time.time()
        directive = self._read_directive(now)
        desired, _ = replica_queue_length_autoscaling_policy(ctx)
        state = dict(ctx.policy_state)
        busy = ctx.total_num_requests > 0
        if busy or "busy_at" not in state:
            state["busy_at"] = now
        running = ctx.current_num_replicas
        desired = decide(directive, desired, running, busy, now - state["busy_at"], self._idle_hold_s)
        self._report(now, busy, ctx.total_num_requests, running, ctx.target_num_replicas, desired)
        return desired, state

    def _read_directive(self, now: float) -> dict[str, Any]:
        if now - self._read_at < DIRECTIVE_TTL_S:
            return self._directive
        self._read_at = now
        try:
            from ray.experimental.internal_kv import _internal_kv_get

            raw = _internal_kv_get(self._directive_key, namespace=KV_NAMESPACE)
            self._directive = json.loads(raw) if raw else {}
        except Exception:  # a GCS hiccup must not stop Serve's control loop: keep the last directive
            logger.warning("pool policy: could not read %s", self._directive_key, exc_info=True)
        return self._directive

    def _report(self, now: float, busy: bool, requests: float, running: int, target: int, desired: float) -> None:
        """Tell the pool controller whether the model is busy and what Serve aims for, on change only."""
        key = (busy, running, target, int(desired))
        if key == self._reported:
            return
        self._reported = key
        record = {"busy": busy, "requests": round(requests, 3), "running": running, "target": target}
        record.update(decision=int(desired), at=now)
        try:
            from ray.experimental.internal_kv import _internal_kv_put

            _internal_kv_put(self._stats_key, json.dumps(record), overwrite=True, namespace=KV_NAMESPACE)
        except Exception:
            self._reported = None
            logger.warning("pool policy: could not write %s", self._stats_key, exc_info=True)
