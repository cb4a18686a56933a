"""Throughput under concurrency: the service against the plain one-request-at-a-time pattern.

    python -m benchmarks.throughput [--model PATH] [--concurrency 1 2 4 8 16 32] [--rounds 3]

Both run side by side on one local Ray instance, on the same model, one replica each with the same
CPUs (or GPU), driven by the same closed-loop client (each of C clients sends ``rounds`` requests
back to back after a warm-up one): greedy requests of 32 new tokens, prompts of varied lengths.
Writes benchmarks/results/throughput.json and throughput.png and prints the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from pathlib import Path
from typing import Any

import httpx

from benchmarks import baseline_app
from benchmarks.checkpoints import random_checkpoint
from benchmarks.common import MODEL_NAME, PROMPTS, RESULTS, local_serve, plot_concurrency, wait_for, write_results
from benchmarks.loadgen import closed_loop
from ray_serve_app import build_graph
from settings import build_settings

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
    urls = {
        "service": f"http://127.0.0.1:{port}/service/generate",
        "baseline": f"http://127.0.0.1:{port}/baseline/generate",
    }
    for url in urls.values():  # both replicas up and answering before any timing
        wait_for(lambda url=url: _answers(url), timeout=600, interval=0.5)
    return urls


def _answers(url: str) -> bool:
    try:
        return httpx.post(url, json=body(0, 2), timeout=300).status_code == 200
    except httpx.HTTPError:
        return False


def body(n: int, new_tokens: int) -> dict[str, Any]:
    return {"prompt": PROMPTS[n % len(PROMPTS)], "generation_kwargs": {"max_new_tokens": new_tokens, "temperature": 0}}


def tokens_of(system: str):
    if system == "service":
        return lambda answer: answer["usage"]["completion_tokens"]
    return lambda answer: answer["tokens"]


def measure(urls: dict[str, str], levels: list[int], rounds: int, new_tokens: int) -> dict[str, Any]:
    out: dict[str, Any] = {name: {} for name in urls}
    for c in levels:
        # Alternate which system goes first, so slow drift on a shared machine favours neither.
        order = list(urls) if levels.index(c) % 2 == 0 else list(reversed(urls))
        for system in order:
            result = asyncio.run(closed_loop(urls[system], lambda n: body(n, new_tokens), tokens_of(system), c, rounds))
            out[system][str(c)] = result.as_dict()
            logger.info("%-8s c=%-3d %s", system, c, {k: v for k, v in result.as_dict().items() if k != "errors"})
    return out


def ratios(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    table = {}
    for c, svc in results["service"].items():
        base = results["baseline"][c]
        table[c] = {
            "requests_per_s": svc["requests_per_s"] / base["requests_per_s"],
            "p50_latency": svc["p50_s"] / base["p50_s"],
        }
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="checkpoint (default: random GPT-2-small shape)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--rounds", type=int, default=3, help="timed requests per client per level")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--cpus", type=int, default=2, help="CPUs (torch threads) per replica")
    parser.add_argument("--gpus", type=float, default=0.0, help="GPUs per replica (0: CPU)")
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--name", default="throughput")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    model = args.model or random_checkpoint("gpt2-small")
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
    print(f"{'clients':>7} {'service rps':>12} {'baseline rps':>13} {'ratio':>6} {'p50 svc':>8} {'p50 base':>9}")
    for c, ratio in table.items():
        svc, base = results["service"][c], results["baseline"][c]
        print(
            f"{c:>7} {svc['requests_per_s']:>12.2f} {base['requests_per_s']:>13.2f} {ratio['requests_per_s']:>6.2f}"
            f" {svc['p50_s']:>8.3f} {base['p50_s']:>9.3f}"
        )


if __name__ == "__main__":
    main()
