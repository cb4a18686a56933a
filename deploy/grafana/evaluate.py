"""The dashboard's queries evaluated over scraped samples, as Prometheus would, and its panels drawn.

Without a Prometheus or a Grafana at hand, ``benchmarks/dashboard_run.py`` scrapes a node's metrics
endpoint every few seconds; this module computes each :class:`~deploy.grafana.dashboard.Query` over
those scrapes (``rate`` over a window, ``histogram_quantile`` with Prometheus' linear interpolation,
gauges, totals and means) and draws every panel with matplotlib.

    >>> from deploy.grafana.dashboard import Query
    >>> scrapes = [(t, [("c_total", {"model": "m"}, 2.0 * t)]) for t in range(0, 40, 5)]
    >>> evaluate(Query("rate", "c_total"), scrapes, window_s=10)[("m",)][-1]
    (35, 2.0)
"""

from __future__ import annotations

import itertools
import math
import re
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from deploy.grafana.dashboard import PANELS, Query

Sample = tuple[str, dict[str, str], float]
Scrape = tuple[float, list[Sample]]  # (seconds since the start, samples)
Series = dict[tuple[str, ...], list[tuple[float, float]]]  # group labels -> (t, value) points


_MATCHER = re.compile(r'\s*(\w+)\s*(=~|!~|!=|=)\s*"(.*)"\s*')


def _matches(labels: dict[str, str], query: Query) -> bool:
    """The query's label matchers, as Prometheus reads them, with ``$model`` at All (any value, label present).

    >>> from deploy.grafana.dashboard import REPLICAS  # deployment=~"$model", deployment!~"Gateway|PoolController"
    >>> [_matches({"deployment": d}, REPLICAS) for d in ("mini", "Gateway", "PoolController")]
    [True, False, False]
    """
    for clause in query.where.split(","):
        matched = _MATCHER.fullmatch(clause)
        if matched is None:
            raise ValueError(f"unreadable label matcher {clause!r} in {query.metric}")
        label, op, value = matched.groups()
        actual = labels.get(label)
        if value == "$model":
            if actual is None:
                return False
            continue
        found = actual or ""
        refused = {
            "=": found != value,
            "!=": found == value,
            "=~": not re.fullmatch(value, found),
            "!~": bool(re.fullmatch(value, found)),
        }[op]
        if refused:
            return False
    return True


def _by_series(scrapes: Sequence[Scrape], name: str, query: Query) -> dict[tuple, list[tuple[float, float]]]:
    """Each series of ``name`` (its full label set) as (t, value) points."""
    series: dict[tuple, list[tuple[float, float]]] = defaultdict(list)
    for t, samples in scrapes:
        for sample, labels, value in samples:
            if sample == name and _matches(labels, query):
                series[tuple(sorted(labels.items()))].append((t, value))
    return series


def _increase(points: list[tuple[float, float]], t: float, window_s: float) -> float | None:
    inside = [(pt, v) for pt, v in points if t - window_s <= pt <= t]
    if len(inside) < 2:
        return None
    total = 0.0
    for (_, before), (_, after) in itertools.pairwise(inside):
        total += after - before if after >= before else after  # a counter reset: the process restarted
    return total / (inside[-1][0] - inside[0][0]) * window_s


def _group(labels: tuple, by: Sequence[str]) -> tuple[str, ...]:
    found = dict(labels)
    return tuple(found.get(label, "") for label in by)


def evaluate(query: Query, scrapes: Sequence[Scrape], window_s: float) -> Series:
    """``query`` at every scrape's time (a ``total`` or ``mean``: once, over all of them)."""
    times = [t for t, _ in scrapes]
    out: Series = defaultdict(list)
    if query.kind in ("rate", "quantile"):
        name = f"{query.metric}_bucket" if query.kind == "quantile" else query.metric
        by = ("le", *query.by) if query.kind == "quantile" else query.by
        series = _by_series(scrapes, name, query)
        for t in times:
            sums: dict[tuple[str, ...], float] = defaultdict(float)
            for labels, points in series.items():
                increase = _increase(points, t, window_s)
                if increase is not None:
                    sums[_group(labels, by)] += increase / window_s
            if query.kind == "rate":
                for group, value in sums.items():
                    out[group].append((t, value))
                continue
            buckets: dict[tuple[str, ...], list[tuple[float, float]]] = defaultdict(list)
            for (le, *group), value in sums.items():
                buckets[tuple(group)].append((math.inf if le == "+Inf" else float(le), value))
            for group, bounds in buckets.items():
                value = histogram_quantile(query.quantile or 0.5, bounds)
                if value is not None:
                    out[group].append((t, value))
    elif query.kind == "gauge":
        series = _by_series(scrapes, query.metric, query)
        for t, _samples in scrapes:
            sums = defaultdict(float)
            seen = False
            for labels, points in series.items():
                for pt, value in points:
                    if pt == t:
                        sums[_group(labels, query.by)] += value
                        seen = True
            if seen:
                for group, value in sums.items():
                    out[group].append((t, value))
    elif query.kind == "total":
        series = _by_series(scrapes, query.metric, query)
        totals: dict[tuple[str, ...], float] = defaultdict(float)
        for labels, points in series.items():
            totals[_group(labels, query.by)] += max(v for _, v in points)
        for group, value in totals.items():
            out[group].append((times[-1], value))
    else:  # mean: each series' last sum / count, averaged per group
        sums_ = _by_series(scrapes, f"{query.metric}_sum", query)
        counts = _by_series(scrapes, f"{query.metric}_count", query)
        per_group: dict[tuple[str, ...], list[float]] = defaultdict(list)
        for labels, points in sums_.items():
            count = counts.get(labels)
            if count and count[-1][1] > 0:
                per_group[_group(labels, query.by)].append(points[-1][1] / count[-1][1])
        for group, values in per_group.items():
            out[group].append((times[-1], sum(values) / len(values)))
    return dict(out)


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """Prometheus' histogram_quantile over (upper bound, cumulative rate) pairs.

    >>> histogram_quantile(0.5, [(1.0, 2.0), (2.0, 4.0), (math.inf, 4.0)])
    1.0
    """
    buckets = sorted(buckets)
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return lower_bound  # Prometheus returns the highest finite bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / max(count - lower_count, 1e-12)
        lower_bound, lower_count = bound, count
    return buckets[-2][0] if len(buckets) > 1 else None


def draw(scrapes: Sequence[Scrape], path: Path, window_s: float, title: str, marks: dict[str, float]) -> None:
    """Every panel of the dashboard, in its grid order; ``marks``: events to draw as vertical lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = math.ceil(len(PANELS) / 2)
    fig, axes = plt.subplots(rows, 2, figsize=(15, 3.3 * rows))
    for ax, panel in zip(axes.flat, PANELS, strict=False):
        ax.set_title(panel.title, fontsize=10, loc="left")
        if panel.style == "bargauge":
            _bars(ax, panel.queries, scrapes, window_s)
        else:
            _lines(ax, panel.queries, scrapes, window_s, marks)
        ax.tick_params(labelsize=8)
        ax.grid(True, alpha=0.3)
        if panel.unit == "s":
            ax.set_xlabel("") if panel.style == "timeseries" else None
    for ax in list(axes.flat)[len(PANELS) :]:
        ax.axis("off")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _legend(query: Query, group: tuple[str, ...]) -> str:
    text = query.legend
    for label, value in zip(query.by, group, strict=False):
        text = text.replace("{{%s}}" % label, value)  # noqa: UP031 (Grafana's legend braces)
    return text


def _lines(ax: Any, queries: Sequence[Query], scrapes: Sequence[Scrape], window_s: float, marks: dict) -> None:
    drawn = 0
    times = [t for t, _ in scrapes]
    for query in queries:
        for group, points in sorted(evaluate(query, scrapes, window_s).items()):
            if points:
                values = dict(points)  # no value at a time: a gap in the line, as Grafana draws it
                ax.plot(times, [values.get(t, math.nan) for t in times], label=_legend(query, group), linewidth=1.2)
                drawn += 1
    ax.set_xlim(times[0], times[-1])
    for text, t in marks.items():
        ax.axvline(t, color="grey", linestyle=":", linewidth=0.8)
        ax.annotate(text, (t, 1), xycoords=("data", "axes fraction"), fontsize=7, rotation=90, va="top", ha="right")
    ax.set_xlabel("seconds", fontsize=8)
    if drawn:
        ax.legend(fontsize=7, loc="upper left", ncols=2)


def _bars(ax: Any, queries: Sequence[Query], scrapes: Sequence[Scrape], window_s: float) -> None:
    labels, values = [], []
    for query in queries:
        for group, points in sorted(evaluate(query, scrapes, window_s).items()):
            labels.append(_legend(query, group))
            values.append(points[-1][1])
    ax.barh(labels[::-1], values[::-1], color="tab:blue")
    for y, value in enumerate(values[::-1]):
        ax.annotate(f"{value:.3g}", (value, y), fontsize=8, va="center", xytext=(3, 0), textcoords="offset points")
