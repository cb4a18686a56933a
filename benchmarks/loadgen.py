"""A closed-loop HTTP load generator: C clients, each sending its next request when the last returns."""

from __future__ import annotations

import asyncio
import itertools
import json
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
    # Streamed requests only: time to the first text, and the gaps between later pieces of text.
    ttfts: list[float] = field(default_factory=list)
    gaps: list[float] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        n = len(self.latencies)
        out = {
            "concurrency": self.concurrency,
            "seconds": round(self.seconds, 3),
            "requests": n,
            "errors": self.errors,
            "requests_per_s": n / self.seconds if self.seconds else 0.0,
            "tokens_per_s": self.tokens / self.seconds if self.seconds else 0.0,
            "p50_s": percentile(self.latencies, 50),
            "p95_s": percentile(self.latencies, 95),
        }
        if self.ttfts:
            out |= {
                "ttft_p50_s": percentile(self.ttfts, 50),
                "ttft_p95_s": percentile(self.ttfts, 95),
                "itl_p50_s": percentile(self.gaps, 50),
                "itl_p95_s": percentile(self.gaps, 95),
            }
        return out


@dataclass
class Answer:
    """One request's outcome as the client saw it."""

    latency: float
    ok: bool
    kind: str
    body: dict[str, Any] | None = None
    ttft: float | None = None
    gaps: list[float] = field(default_factory=list)


async def post_json(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> Answer:
    start = time.perf_counter()
    try:
        response = await client.post(url, json=body)
    except httpx.HTTPError as exc:
        return Answer(time.perf_counter() - start, False, type(exc).__name__)
    ok = response.status_code == 200
    return Answer(
        time.perf_counter() - start, ok, "ok" if ok else f"http_{response.status_code}", response.json() if ok else None
    )


async def post_stream(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> Answer:
    """An OpenAI streamed request: TTFT is the first chunk with a token; the usage chunk is the body."""
    start = time.perf_counter()
    stamps: list[float] = []
    usage: dict[str, Any] | None = None
    try:
        async with client.stream("POST", url, json=body) as response:
            if response.status_code != 200:
                await response.aread()
                return Answer(time.perf_counter() - start, False, f"http_{response.status_code}")
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return Answer(time.perf_counter() - start, False, "stream_error")
                if chunk.get("usage"):
                    usage = chunk
                elif any(
                    choice.get("text") or choice.get("delta", {}).get("content") or choice.get("finish_reason")
                    for choice in chunk["choices"]
                ):  # a token arrived (a first token that ends the answer carries no text)
                    stamps.append(time.perf_counter())
    except httpx.HTTPError as exc:
        return Answer(time.perf_counter() - start, False, type(exc).__name__)
    if not stamps or usage is None:
        return Answer(time.perf_counter() - start, False, "empty_stream")
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    return Answer(time.perf_counter() - start, True, "ok", usage, ttft=stamps[0] - start, gaps=gaps)


async def closed_loop(
    url: str,
    make_body: Callable[[int], dict[str, Any]],
    count_tokens: Callable[[dict[str, Any]], int],
    concurrency: int,
    rounds: int,
    timeout_s: float = 900,
    stream: bool = False,
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

        async def one(n: int) -> Answer:
            return await (post_stream if stream else post_json)(client, url, make_body(n))

        async def client_loop(index: int) -> None:
            nonlocal warm
            await one(index)
            warm += 1
            if warm == concurrency:
                marks["start"] = time.perf_counter()
                everyone_warm.set()
            await everyone_warm.wait()
            for n in range(rounds):
                answer = await one(index * 1000 + n + 1)
                if answer.ok and answer.body is not None:
                    result.latencies.append(answer.latency)
                    result.tokens += count_tokens(answer.body)
                    if answer.ttft is not None:
                        result.ttfts.append(answer.ttft)
                        result.gaps.extend(answer.gaps)
                else:
                    result.errors[answer.kind] = result.errors.get(answer.kind, 0) + 1
            marks["end"] = max(marks.get("end", 0.0), time.perf_counter())

        await asyncio.gather(*(client_loop(i) for i in range(concurrency)))
    result.seconds = marks["end"] - marks["start"]
    return result
