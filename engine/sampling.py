"""Per-row decoding state for a batch: one step's choice, log-probabilities, and when a row ends.

Every row in a batch keeps its own sampling settings, stop strings, token budget and
log-probability request. :func:`choose` picks one step's tokens (the maths is
``engine.token_choice.pick_tokens``) and :meth:`Row.advance` turns a token into the row's
:class:`~engine.types.Delta`; both decoding loops use them: our own continuous loop
(``engine.continuous``) and, for models it cannot drive, Hugging Face ``generate`` through
:class:`RowSampler` and :class:`RowStopper`.

One row fails alone: a row whose scores are not finite, whose sampling raises, or whose
detokenizer or stop strings raise gets ``Row.failure`` and ends with an ``error`` delta, while the
other rows go on to exactly the tokens they would have produced alone (each row's uniform draw is
taken from its own generator before anything that can fail, so a row-by-row retry of a step that
failed as a batch draws nothing twice).
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

import torch
from transformers import LogitsProcessor, StoppingCriteria

from engine.detokenize import IncrementalDetokenizer
from engine.logprobs import TokenTexts, token_logprob
from engine.processors import RowProcessors
from engine.token_choice import penalised, pick_tokens, row_draws
from engine.types import MAX_SEED, Delta, FinishReason, SamplingParams, TokenLogprob
from engine.work import OnStep, WorkItem

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class Row:
    """One work item's decoding state (engine thread only)."""

    item: WorkItem
    detokenizer: IncrementalDetokenizer | None = None
    generated: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    generator: torch.Generator | None = field(default=None, repr=False)
    # The static path computes a step's log-probabilities before it knows the chosen token.
    raw_logprobs: torch.Tensor | None = field(default=None, repr=False)
    failure: BaseException | None = field(default=None, repr=False)  # set when this row failed alone
    processors: RowProcessors | None = field(default=None, repr=False)  # None: a free row, nothing to apply

    def __post_init__(self) -> None:
        if not self.params.greedy:
            seed = self.params.seed if self.params.seed is not None else torch.seed()
            # Any integer is reduced into the generator's range rather than failing the row.
            self.generator = torch.Generator(device="cpu").manual_seed(seed % (MAX_SEED + 1))

    @property
    def params(self) -> SamplingParams:
        return self.item.params

    @property
    def prompt_ids(self) -> list[int]:
        return self.item.prompt_ids

    def cancelled(self) -> bool:
        return self.item.cancelled

    def advance(
        self, token: int, eos: Collection[int], logprob: TokenLogprob | None = None, limit: bool | None = None
    ) -> Delta:
        """Append ``token``; the row's delta for it, ending the row when it is done.

        ``limit``: whether the token is an end-of-sequence id or the row's last allowed one, when
        the caller decided it for the whole batch at once (:func:`ended_rows`); None to check here.
        A row that failed this step (``failure``), or whose detokenizer raises now, ends with an
        ``error`` delta instead: its failure is its own.
        """
        if self.failure is not None:
            return self.fail(self.failure)
        try:
            return self._advance(token, eos, logprob, limit)
        except Exception as exc:
            return self.fail(exc)

    def fail(self, exc: BaseException, reason: FinishReason = "error") -> Delta:
        """End the row because it failed (``error``), or because its step did (``aborted``)."""
        self.failure = self.failure or exc
        self.finish_reason = reason
        if reason == "error":
            logger.error("row %s of stream %s failed alone", self.item.row, self.item.stream, exc_info=exc)
        return Delta(self.item.row, "", 0, finish_reason=reason, error=type(exc).__name__)

    def _advance(self, token: int, eos: Collection[int], logprob: TokenLogprob | None, limit: bool | None) -> Delta:
        assert self.detokenizer is not None
        params = self.params
        self.generated.append(token)
        if self.processors is not None:
            self.processors.accept(token)
        # A stop_token_ids token ends the row and, as in vLLM, is not part of the text.
        text = self.detokenizer.add(token) if token not in params.stop_token_ids else ""
        reason: FinishReason | None = None
        stop_token = token in params.stop_token_ids
        if self.detokenizer.stopped or (limit is not False and token in eos and not params.ignore_eos) or stop_token:
            reason = "stop"
        elif limit is not False and len(self.generated) >= self.params.max_new_tokens:
            reason = "length"
        if reason is not None and not self.detokenizer.stopped:
            text += self.detokenizer.flush()
            if self.detokenizer.stopped:  # the flushed tail completed a stop string
                reason = "stop"
        self.finish_reason = reason
        return Delta(self.item.row, text, 1, (logprob,) if logprob is not None else (), reason)

    def cancel(self) -> Delta:
        """End the row because its caller went away (no token, no text)."""
        self.finish_reason = "cancelled"
        return Delta(self.item.row, "", 0, finish_reason="cancelled")


def choose(
    logits: torch.Tensor, rows: Sequence[Row], seen: Sequence[torch.Tensor | None] | None, texts: TokenTexts
) -> tuple[list[int], list[TokenLogprob | None]]:
    """One step's token per row, and its log-probability entry for the rows that asked.

    Log-probabilities come from the raw ``logits`` (before penalties and temperature), taken
    before :func:`pick_tokens` changes them in place; rows that did not ask cost nothing. A row
    that fails here gets ``failure`` set (its token is a placeholder), and the others are unaffected.
    """
    asking = [i for i, row in enumerate(rows) if row.params.logprobs is not None]
    raw = logits[asking].log_softmax(dim=-1) if asking else None
    tokens = pick_isolated(logits, rows, seen)
    entries: list[TokenLogprob | None] = [None] * len(rows)
    for j, i in enumerate(asking):
        assert raw is not None
        if rows[i].failure is None:
            try:
                entries[i] = token_logprob(raw[j], tokens[i], rows[i].params.logprobs or 0, texts)
            except Exception as exc:
                rows[i].failure = exc
    return tokens, entries


def ended_rows(tokens: torch.Tensor, rows: Sequence[Row], eos_ids: torch.Tensor) -> torch.Tensor:
    """Which rows end with this step's ``tokens``: an end-of-sequence id, or their last allowed token.

    Stop strings are the detokenizer's to find (they need text); this is everything else, for the
    whole batch in two tensor operations.
    """
    budget = torch.tensor([row.params.max_new_tokens - len(row.generated) for row in rows], device=tokens.device)
    return torch.isin(tokens, eos_ids) | (budget <= 1)


def pick_isolated(logits: torch.Tensor, rows: Sequence[Row], seen: Sequence[torch.Tensor | None] | None) -> list[int]:
    """:func:`pick_tokens` for the batch, such that a row that fails fails alone.

    Rows with non-finite scores get ``failure`` and are left out. If the batched pick raises,
    each row is picked on its own (with the uniform draw it already took), and the rows that
    still raise get ``failure``. Failed rows' tokens are 0 (placeholders, never used).
    """
    bad = _non_finite_rows(logits)
    for i in bad:
        rows[i].failure = FloatingPointError("the model's scores for this row are not finite (NaN or infinity)")
    good = [i for i in range(len(rows)) if i not in bad]
    tokens = [0] * len(rows)
    if not good:
        return tokens
    ok_rows = [rows[i] for i in good]
    draws = row_draws(ok_rows)
    # pick_tokens changes its input in place; keep the scores as they were for a row-by-row retry.
    work = logits[good] if bad or any(penalised(r.params) for r in ok_rows) else logits
    try:
        for i, token in zip(
            good,
            pick_tokens(work, ok_rows, None if seen is None else [seen[i] for i in good], draws).tolist(),
            strict=True,
        ):
            tokens[i] = token
        return tokens
    except Exception:
        logger.warning("sampling failed for a batch of %d rows; picking row by row to find the one at fault", len(good))
    for j, i in enumerate(good):
        try:
            tokens[i] = int(
                pick_tokens(
                    logits[i : i + 1].clone(), [rows[i]], None if seen is None else [seen[i]], draws[j : j + 1]
                )[0]
            )
        except Exception as exc:
            rows[i].failure = exc
    return tokens


def _non_finite_rows(logits: torch.Tensor) -> set[int]:
    """Rows whose scores hold NaN or +inf, or are all -inf: nothing sensible can be sampled."""
    if bool(logits.sum(dim=-1).isfinite().all()):  # one reduction: the usual case, every row fine
        return set()
    broken = logits.isnan().any(dim=-1) | logits.isposinf().any(dim=-1) | logits.isneginf().all(dim=-1)
    return set(broken.nonzero().flatten().tolist()) if bool(broken.any()) else set()


class BatchState:
    """The rows of one Hugging Face ``generate`` call and where their deltas go.

    ``on_step(events)`` is called from the generating thread once per step with the rows that advanced.
    """

    def __init__(
        self,
        rows: Sequence[Row],
        seen_from: Sequence[int],
        eos_token_ids: Collection[int],
        texts: TokenTexts,
        on_step: OnStep,
    ) -> None:
        self.rows = list(rows)
        self.seen_from = list(seen_from)  # where each row's own tokens begin in generate()'s input_ids
        self.eos = frozenset(eos_token_ids)
        self.texts = texts
        self.on_step = on_step


class RowSampler(LogitsProcessor):
    """Makes ``generate`` (run in greedy mode) follow :func:`pick_tokens` row by row."""

    def __init__(self, state: BatchState) -> None:
        self.state = state
        self._custom = any(_needs_sampler(r.params) or r.processors is not None for r in state.rows)
        self._logprobs = any(r.params.logprobs is not None for r in state.rows)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        state = self.state
        if self._logprobs:  # raw, before our penalties; RowStopper completes them with the chosen token
            for i, row in enumerate(state.rows):
                if row.finish_reason is None and row.params.logprobs is not None:
                    row.raw_logprobs = scores[i].float().log_softmax(dim=-1)
        if not self._custom:  # all greedy, no penalty: generate()'s own argmax is the answer
            return scores
        active = [i for i, row in enumerate(state.rows) if row.finish_reason is None]
        if active:
            seen = [input_ids[i, state.seen_from[i] :] for i in active]
            chosen = pick_isolated(scores[active].float(), [state.rows[i] for i in active], seen)
            index = torch.tensor(active, device=scores.device)
            scores[index] = float("-inf")
            scores[index, torch.tensor(chosen, device=scores.device)] = 0.0
        return scores


class RowStopper(StoppingCriteria):
    """Ends each row on its own terms (:meth:`Row.advance`) and reports every step's deltas at once."""

    def __init__(self, state: BatchState) -> None:
        self.state = state
        # generate() pads the rows that have ended when a stopping criterion carries an EOS id.
        self.eos_token_id = next(iter(state.eos), None)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        state = self.state
        last = input_ids[:, -1].tolist()
        done, events = [], []
        for i, row in enumerate(state.rows):
            if row.finish_reason is None:
                if row.cancelled():
                    events.append((row.item, row.cancel()))
                else:
                    entry = None
                    if row.raw_logprobs is not None and row.failure is None:
                        try:
                            entry = token_logprob(row.raw_logprobs, last[i], row.params.logprobs or 0, state.texts)
                        except Exception as exc:
                            row.failure = exc
                    row.raw_logprobs = None
                    events.append((row.item, row.advance(last[i], state.eos, entry)))
            done.append(row.finish_reason is not None)
        if events:
            state.on_step(events)
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def _needs_sampler(params: SamplingParams) -> bool:
    return not params.greedy or penalised(params)
