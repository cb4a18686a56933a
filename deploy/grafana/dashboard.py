"""The Grafana dashboard, written from one list of panels: their queries are built from the metric definitions.

    python -m deploy.grafana.dashboard -o deploy/grafana/llm-serve.json

Each :class:`Panel` holds what it plots as :class:`Query` objects (a rate, a quantile of a histogram,
a gauge, an increase over the dashboard's range), from which both the PromQL of the dashboard and
``deploy.grafana.evaluate`` (the same queries over scraped samples, for the README's picture) are made.
Every query filters by the ``$model`` variable; the Prometheus data source is the ``$datasource``
variable, so the dashboard imports into any Grafana.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from observability import metrics

UID = "llm-serve"
OUTPUT = Path(__file__).resolve().parent / "llm-serve.json"
Kind = Literal["rate", "quantile", "gauge", "total", "mean"]


@dataclass(frozen=True)
class Query:
    """``kind`` of ``metric`` summed by ``by``: its rate per second, a quantile of a histogram, a gauge,
    ``total``: a counter's value (per process, the highest in the range), ``mean``: a histogram's mean
    observation per series (each replica's own), averaged over the series seen in the range.

    ``total`` and ``mean`` read values rather than ``increase()``: a replica's cold-start series and a
    first wake are born with their one observation, which ``increase()`` would never see.
    """

    kind: Kind
    metric: str  # the exported name (ray_...)
    by: tuple[str, ...] = ("model",)
    quantile: float | None = None
    legend: str = ""
    where: str = 'model=~"$model"'

    def promql(self) -> str:
        by = ", ".join(self.by)
        if self.kind == "rate":
            return f"sum by ({by}) (rate({self.metric}{{{self.where}}}[$__rate_interval]))"
        if self.kind == "quantile":
            inner = f"sum by (le, {by}) (rate({self.metric}_bucket{{{self.where}}}[$__rate_interval]))"
            return f"histogram_quantile({self.quantile}, {inner})"
        if self.kind == "total":
            return f"sum by ({by}) (max_over_time({self.metric}{{{self.where}}}[$__range]))"
        if self.kind == "mean":
            total = f"last_over_time({self.metric}_sum{{{self.where}}}[$__range])"
            return f"avg by ({by}) ({total} / last_over_time({self.metric}_count{{{self.where}}}[$__range]))"
        return f"sum by ({by}) ({self.metric}{{{self.where}}})"


@dataclass(frozen=True)
class Panel:
    title: str
    unit: str
    queries: tuple[Query, ...]
    description: str = ""
    style: Literal["timeseries", "bargauge"] = "timeseries"
    width: int = 12
    extra: dict[str, Any] = field(default_factory=dict)


def _quantiles(metric: metrics.Metric, by: tuple[str, ...] = ("model",)) -> tuple[Query, ...]:
    names = " ".join("{{%s}}" % label for label in by)  # noqa: UP031 (Grafana's legend braces)
    return tuple(
        Query("quantile", metric.exported, by, q, legend=f"p{round(q * 100)} {names}") for q in (0.5, 0.95, 0.99)
    )


# Serve's own series: the deployment of each model is named after it (the service's own two are left out).
REPLICAS = Query(
    "gauge",
    "ray_serve_autoscaling_target_replicas",
    ("deployment",),
    legend="{{deployment}}",
    where='deployment=~"$model", deployment!~"Gateway|PoolController"',
)

PANELS: tuple[Panel, ...] = (
    Panel(
        "Requests by route and status",
        "reqps",
        (Query("rate", metrics.REQUESTS.exported, ("route", "status"), legend="{{route}} {{status}}"),),
        "HTTP requests answered per second (499: the client left first). Refusals before a model was named "
        "(401, bad bodies) carry model '-': pick All to see them.",
    ),
    Panel(
        "End-to-end latency",
        "s",
        _quantiles(metrics.E2E_LATENCY, ("route",)),
        "From arrival at the Gateway to the last byte of the answer.",
    ),
    Panel(
        "Time to first token (streamed)",
        "s",
        _quantiles(metrics.TTFT),
        "Arrival at the Gateway to the first generated text of a streamed request, a cold start included.",
    ),
    Panel(
        "Inter-token latency (streamed)", "s", _quantiles(metrics.ITL), "Time between tokens as the Gateway sends them."
    ),
    Panel(
        "Queue time in the model replica",
        "s",
        _quantiles(metrics.QUEUE_TIME),
        "How long requests (streamed or not) waited in a model replica before the engine took them.",
    ),
    Panel(
        "Time to first token in the engine (every request)",
        "s",
        _quantiles(metrics.ENGINE_TTFT),
        "Arrival at the model replica to the engine step that made the first token, streamed or whole answers: "
        "the engine's part of the Gateway's time to first token.",
    ),
    Panel(
        "Inter-token latency in the engine (every request)",
        "s",
        _quantiles(metrics.ENGINE_ITL),
        "Time between the engine steps that made a row's consecutive tokens, streamed or whole answers; "
        "the Gateway's panel adds the hops and any coalescing.",
    ),
    Panel(
        "Tokens per second",
        "short",
        (
            Query("rate", metrics.PROMPT_TOKENS.exported, legend="prompt {{model}}"),
            Query("rate", metrics.GENERATION_TOKENS.exported, legend="generated {{model}}"),
        ),
    ),
    Panel(
        "Rows in the batch",
        "short",
        (
            Query("gauge", metrics.RUNNING.exported, legend="running {{model}}"),
            Query("gauge", metrics.WAITING.exported, legend="waiting {{model}}"),
        ),
        "Rows (a prompt's choice each) running in the engine's batch, and waiting in the replica for it.",
    ),
    Panel(
        "Model replicas (Serve's target)",
        "short",
        (REPLICAS,),
        "How many replicas Serve's autoscaler wants for each model (the deployment is named after the model).",
    ),
    Panel(
        "Cold-start phases (mean over the range)",
        "s",
        tuple(
            Query("mean", metric.exported, legend=f"{phase.replace('_', ' ')} {{{{model}}}}")
            for phase, metric in metrics.COLD_START.items()
        ),
        "Each start-up phase of the model replicas seen in the range, averaged over them. Ray exports "
        "histogram sums from bucket midpoints, so these are approximate (to the bucket).",
        style="bargauge",
    ),
    Panel(
        "Grammar compile time (structured output, tools)",
        "s",
        _quantiles(metrics.GRAMMAR_COMPILE, ("model", "cached")),
        "Time to have a constrained request's grammar ready in the replica: a compile (cached=false) or a cache hit.",
    ),
    Panel(
        "Model wakes and rejections",
        "short",
        (
            Query("total", metrics.WAKES.exported, ("model", "cause"), legend="wakes {{model}} ({{cause}})"),
            Query("total", metrics.REJECTED.exported, ("model", "reason"), legend="rejected {{model}} ({{reason}})"),
        ),
        "Since the Gateway started: wakes from zero replicas by cause, requests turned away with 503 by reason.",
        style="bargauge",
    ),
)


def _panel_json(panel: Panel, index: int) -> dict[str, Any]:
    targets = [
        {"datasource": {"type": "prometheus", "uid": "${datasource}"}, "expr": q.promql(), "legendFormat": q.legend,
         "refId": chr(ord("A") + i)}
        for i, q in enumerate(panel.queries)
    ]  # fmt: skip
    body: dict[str, Any] = {
        "id": index + 1,
        "type": panel.style,
        "title": panel.title,
        "description": panel.description,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "gridPos": {"h": 8, "w": panel.width, "x": (index % 2) * 12, "y": (index // 2) * 8},
        "fieldConfig": {"defaults": {"unit": panel.unit}, "overrides": []},
        "targets": targets,
    }
    if panel.style == "bargauge":
        reduce = {"calcs": ["lastNotNull"]}
        body["options"] = {"orientation": "horizontal", "displayMode": "gradient", "reduceOptions": reduce}
        for target in targets:
            target["instant"] = True
    else:
        body["options"] = {"legend": {"displayMode": "list", "placement": "bottom"}, "tooltip": {"mode": "multi"}}
    return body


def dashboard() -> dict[str, Any]:
    """The dashboard as Grafana's JSON model (import it, or provision it as a file)."""
    return {
        "uid": UID,
        "title": "LLM serving (Ray Serve)",
        "description": "The service's metrics from Ray's Prometheus endpoints; see the README's Observability.",
        "tags": ["llm", "ray-serve"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {
            "list": [
                {"name": "datasource", "label": "Prometheus", "type": "datasource", "query": "prometheus"},
                {
                    "name": "model",
                    "label": "Model",
                    "type": "query",
                    "datasource": {"type": "prometheus", "uid": "${datasource}"},
                    "query": {"query": f"label_values({metrics.REQUESTS.exported}, model)", "refId": "models"},
                    "definition": f"label_values({metrics.REQUESTS.exported}, model)",
                    "refresh": 2,
                    "includeAll": True,
                    "multi": True,
                    "allValue": ".*",
                    "current": {"text": "All", "value": "$__all"},
                },
            ]
        },
        "panels": [_panel_json(panel, i) for i, panel in enumerate(PANELS)],
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", type=Path, default=OUTPUT)
    args = parser.parse_args(argv)
    args.output.write_text(render())
    print(f"wrote {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
