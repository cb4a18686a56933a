"""Iteration-level (continuous) batching for decoder-only models.

A batch is a set of rows decoding together, one token per step. Between steps, rows that ended
leave (their answer goes out at once, and they stop costing compute) and prompts that arrived
join: they are prefilled together, and their key/value cache is merged into the batch's by
left-padding the shorter one, with the attention mask hiding the padding. So a request that
arrives while others decode waits at most one step, not a whole generation.

It works on Hugging Face models whose cache is a plain ``DynamicCache`` of full-attention layers
and whose forward takes ``position_ids``; :func:`supports` checks, and the engine falls back to
static batches through ``generate`` for anything else (encoder-decoder, sliding-window layers...).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Collection, Sequence
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from engine.logprobs import TokenTexts
from engine.sampling import Row, choose
from engine.types import Delta
from engine.work import WorkItem

Events = list[tuple[WorkItem, Delta]]
logger = logging.getLogger(__name__)


def supports(model: Any) -> bool:
    """Whether :class:`ContinuousBatch` can drive this model (decided before any request)."""
    if model.config.is_encoder_decoder:
        return False
    if not _takes(model, "position_ids"):
        return False
    cache = DynamicCache(config=model.config)
    return all(type(layer) is DynamicLayer for layer in cache.layers)


class ContinuousBatch:
    """The rows decoding together and their key/value cache.

    Each call that decodes returns the step's events: one delta per row that advanced; rows that
    ended (their delta carries the finish reason) have left the batch when it returns.

    Example::

        batch = ContinuousBatch(model, pad_id, eos_ids, texts)
        events = batch.admit(rows)   # prefill; each row gets its first token
        while batch.rows:
            events = batch.step()    # one token per row; ended rows leave
    """

    def __init__(self, model: Any, pad_id: int, eos_ids: Collection[int], texts: TokenTexts) -> None:
        self.model = model
        self.device = model.device
        self.pad_id = pad_id
        self.eos = frozenset(eos_ids)
        self.texts = texts
        # Prefill needs logits at each row's last position only, not vocab x prompt length.
        self._prefill_kwargs = {"logits_to_keep": 1} if _takes(model, "logits_to_keep") else {}
        self.rows: list[Row] = []
        self.cache: DynamicCache | None = None
        self.mask = torch.zeros((0, 0), dtype=torch.long, device=self.device)  # rows x (cache length)
        self.positions = torch.zeros(0, dtype=torch.long, device=self.device)  # next position per row
        self.last = torch.zeros(0, dtype=torch.long, device=self.device)  # token each row feeds next

    # --- joining ---------------------------------------------------------------------------
    def admit(self, rows: Sequence[Row]) -> Events:
        """Prefill ``rows`` together, pick their first tokens, and merge them into the batch."""
        if not rows:
            return []
        width = max(len(r.prompt_ids) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, width - len(row.prompt_ids) :] = torch.tensor(row.prompt_ids)
            mask[i, width - len(row.prompt_ids) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp_(min=0)
        cache = DynamicCache(config=self.model.config)
        try:
            out = self.model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions,
                past_key_values=cache,
                use_cache=True,
                **self._prefill_kwargs,
            )
        except Exception as exc:
            # The joining rows' own step failed (e.g. out of memory on their prompts): they end,
            # retryable, and the rows already decoding (whose cache is untouched) go on.
            logger.exception("prefill of %d joining rows failed; the %d running rows go on", len(rows), len(self.rows))
            del cache
            return [(row.item, row.fail(exc, "aborted")) for row in rows]
        logits = out.logits[:, -1].float()
        seen = [torch.tensor(r.prompt_ids) for r in rows]
        first, logprobs = choose(logits, rows, seen, self.texts)
        last = torch.tensor(first, dtype=torch.long, device=self.device)
        self._merge(list(rows), out.past_key_values, mask, positions[:, -1] + 1, last)
        return self._record(first, logprobs, range(len(self.rows) - len(rows), len(self.rows)))

    def _merge(self, rows: list[Row], cache: DynamicCache, mask: torch.Tensor, positions, last) -> None:
        if self.cache is None or not self.rows:
            self.rows, self.cache, self.mask, self.positions, self.last = rows, cache, mask, positions, last
            return
        old, new = self.mask.shape[1], mask.shape[1]
        width = max(old, new)
        for mine, theirs in zip(self.cache.layers, cache.layers, strict=True):
            mine.keys = torch.cat([_pad_left(mine.keys, width), _pad_left(theirs.keys, width)], dim=0)
            mine.values = torch.cat([_pad_left(mine.values, width), _pad_left(theirs.values, width)], dim=0)
        self.mask = torch.cat([_pad_left(self.mask, width, dim=1), _pad_left(mask, width, dim=1)], dim=0)
        self.positions = torch.cat([self.positions, positions])
        self.last = torch.cat([self.last, last])
        self.rows = self.rows + rows

    # --- decoding ----------------------------------------------------------------------------
    def step(self) -> Events:
        """Feed every row its last token, pick the next one, and let ended rows go."""
        assert self.cache is not None
        ones = torch.ones((len(self.rows), 1), dtype=torch.long, device=self.device)
        self.mask = torch.cat([self.mask, ones], dim=1)
        out = self.model(
            input_ids=self.last[:, None],
            attention_mask=self.mask,
            position_ids=self.positions[:, None],
            past_key_values=self.cache,
            use_cache=True,
        )
        logits = out.logits[:, -1].float()
        seen = [self._seen(r) for r in self.rows]
        tokens, logprobs = choose(logits, self.rows, seen, self.texts)
        self.last = torch.tensor(tokens, dtype=torch.long, device=self.device)
        self.positions = self.positions + 1
        return self._record(tokens, logprobs, range(len(self.rows)))

    def _seen(self, row: Row) -> torch.Tensor | None:
        if row.params.repetition_penalty == 1.0:
            return None
        return torch.tensor(row.prompt_ids + row.generated)

    def _record(self, tokens: list[int], logprobs: list, indices: Sequence[int]) -> Events:
        """Advance each row by its new token, and drop the rows that ended from the batch."""
        events: Events = []
        ended = False
        for index, token, logprob in zip(indices, tokens, logprobs, strict=True):
            row = self.rows[index]
            delta = row.advance(token, self.eos, logprob)
            events.append((row.item, delta))
            ended = ended or delta.finish_reason is not None
        if ended:
            self._keep([i for i, row in enumerate(self.rows) if row.finish_reason is None])
        return events

    def drop_cancelled(self) -> Events:
        """End rows whose caller went away, without spending another step on them."""
        events = [(row.item, row.cancel()) for row in self.rows if row.cancelled()]
        if events:
            self._keep([i for i, row in enumerate(self.rows) if row.finish_reason is None])
        return events

    def _keep(self, indices: list[int]) -> None:
        index = torch.tensor(indices, dtype=torch.long, device=self.device)
        self.rows = [self.rows[i] for i in indices]
        self.mask, self.positions, self.last = self.mask[index], self.positions[index], self.last[index]
        assert self.cache is not None
        for layer in self.cache.layers:
            layer.batch_select_indices(index)
        # Columns no remaining row attends to (padding of rows that left) cost compute: cut them.
        if self.rows:
            first_used = int(self.mask.any(dim=0).int().argmax())
            if first_used > 0:
                self.mask = self.mask[:, first_used:]
                for layer in self.cache.layers:
                    layer.keys = layer.keys[:, :, first_used:]
                    layer.values = layer.values[:, :, first_used:]


def _pad_left(tensor: torch.Tensor, width: int, dim: int = 2) -> torch.Tensor:
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


def _takes(model: Any, argument: str) -> bool:
    return argument in inspect.signature(model.forward).parameters
