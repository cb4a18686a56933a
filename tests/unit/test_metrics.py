"""The metric definitions obey Ray's rules, and the recorders write what their call sites mean."""

from __future__ import annotations

import logging

import pytest
from ray.util.metrics import _VALID_METRIC_NAME_RE

from observability import metrics
from observability.metrics import ALL, MemorySink, use_sink

# Labels ray.serve.metrics adds itself and refuses from callers (ray/serve/metrics.py).
SERVE_RESERVED = {"deployment", "replica", "application"}


@pytest.mark.parametrize("metric", ALL, ids=lambda m: m.name)
def test_every_metric_follows_rays_naming_and_tag_rules(metric: metrics.Metric) -> None:
    assert _VALID_METRIC_NAME_RE.match(metric.name), "Ray discards a metric with this name"
    assert ":" not in metric.name, "Ray deprecates colons in metric names"
    assert metric.name.startswith(metrics.PREFIX)
    assert isinstance(metric.tags, tuple) and all(isinstance(t, str) and t for t in metric.tags)
    assert not SERVE_RESERVED & set(metric.tags), "ray.serve.metrics reserves these labels"
    assert len(set(metric.tags)) == len(metric.tags)
    assert metric.description
    if metric.kind == "histogram":
        assert metric.buckets and all(b > 0 for b in metric.buckets), "Ray needs positive boundaries"
        assert list(metric.buckets) == sorted(set(metric.buckets)), "boundaries must increase"
    else:
        assert not metric.buckets


def test_names_are_unique_and_vllms_where_the_meaning_is_the_same() -> None:
    names = [m.name for m in ALL]
    assert len(names) == len(set(names))
    exported = {m.exported for m in ALL}
    for vllm in ("time_to_first_token_seconds", "inter_token_latency_seconds", "e2e_request_latency_seconds",
                 "request_queue_time_seconds", "num_requests_running", "num_requests_waiting"):  # fmt: skip
        assert f"ray_llm_serve_{vllm}" in exported
    assert {"ray_llm_serve_prompt_tokens_total", "ray_llm_serve_generation_tokens_total"} <= exported
    assert len(metrics.TTFT.buckets) == 22 and metrics.TTFT.buckets[-1] == 2560.0  # vLLM's lists
    assert len(metrics.ITL.buckets) == 19 and len(metrics.E2E_LATENCY.buckets) == 21
    assert metrics.TOKEN_BUCKETS[:4] == (1.0, 2.0, 5.0, 10.0)
    assert set(metrics.COLD_START) == {"process_start", "imports", "model_code", "weights", "warmup"}


def test_request_done_counts_by_route_model_and_status_and_times_it() -> None:
    with use_sink(MemorySink()) as sink:
        metrics.request_done("/generate", "tiny", 200, 0.5)
        metrics.request_done("/generate", "tiny", 200, 1.5)
        metrics.request_done("/generate", "-", 401, 0.01)
    assert sink.total(metrics.REQUESTS, route="/generate", model="tiny", status="200") == 2
    assert sink.total(metrics.REQUESTS, status="401", model="-") == 1
    assert sorted(sink.observations(metrics.E2E_LATENCY, model="tiny")) == [0.5, 1.5]


def test_inter_token_latency_gives_each_token_of_a_chunk_its_share() -> None:
    with use_sink(MemorySink()) as sink:
        metrics.inter_token("tiny", 0.3, tokens=3)
        metrics.inter_token("tiny", 0.1)
    assert sink.observations(metrics.ITL) == pytest.approx([0.1, 0.1, 0.1, 0.1])


def test_replica_recorders() -> None:
    report = {"process_start_s": 1.2, "imports_s": 2.5, "model_code_s": 1.0, "weights_s": 0.2, "warmup_s": None}
    with use_sink(MemorySink()) as sink:
        metrics.cold_start("tiny", report)
        metrics.prompt_tokens("tiny", 7)
        metrics.prompt_tokens("tiny", 0)  # nothing recorded for nothing
        metrics.generated_tokens("tiny", 5)
        metrics.request_finished("tiny", 5, {"stop": 1, "cancelled": 2, "length": 0})
        metrics.batch("tiny", running=3, waiting=1)
        metrics.batch("tiny", running=0, waiting=0)
    assert sink.observations(metrics.COLD_START["imports"], model="tiny") == [2.5]
    assert sink.observations(metrics.COLD_START["warmup"]) == []  # an unmeasured phase is not a zero
    assert sink.total(metrics.PROMPT_TOKENS) == 7 and sink.observations(metrics.REQUEST_PROMPT_TOKENS) == [7]
    assert sink.total(metrics.GENERATION_TOKENS) == 5
    assert sink.total(metrics.ROWS_FINISHED, finished_reason="abort") == 2
    assert sink.total(metrics.ROWS_FINISHED, finished_reason="stop") == 1
    assert sink.total(metrics.ROWS_FINISHED, finished_reason="length") == 0
    assert sink.total(metrics.RUNNING) == 0  # a gauge keeps the last value


def test_a_failing_metric_never_fails_the_caller_and_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    class Broken:
        def record(self, *args: object) -> None:
            raise TypeError("bad tag")

    with use_sink(Broken()), caplog.at_level(logging.WARNING, logger="ray.serve"):
        metrics.model_woke("tiny", "request")
        metrics.model_woke("tiny", "request")
    assert [r.getMessage() for r in caplog.records] == [f"could not record metric {metrics.WAKES.name}"]


def test_the_ray_sink_makes_each_instrument_once_as_defined() -> None:
    # Outside a Ray cluster Ray's instruments record nothing, but they are built and checked as in a replica.
    sink = metrics.RaySink()
    for metric in ALL:
        tags = dict.fromkeys(metric.tags, "x")
        sink.record(metric, 1.0, tags)
        sink.record(metric, 2.0, tags)
    assert set(sink._instruments) == {m.name for m in ALL}
    ttft = sink._instruments[metrics.TTFT.name]
    assert ttft.info["boundaries"] == list(metrics.TTFT_BUCKETS) and ttft.info["tag_keys"] == ("route", "model")
    with pytest.raises(ValueError, match="Missing value for tag key"):
        sink.record(metrics.REQUESTS, 1, {"route": "/generate"})
