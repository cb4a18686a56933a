"""The bfloat16 CPU kernels, side by side in one process: a decode step and a prefill, before and after.

    python -m benchmarks.engine_kernels [--rows 16] [--threads 1] [--repeats 8]

Two engines on the same GPT-2-small-shaped random checkpoint in bfloat16: ``plain`` as the engine
ran before (transformers' linear layers, PyTorch's CPU SDPA for every step, prompts prefilled
padded to the longest) and ``engine`` as it runs now (:mod:`engine.cpu`'s prepacked layers,
:mod:`engine.attention`'s decode step, prompts packed end to end). Their steps and prefills are
interleaved, repeat by repeat, so load on a shared machine hits both alike; medians are reported.
Writes benchmarks/results/engine_kernels.json and .png.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from transformers import DynamicCache

import engine.cpu as engine_cpu
from benchmarks.common import PROMPTS, RESULTS, write_results
from engine.continuous import ContinuousBatch
from engine.model import EngineConfig, TextGenerator
from engine.types import SamplingParams
from engine.work import WorkItem
from testing.checkpoints import random_checkpoint


def padded_prefill(engine: TextGenerator, prompts: list[list[int]]) -> None:
    """The prefill as the engine ran it before: prompts left-padded to the longest, one batch."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), engine.pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :], mask[i, width - len(p) :] = torch.tensor(p), 1
    positions = (mask.cumsum(-1) - 1).clamp_(min=0)
    cache = DynamicCache(config=engine.model.config)
    engine.model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache, logits_to_keep=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--name", default="engine_kernels")
    args = parser.parse_args()
    checkpoint = random_checkpoint("gpt2-small", full_vocab=True)
    config = EngineConfig(model_id=str(checkpoint), num_threads=args.threads, dtype="bfloat16")
    packing = engine_cpu.pack_linears
    engine_cpu.pack_linears = lambda model, rows_hint: {}  # the plain engine: its layers as loaded, never packed
    try:
        plain = TextGenerator.load(config)
    finally:
        engine_cpu.pack_linears = packing
    fast = TextGenerator.load(config)  # bfloat16 packs at load
    plain.model.config._attn_implementation = "sdpa"
    params = SamplingParams(max_new_tokens=400, ignore_eos=True)
    prompts = [fast.encode(PROMPTS, params)[i % len(PROMPTS)] for i in range(args.rows)]
    steps: dict[str, list[float]] = {"plain": [], "engine": []}
    prefills: dict[str, list[float]] = {"plain": [], "engine": []}
    with torch.inference_mode():
        batches = {}
        for name, engine in (("plain", plain), ("engine", fast)):
            batches[name] = ContinuousBatch(engine.model, engine.pad_id, engine.eos_ids, engine.texts)
            batches[name].admit([engine._row(WorkItem(0, i, p, params)) for i, p in enumerate(prompts)])
        for repeat in range(args.repeats):
            for name in ("plain", "engine") if repeat % 2 == 0 else ("engine", "plain"):
                engine, batch = (plain, batches["plain"]) if name == "plain" else (fast, batches["engine"])
                for _ in range(4):
                    started = time.perf_counter()
                    batch.step()
                    steps[name].append(time.perf_counter() - started)
                started = time.perf_counter()
                if name == "plain":
                    padded_prefill(engine, prompts)
                else:
                    ContinuousBatch(engine.model, engine.pad_id, engine.eos_ids, engine.texts)._prefill(
                        [engine._row(WorkItem(0, i, p, params)) for i, p in enumerate(prompts)]
                    )
                prefills[name].append(time.perf_counter() - started)
    result = {
        name: {"step_ms": statistics.median(steps[name]) * 1000, "prefill_ms": statistics.median(prefills[name]) * 1000}
        for name in steps
    }
    speedup = {k: result["plain"][k] / result["engine"][k] for k in ("step_ms", "prefill_ms")}
    data = {"rows": args.rows, "threads": args.threads, "dtype": "bfloat16", "load_average": os.getloadavg(),
            "prompt_tokens": [len(p) for p in prompts], "results": result, "speedup": speedup}  # fmt: skip
    path = write_results(args.name, data)
    _plot(result, args)
    print(f"rows={args.rows} threads={args.threads} load={os.getloadavg()[0]:.1f} -> {path}")
    for name, r in result.items():
        print(f"  {name:7s} decode step {r['step_ms']:7.1f} ms, prefill of all rows {r['prefill_ms']:7.1f} ms")
    print(f"  engine / plain: step {speedup['step_ms']:.2f}x faster, prefill {speedup['prefill_ms']:.2f}x faster")


def _plot(result: dict, args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, key, title in ((axes[0], "step_ms", "decode step"), (axes[1], "prefill_ms", f"prefill of {args.rows}")):
        ax.bar(list(result), [result[n][key] for n in result], color=["#999", "#2a7"])
        ax.set_title(f"{title} (ms, median)")
    fig.suptitle(f"bfloat16, GPT-2-small shape, {args.rows} rows, {args.threads} thread(s)")
    fig.tight_layout()
    fig.savefig(RESULTS / f"{args.name}.png", dpi=110)


if __name__ == "__main__":
    main()
