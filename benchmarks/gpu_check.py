"""The engine on one CUDA GPU: load and warm-up phases, greedy answers against ``generate``,
tokens/s beside transformers' ``generate_batch``, and a forced split between the GPU and host memory.

    bash benchmarks/gpu_check.sh            # what to run on a GPU machine (no Ray, no network)

Checkpoints: random GPT-2 shapes in bfloat16 with the embedded model's tokenizer, the small one
(124M parameters) and ~1B parameters, built once under benchmarks/.cache. For each: the engine
loads it on ``cuda`` (its phases and placement recorded); greedy answers to eight prompts, one at
a time, are compared token for token with ``model.generate``; then tokens/s at batch 1, 16 and
64 for the engine and for ``generate_batch`` (64 new tokens, EOS ignored; each the median of 3
timed calls after an untimed one). Last, the ~1B checkpoint loads again with budgets that put part
of it in host memory (about 40% of its weights on the GPU): where its weights went, its greedy
answers, its tokens/s at batch 1. Writes benchmarks/results/gpu_check.json and .png (``--plot``
redraws the PNG from the JSON). Exits 3 when there is no CUDA device, 1 when a greedy answer
differs. ``--cpu-dry-run`` runs the same steps on CPU with tiny checkpoints and small batches (it
checks the script, not a GPU).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import PROMPTS, RESULTS, hf_generate_batch, write_results
from engine.model import EngineConfig, TextGenerator
from engine.timing import PhaseTimer
from engine.types import SamplingParams

logger = logging.getLogger("gpu_check")

NO_CUDA = 3
MISMATCH = 1


def require_cuda() -> None:
    if torch.cuda.is_available():
        return
    built = torch.version.cuda or "none (a CPU build of torch)"
    print(
        f"gpu_check: no CUDA device: torch.cuda.is_available() is False (torch {torch.__version__}, CUDA {built}, "
        f"{torch.cuda.device_count()} device(s) visible). Run it on a GPU machine, or pass --cpu-dry-run.",
        file=sys.stderr,
    )
    sys.exit(NO_CUDA)


def checkpoints(dry_run: bool) -> dict[str, Path]:
    from testing.checkpoints import build_tiny_causal, random_checkpoint

    if dry_run:
        root = Path(tempfile.mkdtemp(prefix="gpu-check-"))
        return {"tiny": build_tiny_causal(root / "tiny"), "tiny-4-layers": build_tiny_causal(root / "t4", n_layer=4)}
    return {shape: random_checkpoint(shape, dtype="bfloat16") for shape in ("gpt2-small", "gpt2-1b")}


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def greedy_matches(engine: TextGenerator, prompts: list[list[int]], new_tokens: int) -> dict[str, Any]:
    """The engine's greedy answers, one prompt at a time, against ``model.generate`` (token ids as text)."""
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0)
    device = next(engine.model.parameters()).device
    same, differing = 0, []
    for ids in prompts:
        [ours] = engine.generate([ids], params)
        out = engine.model.generate(
            torch.tensor([ids], device=device), max_new_tokens=new_tokens, do_sample=False, pad_token_id=engine.pad_id
        )
        theirs = engine.tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True)
        if ours.text == theirs:
            same += 1
        else:
            differing.append({"ours": ours.text[:80], "generate": theirs[:80]})
    return {"prompts": len(prompts), "equal": same, "differing": differing[:3]}


def throughput(engine: TextGenerator, device: str, sizes: list[int], new_tokens: int, repeats: int) -> dict[str, Any]:
    """Tokens/s for the engine and ``generate_batch`` at each batch size, counting the tokens each made.

    ``generate_batch`` ignores EOS; the engine stops a row at EOS, which a random checkpoint's rows
    rarely meet (one id in 50257), so both run their rows to about the same length.
    """
    results: dict[str, Any] = {}
    for n in sizes:
        ids = engine.encode([PROMPTS[i % len(PROMPTS)] for i in range(n)], SamplingParams(max_new_tokens=new_tokens))
        params = SamplingParams(max_new_tokens=new_tokens, temperature=0)

        row: dict[str, Any] = {"engine": _rate(device, repeats, partial(_engine_tokens, engine, ids, params))}
        row["generate_batch"] = _rate(
            device, repeats, partial(hf_generate_batch, engine.model, ids, new_tokens, engine.pad_id)
        )
        results[str(n)] = row
        logger.info("batch %d tokens/s %s", n, row)
    return results


def _engine_tokens(engine: TextGenerator, ids: list[list[int]], params: SamplingParams) -> int:
    return sum(c.completion_tokens for c in engine.generate(ids, params))


def _rate(device: str, repeats: int, fn: Any) -> float | str:
    """Median tokens/s of ``fn`` (it returns the tokens it made) after one untimed call; a failure as text."""
    try:
        fn()  # set-up and lazy initialisation
        rates = []
        for _ in range(repeats):
            sync(device)
            started = time.perf_counter()
            tokens = fn()
            sync(device)
            rates.append(tokens / (time.perf_counter() - started))
        return round(statistics.median(rates), 1)
    except Exception as exc:  # recorded, not fatal: the other figures still come back
        logger.exception("a throughput run failed")
        return f"failed: {type(exc).__name__}: {str(exc)[:200]}"


def load(model: Path, device: str, **extra: Any) -> tuple[TextGenerator, dict[str, Any]]:
    timer = PhaseTimer()
    dtype = "bfloat16" if device == "cuda" else "float32"
    config = EngineConfig(model_id=str(model), device=device, dtype=dtype, num_gpus=1, max_batch_size=64, **extra)
    engine = TextGenerator.load(config, timer)
    report = timer.report()
    keep = ("config_s", "tokenizer_s", "model_code_s", "weights_s", "warmup_s", "weights_bytes", "placement")
    return engine, {k: report.get(k) for k in keep}


def plot(results: dict[str, Any], path: Path) -> None:
    """Tokens/s against batch size, the engine beside ``generate_batch``, one line pair per checkpoint."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for (name, r), colour in zip(results["models"].items(), ("tab:blue", "tab:orange"), strict=False):
        sizes = [int(n) for n in r["tokens_per_s"]]
        for system, style in (("engine", "o-"), ("generate_batch", "s--")):
            rates = [r["tokens_per_s"][str(n)][system] for n in sizes]
            if all(isinstance(v, int | float) for v in rates):
                ax.plot(sizes, rates, style, color=colour, label=f"{name}: {system}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("prompts in the batch")
    ax.set_ylabel("generated tokens / s")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"{results.get('gpu', results['device'])}, bfloat16, torch {results.get('torch', '')}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-dry-run", action="store_true", help="tiny checkpoints on CPU (checks the script)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--name", default="gpu_check")
    parser.add_argument("--plot", action="store_true", help="only redraw the PNG from the JSON of --name")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.plot:
        import json

        plot(json.loads((RESULTS / f"{args.name}.json").read_text()), RESULTS / f"{args.name}.png")
        print(f"wrote {RESULTS / f'{args.name}.png'}")
        return
    if not args.cpu_dry_run:
        require_cuda()
    device = "cpu" if args.cpu_dry_run else "cuda"
    sizes = [1, 4] if args.cpu_dry_run else [1, 16, 64]
    new_tokens = 8 if args.cpu_dry_run else args.new_tokens
    results: dict[str, Any] = {"device": device, "models": {}}
    if device == "cuda":
        results["gpu"] = torch.cuda.get_device_name(0)
        results["torch"] = torch.__version__
    mismatch = False
    models = checkpoints(args.cpu_dry_run)
    for name, path in models.items():
        started = time.perf_counter()
        engine, phases = load(path, device)
        phases["load_total_s"] = round(time.perf_counter() - started, 3)
        prompts = engine.encode(PROMPTS[:8], SamplingParams(max_new_tokens=32))
        greedy = greedy_matches(engine, prompts, 32)
        mismatch |= greedy["equal"] != greedy["prompts"]
        rates = throughput(engine, device, sizes, new_tokens, args.repeats)
        results["models"][name] = {"load": phases, "greedy_vs_generate": greedy, "tokens_per_s": rates}
        logger.info("%s: load %s; greedy %s", name, phases, greedy)
        del engine
        if device == "cuda":
            torch.cuda.empty_cache()
    # A forced split of the largest model: about 40% of its weights on the GPU, the rest in host memory.
    name, path = list(models.items())[-1]
    size = results["models"][name]["load"]["weights_bytes"]
    budgets: dict[int | str, int] = {0 if device == "cuda" else "cpu": int(size * 0.4)}
    if device == "cuda":
        budgets["cpu"] = 2 * size
    else:
        budgets["cpu"] = int(size * 0.7)  # on CPU the rest goes to disk
    engine, phases = load(path, device, max_memory=budgets)
    prompts = engine.encode(PROMPTS[:4], SamplingParams(max_new_tokens=16))
    greedy = greedy_matches(engine, prompts, 16)
    mismatch |= greedy["equal"] != greedy["prompts"]
    rates = throughput(engine, device, [1], 16, 1)
    results["split"] = {"model": name, "budgets": {str(k): v for k, v in budgets.items()}, "load": phases}
    results["split"] |= {"greedy_vs_generate": greedy, "tokens_per_s": rates}
    logger.info("split %s: %s; greedy %s; tokens/s %s", name, phases["placement"], greedy, rates)
    path = write_results(args.name, results) if not args.cpu_dry_run else _write_dry(results)
    print(f"wrote {path}")
    try:
        plot(results, path.with_suffix(".png"))
    except ImportError:  # matplotlib is a benchmark extra; the JSON holds every figure
        logger.info("matplotlib is not installed: no PNG")
    print(f"{'model':<14} {'weights_s':>9} {'warmup_s':>8}  {'greedy':>7}  tokens/s engine | generate_batch")
    for name, r in results["models"].items():
        g, load_ = r["greedy_vs_generate"], r["load"]
        rates = "  ".join(f"b{n}: {v['engine']} | {v['generate_batch']}" for n, v in r["tokens_per_s"].items())
        print(f"{name:<14} {load_['weights_s']:9.3f} {load_['warmup_s']:8.3f}  {g['equal']}/{g['prompts']}  {rates}")
    split, g = results["split"], results["split"]["greedy_vs_generate"]
    where = split["load"]["placement"]["devices"]
    print(f"split {split['model']}: {where} greedy {g['equal']}/{g['prompts']} tokens/s {split['tokens_per_s']}")
    if mismatch:
        print("gpu_check: a greedy answer differs from generate's (see greedy_vs_generate)", file=sys.stderr)
        sys.exit(MISMATCH)


def _write_dry(results: dict[str, Any]) -> Path:
    import json

    path = Path(tempfile.mkdtemp(prefix="gpu-check-")) / "gpu_check_dry_run.json"
    path.write_text(json.dumps(results, indent=2, default=str))
    return path


if __name__ == "__main__":
    main()
