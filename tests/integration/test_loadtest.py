"""The documented load test, run headless for a few seconds against the live service (embedded model)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from settings import REPO_ROOT
from tests.integration.conftest import Service, deploy, replica_states
from tests.raycluster import clean_env

LOCUST = str(Path(sys.executable).with_name("locust"))


@pytest.fixture(scope="module")
def service(serve_port: int) -> Service:
    # No MODEL_ID: the embedded default model, as the README's run uses.
    return deploy(serve_port, {"MIN_REPLICAS": "0", "MAX_REPLICAS": "1", "REQUEST_TIMEOUT_S": "120"})


def test_locust_run_from_zero_replicas_has_no_failures(service: Service, tmp_path: Path) -> None:
    assert replica_states() == {}, "the model must start at zero replicas for the cold-start scenario"
    # The README's command (loadtest/locust.conf), shortened, with the reports in tmp_path.
    command = [
        LOCUST, "--config", "loadtest/locust.conf", "--cold-start", "--cold-start-wait", "10",
        "--host", service.url, "-u", "4", "-r", "4", "-t", "6s",
        "--csv", str(tmp_path / "run"), "--html", str(tmp_path / "report.html"),
    ]  # fmt: skip
    result = subprocess.run(command, cwd=REPO_ROOT, env=clean_env(), capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr

    # The summary is written at exit; locust's own CSV may miss the requests of the last second.
    rows = {row["name"]: row for row in json.loads((tmp_path / "run_summary.json").read_text())}
    total = rows["Aggregated"]
    assert total["failures"] == 0, output
    assert result.returncode == 0, output
    assert total["requests"] >= 4, output  # at least each user's first request
    cold = [name for name in rows if name.endswith("[cold start]")]
    assert cold, f"no request was reported as waiting for the cold start: {sorted(rows)}"
    assert rows[cold[0]]["p50_ms"] > 0
    for report in ("run_stats.csv", "run_failures.csv", "report.html"):
        assert (tmp_path / report).stat().st_size > 0, report
