"""Autoscaling under a step load: idle, burst, steady, idle; replicas from Serve's status over time.

    python -m benchmarks.autoscaling [--model PATH] [--burst 16] [--steady 2] [--phase-s 40]

The service runs at MIN_REPLICAS=0, MAX_REPLICAS=2 (one CPU each) on one local Ray instance.
Closed-loop clients (each sends its next request when its last is answered) follow the schedule;
a watcher samples the model deployment's replica states from ``serve.status()`` every 0.2 s. Reports the
time to the first replica and first answer, the time to add the second replica under the burst,
and the time back to zero after the last answer, against IDLE_TIMEOUT_S. For every replica started,
whether it started in a warm worker (``WARM_WORKERS``, see serving/warm_pool.py) and how long it took
from Serve's decision to add it to the end of its constructor. The load starts once the warm pool is
full, as it is at a cold start after a quiet spell.
Writes benchmarks/results/autoscaling.json and autoscaling.png.
"""

from __future__ import annotations

import argparse
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from benchmarks.common import (
    MODEL_NAME,
    PROMPTS,
    RESULTS,
    replica_reports,
    summary,
    upscale_times,
    warm_pool_full,
    write_results,
)
from ray_serve_app import build_graph
from settings import build_settings
from testing.checkpoints import random_checkpoint
from testing.http import ok
from testing.polling import wait_for
from testing.serve import local_serve, replica_states

logger = logging.getLogger("autoscaling")
SETTINGS = {
    "MIN_REPLICAS": "0",
    "MAX_REPLICAS": "2",
    "NUM_CPUS_PER_REPLICA": "1",
    "TARGET_ONGOING_REQUESTS": "4",
    "UPSCALE_DELAY_S": "3",
    "DOWNSCALE_DELAY_S": "10",
    "IDLE_TIMEOUT_S": "15",
    "MAX_QUEUED_REQUESTS": "-1",
}


@dataclass
class Phase:
    name: str
    clients: int
    seconds: float


class Watcher(threading.Thread):
    """Samples replica states until stopped: [(t, running, starting), ...]."""

    def __init__(self, t0: float) -> None:
        super().__init__(daemon=True)
        self.t0 = t0
        self.samples: list[tuple[float, int, int]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            states = replica_states(MODEL_NAME, MODEL_NAME)
            starting = sum(states.get(s, 0) for s in ("STARTING", "UPDATING", "RECOVERING"))
            self.samples.append((time.monotonic() - self.t0, states.get("RUNNING", 0), starting))
            self.stop.wait(0.2)


def drive(url: str, phases: list[Phase], t0: float, new_tokens: int) -> list[dict[str, Any]]:
    """Run the schedule; every request as {sent, latency, status, phase} (seconds since t0)."""
    records: list[dict[str, Any]] = []
    lock = threading.Lock()

    def client(index: int, phase: Phase, until: float) -> None:
        with httpx.Client(timeout=300) as http:
            n = index
            while time.monotonic() < until:
                body = {
                    "prompt": PROMPTS[n % len(PROMPTS)],
                    "generation_kwargs": {"max_new_tokens": new_tokens, "temperature": 0},
                }
                sent = time.monotonic()
                status = http.post(url, json=body).status_code
                with lock:
                    records.append(
                        {"sent": sent - t0, "latency": time.monotonic() - sent, "status": status, "phase": phase.name}
                    )
                n += 1

    for phase in phases:
        until = time.monotonic() + phase.seconds
        threads = [threading.Thread(target=client, args=(i, phase, until)) for i in range(phase.clients)]
        for thread in threads:
            thread.start()
        logger.info("phase %s: %d clients for %.0fs", phase.name, phase.clients, phase.seconds)
        if not threads:
            time.sleep(phase.seconds)  # an idle phase: the schedule itself, nothing to wait on
        for thread in threads:
            thread.join()
    return records


def first_time(samples: list[tuple[float, int, int]], after: float, test) -> float | None:
    return next((t for t, running, starting in samples if t >= after and test(running, starting)), None)


def analyse(phases: list[Phase], samples, records, idle_timeout_s: float) -> dict[str, Any]:
    starts = {}
    t = 0.0
    for phase in phases:
        starts[phase.name] = t
        t += phase.seconds
    burst = starts["burst"]
    first_answer = min(r["sent"] + r["latency"] for r in records if r["status"] == 200)
    last_answer = max(r["sent"] + r["latency"] for r in records)
    out = {
        "first_replica_running_s": _minus(first_time(samples, burst, lambda r, s: r >= 1), burst),
        "first_answer_s": round(first_answer - burst, 3),
        "second_replica_running_s": _minus(first_time(samples, burst, lambda r, s: r >= 2), burst),
        "back_to_zero_after_last_answer_s": _minus(
            first_time(samples, last_answer, lambda r, s: r == 0 and s == 0), last_answer
        ),
        "idle_timeout_s": idle_timeout_s,
        "max_running_replicas": max(r for _, r, _ in samples),
        "errors": sum(r["status"] != 200 for r in records),
    }
    for phase in phases:
        latencies = [r["latency"] for r in records if r["phase"] == phase.name and r["status"] == 200]
        if latencies:
            out[f"{phase.name}_latency_s"] = summary(latencies)
            out[f"{phase.name}_requests"] = len(latencies)
    return out


def replica_starts(t0_epoch: float) -> list[dict[str, Any]]:
    """Each replica the run started, in order: warm worker or not, and seconds from Serve's decision
    to add it (the latest upscale decision before its constructor began) to its constructor's end."""
    decisions = [at for at, _, _ in upscale_times(MODEL_NAME)]
    starts = []
    for report in replica_reports(MODEL_NAME):
        constructed_at = report["ready_at"] - report["constructor_s"]
        decided = max((at for at in decisions if at <= constructed_at + 0.5), default=None)
        starts.append(
            {
                "replica": report["replica"],
                "warm_worker": report.get("warm_worker", False),
                "decided_at_s": _minus(decided, t0_epoch),
                "decision_to_ready_s": _minus(report["ready_at"], decided) if decided is not None else None,
                "process_start_s": report.get("process_start_s"),
                "constructor_s": report["constructor_s"],
                "imports_s": report.get("imports_s"),
            }
        )
    return starts


def _minus(t: float | None, t0: float) -> float | None:
    return None if t is None else round(t - t0, 3)


def plot(phases: list[Phase], samples, records, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    times = [t for t, _, _ in samples]
    top.step(times, [r for _, r, _ in samples], where="post", label="running replicas", linewidth=2)
    top.step(times, [s for _, _, s in samples], where="post", label="starting replicas", linestyle="--")
    clients, t = [], 0.0
    for phase in phases:
        clients += [(t, phase.clients), (t + phase.seconds, phase.clients)]
        t += phase.seconds
    load = top.twinx()
    load.plot([c[0] for c in clients], [c[1] for c in clients], color="grey", alpha=0.5, label="clients (offered load)")
    load.set_ylabel("concurrent clients")
    top.set_ylabel("replicas")
    top.legend(loc="upper left")
    load.legend(loc="upper right")
    ok = [r for r in records if r["status"] == 200]
    bottom.scatter([r["sent"] for r in ok], [r["latency"] for r in ok], s=6)
    bottom.set_yscale("log")
    bottom.set_ylabel("latency (s)")
    bottom.set_xlabel("seconds")
    for ax in (top, bottom):
        t = 0.0
        for phase in phases:
            ax.axvline(t, color="black", alpha=0.15)
            t += phase.seconds
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="checkpoint (default: random GPT-2-small shape)")
    parser.add_argument("--burst", type=int, default=16, help="clients during the burst")
    parser.add_argument("--steady", type=int, default=2, help="clients during the steady phase")
    parser.add_argument("--phase-s", type=float, default=40.0, help="seconds of burst and of steady load")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--warm-workers", type=int, default=1, help="WARM_WORKERS (0: no warm pool)")
    parser.add_argument("--name", default="autoscaling")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    model = args.model or random_checkpoint("gpt2-small")
    env = {"MODEL_ID": str(model), "SERVED_MODEL_NAME": MODEL_NAME, **SETTINGS, "WARM_WORKERS": str(args.warm_workers)}
    settings = build_settings(env)
    idle_tail = settings.idle_timeout_s + 20
    phases = [
        Phase("idle", 0, 5),
        Phase("burst", args.burst, args.phase_s),
        Phase("steady", args.steady, args.phase_s),
        Phase("idle_after", 0, idle_tail),
    ]
    from ray import serve

    with local_serve(num_cpus=2) as port:
        serve.run(build_graph(settings), name="service", route_prefix="/", blocking=False)
        wait_for(lambda: ok(f"http://127.0.0.1:{port}/healthz"), timeout=120)
        if args.warm_workers:
            wait_for(lambda: warm_pool_full(MODEL_NAME), timeout=300, interval=0.5)
        t0, t0_epoch = time.monotonic(), time.time()
        watcher = Watcher(t0)
        watcher.start()
        records = drive(f"http://127.0.0.1:{port}/generate", phases, t0, args.new_tokens)
        watcher.stop.set()
        watcher.join()
        starts = replica_starts(t0_epoch)  # from this Ray session's logs, while it is up
    result = analyse(phases, watcher.samples, records, settings.idle_timeout_s)
    result["replica_starts"] = starts
    result["warm_workers"] = args.warm_workers
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()} | {
        "model": str(model),
        "settings": SETTINGS,
        "phases": [vars(p) for p in phases],
    }
    path = write_results(
        args.name, {"config": config, "result": result, "timeline": watcher.samples, "requests": records}
    )
    plot(phases, watcher.samples, records, RESULTS / f"{args.name}.png", f"Step load on {model.name}, 2 x 1 CPU max")
    print(f"wrote {path}")
    for key, value in result.items():
        if key != "replica_starts":
            print(f"  {key}: {value}")
    for i, start in enumerate(starts, 1):
        print(f"  replica {i}: {start}")


if __name__ == "__main__":
    main()
