"""One step's token for each row of a batch: penalties, row processors, then argmax or sampling.

Every row keeps its own temperature, top-p, top-k, repetition/presence/frequency penalties and
seed. :func:`pick_tokens` applies them to the whole batch's logits at once (one scatter per
penalty, one sort for the sampling rows); each sampling row's uniform draw comes from its own
generator (:func:`row_draws`), so a seeded request samples the same tokens alone or batched.
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
    chosen = logits.argmax(dim=-1)
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

    ``draws`` holds one uniform per row (drawn from each row's generator when not given).
    """
    vocab = logits.shape[-1]
    device = logits.device
    if draws is None:
        draws = row_draws(rows)
    temps = torch.tensor([r.params.temperature for r in rows], device=device, dtype=logits.dtype)
    sorted_logits, sorted_ids = (logits / temps[:, None]).sort(dim=-1, descending=True)
    ranks = torch.arange(vocab, device=device)
    # top_k above the vocabulary keeps everything (and never reaches a tensor as a huge integer).
    top_k = torch.tensor([min(r.params.top_k or vocab, vocab) for r in rows], device=device)
    sorted_logits = sorted_logits.masked_fill(ranks[None, :] >= top_k[:, None], float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    top_p = torch.tensor([r.params.top_p for r in rows], device=device, dtype=probs.dtype)
    # Keep the smallest prefix whose mass reaches top_p: drop a token when the mass before it
    # already does. The most likely token always stays (a top_p that is 0 in float32 keeps it alone).
    mass_before = probs.cumsum(dim=-1) - probs
    probs = probs.masked_fill((mass_before >= top_p[:, None]) & (ranks[None, :] > 0), 0.0)
    cdf = probs.cumsum(dim=-1)
    # One uniform draw per row from the row's own generator: the draw does not depend on the rest
    # of the batch, so a seeded request samples the same tokens alone or batched.
    draws = draws.to(device=device, dtype=cdf.dtype)
    positions = torch.searchsorted(cdf, (draws * cdf[:, -1])[:, None], right=True).clamp_(max=vocab - 1)
    return sorted_ids.gather(1, positions).squeeze(1)
