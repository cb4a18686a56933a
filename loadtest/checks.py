"""What a load-test request sends, and what its answer must look like (no locust import: unit-testable).

A 200 with the wrong body is a failure, not a pass: :func:`problems` lists everything wrong with an
answer to ``/generate`` compared with the request that produced it.
"""

from __future__ import annotations

import random
from typing import Any

RESPONSE_KEYS = {"model", "prompts", "completions", "finish_reasons", "generation_kwargs", "usage"}
FINISH_REASONS = {"stop", "length"}

# Prompts in the style of the embedded model's corpus (Python docstrings), short to long. Every one,
# plus the most tokens a request asks for (256 by default), fits pydoc-gpt-mini's 512-token context.
SHORT_PROMPTS = [
    "Return the",
    "The socket module",
    "This function",
    "Raise ValueError if",
    "Create a new",
    "Open the file",
    "If the argument is",
    "The default value",
]
SENTENCES = [
    "Return the number of items in the container.",
    "The socket module provides access to the BSD socket interface.",
    "This function reads a line from the file and returns it as a string.",
    "Raise ValueError if the argument is negative or not an integer.",
    "If timeout is given, block at most timeout seconds before giving up.",
    "The optional encoding argument names the codec used to decode the bytes.",
    "A new dictionary is returned; the mapping passed in is left unchanged.",
    "When the iterator is exhausted, StopIteration is raised by the next call.",
]


def long_prompt(rng: random.Random, sentences: int) -> str:
    """A paragraph of ``sentences`` docstring sentences ending in an open clause to complete."""
    return " ".join(rng.choice(SENTENCES) for _ in range(sentences)) + " " + rng.choice(SHORT_PROMPTS)


def request_mix(rng: random.Random) -> tuple[str, dict[str, Any]]:
    """One request of the realistic mix: ``(name, body)``; the name groups it in the statistics."""
    kind = rng.choices(["short", "long", "batch", "stop", "defaults"], weights=[5, 2, 2, 1, 1])[0]
    if kind == "short":
        kwargs = {"max_new_tokens": rng.randint(8, 32), "temperature": 0.7, "top_p": 0.9}
        return "single short", {"prompt": rng.choice(SHORT_PROMPTS), "generation_kwargs": kwargs}
    if kind == "long":
        kwargs = {"max_new_tokens": 48, "temperature": 0.0, "repetition_penalty": 1.2}
        return "single long", {"prompt": long_prompt(rng, rng.randint(3, 8)), "generation_kwargs": kwargs}
    if kind == "batch":
        prompts = [rng.choice(SHORT_PROMPTS + SENTENCES) for _ in range(rng.randint(2, 4))]
        kwargs = {"max_new_tokens": 16, "temperature": 0.8, "top_k": 40, "seed": rng.randrange(2**31)}
        return "batch", {"prompts": prompts, "generation_kwargs": kwargs}
    if kind == "stop":
        kwargs = {"max_new_tokens": 32, "temperature": 0.0, "stop": [".", "\n\n"]}
        return "single stop", {"prompt": rng.choice(SHORT_PROMPTS), "generation_kwargs": kwargs}
    return "single defaults", {"prompt": rng.choice(SHORT_PROMPTS)}


def problems(body: Any, sent: dict[str, Any]) -> list[str]:
    """Everything wrong with ``body`` as the answer to the ``/generate`` request ``sent``; empty if none."""
    if not isinstance(body, dict):
        return [f"body is {type(body).__name__}, not a JSON object"]
    found = []
    if set(body) != RESPONSE_KEYS:
        found.append(f"keys {sorted(body)} != {sorted(RESPONSE_KEYS)}")
        return found
    prompts = [sent["prompt"]] if "prompt" in sent else list(sent["prompts"])
    if body["prompts"] != prompts:
        found.append("prompts do not echo the request")
    completions, reasons = body["completions"], body["finish_reasons"]
    if not isinstance(completions, list) or len(completions) != len(prompts):
        found.append(f"{_len(completions)} completions for {len(prompts)} prompts")
    elif not all(isinstance(c, str) for c in completions):
        found.append("a completion is not a string")
    if not isinstance(reasons, list) or len(reasons) != len(prompts) or not set(reasons) <= FINISH_REASONS:
        found.append(f"finish_reasons {reasons!r} invalid for {len(prompts)} prompts")
    found += _usage_problems(body["usage"], len(prompts), body["generation_kwargs"])
    asked = sent.get("generation_kwargs", {})
    used = body["generation_kwargs"]
    if not isinstance(used, dict):
        return [*found, "generation_kwargs is not an object"]
    for key, value in asked.items():
        echoed = used.get(key)
        if key == "stop":
            echoed = list(echoed or [])
        if echoed != value:
            found.append(f"generation_kwargs.{key}: sent {value!r}, answer used {echoed!r}")
    return found


def _usage_problems(usage: Any, n_prompts: int, used: Any) -> list[str]:
    if not isinstance(usage, dict) or not all(
        isinstance(usage.get(k), int) for k in ("prompt_tokens", "completion_tokens", "total_tokens")
    ):
        return [f"usage {usage!r} lacks integer token counts"]
    found = []
    if usage["total_tokens"] != usage["prompt_tokens"] + usage["completion_tokens"]:
        found.append("usage.total_tokens is not prompt_tokens + completion_tokens")
    if usage["prompt_tokens"] < n_prompts:
        found.append("usage.prompt_tokens is below one token per prompt")
    max_new = used.get("max_new_tokens") if isinstance(used, dict) else None
    if isinstance(max_new, int) and usage["completion_tokens"] > max_new * n_prompts:
        found.append(f"{usage['completion_tokens']} completion tokens, above max_new_tokens x prompts")
    return found


def _len(value: Any) -> str:
    return str(len(value)) if isinstance(value, list) else "no list of"


def summary_rows(stats: Any) -> list[dict[str, Any]]:
    """One row per request name, then ``Aggregated``, from a locust ``RequestStats``; times in ms."""
    entries = [*sorted(stats.entries.values(), key=lambda e: e.name), stats.total]
    return [
        {
            "name": entry.name,
            "requests": entry.num_requests,
            "failures": entry.num_failures,
            "p50_ms": entry.get_response_time_percentile(0.5) if entry.num_requests else None,
            "p95_ms": entry.get_response_time_percentile(0.95) if entry.num_requests else None,
            "p99_ms": entry.get_response_time_percentile(0.99) if entry.num_requests else None,
            "max_ms": round(entry.max_response_time) if entry.num_requests else None,
            "rps": round(entry.total_rps, 2),
        }
        for entry in entries
    ]


def format_summary(rows: list[dict[str, Any]]) -> str:
    """The rows as a Markdown table (what the README shows)."""
    lines = [
        "| request | requests | failures | p50 (ms) | p95 (ms) | p99 (ms) | max (ms) | req/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        cells = [r["requests"], r["failures"], r["p50_ms"], r["p95_ms"], r["p99_ms"], r["max_ms"], r["rps"]]
        lines.append(f"| {r['name']} | " + " | ".join("-" if c is None else str(c) for c in cells) + " |")
    return "\n".join(lines)
