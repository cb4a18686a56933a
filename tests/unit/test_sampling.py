"""Per-row sampling maths."""

from __future__ import annotations

from collections import Counter

import torch

from engine.sampling import Row, ended_rows
from engine.token_choice import _presence_frequency_penalties, _repetition_penalties, _sample_rows, pick_tokens
from engine.types import SamplingParams
from engine.work import WorkItem


def row(params: SamplingParams, generated: list[int] | None = None, index: int = 0) -> Row:
    r = Row(WorkItem(stream=0, row=index, prompt_ids=[0], params=params))
    r.generated = list(generated or [])
    return r


def rows(n: int, **params) -> list[Row]:
    return [row(SamplingParams(max_new_tokens=1, **params), index=i) for i in range(n)]


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
    chosen = _sample_rows(logits, [row(SamplingParams(1, temperature=2.0, top_k=3, seed=i)) for i in range(200)])
    assert set(chosen.tolist()) <= {7, 8, 9} and len(set(chosen.tolist())) == 3


def test_sampling_follows_the_distribution() -> None:
    probs = torch.tensor([0.7, 0.2, 0.1])
    logits = probs.log().repeat(2000, 1)
    chosen = _sample_rows(logits, [row(SamplingParams(1, temperature=1.0, seed=i)) for i in range(2000)])
    freq = torch.bincount(chosen, minlength=3).float() / 2000
    assert torch.allclose(freq, probs, atol=0.05)


def test_repetition_penalty_matches_transformers_row_by_row_in_one_batch() -> None:
    from transformers import RepetitionPenaltyLogitsProcessor

    scores = torch.randn(3, 20)
    seen = [torch.tensor([3, 5, 5, 7]), torch.tensor([1]), torch.tensor([0, 19, 2])]
    penalty = [1.3, 2.0, 0.7]
    ours = scores.clone()
    _repetition_penalties(ours, [0, 1, 2], seen, penalty)
    for i in range(3):
        expected = RepetitionPenaltyLogitsProcessor(penalty[i])(seen[i][None], scores[i : i + 1].clone())
        assert torch.allclose(ours[i : i + 1], expected)


def test_presence_and_frequency_penalties_follow_openai_formula() -> None:
    scores = torch.randn(2, 20)
    generated = [[3, 5, 5, 7, 5, 19], [2]]
    ours = scores.clone()
    penalised = [row(SamplingParams(1, presence_penalty=0.6, frequency_penalty=0.25), generated=g) for g in generated]
    _presence_frequency_penalties(ours, [0, 1], penalised)
    for i, tokens in enumerate(generated):
        counts = Counter(tokens)
        expected = scores[i].clone()
        for token in range(20):
            expected[token] -= 0.6 * (counts[token] > 0) + 0.25 * counts[token]
        assert torch.allclose(ours[i], expected)
    assert ours[0, 0] == scores[0, 0]  # a token never generated is untouched


def test_rows_end_on_an_eos_id_or_their_last_allowed_token() -> None:
    rows = [row(SamplingParams(3), generated=[1, 1]), row(SamplingParams(3)), row(SamplingParams(3))]
    tokens = torch.tensor([4, 9, 4])
    assert ended_rows(tokens, rows, torch.tensor([9])).tolist() == [True, True, False]


def test_penalties_apply_per_row_over_that_rows_own_output() -> None:
    logits = torch.zeros(3, 10)
    logits[:, 4] = 1.0  # token 4 leads by 1.0 everywhere
    plain = row(SamplingParams(1), generated=[4, 4])
    presence = row(SamplingParams(1, presence_penalty=1.5), generated=[4])
    frequency = row(SamplingParams(1, frequency_penalty=0.6), generated=[4, 4], index=2)
    chosen = pick_tokens(logits, [plain, presence, frequency], [None, None, None]).tolist()
    assert chosen[0] == 4  # no penalty asked
    assert chosen[1] != 4  # 1.0 - 1.5 < 0
    assert chosen[2] != 4  # 1.0 - 2 * 0.6 < 0
    assert logits[0, 4] == 1.0  # only the rows that asked were changed


def test_a_row_with_nothing_generated_yet_is_not_penalised() -> None:
    logits = torch.zeros(1, 5)
    logits[0, 2] = 0.5
    [chosen] = pick_tokens(logits, [row(SamplingParams(1, presence_penalty=2.0, frequency_penalty=2.0))], [None])
    assert chosen == 2
