"""A few rows through the packed layers computed as four, against as they are, in one process.

    python -m benchmarks.packed_rows [--dtype bfloat16|float32] [--rows 1 2 3 4 8] [--threads 1] [--repeats 6]

oneDNN picks a packed layer's kernel by the number of rows it multiplies, and for 1 to 3 rows it picks
kernels that read the weight slower than the one for 4 (``engine.cpu.MIN_PACKED_ROWS``). Two measures,
each taken both ways in turn so that load on a shared machine hits both alike:

- ``products``: the 49 packed products of one GPT-2-small token (the engine's own layers, in module order)
  at each row count, back to back: median ms of ``--repeats`` x 5 rounds;
- ``generation``: the engine generates 64 greedy tokens for ``rows`` of the benchmark's prompts as a replica
  does (``TextGenerator.generate``): median ms per generated token, and whether both ways gave the same
  answers (they must: a row's sums do not depend on the rows beside it).

``as_is`` runs the layers with ``MIN_PACKED_ROWS = 1`` (nothing added), ``four`` as the engine runs them.
Writes benchmarks/results/NAME.json and .png.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Any

import torch

import engine.cpu as engine_cpu
from benchmarks.common import PROMPTS, RESULTS, alternated_generations, plot_ms_per_token, two_ways, write_results
from engine.cpu import PackedLinear
from engine.model import EngineConfig, TextGenerator
from engine.types import SamplingParams
from testing.checkpoints import random_checkpoint

WAYS = ("as_is", "four")
NEW_TOKENS = 64


MIN_ROWS = engine_cpu.MIN_PACKED_ROWS


def _way(way: str) -> None:
    engine_cpu.MIN_PACKED_ROWS = 1 if way == "as_is" else MIN_ROWS


def products(layers: list[PackedLinear], rows: int, dtype: torch.dtype, repeats: int) -> dict[str, float]:
    """Median ms of the layers' products at ``rows`` rows, each way, taken in turn."""
    inputs = [torch.randn(rows, layer.in_features, dtype=dtype) for layer in layers]
    times: dict[str, list[float]] = {way: [] for way in WAYS}
    for repeat in range(5 * repeats + 1):
        for way in WAYS if repeat % 2 == 0 else WAYS[::-1]:
            _way(way)
            started = time.perf_counter()
            for layer, x in zip(layers, inputs, strict=True):
                layer(x)
            if repeat:
                times[way].append((time.perf_counter() - started) * 1000)
    return {way: statistics.median(times[way]) for way in WAYS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 3, 4, 8])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--name", default=None)
    args = parser.parse_args()
    name = args.name or f"packed_rows_{args.dtype}"
    checkpoint = random_checkpoint("gpt2-small", full_vocab=True)
    config = EngineConfig(model_id=str(checkpoint), num_threads=args.threads, dtype=args.dtype, packed_cache_dir="")
    engine = TextGenerator.load(config)
    params = SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    engine.generate(engine.encode([PROMPTS[0]], params), params)  # float32 packs after its first answer
    layers = [m for m in engine.model.modules() if isinstance(m, PackedLinear)]
    if not layers:
        raise SystemExit(f"no packed layers in {args.dtype} on this CPU: nothing to compare")
    dtype = layers[0].dtype
    results: dict[str, Any] = {}
    try:
        for rows in args.rows:
            ids = engine.encode([PROMPTS[i % len(PROMPTS)] for i in range(rows)], params)

            def generate(way: str, ids: list[list[int]] = ids) -> list:
                _way(way)
                return engine.generate(ids, params)

            result = results[str(rows)] = two_ways(
                *alternated_generations(generate, WAYS, args.repeats, NEW_TOKENS), WAYS
            )
            medians, product_ms = result["ms_per_token"], products(layers, rows, dtype, args.repeats)
            result["products_ms"] = product_ms
            print(
                f"rows={rows}: generation " + ", ".join(f"{w} {medians[w]:.2f}" for w in WAYS) + " ms/token; "
                f"{len(layers)} products " + ", ".join(f"{w} {product_ms[w]:.2f}" for w in WAYS)
                + f" ms; same answers {result['same_answers']}"
            )  # fmt: skip
    finally:
        _way("four")
    data = {"threads": args.threads, "dtype": args.dtype, "new_tokens": NEW_TOKENS, "repeats": args.repeats,
            "min_packed_rows": MIN_ROWS, "layers": len(layers), "load_average": os.getloadavg(),
            "results": results}  # fmt: skip
    print(write_results(name, data))
    title = f"{args.dtype}, GPT-2-small shape, {args.threads} thread(s): few rows as they are, and as four"
    plot_ms_per_token(results, WAYS, title, RESULTS / f"{name}.png")


if __name__ == "__main__":
    main()
