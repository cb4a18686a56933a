"""How a route reaches a model, streamed or not, within REQUEST_TIMEOUT_S.

A route translates its body, then hands the request to :class:`Calls`: ``unary`` for a whole
answer, ``streamed`` for SSE. A call opens the model's stream (``serving.backend.ModelCall``:
errors before the first token keep their status), sends heartbeat comments while a model wakes,
counts a wake once, and turns every failure into an error through ``serving.api.errors``: a
status before the stream began, an error event in the dialect's shape after.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse

from engine.embedding_types import EmbeddingRequest, EmbeddingResult
from engine.types import Completion, GenerationRequest, Started
from observability import metrics
from serving.api import access, sse
from serving.api.budget import check_output_budget
from serving.api.errors import ApiError, Family, api_error, from_exception
from serving.backend import ModelBackend, ModelCall
from settings import ModelConfig, Settings


class Calls:
    """How a route reaches a model, streamed or not, within REQUEST_TIMEOUT_S.

    What a call learns (the model, its tokens, queue time, first token) goes to the request's
    access record (``serving.api.access``); a request that finds its model at zero counts a wake.
    """

    def __init__(self, backend: ModelBackend, settings: Settings) -> None:
        self.backend = backend
        self.settings = settings
        self._waking: set[str] = set()  # models whose current wake a request has counted already

    async def _begin(self, request: Request, model: ModelConfig, stream: bool) -> tuple[access.Access, bool]:
        """The request's access record, and whether its model was not running when it arrived."""
        record = access.of(request)
        record.model, record.stream = model.name, stream
        state = (await self.backend.status(model)).state
        if state in ("scaled_to_zero", "evicted") and model.name not in self._waking:
            self._waking.add(model.name)
            metrics.model_woke(model.name, "request")
        return record, state != "running"

    def _failure(self, record: access.Access, exc: Exception, family: Family) -> ApiError:
        return self._counted(record, from_exception(exc, family, self.settings.retry_after_s), exc)

    @staticmethod
    def _counted(record: access.Access, error: ApiError, exc: BaseException | None = None) -> ApiError:
        """``error``, counted as a rejection when it turns the request away at capacity."""
        from ray.serve.exceptions import BackPressureError

        if isinstance(exc, BackPressureError):
            metrics.rejected(record.route, record.model, "queue_full")
        elif error.kind == "no_room":  # the pool found the model no room in time
            metrics.rejected(record.route, record.model, "no_room")
        return error

    async def unary(
        self, request: Request, model: ModelConfig, call: GenerationRequest, family: Family
    ) -> tuple[Started, list[Completion], dict]:
        """The whole answer; ``x-cold-start`` says how long it waited for a replica to start."""
        check_output_budget(call, self.settings.max_output_tokens_per_request)
        record, cold = await self._begin(request, model, stream=False)
        try:
            started, done = await asyncio.wait_for(self.backend.generate(model, call), self.settings.request_timeout_s)
        except TimeoutError:
            raise self._counted(record, await self.timed_out(model, family)) from None
        except Exception as exc:  # the model's failures become statuses here, not in Starlette's error path
            raise self._failure(record, exc, family) from None
        finally:
            self._waking.discard(model.name)  # the model is up, or this wake failed
        record.started(started)
        record.finished(done)
        if not cold:
            return started, done, {}
        record.cold_start_s = time.monotonic() - record.arrived
        return started, done, {"x-cold-start": f"{record.cold_start_s:.3f}"}

    async def embedded(
        self, request: Request, model: ModelConfig, call: EmbeddingRequest
    ) -> tuple[EmbeddingResult, dict[str, str]]:
        """An embedding model's vectors, within REQUEST_TIMEOUT_S; ``x-cold-start`` as for ``unary``."""
        record, cold = await self._begin(request, model, stream=False)
        try:
            result = await asyncio.wait_for(self.backend.embed(model, call), self.settings.request_timeout_s)
        except TimeoutError:
            raise self._counted(record, await self.timed_out(model, "openai")) from None
        except Exception as exc:
            raise self._failure(record, exc, "openai") from None
        finally:
            self._waking.discard(model.name)
        if not cold:
            return result, {}
        record.cold_start_s = time.monotonic() - record.arrived
        return result, {"x-cold-start": f"{record.cold_start_s:.3f}"}

    async def streamed(
        self,
        request: Request,
        model: ModelConfig,
        call: GenerationRequest,
        render: Callable[[AsyncIterator[Any]], AsyncIterator[str]],
        render_error: Callable[[ApiError], str],
        family: Family,
    ) -> StreamingResponse:
        """SSE; errors before the model server takes the request still get their own status."""
        settings = self.settings
        check_output_budget(call, self.settings.max_output_tokens_per_request)
        record, cold = await self._begin(request, model, stream=True)
        try:
            stream = await ModelCall.open(
                self.backend.stream(model, call), settings.request_timeout_s, wait_s=settings.stream_heartbeat_s
            )
        except TimeoutError:
            self._waking.discard(model.name)
            raise self._counted(record, await self.timed_out(model, family)) from None
        except Exception as exc:
            self._waking.discard(model.name)
            raise self._failure(record, exc, family) from None

        async def waiting(elapsed: float) -> str:
            status = await self.backend.status(model)
            phase = (status.waking or {}).get("current") or status.state.replace("_", " ")
            return f"waking {model.name}: {phase} ({elapsed:.0f} s)"

        async def watched(items: AsyncIterator[Any]) -> AsyncIterator[Any]:
            async for item in record.meter(items):
                if isinstance(item, Started):
                    self._waking.discard(model.name)
                    if cold:
                        record.cold_start_s = time.monotonic() - record.arrived
                yield item

        async def body() -> AsyncIterator[str]:
            try:
                async for chunk in render(watched(stream.items(settings.stream_heartbeat_s, waiting))):
                    yield chunk
            except TimeoutError:
                error = self._counted(record, await self.timed_out(model, family))
                record.error = error.kind
                yield render_error(error)
            except Exception as exc:  # the status is sent already: the error becomes an event
                error = self._failure(record, exc, family)
                record.error = error.kind
                yield render_error(error)
            finally:
                self._waking.discard(model.name)

        return StreamingResponse(body(), media_type=sse.MEDIA_TYPE, headers=sse.HEADERS)

    async def timed_out(self, model: ModelConfig, family: Family) -> ApiError:
        """504 for a slow answer; 503 with Retry-After when the model was still waiting for room."""
        if await self.backend.waiting_for_room(model):
            retry = self.settings.retry_after_s
            message = (
                f"model {model.name!r} found no room on the cluster within REQUEST_TIMEOUT_S "
                f"(models of higher priority hold it); retry in {retry} s"
            )
            return api_error("no_room", message, retry_after_s=retry)
        return from_exception(TimeoutError(), family, self.settings.retry_after_s)
