"""The asyncio batcher with a fake batch runner (no model)."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass

import pytest

from engine.batcher import Batcher
from engine.params import Completion, SamplingParams


@dataclass
class Item:
    prompt_ids: list[int]
    params: SamplingParams
    cancelled: bool = False


def item(n: int, max_new: int = 4) -> Item:
    return Item([n], SamplingParams(max_new_tokens=max_new))


class FakeRunner:
    """A fake engine: each step takes 10 ms; an item ends after max_new_tokens steps.

    With ``join`` it admits polled items between steps, like the continuous engine.
    """

    def __init__(self, join: bool = False) -> None:
        self.batches: list[list[int]] = []
        self.joined: list[int] = []
        self.threads: set[str] = set()
        self.join = join

    def __call__(self, items, on_done, poll, max_batch_size) -> None:
        self.batches.append([i.prompt_ids[0] for i in items])
        self.threads.add(threading.current_thread().name)
        active = {id(it): [it, 0] for it in items}
        while active:
            time.sleep(0.01)
            for key, entry in list(active.items()):
                it, steps = entry
                entry[1] = steps = steps + 1
                if it.cancelled or steps >= it.params.max_new_tokens:
                    del active[key]
                    on_done(it, Completion(str(it.prompt_ids[0]), 1, steps, "cancelled" if it.cancelled else "length"))
            if self.join:
                for it in poll(max_batch_size - len(active)):
                    self.joined.append(it.prompt_ids[0])
                    active[id(it)] = [it, 0]


async def test_concurrent_submissions_share_a_batch() -> None:
    runner = FakeRunner()
    batcher = Batcher(runner, max_batch_size=8, wait_timeout_s=0.05)
    results = await asyncio.gather(*(batcher.submit(item(n)) for n in range(5)))
    assert [r.text for r in results] == ["0", "1", "2", "3", "4"]
    assert runner.batches == [[0, 1, 2, 3, 4]]
    assert all(name.startswith("generate") for name in runner.threads)
    await batcher.close()


async def test_batches_never_exceed_the_maximum() -> None:
    runner = FakeRunner()
    batcher = Batcher(runner, max_batch_size=3, wait_timeout_s=0.02)
    await asyncio.gather(*(batcher.submit(item(n)) for n in range(7)))
    assert max(len(b) for b in runner.batches) == 3
    assert sorted(n for b in runner.batches for n in b) == list(range(7))
    await batcher.close()


async def test_short_item_is_answered_before_the_batch_ends() -> None:
    batcher = Batcher(FakeRunner(), max_batch_size=8, wait_timeout_s=0.02)
    done_at: dict[str, float] = {}

    async def timed(it: Item) -> None:
        result = await batcher.submit(it)
        done_at[result.text] = time.perf_counter()

    await asyncio.gather(timed(item(1, max_new=1)), timed(item(2, max_new=30)))
    assert done_at["2"] - done_at["1"] > 0.2
    await batcher.close()


async def test_event_loop_stays_free_while_a_batch_runs() -> None:
    batcher = Batcher(FakeRunner(), max_batch_size=8, wait_timeout_s=0.0)
    task = asyncio.create_task(batcher.submit(item(1, max_new=30)))
    ticks = 0
    while not task.done():
        await asyncio.sleep(0.005)
        ticks += 1
    assert ticks > 20  # the loop kept running during the ~300 ms batch
    await batcher.close()


async def test_failed_batch_fails_every_waiter_and_recovers() -> None:
    calls = 0

    def flaky(items, on_done, poll, max_batch_size) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("boom")
        for it in items:
            on_done(it, Completion("ok", 1, 1, "length"))

    batcher = Batcher(flaky, max_batch_size=4, wait_timeout_s=0.02)
    results = await asyncio.gather(batcher.submit(item(1)), batcher.submit(item(2)), return_exceptions=True)
    assert all(isinstance(r, RuntimeError) for r in results)
    assert (await batcher.submit(item(3))).text == "ok"
    await batcher.close()


async def test_unanswered_item_fails_instead_of_hanging() -> None:
    batcher = Batcher(lambda items, on_done, poll, n: None, max_batch_size=4, wait_timeout_s=0.0)
    with pytest.raises(RuntimeError, match="without a result"):
        await asyncio.wait_for(batcher.submit(item(1)), 2)
    await batcher.close()


async def test_cancelling_a_waiter_marks_its_item() -> None:
    runner = FakeRunner()
    batcher = Batcher(runner, max_batch_size=4, wait_timeout_s=0.0)
    it = item(1, max_new=50)
    task = asyncio.create_task(batcher.submit(it))
    while not runner.batches:  # the engine has taken the item
        await asyncio.sleep(0.001)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert it.cancelled
    await batcher.close()


async def test_arrivals_join_a_running_batch() -> None:
    runner = FakeRunner(join=True)
    batcher = Batcher(runner, max_batch_size=4, wait_timeout_s=0.0)
    first = asyncio.create_task(batcher.submit(item(1, max_new=40)))
    while not runner.batches:
        await asyncio.sleep(0.005)
    late = await asyncio.wait_for(batcher.submit(item(2, max_new=3)), 1.0)
    assert late.text == "2" and not first.done(), "the late item finished inside the running batch"
    assert runner.batches == [[1]] and runner.joined == [2]
    await first
    # the batch is counted when the engine call returns, just after its last answer went out
    await asyncio.wait_for(_counted(batcher), 1.0)
    assert batcher.batch_sizes == {2: 1}
    await batcher.close()


async def test_joining_respects_the_batch_limit() -> None:
    runner = FakeRunner(join=True)
    batcher = Batcher(runner, max_batch_size=2, wait_timeout_s=0.0)
    results = await asyncio.gather(*(batcher.submit(item(n, max_new=5)) for n in range(6)))
    assert sorted(r.text for r in results) == [str(n) for n in range(6)]
    assert max(len(b) for b in runner.batches) <= 2
    await batcher.close()


async def _counted(batcher: Batcher) -> None:
    while not batcher.batch_sizes:
        await asyncio.sleep(0.001)
