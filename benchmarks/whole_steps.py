"""bfloat16 decode steps that read the slot cache's buffers whole, against strided views, in one process.

    python -m benchmarks.whole_steps [--rows 1 16 32] [--threads 1] [--repeats 6]

One engine on the GPT-2-small-shaped random checkpoint in bfloat16 generates 64 greedy tokens for
``rows`` of the benchmark's prompts, the way a replica runs them (``TextGenerator.generate``: one
packed prefill, then continuous decode steps), two ways taken in turn so that load on a shared
machine hits both alike:

- ``whole``: as the engine runs (``SlotCache.begin_step(whole=True)``): while the longest row fills
  at least half of the cache's buffers, attention reads them whole, one dense block that oneDNN's
  batched products take without a copy;
- ``strided``: the same engine with whole steps off, as it ran before: attention reads
  ``[:rows, :, :width]``, a strided view that ``torch.bmm`` copies for every layer at every step.

Reports the median time per generated token (the whole generation over 64) and whether the two
ways gave the same answers (greedy answers of a random model may part where two logits are within
bfloat16's rounding: the products add in another order). Writes benchmarks/results/NAME.json and .png.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from benchmarks.common import PROMPTS, RESULTS, alternated_generations, plot_ms_per_token, two_ways, write_results
from engine.continuous import ContinuousBatch
from engine.model import EngineConfig, TextGenerator
from engine.types import SamplingParams
from testing.checkpoints import random_checkpoint

WAYS = ("strided", "whole")
NEW_TOKENS = 64


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 16, 32])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--name", default="whole_steps")
    args = parser.parse_args()
    checkpoint = random_checkpoint("gpt2-small", full_vocab=True)
    config = EngineConfig(model_id=str(checkpoint), num_threads=args.threads, dtype="bfloat16", packed_cache_dir="")
    engine = TextGenerator.load(config)
    params = SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    whole = ContinuousBatch._whole
    results: dict[str, Any] = {}
    try:
        for rows in args.rows:
            ids = engine.encode([PROMPTS[i % len(PROMPTS)] for i in range(rows)], params)

            def generate(way: str, ids: list[list[int]] = ids) -> list:
                ContinuousBatch._whole = whole if way == "whole" else lambda self, dtype: False
                return engine.generate(ids, params)

            result = results[str(rows)] = two_ways(
                *alternated_generations(generate, WAYS, args.repeats, NEW_TOKENS), WAYS
            )
            medians = result["ms_per_token"]
            print(
                f"rows={rows}: " + ", ".join(f"{w} {medians[w]:.2f} ms" for w in WAYS)
                + f", same answers {result['same_answers']}"
            )  # fmt: skip
    finally:
        ContinuousBatch._whole = whole
    data = {"threads": args.threads, "dtype": "bfloat16", "new_tokens": NEW_TOKENS, "repeats": args.repeats,
            "load_average": os.getloadavg(), "results": results}  # fmt: skip
    print(write_results(args.name, data))
    title = f"bfloat16 decode, GPT-2-small shape, {args.threads} thread(s): whole buffers against strided views"
    plot_ms_per_token(results, WAYS, title, RESULTS / f"{args.name}.png")


if __name__ == "__main__":
    main()
