"""Feed concurrent prompts to the engine in batches, off the event loop.

Plain asyncio and threads: no torch, no Ray. One worker thread runs the engine. When it is idle,
the first prompt to arrive starts a batch after a short wait for company (``wait_timeout_s``);
while a batch runs, the engine polls for newly arrived prompts between decoding steps, so they
join it at once (continuous batching) rather than wait for it to end. Each prompt is answered the
moment it ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections import Counter, deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

from engine.params import Completion, SamplingParams

logger = logging.getLogger(__name__)


class BatchItem(Protocol):
    prompt_ids: list[int]
    params: SamplingParams
    cancelled: bool


OnDone = Callable[[Any, Completion], None]
Poll = Callable[[int], Sequence[Any]]
# run_batch(items, on_done, poll, max_batch_size): the engine's generate().
RunBatch = Callable[[Sequence[Any], OnDone, Poll, int], Any]


class Batcher:
    """Runs ``run_batch`` in one worker thread; ``submit`` waits for one item's completion.

    Example::

        batcher = Batcher(engine.generate, max_batch_size=16, wait_timeout_s=0.005)
        completion = await batcher.submit(WorkItem(prompt_ids, params))
    """

    def __init__(self, run_batch: RunBatch, max_batch_size: int, wait_timeout_s: float) -> None:
        self._run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.wait_timeout_s = wait_timeout_s
        self._queue: deque[Any] = deque()  # items not yet taken by the engine
        self._lock = threading.Lock()  # the engine thread pops from the queue too
        self._futures: dict[int, asyncio.Future] = {}
        self._arrived: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generate")
        self.batch_sizes: Counter[int] = Counter()  # prompts per batch -> how many batches
        self.busy_s = 0.0  # time spent generating

    async def submit(self, item: BatchItem) -> Completion:
        """Queue ``item`` and wait for its completion; cancelling the wait cancels the item."""
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done():
            self._arrived = asyncio.Event()
            self._task = loop.create_task(self._loop(), name="batcher")
        future = loop.create_future()
        self._futures[id(item)] = future
        with self._lock:
            self._queue.append(item)
        assert self._arrived is not None
        self._arrived.set()
        try:
            return await future
        except asyncio.CancelledError:
            item.cancelled = True  # the engine drops the row at its next step
            raise
        finally:
            self._futures.pop(id(item), None)

    @property
    def queued(self) -> int:
        return len(self._queue)

    def _take(self, n: int) -> list[Any]:
        """Up to ``n`` queued items that are still wanted (called from either thread)."""
        taken: list[Any] = []
        with self._lock:
            while self._queue and len(taken) < n:
                item = self._queue.popleft()
                if not item.cancelled:
                    taken.append(item)
        return taken

    async def _gather(self) -> list[Any]:
        """Wait for a first item, then briefly for company, when the engine is idle."""
        assert self._arrived is not None
        while not self._queue:
            self._arrived.clear()
            await self._arrived.wait()
        if len(self._queue) < self.max_batch_size and self.wait_timeout_s > 0:
            await asyncio.sleep(self.wait_timeout_s)
        return self._take(self.max_batch_size)

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._gather()
            if not batch:
                continue
            ran: list[Any] = []

            def poll(free: int, ran: list[Any] = ran) -> list[Any]:
                more = self._take(free)
                ran.extend(more)
                return more

            def on_done(item: Any, completion: Completion) -> None:
                loop.call_soon_threadsafe(self._resolve, item, completion)

            ran.extend(batch)
            started = loop.time()
            try:
                await loop.run_in_executor(self._executor, self._run_batch, batch, on_done, poll, self.max_batch_size)
            except Exception as exc:  # every waiter of a failed batch hears of it
                logger.exception("batch of %d failed", len(ran))
                for item in ran:
                    self._fail(item, exc)
            else:
                # on_done callbacks were queued on the loop before this await resumed, so a
                # future still open here was never answered: fail it rather than hang its caller.
                for item in ran:
                    self._fail(item, RuntimeError("the batch ended without a result for this prompt"))
            self.batch_sizes[len(ran)] += 1
            self.busy_s += loop.time() - started
            logger.debug("batch of %d ran in %.3fs", len(ran), loop.time() - started)

    def _resolve(self, item: Any, completion: Completion) -> None:
        future = self._futures.get(id(item))
        if future is not None and not future.done():
            future.set_result(completion)

    def _fail(self, item: Any, exc: BaseException) -> None:
        future = self._futures.get(id(item))
        if future is not None and not future.done():
            future.set_exception(exc)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._executor.shutdown(wait=False, cancel_futures=True)
