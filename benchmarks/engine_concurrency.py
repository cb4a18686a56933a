"""Concurrency in-process: our batcher + engine against one plain ``generate()`` at a time.

    python -m benchmarks.engine_concurrency [--model PATH] [--device cuda] [--concurrency 1 2 4 8 16 32]

The service's model path without Ray and HTTP: C asyncio clients submit greedy prompts (varied
lengths, 32 new tokens) to the Generator's own Batcher over the engine (continuous batching),
and, in the same run on the same loaded model, to a baseline that runs Hugging Face ``generate``
for one request at a time, as the plain Ray Serve example does. For hosts where Ray is not
installed (the GPU machine); ``benchmarks.throughput`` measures the full service over HTTP.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from benchmarks.checkpoints import random_checkpoint
from benchmarks.common import PROMPTS, RESULTS, percentile, plot_concurrency, write_results
from engine.batcher import Batcher
from engine.model import EngineConfig, TextGenerator, WorkItem
from engine.params import SamplingParams

logger = logging.getLogger("engine_concurrency")


class PlainBaseline:
    """One ``model.generate`` per request, one at a time, in a worker thread."""

    def __init__(self, engine: TextGenerator) -> None:
        self.engine = engine
        self.executor = ThreadPoolExecutor(max_workers=1)

    def _run(self, ids: list[int], new_tokens: int) -> int:
        with torch.inference_mode():
            out = self.engine.model.generate(
                torch.tensor([ids], device=self.engine.device),
                attention_mask=torch.ones((1, len(ids)), dtype=torch.long, device=self.engine.device),
                max_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=self.engine.pad_id,
            )
        return out.shape[1] - len(ids)

    async def __call__(self, ids: list[int], new_tokens: int) -> int:
        return await asyncio.get_running_loop().run_in_executor(self.executor, self._run, ids, new_tokens)


async def closed_loop(call, prompts: list[list[int]], concurrency: int, rounds: int) -> dict[str, Any]:
    latencies: list[float] = []
    tokens = 0

    async def client(index: int) -> None:
        nonlocal tokens
        for n in range(rounds):
            start = time.perf_counter()
            tokens += await call(prompts[(index + n) % len(prompts)])
            latencies.append(time.perf_counter() - start)

    await asyncio.gather(*(call(prompts[i % len(prompts)]) for i in range(min(concurrency, 4))))  # warm-up
    start = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(concurrency)))
    seconds = time.perf_counter() - start
    return {
        "concurrency": concurrency,
        "seconds": seconds,
        "requests": len(latencies),
        "requests_per_s": len(latencies) / seconds,
        "tokens_per_s": tokens / seconds,
        "p50_s": percentile(latencies, 50),
        "p95_s": percentile(latencies, 95),
    }


async def run(args: argparse.Namespace, model: Path) -> dict[str, Any]:
    config = EngineConfig(model_id=str(model), device=args.device, num_threads=args.threads)
    engine = TextGenerator.load(config)
    params = SamplingParams(max_new_tokens=args.new_tokens)
    prompts = engine.encode(PROMPTS, params)
    batcher = Batcher(engine.generate, max_batch_size=args.max_batch, wait_timeout_s=0.005)
    baseline = PlainBaseline(engine)

    async def ours(ids: list[int]) -> int:
        return (await batcher.submit(WorkItem(ids, params))).completion_tokens

    async def plain(ids: list[int]) -> int:
        return await baseline(ids, args.new_tokens)

    results: dict[str, Any] = {"service_engine": {}, "baseline": {}}
    for level, c in enumerate(args.concurrency):
        rounds = max(args.rounds, 2 * args.max_batch // c) if args.device == "cuda" else args.rounds
        systems = [("service_engine", ours), ("baseline", plain)]
        for name, call in systems if level % 2 == 0 else reversed(systems):
            row = await closed_loop(call, prompts, c, rounds)
            results[name][str(c)] = row
            logger.info("%-14s c=%-3d rps=%.2f p50=%.3fs", name, c, row["requests_per_s"], row["p50_s"])
    await batcher.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path)
    parser.add_argument("--shape", default="gpt2-small", help="random checkpoint shape when --model is not given")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--name", default="engine_concurrency")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    model = args.model or random_checkpoint(args.shape)
    results = asyncio.run(run(args, model))
    ratio = {
        c: results["service_engine"][c]["requests_per_s"] / results["baseline"][c]["requests_per_s"]
        for c in results["baseline"]
    }
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()} | {"model": str(model)}
    path = write_results(args.name, {"config": config, "results": results, "ratio_rps": ratio})
    plot_concurrency(
        {"service": results["service_engine"], "baseline": results["baseline"]},
        RESULTS / f"{args.name}.png",
        f"In-process engine vs one-at-a-time: {model.name}, {args.device}",
    )
    print(f"wrote {path}")
    for c, r in ratio.items():
        print(
            f"c={c:>3}: {r:.2f}x requests/s (p50 {results['service_engine'][c]['p50_s']:.3f}s vs "
            f"{results['baseline'][c]['p50_s']:.3f}s)"
        )


if __name__ == "__main__":
    main()
