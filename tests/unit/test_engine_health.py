"""A model server whose engine stops making progress reports unhealthy, and its requests get a retryable error
at once instead of hanging (the real replacement by Serve: tests/integration/test_isolation.py)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence

import pytest

from engine.errors import StepFailedError
from engine.timing import PhaseTimer
from engine.types import Started
from engine.work import OnStep, Poll, WorkItem
from serving.model_server import ModelServer
from settings import ModelConfig
from tests.unit.test_model_server import FakeEngine, request


class HangingEngine(FakeEngine):
    """Hangs inside a batch holding a row whose prompt has exactly 5 words, until ``release`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()

    def run(self, items: Sequence[WorkItem], on_step: OnStep, poll: Poll | None = None, max_batch_size=None) -> None:
        if any(len(item.prompt_ids) == 5 for item in items):
            self.release.wait(10)
            raise RuntimeError("released")
        super().run(items, on_step, poll, max_batch_size)


@pytest.fixture
def hanging() -> HangingEngine:
    return HangingEngine()


@pytest.fixture
def server(hanging: HangingEngine) -> ModelServer:
    config = ModelConfig(name="fake", model_id="org/fake", engine_stall_timeout_s=0.3)

    def load(config: ModelConfig, timer: PhaseTimer) -> HangingEngine:
        return hanging

    return ModelServer.func_or_class(config, engine=load)


async def test_idle_and_progressing_engines_are_healthy(server: ModelServer) -> None:
    await server.check_health()
    items = [item async for item in server.stream(request("one two", max_new=50))]
    assert isinstance(items[0], Started)
    await server.check_health()


async def test_a_stalled_engine_is_unhealthy_and_its_requests_fail_retryably(
    server: ModelServer, hanging: HangingEngine
) -> None:
    async def read() -> list:
        return [item async for item in server.stream(request("a b c d e", max_new=3))]

    reader = asyncio.create_task(read())
    try:
        while server._batcher.stalled_s() == 0:
            await asyncio.sleep(0.01)
        await server.check_health()  # not yet past ENGINE_STALL_TIMEOUT_S
        while server._batcher.stalled_s() <= 0.3:
            await asyncio.sleep(0.01)
        with pytest.raises(RuntimeError, match="ENGINE_STALL_TIMEOUT_S"):
            await server.check_health()
        with pytest.raises(StepFailedError, match="no progress"):
            await asyncio.wait_for(reader, 2)
    finally:
        hanging.release.set()
