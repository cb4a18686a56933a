"""The pool controller's admin operations: what the Gateway's /admin routes call.

Each validates first (``ModelValidationError`` names the field: 422), refuses what cannot be done
(``ModelExistsError``: 409, ``UnknownModelError``: 404), and changes the pool under its lock, so an
admin call and the pool's loop never interleave. A change is in the GCS store before the call returns.
"""

from __future__ import annotations

import asyncio
import fnmatch
import posixpath
import time
from typing import Any

from ray import serve

from serving.pool.errors import ModelExistsError, ModelValidationError, UnknownModelError
from serving.pool.logic import PoolModel
from serving.pool.spec import ModelSpec

# Per-model fields /admin may not set: the service's own value always applies.
OPERATOR_FIELDS = ("packed_cache_dir", "packed_cache_gb")


def model_id_allowed(model_id: str, patterns: tuple[str, ...]) -> bool:
    """Whether ``model_id`` (a hub id or a directory) matches one of ``patterns`` (shell-style, ``*``).

    A directory is matched in its normal form, and one that climbs out (``..``) matches nothing.

    >>> model_id_allowed("HuggingFaceTB/SmolLM2-360M", ("HuggingFaceTB/*",))
    True
    >>> model_id_allowed("/models/../etc/x", ("/models/*",)), model_id_allowed("/models/a/", ("/models/*",))
    (False, True)
    """
    if ".." in model_id.replace("\\", "/").split("/"):
        return False
    candidate = posixpath.normpath(model_id) if model_id.startswith(("/", "./", "~")) else model_id
    return any(fnmatch.fnmatchcase(candidate, pattern) for pattern in patterns)


class AdminMixin:
    """Admin methods of ``PoolController`` (they use its logic, store, lock and deploy)."""

    def _require(self, name: str) -> None:
        state = self._logic.models.get(name)
        if state is None or state.drain == "unload":
            served = sorted(n for n, s in self._logic.models.items() if s.drain != "unload")
            raise UnknownModelError(name, served)

    async def list_models(self) -> list[dict[str, Any]]:
        """Every model with its configuration (as loaded) and its state; stored records that could not
        be restored are listed as ``failed``, with why."""
        now = time.time()
        out = []
        for name, state in sorted(self._logic.models.items()):
            entry = self._status(name, now).admin_view()
            config = self._apps.public_config(state.spec.config)
            entry.update(source=state.source, config=config, unloading=state.drain == "unload")
            out.append(entry)
        out += [{"id": name, "state": "failed", "error": why} for name, why in sorted(self._failed.items())]
        return out

    def _check_admin_policy(self, spec: ModelSpec) -> None:
        """What the operator lets /admin load: no checkpoint code unless allowed, only allowed model ids."""
        if spec.config.get("trust_remote_code") and not self._settings.admin_allow_remote_code:
            raise ModelValidationError(
                "trust_remote_code",
                "refused: /admin does not load models that run their checkpoint's own code "
                "(the operator allows it with ADMIN_ALLOW_REMOTE_CODE=true)",
            )
        self._check_model_id(spec.model_id)

    def _check_model_id(self, model_id: str) -> None:
        patterns = self._settings.admin_models
        if patterns and not model_id_allowed(model_id, patterns):
            raise ModelValidationError(
                "model_id",
                f"{model_id!r} is not among the models /admin may load (ADMIN_MODELS: {', '.join(patterns)})",
            )

    def _reserved_apps(self) -> set[str]:
        """Serve applications a model may not become: the service's own, and every one the pool did not create."""
        ours = {state.spec.app for state in self._logic.models.values()} | self._deleting
        return ({self._pool} | set(serve.status().applications)) - ours

    async def _until_deleted(self, app: str, timeout_s: float = 60.0) -> None:
        """A model reloaded under the name of one this pool just unloaded waits for Serve to remove the old one."""
        deadline = time.monotonic() + timeout_s
        while app in self._deleting:
            if app not in await asyncio.to_thread(lambda: serve.status().applications):
                self._deleting.discard(app)
            elif time.monotonic() > deadline:
                raise ModelExistsError(f"Serve is still deleting application {app!r}; retry in a few seconds")
            else:
                await asyncio.sleep(0.2)

    async def load(self, entry: dict[str, Any]) -> dict[str, Any]:
        """Add a model (same fields as a MODELS_FILE entry); it starts at zero unless its floor says otherwise."""
        requested = entry.get("model_id", self._defaults.get("model_id")) if isinstance(entry, dict) else None
        if isinstance(requested, str):  # before validation looks the path up: no disk probe for what is refused
            self._check_model_id(requested)
        for field in OPERATOR_FIELDS:  # where a replica writes on its node is not a client's to choose
            if isinstance(entry, dict) and field in entry:
                raise ModelValidationError(
                    field, f"set by the operator ({field.upper()}); /admin loads a model with the service's value"
                )
        spec = self._apps.spec_from_entry(entry, self._defaults)
        self._check_admin_policy(spec)
        async with self._lock:
            if spec.app in await asyncio.to_thread(self._reserved_apps):
                raise ModelExistsError(
                    f"{spec.name!r} is reserved: Serve application {spec.app!r} is the service's own or was not "
                    "deployed by the model pool; choose another name"
                )
            if spec.name in self._logic.models or spec.name in self._failed:
                raise ModelExistsError(f"model {spec.name!r} is already served; unload it first")
            if any(s.spec.app == spec.app for s in self._logic.models.values()):
                raise ModelExistsError(f"{spec.name!r} would be Serve application {spec.app!r}, which is taken")
            await self._until_deleted(spec.app)
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
            if name in self._failed:  # a stored record that could not be restored: forget it
                await asyncio.to_thread(self._store.delete_record, name)
                del self._failed[name]
                return {"id": name, "unloaded": True}
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
