"""Decode-step time in one process: the concatenating cache the engine had against the slot cache.

    git show 185a65b:engine/continuous.py > /tmp/old_continuous.py
    python -m benchmarks.engine_steps --old /tmp/old_continuous.py [--rows 16] [--dtype float32] [--steps 10]

Three variants on one loaded model, interleaved block by block so that load on a shared machine
hits each alike: ``old`` (the previous ``ContinuousBatch``, a ``DynamicCache`` grown by
``torch.cat``, GPT-2's op-by-op ``gelu_new``), ``slots`` (:mod:`engine.kvcache`, same activation)
and ``slots+fused_gelu`` (what the engine runs now). Prints the median step and prefill times.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import time
from pathlib import Path

import torch
from transformers.activations import GELUTanh, NewGELUActivation

from benchmarks.common import PROMPTS
from engine.continuous import ContinuousBatch
from engine.model import EngineConfig, TextGenerator
from engine.types import SamplingParams
from engine.work import WorkItem
from testing.checkpoints import random_checkpoint

KINDS = ("old", "slots", "slots+fused_gelu")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--old", type=Path, required=True, help="the previous engine/continuous.py")
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--blocks", type=int, default=1)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    spec = importlib.util.spec_from_file_location("old_continuous", args.old)
    assert spec is not None and spec.loader is not None
    old = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(old)
    model = random_checkpoint("gpt2-small", full_vocab=True)
    engine = TextGenerator.load(EngineConfig(model_id=str(model), num_threads=args.threads, dtype=args.dtype))
    slots = [(m, n) for m in engine.model.modules() for n, c in m.named_children() if type(c) is GELUTanh]
    params = SamplingParams(max_new_tokens=args.steps + 2)
    ids = engine.encode(PROMPTS, params)

    def block(kind: str) -> tuple[float, list[float]]:
        for module, name in slots:
            setattr(module, name, NewGELUActivation() if kind == "old" or kind == "slots" else GELUTanh())
        rows = [engine._row(WorkItem(i, 0, ids[i % len(ids)], params)) for i in range(args.rows)]
        if kind == "old":
            batch = old.ContinuousBatch(engine.model, engine.pad_id, engine.eos_ids, engine.texts)
        else:
            batch = ContinuousBatch(engine.model, engine.pad_id, engine.eos_ids, engine.texts, engine.slots)
        start = time.perf_counter()
        batch.admit(rows)
        prefill = time.perf_counter() - start
        steps = []
        for _ in range(args.steps):
            start = time.perf_counter()
            batch.step()
            steps.append(time.perf_counter() - start)
        return prefill, steps

    steps: dict[str, list[float]] = {k: [] for k in KINDS}
    prefills: dict[str, list[float]] = {k: [] for k in KINDS}
    with torch.inference_mode():
        for kind in KINDS:  # warm-up
            block(kind)
        for b in range(args.blocks):
            for kind in KINDS if b % 2 == 0 else KINDS[::-1]:
                prefill, times = block(kind)
                steps[kind] += times
                prefills[kind].append(prefill)
    base = statistics.median(steps["old"])
    print(f"rows={args.rows} dtype={args.dtype} load average={os.getloadavg()} steps per variant={len(steps['old'])}")
    for kind in KINDS:
        step = statistics.median(steps[kind])
        prefill = statistics.median(prefills[kind])
        print(f"  {kind:18s} step {step * 1000:8.1f} ms ({base / step:4.2f}x old)  prefill {prefill * 1000:8.1f} ms")


if __name__ == "__main__":
    main()
