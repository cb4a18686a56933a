"""Cold start: from a request at zero model replicas to its answer, phase by phase.

    python -m benchmarks.cold_start [--model PATH] [--runs 7] [--new-tokens 32]
    python -m benchmarks.cold_start --sizes [--runs 3] [--checkpoint-dtype bfloat16]   # by checkpoint size:
                                                     # benchmarks/cold_start_sizes.py

One local Ray instance runs the service with two models at zero replicas on the same checkpoint
(``MODELS_FILE``): ``bench`` starts its replicas in the warm worker pool (WARM_WORKERS=1),
``bench-cold`` without it (WARM_WORKERS=0); beside it, the plain pattern they are compared with
(``/baseline``, benchmarks/baseline_app.py with Ray's default autoscaling except a short drop to
zero, so that runs do not wait minutes). They take turns: wait until every model is at zero and the pool is full again
(its refill would otherwise compete for the CPUs), send one greedy request, time the answer. The
service's phases come from the replica's own cold-start report (``/healthz``, the model's
``last_cold_start``) and from the moment Serve's controller logged its decision to add the replica.

Both models keep their packed layers in one temporary ``PACKED_CACHE_DIR``, which an unmeasured wake
fills before the runs: every measured wake maps them, as every wake after a node's first does.

The floor is measured in the same run: a bare ``python -c "import torch, transformers"`` and a
read of the checkpoint's bytes (from the page cache, as a replica on a warm node reads them).
Memory: the service alone at zero replicas, with and without the pool, each on a fresh Ray
instance, as the proportional set size (PSS) of all the processes of that Ray session.
Writes benchmarks/results/cold_start.json and cold_start.png.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks import baseline_app
from benchmarks.common import MODEL_NAME, PROMPTS, RESULTS, summary, upscale_times, warm_pool_full, write_results
from ray_serve_app import build_graph
from serving import warm_pool
from settings import build_settings
from testing.checkpoints import random_checkpoint
from testing.http import ok
from testing.polling import wait_for
from testing.serve import local_serve, replica_states

logger = logging.getLogger("cold_start")

# Service phases in the order they happen, as (label, key of the run record).
PHASES = [
    ("autoscaler decision", "decision_s"),
    ("replica start", "replica_start_s"),
    ("imports", "imports_s"),
    ("config + tokenizer", "config_tokenizer_s"),
    ("model code", "model_code_s"),
    ("weights", "weights_s"),
    ("warm-up", "warmup_s"),
    ("first generation", "first_generation_s"),
    ("routing + HTTP", "other_s"),
]
# The service's two models (each its own Serve application and deployment, named after it): warm workers.
SERVICES = {"service": 1, "nopool": 0}
SYSTEMS = (*SERVICES, "baseline")
# The size benchmark's third model: the warm pool, no packed-layer cache (PACKED_CACHE_DIR empty).
WARM_WORKERS = {**SERVICES, "nocache": 1}
MODEL_NAMES = {"service": MODEL_NAME, "nopool": f"{MODEL_NAME}-cold", "nocache": f"{MODEL_NAME}-nocache",
               "baseline": "baseline"}  # fmt: skip
LABELS = {
    "service": "service (warm pool)",
    "nopool": "service, WARM_WORKERS=0",
    "nocache": "service, no packed-layer cache",
    "baseline": "plain pattern",
}
DEPLOYMENTS = {**{s: n for s, n in MODEL_NAMES.items() if s != "baseline"}, "baseline": "PlainGenerator"}


def service_settings(
    model: Path,
    cpus: int,
    idle_s: float,
    systems: tuple[str, ...],
    dtype: str | None = None,
    packed_cache: Path | None = None,
) -> Any:
    """The service serving ``systems``'s models (MODELS_FILE, in a temporary file: it is read here), their
    packed layers kept in ``packed_cache`` (None: not kept; the ``nocache`` model never keeps them)."""
    entries = [
        {"name": MODEL_NAMES[system], "model_id": str(model), "warm_workers": WARM_WORKERS[system]}
        | ({"packed_cache_dir": ""} if system == "nocache" else {})
        for system in systems
    ]
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump({"models": entries}, f)
    try:
        return build_settings(
            {
                "MODELS_FILE": f.name,
                "MIN_REPLICAS": "0",
                "MAX_REPLICAS": "1",
                "NUM_CPUS_PER_REPLICA": str(cpus),
                "IDLE_TIMEOUT_S": str(idle_s),
                "AUTOSCALING_LOOK_BACK_S": "1",
                "METRICS_PUSH_INTERVAL_S": "0.5",
                "PACKED_CACHE_DIR": str(packed_cache or ""),
                **({"DTYPE": dtype} if dtype else {}),
            }
        )
    finally:
        os.unlink(f.name)


def deploy(
    model: Path, port: int, cpus: int, idle_s: float, dtype: str | None = None, packed_cache: Path | None = None
) -> dict[str, str]:
    from ray import serve

    settings = service_settings(model, cpus, idle_s, tuple(SERVICES), dtype, packed_cache)
    serve.run(build_graph(settings), name="service", route_prefix="/", blocking=False)
    plain = baseline_app.PlainGenerator.options(
        ray_actor_options={"num_cpus": cpus},
        # The plain pattern's autoscaling, except that it drops to zero soon after its answer.
        autoscaling_config={"min_replicas": 0, "max_replicas": 1, "downscale_delay_s": idle_s},
    ).bind(str(model), cpus)
    serve.run(plain, name="baseline", route_prefix="/baseline", blocking=False)
    base = f"http://127.0.0.1:{port}"
    wait_for(lambda: ok(f"{base}/healthz"), timeout=120)
    # The pool controller deploys each model as its own application.
    wait_for(lambda: all(MODEL_NAMES[s] in serve.status().applications for s in SERVICES), timeout=120)
    return {system: base for system in SERVICES} | {"baseline": f"{base}/baseline"}


def _last_cold_start(url: str, model: str, after: float) -> dict[str, Any] | None:
    """The model's ``last_cold_start`` in /healthz once complete and newer than ``after`` (epoch):
    {total_s, phases, finished_at, details}, ``details`` being the replica's whole report (it comes
    just after the first answer's end, so the previous run's may still be there)."""
    models = httpx.get(f"{url}/healthz", timeout=10).json()["models"]
    last = next(m for m in models if m["id"] == model)["last_cold_start"]
    return last if last and "details" in last and last["finished_at"] > after else None


def prime(url: str, system: str, new_tokens: int, packed_cache: Path) -> None:
    """One wake of ``system``'s model, unmeasured, that writes its packed layers into ``packed_cache``."""
    body = {"prompt": PROMPTS[1], "generation_kwargs": {"max_new_tokens": new_tokens, "temperature": 0}}
    for _ in range(2):  # a float32 checkpoint packs once its first answer is done
        httpx.post(f"{url}/generate", json=body | {"model": MODEL_NAMES[system]}, timeout=600).raise_for_status()
    wait_for(lambda: list(packed_cache.glob("*/index.json")), timeout=300, interval=0.5)


def one_cold_start(
    urls: dict[str, str], system: str, new_tokens: int, systems: tuple[str, ...] = SYSTEMS
) -> dict[str, Any]:
    # Every model at zero: another system's replica must not hold the CPUs this one needs.
    wait_for(
        lambda: all(replica_states(MODEL_NAMES[s], DEPLOYMENTS[s]) == {} for s in systems), timeout=300, interval=0.2
    )
    pooled = [MODEL_NAMES[s] for s in systems if WARM_WORKERS.get(s)]
    wait_for(lambda: all(warm_pool_full(app) for app in pooled), timeout=300, interval=0.5)
    decisions_before = len(upscale_times(MODEL_NAMES[system], from_zero=True))
    body = {"prompt": PROMPTS[1], "generation_kwargs": {"max_new_tokens": new_tokens, "temperature": 0}}
    if system != "baseline":
        body["model"] = MODEL_NAMES[system]
    sent = time.time()
    response = httpx.post(f"{urls[system]}/generate", json=body, timeout=600)
    answered = time.time()
    response.raise_for_status()
    run: dict[str, Any] = {"total_s": round(answered - sent, 3)}
    decisions = [at for at, _, _ in upscale_times(MODEL_NAMES[system], from_zero=True)[decisions_before:]]
    if decisions:
        run["decision_s"] = round(decisions[0] - sent, 3)
    if system != "baseline":
        last = wait_for(lambda: _last_cold_start(urls[system], MODEL_NAMES[system], sent), timeout=60)
        report = last["details"]
        constructed_at = report["ready_at"] - report["constructor_s"]
        run |= {
            "warm_worker": report.get("warm_worker", False),
            "replica_start_s": round(constructed_at - decisions[0], 3) if decisions else None,
            "imports_s": report["imports_s"],
            "config_tokenizer_s": round(report["config_s"] + report["tokenizer_s"], 4),
            "model_code_s": report["model_code_s"],
            "weights_s": report["weights_s"],
            "weights_bytes": report["weights_bytes"],
            "weights_gb_per_s": report["weights_gb_per_s"],
            "warmup_s": report["warmup_s"],
            "first_generation_s": report["first_generation_s"],
            "placement": report.get("placement"),
            "packed_cache": report.get("packed_cache"),
            "packing": report.get("packing"),
            "last_cold_start": last,
        }
        accounted = sum(run.get(key) or 0 for _, key in PHASES[:-1])
        run["other_s"] = round(run["total_s"] - accounted, 3)
    logger.info("%-8s cold start %s", system, {k: v for k, v in run.items() if k != "last_cold_start"})
    return run


def import_floor(repeats: int = 3) -> dict[str, float]:
    """Median seconds for a fresh interpreter to import torch and transformers (and our engine)."""
    out = {}
    for label, code in (
        ("python_import_torch_transformers_s", "import torch, transformers"),
        ("python_import_engine_s", "import engine.model"),
    ):
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parent.parent)
            times.append(time.perf_counter() - started)
        out[label] = round(statistics.median(times), 3)
    return out


def read_floor(model: Path, repeats: int = 3) -> dict[str, float]:
    """Seconds to read the checkpoint's weight files (warm page cache) and the rate."""
    files = [p for p in model.iterdir() if p.suffix in (".safetensors", ".bin")]
    size = sum(p.stat().st_size for p in files)
    times = []
    for _ in range(repeats + 1):  # the first pass fills the page cache
        started = time.perf_counter()
        for path in files:
            with path.open("rb", buffering=0) as f:
                while f.read(1 << 24):
                    pass
        times.append(time.perf_counter() - started)
    seconds = statistics.median(times[1:])
    return {"checkpoint_bytes": size, "read_s": round(seconds, 4), "read_gb_per_s": round(size / seconds / 1e9, 3)}


def memory_at_zero(model: Path, cpus: int, warm_workers: int) -> dict[str, Any]:
    """The service alone on a fresh Ray instance, at zero replicas (and its pool full): memory by process."""
    import psutil
    import ray
    from ray import serve

    system = "service" if warm_workers else "nopool"
    with local_serve(num_cpus=cpus) as port:
        settings = service_settings(model, cpus, 3.0, (system,))
        serve.run(build_graph(settings), name="service", route_prefix="/", blocking=False)
        wait_for(lambda: ok(f"http://127.0.0.1:{port}/healthz"), timeout=120)
        wait_for(lambda: MODEL_NAMES[system] in serve.status().applications, timeout=120)
        if warm_workers:
            wait_for(lambda: warm_pool_full(MODEL_NAMES[system]), timeout=300, interval=0.5)
        status = warm_pool.pool_status(MODEL_NAMES[system], MODEL_NAMES[system])
        warm = set(warm_pool.warm_pids(status))
        # The session's processes name it on their command line (raylet, GCS, agents); workers are
        # the raylet's children and retitle themselves (ray::IDLE, ray::ServeController, ...).
        session = ray._private.worker._global_node.session_name
        found: dict[int, psutil.Process] = {}
        for proc in psutil.process_iter(["pid", "cmdline"]):
            if any(session in arg for arg in proc.info["cmdline"] or ()):
                found |= {p.pid: p for p in (proc, *proc.children(recursive=True))}
        processes = []
        for pid, proc in found.items():
            try:
                info, cmdline = proc.memory_full_info(), proc.cmdline()
            except psutil.Error:
                continue
            role = "warm worker" if pid in warm else _role(cmdline)
            processes.append({"pid": pid, "role": role, "rss_mb": info.rss / 1e6, "pss_mb": info.pss / 1e6})
    by_role: dict[str, dict[str, float]] = {}
    for p in processes:
        entry = by_role.setdefault(p["role"], {"count": 0, "rss_mb": 0.0, "pss_mb": 0.0})
        entry["count"] += 1
        entry["rss_mb"] = round(entry["rss_mb"] + p["rss_mb"], 1)
        entry["pss_mb"] = round(entry["pss_mb"] + p["pss_mb"], 1)
    # Idle workers Ray starts for the first driver come and go (its idle killer ends them): not counted.
    counted = [p for p in processes if p["role"] != "idle worker"]
    return {
        "warm_workers": warm_workers,
        "total_pss_mb": round(sum(p["pss_mb"] for p in counted), 1),
        "total_rss_mb": round(sum(p["rss_mb"] for p in counted), 1),
        "by_role": dict(sorted(by_role.items())),
    }


def _role(cmdline: list[str]) -> str:
    """What a Ray process is, from its command line (workers by the actor they host: ray::Name)."""
    text = " ".join(cmdline)
    for marker, role in (
        ("gcs_server", "gcs"),
        ("raylet", "raylet"),
        ("dashboard/agent.py", "agents"),
        ("dashboard/dashboard.py", "dashboard"),
        ("runtime_env/agent", "agents"),
        ("log_monitor", "log monitor"),
        ("monitor.py", "autoscaler monitor"),
    ):
        if marker in text:
            return role
    title = cmdline[0] if cmdline else ""
    if title.startswith("ray::"):
        name = title.removeprefix("ray::").split()[0]
        if name.startswith("ServeReplica:"):
            return name.rpartition(":")[2] if name.endswith((":Gateway", ":PoolController")) else name
        return {"IDLE": "idle worker"}.get(name, name)
    return "other"


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 4.2))
    colors = plt.cm.tab10.colors
    for row, system in enumerate(SERVICES):
        med = results[system]["median_phases_s"]
        left = 0.0
        for i, (label, key) in enumerate(PHASES):
            width = med.get(key) or 0.0
            ax.barh(LABELS[system], width, left=left, color=colors[i], label=f"{label}" if row == 0 else None)
            if width >= 0.6:
                ax.text(left + width / 2, row, f"{width:.2f}", ha="center", va="center", fontsize=7)
            left += width
        ax.text(left + 0.1, row, f"{results[system]['total_s']['median']:.2f}s", va="center", fontsize=8)
    plain = results["baseline"]["total_s"]["median"]
    ax.barh(LABELS["baseline"], plain, color="lightgrey", hatch="//", edgecolor="dimgrey", label="plain pattern")
    ax.text(plain + 0.1, len(SERVICES), f"{plain:.2f}s", va="center", fontsize=8)
    floor = results["floor"]
    ax.axvline(
        floor["python_import_torch_transformers_s"] + floor["read_s"],
        color="black",
        linestyle="--",
        label="floor: bare import + checkpoint read",
    )
    ax.axvline(plain / 3, color="red", linestyle=":", label="target: a third of the plain pattern")
    ax.set_xlabel("seconds from the request at zero replicas to its answer (medians)")
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    ax.set_title(f"Cold start, {results['model']} ({results['runs']} runs each)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="checkpoint (default: random GPT-2-small shape)")
    parser.add_argument("--runs", type=int, default=7, help="cold starts per system")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--cpus", type=int, default=2, help="CPUs (torch threads) per replica")
    parser.add_argument("--idle", type=float, help="IDLE_TIMEOUT_S between runs (default 3 s; with --sizes 20 s)")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory measurement")
    parser.add_argument("--name", default="cold_start")
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), help="the service's DTYPE (default: auto)")
    parser.add_argument("--sizes", action="store_true", help="wake cost by checkpoint size (cold_start_sizes.py)")
    parser.add_argument("--keep-checkpoints", action="store_true", help="with --sizes: keep the big checkpoints")
    parser.add_argument(
        "--checkpoint-dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="with --sizes: the dtype the random checkpoints are stored in",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # With --sizes the model must stay up through the pool's refill before its warm answer.
    idle = args.idle if args.idle is not None else 20.0 if args.sizes else 3.0
    if args.sizes:
        from benchmarks.cold_start_sizes import run_sizes

        name = "cold_start_sizes" if args.name == "cold_start" else args.name
        sizes_args = (args.runs, args.cpus, idle, args.new_tokens, args.keep_checkpoints, name)
        run_sizes(*sizes_args, dtype=args.dtype, checkpoint_dtype=args.checkpoint_dtype)
        return
    model = args.model or random_checkpoint("gpt2-small")
    load = os.getloadavg()
    floor = import_floor() | read_floor(model)
    logger.info("floor: %s", floor)
    memory = {}
    if not args.no_memory:
        memory = {n: memory_at_zero(model, args.cpus, n) for n in (1, 0)}
        logger.info("memory at zero replicas: %s", memory)
    runs: dict[str, list[dict[str, Any]]] = {system: [] for system in SYSTEMS}
    with tempfile.TemporaryDirectory(prefix="packed-layers-") as packed, local_serve(num_cpus=args.cpus) as port:
        urls = deploy(model, port, args.cpus, idle, args.dtype, Path(packed))
        prime(urls["service"], "service", args.new_tokens, Path(packed))  # as on a node that served it before
        for _ in range(args.runs):
            for system in SYSTEMS:
                runs[system].append(one_cold_start(urls, system, args.new_tokens))
    load = {"before": [round(x, 2) for x in load], "after": [round(x, 2) for x in os.getloadavg()]}
    results: dict[str, Any] = {"model": model.name, "runs": args.runs, "load_average": load, "floor": floor}
    for system, records in runs.items():
        results[system] = {"total_s": summary([r["total_s"] for r in records]), "runs": records}
        decisions = [r["decision_s"] for r in records if r.get("decision_s") is not None]
        results[system]["decision_s"] = summary(decisions)
    for system in SERVICES:
        results[system]["median_phases_s"] = {
            key: statistics.median([r.get(key) or 0.0 for r in runs[system]]) for _, key in PHASES
        }
        results[system]["warm_worker_runs"] = sum(bool(r.get("warm_worker")) for r in runs[system])
    plain = results["baseline"]["total_s"]["median"]
    med = results["service"]["median_phases_s"]
    essential = sum(med[k] for k in ("decision_s", "weights_s", "warmup_s", "first_generation_s"))
    svc, nopool = results["service"]["total_s"]["median"], results["nopool"]["total_s"]["median"]
    results["targets"] = {
        "service_over_plain": round(svc / plain, 3),
        "service_over_plain_target": round(1 / 3, 3),
        "service_over_essential": round(svc / essential, 3),
        "essential_s": round(essential, 3),
        "service_over_essential_target": 1.5,
        "nopool_over_plain": round(nopool / plain, 3),
    }
    results["weights_vs_read"] = {"weights_s": med["weights_s"], "limit_s": round(1.5 * floor["read_s"] + 0.5, 3)}
    if memory:
        with_pool, without = memory[1], memory[0]
        warm = with_pool["by_role"].get("warm worker", {})
        results["memory_at_zero_replicas"] = {
            "with_pool": with_pool,
            "without_pool": without,
            "pool_cost_pss_mb": round(with_pool["total_pss_mb"] - without["total_pss_mb"], 1),
            "warm_worker_rss_mb": round(warm.get("rss_mb", 0) / max(warm.get("count", 1), 1), 1),
            "warm_worker_pss_mb": round(warm.get("pss_mb", 0) / max(warm.get("count", 1), 1), 1),
        }
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()} | {"model": str(model)}
    path = write_results(args.name, {"config": config, **results})
    plot(results, RESULTS / f"{args.name}.png")
    print(f"wrote {path}")
    print(
        f"cold start median: warm pool {svc:.2f}s, WARM_WORKERS=0 {nopool:.2f}s, plain pattern {plain:.2f}s;"
        f" pool/plain {svc / plain:.2f} (target <= 0.33), pool/(decision+weights+warm-up+first generation)"
        f" {svc / essential:.2f} (target <= 1.5); {results['service']['warm_worker_runs']}/{args.runs} in a warm worker"
    )
    print(f"  {'phase (medians)':<20} {'pool':>7} {'no pool':>8}")
    for label, key in PHASES:
        row = [results[system]["median_phases_s"][key] for system in SERVICES]
        print(f"  {label:<20} {row[0]:6.3f}s {row[1]:7.3f}s")
    print(
        f"floor: import torch+transformers {floor['python_import_torch_transformers_s']:.2f}s,"
        f" read {floor['checkpoint_bytes'] / 1e6:.0f} MB in {floor['read_s']:.3f}s; load average {load}"
    )
    if memory:
        print(f"memory at zero replicas: {results['memory_at_zero_replicas']}")


if __name__ == "__main__":
    main()
