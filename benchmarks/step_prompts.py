"""A wave's prompts prefilled a share a step, or all in one pass: ``STEP_PROMPT_TOKENS`` in one process, without Ray.

    python -m benchmarks.step_prompts [--clients 16] [--budgets 0 2048 128 64 32] [--seconds 8] [--repeats 4]

``benchmarks.stream_readers``' streamed leg (the ``Batcher`` over this engine, the GPT-2-small-shaped random
checkpoint in bfloat16, one torch thread, batch limit 32, ``peer_vllm``'s prompts in turn, 64 tokens each, the
service's stream pacing) once per prompt-token budget per poll, the budgets taking turns, in reverse order
every other round. 0 is no budget: every queued prompt joins the next pass. Closed-loop clients that all ask
for 64 tokens move in waves: a wave's rows end in one step and ask again together.

Prints and writes ``benchmarks/results/<name>.json`` and ``.png``: streamed requests/s, TTFT p50 (asking to
first read) and the engine's ms per step for each budget, every leg and the medians.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

import torch

from benchmarks.common import PROMPTS, RESULTS, machine, plot_scatter_panels, write_results
from benchmarks.stream_readers import SERVICE_PACING, alternated, leg, streamed_line, streamed_medians
from engine.admission import STEP_PROMPT_TOKENS, TokenBudget
from engine.model import EngineConfig, TextGenerator
from engine.types import SamplingParams
from testing.checkpoints import random_checkpoint


def way(budget: int) -> str:
    return "all" if budget == 0 else str(budget)


async def measure(args: argparse.Namespace, engine: TextGenerator, prompts: list[list[int]]) -> dict[str, list[dict]]:
    await leg(engine, prompts, True, args.clients, 2.0, SERVICE_PACING)  # warm: packing, kernels, buffers
    budgets = {way(b): TokenBudget(None, b or None) for b in args.budgets}

    return await alternated(
        list(budgets), args.repeats,
        lambda name: leg(engine, prompts, True, args.clients, args.seconds, SERVICE_PACING, budgets[name]),
        streamed_line,
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument(
        "--budgets", type=int, nargs="+", default=[0, 2048, 128, 64, 32], help="prompt tokens a poll admits; 0: all"
    )
    parser.add_argument("--seconds", type=float, default=8.0, help="about how long each leg runs")
    parser.add_argument("--repeats", type=int, default=4, help="legs of each budget")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--name", default="step_prompts")
    args = parser.parse_args()
    torch.set_num_threads(1)
    checkpoint = random_checkpoint("gpt2-small", full_vocab=True)
    engine = TextGenerator.load(EngineConfig(model_id=str(checkpoint), num_threads=1, dtype=args.dtype))
    prompts = engine.encode(PROMPTS, SamplingParams(max_new_tokens=8))
    runs = asyncio.run(measure(args, engine, prompts))
    medians = streamed_medians(runs)
    path = write_results(args.name, {"config": vars(args), "runs": runs, "medians": medians})
    _plot(runs, args)
    print(f"clients={args.clients} dtype={args.dtype} -> {path}")
    for name, m in medians.items():
        print(f"  {streamed_line(name, m)} (medians)")


def _plot(runs: dict[str, list[dict[str, Any]]], args: argparse.Namespace) -> None:
    panels = [(runs, "requests_per_s", "streamed requests/s"), (runs, "ttft_p50_s", "TTFT p50 (s)"),
              (runs, "engine_ms_per_step", "engine ms per step")]  # fmt: skip
    title = (f"STEP_PROMPT_TOKENS in one process: {args.clients} clients, {args.dtype}, one thread, "
             f"{machine()['cpu']}")  # fmt: skip
    # The default on a CPU in colour.
    plot_scatter_panels(panels, way(STEP_PROMPT_TOKENS["cpu"]), title, RESULTS / f"{args.name}.png",
                        xlabel="prompt tokens a poll admits")  # fmt: skip


if __name__ == "__main__":
    main()
