"""Per-row sampling maths."""

from __future__ import annotations

import torch

from engine.params import SamplingParams
from engine.sampling import Row, _apply_repetition_penalty, _sample_rows


def rows(n: int, **params) -> list[Row]:
    return [Row(SamplingParams(max_new_tokens=1, **params), prompt_ids=[0]) for _ in range(n)]


def test_top_k_one_is_argmax() -> None:
    logits = torch.randn(4, 50)
    chosen = _sample_rows(logits, rows(4, temperature=1.0, top_k=1, seed=0))
    assert chosen.tolist() == logits.argmax(-1).tolist()


def test_tiny_top_p_keeps_only_the_most_likely_token() -> None:
    logits = torch.randn(3, 50)
    chosen = _sample_rows(logits, rows(3, temperature=1.0, top_p=1e-6, seed=0))
    assert chosen.tolist() == logits.argmax(-1).tolist()


def test_top_k_restricts_support() -> None:
    logits = torch.arange(10, dtype=torch.float32).repeat(200, 1)
    chosen = _sample_rows(logits, [Row(SamplingParams(1, temperature=2.0, top_k=3, seed=i), [0]) for i in range(200)])
    assert set(chosen.tolist()) <= {7, 8, 9} and len(set(chosen.tolist())) == 3


def test_sampling_follows_the_distribution() -> None:
    probs = torch.tensor([0.7, 0.2, 0.1])
    logits = probs.log().repeat(2000, 1)
    chosen = _sample_rows(logits, [Row(SamplingParams(1, temperature=1.0, seed=i), [0]) for i in range(2000)])
    freq = torch.bincount(chosen, minlength=3).float() / 2000
    assert torch.allclose(freq, probs, atol=0.05)


def test_repetition_penalty_matches_transformers() -> None:
    from transformers import RepetitionPenaltyLogitsProcessor

    scores = torch.randn(1, 20)
    seen = torch.tensor([[3, 5, 5, 7]])
    expected = RepetitionPenaltyLogitsProcessor(1.3)(seen, scores.clone())
    ours = scores.clone()
    _apply_repetition_penalty(ours[0], seen[0], 1.3)
    assert torch.allclose(ours, expected)
