"""What sampling costs the engine, beside greedy decoding, with and without a sort of the vocabulary.

    python -m benchmarks.sampling [--rows 16] [--new-tokens 32] [--repeats 3] [--threads 2]

One engine on the GPT-2-small-shaped random checkpoint (50,257-token vocabulary) in bfloat16
generates ``--rows`` prompts together, ``--new-tokens`` each (end of text ignored), as:

- ``greedy``: temperature 0;
- ``top_p 0.9`` and ``top_p 1``: temperature 0.7 (the service's defaults are 0.7 and 0.9), each
  with the engine's sampler (:func:`engine.token_choice._sample_rows`, no sort) and with
  ``sorted``, the sampler as it was before: the whole vocabulary sorted for every sampled row at
  every step, then top-k, top-p and the draw on the sorted order.

The runs are interleaved, repeat by repeat; medians are reported. Writes
benchmarks/results/sampling.json and .png.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch

from benchmarks.common import PROMPTS, RESULTS, write_results
from engine import token_choice
from engine.model import EngineConfig, TextGenerator
from engine.types import SamplingParams
from testing.checkpoints import random_checkpoint


def sorted_sample_rows(logits: torch.Tensor, rows: Sequence[Any], draws: torch.Tensor | None = None) -> torch.Tensor:
    """The sampler before: one sort of the vocabulary per sampled row and step."""
    vocab = logits.shape[-1]
    device = logits.device
    if draws is None:
        draws = token_choice.row_draws(rows)
    temps = torch.tensor([r.params.temperature for r in rows], device=device, dtype=logits.dtype)
    sorted_logits, sorted_ids = (logits / temps[:, None]).sort(dim=-1, descending=True)
    ranks = torch.arange(vocab, device=device)
    top_k = torch.tensor([min(r.params.top_k or vocab, vocab) for r in rows], device=device)
    sorted_logits = sorted_logits.masked_fill(ranks[None, :] >= top_k[:, None], float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    top_p = torch.tensor([r.params.top_p for r in rows], device=device, dtype=probs.dtype)
    mass_before = probs.cumsum(dim=-1) - probs
    probs = probs.masked_fill((mass_before >= top_p[:, None]) & (ranks[None, :] > 0), 0.0)
    cdf = probs.cumsum(dim=-1)
    draws = draws.to(device=device, dtype=cdf.dtype)
    positions = torch.searchsorted(cdf, (draws * cdf[:, -1])[:, None], right=True).clamp_(max=vocab - 1)
    return sorted_ids.gather(1, positions).squeeze(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    model = random_checkpoint("gpt2-small")
    config = EngineConfig(model_id=str(model), device="cpu", dtype="bfloat16", num_threads=args.threads)
    engine = TextGenerator.load(config)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.rows)]
    ids = engine.encode(prompts, SamplingParams(max_new_tokens=args.new_tokens))
    common = {"max_new_tokens": args.new_tokens, "ignore_eos": True}
    cases = {
        "greedy": (SamplingParams(temperature=0, **common), token_choice._sample_rows),
        "top_p 0.9": (SamplingParams(temperature=0.7, top_p=0.9, seed=1, **common), token_choice._sample_rows),
        "top_p 0.9, sorted": (SamplingParams(temperature=0.7, top_p=0.9, seed=1, **common), sorted_sample_rows),
        "top_p 1": (SamplingParams(temperature=0.7, top_p=1.0, seed=1, **common), token_choice._sample_rows),
        "top_p 1, sorted": (SamplingParams(temperature=0.7, top_p=1.0, seed=1, **common), sorted_sample_rows),
    }
    ours = token_choice._sample_rows
    times: dict[str, list[float]] = {name: [] for name in cases}
    for repeat in range(args.repeats + 1):  # the first round warms up and is not counted
        for name, (params, sampler) in cases.items():
            token_choice._sample_rows = sampler
            try:
                began = time.perf_counter()
                answers = engine.generate(ids, params)
                elapsed = time.perf_counter() - began
            finally:
                token_choice._sample_rows = ours
            assert sum(a.completion_tokens for a in answers) == args.rows * args.new_tokens
            if repeat:
                times[name].append(elapsed)
    tokens = args.rows * args.new_tokens
    results = {
        name: {
            "seconds_median": round(statistics.median(t), 3),
            "tokens_per_s": round(tokens / statistics.median(t), 1),
            "vs_greedy": round(statistics.median(t) / statistics.median(times["greedy"]), 2),
            "seconds": [round(x, 3) for x in t],
        }
        for name, t in times.items()
    }
    for name, r in results.items():
        print(
            f"{name:<20} {r['seconds_median']:7.3f} s  {r['tokens_per_s']:8.1f} tokens/s  {r['vs_greedy']:.2f}x greedy"
        )
    data = {"rows": args.rows, "new_tokens": args.new_tokens, "threads": args.threads, "dtype": "bfloat16",
            "vocab": engine.model.config.vocab_size, "results": results}  # fmt: skip
    path = write_results("sampling", data)
    plot(results, args)
    print(f"wrote {path}")


def plot(results: dict[str, Any], args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, ax = plt.subplots(figsize=(8, 3.8))
    colours = ["tab:gray" if n == "greedy" else "tab:red" if "sorted" in n else "tab:blue" for n in names]
    ax.barh(names[::-1], [results[n]["tokens_per_s"] for n in names][::-1], color=colours[::-1])
    ax.set_xlabel("generated tokens / s")
    ax.set_title(f"GPT-2-small shape, bfloat16, {args.rows} rows x {args.new_tokens} tokens, {args.threads} threads")
    fig.tight_layout()
    fig.savefig(RESULTS / "sampling.png", dpi=110)


if __name__ == "__main__":
    main()
