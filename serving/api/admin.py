"""The admin API under ``/admin``: list, load, change and unload models. Only with ADMIN_API_KEY set.

Every route needs ``Authorization: Bearer <ADMIN_API_KEY>``; without the setting the routes do not
exist (404). The set of models lives with the pool controller (``serving.pool``), not in a Gateway
replica, so it is the same for every Gateway replica and survives a Gateway restart.

    curl -H "Authorization: Bearer $ADMIN_API_KEY" localhost:8000/admin/models
    curl -H "Authorization: Bearer $ADMIN_API_KEY" -X POST localhost:8000/admin/models \\
         -d '{"name": "mini", "model_id": "/models/mini", "priority": 1}'
"""

from __future__ import annotations

from typing import Annotated, Any, Protocol

from fastapi import APIRouter, Body, Depends, Query, Request, Security
from pydantic import BaseModel, ConfigDict, Field

from serving.api import access
from serving.api.auth import BEARER, KeyCheck, require
from serving.api.native_schemas import ErrorResponse


class AdminBackend(Protocol):
    """What /admin needs from the model side (the pool controller)."""

    async def list_models(self) -> list[dict[str, Any]]: ...

    async def load(self, entry: dict[str, Any]) -> dict[str, Any]: ...

    async def unload(self, name: str, wait_s: float) -> dict[str, Any]: ...

    async def update(
        self, name: str, priority: int | None, min_replicas: int | None, max_replicas: int | None
    ) -> dict[str, Any]: ...


class ModelChange(BaseModel):
    """The fields of a served model that change without reloading it."""

    model_config = ConfigDict(extra="forbid", strict=True)

    priority: int | None = Field(default=None, ge=0, le=100)
    min_replicas: int | None = Field(default=None, ge=0)
    max_replicas: int | None = Field(default=None, ge=1)


class AdminModels(BaseModel):
    data: list[dict[str, Any]]


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in {
        401: "Missing or wrong ADMIN_API_KEY.",
        404: "No such model (or ADMIN_API_KEY is not set: no admin API).",
        409: "A model of that name is already served.",
        422: "A field of the model entry is invalid (the message names it).",
    }.items()
}

LOAD_EXAMPLE = {"name": "mini", "model_id": "/models/mini", "priority": 1, "max_replicas": 2, "idle_timeout_s": 600}


def admin_router(backend: AdminBackend, admin_keys: KeyCheck) -> APIRouter:
    checked = require(admin_keys, what="admin key", setting="ADMIN_API_KEY")

    async def admin_key(request: Request, _: Annotated[Any, Security(BEARER)]) -> None:
        await checked(request)

    router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(admin_key)], responses=ERRORS)

    @router.get("/models", response_model=AdminModels, summary="Every model, its configuration and state")
    async def list_models() -> AdminModels:
        return AdminModels(data=await backend.list_models())

    @router.post("/models", status_code=201, summary="Load a model (the fields of a MODELS_FILE entry)")
    async def load_model(
        request: Request, entry: Annotated[dict[str, Any], Body(examples=[LOAD_EXAMPLE])]
    ) -> dict[str, Any]:
        """Validated like a MODELS_FILE entry over the environment's per-model values (422 names the field).
        The model starts at zero replicas unless its floor (MIN_REPLICAS or keep-hot priority) says otherwise.
        Refused: ``trust_remote_code`` unless ADMIN_ALLOW_REMOTE_CODE, a model id outside ADMIN_MODELS, a name
        that is a Serve application the pool did not create (the service's own included)."""
        if isinstance(entry.get("name"), str):
            access.of(request).model = entry["name"][:128]  # the audit line names it
        return await backend.load(entry)

    @router.patch("/models/{name:path}", summary="Change a model's priority or replica bounds")
    async def update(request: Request, name: str, change: ModelChange) -> dict[str, Any]:
        access.of(request).model = name
        return await backend.update(name, change.priority, change.min_replicas, change.max_replicas)

    @router.delete("/models/{name:path}", summary="Unload a model (its requests in flight finish first)")
    async def unload(
        request: Request,
        name: str,
        wait_s: Annotated[float, Query(ge=0, le=600, description="Wait this long for the drain.")] = 0.0,
    ) -> dict[str, Any]:
        access.of(request).model = name
        return await backend.unload(name, wait_s)

    return router
