"""A closed-loop HTTP load generator: C clients, each sending its next request when the last returns."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from benchmarks.common import percentile


@dataclass
class LoadResult:
    concurrency: int
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    tokens: int = 0
    errors: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        n = len(self.latencies)
        return {
            "concurrency": self.concurrency,
            "seconds": round(self.seconds, 3),
            "requests": n,
            "errors": self.errors,
            "requests_per_s": n / self.seconds if self.seconds else 0.0,
            "tokens_per_s": self.tokens / self.seconds if self.seconds else 0.0,
            "p50_s": percentile(self.latencies, 50),
            "p95_s": percentile(self.latencies, 95),
        }


async def closed_loop(
    url: str,
    make_body: Callable[[int], dict[str, Any]],
    count_tokens: Callable[[dict[str, Any]], int],
    concurrency: int,
    rounds: int,
    timeout_s: float = 900,
) -> LoadResult:
    """Each of ``concurrency`` clients sends one untimed request, then ``rounds`` timed ones.

    Timing starts when every client has had its first answer (the system is loaded), and ends
    with the last answer; throughput is timed answers over that span. Counting whole rounds, rather
    than answers inside a time window, stays exact when clients move in lockstep (equal-length
    requests batched together finish together).
    """
    result = LoadResult(concurrency=concurrency)
    warm = 0
    everyone_warm = asyncio.Event()
    marks: dict[str, float] = {}
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as client:

        async def one(n: int) -> tuple[float, bool, str, dict[str, Any] | None]:
            start = time.perf_counter()
            try:
                response = await client.post(url, json=make_body(n))
                ok = response.status_code == 200
                return (
                    time.perf_counter() - start,
                    ok,
                    "ok" if ok else f"http_{response.status_code}",
                    (response.json() if ok else None),
                )
            except httpx.HTTPError as exc:
                return time.perf_counter() - start, False, type(exc).__name__, None

        async def client_loop(index: int) -> None:
            nonlocal warm
            await one(index)
            warm += 1
            if warm == concurrency:
                marks["start"] = time.perf_counter()
                everyone_warm.set()
            await everyone_warm.wait()
            for n in range(rounds):
                latency, ok, kind, answer = await one(index * 1000 + n + 1)
                if ok and answer is not None:
                    result.latencies.append(latency)
                    result.tokens += count_tokens(answer)
                else:
                    result.errors[kind] = result.errors.get(kind, 0) + 1
            marks["end"] = max(marks.get("end", 0.0), time.perf_counter())

        await asyncio.gather(*(client_loop(i) for i in range(concurrency)))
    result.seconds = marks["end"] - marks["start"]
    return result
