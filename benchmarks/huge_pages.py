"""Packed layers on 2 MB pages against 4 KB pages and against the cache's file pages, in one process.

    python -m benchmarks.huge_pages [--rows 1 16 32] [--threads 1] [--repeats 6] [--dtype bfloat16]

Three engines on the GPT-2-small-shaped random checkpoint: one packs its layers in torch's memory
(4 KB pages), one moves them onto 2 MB pages after its first answer (``huge_pages=True``,
``engine/hugepages.py``), one maps them from a packed-layer cache primed first (the file's pages); each
answers once first, untimed (for the second, a thread copies the layers first, timed, and that answer's
first step points them at the copy). Then each
generates 64 greedy tokens for ``rows`` of the benchmark's prompts, taken in turn so that load on a
shared machine hits all alike. Reports the median time per generated token, whether the answers
are equal (they must be: the same bytes), how many bytes the kernel backed with huge pages, and
what the copy took. Writes benchmarks/results/NAME.json and .png.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import threading
import time
from typing import Any

from benchmarks.common import PROMPTS, RESULTS, alternated_generations, plot_ms_per_token, write_results
from engine import hugepages, onednn_bytes
from engine.cpu import PackedLinear
from engine.model import EngineConfig, TextGenerator
from engine.types import SamplingParams
from testing.checkpoints import random_checkpoint

WAYS = ("4 KB pages", "2 MB pages", "cache's file pages")
NEW_TOKENS = 64


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 16, 32])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--name", default="huge_pages")
    args = parser.parse_args()
    checkpoint = random_checkpoint("gpt2-small", full_vocab=True)
    params = SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    engines: dict[str, TextGenerator] = {}
    copy_s: float | None = None
    cache = tempfile.mkdtemp(prefix="packed-layers-")  # the third engine maps its layers from here
    primer = TextGenerator.load(
        EngineConfig(model_id=str(checkpoint), num_threads=args.threads, dtype=args.dtype, packed_cache_dir=cache)
    )
    primer.generate(primer.encode(PROMPTS[:1], params), params)  # (float32 packs after a first answer)
    for thread in threading.enumerate():
        if thread.name == "packed-cache":
            thread.join()
    del primer
    for way in WAYS:
        config = EngineConfig(model_id=str(checkpoint), num_threads=args.threads, dtype=args.dtype,
                              packed_cache_dir=cache if way == WAYS[2] else "",
                              huge_pages=way == "2 MB pages")  # fmt: skip
        engine = TextGenerator.load(config)
        ids = engine.encode(PROMPTS[:1], params)
        work = engine.after_first_answer
        if work is not None and way == "2 MB pages":  # time the copy alone: start it here, as a first answer would
            engine.after_first_answer = None
            started = time.perf_counter()
            work()
            for thread in threading.enumerate():
                if thread.name == "huge-pages":
                    thread.join()
            copy_s = time.perf_counter() - started
        engine.generate(ids, params)  # the swap, at its first step
        engines[way] = engine
    layers = [m for m in engines["2 MB pages"].model.modules() if isinstance(m, PackedLinear)]
    huge = hugepages.huge_bytes(onednn_bytes.address(layers[0].packed)) if layers else 0
    results: dict[str, Any] = {}
    for rows in args.rows:
        ids = engines[WAYS[0]].encode([PROMPTS[i % len(PROMPTS)] for i in range(rows)], params)
        times, answers = alternated_generations(
            lambda way, ids=ids: engines[way].generate(ids, params), WAYS, args.repeats, NEW_TOKENS
        )
        medians = {way: statistics.median(times[way]) for way in WAYS}
        results[str(rows)] = {
            "ms_per_token": medians,
            "runs_ms_per_token": times,
            "speedup": medians[WAYS[0]] / medians[WAYS[1]],
            "same_answers": answers[WAYS[0]] == answers[WAYS[1]] == answers[WAYS[2]],
        }
        timing = ", ".join(f"{way} {medians[way]:.2f} ms" for way in WAYS)
        print(f"rows={rows}: {timing}, same answers {results[str(rows)]['same_answers']}")
    data = {"threads": args.threads, "dtype": args.dtype, "new_tokens": NEW_TOKENS, "repeats": args.repeats,
            "transparent_hugepage": hugepages.thp_mode(), "copy_s": copy_s, "huge_page_bytes": huge,
            "packed_layers": len(layers), "load_average": os.getloadavg(), "results": results}  # fmt: skip
    print(f"copied in {copy_s:.2f} s, {huge / 1e6:.0f} MB on 2 MB pages -> {write_results(args.name, data)}")
    title = f"{args.dtype} decode, GPT-2-small shape, {args.threads} thread(s): packed layers' pages"
    plot_ms_per_token(results, WAYS, title, RESULTS / f"{args.name}.png")
    shutil.rmtree(cache, ignore_errors=True)


if __name__ == "__main__":
    main()
