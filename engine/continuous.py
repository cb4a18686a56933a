"""Iteration-level (continuous) batching for decoder-only models, over a cache written in place.

A batch is a set of rows decoding together, one token per step. Between steps, rows that ended
leave (their answer goes out at once, and they stop costing compute) and prompts that arrived
join: they are prefilled together (packed end to end in one sequence, no padding) and copied into
free slots of the batch's :class:`SlotCache`, the rows already decoding are not touched. So a
request that arrives while others decode waits at most one step, not a whole generation (in a wave
of arrivals, one step per ``STEP_PROMPT_TOKENS`` of prompts ahead of it: ``engine.admission``), and
nothing is re-padded or concatenated.

Each row keeps its own length and positions (its tokens start at position 0 in its slot); a
step's attention mask hides what lies past each row's length.

It works on Hugging Face models whose cache is a plain ``DynamicCache`` of full-attention layers,
whose forward takes ``position_ids``, and whose attention is SDPA or eager (they take a prepared
4-D mask); :func:`supports` checks, and the engine falls back to static batches through
``generate`` for anything else (encoder-decoder, sliding-window layers, other kernels...).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Collection, Sequence
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from engine.admission import BatchShape
from engine.attention import NAME as ATTENTION
from engine.attention import PRODUCTS_NAME as PRODUCTS_ATTENTION
from engine.attention import JoiningStep, equal_runs
from engine.kvcache import SlotCache
from engine.logprobs import TokenTexts
from engine.sampling import Row, choose, ended_rows
from engine.types import Delta
from engine.work import WorkItem

Events = list[tuple[WorkItem, Delta]]
logger = logging.getLogger(__name__)
# attention implementation -> takes an additive (float) mask; engine.attention's runs SDPA's masks
_MASKS = {"sdpa": False, "eager": True, "cpu_packed_sdpa": False, "cpu_decode_products": False}
# Tokens per packed prefill pass: its mask is this squared in booleans (4 MiB), its activations this x hidden.
PACKED_PREFILL_TOKENS = 2048
# Prompt tokens that may join a decode step's own pass (JoiningStep); more are prefilled in a pass of their own,
# so that a long prompt does not hold the decoding rows' next token back for a whole long prefill.
JOINING_STEP_TOKENS = 512


def supports(model: Any) -> bool:
    """Whether :class:`ContinuousBatch` can drive this model (decided before any request)."""
    if model.config.is_encoder_decoder:
        return False
    if not _takes(model, "position_ids"):
        return False
    if getattr(model.config, "_attn_implementation", None) not in _MASKS:
        return False
    cache = DynamicCache(config=model.config)
    return all(type(layer) is DynamicLayer for layer in cache.layers)


def new_cache(model: Any) -> SlotCache:
    """An empty slot cache for ``model`` (its buffers come with the first rows)."""
    return SlotCache(len(DynamicCache(config=model.config).layers) or model.config.num_hidden_layers)


class ContinuousBatch:
    """The rows decoding together; row ``i`` lives in slot ``i`` of the cache.

    Each call that decodes returns the step's events: one delta per row that advanced; rows that
    ended (their delta carries the finish reason) have left the batch when it returns.

    Example::

        batch = ContinuousBatch(model, pad_id, eos_ids, texts)
        events = batch.admit(rows)   # prefill; each row gets its first token
        while batch.rows:
            events = batch.step()    # one token per row; ended rows leave
    """

    def __init__(
        self, model: Any, pad_id: int, eos_ids: Collection[int], texts: TokenTexts, cache: SlotCache | None = None
    ) -> None:
        self.model = model
        self.device = model.device
        self.pad_id = pad_id
        self.eos = frozenset(eos_ids)
        self.eos_ids = torch.tensor(sorted(self.eos), dtype=torch.long)  # on the CPU, as the tokens are
        self.texts = texts
        # Prefill needs logits at each row's last position only, not vocab x prompt length.
        self._keeps_logits = _takes(model, "logits_to_keep")
        self._passes_kwargs = any(
            p.kind is inspect.Parameter.VAR_KEYWORD for p in inspect.signature(model.forward).parameters.values()
        )
        self._additive_mask = _MASKS.get(getattr(model.config, "_attn_implementation", "sdpa"), False)
        # Prompts can join a step's pass where engine.attention runs the attention (it reads the plan).
        self._joins_steps = (
            self._keeps_logits
            and self._passes_kwargs
            and getattr(model.config, "_attn_implementation", None) in (ATTENTION, PRODUCTS_ATTENTION)
        )
        # bfloat16 steps by engine.attention's batched products read the cache's buffers whole (no copies).
        self._whole_steps = getattr(model.config, "_attn_implementation", None) == PRODUCTS_ATTENTION
        self.rows: list[Row] = []
        self.cache = cache if cache is not None else new_cache(model)
        for slot in range(self.cache.slots):  # a batch that failed may have left rows behind
            self.cache.free(slot)
        self.last = torch.zeros(0, dtype=torch.long, device=self.device)  # token each slot feeds next

    # --- joining ---------------------------------------------------------------------------
    def admit(self, rows: Sequence[Row]) -> Events:
        """Prefill ``rows``, pick their first tokens, and copy their keys and values into free slots."""
        if not rows:
            return []
        try:
            logits, sources = self._prefill(rows)
        except Exception as exc:
            # The joining rows' own step failed (e.g. out of memory on their prompts): they end,
            # retryable, and the rows already decoding (whose slots are untouched) go on.
            logger.exception("prefill of %d joining rows failed; the %d running rows go on", len(rows), len(self.rows))
            return [(row.item, row.fail(exc, "aborted")) for row in rows]
        first, logprobs = choose(logits, rows, None, self.texts)
        start = len(self.rows)
        width = max(len(r.prompt_ids) for r in rows)
        self.cache.reserve(start + len(rows), width + 1, like=sources[0][0])
        for slot, (prefill, offset, length) in enumerate(sources, start):
            self.cache.load(slot, prefill, 0, offset, length)
        self._feed(first, start)
        self.rows = self.rows + list(rows)
        return self._record(first, logprobs, start)

    def _prefill(self, rows: Sequence[Row]) -> tuple[torch.Tensor, list[tuple[DynamicCache, int, int]]]:
        """Run the prompts packed end to end, without padding: each row's last logits and where its cache is.

        Prompts are laid side by side in one sequence (up to :data:`PACKED_PREFILL_TOKENS` a pass),
        each with positions from 0 and a block-diagonal causal mask, so a pass costs the prompts'
        own tokens, not rows x the longest prompt (1.45x faster on the benchmark's 16 prompts).
        Returns logits ``[rows, vocab]`` and, per row, (the pass's cache, the row's offset in it,
        its length). A pass where some row's scores are not finite is run again one row at a
        time: a NaN in one prompt's keys would reach its neighbours through the masked products.
        """
        logits: list[torch.Tensor] = []
        sources: list[tuple[DynamicCache, int, int]] = []
        for group in _groups([len(r.prompt_ids) for r in rows], PACKED_PREFILL_TOKENS):
            part, where = self._packed_pass([rows[i].prompt_ids for i in group])
            if len(group) > 1 and not bool(torch.isfinite(part).all()):
                singles = [self._packed_pass([rows[i].prompt_ids]) for i in group]
                part, where = torch.cat([lg for lg, _ in singles]), [w for _, ws in singles for w in ws]
            logits.append(part)
            sources += where
        return torch.cat(logits), sources

    def _packed_pass(self, prompts: list[list[int]]) -> tuple[torch.Tensor, list[tuple[DynamicCache, int, int]]]:
        lengths = [len(p) for p in prompts]
        ids = torch.tensor([[t for p in prompts for t in p]], device=self.device)
        positions = torch.cat([torch.arange(n) for n in lengths])[None].to(self.device)
        segment = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)).to(self.device)
        causal = torch.ones(ids.shape[1], ids.shape[1], dtype=torch.bool, device=self.device).tril_()
        keep = ((segment[:, None] == segment[None, :]) & causal)[None, None]
        mask = keep if not self._additive_mask else _additive(keep, self.model.dtype)
        ends = torch.tensor(lengths, device=self.device).cumsum(0) - 1
        prefill = DynamicCache(config=self.model.config)
        kwargs: dict[str, Any] = {"logits_to_keep": ends} if self._keeps_logits else {}
        if self._passes_kwargs:  # the prompts' bounds, for engine.attention to attend prompt by prompt
            kwargs["cu_seq_lens_q"] = torch.cat([ends.new_zeros(1), ends + 1])
        out = self.model(
            input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=prefill, use_cache=True,
            **kwargs,
        )  # fmt: skip
        logits = (out.logits[0] if self._keeps_logits else out.logits[0, ends]).float()
        return logits, [(prefill, int(end) - n + 1, n) for end, n in zip(ends.tolist(), lengths, strict=True)]

    # --- decoding ----------------------------------------------------------------------------
    def joins_step(self, prompt_lengths: Sequence[int]) -> bool:
        """Whether prompts of these lengths can join the next :meth:`step`'s pass (else :meth:`admit` them first)."""
        return bool(self.rows) and self._joins_steps and sum(prompt_lengths) <= JOINING_STEP_TOKENS

    def step(self, joining: Sequence[Row] = ()) -> Events:
        """Feed every row its last token, pick the next one, and let ended rows go.

        ``joining``: rows to prefill in the same pass (:meth:`joins_step` said they can); they get
        their first token as the others their next. One pass instead of two: a decode step reads
        every weight once, however few its rows, and so does a prefill of a few short prompts.
        If that pass fails, the joining rows are prefilled on their own and the step runs again
        without them, so they fail (or not) as they would have alone.
        """
        if joining and not self.rows:  # (the decoding rows were all cancelled meanwhile)
            return self.admit(joining)
        if joining:
            try:
                logits = self._joining_pass(joining)
            except Exception:
                # Nothing was recorded: the decoding rows' lengths are as before the pass (what it wrote
                # past them is overwritten by the next step), and the joining rows' slots are free.
                logger.exception("a step with %d joining rows failed; they are prefilled on their own", len(joining))
                return self.admit(joining) + self.step()
            return self._joined(joining, logits)
        n = len(self.rows)
        dtype = self.model.dtype
        mask, positions = self.cache.begin_step(n, dtype, self._additive_mask, whole=self._whole(dtype))
        out = self.model(
            input_ids=self.last[:n, None],
            attention_mask=mask,
            position_ids=positions[:, None],
            past_key_values=self.cache,
            use_cache=True,
        )
        self.cache.end_step(n)
        logits = out.logits[:, -1].float()
        tokens, logprobs = choose(logits, self.rows, None, self.texts)
        self.last[:n] = torch.tensor(tokens, dtype=torch.long, device=self.device)
        return self._record(tokens, logprobs, 0)

    def _whole(self, dtype: torch.dtype) -> bool:
        return self._whole_steps and dtype == torch.bfloat16

    def _joining_pass(self, joining: Sequence[Row]) -> torch.Tensor:
        """The forward pass of a step with ``joining``'s prompts (``engine.attention.JoiningStep``): its logits,
        each decoding row's and then each joining prompt's last ``[rows, vocab]``. Records nothing."""
        n, lengths = len(self.rows), [len(row.prompt_ids) for row in joining]
        device = self.device
        self.cache.reserve(n + len(joining), max(lengths) + 1)
        dtype = self.model.dtype
        mask, positions = self.cache.begin_step(n, dtype, additive=False, whole=self._whole(dtype))
        slots = torch.arange(n, n + len(joining))
        prompt_positions = torch.cat([torch.arange(length) for length in lengths])
        tokens = torch.tensor([t for row in joining for t in row.prompt_ids], dtype=torch.long, device=device)
        ids = torch.cat([self.last[:n], tokens])[None]
        token_positions = torch.cat([positions.cpu(), prompt_positions])
        token_slots = torch.cat([torch.arange(n), torch.repeat_interleave(slots, torch.tensor(lengths))])
        ends = n + torch.tensor(lengths).cumsum(0) - 1
        runs = tuple((n + first, length, count) for first, length, count in equal_runs(lengths))  # by slot
        plan = JoiningStep(decode_rows=n, decode_mask=mask, width=self.cache.width, prompts=runs)
        keep = torch.cat([torch.arange(n), ends]).to(device)  # logits: each decoding row's, each prompt's last
        self.cache.joining = (token_slots.to(device), token_positions.to(device))
        try:
            out = self.model(
                input_ids=ids, attention_mask=mask, position_ids=token_positions[None].to(device),
                past_key_values=self.cache, use_cache=True, logits_to_keep=keep, joining_step=plan,
            )  # fmt: skip
        finally:
            self.cache.joining = None
        return out.logits[0].float()

    def _joined(self, joining: Sequence[Row], logits: torch.Tensor) -> Events:
        """Record a joining pass: the decoding rows advance, the joining rows take their slots and first tokens."""
        n = len(self.rows)
        self.cache.end_step(n)
        for slot, row in enumerate(joining, n):
            self.cache.lengths[slot] = len(row.prompt_ids)
            self.cache.host_lengths[slot] = len(row.prompt_ids)
        rows = self.rows + list(joining)
        chosen, logprobs = choose(logits, rows, None, self.texts)
        self._feed(chosen, 0)
        self.rows = rows
        return self._record(chosen, logprobs, 0)

    def _feed(self, tokens: list[int], start: int) -> None:
        """Slots ``start:start + len(tokens)`` feed these tokens next (``last`` grows with the cache's slots)."""
        if self.last.shape[0] < self.cache.slots:
            last = torch.zeros(self.cache.slots, dtype=torch.long, device=self.device)
            last[:start] = self.last[:start]
            self.last = last
        self.last[start : start + len(tokens)] = torch.tensor(tokens, dtype=torch.long, device=self.device)

    def shape(self) -> BatchShape:
        """The batch as its token budget sees it (``engine.admission``): its width, the tokens still to come."""
        width = max((len(r.prompt_ids) + len(r.generated) for r in self.rows), default=0)
        return BatchShape(width=width, remaining=tuple(r.params.max_new_tokens - len(r.generated) for r in self.rows))

    def _record(self, tokens: list[int], logprobs: list, start: int) -> Events:
        """Advance rows ``start:start + len(tokens)`` by their new tokens; drop the rows that ended."""
        rows = self.rows[start : start + len(tokens)]
        done = ended_rows(torch.tensor(tokens, dtype=torch.long), rows, self.eos_ids).tolist()
        events: Events = []
        for row, token, logprob, end in zip(rows, tokens, logprobs, done, strict=True):
            events.append((row.item, row.advance(token, self.eos, logprob, end)))
        if any(row.finish_reason is not None for row in rows):
            self._leave([i for i, row in enumerate(self.rows) if row.finish_reason is not None])
        return events

    def drop_cancelled(self) -> Events:
        """End rows whose caller went away, without spending another step on them."""
        events = [(row.item, row.cancel()) for row in self.rows if row.cancelled()]
        if events:
            self._leave([i for i, row in enumerate(self.rows) if row.finish_reason is not None])
        return events

    def _leave(self, gone: list[int]) -> None:
        """Free the slots of rows ``gone``; the last rows move into the holes so slots stay contiguous."""
        rows: list[Row | None] = list(self.rows)
        for slot in sorted(gone, reverse=True):  # from the back: a moved row never lands on a later hole
            last = len(rows) - 1
            if slot != last:
                self.cache.move(last, slot)
                self.last[slot] = self.last[last]
                rows[slot] = rows[last]
            else:
                self.cache.free(slot)
            rows.pop()
        self.rows = [row for row in rows if row is not None]


def _groups(lengths: list[int], budget: int) -> list[list[int]]:
    """Consecutive indices of ``lengths`` in groups of at most ``budget`` tokens (a longer one alone)."""
    groups: list[list[int]] = []
    total = budget + 1
    for i, n in enumerate(lengths):
        if total + n > budget:
            groups.append([])
            total = 0
        groups[-1].append(i)
        total += n
    return groups


def _additive(keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill_(~keep, torch.finfo(dtype).min)


def _takes(model: Any, argument: str) -> bool:
    return argument in inspect.signature(model.forward).parameters
