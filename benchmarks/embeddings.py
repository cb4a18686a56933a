"""/v1/embeddings throughput on a small random encoder: one input a request, 32 inputs a request, and 32
clients sending one input each (their inputs share forward passes), beside the same model called directly.

    python -m benchmarks.embeddings [--seconds 8] [--rounds 3]

The encoder is BERT-shaped like all-MiniLM-L6-v2 (6 layers, hidden 384) with random weights and a small
tokenizer; inputs are 20-30 tokens. One replica with 1 CPU, as the direct baseline gets 1 torch thread.
Modes are interleaved and repeated (``--rounds``) so that drift on a shared machine hits each alike; the
median of the rounds is reported, with the spread and the load average before and after.
Writes benchmarks/results/embeddings.{json,png}.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import logging
import os
import statistics
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks.common import RESULTS, write_results
from testing.checkpoints import CACHE, CORPUS, build_tiny_encoder

logger = logging.getLogger("embeddings")
KEY = "sk-bench-embeddings-0123"
TEXTS = [f"{a} {b}" for a, b in itertools.pairwise(CORPUS[:7])]
MODES = {"batch_1": (1, 1), "batch_32": (1, 32), "clients_32": (32, 1)}  # name -> (clients, inputs a request)


def encoder() -> Path:
    path = CACHE / "encoder-384x6"
    if not (path / "config.json").is_file():
        path.mkdir(parents=True, exist_ok=True)
        build_tiny_encoder(path, pooling="mean", hidden_size=384, n_layer=6)
    return path


async def service_mode(url: str, clients: int, size: int, seconds: float) -> float:
    """Inputs embedded per second by ``clients`` clients sending ``size`` inputs a request for ``seconds``."""
    done = 0
    deadline = time.perf_counter() + seconds

    async def client(c: int, http: httpx.AsyncClient) -> None:
        nonlocal done
        while time.perf_counter() < deadline:
            body = {"model": "enc", "input": [TEXTS[(c + i) % len(TEXTS)] for i in range(size)]}
            response = await http.post("/v1/embeddings", json=body)
            response.raise_for_status()
            done += size

    headers = {"Authorization": f"Bearer {KEY}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=120) as http:
        begun = time.perf_counter()
        await asyncio.gather(*(client(c, http) for c in range(clients)))
        return done / (time.perf_counter() - begun)


def direct_mode(embedder: Any, size: int, seconds: float) -> float:
    """Inputs per second of the model called in this process, ``size`` inputs a forward pass."""
    ids = embedder.encode_texts([TEXTS[i % len(TEXTS)] for i in range(size)])
    done, begun = 0, time.perf_counter()
    while time.perf_counter() - begun < seconds:
        embedder.embed(ids)
        done += size
    return done / (time.perf_counter() - begun)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from ray import serve

    from engine.embeddings import Embedder, EmbedderConfig
    from ray_serve_app import build_graph
    from settings import build_settings
    from testing.http import ok
    from testing.polling import wait_for
    from testing.serve import local_serve

    path = encoder()
    torch.set_num_threads(1)
    embedder = Embedder.load(EmbedderConfig(model_id=str(path), dtype="float32", num_threads=1))
    model = {"name": "enc", "model_id": str(path), "task": "embed", "dtype": "float32", "max_batch_size": 32}
    settings = build_settings(
        {"MODELS": json.dumps([model]), "API_KEY": KEY, "MIN_REPLICAS": "1", "MAX_REPLICAS": "1", "WARM_WORKERS": "0"}
    )
    rows: dict[str, dict[str, list[float]]] = {m: {"service": [], "direct": []} for m in MODES}
    load_before = os.getloadavg()
    with local_serve(num_cpus=2) as port:
        url = f"http://127.0.0.1:{port}"
        serve.run(build_graph(settings), name="llm", route_prefix="/", blocking=False)
        wait_for(lambda: ok(f"{url}/healthz"), timeout=120, what="the Gateway")
        asyncio.run(service_mode(url, 1, 1, 2.0))  # wakes nothing (min 1) but warms the route
        for r in range(args.rounds):
            for name, (clients, size) in MODES.items():
                rows[name]["service"].append(asyncio.run(service_mode(url, clients, size, args.seconds)))
                rows[name]["direct"].append(direct_mode(embedder, max(clients, size), args.seconds))
                logger.info("round %d %s: service %.1f inputs/s, direct %.1f", r, name, rows[name]["service"][-1],
                            rows[name]["direct"][-1])  # fmt: skip
    load_after = os.getloadavg()
    results = {
        name: {
            "clients": MODES[name][0],
            "inputs_per_request": MODES[name][1],
            "service_inputs_per_s": statistics.median(v["service"]),
            "direct_inputs_per_s": statistics.median(v["direct"]),
            "service_over_direct": statistics.median(v["service"]) / statistics.median(v["direct"]),
            "rounds": v,
        }
        for name, v in rows.items()
    }
    note = (
        f"2 shared cores; load average {load_before[0]:.1f} before and {load_after[0]:.1f} after; other work ran "
        "beside it, so read the ratios (same run, interleaved rounds), not the absolute figures"
    )
    data = {"encoder": "BERT 6 layers, hidden 384, random weights, mean pooling", "results": results, "noise": note}
    out = write_results("embeddings", data)
    plot(results, RESULTS / "embeddings.png")
    logger.info("wrote %s\n%s", out, json.dumps({k: {m: round(v[m], 2) for m in v if m.endswith(
        ("_per_s", "direct"))} for k, v in results.items()}, indent=1))  # fmt: skip


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, ax = plt.subplots(figsize=(7, 4))
    x = range(len(names))
    ax.bar([i - 0.2 for i in x], [results[n]["service_inputs_per_s"] for n in names], 0.4, label="/v1/embeddings")
    ax.bar([i + 0.2 for i in x], [results[n]["direct_inputs_per_s"] for n in names], 0.4, label="model called directly")
    ax.set_xticks(list(x), names)
    ax.set_ylabel("inputs embedded / s (median of rounds)")
    ax.set_title("Embeddings throughput, 6x384 random encoder, 1 CPU replica")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


if __name__ == "__main__":
    main()
