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
    """Answers each item with its prompt id; an item ends after max_new_tokens 'steps' of 10 ms."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.threads: set[str] = set()

    def __call__(self, items, on_done) -> None:
        self.batches.append([i.prompt_ids[0] for i in items])
        self.threads.add(threading.current_thread().name)
        for step in range(1, max(i.params.max_new_tokens for i in items) + 1):
            time.sleep(0.01)
            for index, it in enumerate(items):
                if it.params.max_new_tokens == step:
                    on_done(index, Completion(str(it.prompt_ids[0]), 1, step, "length"))


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

    def flaky(items, on_done) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("boom")
        for index in range(len(items)):
            on_done(index, Completion("ok", 1, 1, "length"))

    batcher = Batcher(flaky, max_batch_size=4, wait_timeout_s=0.02)
    results = await asyncio.gather(batcher.submit(item(1)), batcher.submit(item(2)), return_exceptions=True)
    assert all(isinstance(r, RuntimeError) for r in results)
    assert (await batcher.submit(item(3))).text == "ok"
    await batcher.close()


async def test_unanswered_item_fails_instead_of_hanging() -> None:
    batcher = Batcher(lambda items, on_done: None, max_batch_size=4, wait_timeout_s=0.0)
    with pytest.raises(RuntimeError, match="without a result"):
        await asyncio.wait_for(batcher.submit(item(1)), 2)
    await batcher.close()


async def test_cancelling_a_waiter_marks_its_item() -> None:
    batcher = Batcher(FakeRunner(), max_batch_size=4, wait_timeout_s=0.0)
    it = item(1, max_new=50)
    task = asyncio.create_task(batcher.submit(it))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert it.cancelled
    await batcher.close()
