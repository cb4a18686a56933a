"""The pool's records in Ray's GCS key-value store: where its state outlives any replica.

Serve keeps its own checkpoints in the same store, so the pool's state lives exactly as long as
Serve's: it survives a restart of the Gateway or of the pool controller, and is one state for every
Gateway replica. Keys, in namespace ``llm_pool``, start with the main application's name:

- ``<pool>/model/<name>``: a model's record (its ModelSpec, source, eviction flags).
- ``<pool>/directive/<app>``: the autoscaling policy's input (written here, read by the policy).
- ``<pool>/stats/<app>``: what the policy last saw (busy or idle, Serve's target).
- ``<pool>/daily``: when SCALE_TO_ZERO_AT last took effect.

Ray exposes this store as ``ray.experimental.internal_kv`` (not a public API); this module is the
only one here that touches it. Calls block on the GCS for well under a millisecond; the controller
makes them from a worker thread.
"""

from __future__ import annotations

import json
from typing import Any

from serving.pool.policy import KV_NAMESPACE, directive_key, stats_key


def _kv():
    from ray.experimental import internal_kv

    return internal_kv


class PoolStore:
    """JSON records under one pool's prefix.

    Example (needs a connected Ray)::

        store = PoolStore("llm")
        store.put_directive("mini", {"floor": 1, "ceiling": None, "drain": False})
    """

    def __init__(self, pool: str) -> None:
        self.pool = pool

    def _get(self, key: str) -> Any:
        raw = _kv()._internal_kv_get(key, namespace=KV_NAMESPACE)
        return None if raw is None else json.loads(raw)

    def _put(self, key: str, value: Any) -> None:
        _kv()._internal_kv_put(key, json.dumps(value, sort_keys=True), overwrite=True, namespace=KV_NAMESPACE)

    def _delete(self, key: str) -> None:
        _kv()._internal_kv_del(key, namespace=KV_NAMESPACE)

    # --- model records ---------------------------------------------------------------------------
    def records(self) -> dict[str, dict[str, Any]]:
        prefix = f"{self.pool}/model/"
        keys = _kv()._internal_kv_list(prefix, namespace=KV_NAMESPACE)
        out = {}
        for key in keys:
            name = key.decode()[len(prefix) :]
            try:
                record = self._get(key.decode())
            except ValueError as exc:  # not JSON: left for the controller to list as failed
                record = {"unreadable": f"not JSON ({exc.__class__.__name__})"}
            if record is not None:
                out[name] = record
        return out

    def put_record(self, name: str, record: dict[str, Any]) -> None:
        self._put(f"{self.pool}/model/{name}", record)

    def delete_record(self, name: str) -> None:
        self._delete(f"{self.pool}/model/{name}")

    def delete_model(self, name: str, app: str) -> None:
        for key in (f"{self.pool}/model/{name}", directive_key(self.pool, app), stats_key(self.pool, app)):
            self._delete(key)

    # --- the policy's input and output (keyed by the model's application name) ---------------------------
    def put_directive(self, app: str, directive: dict[str, Any]) -> None:
        self._put(directive_key(self.pool, app), directive)

    def stats(self, app: str) -> dict[str, Any] | None:
        return self._get(stats_key(self.pool, app))

    # --- SCALE_TO_ZERO_AT ----------------------------------------------------------------------
    def daily_done_at(self) -> float | None:
        return self._get(f"{self.pool}/daily")

    def put_daily_done_at(self, epoch: float) -> None:
        self._put(f"{self.pool}/daily", epoch)

    def clear(self) -> None:
        """Forget every record of this pool (tests; the pool's own teardown)."""
        _kv()._internal_kv_del(f"{self.pool}/", del_by_prefix=True, namespace=KV_NAMESPACE)
