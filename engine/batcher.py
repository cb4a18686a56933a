"""Feed concurrent requests to the engine in batches, off the event loop, and stream their deltas back.

Plain asyncio and threads: no torch, no Ray. One worker thread runs the engine. When it is idle,
the first request to arrive starts a batch after a short wait for company (``wait_timeout_s``);
while a batch runs, the engine polls for newly arrived rows between decoding steps, so they join
it at once (continuous batching) rather than wait for it to end.

Every request is a stream. After each decoding step the engine thread hands over that step's
deltas in one ``call_soon_threadsafe`` call, and each request's reader receives its rows' deltas.
A reader slower than the engine is not sent a backlog: consecutive deltas of a row it has not
read yet are joined into one (:meth:`Delta.joined`). A step wakes only the readers that want it:
a streamed request's reader that waits for its next delta, and any reader whose row ended or
failed. A streamed reader that holds its next message back (``read_interval_s``) and a whole
answer's reader are not woken by every step: with 16 streams each step would otherwise run 16
reader tasks on the event loop, whose Python competes with the engine thread's for the GIL.
A reader that stops (``aclose()``, its task cancelled, the generator dropped) cancels its rows,
and the engine drops them at its next step.

Failures stay where they belong. A row that failed alone (its delta ends with ``error``) fails
its own request with :class:`~engine.errors.RowFailedError` and cancels that request's other rows;
every other request runs on. A failed engine call (a step that ran out of memory...) fails the
requests whose rows it held with :class:`~engine.errors.StepFailedError` (retryable), and the
next batch starts as usual: the replica keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import itertools
import logging
import threading
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from engine.admission import BatchShape, TokenBudget
from engine.errors import RowFailedError, StepFailedError
from engine.types import Delta, SamplingParams
from engine.work import RunBatch, WorkItem

logger = logging.getLogger(__name__)


class RequestStream:
    """The deltas of one request's rows, as an async iterator of ``tuple[Delta, ...]``.

    Iteration ends when every row has finished. :meth:`close` (also on ``aclose()``) cancels the
    rows still running; call it when the reader stops early. Made by :meth:`Batcher.open`.
    """

    def __init__(
        self, batcher: Batcher, key: int, items: list[WorkItem], request_id: str = "", streamed: bool = True
    ) -> None:
        self.key = key
        self.items = items
        self.request_id = request_id  # for log lines written outside the request's own context
        self._batcher = batcher
        self._pending: dict[int, list[Delta]] = {}  # row -> its deltas not yet read
        self._open_rows = len(items)
        self._wake = asyncio.Event()
        self._listening = False  # the reader waits for any delta (a streamed one, not holding back)
        self._error: BaseException | None = None
        # When the step that made its first token ended, and the gaps between each row's tokens' steps.
        self.first_token_at: float | None = None
        self.token_gaps: list[float] = []
        self._row_token_at: dict[int, float] = {}
        # A streamed request's reads leave as messages, spaced (Batcher.read_interval_s); a whole one's never.
        self.streamed = streamed
        self._read_at: float | None = None
        self._due: float | None = None  # while held: the read waits for the first step that ends after this

    @property
    def admitted_at(self) -> float | None:
        """When the engine took this request's first row (``time.monotonic()``), None before."""
        times = [item.admitted_at for item in self.items if item.admitted_at is not None]
        return min(times, default=None)

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> tuple[Delta, ...]:
        while not self._pending:
            if self._error is not None:
                self.close()
                raise self._error
            if self._open_rows == 0:
                self.close()
                raise StopAsyncIteration
            self._wake.clear()
            self._listening = self.streamed  # a whole answer's reader wakes for a row's end only
            try:
                await self._wake.wait()
            finally:
                self._listening = False
        if self.streamed:
            await self._hold()
        deltas = tuple(map(Delta.joined, self._pending.values()))
        self._pending.clear()
        return deltas

    async def _hold(self) -> None:
        """Until the read interval has passed since the last read (the first read is never held), so that the
        steps made meanwhile leave joined, in one message; the request's end or a failure is not held.

        The read is woken by the first engine step that ends once the interval has passed (``_deliver``),
        not by a timer of its own: tokens come only with steps, and every held stream that is due then
        reads in the event loop's one wake-up for that step. Timers spread over the interval woke the loop
        once per stream (100 times a second under the message budget), and each wake-up takes the GIL from
        the engine thread between its kernels: streamed answers with staggered ends made 0.86-0.92x the
        requests/s of the same answers at once (16 clients).
        """
        now = time.monotonic()
        if self._read_at is not None and (due := self._read_at + self._batcher.read_interval_s()) > now:
            self._due = due
            try:
                while self._open_rows and self._error is None and self._due is not None:
                    self._wake.clear()
                    await self._wake.wait()
            finally:
                self._due = None
            now = time.monotonic()
        self._read_at = now

    def close(self) -> None:
        """Stop reading: rows still queued or running are cancelled (idempotent)."""
        self._batcher._close(self)

    async def aclose(self) -> None:
        self.close()

    # --- called on the event loop by the batcher ---------------------------------------------
    def _deliver(self, delta: Delta, at: float) -> None:
        """``delta`` of one of this request's rows, from the engine step that ended at ``at``."""
        if delta.tokens:
            last = self._row_token_at.get(delta.index)
            if last is None:
                if self.first_token_at is None:
                    self.first_token_at = at
            else:  # several tokens in one step (text held back, then released) share its time
                self.token_gaps.extend([(at - last) / delta.tokens] * delta.tokens)
            self._row_token_at[delta.index] = at
        if delta.finish_reason in ("error", "aborted"):
            self._open_rows -= 1
            if self._error is None:
                self._error = _row_error(delta, len(self.items))
            self._wake.set()
            return
        self._pending.setdefault(delta.index, []).append(delta)
        if delta.finish_reason is not None:
            self._open_rows -= 1
            self._wake.set()
        elif self._listening:
            self._wake.set()
        elif self._due is not None and at >= self._due:  # a held read whose interval has passed
            self._due = None
            self._wake.set()

    def _fail(self, error: BaseException) -> None:
        self._error = error
        self._wake.set()


class Batcher:
    """Runs ``run_batch`` (the engine's ``run``) in one worker thread for every open stream.

    Example::

        batcher = Batcher(engine.run, max_batch_size=16, wait_timeout_s=0.005)
        async for deltas in batcher.stream([prompt_ids], [params]):
            ...  # tuple of Delta, one per row that advanced
    """

    def __init__(
        self,
        run_batch: RunBatch,
        max_batch_size: int,
        wait_timeout_s: float,
        budget: TokenBudget | None = None,
        stream_interval_s: float = 0.0,
        stream_messages_per_s: float = 0.0,
    ) -> None:
        self._run_batch = run_batch
        # Streamed requests' reads (RequestStream): each stream at most one read per stream_interval_s, and all
        # together about stream_messages_per_s (0: no bound), so that streaming costs a bounded share of the CPU.
        self.stream_interval_s = stream_interval_s
        self.stream_messages_per_s = stream_messages_per_s
        self._streamed = 0  # open streams whose reads leave as messages
        self.max_batch_size = max_batch_size
        self.wait_timeout_s = wait_timeout_s
        self.budget = budget or TokenBudget(None)  # which queued rows fit the running batch (engine.admission)
        self._queue: deque[WorkItem] = deque()  # items not yet taken by the engine
        self._lock = threading.Lock()  # the engine thread takes items and counts too
        self._streams: dict[int, RequestStream] = {}
        self._keys = itertools.count(1)
        self._arrived: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generate")
        self.batch_sizes: Counter[int] = Counter()  # rows per engine call -> how many calls
        self.busy_s = 0.0  # time spent generating
        self.rows_running = 0  # taken by the engine, not finished
        self.rows_cancelled = 0  # rows whose reader went away before they finished (total)
        self.tokens_generated = 0  # total
        self.budget_waits = 0  # polls that left a row queued because the batch's token budget was full (total)
        self._progress_at: float | None = None  # while a batch runs: when it began or last finished a step

    # --- requests --------------------------------------------------------------------------
    def open(
        self,
        prompt_ids: Sequence[list[int]],
        params: Sequence[SamplingParams],
        request_id: str = "",
        streamed: bool = True,
    ) -> RequestStream:
        """Queue one request's rows (row ``i``: ``prompt_ids[i]`` with ``params[i]``); read the stream.

        ``streamed``: its reads leave the replica one message each (spaced by :meth:`read_interval_s`);
        False for an answer collected whole in the replica, whose reads are never held.
        """
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done():
            self._arrived = asyncio.Event()
            # A context of its own: the loop serves every request, so it must not log as the first one.
            self._task = loop.create_task(self._loop(), name="batcher", context=contextvars.Context())
        key = next(self._keys)
        items = [
            WorkItem(stream=key, row=row, prompt_ids=ids, params=p)
            for row, (ids, p) in enumerate(zip(prompt_ids, params, strict=True))
        ]
        stream = RequestStream(self, key, items, request_id, streamed)
        self._streams[key] = stream
        self._streamed += streamed
        with self._lock:
            self._queue.extend(items)
        assert self._arrived is not None
        self._arrived.set()
        return stream

    async def stream(
        self, prompt_ids: Sequence[list[int]], params: Sequence[SamplingParams]
    ) -> AsyncIterator[tuple[Delta, ...]]:
        """:meth:`open` as an async generator: stopping it early (aclose, cancel) cancels the rows."""
        stream = self.open(prompt_ids, params)
        try:
            async for deltas in stream:
                yield deltas
        finally:
            stream.close()

    def stats(self) -> dict[str, Any]:
        sizes = self.batch_sizes
        return {
            "batches": sum(sizes.values()),
            "rows": sum(size * n for size, n in sizes.items()),
            "batch_sizes": dict(sorted(sizes.items())),
            "busy_s": round(self.busy_s, 3),
            "rows_running": self.rows_running,
            "items_queued": len(self._queue),
            "streams_open": len(self._streams),
            "stream_read_interval_s": round(self.read_interval_s(), 4),
            "rows_cancelled": self.rows_cancelled,
            "tokens_generated": self.tokens_generated,
            "budget_waits": self.budget_waits,
        }

    def read_interval_s(self) -> float:
        """Least time between two reads of one streamed request, now.

        The streams share ``stream_messages_per_s``: with S of them open each reads at most S / budget
        times a second (at least ``stream_interval_s`` apart). One stream alone reads at every step;
        under load each message carries the several steps made since its stream's last read.
        """
        spread = self._streamed / self.stream_messages_per_s if self.stream_messages_per_s > 0 else 0.0
        return max(self.stream_interval_s, spread)

    def _close(self, stream: RequestStream) -> None:
        if self._streams.pop(stream.key, None) is None:
            return
        self._streamed -= stream.streamed
        with self._lock:
            unfinished = [item for item in stream.items if not item.finished]
            for item in unfinished:
                item.cancelled = True
            self.rows_cancelled += len(unfinished)
            if any(item.admitted_at is None for item in unfinished):  # still queued: out of the queue now
                self._queue = deque(item for item in self._queue if item.stream != stream.key)

    # --- the engine side ----------------------------------------------------------------------
    def _take(self, n: int, shape: BatchShape | None = None) -> list[WorkItem]:
        """Up to ``n`` queued items that are still wanted and fit the batch of ``shape`` (either thread).

        The first item that does not fit the token budget stays at the head of the queue, and so
        does everything behind it: it joins when enough rows have left. Past the budget's prompt
        tokens per poll, the rest wait for the next poll (the engine's next step).
        """
        taken: list[WorkItem] = []
        now = time.monotonic()
        admission = self.budget.round(shape)
        with self._lock:
            while self._queue and len(taken) < n:
                item = self._queue[0]
                if item.cancelled:
                    self._queue.popleft()
                    continue
                if not admission.admit(len(item.prompt_ids), item.params.max_new_tokens):
                    if admission.refused == "cache":  # (not the step's prompt tokens: those join next step)
                        self.budget_waits += 1
                    break
                self._queue.popleft()
                item.admitted_at = now
                taken.append(item)
            self.rows_running += len(taken)
        return taken

    async def _gather(self) -> list[WorkItem]:
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
            ran: list[WorkItem] = list(batch)

            def poll(free: int, shape: BatchShape | None = None, ran: list[WorkItem] = ran) -> list[WorkItem]:
                more = self._take(free, shape)
                ran.extend(more)
                return more

            def on_step(events: list[tuple[WorkItem, Delta]]) -> None:
                self._progress_at = now = time.monotonic()
                with self._lock:
                    for item, delta in events:
                        self.tokens_generated += delta.tokens
                        if delta.finish_reason is not None and not item.finished:
                            item.finished = True
                            self.rows_running -= 1
                loop.call_soon_threadsafe(self._dispatch, events, now)  # once per step, whatever the rows

            started = loop.time()
            error: BaseException | None = None
            self._progress_at = time.monotonic()
            try:
                await loop.run_in_executor(self._executor, self._run_batch, batch, on_step, poll, self.max_batch_size)
            except Exception as exc:  # every reader of a failed batch hears of it; the next batch runs
                logger.exception("batch of %d rows failed (requests %s)", len(ran), self._request_ids(ran))
                error = StepFailedError(
                    f"the model's engine failed a decoding step ({type(exc).__name__}) while this request was in "
                    "it; the replica carries on, retry the request"
                )
                error.__cause__ = exc
            finally:
                self._progress_at = None
            # Dispatches were queued on the loop before this await resumed, so a row not finished
            # here never will be: fail its reader rather than leave it waiting.
            with self._lock:
                orphans = [item for item in ran if not item.finished]
                for item in orphans:
                    item.finished = True
                self.rows_running -= len(orphans)
            for item in orphans:
                stream = self._streams.get(item.stream)
                if stream is not None:
                    stream._fail(error or RuntimeError("the batch ended without finishing this row"))
            self.batch_sizes[len(ran)] += 1
            self.busy_s += loop.time() - started
            logger.debug("batch of %d rows ran in %.3fs", len(ran), loop.time() - started)

    def stalled_s(self) -> float:
        """How long the engine has worked on a batch without finishing a step (0 when idle)."""
        at = self._progress_at
        return 0.0 if at is None else time.monotonic() - at

    def fail_open_streams(self, error: BaseException) -> int:
        """Fail every open stream with ``error`` and cancel its rows (a stalled engine); how many."""
        streams = list(self._streams.values())
        for stream in streams:
            stream._fail(error)
            self._close(stream)
        return len(streams)

    def _request_ids(self, items: Sequence[WorkItem]) -> str:
        streams = (self._streams.get(key) for key in dict.fromkeys(item.stream for item in items))
        return ", ".join(stream.request_id or "?" for stream in streams if stream is not None)

    def _dispatch(self, events: list[tuple[WorkItem, Delta]], at: float) -> None:
        for item, delta in events:
            stream = self._streams.get(item.stream)
            if stream is not None:  # a closed stream's rows may still report their last step
                stream._deliver(delta, at)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._executor.shutdown(wait=False, cancel_futures=True)


def _row_error(delta: Delta, rows: int) -> Exception:
    """The error a request gets when one of its rows ended in failure (no internals: a type name)."""
    which = f"row {delta.index}" if rows > 1 else "its row"
    cause = f" ({delta.error})" if delta.error else ""
    if delta.finish_reason == "aborted":
        return StepFailedError(
            f"the model's engine failed a step holding this request's {which}{cause}; the replica carries on, "
            "retry the request"
        )
    return RowFailedError(
        f"generating this request's {which} failed{cause}; other requests were not affected. "
        "The server log has the details."
    )
