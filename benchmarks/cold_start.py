"""Cold start: from a request at zero model replicas to its answer, phase by phase.

    python -m benchmarks.cold_start [--model PATH] [--runs 5] [--new-tokens 32]

One local Ray instance runs two applications at zero replicas on the same checkpoint: the service
(``/service``) and the plain pattern it is compared with (``/baseline``, benchmarks/baseline_app.py
with Ray's default autoscaling except a short drop to zero, so that runs do not wait minutes).
They take turns: wait until the model is at zero, send one greedy request, time the answer. The
service's phases come from its own cold-start report (``/healthz`` ``last_cold_start``) and from
the moment Serve's controller logged its decision to add the replica.

The floor is measured in the same run: a bare ``python -c "import torch, transformers"`` and a
read of the checkpoint's bytes (from the page cache, as a replica on a warm node reads them).
Writes benchmarks/results/cold_start.json and cold_start.png.
"""

from __future__ import annotations

import argparse
import logging
import re
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from benchmarks import baseline_app
from benchmarks.checkpoints import random_checkpoint
from benchmarks.common import (
    MODEL_NAME,
    PROMPTS,
    RESULTS,
    local_serve,
    replica_states,
    summary,
    wait_for,
    write_results,
)
from ray_serve_app import build_graph
from settings import build_settings

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
UPSCALE = re.compile(
    r"^\w+ (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) .*Upscaling Deployment\(name='(\w+)', app='(\w+)'\) from 0 to"
)


def deploy(model: Path, port: int, cpus: int, idle_s: float) -> dict[str, str]:
    from ray import serve

    settings = build_settings(
        {
            "MODEL_ID": str(model),
            "SERVED_MODEL_NAME": MODEL_NAME,
            "MIN_REPLICAS": "0",
            "MAX_REPLICAS": "1",
            "NUM_CPUS_PER_REPLICA": str(cpus),
            "IDLE_TIMEOUT_S": str(idle_s),
            "AUTOSCALING_LOOK_BACK_S": "1",
            "METRICS_PUSH_INTERVAL_S": "0.5",
        }
    )
    serve.run(build_graph(settings), name="service", route_prefix="/service", blocking=False)
    plain = baseline_app.PlainGenerator.options(
        ray_actor_options={"num_cpus": cpus},
        # The plain pattern's autoscaling, except that it drops to zero soon after its answer.
        autoscaling_config={"min_replicas": 0, "max_replicas": 1, "downscale_delay_s": idle_s},
    ).bind(str(model), cpus)
    serve.run(plain, name="baseline", route_prefix="/baseline", blocking=False)
    base = f"http://127.0.0.1:{port}"
    wait_for(lambda: _status(f"{base}/service/healthz") == 200, timeout=120)
    return {"service": f"{base}/service", "baseline": f"{base}/baseline"}


def _status(url: str) -> int | None:
    try:
        return httpx.get(url, timeout=5).status_code
    except httpx.HTTPError:
        return None


def upscale_times(app: str) -> list[float]:
    """Epoch times at which Serve's controller decided to scale ``app`` up from zero."""
    import ray

    logs = Path(ray._private.worker._global_node.get_logs_dir_path()) / "serve"
    times = []
    for path in logs.glob("controller_*.log"):
        for line in path.read_text(errors="replace").splitlines():
            if (m := UPSCALE.match(line)) and m.group(3) == app:
                times.append(datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp())
    return sorted(times)


def one_cold_start(urls: dict[str, str], system: str, new_tokens: int) -> dict[str, Any]:
    # Both models at zero: the other system's replica must not hold the CPUs this one needs.
    wait_for(
        lambda: replica_states("service", MODEL_NAME) == {} and replica_states("baseline", "PlainGenerator") == {},
        timeout=300,
        interval=0.2,
    )
    decisions_before = len(upscale_times(system))
    body = {"prompt": PROMPTS[1], "generation_kwargs": {"max_new_tokens": new_tokens, "temperature": 0}}
    sent = time.time()
    response = httpx.post(f"{urls[system]}/generate", json=body, timeout=600)
    answered = time.time()
    response.raise_for_status()
    run: dict[str, Any] = {"total_s": round(answered - sent, 3)}
    decisions = upscale_times(system)[decisions_before:]
    if decisions:
        run["decision_s"] = round(decisions[0] - sent, 3)
    if system == "service":
        report = httpx.get(f"{urls[system]}/healthz", timeout=10).json()["models"][0]["last_cold_start"]
        constructed_at = report["ready_at"] - report["constructor_s"]
        run |= {
            "replica_start_s": round(constructed_at - decisions[0], 3) if decisions else None,
            "imports_s": report["imports_s"],
            "config_tokenizer_s": round(report["config_s"] + report["tokenizer_s"], 4),
            "model_code_s": report["model_code_s"],
            "weights_s": report["weights_s"],
            "weights_bytes": report["weights_bytes"],
            "weights_gb_per_s": report["weights_gb_per_s"],
            "warmup_s": report["warmup_s"],
            "first_generation_s": report["first_generation_s"],
            "report": report,
        }
        accounted = sum(run.get(key) or 0 for _, key in PHASES[:-1])
        run["other_s"] = round(run["total_s"] - accounted, 3)
    logger.info("%-8s cold start %s", system, {k: v for k, v in run.items() if k != "report"})
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


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    med = results["service"]["median_phases_s"]
    fig, ax = plt.subplots(figsize=(10, 3.6))
    left = 0.0
    colors = plt.cm.tab10.colors
    for i, (label, key) in enumerate(PHASES):
        width = med.get(key) or 0.0
        ax.barh("service", width, left=left, color=colors[i], label=f"{label} {width:.2f}s")
        left += width
    ax.barh("plain pattern", results["baseline"]["total_s"]["median"], color="grey", label="plain pattern (total)")
    floor = results["floor"]
    ax.axvline(
        floor["python_import_torch_transformers_s"] + floor["read_s"],
        color="black",
        linestyle="--",
        label="floor: bare import + checkpoint read",
    )
    ax.set_xlabel("seconds from the request at zero replicas to its answer (medians)")
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    ax.set_title(f"Cold start, {results['model']} ({results['runs']} runs each)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="checkpoint (default: random GPT-2-small shape)")
    parser.add_argument("--runs", type=int, default=5, help="cold starts per system")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--cpus", type=int, default=2, help="CPUs (torch threads) per replica")
    parser.add_argument("--idle", type=float, default=3.0, help="IDLE_TIMEOUT_S between runs")
    parser.add_argument("--name", default="cold_start")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    model = args.model or random_checkpoint("gpt2-small")
    floor = import_floor() | read_floor(model)
    logger.info("floor: %s", floor)
    runs: dict[str, list[dict[str, Any]]] = {"service": [], "baseline": []}
    with local_serve(num_cpus=args.cpus) as port:
        urls = deploy(model, port, args.cpus, args.idle)
        for _ in range(args.runs):
            for system in ("service", "baseline"):
                runs[system].append(one_cold_start(urls, system, args.new_tokens))
    results: dict[str, Any] = {"model": model.name, "runs": args.runs, "floor": floor}
    for system, records in runs.items():
        results[system] = {"total_s": summary([r["total_s"] for r in records]), "runs": records}
        decisions = [r["decision_s"] for r in records if r.get("decision_s") is not None]
        results[system]["decision_s"] = summary(decisions)
    results["service"]["median_phases_s"] = {
        key: statistics.median([r.get(key) or 0.0 for r in runs["service"]]) for _, key in PHASES
    }
    svc, base = results["service"]["total_s"]["median"], results["baseline"]["total_s"]["median"]
    results["ratio_baseline_over_service"] = round(base / svc, 2)
    med = results["service"]["median_phases_s"]
    results["weights_vs_read"] = {
        "weights_s": med["weights_s"],
        "limit_s": round(1.5 * floor["read_s"] + 0.5, 3),
    }
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()} | {"model": str(model)}
    path = write_results(args.name, {"config": config, **results})
    plot(results, RESULTS / f"{args.name}.png")
    print(f"wrote {path}")
    print(f"cold start median: service {svc:.2f}s, plain pattern {base:.2f}s ({base / svc:.1f}x)")
    for label, key in PHASES:
        print(f"  {label:<20} {med[key]:6.3f}s")
    print(
        f"floor: import torch+transformers {floor['python_import_torch_transformers_s']:.2f}s,"
        f" read {floor['checkpoint_bytes'] / 1e6:.0f} MB in {floor['read_s']:.3f}s"
    )


if __name__ == "__main__":
    main()
