"""The dashboard's panels over a real run: a local service under traffic, a cold start, a burst, scale to zero.

    python -m benchmarks.dashboard_run [--model PATH] [--load-s 80]

Serves the embedded model (or ``--model``) at zero replicas on one local Ray instance, scrapes the
node's Prometheus endpoint every ``--every`` seconds while a schedule runs (idle, streamed and whole
answers from 4 clients, which wake the model; a burst of 40 at once, past the replica's limits; idle
until the model scales to zero; a second wake), then evaluates the Grafana dashboard's own queries
(``deploy.grafana``) over the scrapes and draws its panels. Writes benchmarks/results/dashboard.png,
dashboard.json (each panel's series) and dashboard_scrape.txt (an excerpt of the last scrape).
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import ray
from prometheus_client.parser import text_string_to_metric_families
from ray import serve

from benchmarks.common import PROMPTS, RESULTS, write_results
from deploy.grafana.dashboard import PANELS
from deploy.grafana.evaluate import Scrape, draw, evaluate
from ray_serve_app import build_graph
from settings import DEFAULT_MODEL_DIR, build_settings
from testing.http import ok
from testing.polling import wait_for
from testing.serve import local_serve, replica_states

logger = logging.getLogger("dashboard_run")
APP = "llm"
SCRAPES = Path(__file__).resolve().parent / ".cache" / "dashboard_scrapes.json.gz"  # for --redraw
KEEP = ("model", "route", "status", "le", "cause", "reason", "deployment", "finished_reason", "replica", "WorkerId")
SETTINGS = {
    "MIN_REPLICAS": "0",
    "MAX_REPLICAS": "1",
    "IDLE_TIMEOUT_S": "30",
    "MAX_ONGOING_REQUESTS": "8",
    "MAX_QUEUED_REQUESTS": "8",
    "MAX_NEW_TOKENS": "48",
    "TEMPERATURE": "0.7",
}


class Scraper(threading.Thread):
    """Scrapes the node's metrics endpoint every ``every`` seconds: our series and Serve's replica target."""

    def __init__(self, url: str, t0: float, every: float) -> None:
        super().__init__(daemon=True)
        self.url, self.t0, self.every = url, t0, every
        self.scrapes: list[Scrape] = []
        self.last_text = ""
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                text = httpx.get(self.url, timeout=10).text
            except httpx.HTTPError:
                logger.warning("scrape failed", exc_info=True)
            else:
                self.last_text = text
                samples = [
                    (s.name, {k: v for k, v in s.labels.items() if k in KEEP}, s.value)
                    for family in text_string_to_metric_families(text)
                    for s in family.samples
                    if s.name.startswith("ray_llm_serve_") or s.name == "ray_serve_autoscaling_target_replicas"
                ]
                self.scrapes.append((round(time.monotonic() - self.t0, 2), samples))
            self.stop.wait(self.every)


def request(client: httpx.Client, url: str, rng: random.Random) -> int:
    prompt = rng.choice(PROMPTS)
    if rng.random() < 0.5:
        body = {"model": "m", "prompt": prompt, "max_tokens": rng.randint(16, 48), "stream": True}
        with client.stream("POST", f"{url}/v1/completions", json=body) as response:
            for _ in response.iter_lines():
                pass
            return response.status_code
    body = {"prompt": prompt, "generation_kwargs": {"max_new_tokens": rng.randint(8, 32)}}
    return client.post(f"{url}/generate", json=body).status_code


def clients(url: str, n: int, seconds: float, seed: int) -> list[int]:
    """``n`` closed-loop clients for ``seconds``; their statuses."""
    deadline = time.monotonic() + seconds
    statuses: list[int] = []

    def loop(i: int) -> None:
        rng = random.Random(seed + i)
        with httpx.Client(timeout=300) as client:
            while time.monotonic() < deadline:
                statuses.append(request(client, url, rng))

    with ThreadPoolExecutor(n) as pool:
        list(pool.map(loop, range(n)))
    return statuses


def burst(url: str, n: int) -> list[int]:
    def one(i: int) -> int:
        with httpx.Client(timeout=300) as client:
            return request(client, url, random.Random(1000 + i))

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(one, range(n)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument("--load-s", type=float, default=80.0)
    parser.add_argument("--every", type=float, default=2.0, help="seconds between scrapes")
    parser.add_argument("--window", type=float, default=20.0, help="rate window of the panels (seconds)")
    parser.add_argument("--redraw", action="store_true", help=f"draw again from {SCRAPES} (no run)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if args.redraw:
        saved = json.loads(gzip.decompress(SCRAPES.read_bytes()))
        report(saved["scrapes"], saved["marks"], saved["statuses"], saved["last"], args)
        return

    with local_serve(num_cpus=2, metrics_report_interval_ms=1000) as port:
        settings = build_settings({**SETTINGS, "MODEL_ID": str(args.model), "SERVED_MODEL_NAME": "m"})
        serve.run(build_graph(settings), name=APP, route_prefix="/", blocking=False)
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: ok(f"{url}/healthz"), timeout=120)
        (node,) = [n for n in ray.nodes() if n["Alive"]]
        metrics_url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
        t0 = time.monotonic()
        scraper = Scraper(metrics_url, t0, args.every)
        scraper.start()
        marks: dict[str, float] = {}
        record: dict[str, Any] = {}

        def mark(name: str) -> None:
            marks[name] = round(time.monotonic() - t0, 1)
            logger.info("%s at %.1fs", name, marks[name])

        time.sleep(10)  # idle at zero replicas: the first panels' baseline
        mark("load (wakes the model)")
        record["load"] = clients(url, 4, args.load_s, seed=1)
        mark("burst of 40")
        record["burst"] = burst(url, 40)
        mark("idle")
        wait_for(lambda: replica_states("m", "m") == {}, timeout=240, interval=1)  # the pool's app for model m
        mark("at zero")
        time.sleep(6)
        mark("second wake")
        record["wake"] = clients(url, 2, 20, seed=7)
        time.sleep(12)  # the last samples reach the endpoint
        scraper.stop.set()
        scraper.join()

    statuses = {phase: {str(s): v.count(s) for s in sorted(set(v))} for phase, v in record.items()}
    logger.info("statuses: %s", statuses)
    saved = {"scrapes": scraper.scrapes, "marks": marks, "statuses": statuses, "last": scraper.last_text}
    SCRAPES.parent.mkdir(parents=True, exist_ok=True)
    SCRAPES.write_bytes(gzip.compress(json.dumps(saved).encode()))
    report(scraper.scrapes, marks, statuses, scraper.last_text, args)


def report(scrapes: list[Scrape], marks: dict, statuses: dict, last_text: str, args: argparse.Namespace) -> None:
    """The panels' picture and series, and an excerpt of the last scrape."""
    path = RESULTS / "dashboard.png"
    title = (
        f"Dashboard panels from a real run ({args.model.name}, 2 CPUs): Prometheus text scraped every "
        f"{args.every:g} s, the dashboard's queries evaluated in Python ({args.window:g} s rate window)"
    )
    draw(scrapes, path, args.window, title, marks)
    panels = {
        panel.title: {
            q.legend: {" ".join(k): v for k, v in evaluate(q, scrapes, args.window).items()} for q in panel.queries
        }
        for panel in PANELS
    }
    write_results("dashboard", {"settings": SETTINGS, "marks": marks, "statuses": statuses, "panels": panels})
    excerpt = [line for line in last_text.splitlines() if "ray_llm_serve_" in line]
    (RESULTS / "dashboard_scrape.txt").write_text("\n".join(excerpt) + "\n")
    logger.info("wrote %s, dashboard.json and dashboard_scrape.txt", path)


if __name__ == "__main__":
    main()
