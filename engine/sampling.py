"""Per-row decoding control for a batch: sampling, repetition penalty and stopping.

Hugging Face ``generate`` takes one sampling configuration per batch. To honour each request's own
temperature, top-p, top-k, repetition penalty, seed, stop strings and token budget inside one
batch, ``generate`` runs in greedy mode and a logits processor samples each sampling row with the
row's own seeded generator, leaving only the chosen token selectable (:class:`RowSampler`); a
stopping criterion ends each row on its own terms and reports it at once (:class:`RowStopper`), so
a short request does not wait for the longest one in its batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from transformers import LogitsProcessor, StoppingCriteria

from engine.params import FinishReason, SamplingParams


@dataclass
class Row:
    """One prompt's decoding state inside a batch."""

    params: SamplingParams
    start: int  # index in the output ids where this row's generated tokens begin
    first_real: int  # index of the row's first non-padding token (left padding)
    cancelled: Callable[[], bool] = lambda: False
    finish_reason: FinishReason | None = None
    generator: torch.Generator | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not self.params.greedy:
            seed = self.params.seed if self.params.seed is not None else torch.seed()
            self.generator = torch.Generator(device="cpu").manual_seed(seed)


class BatchState:
    """The rows of one ``generate`` call and what to do when one ends.

    ``on_finish(index, token_ids, reason)`` is called from the generating thread as soon as row
    ``index`` ends, with the tokens it generated.
    """

    def __init__(
        self,
        rows: Sequence[Row],
        eos_token_ids: Sequence[int],
        decode: Callable[[list[int]], str],
        on_finish: Callable[[int, list[int], FinishReason], None],
    ) -> None:
        self.rows = list(rows)
        self.eos = frozenset(eos_token_ids)
        self.decode = decode
        self.on_finish = on_finish


class RowSampler(LogitsProcessor):
    """Applies each row's repetition penalty, then samples each sampling row with its own settings.

    Greedy rows are left to generate()'s argmax; a sampled row keeps only its chosen token.
    """

    def __init__(self, state: BatchState) -> None:
        self.state = state
        self._penalised = [i for i, row in enumerate(state.rows) if row.params.repetition_penalty != 1.0]
        self._sampled = [i for i, row in enumerate(state.rows) if not row.params.greedy]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        rows = self.state.rows
        for i in self._penalised:
            if rows[i].finish_reason is None:
                seen = input_ids[i, rows[i].first_real :]
                _apply_repetition_penalty(scores[i], seen, rows[i].params.repetition_penalty)
        active = [i for i in self._sampled if rows[i].finish_reason is None]
        if active:
            chosen = _sample_rows(scores[active], [rows[i] for i in active])
            index = torch.tensor(active, device=scores.device)
            scores[index] = float("-inf")
            scores[index, chosen] = 0.0
        return scores


class RowStopper(StoppingCriteria):
    """Ends each row on its own terms (EOS, stop string, token budget, cancellation) and reports it."""

    def __init__(self, state: BatchState) -> None:
        self.state = state
        # generate() pads the rows that have ended when a stopping criterion carries an EOS id.
        self.eos_token_id = next(iter(state.eos), None)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        state = self.state
        last = input_ids[:, -1].tolist()
        length = input_ids.shape[1]
        done = []
        for i, row in enumerate(state.rows):
            if row.finish_reason is None:
                reason = self._reason(row, input_ids[i], last[i], length)
                if reason is not None:
                    row.finish_reason = reason
                    state.on_finish(i, input_ids[i, row.start :].tolist(), reason)
            done.append(row.finish_reason is not None)
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    def _reason(self, row: Row, ids: torch.Tensor, last: int, length: int) -> FinishReason | None:
        if row.cancelled():
            return "cancelled"
        if last in self.state.eos:
            return "stop"
        if row.params.stop:
            text = self.state.decode(ids[row.start :].tolist())
            if any(stop in text for stop in row.params.stop):
                return "stop"
        if length - row.start >= row.params.max_new_tokens:
            return "length"
        return None


def _apply_repetition_penalty(scores: torch.Tensor, seen: torch.Tensor, penalty: float) -> None:
    """CTRL-style penalty (as transformers applies it) on the tokens this row has seen, in place."""
    seen = seen.unique()
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
