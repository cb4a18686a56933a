"""Per-row decoding rules for a batch: repetition penalty, sampling, and when a row ends.

Every prompt in a batch keeps its own temperature, top-p, top-k, repetition penalty, seed, stop
strings and token budget. :func:`pick_tokens` and :func:`finish_reason` implement them for one
decoding step; both decoding loops use them: our own continuous loop (``engine.continuous``) and,
for models it cannot drive, Hugging Face ``generate`` through :class:`RowSampler` and
:class:`RowStopper`.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field

import torch
from transformers import LogitsProcessor, StoppingCriteria

from engine.params import FinishReason, SamplingParams


@dataclass
class Row:
    """One prompt's decoding state."""

    params: SamplingParams
    prompt_ids: list[int]
    cancelled: Callable[[], bool] = lambda: False
    generated: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    generator: torch.Generator | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not self.params.greedy:
            seed = self.params.seed if self.params.seed is not None else torch.seed()
            self.generator = torch.Generator(device="cpu").manual_seed(seed)


def pick_tokens(logits: torch.Tensor, rows: Sequence[Row], seen: Sequence[torch.Tensor | None]) -> torch.Tensor:
    """The next token of each row: greedy rows take the argmax, sampling rows sample with their settings.

    ``seen[i]`` holds the tokens row ``i`` has seen (prompt and output), needed only for rows with a
    repetition penalty. ``logits`` (rows x vocab, float32) may be modified in place.
    """
    for i, row in enumerate(rows):
        if row.params.repetition_penalty != 1.0 and seen[i] is not None:
            _apply_repetition_penalty(logits[i], seen[i], row.params.repetition_penalty)
    chosen = logits.argmax(dim=-1)
    sampled = [i for i, row in enumerate(rows) if not row.params.greedy]
    if sampled:
        chosen[sampled] = _sample_rows(logits[sampled], [rows[i] for i in sampled])
    return chosen


def finish_reason(row: Row, eos: Collection[int], decode: Callable[[list[int]], str]) -> FinishReason | None:
    """Why ``row`` ends after its latest token, or None if it goes on."""
    if row.cancelled():
        return "cancelled"
    if row.generated and row.generated[-1] in eos:
        return "stop"
    if row.params.stop and any(stop in decode(row.generated) for stop in row.params.stop):
        return "stop"
    if len(row.generated) >= row.params.max_new_tokens:
        return "length"
    return None


class BatchState:
    """The rows of one Hugging Face ``generate`` call and what to do when one ends.

    ``on_finish(index, reason)`` is called from the generating thread as soon as row ``index`` ends.
    """

    def __init__(
        self,
        rows: Sequence[Row],
        seen_from: Sequence[int],
        eos_token_ids: Collection[int],
        decode: Callable[[list[int]], str],
        on_finish: Callable[[int, FinishReason], None],
    ) -> None:
        self.rows = list(rows)
        self.seen_from = list(seen_from)  # where each row's own tokens begin in generate()'s input_ids
        self.eos = frozenset(eos_token_ids)
        self.decode = decode
        self.on_finish = on_finish


class RowSampler(LogitsProcessor):
    """Makes ``generate`` (run in greedy mode) follow :func:`pick_tokens` row by row."""

    def __init__(self, state: BatchState) -> None:
        self.state = state
        self._custom = any(r.params.repetition_penalty != 1.0 or not r.params.greedy for r in state.rows)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if not self._custom:  # all greedy, no penalty: generate()'s own argmax is the answer
            return scores
        state = self.state
        active = [i for i, row in enumerate(state.rows) if row.finish_reason is None]
        if active:
            seen = [input_ids[i, state.seen_from[i] :] for i in active]
            chosen = pick_tokens(scores[active], [state.rows[i] for i in active], seen)
            index = torch.tensor(active, device=scores.device)
            scores[index] = float("-inf")
            scores[index, chosen.to(scores.device)] = 0.0
        return scores


class RowStopper(StoppingCriteria):
    """Ends each row on its own terms (:func:`finish_reason`) and reports it at once."""

    def __init__(self, state: BatchState) -> None:
        self.state = state
        # generate() pads the rows that have ended when a stopping criterion carries an EOS id.
        self.eos_token_id = next(iter(state.eos), None)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        state = self.state
        last = input_ids[:, -1].tolist()
        done = []
        for i, row in enumerate(state.rows):
            if row.finish_reason is None:
                row.generated.append(last[i])
                reason = finish_reason(row, state.eos, state.decode)
                if reason is not None:
                    row.finish_reason = reason
                    state.on_finish(i, reason)
            done.append(row.finish_reason is not None)
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def _apply_repetition_penalty(scores: torch.Tensor, seen: torch.Tensor, penalty: float) -> None:
    """CTRL-style penalty (as transformers applies it) on the tokens this row has seen, in place."""
    seen = seen.to(scores.device).unique()
    picked = scores.gather(0, seen)
    scores.scatter_(0, seen, torch.where(picked < 0, picked * penalty, picked / penalty))


def _sample_rows(logits: torch.Tensor, rows: Sequence[Row]) -> torch.Tensor:
    """Sample one token per row with the row's temperature, top-k, top-p and generator."""
    vocab = logits.shape[-1]
    device = logits.device
    temps = torch.tensor([r.params.temperature for r in rows], device=device, dtype=logits.dtype)
    sorted_logits, sorted_ids = (logits / temps[:, None]).sort(dim=-1, descending=True)
    ranks = torch.arange(vocab, device=device)
    top_k = torch.tensor([r.params.top_k or vocab for r in rows], device=device)
    sorted_logits = sorted_logits.masked_fill(ranks[None, :] >= top_k[:, None], float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    top_p = torch.tensor([r.params.top_p for r in rows], device=device, dtype=probs.dtype)
    # Keep the smallest prefix whose mass reaches top_p: drop a token when the mass before it
    # already does. The most likely token always stays.
    mass_before = probs.cumsum(dim=-1) - probs
    probs = probs.masked_fill(mass_before >= top_p[:, None], 0.0)
    cdf = probs.cumsum(dim=-1)
    # One uniform draw per row from the row's own generator: the draw does not depend on the rest
    # of the batch, so a seeded request samples the same tokens alone or batched.
    draws = torch.cat([torch.rand(1, generator=r.generator) for r in rows]).to(device=device, dtype=cdf.dtype)
    positions = torch.searchsorted(cdf, (draws * cdf[:, -1])[:, None], right=True).clamp_(max=vocab - 1)
    return sorted_ids.gather(1, positions).squeeze(1)
