"""One step's token for each row of a batch: penalties, row processors, then argmax or sampling.

Every row keeps its own temperature, top-p, top-k, repetition/presence/frequency penalties and
seed. :func:`pick_tokens` applies them to the whole batch's logits at once (one scatter per
penalty; the sampling rows without a sort of the vocabulary); each sampling row's uniform draw
comes from its own generator (:func:`row_draws`), so a seeded request samples the same tokens
alone or batched.
``engine.sampling.pick_isolated`` wraps it so that a row that fails fails alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from engine.processors import apply_row_processors
from engine.types import SamplingParams

if TYPE_CHECKING:
    from engine.sampling import Row


def penalised(params: SamplingParams) -> bool:
    """Whether the row has a repetition, presence or frequency penalty."""
    return params.repetition_penalty != 1.0 or params.presence_penalty != 0.0 or params.frequency_penalty != 0.0


def row_draws(rows: Sequence[Row]) -> torch.Tensor:
    """One uniform draw per row from its own generator (greedy rows: 0, unused), taken once per step."""
    return torch.cat([torch.zeros(1) if r.generator is None else torch.rand(1, generator=r.generator) for r in rows])


def greedy_tokens(logits: torch.Tensor, block: int = 128) -> torch.Tensor:
    """``logits.argmax(dim=-1)`` (the first index of each row's largest value), found block by block.

    PyTorch's CPU ``argmax`` walks a row element by element: 2.1 ms for 16 rows of GPT-2's 50,257
    float32 scores on one core of the Intel VM, a few percent of a decode step. ``amax`` over blocks
    of ``block`` scores is vectorised; the argmax then runs over the blocks' maxima and inside the
    first block that holds the row's maximum: 0.45 ms for the same 16 rows (0.1 ms for one). Same
    answer in every case, ties and NaN included (``tests/unit/test_sampling.py``): the first block
    holding the maximum holds its first index, and a NaN counts as the maximum in both.
    """
    rows, vocab = logits.shape
    whole = vocab - vocab % block
    if whole == 0 or logits.device.type != "cpu" or logits.stride(-1) != 1:
        return logits.argmax(dim=-1)
    maxima = logits[:, :whole].view(rows, whole // block, block).amax(dim=-1)  # [rows, blocks]
    first = maxima.argmax(dim=-1)  # the first block holding each row's maximum (or NaN)
    starts = first * block
    inside = logits.gather(1, starts[:, None] + torch.arange(block, device=logits.device)).argmax(dim=-1)
    chosen = starts + inside
    if whole == vocab:
        return chosen
    best = maxima.gather(1, first[:, None])[:, 0]
    tail, tail_index = logits[:, whole:].max(dim=-1)
    # The tail's maximum wins only when strictly larger (an equal one has a later index), or NaN first.
    wins = (tail > best) | (tail.isnan() & ~best.isnan())
    return torch.where(wins, tail_index + whole, chosen)


def pick_tokens(
    logits: torch.Tensor,
    rows: Sequence[Row],
    seen: Sequence[torch.Tensor | None] | None = None,
    draws: torch.Tensor | None = None,
) -> torch.Tensor:
    """The next token of each row: greedy rows take the argmax, sampling rows sample with their settings.

    ``seen[i]`` holds the tokens row ``i`` has seen (prompt and output) for rows with a repetition
    penalty (default: the row's prompt and output); presence and frequency penalties count the
    row's own output only (as OpenAI defines them). Penalties go to all the rows that ask at once,
    one scatter each. ``logits`` (rows x vocab, float32) may be modified in place. ``draws``
    (one uniform per row, :func:`row_draws`) are taken here when not given.
    """
    if draws is None:
        draws = row_draws(rows)
    repeat = [i for i, row in enumerate(rows) if row.params.repetition_penalty != 1.0]
    if repeat:
        ids = [seen[i] if seen is not None and seen[i] is not None else _seen(rows[i]) for i in repeat]
        penalty = [rows[i].params.repetition_penalty for i in repeat]
        _repetition_penalties(logits, repeat, ids, penalty)
    counted = [
        i
        for i, row in enumerate(rows)
        if (row.params.presence_penalty or row.params.frequency_penalty) and row.generated
    ]
    if counted:
        _presence_frequency_penalties(logits, counted, [rows[i] for i in counted])
    apply_row_processors(logits, rows)
    chosen = greedy_tokens(logits)
    sampled = [i for i, row in enumerate(rows) if not row.params.greedy]
    if sampled:
        chosen[sampled] = _sample_rows(logits[sampled], [rows[i] for i in sampled], draws[sampled])
    return chosen


def _seen(row: Row) -> torch.Tensor:
    return torch.tensor(row.prompt_ids + row.generated, dtype=torch.long)


def _padded(sequences: Sequence[torch.Tensor], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``sequences`` as one [rows, longest] tensor (padded with each row's first id) and where it is real."""
    width = max(len(s) for s in sequences)
    ids = torch.zeros((len(sequences), width), dtype=torch.long)
    real = torch.zeros((len(sequences), width), dtype=torch.bool)
    for i, seq in enumerate(sequences):
        ids[i, : len(seq)] = seq
        ids[i, len(seq) :] = seq[0] if len(seq) else 0
        real[i, : len(seq)] = True
    return ids.to(device), real.to(device)


def _repetition_penalties(
    logits: torch.Tensor, index: list[int], seen: Sequence[torch.Tensor], penalty: Sequence[float]
) -> None:
    """CTRL-style penalty (as transformers applies it) on each listed row's seen tokens, in place.

    A padded id repeats a real one, so gathering and scattering it back writes the same value.
    """
    ids, _ = _padded([s.to(torch.long).cpu() for s in seen], logits.device)
    where = torch.tensor(index, device=logits.device)
    factor = torch.tensor(penalty, device=logits.device, dtype=logits.dtype)[:, None]
    scores = logits[where]
    picked = scores.gather(1, ids)
    scores.scatter_(1, ids, torch.where(picked < 0, picked * factor, picked / factor))
    logits[where] = scores


def _presence_frequency_penalties(logits: torch.Tensor, index: list[int], rows: Sequence[Row]) -> None:
    """OpenAI's penalties, in place: ``logit[t] -= presence * (count[t] > 0) + frequency * count[t]``."""
    ids, real = _padded([torch.tensor(row.generated, dtype=torch.long) for row in rows], logits.device)
    counts = torch.zeros((len(rows), logits.shape[-1]), dtype=logits.dtype, device=logits.device)
    counts.scatter_add_(1, ids, real.to(logits.dtype))
    presence = torch.tensor([r.params.presence_penalty for r in rows], device=logits.device, dtype=logits.dtype)
    frequency = torch.tensor([r.params.frequency_penalty for r in rows], device=logits.device, dtype=logits.dtype)
    where = torch.tensor(index, device=logits.device)
    logits[where] -= presence[:, None] * (counts > 0) + frequency[:, None] * counts


def _sample_rows(logits: torch.Tensor, rows: Sequence[Row], draws: torch.Tensor | None = None) -> torch.Tensor:
    """Sample one token per row with the row's temperature, top-k, top-p and uniform draw.

    Nothing sorts the vocabulary (a sort of 50,257 scores takes about 3.6 ms a row on one core of
    the reference CPU, more than a GPT-2-small decode step of 16 rows spends in the model): top-k
    keeps the scores at least the k-th largest (``topk``); top-p keeps the probabilities at least
    :func:`top_p_floor`, the smallest of the most likely tokens whose mass reaches top_p; the
    row's uniform draw is inverted on what is kept, in vocabulary order. Ties at either bound are
    all kept. ``draws`` holds one uniform per row (drawn from each row's generator when not given).
    """
    vocab = logits.shape[-1]
    device = logits.device
    if draws is None:
        draws = row_draws(rows)
    temps = torch.tensor([r.params.temperature for r in rows], device=device, dtype=torch.float32)
    scaled = logits.float() / temps[:, None]
    # top_k above the vocabulary keeps everything (and never reaches a tensor as a huge integer).
    top_k = [min(r.params.top_k or vocab, vocab) for r in rows]
    cut = [i for i, k in enumerate(top_k) if k < vocab]
    if cut:
        where = torch.tensor(cut, device=device)
        kept = scaled[where]
        largest = kept.topk(max(top_k[i] for i in cut), dim=-1).values
        kth = largest.gather(1, torch.tensor([[top_k[i] - 1] for i in cut], device=device))
        scaled[where] = kept.masked_fill(kept < kth, float("-inf"))
    probs = scaled.softmax(dim=-1)
    for i, row in enumerate(rows):
        if row.params.top_p < 1.0:
            probs[i].masked_fill_(probs[i] < top_p_floor(probs[i], row.params.top_p), 0.0)
    # One uniform draw per row from the row's own generator: the draw does not depend on the rest
    # of the batch, so a seeded request samples the same tokens alone or batched.
    cdf = probs.cumsum(dim=-1)
    draws = draws.to(device=device, dtype=cdf.dtype)
    positions = torch.searchsorted(cdf, (draws * cdf[:, -1])[:, None], right=True).clamp_(max=vocab - 1)
    return positions.squeeze(1)


# A non-negative float32's bits, shifted right by 15, are 65,536 buckets in the order of the values.
_BUCKET_SHIFT = 15
_BUCKETS = 1 << (31 - _BUCKET_SHIFT)


def top_p_floor(probs: torch.Tensor, top_p: float) -> float:
    """The probability of the last token of the smallest most-likely set whose mass reaches ``top_p``.

    Keeping the tokens at least this likely is top-p (nucleus) filtering; a ``top_p`` of 0 keeps
    the most likely token. On CPU, without a sort: the mass of each bucket of float bits
    (one ``bincount``) finds the bucket where the mass from the top crosses ``top_p``, and only
    that bucket's probabilities are sorted. Elsewhere (a GPU sorts fast) the row is sorted.

    Example::

        >>> top_p_floor(torch.tensor([0.1, 0.5, 0.15, 0.25]), 0.7)  # 0.5 + 0.25 reaches 0.7
        0.25
    """
    target = max(top_p, torch.finfo(torch.float32).tiny)
    if probs.device.type != "cpu":
        return _crossing(probs, 0.0, target)
    keys = (probs.contiguous().view(torch.int32) >> _BUCKET_SHIFT).long()
    from_top = torch.bincount(keys, weights=probs.double(), minlength=_BUCKETS).flip(0).cumsum(0)
    j = int(torch.searchsorted(from_top, target))
    if j >= _BUCKETS:  # rounding left the whole mass short of top_p: keep everything
        return 0.0
    above = float(from_top[j - 1]) if j > 0 else 0.0
    return _crossing(probs[keys == _BUCKETS - 1 - j], above, target)


def _crossing(probs: torch.Tensor, above: float, target: float) -> float:
    """The first of ``probs``, most likely first, at which ``above`` plus their running mass reaches ``target``."""
    ordered = probs.sort(descending=True).values
    reach = ordered.double().cumsum(0) + above
    return float(ordered[min(int(torch.searchsorted(reach, target)), len(ordered) - 1)])
