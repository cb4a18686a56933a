"""What streaming costs: streamed against whole (non-streamed) answers, interleaved on one service.

    python -m benchmarks.stream_cost [--clients 16 32] [--seconds 20] [--repeats 2] [--name stream_cost] \
        [--variant default --variant interval:STREAM_INTERVAL_S=0.1 --variant flag:@RAY_SERVE_...=0]

The service of ``benchmarks.peer_vllm`` (one replica, batch limit 32, the GPT-2-small-shaped random
checkpoint, bfloat16 by default) runs once; for each client count the two kinds of load alternate
(streamed, whole, streamed, whole...: ``--repeats`` legs each), so both see the same machine. Each leg
is C closed-loop clients sending ``/v1/completions`` with 64 greedy tokens. Beside requests/s it
reads the CPU seconds each of the service's processes (the model replica, the Gateway, Serve's
proxy) and this load generator spent per request, from ``/proc``, which is where a per-token cost
shows, and the client's view of inter-token latency (the gaps between pieces of streamed text).
It also follows the replica's engine thread (its busiest), which the machine's speed moves far less
than requests/s: the share of its runnable time it spent waiting for a core (``/proc``'s schedstat),
and the share of the engine's busy time (``busy_s`` of the replica's ``stats()``) it ran, the rest
being waits for a core or for the GIL.
Each ``--variant`` is a service of its own (settings, or with ``@`` the environment of its Ray
instance, where Serve reads its flags), measured one after another.
Writes benchmarks/results/<name>.json and .png and prints the tables.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import resource
import statistics
import subprocess
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS, replica_stats, write_results
from benchmarks.loadgen import closed_loop
from benchmarks.peer_vllm import body, service
from testing.checkpoints import random_checkpoint

logger = logging.getLogger("stream_cost")
PROCESSES = {"replica": "ServeReplica:{model}:", "gateway": ":Gateway", "proxy": "ProxyActor"}


def _descendants() -> dict[str, str]:
    """pid -> command line of every process this one started (its Ray instance's workers among them)."""
    lines = subprocess.run(["ps", "-eo", "pid=,ppid=,args="], capture_output=True, text=True).stdout.splitlines()
    rows = [[*line.split(None, 2), ""][:3] for line in lines]
    mine, grew = {str(os.getpid())}, True
    while grew:
        grew = False
        for pid, ppid, _ in rows:
            if ppid in mine and pid not in mine:
                mine.add(pid)
                grew = True
    return {pid: args for pid, _, args in rows if pid in mine}


def service_pids(model: str) -> dict[str, str]:
    """The model replica's, the Gateway's and the proxy's pids (only this run's Ray instance)."""
    found: dict[str, str] = {}
    for pid, args in _descendants().items():
        for name, pattern in PROCESSES.items():
            if pattern.format(model=model) in args and args.startswith("ray::"):
                found.setdefault(name, pid)
    return found


def cpu_seconds(pids: dict[str, str]) -> dict[str, float]:
    """User + system CPU seconds so far of each process, and of this one (the load generator)."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for name, pid in pids.items():
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        out[name] = (int(fields[11]) + int(fields[12])) / tick
    usage = resource.getrusage(resource.RUSAGE_SELF)
    out["client"] = usage.ru_utime + usage.ru_stime
    return out


def thread_times(pid: str) -> dict[str, tuple[float, float]]:
    """Each thread of ``pid``: seconds run on a core, and seconds runnable but waiting for one (schedstat)."""
    out: dict[str, tuple[float, float]] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{tid}/schedstat") as f:  # a thread that ended
            run_ns, wait_ns, _ = f.read().split()
            out[tid] = (int(run_ns) / 1e9, int(wait_ns) / 1e9)
    return out


def engine_shares(
    before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]], busy_s: float
) -> dict[str, float]:
    """The engine thread (the one that ran most meanwhile): its wait for a core over its runnable time, and
    its run time over the engine's busy time (the batcher's ``busy_s``).

    >>> engine_shares({"7": (1.0, 0.1)}, {"7": (2.8, 0.3), "8": (0.5, 0.0)}, busy_s=2.0)
    {'engine_waiting_for_a_core': 0.1, 'engine_running_while_busy': 0.9}
    """
    delta = {tid: (run - before.get(tid, (0.0, 0.0))[0], wait - before.get(tid, (0.0, 0.0))[1])
             for tid, (run, wait) in after.items()}  # fmt: skip
    run, wait = max(delta.values())
    return {
        "engine_waiting_for_a_core": round(wait / (run + wait), 3),
        "engine_running_while_busy": round(run / busy_s, 3) if busy_s > 0 else float("nan"),
    }


def leg(url: str, model: str, clients: int, seconds: float, stream: bool, pids: dict[str, str]) -> dict[str, Any]:
    """One closed-loop run, sized from a one-round probe to last about ``seconds`` (the probe when one round)."""

    def run(rounds: int) -> tuple[dict[str, Any], dict[str, float], float]:
        make = lambda n: body(model, n, 64, stream)  # noqa: E731
        count = lambda answer: answer["usage"]["completion_tokens"]  # noqa: E731
        busy = replica_stats(model)["busy_s"]
        before, threads, load = cpu_seconds(pids), thread_times(pids["replica"]), os.getloadavg()[0]
        result = asyncio.run(closed_loop(url, make, count, clients, rounds, stream=stream)).as_dict()
        after, threads_after = cpu_seconds(pids), thread_times(pids["replica"])
        busy = replica_stats(model)["busy_s"] - busy
        served = result["requests"] + clients  # the untimed first round is in the CPU time too
        result["cpu_ms_per_request"] = {name: round(1000 * (after[name] - before[name]) / served, 1) for name in after}
        result |= engine_shares(threads, threads_after, busy)
        result["load_average"] = [round(load, 2), round(os.getloadavg()[0], 2)]
        return result, after, load

    result, _, _ = run(1)
    rounds = max(1, round(seconds * result["requests_per_s"] / clients))
    if rounds > 1:
        result, _, _ = run(rounds)
    logger.info("  c=%d %s: %.2f req/s, CPU ms/request %s, engine thread waiting for a core %.3f, running while "
                "busy %.3f, load %s", clients, "stream" if stream else "whole", result["requests_per_s"],
                result["cpu_ms_per_request"], result["engine_waiting_for_a_core"],
                result["engine_running_while_busy"], result["load_average"])  # fmt: skip
    return result


def summarize(legs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the legs of one kind."""
    out: dict[str, Any] = {"requests_per_s": statistics.median(leg["requests_per_s"] for leg in legs)}
    for name in legs[0]["cpu_ms_per_request"]:
        out[f"cpu_ms_{name}"] = statistics.median(leg["cpu_ms_per_request"][name] for leg in legs)
    for key in ("itl_p50_s", "itl_p95_s", "ttft_p50_s", "engine_waiting_for_a_core", "engine_running_while_busy"):
        if key in legs[0]:
            out[key] = statistics.median(leg[key] for leg in legs)
    return out


def markdown(table: dict[str, Any]) -> str:
    lines = [
        "| clients | streamed req/s | whole req/s | streamed / whole | CPU ms per request, streamed (replica / "
        "Gateway / proxy / client) | the same, whole | ITL p50 / p95 (streamed, client) | engine thread waiting "
        "for a core, streamed / whole | engine thread running while busy, streamed / whole |",
        "|---:|---:|---:|---:|---|---|---|---|---|",
    ]
    for c, row in table.items():
        s, w = row["stream"], row["whole"]
        cpu = lambda r: " / ".join(f"{r[f'cpu_ms_{n}']:.0f}" for n in ("replica", "gateway", "proxy", "client"))  # noqa: E731
        lines.append(
            f"| {c} | {s['requests_per_s']:.2f} | {w['requests_per_s']:.2f} | {row['ratio']:.2f} | {cpu(s)} | "
            f"{cpu(w)} | {1000 * s['itl_p50_s']:.0f} / {1000 * s['itl_p95_s']:.0f} ms | "
            f"{s['engine_waiting_for_a_core']:.1%} / {w['engine_waiting_for_a_core']:.1%} | "
            f"{s['engine_running_while_busy']:.1%} / {w['engine_running_while_busy']:.1%} |"
        )
    return "\n".join(lines)


def plot(tables: dict[str, dict[str, Any]], path: Path) -> None:
    """Streamed over whole requests/s, per variant and client count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    names = list(tables)
    clients = list(next(iter(tables.values())))
    width = 0.8 / max(1, len(clients))
    for i, c in enumerate(clients):
        xs = [n + (i - (len(clients) - 1) / 2) * width for n in range(len(names))]
        ax.bar(xs, [tables[name][c]["ratio"] for name in names], width, label=f"{c} clients")
    ax.axhline(0.95, color="grey", linestyle=":", label="0.95 (the goal)")
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("streamed / whole requests/s")
    ax.set_title("What streaming costs (interleaved legs, medians)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--seconds", type=float, default=20.0, help="about how long each leg runs")
    parser.add_argument("--repeats", type=int, default=2, help="legs of each kind per client count")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME[:SETTING=VALUE,@ENV=VALUE...]",
        help="a service to measure (several: one after another in this run); @ marks the Ray instance's environment",
    )
    parser.add_argument("--name", default="stream_cost")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request would be the client's main work
    model = random_checkpoint("gpt2-small", full_vocab=True)
    results: dict[str, Any] = {}
    for spec in args.variant or ["default"]:
        name, _, pairs = spec.partition(":")
        values = dict(pair.split("=", 1) for pair in pairs.split(",") if pair)
        env = {k[1:]: v for k, v in values.items() if k.startswith("@")}
        settings = {k: v for k, v in values.items() if not k.startswith("@")}
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)  # the local Ray instance (raylet, workers, Serve's proxy) inherits it
        try:
            results[name] = measure(args, model, settings) | {"settings": settings, "env": env}
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    config = {k: v for k, v in vars(args).items()} | {"model": str(model)}
    path = write_results(args.name, {"config": config, "results": results})
    plot({name: r["table"] for name, r in results.items()}, RESULTS / f"{args.name}.png")
    print(f"wrote {path}")
    for name, r in results.items():
        print(f"\n{name} {r['settings']} {r['env']}\n{markdown(r['table'])}")


def measure(args: argparse.Namespace, model: Path, settings: dict[str, str]) -> dict[str, Any]:
    """One service: at each client count, streamed and whole legs alternating."""
    legs: dict[str, dict[str, list[dict[str, Any]]]] = {}
    with service(model, args.dtype, args.cpus, settings) as (url, served, ready_s):
        pids = service_pids(served)
        logger.info("service ready in %.1f s; processes %s; load average %s", ready_s, pids, os.getloadavg())
        for c in args.clients:
            legs[str(c)] = {"stream": [], "whole": []}
            for _ in range(args.repeats):
                for kind in ("stream", "whole"):
                    legs[str(c)][kind].append(leg(url, served, c, args.seconds, kind == "stream", pids))
    table: dict[str, Any] = {}
    for c, kinds in legs.items():
        table[c] = {kind: summarize(runs) for kind, runs in kinds.items()}
        table[c]["ratio"] = table[c]["stream"]["requests_per_s"] / table[c]["whole"]["requests_per_s"]
    return {"legs": legs, "table": table}


if __name__ == "__main__":
    main()
