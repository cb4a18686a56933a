"""Wake-up from zero by checkpoint size: what each extra GB of weights costs beyond a warm answer.

    python -m benchmarks.cold_start --sizes [--runs 3] [--keep-checkpoints]
        [--checkpoint-dtype bfloat16] [--dtype auto|float32|bfloat16]

For each checkpoint (the GPT-2-small shape, ~1.2 GB and ~2.8 GB random GPT-2 shapes, stored in
float32, or in bfloat16 with ``--checkpoint-dtype``: half the bytes), one local Ray instance serves it
three ways: the service with its warm worker pool (WARM_WORKERS=1, ``DTYPE`` from ``--dtype``) and its
packed layers kept in a temporary ``PACKED_CACHE_DIR``, which an unmeasured wake fills first, so that
every measured wake maps them as every wake after a node's first does; the same without that cache
(``nocache``: converted and packed at every wake); and the plain pattern (benchmarks/baseline_app.py).
They take turns waking from zero: one greedy request at
zero replicas, then the same request twice more, one after the other: the second answer (which also
pays the replica's one-off work after its first batch: a float32 checkpoint is converted and packed
then) and, once the service's warm pool has refilled (its new worker would otherwise compete for the
CPUs), the warm answer. The wake cost is the first answer's time less the warm one's; its slope over
the checkpoint's size is the cost per extra GB, set beside the machine's read bandwidth measured in
the same run (memory, with the replica's threads; and the checkpoint's file from the page cache).
The service's phases come from its replicas' cold-start reports. ``--idle`` (default 20 s here) must
outlast the pool's refill, or the warm answer would be a wake of its own (the run stops, saying so). Writes
benchmarks/results/cold_start_sizes.json and .png; the big checkpoints are deleted afterwards unless
``--keep-checkpoints``.
"""

from __future__ import annotations

import logging
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks import cold_start
from benchmarks.common import PROMPTS, RESULTS, summary, warm_pool_full, write_results
from testing.checkpoints import random_checkpoint
from testing.serve import local_serve

logger = logging.getLogger("cold_start_sizes")

SIZES = ("gpt2-small", "gpt2-1.2gb", "gpt2-2.8gb")
SYSTEMS = ("service", "nocache", "baseline")
SERVICE_PHASES = ("weights_s", "warmup_s", "first_generation_s")


def memory_bandwidth(threads: int, gb: float = 1.0, repeats: int = 5) -> float:
    """GB/s of one pass over ``gb`` of float32 in memory (a sum), median of ``repeats``, with ``threads``."""
    import torch

    torch.set_num_threads(threads)
    data = torch.ones(int(gb * 1e9 / 4))
    data.sum()  # the first pass faults the pages in
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        data.sum()
        times.append(time.perf_counter() - started)
    return round(gb / statistics.median(times), 2)


def _answer(url: str, body: dict[str, Any]) -> float:
    started = time.time()
    httpx.post(url, json=body, timeout=600).raise_for_status()
    return time.time() - started


def one_size(
    model: Path, runs: int, cpus: int, idle_s: float, new_tokens: int, dtype: str | None = None
) -> dict[str, Any]:
    from ray import serve

    records: dict[str, list[dict[str, Any]]] = {system: [] for system in SYSTEMS}
    services = tuple(s for s in SYSTEMS if s != "baseline")
    with tempfile.TemporaryDirectory(prefix="packed-layers-") as packed, local_serve(num_cpus=cpus) as port:
        settings = cold_start.service_settings(model, cpus, idle_s, services, dtype, Path(packed))
        serve.run(cold_start.build_graph(settings), name="service", route_prefix="/", blocking=False)
        plain = cold_start.baseline_app.PlainGenerator.options(
            ray_actor_options={"num_cpus": cpus},
            autoscaling_config={"min_replicas": 0, "max_replicas": 1, "downscale_delay_s": idle_s},
        ).bind(str(model), cpus)
        serve.run(plain, name="baseline", route_prefix="/baseline", blocking=False)
        base = f"http://127.0.0.1:{port}"
        cold_start.wait_for(lambda: cold_start.ok(f"{base}/healthz"), timeout=120)
        applications = [cold_start.MODEL_NAMES[s] for s in services]
        cold_start.wait_for(lambda: set(applications) <= set(serve.status().applications), timeout=120)
        urls = {"service": base, "nocache": base, "baseline": f"{base}/baseline"}
        cold_start.prime(base, "service", new_tokens, Path(packed))  # as on a node that served it before
        for _ in range(runs):
            for system in SYSTEMS:
                run = cold_start.one_cold_start(urls, system, new_tokens, SYSTEMS)
                body = {"prompt": PROMPTS[1], "generation_kwargs": {"max_new_tokens": new_tokens, "temperature": 0}}
                if system != "baseline":
                    body["model"] = cold_start.MODEL_NAMES[system]
                # The replica's next answer also pays its one-off work after a first batch (the service packs
                # its linear layers then): kept as second_answer_s; the warm answer is the one after it.
                run["second_answer_s"] = round(_answer(f"{urls[system]}/generate", body), 3)
                if system != "baseline":
                    # The pool refills after a wake; its new worker imports torch beside the warm answer.
                    pooled = cold_start.MODEL_NAMES[system]
                    cold_start.wait_for(lambda: warm_pool_full(pooled), timeout=300, interval=0.5)  # noqa: B023
                before_warm = time.time()
                run["warm_s"] = round(_answer(f"{urls[system]}/generate", body), 3)
                if system != "baseline" and cold_start._last_cold_start(urls[system], pooled, before_warm):
                    raise RuntimeError(
                        f"the model went to zero before its warm answer (IDLE_TIMEOUT_S {idle_s} s): raise --idle"
                    )
                run["wake_cost_s"] = round(run["total_s"] - run["warm_s"], 3)
                run.pop("last_cold_start", None)
                records[system].append(run)
                logger.info("%s %s: total %.2fs, warm %.2fs", model.name, system, run["total_s"], run["warm_s"])
    out: dict[str, Any] = {}
    for system, runs_ in records.items():
        out[system] = {
            "total_s": summary([r["total_s"] for r in runs_]),
            "warm_s": summary([r["warm_s"] for r in runs_]),
            "second_answer_s": summary([r["second_answer_s"] for r in runs_]),
            "wake_cost_s": summary([r["wake_cost_s"] for r in runs_]),
            "runs": runs_,
        }
    for system in services:
        out[system]["median_phases_s"] = {
            key: statistics.median(r.get(key) or 0.0 for r in records[system]) for key in SERVICE_PHASES
        }
        out[system]["placement"] = records[system][-1].get("placement")
        out[system]["packed_cache"] = [r.get("packed_cache") for r in records[system]]
    return out


def slopes(results: dict[str, Any], systems: tuple[str, ...] = SYSTEMS) -> dict[str, float]:
    """Seconds per extra GB of the median wake cost, smallest checkpoint to largest, per system."""
    small, large = results["sizes"][SIZES[0]], results["sizes"][SIZES[-1]]
    extra_gb = (large["checkpoint_bytes"] - small["checkpoint_bytes"]) / 1e9
    return {
        system: round((large[system]["wake_cost_s"]["median"] - small[system]["wake_cost_s"]["median"]) / extra_gb, 3)
        for system in systems
    }


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.2))
    gb = [results["sizes"][s]["checkpoint_bytes"] / 1e9 for s in SIZES]
    for system, label in (("service", "service (warm pool, packed layers cached)"), ("nocache", "service, no cache"),
                          ("baseline", "plain pattern")):  # fmt: skip
        ax.plot(gb, [results["sizes"][s][system]["wake_cost_s"]["median"] for s in SIZES], marker="o", label=label)
    small = results["sizes"][SIZES[0]]["service"]["wake_cost_s"]["median"]
    target = [small + 0.25 * (g - gb[0]) for g in gb]
    ax.plot(gb, target, linestyle=":", color="red", label="target: +0.25 s per extra GB (service)")
    ax.set_xlabel(f"checkpoint size (GB, stored in {results.get('checkpoint_dtype', 'float32')})")
    ax.set_ylabel("wake cost (s, medians):\nfirst answer from zero less a warm one")
    bw = results["bandwidth"]
    ax.set_title(f"Wake cost by size; memory read {bw['memory_gb_per_s']} GB/s, page cache {bw['page_cache_gb_per_s']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def run_sizes(
    runs: int,
    cpus: int,
    idle_s: float,
    new_tokens: int,
    keep: bool,
    name: str,
    dtype: str | None = None,
    checkpoint_dtype: str = "float32",
) -> Path:
    load_before = os.getloadavg()
    results: dict[str, Any] = {
        "runs": runs,
        "cpus": cpus,
        "new_tokens": new_tokens,
        "idle_s": idle_s,
        "service_dtype": dtype or "auto",
        "checkpoint_dtype": checkpoint_dtype,
        "sizes": {},
    }
    built: list[Path] = []
    for shape in SIZES:
        model = random_checkpoint(shape, dtype=checkpoint_dtype)
        if shape != SIZES[0] or checkpoint_dtype != "float32":
            built.append(model)
        floor = cold_start.read_floor(model)
        logger.info("%s: %s", shape, floor)
        results["sizes"][shape] = {**floor, **one_size(model, runs, cpus, idle_s, new_tokens, dtype)}
    results["bandwidth"] = {
        "memory_gb_per_s": memory_bandwidth(cpus),
        "page_cache_gb_per_s": results["sizes"][SIZES[-1]]["read_gb_per_s"],
    }
    results["seconds_per_extra_gb"] = slopes(results)
    results["target_seconds_per_extra_gb"] = 0.25
    results["load_average"] = {
        "before": [round(x, 2) for x in load_before],
        "after": [round(x, 2) for x in os.getloadavg()],
    }
    path = write_results(name, results)
    plot(results, RESULTS / f"{name}.png")
    print(f"wrote {path}")
    print(
        f"{'checkpoint':<12} {'GB':>5} {'system':<9} {'cold':>6} {'second':>6} {'warm':>6} {'wake':>6}  service phases"
    )
    for shape in SIZES:
        size = results["sizes"][shape]
        for system in SYSTEMS:
            r = size[system]
            phases = size[system]["median_phases_s"] if system != "baseline" else ""
            print(
                f"{shape:<12} {size['checkpoint_bytes'] / 1e9:5.2f} {system:<9} {r['total_s']['median']:6.2f}"
                f" {r['second_answer_s']['median']:6.2f} {r['warm_s']['median']:6.2f}"
                f" {r['wake_cost_s']['median']:6.2f}  {phases}"
            )
    print(f"seconds per extra GB: {results['seconds_per_extra_gb']} (target <= 0.25 for the service)")
    print(f"read bandwidth: {results['bandwidth']}; load average {results['load_average']}")
    if not keep:
        for model in built:
            shutil.rmtree(model, ignore_errors=True)
    return path
