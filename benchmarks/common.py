"""What only the benchmarks share: prompts, statistics, results files, plots, Serve's logs read back.

Polling, HTTP probes, a local Serve instance and checkpoints come from ``testing``, which tests share too.
"""

from __future__ import annotations

import json
import platform
import re
import statistics
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
# The service's model in every benchmark is served under this name, which is also its deployment's.
MODEL_NAME = "bench"

# Prompts of varied lengths, as a mixed workload has.
PROMPTS = [
    "Return the",
    "The socket module provides access to the BSD socket interface.",
    "Write a haiku about Ray Serve.",
    "This function reads a line from the file, strips the trailing newline and returns it as a string;",
    "Explain scale to zero.",
    "A deployment scales between a minimum and a maximum number of replicas, and",
    "Raise ValueError if",
    "The quick brown fox jumps over the lazy dog while the scheduler decides where the next replica goes",
]


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation; nan for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def summary(values: list[float]) -> dict[str, float]:
    return {
        "median": statistics.median(values) if values else float("nan"),
        "min": min(values, default=float("nan")),
        "max": max(values, default=float("nan")),
        "p95": percentile(values, 95),
        "n": len(values),
    }


VECTOR_FLAGS = {"avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_tile"}


def _cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's model name as the kernel gives it ("" where it does not)."""
    try:
        lines = cpuinfo.read_text().splitlines()
    except OSError:
        return ""
    return next((line.partition(":")[2].strip() for line in lines if line.startswith("model name")), "")


def machine() -> dict[str, Any]:
    import os

    import torch

    from engine.cpu import cpu_flags

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "cpu": _cpu_model(),
        # The flags that decide the engine's CPU kernels (engine.cpu, engine.attention): results differ by them.
        "cpu_flags": sorted(cpu_flags() & VECTOR_FLAGS),
        "torch": torch.__version__,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def write_results(name: str, data: dict[str, Any], directory: Path = RESULTS) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.json"
    payload = {"benchmark": name, "date": datetime.now(UTC).isoformat(timespec="seconds"), "machine": machine(), **data}
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def scatter_panel(ax: Any, runs: dict[str, list[dict[str, Any]]], key: str, title: str, highlight: str) -> None:
    """One panel of alternated runs: each way's values of ``key`` as dots over its name, its median as a bar
    (``highlight``: the way drawn in colour, the others grey)."""
    for x, way in enumerate(runs):
        values = [run[key] for run in runs[way]]
        ax.scatter([x] * len(values), values, color="#2a7" if way == highlight else "#999")
        ax.hlines(statistics.median(values), x - 0.25, x + 0.25, color="black")
    ax.set_xticks(range(len(runs)), list(runs))
    ax.set_xlim(-0.6, len(runs) - 0.4)
    ax.set_title(title)


def replica_stats(model: str) -> dict[str, Any]:
    """The ``stats()`` of ``model``'s replica (its application holds that one deployment) in this Ray instance."""
    from ray import serve

    return serve.get_deployment_handle(model, model).stats.remote().result(timeout_s=60)


def plot_scatter_panels(
    panels: Sequence[tuple[dict[str, list[dict[str, Any]]], str, str]],
    highlight: str,
    title: str,
    path: Path,
    xlabel: str | None = None,
) -> None:
    """A row of :func:`scatter_panel` panels, one per ``(runs, key, panel title)``, saved as ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    for ax, (runs, key, panel_title) in zip(axes[0], panels, strict=True):
        scatter_panel(ax, runs, key, panel_title, highlight)
        if xlabel is not None:
            ax.set_xlabel(xlabel)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def alternated_generations(
    generate: Callable[[str], Sequence[Any]], ways: Sequence[str], repeats: int, new_tokens: int
) -> tuple[dict[str, list[float]], dict[str, list[str]]]:
    """Each way's ms per generated token in ``repeats`` rounds, and its last answers' texts.

    ``generate(way)`` runs one generation of ``new_tokens`` per row the way named. The ways take turns,
    in reverse order every other round, so that load on a shared machine hits each alike; a first
    round warms them up, untimed.
    """
    times: dict[str, list[float]] = {way: [] for way in ways}
    answers: dict[str, list[str]] = {}
    for repeat in range(repeats + 1):
        for way in ways if repeat % 2 == 0 else ways[::-1]:
            started = time.perf_counter()
            done = generate(way)
            if repeat:
                times[way].append((time.perf_counter() - started) / new_tokens * 1000)
            answers[way] = [completion.text for completion in done]
    return times, answers


def two_ways(times: dict[str, list[float]], answers: dict[str, list[str]], ways: Sequence[str]) -> dict[str, Any]:
    """One row count's result of :func:`alternated_generations` for two ways (``ways``: before, after):
    medians, every run, the speedup of the second, and how many rows answered alike."""
    before, after = ways
    medians = {way: statistics.median(times[way]) for way in ways}
    same = sum(a == b for a, b in zip(answers[before], answers[after], strict=True))
    return {
        "ms_per_token": medians,
        "runs_ms_per_token": times,
        "speedup": medians[before] / medians[after],
        "same_answers": f"{same} of {len(answers[before])}",
    }


def plot_ms_per_token(results: dict[str, Any], ways: Sequence[str], title: str, path: Path) -> None:
    """Bars of each way's median ms per generated token (``results[rows]["ms_per_token"][way]``), by row count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6))
    width = 0.8 / len(ways)
    for i, way in enumerate(ways):
        xs = [x + (i - (len(ways) - 1) / 2) * width for x in range(len(results))]
        ax.bar(xs, [r["ms_per_token"][way] for r in results.values()], width, label=way,
               color=("#999", "#2a7", "#68c")[i % 3])  # fmt: skip
    ax.set_xticks(range(len(results)), [f"{rows} row" + ("" if rows == "1" else "s") for rows in results])
    ax.set_ylabel("ms per generated token (median)")
    ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_concurrency(results: dict[str, Any], path: Path, title: str) -> None:
    """Requests/s, latency and (for streamed clients) time to first token, against concurrent clients."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    streamed = [s for s in results if any("ttft_p50_s" in r for r in results[s].values())]
    fig, axes = plt.subplots(1, 3 if streamed else 2, figsize=(16 if streamed else 11, 4.2))
    left, right = axes[0], axes[1]
    styles = {"service": "o-", "service_stream": "^-", "baseline": "s--"}
    for system, runs in results.items():
        style = styles.get(system, "x-")
        levels = [int(c) for c in runs]
        left.plot(levels, [runs[str(c)]["requests_per_s"] for c in levels], style, label=system)
        right.plot(levels, [runs[str(c)]["p50_s"] for c in levels], style, label=f"{system} p50 (whole answer)")
        right.plot(levels, [runs[str(c)]["p95_s"] for c in levels], style, alpha=0.35, label=f"{system} p95")
    for system in streamed:
        runs = results[system]
        levels = [int(c) for c in runs]
        axes[2].plot(levels, [runs[str(c)]["ttft_p50_s"] for c in levels], "^-", label="TTFT p50")
        axes[2].plot(levels, [runs[str(c)]["ttft_p95_s"] for c in levels], "^-", alpha=0.4, label="TTFT p95")
        axes[2].plot(levels, [runs[str(c)]["itl_p50_s"] for c in levels], "v:", label="inter-token p50")
        axes[2].plot(levels, [runs[str(c)]["itl_p95_s"] for c in levels], "v:", alpha=0.4, label="inter-token p95")
        axes[2].set_ylabel("seconds (streamed clients)")
        axes[2].set_yscale("log")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    left.set_ylabel("requests / s")
    right.set_ylabel("latency (s)")
    right.set_yscale("log")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def warm_pool_full(app: str, deployment: str | None = None) -> bool:
    """The warm pool of ``deployment`` (default: the one named like ``app``, as the pool names model
    applications) has its warm workers, none starting and no refill pending: a refill would compete
    for the CPUs with what is measured."""
    from serving import warm_pool

    status = warm_pool.pool_status(app, deployment or app)
    nodes = (status or {}).get("nodes") or {}  # empty until the manager's first round
    return bool(nodes) and all(n["warm_pids"] and not n["pending"] and not n["held"] for n in nodes.values())


def replica_reports(app: str, deployment: str | None = None) -> list[dict[str, Any]]:
    """Each model replica's start-up report (its "ModelServer ready" log line), oldest first."""
    import ast

    import ray

    logs = Path(ray._private.worker._global_node.get_logs_dir_path()) / "serve"
    reports = []
    for path in logs.glob(f"replica_{app}_{deployment or app}_*.log"):
        for line in path.read_text(errors="replace").splitlines():
            if "ModelServer ready: {" in line:
                reports.append(ast.literal_eval(line.split("ModelServer ready: ", 1)[1].strip()))
    return sorted(reports, key=lambda r: r["ready_at"])


# Serve's controller logs each autoscaling decision: "Upscaling Deployment(name='m', app='m') from 0 to 1 replicas."
_UPSCALE = re.compile(
    r"^\w+ (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) .*Upscaling Deployment\(name='([\w.-]+)', app='([\w.-]+)'\)"
    r" from (\d+) to (\d+)"
)


def upscale_times(app: str, from_zero: bool = False) -> list[tuple[float, int, int]]:
    """(epoch time, from, to) of each decision of Serve's controller to scale ``app`` up, oldest first."""
    import ray

    logs = Path(ray._private.worker._global_node.get_logs_dir_path()) / "serve"
    found = []
    for path in logs.glob("controller_*.log"):
        for line in path.read_text(errors="replace").splitlines():
            if (m := _UPSCALE.match(line)) and m.group(3) == app and (not from_zero or m.group(4) == "0"):
                at = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
                found.append((at, int(m.group(4)), int(m.group(5))))
    return sorted(found)


def hf_generate_batch(model: Any, ids: list[list[int]], new_tokens: int, pad_id: int) -> int:
    """transformers' continuous batching (``generate_batch``) on ``ids``, greedy, EOS ignored: the tokens it made.

    Its paged cache is sized for this work. Left unset, it takes a share of the free memory (14 GB on
    the 2-core VM, 70 GB on an H100) and clears all of it on every call: 4-10 s of each call, whatever
    the batch. It takes SDPA (or flash) only, not the engine's own CPU attention (engine/attention.py):
    switched for its call and back. ``warmup=False``: its warm-up captures CUDA graphs per call; the
    caller's untimed first call warms up.
    """
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    config = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=pad_id)
    page = 256
    sized = ContinuousBatchingConfig(
        page_size=page,
        num_blocks=sum(-(-(len(p) + new_tokens) // page) for p in ids) + len(ids),
        max_batch_tokens=max(512, sum(len(p) for p in ids)),
    )
    own = model.config._attn_implementation
    model.set_attn_implementation("sdpa")
    try:
        out = model.generate_batch(
            inputs=ids, generation_config=config, continuous_batching_config=sized, progress_bar=False, warmup=False
        )
    finally:
        model.set_attn_implementation(own)
    return sum(len(o.generated_tokens) for o in out.values())
