"""The cost of constrained decoding beside free decoding, in one run, on the engine's batch loop.

    python -m benchmarks.structured_output [--clients 1 16] [--seconds 20] [--new-tokens 48]

Clients loop on the batcher (the model server's own path, without HTTP) for free text,
``json_object`` and a 10-field ``json_schema``, modes interleaved and repeated so drift hits each
alike; reported per mode: requests/s, tokens/s and the time per generated token, with ratios to
free. Also the grammar compile time, cold and cached, and the two grammar libraries side by side
(xgrammar, the one used; llguidance) on this tokenizer: compile time and per-step mask time.
Writes benchmarks/results/structured_output.{json,png}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import time
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS, write_results
from engine.batcher import Batcher
from engine.model import EngineConfig, TextGenerator
from engine.processors import apply_bitmask
from engine.types import Constraint, SamplingParams
from testing.checkpoints import random_checkpoint

logger = logging.getLogger("structured_output")

TYPES = ["string", "integer", "boolean", "number"]
SCHEMA_10 = {
    "type": "object",
    "properties": {f"field_{i}": {"type": TYPES[i % 4]} for i in range(10)},
    "required": [f"field_{i}" for i in range(10)],
    "additionalProperties": False,
}
MODES = {
    "free": None,
    "json_object": Constraint("json_object"),
    "json_schema_10": Constraint("json_schema", json.dumps(SCHEMA_10)),
}


async def clients(batcher: Batcher, ids: list[int], params: SamplingParams, n: int, seconds: float) -> dict:
    """``n`` clients sending one request after another for ``seconds``: requests and tokens done."""
    done = {"requests": 0, "tokens": 0}
    deadline = time.perf_counter() + seconds

    async def client() -> None:
        while time.perf_counter() < deadline:
            async for deltas in batcher.stream([ids], [params]):
                done["tokens"] += sum(d.tokens for d in deltas)
            done["requests"] += 1

    begun = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(n)))
    elapsed = time.perf_counter() - begun
    return {
        "rps": done["requests"] / elapsed,
        "tps": done["tokens"] / elapsed,
        "s_per_token": elapsed * n / max(done["tokens"], 1),
    }


def compile_times(engine: TextGenerator, repeats: int) -> dict[str, Any]:
    """Cold: a new schema each time (a field renamed); cached: the same schema again."""
    grammars = engine.rules.grammars
    cold, cached = [], []
    for i in range(repeats):
        schema = {**SCHEMA_10, "properties": {**SCHEMA_10["properties"], f"extra_{i}": {"type": "string"}}}
        constraint = Constraint("json_schema", json.dumps(schema))
        begun = time.perf_counter()
        grammars.get(constraint)
        cold.append(time.perf_counter() - begun)
        begun = time.perf_counter()
        grammars.get(constraint)
        cached.append(time.perf_counter() - begun)
    return {"cold_ms": statistics.median(cold) * 1e3, "cached_ms": statistics.median(cached) * 1e3, "n": repeats}


def libraries(engine: TextGenerator, steps: int = 200) -> dict[str, Any]:
    """Compile and per-step mask times of xgrammar and llguidance for SCHEMA_10 on this tokenizer,
    walking the same accepted path (greedy over random logits with the mask applied)."""
    import torch

    out: dict[str, Any] = {}
    vocab = engine.vocab_size
    schema = json.dumps(SCHEMA_10)
    import xgrammar as xgr

    info = xgr.TokenizerInfo.from_huggingface(engine.tokenizer, vocab_size=vocab, stop_token_ids=engine.eos_ids)
    begun = time.perf_counter()
    compiled = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False).compile_json_schema(
        schema, any_whitespace=False
    )
    compile_s = time.perf_counter() - begun
    matcher, bitmask = xgr.GrammarMatcher(compiled), xgr.allocate_token_bitmask(1, vocab)
    generator = torch.Generator().manual_seed(0)
    fill_s = kernel_s = engine_s = 0.0
    n = 0
    for _ in range(steps):
        if matcher.is_terminated():
            break
        logits = torch.randn(1, vocab, generator=generator)
        ours = logits.clone()
        begun = time.perf_counter()
        matcher.fill_next_token_bitmask(bitmask, 0)
        filled = time.perf_counter()
        xgr.apply_token_bitmask_inplace(logits, bitmask)  # xgrammar's CPU kernel
        applied = time.perf_counter()
        apply_bitmask(ours, bitmask, [0])  # what the engine applies on CPU
        engine_s += time.perf_counter() - applied
        fill_s, kernel_s = fill_s + filled - begun, kernel_s + applied - filled
        assert torch.equal(ours, logits)
        n += 1
        matcher.accept_token(int(logits.argmax()))
    out["xgrammar"] = {
        "compile_ms": compile_s * 1e3,
        "mask_ms_per_step": (fill_s + kernel_s) / n * 1e3,  # fill + xgrammar's kernel
        "fill_ms_per_step": fill_s / n * 1e3,
        "engine_mask_ms_per_step": (fill_s + engine_s) / n * 1e3,  # fill + engine.processors.apply_bitmask
        "steps": n,
    }
    try:
        import llguidance
        import llguidance.hf
        import llguidance.torch
    except ImportError:
        out["llguidance"] = None
        return out
    tokenizer = llguidance.hf.from_tokenizer(engine.tokenizer, n_vocab=vocab)
    begun = time.perf_counter()
    grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
    matcher = llguidance.LLMatcher(tokenizer, grammar)
    compile_s = time.perf_counter() - begun
    bitmask = llguidance.torch.allocate_token_bitmask(1, vocab)
    generator = torch.Generator().manual_seed(0)
    mask_s, n = 0.0, 0
    for _ in range(steps):
        if matcher.is_stopped():
            break
        logits = torch.randn(1, vocab, generator=generator)
        begun = time.perf_counter()
        llguidance.torch.fill_next_token_bitmask(matcher, bitmask, 0)
        llguidance.torch.apply_token_bitmask_inplace(logits, bitmask)
        mask_s += time.perf_counter() - begun
        n += 1
        matcher.consume_token(int(logits.argmax()))
    out["llguidance"] = {"compile_ms": compile_s * 1e3, "mask_ms_per_step": mask_s / n * 1e3, "steps": n}
    return out


async def throughput(engine: TextGenerator, counts: list[int], seconds: float, repeats: int, new_tokens: int):
    ids = engine.encode(["Return the number of items in the container as JSON:"], SamplingParams(1))[0]
    results: dict[str, dict[str, list[dict]]] = {str(n): {mode: [] for mode in MODES} for n in counts}
    batcher = Batcher(engine.run, max_batch_size=max(counts), wait_timeout_s=0.005)
    for constraint in MODES.values():  # warm-up: the grammars compile once here
        params = SamplingParams(max_new_tokens=new_tokens, constraint=constraint)
        engine.rules.check(params)
        await clients(batcher, ids, params, 1, 0.5)
    for _ in range(repeats):
        for n in counts:
            for mode, constraint in MODES.items():
                params = SamplingParams(max_new_tokens=new_tokens, constraint=constraint)
                results[str(n)][mode].append(await clients(batcher, ids, params, n, seconds))
    await batcher.close()
    table: dict[str, Any] = {}
    for n, modes in results.items():
        row = {mode: {key: statistics.median(r[key] for r in runs) for key in runs[0]} for mode, runs in modes.items()}
        for mode in MODES:
            row[mode]["token_cost_vs_free"] = row[mode]["s_per_token"] / row["free"]["s_per_token"]
            row[mode]["spread_rps"] = [min(r["rps"] for r in modes[mode]), max(r["rps"] for r in modes[mode])]
        table[n] = row
    return table


def plot(data: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    counts = list(data["throughput"])
    width = 0.8 / len(MODES)
    for i, mode in enumerate(MODES):
        xs = [c + (i - 1) * width for c in range(len(counts))]
        axes[0].bar(xs, [data["throughput"][n][mode]["rps"] for n in counts], width, label=mode)
        axes[1].bar(xs, [data["throughput"][n][mode]["s_per_token"] * 1e3 for n in counts], width, label=mode)
    for ax, title in zip(axes, ("requests/s", "ms per generated token (per client)"), strict=True):
        ax.set_xticks(range(len(counts)), [f"{n} client{'s' if n != '1' else ''}" for n in counts])
        ax.set_title(title)
        ax.legend()
    fig.suptitle(f"Constrained decoding vs free, {data['model']} ({data['device']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="checkpoint (default: a random GPT-2 small)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    model = args.model or random_checkpoint("gpt2-small")
    engine = TextGenerator.load(EngineConfig(model_id=str(model), device=args.device, num_threads=args.threads))
    data: dict[str, Any] = {
        "model": model.name,
        "device": args.device,
        "new_tokens": args.new_tokens,
        "seconds_per_cell": args.seconds,
        "repeats": args.repeats,
        "libraries": libraries(engine),
        "compile": compile_times(engine, repeats=9),
    }
    data["throughput"] = asyncio.run(throughput(engine, args.clients, args.seconds, args.repeats, args.new_tokens))
    path = write_results("structured_output", data)
    plot(data, RESULTS / "structured_output.png")
    print(json.dumps({k: data[k] for k in ("libraries", "compile", "throughput")}, indent=1))
    logger.info("wrote %s", path)


if __name__ == "__main__":
    main()
