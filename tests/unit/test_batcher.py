"""The streaming batcher with a fake engine (no model): batching, streams, coalescing, cancellation, counters."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import threading
import time
import types
from collections.abc import Callable, Sequence

import pytest

from engine.batcher import Batcher, RequestStream
from engine.types import Delta, SamplingParams, collect
from engine.work import OnStep, Poll, WorkItem
from testing.polling import wait_for_async


def params(max_new: int = 4) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new)


class FakeEngine:
    """Each step takes ``step_s``; every running row gets the token ``<prompt>`` per step, as text.

    With ``join`` it admits polled items between steps and drops cancelled rows, like the
    continuous engine.
    """

    def __init__(
        self, join: bool = False, step_s: float = 0.01, after_step: Callable[[], object] | None = None
    ) -> None:
        self.batches: list[list[int]] = []
        self.joined: list[int] = []
        self.threads: set[str] = set()
        self.steps = 0
        self.join = join
        self.step_s = step_s
        self.after_step = after_step  # called on the engine's thread once a step's events are handed over

    def __call__(self, items: Sequence[WorkItem], on_step: OnStep, poll: Poll | None, max_batch_size: int) -> None:
        self.batches.append([i.prompt_ids[0] for i in items])
        self.threads.add(threading.current_thread().name)
        active = {item.key: [item, 0] for item in items}
        while active:
            events = []
            for key, entry in list(active.items()):
                item, made = entry
                if item.cancelled and self.join:
                    del active[key]
                    events.append((item, Delta(item.row, "", 0, finish_reason="cancelled")))
                    continue
                entry[1] = made = made + 1
                done = made >= item.params.max_new_tokens
                if done:
                    del active[key]
                events.append(
                    (item, Delta(item.row, str(item.prompt_ids[0]), 1, finish_reason="length" if done else None))
                )
            time.sleep(self.step_s)
            self.steps += 1
            on_step(events)
            if self.after_step is not None:
                self.after_step()
            if self.join and poll is not None:
                for item in poll(max_batch_size - len(active)):
                    self.joined.append(item.prompt_ids[0])
                    active[item.key] = [item, 0]


async def answer(batcher: Batcher, prompts: list[int], max_new: int = 4) -> list[str]:
    deltas = [
        d
        for ds in [x async for x in batcher.stream([[p] for p in prompts], [params(max_new)] * len(prompts))]
        for d in ds
    ]
    return [c.text for c in collect(deltas, len(prompts), [1] * len(prompts))]


# The engine runs steps of a few milliseconds: look often.
until = functools.partial(wait_for_async, timeout=5.0, interval=0.002)


async def test_concurrent_streams_share_a_batch() -> None:
    engine = FakeEngine()
    batcher = Batcher(engine, max_batch_size=8, wait_timeout_s=0.05)
    results = await asyncio.gather(*(answer(batcher, [n]) for n in range(5)))
    assert results == [[str(n) * 4] for n in range(5)]
    assert engine.batches == [[0, 1, 2, 3, 4]]
    assert all(name.startswith("generate") for name in engine.threads)
    await batcher.close()


async def test_batches_never_exceed_the_maximum() -> None:
    engine = FakeEngine()
    batcher = Batcher(engine, max_batch_size=3, wait_timeout_s=0.02)
    await asyncio.gather(*(answer(batcher, [n]) for n in range(7)))
    assert max(len(b) for b in engine.batches) == 3
    assert sorted(n for b in engine.batches for n in b) == list(range(7))
    await batcher.close()


async def test_a_request_of_several_rows_is_one_stream() -> None:
    engine = FakeEngine()
    batcher = Batcher(engine, max_batch_size=8, wait_timeout_s=0.0)
    assert await answer(batcher, [1, 2, 3], max_new=3) == ["111", "222", "333"]
    assert engine.batches == [[1, 2, 3]]
    await batcher.close()


async def test_deltas_arrive_as_the_engine_makes_them() -> None:
    # The engine takes its next step only once the reader has its delta (or 10 s have passed): a batcher
    # that held a step's delta back until later steps would show it in the step counts, however loaded the
    # machine, and no step's timing matters.
    read = threading.Semaphore(0)
    engine = FakeEngine(step_s=0.0, after_step=lambda: read.acquire(timeout=10))
    batcher = Batcher(engine, max_batch_size=8, wait_timeout_s=0.0)
    arrivals = []
    async for deltas in batcher.stream([[7]], [params(20)]):
        arrivals.append((engine.steps, deltas))
        read.release()
    assert [steps for steps, _ in arrivals] == list(range(1, 21)), "a delta waited for later steps"
    assert all(len(deltas) == 1 and deltas[0].tokens == 1 for _, deltas in arrivals)
    await batcher.close()


async def test_a_slow_reader_gets_joined_deltas_not_a_backlog() -> None:
    engine = FakeEngine(step_s=0.005)
    batcher = Batcher(engine, max_batch_size=8, wait_timeout_s=0.0)
    received: list[tuple[Delta, ...]] = []
    async for deltas in batcher.stream([[3], [4]], [params(40), params(30)]):
        received.append(deltas)
        await asyncio.sleep(0.05)  # ten engine steps per read
    assert len(received) < 15, f"{len(received)} reads for 40 steps: deltas were not joined"
    assert all(len({d.index for d in deltas}) == len(deltas) for deltas in received)  # one entry per row
    completions = collect([d for ds in received for d in ds], 2, [1, 1])
    assert [c.text for c in completions] == ["3" * 40, "4" * 30]
    assert [c.completion_tokens for c in completions] == [40, 30]
    assert any(d.tokens > 1 for ds in received for d in ds)
    await batcher.close()


async def test_one_loop_callback_per_engine_step() -> None:
    engine = FakeEngine(join=True)
    batcher = Batcher(engine, max_batch_size=8, wait_timeout_s=0.02)
    calls = 0
    dispatch = batcher._dispatch

    def counting(events, at):
        nonlocal calls
        calls += 1
        dispatch(events, at)

    batcher._dispatch = counting  # type: ignore[method-assign]
    await asyncio.gather(*(answer(batcher, [n, n + 10], max_new=6) for n in range(4)))
    assert calls == engine.steps == 6
    await batcher.close()


async def test_short_stream_ends_before_the_batch_does() -> None:
    batcher = Batcher(FakeEngine(), max_batch_size=8, wait_timeout_s=0.02)
    done_at: dict[int, float] = {}

    async def timed(n: int, max_new: int) -> None:
        await answer(batcher, [n], max_new)
        done_at[n] = time.perf_counter()

    await asyncio.gather(timed(1, 1), timed(2, 30))
    assert done_at[2] - done_at[1] > 0.2
    await batcher.close()


async def test_event_loop_stays_free_while_a_batch_runs() -> None:
    batcher = Batcher(FakeEngine(), max_batch_size=8, wait_timeout_s=0.0)
    task = asyncio.create_task(answer(batcher, [1], max_new=30))
    ticks = 0
    while not task.done():
        await asyncio.sleep(0.005)
        ticks += 1
    assert ticks > 20  # the loop kept running during the ~300 ms batch
    await batcher.close()


async def test_failed_batch_fails_every_reader_and_recovers() -> None:
    calls = 0

    def flaky(items, on_step, poll, max_batch_size) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("boom")
        on_step([(it, Delta(it.row, "ok", 1, finish_reason="length")) for it in items])

    batcher = Batcher(flaky, max_batch_size=4, wait_timeout_s=0.02)
    results = await asyncio.gather(answer(batcher, [1]), answer(batcher, [2]), return_exceptions=True)
    assert all(isinstance(r, RuntimeError) for r in results)
    assert await answer(batcher, [3]) == ["ok"]
    assert batcher.stats()["rows_running"] == 0 and batcher.stats()["streams_open"] == 0
    await batcher.close()


async def test_unfinished_row_fails_instead_of_hanging() -> None:
    batcher = Batcher(lambda items, on_step, poll, n: None, max_batch_size=4, wait_timeout_s=0.0)
    with pytest.raises(RuntimeError, match="without finishing"):
        await asyncio.wait_for(answer(batcher, [1]), 2)
    await batcher.close()


async def test_closing_a_stream_cancels_its_rows_and_the_engine_stops_them() -> None:
    engine = FakeEngine(join=True)
    batcher = Batcher(engine, max_batch_size=4, wait_timeout_s=0.0)
    stream = batcher.stream([[1], [2]], [params(500), params(500)])
    first = await anext(stream)
    assert first and batcher.stats()["rows_running"] == 2
    await stream.aclose()
    await until(lambda: batcher.stats()["rows_running"] == 0)
    stats = batcher.stats()
    assert stats["rows_cancelled"] == 2 and stats["streams_open"] == 0
    assert stats["tokens_generated"] < 20
    await batcher.close()


async def test_a_cancelled_reader_task_cancels_its_rows() -> None:
    engine = FakeEngine(join=True)
    batcher = Batcher(engine, max_batch_size=4, wait_timeout_s=0.0)
    task = asyncio.create_task(answer(batcher, [1], max_new=500))
    await until(lambda: batcher.stats()["tokens_generated"] > 0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await until(lambda: batcher.stats()["rows_running"] == 0)
    assert batcher.stats()["rows_cancelled"] == 1 and batcher.stats()["tokens_generated"] < 20
    await batcher.close()


async def test_after_a_flood_of_disconnecting_readers_the_counters_return_to_zero() -> None:
    engine = FakeEngine(join=True)
    batcher = Batcher(engine, max_batch_size=4, wait_timeout_s=0.0)

    async def impatient(n: int) -> None:
        stream = batcher.open([[n], [n + 100]], [params(200), params(200)])
        with contextlib.suppress(asyncio.TimeoutError):
            async with asyncio.timeout(0.01 * (n % 5)):  # some leave while still queued
                await anext(stream)
        stream.close()

    await asyncio.gather(*(impatient(n) for n in range(30)))
    assert await answer(batcher, [9], max_new=3) == ["999"]  # still serving
    await until(lambda: batcher.stats()["rows_running"] == 0)
    stats = batcher.stats()
    assert (stats["rows_running"], stats["items_queued"], stats["streams_open"]) == (0, 0, 0)
    assert stats["rows_cancelled"] == 60
    await batcher.close()


async def test_arrivals_join_a_running_batch() -> None:
    engine = FakeEngine(join=True)
    batcher = Batcher(engine, max_batch_size=4, wait_timeout_s=0.0)
    first = asyncio.create_task(answer(batcher, [1], max_new=40))
    while not engine.batches:
        await asyncio.sleep(0.005)
    late = await asyncio.wait_for(answer(batcher, [2], max_new=3), 1.0)
    assert late == ["222"] and not first.done(), "the late request finished inside the running batch"
    assert engine.batches == [[1]] and engine.joined == [2]
    await first
    await until(lambda: bool(batcher.batch_sizes))  # counted when the engine call returns
    assert batcher.batch_sizes == {2: 1}
    assert batcher.stats()["tokens_generated"] == 43
    await batcher.close()


async def test_joining_respects_the_batch_limit() -> None:
    engine = FakeEngine(join=True)
    batcher = Batcher(engine, max_batch_size=2, wait_timeout_s=0.0)
    results = await asyncio.gather(*(answer(batcher, [n], max_new=5) for n in range(6)))
    assert sorted(r[0] for r in results) == [str(n) * 5 for n in range(6)]
    assert max(len(b) for b in engine.batches) <= 2
    await batcher.close()


async def test_admission_time_is_recorded_when_the_engine_takes_the_first_row() -> None:
    batcher = Batcher(FakeEngine(), max_batch_size=4, wait_timeout_s=0.05)
    opened = time.monotonic()
    stream = batcher.open([[1]], [params(2)])
    assert stream.admitted_at is None
    async for _ in stream:
        pass
    assert stream.admitted_at is not None and stream.admitted_at - opened >= 0.04  # waited for company
    await batcher.close()


async def test_the_engine_times_each_token_when_its_step_ends_however_late_it_is_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    engine = FakeEngine(join=True, step_s=0.001)
    # The batcher's clock reads the engine's step count: step k ends at k seconds, whenever it is read.
    monkeypatch.setattr("engine.batcher.time", types.SimpleNamespace(monotonic=lambda: float(engine.steps)))
    batcher = Batcher(engine, max_batch_size=8, wait_timeout_s=0.0)
    stream = batcher.open([[3], [4]], [params(20), params(10)])
    async for _ in stream:
        await asyncio.sleep(0.01)  # a slow reader: several steps per read, joined
    assert stream.first_token_at == 1.0
    assert stream.token_gaps == [1.0] * (19 + 9)  # every token after each row's first, one step apart
    await batcher.close()


async def test_a_stream_interval_joins_the_steps_made_between_reads() -> None:
    batcher = Batcher(FakeEngine(join=True, step_s=0.001), max_batch_size=8, wait_timeout_s=0.0, stream_interval_s=0.2)
    stream = batcher.open([[3], [4]], [params(200), params(150)])
    received = [deltas async for deltas in stream]  # a reader that is always ready
    assert len(received) <= 50, f"{len(received)} messages for 200 steps: the interval joined nothing"
    completions = collect([d for ds in received for d in ds], 2, [1, 1])
    assert [c.text for c in completions] == ["3" * 200, "4" * 150]
    assert [c.finish_reason for c in completions] == ["length", "length"]
    await batcher.close()


async def test_a_stream_interval_holds_neither_the_first_token_nor_the_end() -> None:
    batcher = Batcher(FakeEngine(join=True, step_s=0.001), max_batch_size=8, wait_timeout_s=0.0, stream_interval_s=1.0)
    began = time.monotonic()
    received = [deltas async for deltas in batcher.open([[3]], [params(3)])]
    assert time.monotonic() - began < 0.9  # neither read waited for the 1 s interval
    assert len(received) <= 2 and received[-1][-1].finish_reason == "length"  # the end came with the rest
    assert "".join(d.text for ds in received for d in ds) == "333"
    await batcher.close()


async def test_a_held_read_leaves_with_the_first_step_after_its_interval() -> None:
    """Held reads are woken by the engine's steps, not by timers of their own: a held read whose interval has
    passed waits for the next step (tokens come only with steps) and leaves with it, its tokens joined."""
    gate = threading.Semaphore(0)  # the engine waits here after each step
    engine = FakeEngine(join=True, step_s=0.0, after_step=lambda: gate.acquire(timeout=10))
    batcher = Batcher(engine, max_batch_size=4, wait_timeout_s=0.0, stream_interval_s=5.0)
    stream = batcher.open([[7]], [params(4)])
    assert [d.text for d in await stream.__anext__()] == ["7"]  # step 1: the first read is never held
    reader = asyncio.create_task(stream.__anext__())
    gate.release()  # step 2, well within the 5 s interval: the read holds its token
    await until(lambda: stream._due is not None)
    stream._due = time.monotonic()  # as if the interval had passed now (no 5 s wait in a test)
    for _ in range(20):  # the loop turns over, and nothing but a step can wake the read
        await asyncio.sleep(0)
    assert not reader.done()  # no step has ended since: nothing new to send, no wake-up
    gate.release()  # step 3
    assert [(d.text, d.tokens) for d in await asyncio.wait_for(reader, 2)] == [("77", 2)]
    gate.release(10)
    assert "".join(d.text for ds in [x async for x in stream] for d in ds) == "7"  # step 4, the end: not held
    await batcher.close()


async def test_streams_share_a_message_budget() -> None:
    """STREAM_MESSAGES_PER_S: with S streams open each reads at most S / budget times a second."""
    # One stream, 1 / 1000 s between reads: shorter than a step, so every step leaves as its own message.
    # The engine steps only once the reader has its delta (as in test_deltas_arrive_as_the_engine_makes_them),
    # so that a reader the machine wakes late cannot join two steps: that made this test fail now and then.
    read = threading.Semaphore(0)
    engine = FakeEngine(join=True, step_s=0.002, after_step=lambda: read.acquire(timeout=10))
    batcher = Batcher(engine, max_batch_size=8, wait_timeout_s=0.0, stream_messages_per_s=1000)
    alone_stream = batcher.open([[3]], [params(20)])
    assert batcher.read_interval_s() == 0.001
    alone = []
    async for deltas in alone_stream:
        alone.append((engine.steps, deltas))
        read.release()
    assert [steps for steps, _ in alone] == list(range(1, 21))
    assert all(len(deltas) == 1 and deltas[0].tokens == 1 for _, deltas in alone)
    engine.after_step = None  # the engine runs freely from here
    batcher.stream_messages_per_s = 40
    streams = [batcher.open([[4 + i]], [params(100)]) for i in range(4)]
    assert batcher.read_interval_s() == 0.1

    async def read(stream: RequestStream) -> list[tuple[Delta, ...]]:
        return [deltas async for deltas in stream]

    began = time.monotonic()
    together = await asyncio.gather(*(read(s) for s in streams))
    took = time.monotonic() - began
    # Four streams of 100 steps of 2 ms or more: each read at most every 4 / 40 = 0.1 s, not every step
    # (however long the steps took on a loaded machine: the first read and the end are never held).
    assert all(len(messages) <= took / 0.1 + 3 for messages in together), (took, [len(m) for m in together])
    assert all(len(messages) < 50 for messages in together), [len(m) for m in together]
    for i, messages in enumerate(together):
        assert "".join(d.text for ds in messages for d in ds) == str(4 + i) * 100
    assert batcher.read_interval_s() == 0.0  # every stream has closed
    # A whole answer (collected in the replica) takes no share, and its reader wakes when its row ends, not at
    # every step: one read of the 50 steps, joined.
    whole = batcher.open([[8]], [params(50)], streamed=False)
    assert batcher.read_interval_s() == 0.0
    assert [deltas async for deltas in whole] == [(Delta(0, "8" * 50, 50, finish_reason="length"),)]
    await batcher.close()


async def test_a_reader_that_leaves_while_its_read_is_held_is_cancelled() -> None:
    # The cancel and a delivery that wakes the held read come in the same loop turn: the reader is
    # cancelled all the same (Python 3.11's asyncio.wait_for returned the read's result and dropped it).
    release = threading.Event()
    batcher = Batcher(lambda *_: release.wait(), max_batch_size=4, wait_timeout_s=0.0, stream_interval_s=5.0)
    stream = batcher.open([[3]], [params(100)])
    stream._deliver(Delta(0, "a", 1), time.monotonic())
    assert [d.text for d in await stream.__anext__()] == ["a"]  # the first read is never held
    stream._deliver(Delta(0, "b", 1), time.monotonic())
    reader = asyncio.create_task(stream.__anext__())
    await until(lambda: stream._wake._waiters)  # the read is held for the 5 s interval
    stream._deliver(Delta(0, "c", 1), stream._due)  # a step that ends at its due time wakes the held read...
    reader.cancel()  # ...and its reader goes away in the same turn
    done, _ = await asyncio.wait({reader}, timeout=2)
    assert reader in done and reader.cancelled()
    stream.close()
    assert batcher.stats()["rows_cancelled"] == 1
    release.set()
    await batcher.close()
