"""Locust users for the service: a realistic mix of ``/generate`` calls, each answer checked.

Run from the repository root (settings in ``loadtest/locust.conf``, reports in ``loadtest/results/``)::

    locust --config loadtest/locust.conf --cold-start

Requests are named by kind (``single short``, ``single long``, ``batch``, ``single stop``,
``single defaults``) so each has its own row. With ``--cold-start`` the run waits until the model
deployment is at zero replicas before any user starts; every request sent before the first answer
then waited for a replica to start, and is reported under ``... [cold start]`` as well as in the
Aggregated row, so the cold start shows in the percentiles.
"""

from __future__ import annotations

import json
import logging
import random
import sys
import time
from pathlib import Path
from typing import Any

from locust import HttpUser, between, events, task
from locust.env import Environment
from locust.runners import MasterRunner, WorkerRunner

# locust imports this file by path; make the repository's packages importable from any directory.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from loadtest.checks import format_summary, problems, request_mix, summary_rows

logger = logging.getLogger(__name__)


class ColdStart:
    """Whether the run began with the model at zero replicas, and whether an answer has come since."""

    began_at_zero = False
    answered = False
    not_at_zero = ""  # set when --cold-start gave up waiting for zero replicas


@events.init_command_line_parser.add_listener
def _add_arguments(parser: Any) -> None:
    parser.add_argument(
        "--cold-start",
        action="store_true",
        default=False,
        help="Wait until the model is at zero replicas before starting, so the first requests pay the cold start.",
    )
    parser.add_argument("--cold-start-wait", type=float, default=300.0, help="Longest wait for zero replicas, seconds.")
    parser.add_argument("--request-timeout", type=float, default=310.0, help="Client timeout per request, seconds.")


@events.init.add_listener
def _prepare(environment: Environment, **_: Any) -> None:
    """Create the report folders, and read the model's state from /healthz (which never wakes it).

    This runs before the run-time clock starts, so waiting for zero replicas costs no test time.
    """
    options = environment.parsed_options
    for path in (getattr(options, "csv_prefix", None), getattr(options, "html_file", None)):
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
    if isinstance(environment.runner, MasterRunner):
        return  # workers send the requests; each reads the state itself
    host = environment.host or ""
    wait_s = options.cold_start_wait if options.cold_start else 0.0
    started = time.monotonic()
    state = _generator_state(host)
    while state != "scaled_to_zero" and time.monotonic() - started < wait_s:
        time.sleep(min(2.0, max(0.0, wait_s - (time.monotonic() - started))))
        state = _generator_state(host)
    ColdStart.began_at_zero = state == "scaled_to_zero"
    logger.info("model state before the first user starts: %s", state)
    if options.cold_start and not ColdStart.began_at_zero:
        ColdStart.not_at_zero = f"model still {state} after {wait_s:g}s; lower IDLE_TIMEOUT_S or wait longer"


@events.test_start.add_listener
def _report_not_at_zero(environment: Environment, **_: Any) -> None:
    # Statistics are cleared when the test starts, so a failed precondition is recorded now.
    if ColdStart.not_at_zero:
        environment.events.request.fire(
            request_type="GET",
            name="/healthz [wait for zero replicas]",
            response_time=0,
            response_length=0,
            exception=RuntimeError(ColdStart.not_at_zero),
        )


@events.quitting.add_listener
def _write_summary(environment: Environment, **_: Any) -> None:
    """Requests, failures and percentiles per request name, once every request has finished.

    Locust's CSV is refreshed once a second, so it can miss requests that ended in the last second
    (those a cold start held past --run-time, say); this summary is taken at exit and misses none.
    """
    if environment.runner is None or isinstance(environment.runner, WorkerRunner):
        return
    rows = summary_rows(environment.runner.stats)
    table = format_summary(rows)
    logger.info("summary:\n%s", table)
    prefix = getattr(environment.parsed_options, "csv_prefix", None)
    if prefix:
        Path(f"{prefix}_summary.json").write_text(json.dumps(rows, indent=2) + "\n")
        Path(f"{prefix}_summary.md").write_text(table + "\n")


def _generator_state(host: str) -> str:
    import requests

    try:
        return requests.get(f"{host}/healthz", timeout=10).json()["models"][0]["state"]
    except (requests.RequestException, ValueError, KeyError, TypeError) as exc:
        return f"unreachable ({exc.__class__.__name__})"


class GenerateUser(HttpUser):
    """One client: posts a request from the mix, checks the answer, thinks 0.5-2 s, repeats."""

    wait_time = between(0.5, 2.0)

    def on_start(self) -> None:
        self.rng = random.Random()

    @task
    def generate(self) -> None:
        name, body = request_mix(self.rng)
        if ColdStart.began_at_zero and not ColdStart.answered:
            name += " [cold start]"
        timeout = self.environment.parsed_options.request_timeout
        with self.client.post("/generate", json=body, name=name, timeout=timeout, catch_response=True) as response:
            if response.status_code != 200:
                detail = response.text[:200] if response.status_code else repr(response.error)
                response.failure(f"HTTP {response.status_code}: {detail}")
                return
            try:
                answer = response.json()
            except ValueError:
                response.failure("body is not JSON")
                return
            found = problems(answer, body)
            if found:
                response.failure("; ".join(found))
                return
            ColdStart.answered = True
            response.success()
