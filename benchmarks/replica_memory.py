"""A model replica's memory with its batch full at the default limits, beside the key/value bound the README states.

Two models of the embedded model's shape (GPT-2, 4 layers of width 256, float32: 8 KiB of keys and values a
token), each served with every limit at its default (MAX_BATCH_SIZE 16, MAX_BATCH_TOKENS 16384,
MAX_PROMPT_TOKENS derived from the context):

- ``embedded``: the embedded model itself (``models/pydoc-gpt-mini``, context 512). Its batch is bounded by
  the context first: 16 rows of at most 512 tokens, 8,192 tokens (64 MiB of keys and values).
- ``context-2k``: the same shape with random weights and a context of 2,048, so that MAX_BATCH_TOKENS is the
  bound: 16 rows of 1,024 tokens fill its 16,384 (128 MiB).

For each, 16 clients at once send a token-id prompt and ``max_tokens`` (``ignore_eos``) whose sum is the
row's share of the bound, five rounds; the replica's resident memory (psutil, by its PID) is sampled every
20 ms. Reported: RSS after a short warm-up answer, the peak while the batch is full, the growth, and the
computed key/value bound. Writes benchmarks/results/replica_memory.json. Run:
``python -m benchmarks.replica_memory``.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from benchmarks.common import replica_stats, write_results
from config.model_fields import DEFAULT_MODEL_DIR
from ray_serve_app import build_graph
from settings import build_settings
from testing.checkpoints import build_tokenizer, random_gpt2
from testing.http import ok
from testing.polling import wait_for
from testing.serve import local_serve

logger = logging.getLogger(__name__)
ROWS = 16  # MAX_BATCH_SIZE's default
KV_BYTES_PER_TOKEN = 2 * 4 * 256 * 4  # keys and values x layers x width x float32
# (model, context, prompt tokens, max_tokens): rows x (prompt + max_tokens) is the batch's bound
CASES = (("embedded", 512, 480, 31), ("context-2k", 2048, 1000, 24))


def replica_pid(app: str) -> int:
    import psutil

    for proc in psutil.Process(os.getpid()).children(recursive=True):
        try:
            if " ".join(proc.cmdline()).startswith(f"ray::ServeReplica:{app}:"):
                return proc.pid
        except psutil.Error:
            continue
    raise LookupError(f"no replica process of {app}")


class Peak(threading.Thread):
    """The highest RSS of one process, sampled every 20 ms until stopped."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        import psutil

        self.proc = psutil.Process(pid)
        self.peak = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.02)


def complete(url: str, model: str, prompt: list[int], max_tokens: int) -> dict[str, Any]:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    response = httpx.post(f"{url}/v1/completions", json=body, timeout=600)
    if response.status_code != 200:
        raise httpx.HTTPError(f"{model}: {response.status_code} {response.text[:300]}")
    return response.json()


def fill(url: str, model: str, prompt_tokens: int, max_tokens: int, rounds: int = 5) -> dict[str, Any]:
    pid = replica_pid(model)
    complete(url, model, [11, 12, 13], 4)  # warm: the weights and the first small cache are in place
    import psutil

    idle = psutil.Process(pid).memory_info().rss
    peaks, batches = [], []
    for r in range(rounds):
        before = replica_stats(model)
        sampler = Peak(pid)
        sampler.start()
        prompts = [[(17 * (i + r * ROWS) + 31 * j) % 390 + 5 for j in range(prompt_tokens)] for i in range(ROWS)]
        with ThreadPoolExecutor(ROWS) as pool:
            answers = list(pool.map(lambda p: complete(url, model, p, max_tokens), prompts))
        sampler.stop.set()
        sampler.join()
        after = replica_stats(model)
        assert all(a["usage"]["completion_tokens"] == max_tokens for a in answers)
        peaks.append(sampler.peak)
        batches.append(after["batches"] - before["batches"])
    width = prompt_tokens + max_tokens
    mib = 2**20
    return {
        "rows": ROWS,
        "row_tokens": width,
        "batch_tokens": ROWS * width,
        "kv_bound_mib": round(ROWS * width * KV_BYTES_PER_TOKEN / mib, 1),
        "rss_idle_mib": round(idle / mib, 1),
        "rss_peak_mib": [round(p / mib, 1) for p in peaks],
        "growth_mib_median": round((statistics.median(peaks) - idle) / mib, 1),
        "batches_per_round": batches,
    }


def main() -> None:
    logging.basicConfig(level=logging.INFO)
    from ray import serve

    wide = Path("/tmp/bench-replica-memory-2k")
    if not (wide / "config.json").exists():
        tok = build_tokenizer(wide)
        ids = {"bos_token_id": tok.eos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
        random_gpt2(wide, vocab_size=len(tok), n_positions=2048, n_embd=256, n_layer=4, n_head=4, **ids)
    entries = [{"name": "embedded", "model_id": str(DEFAULT_MODEL_DIR), "min_replicas": 1, "max_replicas": 1},
               {"name": "context-2k", "model_id": str(wide), "min_replicas": 1, "max_replicas": 1}]  # fmt: skip
    settings = build_settings({"MODELS": json.dumps(entries), "WARM_WORKERS": "0"})
    results: dict[str, Any] = {}
    load = os.getloadavg()[0]
    with local_serve(num_cpus=2) as port:
        url = f"http://127.0.0.1:{port}"
        serve.run(build_graph(settings), name="llm", route_prefix="/", blocking=False)
        wait_for(lambda: ok(f"{url}/healthz"), timeout=120, what="the Gateway")
        for model, context, prompt_tokens, max_tokens in CASES:
            wait_for(lambda m=model: ok_model(url, m), timeout=600, interval=1, what=f"{model} to run")
            results[model] = {"context": context, **fill(url, model, prompt_tokens, max_tokens)}
            logger.info("%s: %s", model, results[model])
        serve.delete("llm")
    limits = {"MAX_BATCH_SIZE": ROWS, "MAX_BATCH_TOKENS": 16384, "kv_bytes_per_token": KV_BYTES_PER_TOKEN}
    data = {"cases": results, "limits": limits, "load_average": [round(load, 1), round(os.getloadavg()[0], 1)]}
    logger.info("wrote %s", write_results("replica_memory", data))


def ok_model(url: str, model: str) -> bool:
    try:
        complete(url, model, [11, 12], 1)
    except httpx.HTTPError:
        return False
    return True


if __name__ == "__main__":
    main()
