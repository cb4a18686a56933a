"""Isolation under sharing: an authorised client's latency alone, beside a keyless 1 MB flood, beside maximal
log-probability requests; the Gateway's and the model replica's memory during each.

One service (API key set, a tiny GPT-2 of 512 positions: 2 layers of width 32), three phases side by
side in one run:

- ``alone``: one authorised client sends short completions (4 tokens) back to back;
- ``flood``: the same client, while 6 clients post 1 MB bodies of small nested lists without a key;
- ``logprobs``: the same client, while 3 clients send the largest chat the output budget allows
  (n=3, max_tokens=480, top_logprobs=20: 30,240 of MAX_OUTPUT_TOKENS_PER_REQUEST's 32,768);
- ``flood, refusals at once``: the flood again after the service is deployed anew with
  AUTH_FAILURE_DELAY_S=0 (the first three run at its default), beside ``alone, refusals at once``:
  what a keyless request costs the others when nothing slows the flooding clients down.

The background clients run as threads of a process of their own, apart from the authorised client.
The Gateway's and the replica's resident memory are sampled (psutil, by the actors' PIDs) every 0.2 s.
Writes benchmarks/results/isolation.json and .png. Run: ``python -m benchmarks.isolation``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks.common import RESULTS, summary, write_results
from ray_serve_app import build_graph
from settings import build_settings
from testing.checkpoints import CHAT_TEMPLATE, build_tiny_causal
from testing.http import ok
from testing.polling import wait_for
from testing.serve import local_serve

logger = logging.getLogger(__name__)
KEY = "sk-bench-isolation-0123"
AUTH = {"Authorization": f"Bearer {KEY}"}
FLOOD_BODY = b"[" + b",".join([b"[[[[[[[[1]]]]]]]]"] * 58_000) + b"]"  # 1.04 MB


GATEWAY, REPLICA = "ray::ServeReplica:llm:Gateway", "ray::ServeReplica:bench:"


def replica_processes() -> list[tuple[int, str]]:
    """(PID, title) of this Ray's processes: its workers descend from this driver."""
    import os

    import psutil

    found = []
    for proc in psutil.Process(os.getpid()).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            found.append((proc.pid, " ".join(proc.cmdline())))
    return found


def actor_pids() -> dict[str, int]:
    """The Gateway's and the model replica's PIDs."""
    pids = {}
    for pid, title in replica_processes():
        if title.startswith(GATEWAY):
            pids["gateway"] = pid
        elif title.startswith(REPLICA):
            pids["replica"] = pid
    return pids


def gateway_pids() -> set[int]:
    return {pid for pid, title in replica_processes() if title.startswith(GATEWAY)}


class MemorySampler(threading.Thread):
    def __init__(self, pids: dict[str, int]) -> None:
        super().__init__(daemon=True)
        import psutil

        self.procs = {role: psutil.Process(pid) for role, pid in pids.items()}
        self.peak: dict[str, int] = dict.fromkeys(self.procs, 0)
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            for role, proc in self.procs.items():
                self.peak[role] = max(self.peak[role], proc.memory_info().rss)
            time.sleep(0.2)

    def reset(self) -> dict[str, float]:
        peaks = {role: round(value / 2**20, 1) for role, value in self.peak.items()}
        self.peak = dict.fromkeys(self.procs, 0)
        return peaks


def authorised(url: str, seconds: float) -> list[float]:
    body = {"model": "bench", "prompt": "Return the", "max_tokens": 4, "temperature": 0}
    times: list[float] = []
    with httpx.Client() as client:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            began = time.monotonic()
            response = client.post(f"{url}/v1/completions", json=body, headers=AUTH, timeout=60)
            response.raise_for_status()
            times.append(time.monotonic() - began)
    return times


def background_process(url: str, kind: str, clients: int, stop, statuses) -> None:
    """The background clients, as threads of one process of their own: their Python work must not share a GIL
    with the authorised client's, whose latency is what is measured (on another machine they would share
    nothing; here they still share the two cores). ``statuses`` is a shared list of answered status codes."""

    def flood() -> None:
        with httpx.Client() as client:
            while not stop.is_set():
                headers = {"Content-Type": "application/json"}
                status = client.post(f"{url}/v1/chat/completions", content=FLOOD_BODY, headers=headers, timeout=60)
                statuses.append(status.status_code)

    def logprobs() -> None:
        body = {"model": "bench", "messages": [{"role": "user", "content": "hi"}], "n": 3, "max_tokens": 480,
                "logprobs": True, "top_logprobs": 20, "temperature": 1.0}  # fmt: skip
        with httpx.Client() as client:
            while not stop.is_set():
                status = client.post(f"{url}/v1/chat/completions", json=body, headers=AUTH, timeout=300)
                statuses.append(status.status_code)

    threads = [threading.Thread(target=flood if kind == "flood" else logprobs) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def background(url: str, kind: str, clients: int):
    """Start the background load in its own (spawned) process; returns it, its stop event and its statuses."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    manager = context.Manager()
    stop, statuses = manager.Event(), manager.list()
    process = context.Process(target=background_process, args=(url, kind, clients, stop, statuses), daemon=True)
    process.start()
    return process, stop, statuses, manager


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="authorised client's time per phase")
    parser.add_argument("--phases", default=None, help="comma-separated subset of the phases (alone is always run); "
                        "results then go to isolation-partial.json and are not plotted")  # fmt: skip
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    from ray import serve

    model = build_tiny_causal(Path("/tmp/bench-isolation-model"), n_positions=512)
    env = {"MODEL_ID": str(model), "SERVED_MODEL_NAME": "bench", "API_KEY": KEY, "MIN_REPLICAS": "1",
           "MAX_REPLICAS": "1", "WARM_WORKERS": "0", "TEMPERATURE": "0", "CHAT_TEMPLATE": CHAT_TEMPLATE}  # fmt: skip
    default_delay = build_settings(env).auth_failure_delay_s
    # (phase, background kind, clients, AUTH_FAILURE_DELAY_S): the service is deployed anew when the delay changes
    plan = [("alone", None, 0, default_delay), ("flood", "flood", 6, default_delay),
            ("logprobs", "logprobs", 3, default_delay), ("alone, refusals at once", None, 0, 0.0),
            ("flood, refusals at once", "flood", 6, 0.0)]  # fmt: skip
    if args.phases:
        wanted = {"alone", *(name.strip() for name in args.phases.split(","))}
        unknown = wanted - {name for name, *_ in plan}
        if unknown:
            parser.error(f"unknown phases {sorted(unknown)}; the phases are {[name for name, *_ in plan]}")
        plan = [step for step in plan if step[0] in wanted]
    phases: dict[str, Any] = {}
    with local_serve(num_cpus=2) as port:
        url = f"http://127.0.0.1:{port}"
        deployed, sampler = None, None
        for name, kind, clients, delay in plan:
            if delay != deployed:
                before = sampler.procs["gateway"].pid if sampler is not None else None
                if sampler is not None:
                    sampler.stop.set()
                # a new Gateway replica with the new setting (the model's application is left as it is)
                serve.run(build_graph(build_settings(env | {"AUTH_FAILURE_DELAY_S": str(delay)})), name="llm",
                          route_prefix="/", blocking=False)  # fmt: skip
                wait_for(lambda b=before: gateway_pids() - {b} and b not in gateway_pids(), timeout=120,
                         what="the new Gateway alone")  # fmt: skip
                wait_for(lambda: ok(f"{url}/healthz"), timeout=120, what="the Gateway")
                wait_for(lambda: authorised(url, 0.01), timeout=300, what="the model")
                sampler = MemorySampler(actor_pids())
                sampler.start()
                deployed = delay
            counts: dict[int, int] = {}
            if kind:
                process, stop, statuses, manager = background(url, kind, clients)
                # the load is on once each background client has had an answer (logprobs: the first takes a while)
                wait_for(lambda s=statuses, n=clients: len(s) >= n, timeout=300, what=f"the {name} load")
            sampler.reset()
            began = time.monotonic()
            latencies = authorised(url, args.seconds)
            if kind:
                stop.set()
                elapsed = time.monotonic() - began
                process.join(timeout=300)
                for status in list(statuses):
                    counts[status] = counts.get(status, 0) + 1
                manager.shutdown()
            phases[name] = {"latency_s": summary(latencies), "rss_peak_mib": sampler.reset(),
                            "background_statuses": counts, "background_clients": clients,
                            "auth_failure_delay_s": delay}  # fmt: skip
            if kind == "flood":
                phases[name]["refusals_per_s"] = round(counts.get(401, 0) / elapsed, 1)
            logger.info("%s: %s", name, phases[name])
        sampler.stop.set()
        serve.delete("llm")
    for name, against in (("flood", "alone"), ("logprobs", "alone"), ("flood, refusals at once", "alone"),
                          ("alone, refusals at once", "alone")):  # fmt: skip
        if name not in phases:
            continue
        alone = phases[against]["latency_s"]
        phases[name]["p50_ratio"] = round(phases[name]["latency_s"]["median"] / alone["median"], 2)
        phases[name]["p95_ratio"] = round(phases[name]["latency_s"]["p95"] / alone["p95"], 2)
    data = {
        "phases": phases,
        "seconds_per_phase": args.seconds,
        "flood_body_bytes": len(FLOOD_BODY),
        "ratios_against": "alone",
    }
    if args.phases:
        path = write_results("isolation-partial", data)
    else:
        path = write_results("isolation", data)
        plot(phases, RESULTS / "isolation.png")
    logger.info("wrote %s", path)


def plot(phases: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(phases)
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.4))
    p50 = [phases[n]["latency_s"]["median"] * 1000 for n in names]
    p95 = [phases[n]["latency_s"]["p95"] * 1000 for n in names]
    xs = range(len(names))
    left.bar([x - 0.2 for x in xs], p50, 0.4, label="p50")
    left.bar([x + 0.2 for x in xs], p95, 0.4, label="p95")
    labels = [n.replace(", ", ",\n") for n in names]
    left.set_xticks(list(xs), labels, fontsize=8)
    left.set_ylabel("authorised client latency (ms)")
    left.legend()
    roles = sorted({role for n in names for role in phases[n]["rss_peak_mib"]})
    for i, role in enumerate(roles):
        right.bar([x + (i - 0.5) * 0.4 for x in xs], [phases[n]["rss_peak_mib"].get(role, 0) for n in names], 0.4,
                  label=role)  # fmt: skip
    right.set_xticks(list(xs), labels, fontsize=8)
    right.set_ylabel("peak RSS (MiB)")
    right.margins(y=0.25)  # room for the legend above the bars
    right.legend(loc="upper right")
    fig.suptitle("Isolation: 4-token completions alone, beside a keyless 1 MB flood, beside maximal logprobs")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
