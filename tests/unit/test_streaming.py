"""The batcher driving the real engine (tiny checkpoint): streams equal whole answers, readers that leave free rows."""

from __future__ import annotations

import asyncio
import contextlib
import functools
from dataclasses import replace
from pathlib import Path

import pytest

from engine.batcher import Batcher
from engine.model import EngineConfig, TextGenerator
from engine.types import Delta, SamplingParams, collect
from testing.polling import wait_for_async

PROMPTS = ["Return the number", "The socket module provides", "Raise", "A Ray Serve deployment"]
LONG = SamplingParams(max_new_tokens=110)


@pytest.fixture(scope="module")
def engine(tiny_causal: Path) -> TextGenerator:
    return TextGenerator.load(EngineConfig(model_id=str(tiny_causal), num_threads=1))


# The engine runs steps of a few milliseconds: look often.
until = functools.partial(wait_for_async, timeout=10.0, interval=0.002)


async def test_streamed_deltas_join_to_the_whole_answer(engine: TextGenerator) -> None:
    batcher = Batcher(engine.run, max_batch_size=8, wait_timeout_s=0.0)
    kinds = [
        SamplingParams(max_new_tokens=30),
        SamplingParams(max_new_tokens=30, logprobs=2),
        SamplingParams(max_new_tokens=30, temperature=1.0, seed=3, frequency_penalty=0.5),
    ]
    ids = [engine.encode([p], kinds[0])[0] for p in PROMPTS]
    free = engine.generate([ids[3]], kinds[0])[0].text
    kinds.append(SamplingParams(max_new_tokens=30, stop=("never there", free[6:9])))
    expected = [engine.generate([i], k)[0] for i, k in zip(ids, kinds, strict=True)]

    async def streamed(i: int) -> tuple[int, object]:
        deltas: list[Delta] = []
        reads = 0
        async for step in batcher.stream([ids[i]], [kinds[i]]):
            deltas.extend(step)
            reads += 1
        return reads, collect(deltas, 1, [len(ids[i])])[0]

    results = await asyncio.gather(*(streamed(i) for i in range(len(PROMPTS))))
    got = [completion for _, completion in results]
    assert [replace(c, logprobs=()) for c in got] == [replace(c, logprobs=()) for c in expected]
    # batched and alone, the log-probabilities agree up to float rounding
    assert [e.token for e in got[1].logprobs] == [e.token for e in expected[1].logprobs]
    assert [e.logprob for e in got[1].logprobs] == pytest.approx([e.logprob for e in expected[1].logprobs], abs=1e-4)
    assert results[0][0] > 1, "the answer came in one piece"
    assert expected[3].finish_reason == "stop"
    await batcher.close()


async def test_a_reader_that_leaves_frees_its_row_at_the_next_step(engine: TextGenerator) -> None:
    made_after_cancel = 0
    made: dict[int, int] = {}

    def counting_run(items, on_step, poll, max_batch_size) -> None:
        def counted(events) -> None:
            nonlocal made_after_cancel
            for item, delta in events:
                made[item.stream] = made.get(item.stream, 0) + delta.tokens
                made_after_cancel += delta.tokens if item.cancelled else 0
            on_step(events)

        engine.run(items, counted, poll, max_batch_size)

    batcher = Batcher(counting_run, max_batch_size=8, wait_timeout_s=0.0)
    ids = engine.encode(PROMPTS[:2], LONG)
    leaves = batcher.open([ids[0]], [LONG])
    stays = asyncio.create_task(_read_all(batcher, ids[1]))
    await anext(leaves)
    leaves.close()
    completion = await stays
    await until(lambda: batcher.stats()["rows_running"] == 0)
    # The row that left made at most the token of the step in flight; the other ran to its end.
    assert made_after_cancel <= 1, f"{made_after_cancel} tokens generated after the reader left"
    assert made[leaves.key] < 10 < completion.completion_tokens == made[leaves.key + 1]
    stats = batcher.stats()
    assert stats["rows_cancelled"] == 1 and stats["streams_open"] == 0 and stats["items_queued"] == 0
    await batcher.close()


async def _read_all(batcher: Batcher, ids: list[int], params: SamplingParams = LONG):
    deltas = [d async for step in batcher.stream([ids], [params]) for d in step]
    return collect(deltas, 1, [len(ids)])[0]


async def test_a_flood_of_disconnecting_readers_leaves_nothing_running(engine: TextGenerator) -> None:
    batcher = Batcher(engine.run, max_batch_size=4, wait_timeout_s=0.002)
    ids = engine.encode(PROMPTS, LONG)

    async def impatient(n: int) -> None:
        stream = batcher.open([ids[n % 4], ids[(n + 1) % 4]], [LONG, replace(LONG, logprobs=1)])
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(0.003 * (n % 4)):  # some leave before the engine takes them
                await anext(stream)
        stream.close()

    await asyncio.gather(*(impatient(n) for n in range(24)))
    await until(lambda: batcher.stats()["rows_running"] == 0)
    stats = batcher.stats()
    assert (stats["rows_running"], stats["items_queued"], stats["streams_open"]) == (0, 0, 0)
    assert stats["rows_cancelled"] == 48
    assert stats["tokens_generated"] < 24 * 2 * 20, "cancelled rows went on generating"
    # and the engine still answers as before
    params = SamplingParams(max_new_tokens=12)
    assert await _read_all(batcher, ids[0], params) == engine.generate([ids[0]], params)[0]
    await batcher.close()
