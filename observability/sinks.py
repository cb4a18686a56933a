"""Where metrics go: Ray Serve's metrics in the service, memory in tests. See ``observability.metrics``."""

from __future__ import annotations

import contextlib
import logging
from collections import defaultdict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

logger = logging.getLogger("ray.serve")


@dataclass(frozen=True)
class Metric:
    """One series family: its name (without Ray's ``ray_`` prefix), kind, labels and buckets."""

    name: str
    kind: Literal["counter", "gauge", "histogram"]
    description: str
    tags: tuple[str, ...]
    buckets: tuple[float, ...] = ()

    @property
    def exported(self) -> str:
        """The name at the Prometheus endpoint (histograms add ``_bucket``, ``_sum``, ``_count``)."""
        return f"ray_{self.name}" + ("_total" if self.kind == "counter" else "")


class Sink(Protocol):
    def record(self, metric: Metric, value: float, tags: Mapping[str, str]) -> None: ...


class RaySink:
    """Records into ``ray.serve.metrics``: one instrument per metric, made on first use in this process.

    Made lazily so that the instrument is created inside the replica (where Serve's labels are known)
    and a process that imports this module without recording (the graph builder) creates none.
    """

    def __init__(self) -> None:
        self._instruments: dict[str, Any] = {}

    def _instrument(self, metric: Metric) -> Any:
        instrument = self._instruments.get(metric.name)
        if instrument is None:
            from ray.serve import metrics as serve_metrics

            if metric.kind == "histogram":
                instrument = serve_metrics.Histogram(
                    metric.name, metric.description, boundaries=list(metric.buckets), tag_keys=metric.tags
                )
            elif metric.kind == "counter":
                instrument = serve_metrics.Counter(metric.name, metric.description, tag_keys=metric.tags)
            else:
                instrument = serve_metrics.Gauge(metric.name, metric.description, tag_keys=metric.tags)
            self._instruments[metric.name] = instrument
        return instrument

    def record(self, metric: Metric, value: float, tags: Mapping[str, str]) -> None:
        instrument = self._instrument(metric)
        if metric.kind == "histogram":
            instrument.observe(value, dict(tags))
        elif metric.kind == "counter":
            instrument.inc(value, dict(tags))
        else:
            instrument.set(value, dict(tags))


@dataclass
class MemorySink:
    """Keeps what was recorded (tests): counter totals and gauge values, histogram observations."""

    values: dict[tuple[str, tuple[tuple[str, str], ...]], float] = field(default_factory=lambda: defaultdict(float))
    observed: dict[tuple[str, tuple[tuple[str, str], ...]], list[float]] = field(
        default_factory=lambda: defaultdict(list)
    )

    def record(self, metric: Metric, value: float, tags: Mapping[str, str]) -> None:
        key = (metric.name, tuple(sorted(tags.items())))
        if metric.kind == "histogram":
            self.observed[key].append(value)
        elif metric.kind == "counter":
            self.values[key] += value
        else:
            self.values[key] = value

    def total(self, metric: Metric, **tags: str) -> float:
        """Sum of a counter (or gauge) over the series whose labels include ``tags``."""
        return sum(v for (name, labels), v in self.values.items() if name == metric.name and _has(labels, tags))

    def observations(self, metric: Metric, **tags: str) -> list[float]:
        return [
            v for (name, labels), vs in self.observed.items() if name == metric.name and _has(labels, tags) for v in vs
        ]


def _has(labels: tuple[tuple[str, str], ...], tags: Mapping[str, str]) -> bool:
    return set(tags.items()) <= set(labels)


_sink: Sink = RaySink()
_failed: set[str] = set()


@contextlib.contextmanager
def use_sink(sink: Sink) -> Iterator[Sink]:
    """Record into ``sink`` inside the block (tests)."""
    global _sink
    previous, _sink = _sink, sink
    try:
        yield sink
    finally:
        _sink = previous


def record(metric: Metric, value: float, **tags: str) -> None:
    try:
        _sink.record(metric, float(value), tags)
    except Exception:  # a metric must never fail a request
        if metric.name not in _failed:
            _failed.add(metric.name)
            logger.warning("could not record metric %s", metric.name, exc_info=True)
