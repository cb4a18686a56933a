"""The Grafana dashboard: generated from the metric definitions, filtered by model, and its queries' evaluation."""

from __future__ import annotations

import json
import math

import pytest

from deploy.grafana import dashboard
from deploy.grafana.dashboard import PANELS, Query
from deploy.grafana.evaluate import evaluate, histogram_quantile
from observability import metrics


def test_the_committed_dashboard_is_what_the_panels_generate() -> None:
    # deploy/grafana/llm-serve.json is `python -m deploy.grafana.dashboard`; regenerate it after a change.
    assert dashboard.OUTPUT.read_text() == dashboard.render(), "deploy/grafana/llm-serve.json is stale"


def test_every_query_reads_a_defined_series_for_the_chosen_models() -> None:
    ours = {m.exported: m for m in metrics.ALL}
    board = json.loads(dashboard.render())
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert variables["model"]["includeAll"] and variables["model"]["allValue"] == ".*"
    plotted = set()
    for panel, body in zip(PANELS, board["panels"], strict=True):
        assert body["datasource"]["uid"] == "${datasource}"
        for query, target in zip(panel.queries, body["targets"], strict=True):
            assert "$model" in target["expr"] and target["expr"] == query.promql()
            if query.metric.startswith("ray_serve_"):
                continue  # Serve's own series, beside ours
            metric = ours[query.metric]
            plotted.add(metric.name)
            assert set(query.by) <= set(metric.tags), f"{panel.title}: {metric.name} has no label {query.by}"
            assert (query.kind in ("quantile", "mean")) == (metric.kind == "histogram")
    # Every series the service records is on the dashboard, except per-request token counts and finished rows.
    unplotted = {m.name for m in metrics.ALL} - plotted
    assert unplotted == {
        metrics.REQUEST_PROMPT_TOKENS.name, metrics.REQUEST_GENERATION_TOKENS.name, metrics.ROWS_FINISHED.name
    }  # fmt: skip


def test_promql_of_each_kind() -> None:
    assert Query("rate", "ray_x_total", ("route",)).promql() == (
        'sum by (route) (rate(ray_x_total{model=~"$model"}[$__rate_interval]))'
    )
    assert Query("quantile", "ray_h", quantile=0.95).promql() == (
        'histogram_quantile(0.95, sum by (le, model) (rate(ray_h_bucket{model=~"$model"}[$__rate_interval])))'
    )
    assert "last_over_time(ray_h_sum" in Query("mean", "ray_h").promql()


def test_histogram_quantile_interpolates_as_prometheus_does() -> None:
    buckets = [(0.1, 0.0), (0.5, 10.0), (1.0, 20.0), (math.inf, 20.0)]
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.5)
    assert histogram_quantile(0.25, buckets) == pytest.approx(0.3)
    assert histogram_quantile(0.99, [(1.0, 0.0), (math.inf, 4.0)]) == 1.0  # the highest finite bound
    assert histogram_quantile(0.5, [(1.0, 0.0), (math.inf, 0.0)]) is None  # nothing observed


def test_evaluation_of_rates_quantiles_totals_and_means() -> None:
    scrapes = []
    for t in range(0, 60, 5):
        observed = t // 5  # one observation of 0.3 s every 5 s, from a process born at t=0
        scrapes.append((float(t), [
            ("h_bucket", {"model": "m", "le": "0.25"}, 0.0),
            ("h_bucket", {"model": "m", "le": "0.5"}, float(observed)),
            ("h_bucket", {"model": "m", "le": "+Inf"}, float(observed)),
            ("h_sum", {"model": "m", "replica": "a"}, 0.4),
            ("h_count", {"model": "m", "replica": "a"}, 1.0),
            ("h_sum", {"model": "m", "replica": "b"}, 0.2),
            ("h_count", {"model": "m", "replica": "b"}, 1.0),
            ("wakes_total", {"model": "m", "cause": "request"}, 1.0 if t < 30 else 2.0),
            ("running", {"model": "m"}, 3.0),
        ]))  # fmt: skip
    rate = evaluate(Query("rate", "h_bucket", ("le",)), scrapes, window_s=20)
    assert rate[("+Inf",)][-1] == (55.0, pytest.approx(0.2))
    p50 = evaluate(Query("quantile", "h", quantile=0.5), scrapes, window_s=20)
    assert p50[("m",)][-1][1] == pytest.approx(0.375)
    assert evaluate(Query("mean", "h"), scrapes, 20) == {("m",): [(55.0, pytest.approx(0.3))]}
    assert evaluate(Query("total", "wakes_total", ("cause",)), scrapes, 20) == {("request",): [(55.0, 2.0)]}
    assert evaluate(Query("gauge", "running"), scrapes, 20)[("m",)][0] == (0.0, 3.0)


def test_the_pod_monitor_scrapes_the_metrics_port_of_every_ray_pod() -> None:
    import yaml

    from settings import REPO_ROOT

    monitor = yaml.safe_load((REPO_ROOT / "deploy" / "kuberay" / "podmonitor.yaml").read_text())
    service = yaml.safe_load((REPO_ROOT / "deploy" / "kuberay" / "rayservice.yaml").read_text())
    assert monitor["kind"] == "PodMonitor" and monitor["apiVersion"] == "monitoring.coreos.com/v1"
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    selector = monitor["spec"]["selector"]["matchLabels"]
    cluster = service["spec"]["rayClusterConfig"]
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        labels = {**group["template"]["metadata"]["labels"], "ray.io/is-ray-node": "yes"}  # KubeRay adds the last
        assert selector.items() <= labels.items()
        ports = {p["name"]: p["containerPort"] for c in group["template"]["spec"]["containers"] for p in c["ports"]}
        assert str(ports[endpoint["port"]]) == group["rayStartParams"]["metrics-export-port"]


def test_the_readme_shows_the_picture_a_scrape_and_a_401() -> None:
    from settings import REPO_ROOT
    from tests.docs import section

    _, observability = section("Observability")
    for path in ("benchmarks/results/dashboard.png", "deploy/grafana/llm-serve.json", "deploy/kuberay/podmonitor.yaml"):
        assert path in observability and (REPO_ROOT / path).is_file()
    for metric in metrics.ALL:
        assert metric.exported in observability or "cold_start_" in metric.name, f"{metric.exported} undocumented"
    assert "--metrics-export-port" in observability and "kind: PodMonitor" in observability
    _, security = section("Security")
    assert "HTTP/1.1 401 Unauthorized" in security and "www-authenticate: Bearer" in security
