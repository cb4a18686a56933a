"""Gather concurrent prompts into batches and run them, one batch at a time, off the event loop.

Plain asyncio: no torch, no Ray. The function that runs a batch gets the items and a callback to
call (from its own thread) as each item ends, so an item that finishes early is answered early.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

from engine.params import Completion, SamplingParams

logger = logging.getLogger(__name__)


class BatchItem(Protocol):
    prompt_ids: list[int]
    params: SamplingParams
    cancelled: bool


RunBatch = Callable[[Sequence[Any], Callable[[int, Completion], None]], Any]


class _Pending:
    """A queued prompt and the future its caller awaits."""

    __slots__ = ("future", "item")

    def __init__(self, item: BatchItem, future: asyncio.Future) -> None:
        self.item = item
        self.future = future


class Batcher:
    """Runs ``run_batch`` on up to ``max_batch_size`` items gathered within ``wait_timeout_s``.

    Example::

        batcher = Batcher(engine.generate, max_batch_size=16, wait_timeout_s=0.005)
        completion = await batcher.submit(WorkItem(prompt_ids, params))
    """

    def __init__(self, run_batch: RunBatch, max_batch_size: int, wait_timeout_s: float) -> None:
        self._run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.wait_timeout_s = wait_timeout_s
        self._queue: asyncio.Queue[_Pending] | None = None
        self._task: asyncio.Task | None = None
        # One worker thread: batches run one after another, and the event loop stays free.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generate")
        self.batches_run = 0
        self.items_run = 0

    async def submit(self, item: BatchItem) -> Completion:
        """Queue ``item`` and wait for its completion; cancelling the wait cancels the item."""
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done():
            self._queue = asyncio.Queue()
            self._task = loop.create_task(self._loop(), name="batcher")
        pending = _Pending(item, loop.create_future())
        assert self._queue is not None
        self._queue.put_nowait(pending)
        try:
            return await pending.future
        except asyncio.CancelledError:
            item.cancelled = True  # the engine drops the row at its next step
            raise

    @property
    def queued(self) -> int:
        return self._queue.qsize() if self._queue is not None else 0

    async def _gather(self) -> list[_Pending]:
        assert self._queue is not None
        batch = [await self._queue.get()]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.wait_timeout_s
        while len(batch) < self.max_batch_size:
            if not self._queue.empty():
                batch.append(self._queue.get_nowait())
                continue
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), remaining))
            except TimeoutError:
                break
        return [p for p in batch if not p.item.cancelled and not p.future.done()]

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._gather()
            if not batch:
                continue

            def on_done(index: int, completion: Completion, batch: list[_Pending] = batch) -> None:
                loop.call_soon_threadsafe(_resolve, batch[index].future, completion)

            try:
                await loop.run_in_executor(self._executor, self._run_batch, [p.item for p in batch], on_done)
            except Exception as exc:  # every waiter of a failed batch hears of it
                logger.exception("batch of %d failed", len(batch))
                for p in batch:
                    loop.call_soon_threadsafe(_fail, p.future, exc)
            else:
                # on_done callbacks were queued on the loop before this await resumed, so any
                # future still open here was never answered: fail it rather than hang its caller.
                missing = RuntimeError("the batch ended without a result for this prompt")
                for p in batch:
                    _fail(p.future, missing)
            self.batches_run += 1
            self.items_run += len(batch)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._executor.shutdown(wait=False, cancel_futures=True)


def _resolve(future: asyncio.Future, completion: Completion) -> None:
    if not future.done():
        future.set_result(completion)


def _fail(future: asyncio.Future, exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
