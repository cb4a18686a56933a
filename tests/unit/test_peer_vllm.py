"""The vLLM comparison's interleaved mode: legs alternate, and each ratio pairs two legs run back to back."""

from __future__ import annotations

import math
import os

import pytest

from benchmarks import peer_vllm


def leg(rps: float, ttft: float) -> dict:
    return {"requests_per_s": rps, "ttft_p50_s": ttft}


def test_legs_alternate_which_system_goes_first_and_the_unary_leg_follows(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fake_load(url, model, clients, seconds, new_tokens, stream):
        calls.append((url, clients[0], stream))
        return {str(clients[0]): leg(len(calls), 0.1)}

    monkeypatch.setattr(peer_vllm, "load", fake_load)
    servers = {"service": ("S", "m"), "vllm": ("V", "m")}
    legs = peer_vllm.interleaved(servers, [1, 16], rounds=2, seconds=1, new_tokens=8, unary=True)
    assert calls == [
        ("S", 1, True), ("V", 1, True), ("S", 1, False), ("V", 1, True), ("S", 1, True), ("S", 1, False),
        ("S", 16, True), ("V", 16, True), ("S", 16, False), ("V", 16, True), ("S", 16, True), ("S", 16, False),
    ]  # fmt: skip
    assert [run["requests_per_s"] for run in legs["service"]["16"]] == [7, 11]
    assert [run["requests_per_s"] for run in legs["vllm"]["16"]] == [8, 10]


def test_ratios_are_the_median_of_each_rounds_pair_not_of_the_systems_medians() -> None:
    # The machine slowed 2x in round 2: both systems with it. Each round the service makes 0.9x.
    ours = [leg(0.9, 0.2), leg(0.45, 0.4), leg(0.9, 0.2)]
    theirs = [leg(1.0, 0.1), leg(0.5, 0.2), leg(1.0, 0.1)]
    unary = [leg(1.0, 0.2), leg(0.5, 0.4), leg(0.9, 0.2)]
    results = {
        "service/bfloat16": {"legs": {"16": ours}, "unary_legs": {"16": unary}, "stream": {"16": ours[0]}},
        "vllm/bfloat16": {"legs": {"16": theirs}, "stream": {"16": theirs[0]}},
    }
    row = peer_vllm.ratios(results, ["bfloat16"])["bfloat16"]["16"]
    assert math.isclose(row["requests_per_s"], 0.9) and math.isclose(row["ttft_p50"], 2.0)
    assert math.isclose(row["stream_over_unary"], 0.9) and len(row["pairs"]["requests_per_s"]) == 3
    assert peer_vllm._median_leg(ours)["requests_per_s"] == 0.9  # the middle of three
    assert peer_vllm._median_leg(theirs[:2])["requests_per_s"] == 0.5  # the lower of two


def test_a_process_trees_cpu_counts_this_process() -> None:
    assert peer_vllm.tree_cpu_s(os.getpid()) > 0
