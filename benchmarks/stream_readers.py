"""Streamed against whole answers in one process, without Ray: what the replica's readers cost its engine.

    python -m benchmarks.stream_readers [--clients 16] [--seconds 6] [--repeats 8] [--dtype bfloat16] [--prompts all]

The model server's own path below Serve: the ``Batcher`` over this engine (the GPT-2-small-shaped random
checkpoint, one torch thread, batch limit 32) and ``--clients`` closed-loop clients in the same event loop,
each asking for 64 tokens and reading its request's stream as the model server does. Legs of each kind
alternate (whole, streamed, then the other way round), so that both meet the same machine:

- ``whole``: the reader of an answer collected in the replica (``streamed=False``);
- ``streamed``: the reader of a streamed answer, its messages spaced by ``STREAM_INTERVAL_S`` and
  ``STREAM_MESSAGES_PER_S`` (``--interval-s``, ``--messages-per-s``; the service's defaults unless given).

Nothing is sent anywhere, so any gap between the two is the readers' cost to the engine inside one process
(their event loop shares the GIL with the engine thread). Prints and writes
``benchmarks/results/<name>.json`` and ``.png``: requests/s, the engine's ms per step (between its step
callbacks), the event loop thread's CPU per step and streamed requests' TTFT p50 (asking to first read), medians
over the legs, and each round's streamed / whole ratio. With ``--prompts all`` the requests take the benchmark's
prompts in turn, as ``peer_vllm``'s do: its TTFT then compares with the service's and vLLM's there, less
everything above the engine (HTTP, the proxy, the Gateway, Serve's routing).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, NamedTuple

import torch

from benchmarks.common import PROMPTS, RESULTS, machine, scatter_panel, write_results
from config.model_fields import ModelFields
from engine.admission import STEP_PROMPT_TOKENS, TokenBudget
from engine.batcher import Batcher
from engine.model import EngineConfig, TextGenerator
from engine.types import SamplingParams
from testing.checkpoints import random_checkpoint

KINDS = ("whole", "streamed")
# A replica's admission on a CPU with the default settings (STEP_PROMPT_TOKENS unset); MAX_BATCH_TOKENS's 16384
# never binds these rows (at most 32 x 84 tokens).
SERVICE_BUDGET = TokenBudget(None, STEP_PROMPT_TOKENS["cpu"])


class ReadPacing(NamedTuple):
    """How a streamed request's reads are spaced: ``STREAM_INTERVAL_S`` and ``STREAM_MESSAGES_PER_S``."""

    interval_s: float
    messages_per_s: float


# The service's defaults, as a replica gets them.
SERVICE_PACING = ReadPacing(
    ModelFields.model_fields["stream_interval_s"].default, ModelFields.model_fields["stream_messages_per_s"].default
)


async def leg(
    engine: TextGenerator,
    prompts: list[list[int]],
    streamed: bool,
    clients: int,
    seconds: float,
    pacing: ReadPacing,
    budget: TokenBudget = SERVICE_BUDGET,
) -> dict[str, float | None]:
    """One leg: ``clients`` closed-loop clients for about ``seconds``; request ``k`` asks with ``prompts[k % len]``.

    ``budget``: what each of the engine's polls admits (the service's default on a CPU unless given)."""
    steps, step_s = 0, 0.0

    def run(items: Any, on_step: Any, poll: Any = None, max_batch_size: Any = None) -> None:
        ended = time.perf_counter()

        def timed(events: Any) -> None:
            nonlocal steps, step_s, ended
            steps += 1
            step_s += time.perf_counter() - ended
            on_step(events)
            ended = time.perf_counter()

        engine.run(items, timed, poll, max_batch_size)

    batcher = Batcher(
        run, 32, 0.005, budget, stream_interval_s=pacing.interval_s, stream_messages_per_s=pacing.messages_per_s
    )
    params = SamplingParams(max_new_tokens=64, ignore_eos=True)
    done, reads, first_reads = 0, 0, []
    stop = time.monotonic() + seconds

    async def client() -> None:
        nonlocal done, reads
        while time.monotonic() < stop:
            asked, first = time.monotonic(), None
            async for _ in batcher.open([list(prompts[done % len(prompts)])], [params], streamed=streamed):
                reads += 1
                if first is None:
                    first = time.monotonic() - asked
            first_reads.append(first)
            done += 1

    began, cpu, loop_cpu = time.monotonic(), time.process_time(), time.thread_time()
    await asyncio.gather(*(client() for _ in range(clients)))
    elapsed = time.monotonic() - began
    loop_cpu = time.thread_time() - loop_cpu
    cpu = time.process_time() - cpu
    await batcher.close()
    return {
        "requests_per_s": done / elapsed,
        "engine_ms_per_step": step_s / steps * 1000,
        "loop_cpu_ms_per_step": loop_cpu / steps * 1000,
        "process_cores": cpu / elapsed,
        "reads_per_request": reads / done,
        # From asking to the first read, as a streaming client's TTFT (a whole answer's first read is its end).
        "ttft_p50_s": statistics.median(first_reads) if streamed else None,
    }


async def alternated(
    ways: Sequence[str], repeats: int, run: Callable[[str], Awaitable[dict[str, Any]]], show: Callable[[str, dict], str]
) -> dict[str, list[dict[str, Any]]]:
    """Each way's legs, ``repeats`` of them: the ways take turns, in reverse order every other round, so that the
    machine's drift hits each alike; ``show(way, result)`` is printed after each leg."""
    runs: dict[str, list[dict[str, Any]]] = {way: [] for way in ways}
    for repeat in range(repeats):
        for way in ways if repeat % 2 == 0 else ways[::-1]:
            runs[way].append(result := await run(way))
            print(f"  {show(way, result)}", flush=True)
    return runs


# What a streamed leg's summary shows, per way (benchmarks.step_prompts, benchmarks.joining_steps).
STREAMED_KEYS = ("requests_per_s", "ttft_p50_s", "engine_ms_per_step")


def streamed_medians(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, float]]:
    """Each way's medians of :data:`STREAMED_KEYS` over its streamed legs."""
    return {
        way: {key: statistics.median(leg[key] for leg in legs) for key in STREAMED_KEYS} for way, legs in runs.items()
    }


def streamed_line(way: str, result: dict[str, Any]) -> str:
    """One streamed leg (or its medians) in a line: requests/s, TTFT p50 and the engine's step time."""
    ttft_ms, step_ms = result["ttft_p50_s"] * 1000, result["engine_ms_per_step"]
    return f"{way:>9s} {result['requests_per_s']:5.2f} req/s, TTFT p50 {ttft_ms:4.0f} ms, {step_ms:5.1f} ms a step"


async def measure(args: argparse.Namespace, engine: TextGenerator, prompts: list[list[int]]) -> dict[str, list[dict]]:
    pacing = ReadPacing(args.interval_s, args.messages_per_s)
    await leg(engine, prompts, False, args.clients, 2.0, pacing)  # warm: packing, kernels, buffers

    def show(kind: str, result: dict[str, Any]) -> str:
        return (f"{kind:8s} {result['requests_per_s']:5.2f} req/s, {result['engine_ms_per_step']:5.1f} ms a step, "
                f"event loop {result['loop_cpu_ms_per_step']:.2f} ms a step{_ttft(result)}")  # fmt: skip

    return await alternated(
        KINDS, args.repeats, lambda kind: leg(engine, prompts, kind == "streamed", args.clients, args.seconds, pacing),
        show,
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=6.0, help="about how long each leg runs")
    parser.add_argument("--repeats", type=int, default=8, help="legs of each kind")
    parser.add_argument(
        "--messages-per-s", type=float, default=SERVICE_PACING.messages_per_s, help="STREAM_MESSAGES_PER_S"
    )
    parser.add_argument("--interval-s", type=float, default=SERVICE_PACING.interval_s, help="STREAM_INTERVAL_S")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument(
        "--prompts", choices=("first", "all"), default="first",
        help="every request the benchmark's first prompt, or its prompts in turn (as peer_vllm asks)",
    )  # fmt: skip
    parser.add_argument("--name", default="stream_readers")
    args = parser.parse_args()
    torch.set_num_threads(1)
    checkpoint = random_checkpoint("gpt2-small", full_vocab=True)
    engine = TextGenerator.load(EngineConfig(model_id=str(checkpoint), num_threads=1, dtype=args.dtype))
    prompts = engine.encode(PROMPTS if args.prompts == "all" else PROMPTS[:1], SamplingParams(max_new_tokens=8))
    runs = asyncio.run(measure(args, engine, prompts))
    keys = runs["whole"][0].keys()
    medians = {
        kind: {key: statistics.median(run[key] for run in runs[kind]) if runs[kind][0][key] is not None else None
               for key in keys}
        for kind in KINDS
    }  # fmt: skip
    ratios = [s["requests_per_s"] / w["requests_per_s"] for s, w in zip(runs["streamed"], runs["whole"], strict=True)]
    data = {"config": vars(args), "machine": machine(), "load_average": os.getloadavg(), "runs": runs,
            "medians": medians, "streamed_over_whole": ratios,
            "streamed_over_whole_median": statistics.median(ratios)}  # fmt: skip
    path = write_results(args.name, data)
    _plot(runs, ratios, args)
    print(f"clients={args.clients} dtype={args.dtype} messages/s={args.messages_per_s:g} "
          f"interval={args.interval_s:g}s -> {path}")  # fmt: skip
    for kind, m in medians.items():
        print(f"  {kind:8s} {m['requests_per_s']:5.2f} req/s, {m['engine_ms_per_step']:5.1f} ms a step, "
              f"event loop {m['loop_cpu_ms_per_step']:.2f} ms a step{_ttft(m)} (medians)")  # fmt: skip
    rounds = ", ".join(f"{r:.2f}" for r in ratios)
    print(f"  streamed / whole per round: {rounds}; median {statistics.median(ratios):.2f}")


def _ttft(result: dict[str, Any]) -> str:
    return "" if result["ttft_p50_s"] is None else f", TTFT p50 {result['ttft_p50_s'] * 1000:.0f} ms"


def _plot(runs: dict[str, list[dict[str, float]]], ratios: list[float], args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(11, 3.6))
    panels = (("requests_per_s", "requests/s"), ("engine_ms_per_step", "ms per step"))
    for ax, (key, title) in zip(axes[:2], panels, strict=True):
        scatter_panel(ax, runs, key, title, highlight="streamed")
    axes[2].plot(range(1, len(ratios) + 1), ratios, "o-", color="#2a7")
    axes[2].axhline(1.0, color="black", lw=0.8)
    axes[2].axhline(0.95, color="#c33", lw=0.8, ls="--")
    axes[2].set_xlabel("round")
    axes[2].set_title("streamed / whole requests/s")
    fig.suptitle(f"One process, no Ray: {args.clients} clients, {args.dtype}, GPT-2-small shape, 1 thread")
    fig.tight_layout()
    fig.savefig(RESULTS / f"{args.name}.png", dpi=110)


if __name__ == "__main__":
    main()
