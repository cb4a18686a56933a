"""The model pool under load: two models woken by their own traffic only, and an eviction.

    python -m benchmarks.pool two-models [--model PATH]
    python -m benchmarks.pool eviction [--model PATH]

``two-models``: models ``a`` and ``b`` (same checkpoint, each its own Serve application, at zero),
with different idle timeouts. Closed-loop clients send a burst to ``a``, a pause, a burst to ``b``,
then nothing. A watcher samples both models' replica states every 0.2 s. Reports, per model, the
time from its burst to its first running replica and first answer, the time from its last answer
back to zero against its IDLE_TIMEOUT_S, and whether the other model's burst ever started it.
Writes benchmarks/results/pool_two_models.json and .png (both replica timelines).

``eviction``: a Ray instance with room for one model replica (1 CPU). ``low`` (priority 0) serves
a long request; ``high`` (priority 1) is asked while it does. Reports the time from the request to
``high`` to its answer, split into: the grace the cluster autoscaler gets (EVICTION_GRACE_S) and the
pool's decision, waiting for ``low``'s request to finish, ``low``'s shutdown, and ``high``'s cold
start (its replica's phases). Repeated ``--runs`` times. Writes pool_eviction.json and .png.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks.common import PROMPTS, RESULTS, write_results
from ray_serve_app import build_graph
from settings import REPO_ROOT, build_settings
from testing.checkpoints import random_checkpoint
from testing.http import ok
from testing.polling import wait_for
from testing.serve import local_serve, replica_states

logger = logging.getLogger("pool")
STARTING = ("STARTING", "UPDATING", "RECOVERING")


class Watcher(threading.Thread):
    """Samples the replica states of ``models`` until stopped: {model: [(t, running, starting)]}."""

    def __init__(self, models: list[str], t0: float) -> None:
        super().__init__(daemon=True)
        self.models, self.t0 = models, t0
        self.samples: dict[str, list[tuple[float, int, int]]] = {m: [] for m in models}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            for model in self.models:
                states = replica_states(model, model)  # the pool names a model's app and deployment after it
                starting = sum(states.get(s, 0) for s in STARTING)
                self.samples[model].append((time.monotonic() - self.t0, states.get("RUNNING", 0), starting))
            self.stop.wait(0.2)


def completion(model: str, n: int, tokens: int) -> dict[str, Any]:
    return {"model": model, "prompt": PROMPTS[n % len(PROMPTS)], "max_tokens": tokens, "temperature": 0}


def burst(url: str, model: str, clients: int, seconds: float, tokens: int, t0: float) -> list[dict[str, Any]]:
    """``clients`` closed-loop clients on ``model`` for ``seconds``; each request as {sent, latency, status}."""
    records: list[dict[str, Any]] = []
    lock = threading.Lock()
    until = time.monotonic() + seconds

    def client(index: int) -> None:
        with httpx.Client(timeout=600) as http:
            n = index
            while time.monotonic() < until:
                sent = time.monotonic()
                status = http.post(f"{url}/v1/completions", json=completion(model, n, tokens)).status_code
                with lock:
                    records.append(
                        {"model": model, "sent": sent - t0, "latency": time.monotonic() - sent, "status": status}
                    )
                n += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return records


def first(samples: list[tuple[float, int, int]], after: float, test) -> float | None:
    return next((t for t, running, starting in samples if t >= after and test(running, starting)), None)


def _since(t: float | None, t0: float) -> float | None:
    return None if t is None else round(t - t0, 3)


# --- two models ------------------------------------------------------------------------------------


def two_models(args: argparse.Namespace) -> None:
    model = args.model or REPO_ROOT / "models" / "pydoc-gpt-mini"
    idle = {"a": args.idle_a, "b": args.idle_b}
    entries = ",".join(f'{{"name":"{m}","model_id":"{model}","idle_timeout_s":{idle[m]}}}' for m in ("a", "b"))
    settings = build_settings(
        {
            "MODELS": f"[{entries}]",
            "MIN_REPLICAS": "0",
            "MAX_REPLICAS": "1",
            "NUM_CPUS_PER_REPLICA": "1",
            "AUTOSCALING_LOOK_BACK_S": "2",
            "METRICS_PUSH_INTERVAL_S": "0.5",
            "MAX_QUEUED_REQUESTS": "-1",
        }
    )
    from ray import serve

    schedule: list[dict[str, Any]] = []
    cold_starts: dict[str, dict[str, Any]] = {}
    with local_serve(num_cpus=3) as port:
        url = f"http://127.0.0.1:{port}"
        serve.run(build_graph(settings), name="llm", route_prefix="/", blocking=False)
        wait_for(lambda: ok(f"{url}/healthz"), timeout=120)
        wait_for(lambda: all(replica_states(m, m) == {} for m in ("a", "b")) and _apps_exist(("a", "b")), 120)
        t0 = time.monotonic()
        watcher = Watcher(["a", "b"], t0)
        watcher.start()
        records: list[dict[str, Any]] = []
        for name, pause in (("a", args.pause_s), ("b", max(idle.values()) + 15)):
            time.sleep(5)  # the schedule itself: a quiet stretch before each burst
            start = time.monotonic() - t0
            records += burst(url, name, args.clients, args.burst_s, args.new_tokens, t0)
            schedule.append({"model": name, "start": round(start, 3), "end": round(time.monotonic() - t0, 3)})
            wake = _models(url)[name]["last_cold_start"] or {}  # this burst's wake-up, as the model reported it
            details = wake.get("details") or {}
            cold_starts[name] = {"phases": wake.get("phases"), "warm_worker": details.get("warm_worker")}
            logger.info("burst on %s done; pausing %.0fs", name, pause)
            time.sleep(pause)  # the schedule: nothing sent while the models may go back to zero
        watcher.stop.set()
        watcher.join()
    result = {}
    for burst_info in schedule:
        name, other = burst_info["model"], "b" if burst_info["model"] == "a" else "a"
        mine = [r for r in records if r["model"] == name]
        ok = [r for r in mine if r["status"] == 200]
        last_answer = max(r["sent"] + r["latency"] for r in mine)
        samples, others = watcher.samples[name], watcher.samples[other]
        result[name] = {
            "idle_timeout_s": idle[name],
            "first_replica_running_s": _since(
                first(samples, burst_info["start"], lambda r, s: r >= 1), burst_info["start"]
            ),
            "first_answer_s": round(min(r["sent"] + r["latency"] for r in ok) - burst_info["start"], 3),
            "back_to_zero_after_last_answer_s": _since(
                first(samples, last_answer, lambda r, s: r == 0 and s == 0), last_answer
            ),
            "requests": len(mine),
            "errors": len(mine) - len(ok),
            "woke_the_other": _woke(others, burst_info["start"], burst_info["end"]),
            "cold_start": cold_starts.get(name),
        }
        logger.info("%s: %s", name, result[name])
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()} | {"model": str(model)}
    path = write_results(
        "pool_two_models",
        {"config": config, "schedule": schedule, "result": result, "timeline": watcher.samples, "requests": records},
    )
    plot_two_models(watcher.samples, schedule, records, result, RESULTS / "pool_two_models.png")
    print(f"wrote {path}")
    for name, row in result.items():
        print(name, row)


def _woke(samples: list[tuple[float, int, int]], start: float, end: float) -> bool:
    """Whether a model at zero when a burst on another model began had a replica during that burst."""
    before = [s for s in samples if s[0] < start]
    if before and (before[-1][1] or before[-1][2]):
        return False  # it was up already (from its own traffic): this burst cannot be blamed
    return any(running or starting for t, running, starting in samples if start <= t <= end)


def _apps_exist(names: tuple[str, ...]) -> bool:
    from ray import serve

    return set(names) <= set(serve.status().applications)


def plot_two_models(samples, schedule, records, result, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 1, figsize=(11, 6), sharex=True)
    for ax, name in zip(axes, ("a", "b"), strict=True):
        times = [t for t, _, _ in samples[name]]
        ax.step(times, [r for _, r, _ in samples[name]], where="post", label="running replicas", linewidth=2)
        ax.step(times, [s for _, _, s in samples[name]], where="post", label="starting", linestyle="--")
        for b in schedule:
            color = "tab:green" if b["model"] == name else "tab:grey"
            ax.axvspan(b["start"], b["end"], color=color, alpha=0.15, label=f"burst on {b['model']}")
        answers = [r["sent"] + r["latency"] for r in records if r["model"] == name]
        ax.plot(answers, [0.5] * len(answers), "|", color="black", alpha=0.4, label="answers")
        ax.set_ylabel(f"model {name}\nreplicas")
        ax.set_ylim(-0.1, 1.6)
        ax.set_title(
            f"model {name}: IDLE_TIMEOUT_S={result[name]['idle_timeout_s']:g}, back to zero "
            f"{result[name]['back_to_zero_after_last_answer_s']} s after its last answer",
            fontsize=9,
        )
        ax.legend(loc="upper right", fontsize=7)
    axes[-1].set_xlabel("seconds")
    fig.suptitle("Two models in one pool: each wakes on its own traffic and goes back to zero on its own")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# --- eviction --------------------------------------------------------------------------------------


def eviction(args: argparse.Namespace) -> None:
    model = args.model or random_checkpoint("gpt2-small")
    entries = (
        f'[{{"name":"low","model_id":"{model}","priority":0}},'
        f'{{"name":"high","model_id":"{model}","priority":1,"idle_timeout_s":{args.high_idle_s}}}]'
    )
    settings = build_settings(
        {
            "MODELS": entries,
            "MIN_REPLICAS": "0",
            "MAX_REPLICAS": "1",
            "NUM_CPUS_PER_REPLICA": "1",
            "EVICTION_GRACE_S": str(args.grace_s),
            "IDLE_TIMEOUT_S": "600",  # long: only an eviction takes low to zero (high has its own, short)
            "AUTOSCALING_LOOK_BACK_S": "2",
            "METRICS_PUSH_INTERVAL_S": "0.5",
            "REQUEST_TIMEOUT_S": "600",
        }
    )
    from ray import serve

    runs = []
    with local_serve(num_cpus=1) as port:
        url = f"http://127.0.0.1:{port}"
        serve.run(build_graph(settings), name="llm", route_prefix="/", blocking=False)
        wait_for(lambda: ok(f"{url}/healthz"), timeout=120)
        for run in range(args.runs):
            runs.append(one_eviction(url, args))
            logger.info("run %d: %s", run + 1, runs[-1])
    medians = {key: statistics.median(r[key] for r in runs) for key in runs[0] if isinstance(runs[0][key], float)}
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()} | {"model": str(model)}
    path = write_results("pool_eviction", {"config": config, "runs": runs, "median": medians})
    plot_eviction(runs, RESULTS / "pool_eviction.png", args.grace_s)
    print(f"wrote {path}")
    for key, value in medians.items():
        print(f"{key:>36}: {value:.2f}")


def _models(url: str) -> dict[str, dict[str, Any]]:
    return {m["id"]: m for m in httpx.get(f"{url}/healthz", timeout=10).json()["models"]}


def one_eviction(url: str, args: argparse.Namespace) -> dict[str, Any]:
    # Both at zero (high scaled down after the previous run; low back in: nothing holds the room).
    wait_for(lambda: replica_states("high", "high") == {} and replica_states("low", "low") == {}, timeout=900)
    # low is at zero: never woken yet, or evicted by the previous run (it is readmitted when asked for).
    wait_for(lambda: _models(url)["low"]["state"] in ("scaled_to_zero", "evicted"), timeout=120)
    low_result: dict[str, Any] = {}

    def low_request() -> None:
        body = completion("low", 1, args.low_tokens) | {"prompt": [PROMPTS[1]] * 4}
        started = time.monotonic()
        response = httpx.post(f"{url}/v1/completions", json=body, timeout=900)
        low_result.update(status=response.status_code, answered=time.monotonic(), latency=time.monotonic() - started)

    low = threading.Thread(target=low_request)
    low.start()
    wait_for(lambda: replica_states("low", "low").get("RUNNING", 0) == 1, timeout=300)
    time.sleep(args.low_head_start_s)  # the schedule: low is well into its long request
    marks: dict[str, float] = {}
    stop = threading.Event()

    from ray import serve

    controller = serve.get_deployment_handle("PoolController", "llm")

    def watch() -> None:  # the moments the pool's decisions become visible
        while not stop.is_set():
            now = time.monotonic()
            low_state = replica_states("low", "low")
            if "evicted" not in marks:
                statuses = {s.name: s for s in controller.snapshot.remote().result()}
                if not statuses["low"].admitted:  # the pool has decided: low's gate closes, it drains
                    marks["evicted"] = now
            if "low_zero" not in marks and "evicted" in marks and not low_state:
                marks["low_zero"] = now
            if "high_placed" not in marks and replica_states("high", "high").get("STARTING") and "low_zero" in marks:
                marks["high_placed"] = now
            stop.wait(0.1)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    sent = time.monotonic()
    response = httpx.post(f"{url}/v1/completions", json=completion("high", 2, args.high_tokens), timeout=900)
    answered = time.monotonic()
    low.join()
    stop.set()
    watcher.join()
    assert response.status_code == 200, response.text
    assert low_result.get("status") == 200, f"low's request was not served: {low_result}"
    report = _models(url)["high"]["last_cold_start"] or {}
    evicted = marks.get("evicted", answered)
    low_zero = marks.get("low_zero", answered)
    out = {
        "total_s": round(answered - sent, 3),
        "grace_and_decision_s": round(evicted - sent, 3),
        "waiting_for_low_to_drain_s": round(max(0.0, low_result["answered"] - evicted), 3),
        "low_shutdown_s": round(max(0.0, low_zero - low_result["answered"]), 3),
        "high_cold_start_s": round(answered - low_zero, 3),
        "low_request_s": round(low_result["latency"], 3),
        "high_phases": report.get("phases", {}),
    }
    return out


def plot_eviction(runs: list[dict[str, Any]], path: Path, grace_s: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = [
        ("grace_and_decision_s", f"grace ({grace_s:g} s) + decision"),
        ("waiting_for_low_to_drain_s", "low's request finishes"),
        ("low_shutdown_s", "low shuts down"),
        ("high_cold_start_s", "high's cold start"),
    ]
    fig, ax = plt.subplots(figsize=(10, 1.2 + 0.5 * len(runs)))
    for i, run in enumerate(runs):
        left = 0.0
        for (key, label), color in zip(parts, ("tab:blue", "tab:orange", "tab:green", "tab:red"), strict=True):
            ax.barh(i, run[key], left=left, color=color, label=label if i == 0 else None)
            left += run[key]
    ax.set_yticks(range(len(runs)), [f"run {i + 1}" for i in range(len(runs))])
    ax.set_xlabel("seconds from the request to high (priority 1) to its answer")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.35), ncol=4, fontsize=8)
    fig.suptitle("Eviction on a cluster with room for one replica")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="scenario", required=True)
    two = sub.add_parser("two-models")
    two.add_argument("--model", type=Path, help="checkpoint of both models (default: the embedded model)")
    two.add_argument("--clients", type=int, default=4)
    two.add_argument("--burst-s", type=float, default=20.0)
    two.add_argument("--pause-s", type=float, default=10.0, help="quiet time between the two bursts")
    two.add_argument("--idle-a", type=float, default=10.0, help="IDLE_TIMEOUT_S of model a")
    two.add_argument("--idle-b", type=float, default=25.0, help="IDLE_TIMEOUT_S of model b")
    two.add_argument("--new-tokens", type=int, default=16)
    ev = sub.add_parser("eviction")
    ev.add_argument("--model", type=Path, help="checkpoint of both models (default: random GPT-2-small shape)")
    ev.add_argument("--runs", type=int, default=3)
    ev.add_argument("--grace-s", type=float, default=3.0, help="EVICTION_GRACE_S")
    ev.add_argument("--low-tokens", type=int, default=128, help="tokens of low's long request (4 prompts)")
    ev.add_argument("--low-head-start-s", type=float, default=2.0)
    ev.add_argument("--high-tokens", type=int, default=32)
    ev.add_argument("--high-idle-s", type=float, default=8.0, help="IDLE_TIMEOUT_S of high")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    two_models(args) if args.scenario == "two-models" else eviction(args)


if __name__ == "__main__":
    main()
