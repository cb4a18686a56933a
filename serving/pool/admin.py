"""The pool controller's admin operations: what the Gateway's /admin routes call.

Each validates first (``ModelValidationError`` names the field: 422), refuses what cannot be done
(``ModelExistsError``: 409, ``UnknownModelError``: 404), and changes the pool under its lock, so an
admin call and the pool's loop never interleave. A change is in the GCS store before the call returns.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from serving.pool.errors import ModelExistsError, UnknownModelError
from serving.pool.logic import PoolModel


class AdminMixin:
    """Admin methods of ``PoolController`` (they use its logic, store, lock and deploy)."""

    def _require(self, name: str) -> None:
        state = self._logic.models.get(name)
        if state is None or state.drain == "unload":
            served = sorted(n for n, s in self._logic.models.items() if s.drain != "unload")
            raise UnknownModelError(name, served)

    async def list_models(self) -> list[dict[str, Any]]:
        """Every model with its configuration (as loaded) and its state."""
        now = time.time()
        out = []
        for name, state in sorted(self._logic.models.items()):
            entry = self._status(name, now).admin_view()
            config = self._apps.public_config(state.spec.config)
            entry.update(source=state.source, config=config, unloading=state.drain == "unload")
            out.append(entry)
        return out

    async def load(self, entry: dict[str, Any]) -> dict[str, Any]:
        """Add a model (same fields as a MODELS_FILE entry); it starts at zero unless its floor says otherwise."""
        spec = self._apps.spec_from_entry(entry, self._defaults)
        async with self._lock:
            if spec.name in self._logic.models:
                raise ModelExistsError(f"model {spec.name!r} is already served; unload it first")
            if spec.app == self._pool or any(s.spec.app == spec.app for s in self._logic.models.values()):
                raise ModelExistsError(f"{spec.name!r} would be Serve application {spec.app!r}, which is taken")
            state = PoolModel(spec, source="admin", created=time.time())
            self._logic.add(state)
            try:
                await self._deploy(state)
            except Exception:
                del self._logic.models[spec.name]
                raise
            await self._publish()
            return self._status(spec.name, time.time()).admin_view()

    async def unload(self, name: str, wait_s: float = 0.0) -> dict[str, Any]:
        """Remove a model: new requests get 404 at once, those in flight finish, then its app is deleted.

        Returns ``{"id", "unloaded": bool}``; ``wait_s`` > 0 waits that long for the drain to end.
        """
        async with self._lock:
            self._require(name)
            self._logic.begin_unload(name)
            await self._publish()
        deadline = time.monotonic() + wait_s
        while name in self._logic.models and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        return {"id": name, "unloaded": name not in self._logic.models}

    async def update(
        self, name: str, priority: int | None = None, min_replicas: int | None = None, max_replicas: int | None = None
    ) -> dict[str, Any]:
        """Change a model's priority or replica bounds, without restarting it.

        Only a ``max_replicas`` above what its Serve deployment was given redeploys it (its replicas
        restart); a lower one is a ceiling in the policy's directive.
        """
        async with self._lock:
            self._require(name)
            if self._logic.update(name, priority=priority, min_replicas=min_replicas, max_replicas=max_replicas):
                await self._deploy(self._logic.models[name])
            await self._publish()
            return self._status(name, time.time()).admin_view()
