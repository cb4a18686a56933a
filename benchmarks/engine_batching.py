"""In-process batching strategies on one model: one at a time, our padded batch, HF continuous batching.

    python -m benchmarks.engine_batching [--model PATH] [--new-tokens 32] [--sizes 1 4 8 16 32]

For each batch size N it times N prompts generated (a) one after another, (b) together by our
engine (one padded batch, per-row parameters), (c) by transformers' continuous batching
(``generate_batch``), interleaved and repeated; writes benchmarks/results/engine_batching.json
and .png. No Ray, no HTTP: this is the ceiling the service can approach.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import PROMPTS, RESULTS, hf_generate_batch, write_results
from engine.model import EngineConfig, TextGenerator
from engine.types import SamplingParams
from testing.checkpoints import random_checkpoint

logger = logging.getLogger("engine_batching")


def time_once(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def strategies(engine: TextGenerator, ids: list[list[int]], new_tokens: int) -> dict[str, Callable[[], Any]]:
    params = SamplingParams(max_new_tokens=new_tokens)

    def one_at_a_time() -> None:
        for prompt_ids in ids:
            engine.generate([prompt_ids], params)

    def padded_batch() -> None:
        engine.generate(ids, params)

    def continuous_batching() -> None:
        hf_generate_batch(engine.model, ids, new_tokens, engine.pad_id)

    return {
        "one_at_a_time": one_at_a_time,
        "padded_batch": padded_batch,
        "hf_continuous_batching": continuous_batching,
    }


def run(model: Path, sizes: list[int], new_tokens: int, repeats: int, threads: int, device: str) -> dict[str, Any]:
    engine = TextGenerator.load(EngineConfig(model_id=str(model), device=device, num_threads=threads))
    results: dict[str, Any] = {}
    for n in sizes:
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n)]
        ids = engine.encode(prompts, SamplingParams(max_new_tokens=new_tokens))
        fns = strategies(engine, ids, new_tokens)
        for fn in fns.values():  # warm-up, including continuous batching's own set-up
            fn()
        times: dict[str, list[float]] = {name: [] for name in fns}
        for _ in range(repeats):
            for name, fn in fns.items():  # interleaved, so drift hits every strategy alike
                if device == "cuda":
                    torch.cuda.synchronize()
                times[name].append(time_once(fn))
        row = {name: statistics.median(t) for name, t in times.items()}
        results[str(n)] = {
            "seconds": row,
            "tokens_per_s": {name: n * new_tokens / s for name, s in row.items()},
            "speedup_vs_one_at_a_time": {name: row["one_at_a_time"] / s for name, s in row.items()},
            "all_seconds": times,
        }
        logger.info("N=%d %s", n, {k: round(v, 2) for k, v in results[str(n)]["speedup_vs_one_at_a_time"].items()})
    return results


def plot(results: dict[str, Any], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [int(n) for n in results]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in next(iter(results.values()))["tokens_per_s"]:
        ax.plot(sizes, [results[str(n)]["tokens_per_s"][name] for n in sizes], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("prompts generated together (N)")
    ax.set_ylabel("generated tokens / s")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="checkpoint (default: random GPT-2-small shape)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 4, 8, 16, 32])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--name", default="engine_batching")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    model = args.model or random_checkpoint("gpt2-small")
    results = run(model, args.sizes, args.new_tokens, args.repeats, args.threads, args.device)
    config = {"model": str(model), "new_tokens": args.new_tokens, "threads": args.threads, "device": args.device}
    path = write_results(args.name, {"config": config, "results": results})
    plot(results, RESULTS / f"{args.name}.png", f"Batching strategies, {model.name}, {args.device}")
    print(f"wrote {path}")
    for n, row in results.items():
        speed = ", ".join(f"{k} {v:.2f}x" for k, v in row["speedup_vs_one_at_a_time"].items())
        print(f"N={n:>3}: {speed}")


if __name__ == "__main__":
    main()
