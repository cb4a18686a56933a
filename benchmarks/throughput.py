"""Throughput and streaming latency under concurrency: the service against the plain one-at-a-time pattern.

    python -m benchmarks.throughput [--model PATH] [--concurrency 1 2 4 8 16 32] [--rounds 3]

Three clients take turns at each concurrency level, side by side on one local Ray instance, on the
same model, one replica each with the same CPUs (or GPU), each a closed loop (each of C clients
sends ``rounds`` requests back to back after a warm-up one), greedy, 64 new tokens by default,
prompts of varied lengths:

- ``service``: ``POST /v1/completions``, the whole answer at once;
- ``service_stream``: the same with ``stream: true``: time to first token (TTFT) and the gaps
  between the pieces of text that follow (inter-token latency);
- ``baseline``: the plain pattern's ``/generate`` (its latency is the time to its whole answer).

Writes benchmarks/results/throughput.json and throughput.png and prints the table.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from pathlib import Path
from typing import Any

from benchmarks import baseline_app
from benchmarks.common import MODEL_NAME, PROMPTS, RESULTS, plot_concurrency, write_results
from benchmarks.loadgen import closed_loop
from ray_serve_app import build_graph
from settings import build_settings
from testing.checkpoints import random_checkpoint
from testing.http import post_ok
from testing.polling import wait_for
from testing.serve import local_serve

logger = logging.getLogger("throughput")


def deploy(model: Path, port: int, cpus: int, gpus: float, max_batch: int) -> dict[str, str]:
    from ray import serve

    settings = build_settings(
        {
            "MODEL_ID": str(model),
            "SERVED_MODEL_NAME": MODEL_NAME,
            "MIN_REPLICAS": "1",
            "MAX_REPLICAS": "1",
            "NUM_CPUS_PER_REPLICA": str(cpus),
            "NUM_GPUS_PER_REPLICA": str(gpus),
            "MAX_BATCH_SIZE": str(max_batch),
            "MAX_ONGOING_REQUESTS": str(max(64, 2 * max_batch)),
            "MAX_QUEUED_REQUESTS": "-1",
            "MAX_NEW_TOKENS_LIMIT": "1024",
        }
    )
    serve.run(build_graph(settings), name="service", route_prefix="/service", blocking=False)
    options: dict[str, Any] = {"ray_actor_options": {"num_cpus": cpus, "num_gpus": gpus}}
    plain = baseline_app.PlainGenerator.options(**options).bind(str(model), cpus, "cuda" if gpus else "cpu")
    serve.run(plain, name="baseline", route_prefix="/baseline", blocking=False)
    completions = f"http://127.0.0.1:{port}/service/v1/completions"
    urls = {
        "service": completions,
        "service_stream": completions,
        "baseline": f"http://127.0.0.1:{port}/baseline/generate",
    }
    for system in ("service", "baseline"):  # both replicas up and answering before any timing
        wait_for(lambda system=system: post_ok(urls[system], body(system, 0, 2)), timeout=600, interval=0.5)
    return urls


def body(system: str, n: int, new_tokens: int) -> dict[str, Any]:
    prompt = PROMPTS[n % len(PROMPTS)]
    if system == "baseline":
        return {"prompt": prompt, "generation_kwargs": {"max_new_tokens": new_tokens, "temperature": 0}}
    openai = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": new_tokens, "temperature": 0}
    if system == "service_stream":
        openai |= {"stream": True, "stream_options": {"include_usage": True}}
    return openai


def tokens_of(system: str):
    if system == "baseline":
        return lambda answer: answer["tokens"]
    return lambda answer: answer["usage"]["completion_tokens"]


def measure(urls: dict[str, str], levels: list[int], rounds: int, new_tokens: int) -> dict[str, Any]:
    out: dict[str, Any] = {name: {} for name in urls}
    for c in levels:
        # Rotate which system goes first, so slow drift on a shared machine favours none.
        order = list(urls)[levels.index(c) % 3 :] + list(urls)[: levels.index(c) % 3]
        for system in order:
            result = asyncio.run(
                closed_loop(
                    urls[system],
                    lambda n, system=system: body(system, n, new_tokens),
                    tokens_of(system),
                    c,
                    rounds,
                    stream=system == "service_stream",
                )
            )
            out[system][str(c)] = result.as_dict()
            logger.info("%-14s c=%-3d %s", system, c, {k: v for k, v in result.as_dict().items() if k != "errors"})
    return out


def ratios(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    table = {}
    for c, svc in results["service"].items():
        base, stream = results["baseline"][c], results["service_stream"][c]
        table[c] = {
            "requests_per_s": svc["requests_per_s"] / base["requests_per_s"],
            "p50_latency": svc["p50_s"] / base["p50_s"],
            "stream_over_unary_requests_per_s": stream["requests_per_s"] / svc["requests_per_s"],
        }
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="checkpoint (default: random GPT-2-small shape)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--rounds", type=int, default=3, help="timed requests per client per level")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--cpus", type=int, default=2, help="CPUs (torch threads) per replica")
    parser.add_argument("--gpus", type=float, default=0.0, help="GPUs per replica (0: CPU)")
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--name", default="throughput")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    model = args.model or random_checkpoint("gpt2-small", full_vocab=True)  # every token is text: TTFT
    with local_serve(num_cpus=2 * args.cpus + 1, num_gpus=2 if args.gpus else 0) as port:
        urls = deploy(model, port, args.cpus, args.gpus, args.max_batch)
        results = measure(urls, args.concurrency, args.rounds, args.new_tokens)
    table = ratios(results)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()} | {"model": str(model)}
    path = write_results(args.name, {"config": config, "results": results, "ratio_service_over_baseline": table})
    device = f"{args.gpus:g} GPU" if args.gpus else f"{args.cpus} CPU threads"
    plot_concurrency(
        results, RESULTS / f"{args.name}.png", f"Service vs one-at-a-time baseline: {model.name}, {device}"
    )
    print(f"wrote {path}")
    print(
        f"{'clients':>7} {'svc rps':>8} {'stream rps':>10} {'plain rps':>9} {'svc/plain':>9} {'stream/svc':>10}"
        f" {'TTFT p50':>8} {'TTFT p95':>8} {'ITL p50':>7} {'ITL p95':>7} {'plain p50':>9}"
    )
    for c, ratio in table.items():
        svc, stream, base = results["service"][c], results["service_stream"][c], results["baseline"][c]
        print(
            f"{c:>7} {svc['requests_per_s']:>8.2f} {stream['requests_per_s']:>10.2f} {base['requests_per_s']:>9.2f}"
            f" {ratio['requests_per_s']:>9.2f} {ratio['stream_over_unary_requests_per_s']:>10.3f}"
            f" {stream.get('ttft_p50_s', float('nan')):>8.3f} {stream.get('ttft_p95_s', float('nan')):>8.3f}"
            f" {stream.get('itl_p50_s', float('nan')):>7.3f} {stream.get('itl_p95_s', float('nan')):>7.3f}"
            f" {base['p50_s']:>9.3f}"
        )


if __name__ == "__main__":
    main()
