"""Per-row sampling maths."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from engine.sampling import Row, ended_rows
from engine.token_choice import (
    _presence_frequency_penalties,
    _repetition_penalties,
    _sample_rows,
    greedy_tokens,
    pick_tokens,
    top_p_floor,
)
from engine.types import SamplingParams
from engine.work import WorkItem


def row(params: SamplingParams, generated: list[int] | None = None, index: int = 0) -> Row:
    r = Row(WorkItem(stream=0, row=index, prompt_ids=[0], params=params))
    r.generated = list(generated or [])
    return r


def rows(n: int, **params) -> list[Row]:
    return [row(SamplingParams(max_new_tokens=1, **params), index=i) for i in range(n)]


@pytest.mark.parametrize("vocab", [5, 128, 300, 50257])
def test_greedy_tokens_are_argmax_ties_nan_and_infinities_included(vocab: int) -> None:
    torch.manual_seed(vocab)
    logits = torch.randn(12, vocab)
    top = logits.max().item() + 1
    logits[1, [3, vocab - 1]] = top  # a tie between the first block and the tail
    logits[2, vocab - 1] = top  # the maximum in the tail
    logits[3, [vocab // 2, vocab // 2 + 1]] = top  # a tie inside one block
    logits[4, [vocab // 3, vocab - 2]] = float("nan")  # NaN counts as the maximum, the first one wins
    logits[5, vocab - 1] = float("nan")
    logits[6] = float("-inf")  # all equal: index 0
    logits[7, :] = 0.0
    logits[8, [0, vocab // 2]] = float("inf")
    logits[9, vocab - 1] = float("inf")
    logits[9, 0] = float("nan")
    logits[10] = logits[10].to(torch.bfloat16).float()  # coarse values: many ties
    for block in (1, 4, 128):
        assert torch.equal(greedy_tokens(logits, block), logits.argmax(-1)), block
    wide = torch.randn(3, vocab + 7)[:, :vocab]  # rows strided, as a slice of a larger buffer
    assert torch.equal(greedy_tokens(wide), wide.argmax(-1))
    assert torch.equal(greedy_tokens(logits.t().contiguous().t()), logits.argmax(-1))  # column-major


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


def sorted_floor(probs: torch.Tensor, top_p: float) -> float:
    """Top-p's floor the plain way: sort, add up from the top, the token whose running mass reaches top_p."""
    ordered = probs.sort(descending=True).values
    reach = ordered.double().cumsum(0)
    return float(ordered[min(int(torch.searchsorted(reach, max(top_p, 1e-38))), len(ordered) - 1)])


@pytest.mark.parametrize("vocab", [2, 7, 400, 50257, 151936])
def test_the_top_p_floor_without_a_sort_is_the_sorted_one(vocab: int) -> None:
    generator = torch.Generator().manual_seed(vocab)
    for spread in (0.01, 1.0, 5.0, 30.0):  # flat (a random model) to peaked (a trained one)
        probs = (torch.randn(vocab, generator=generator) * spread).softmax(-1)
        for top_p in (0.0, 1e-9, 0.1, 0.5, 0.9, 0.95, 0.999999):
            assert top_p_floor(probs, top_p) == sorted_floor(probs, top_p), (spread, top_p)
    ties = torch.full((vocab,), 1.0 / vocab)
    assert top_p_floor(ties, 0.3) == sorted_floor(ties, 0.3) == ties[0]


def test_sampling_follows_the_top_p_and_top_k_distribution() -> None:
    """Tokens come only from the kept set, in proportion to their renormalised probabilities."""
    probs = torch.tensor([0.05, 0.4, 0.02, 0.25, 0.08, 0.2])
    logits = probs.log().repeat(4000, 1)
    for params, kept in (
        ({"top_p": 0.8}, [1, 3, 5]),  # 0.4 + 0.25 + 0.2 reaches 0.8
        ({"top_k": 2}, [1, 3]),
        ({"top_k": 4, "top_p": 0.9}, [1, 3, 5]),  # top-p of the renormalised top 4: (0.4+0.25)/0.93 < 0.9
    ):
        sampled = [row(SamplingParams(1, temperature=1.0, seed=i, **params)) for i in range(4000)]
        chosen = _sample_rows(logits.clone(), sampled)
        freq = torch.bincount(chosen, minlength=6).double() / 4000
        expected = torch.zeros(6, dtype=torch.double)
        expected[kept] = probs[kept].double() / probs[kept].sum()
        assert set(chosen.tolist()) == set(kept), params
        assert torch.allclose(freq, expected, atol=0.03), (params, freq, expected)


def test_a_seeded_row_samples_the_same_token_alone_and_in_any_batch() -> None:
    logits = torch.randn(6, 50257) * 3
    params = [SamplingParams(1, temperature=0.8, top_p=0.9, seed=11), SamplingParams(1, temperature=1.1, top_k=50,
              seed=12), SamplingParams(1, temperature=0.7, top_p=0.5, top_k=1000, seed=13)]  # fmt: skip
    batch = [row(p) for p in params] + [row(SamplingParams(1, temperature=1.0, seed=20 + i)) for i in range(3)]
    together = _sample_rows(logits.clone(), batch).tolist()
    for i, p in enumerate(params):
        assert _sample_rows(logits[i : i + 1].clone(), [row(p)]).tolist() == [together[i]]


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
