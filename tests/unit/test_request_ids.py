"""Log lines about a request carry its id, and no line carries the id of a request it is not about.

The batcher's loop serves every request; it used to run in the context of the request that started
it, so Serve's log filter stamped that first request's id on every later line the loop wrote.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging

import pytest

from engine.batcher import Batcher
from engine.errors import StepFailedError
from engine.types import SamplingParams

# Stands in for Serve's request context (a contextvar its log filter reads).
CURRENT_REQUEST: contextvars.ContextVar[str | None] = contextvars.ContextVar("request", default=None)


class StampRequest(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request = CURRENT_REQUEST.get()
        return True


def failing_engine(items, on_step, poll, max_batch_size) -> None:
    raise RuntimeError("CUDA out of memory")


async def test_a_failed_batch_names_its_requests_and_runs_in_no_requests_context(
    caplog: pytest.LogCaptureFixture,
) -> None:
    stamp = StampRequest()
    logger = logging.getLogger("engine.batcher")
    logger.addFilter(stamp)
    try:
        with caplog.at_level(logging.ERROR, logger="engine.batcher"):
            batcher = Batcher(failing_engine, max_batch_size=4, wait_timeout_s=0.05)
            CURRENT_REQUEST.set("first")
            first = batcher.open([[1, 2]], [SamplingParams(max_new_tokens=2)], request_id="first")
            second = batcher.open([[3]], [SamplingParams(max_new_tokens=2)], request_id="second")
            for stream in (first, second):
                with pytest.raises(StepFailedError, match="retry") as failed:
                    await asyncio.wait_for(anext(stream), timeout=10)
                assert "out of memory" in str(failed.value.__cause__)
            await batcher.close()
    finally:
        logger.removeFilter(stamp)
    (record,) = caplog.records
    assert record.getMessage() == "batch of 2 rows failed (requests first, second)"
    assert record.request is None  # not stamped as the request that started the loop
