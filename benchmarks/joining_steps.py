"""Arrivals joining a decode step's pass against a prefill pass of their own, in one process.

    python -m benchmarks.joining_steps [--rows 16] [--requests 64] [--repeats 6] [--clients 16] [--seconds 8] \
        [--dtype bfloat16]

Two ways, alternated run by run on one loaded model so that load on a shared machine hits both alike:

- ``joining``: what the engine does, each arrival prefilled in the next step's own pass
  (``engine.continuous.JOINING_STEP_TOKENS``);
- ``separate``: the same with that limit at 0, each arrival prefilled in a pass of its own before the next
  step.

Two loads:

- **staggered** (``--rows``, ``--requests``): clients that send their next request when the last one ends,
  each with ``PROMPTS[0]`` (2 tokens): ``--rows`` rows decode together (their first answers 4, 8, 12...
  tokens long, so they end in different steps), and each row that ends is replaced at once by a request
  for 64 tokens, until ``--requests`` have run. Medians of the time per generated token (the whole run
  over every token made) and of each arrival's wait, from the step where it arrived to its first token.
- **streamed clients** (``--clients``, 0 to skip): the service's shape, ``benchmarks.stream_readers``'
  streamed leg (the ``Batcher`` over the engine, ``STEP_PROMPT_TOKENS`` and stream pacing at the
  service's CPU defaults, ``peer_vllm``'s prompts in turn, 64 tokens each) for about ``--seconds`` a
  leg: medians of requests/s and of TTFT p50.

Prints and writes ``benchmarks/results/<name>.json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from typing import Any

import torch

import engine.continuous as continuous
from benchmarks.common import PROMPTS, RESULTS, machine, plot_scatter_panels, write_results
from benchmarks.stream_readers import SERVICE_PACING, alternated, leg, streamed_line, streamed_medians
from engine.model import EngineConfig, TextGenerator
from engine.types import Delta, SamplingParams
from engine.work import WorkItem
from testing.checkpoints import random_checkpoint

WAYS = {"joining": continuous.JOINING_STEP_TOKENS, "separate": 0}


def use(way: str) -> None:
    """Arrivals in this process's engine are prefilled ``way``'s way from now on."""
    continuous.JOINING_STEP_TOKENS = WAYS[way]


def closed_loop(engine: TextGenerator, prompt: list[int], rows: int, requests: int, tokens: int) -> dict[str, Any]:
    """One run: ms per generated token, and each arrival's wait for its first token (ms)."""
    made: list[WorkItem] = []

    def request(new_tokens: int) -> WorkItem:
        made.append(WorkItem(len(made), 0, list(prompt), SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)))
        return made[-1]

    first = [request(4 * (i + 1)) for i in range(rows)]
    queue: list[WorkItem] = []
    arrived: dict[int, float] = {}
    waits: list[float] = []
    generated = 0

    def on_step(events: list[tuple[WorkItem, Delta]]) -> None:
        nonlocal generated
        now = time.perf_counter()
        for item, delta in events:
            generated += delta.tokens
            if item.stream in arrived and delta.tokens:
                waits.append(now - arrived.pop(item.stream))
            if delta.finish_reason is not None and len(made) < requests:
                queue.append(request(tokens))
                arrived[made[-1].stream] = now

    def poll(free: int, shape: object = None) -> list[WorkItem]:
        taken = queue[:free]
        del queue[:free]
        return taken

    started = time.perf_counter()
    engine.run(first, on_step, poll=poll, max_batch_size=2 * rows)
    elapsed = time.perf_counter() - started
    return {"ms_per_token": elapsed / generated * 1000, "first_token_wait_ms": statistics.median(waits) * 1000}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clients", type=int, default=16, help="streamed clients of the second load; 0: skip it")
    parser.add_argument("--seconds", type=float, default=8.0, help="about how long each streamed-clients leg runs")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--name", default="joining_steps")
    args = parser.parse_args()
    checkpoint = random_checkpoint("gpt2-small", full_vocab=True)
    engine = TextGenerator.load(EngineConfig(model_id=str(checkpoint), num_threads=args.threads, dtype=args.dtype))
    prompt = engine.encode(PROMPTS[:1], SamplingParams(max_new_tokens=8))[0]
    default = continuous.JOINING_STEP_TOKENS
    runs: dict[str, list[dict[str, Any]]] = {way: [] for way in WAYS}
    try:
        with torch.inference_mode():
            closed_loop(engine, prompt, args.rows, args.rows + 4, args.tokens)  # warm: packing, kernels, buffers
            for repeat in range(args.repeats):
                for way in list(WAYS) if repeat % 2 == 0 else list(reversed(WAYS)):
                    use(way)
                    runs[way].append(closed_loop(engine, prompt, args.rows, args.requests, args.tokens))
        clients = asyncio.run(streamed_clients(args, engine)) if args.clients else {}
    finally:
        continuous.JOINING_STEP_TOKENS = default
    result = {
        way: {key: statistics.median(run[key] for run in runs[way]) for key in ("ms_per_token", "first_token_wait_ms")}
        for way in WAYS
    }
    ratio = result["separate"]["ms_per_token"] / result["joining"]["ms_per_token"]
    client_medians = streamed_medians(clients)
    data = {"config": vars(args), "machine": machine(), "load_average": os.getloadavg(), "prompt_tokens": len(prompt),
            "runs": runs, "results": result, "joining_tokens_per_s_over_separate": ratio,
            "streamed_clients": {"legs": clients, "medians": client_medians}}  # fmt: skip
    path = write_results(args.name, data)
    _plot(runs, clients, args)
    print(f"rows={args.rows} requests={args.requests} dtype={args.dtype} threads={args.threads} -> {path}")
    for way, r in result.items():
        print(f"  {way:9s} {r['ms_per_token']:6.2f} ms a token, first-token wait {r['first_token_wait_ms']:6.1f} ms")
    print(f"  joining / separate: {ratio:.2f}x the tokens per second")
    for way, m in client_medians.items():
        print(f"  {args.clients} streamed clients, {streamed_line(way, m)} (medians)")


async def streamed_clients(args: argparse.Namespace, engine: TextGenerator) -> dict[str, list[dict[str, Any]]]:
    """The service's shape: ``args.clients`` streamed closed-loop clients over the Batcher, each way in turn."""
    prompts = engine.encode(PROMPTS, SamplingParams(max_new_tokens=8))
    await leg(engine, prompts, True, args.clients, 2.0, SERVICE_PACING)  # warm: the Batcher's path

    def run(way: str) -> Any:
        use(way)
        return leg(engine, prompts, True, args.clients, args.seconds, SERVICE_PACING)

    return await alternated(list(WAYS), args.repeats, run, streamed_line)


def _plot(
    runs: dict[str, list[dict[str, Any]]], clients: dict[str, list[dict[str, Any]]], args: argparse.Namespace
) -> None:
    panels = [(runs, "ms_per_token", "staggered: ms per generated token"),
              (runs, "first_token_wait_ms", "staggered: an arrival's first token (ms)")]  # fmt: skip
    if clients:
        panels += [(clients, "requests_per_s", f"{args.clients} streamed clients: requests/s"),
                   (clients, "ttft_p50_s", f"{args.clients} streamed clients: TTFT p50 (s)")]  # fmt: skip
    title = (f"{args.dtype}, GPT-2-small shape, arrivals joining a step's pass or in a pass of their own, "
             f"{args.threads} thread(s)")  # fmt: skip
    plot_scatter_panels(panels, "joining", title, RESULTS / f"{args.name}.png")


if __name__ == "__main__":
    main()
