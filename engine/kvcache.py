"""A key/value cache written in place: one preallocated slot per decoding row.

transformers' ``DynamicCache`` grows every layer's keys and values with ``torch.cat`` at each
step (a copy of the whole cache per token), and joining rows to a running batch meant re-padding
and concatenating all of it. Here each layer owns two buffers of shape
``[slots, kv_heads, capacity, head_dim]``; the batch's row ``i`` lives in slot ``i`` with its
tokens at positions ``0 .. length_i - 1`` (left-aligned, no padding in front). So:

- a decoding step writes one key and one value per row at that row's own position
  (an indexed assignment) and copies nothing else;
- a row that joins has its prefill copied into the next free slot, or, when it joins during a
  step (``joining``), has its prompt's keys and values written there by that step's pass; the
  others are not touched;
- a row that leaves is replaced by the batch's last row (its used positions only), so the rows in
  use stay ``slots[:n]`` and a step runs on a view, never on a gathered copy;
- attention reads ``[:n, :, :width]`` (``width``: the longest row after this step, rounded up to
  a multiple of :data:`WIDTH_STEP`) with a mask that hides each row's positions past its own length;
  with ``whole`` steps (bfloat16's batched products) it reads the buffers' whole capacity instead
  while the longest row fills at least half of it, a dense block that needs no copy;
  The rounding keeps the step's shapes few: oneDNN (and PyTorch's ideep above it) compile and cache
  a kernel per matrix shape, and a width that grew by one every step made a new one each step,
  about 0.4 MB apiece, held until their caches' 1024 entries were full (0.4 GB on a 2-layer toy
  model in bfloat16).

Buffers are allocated for what the rows hold (slots and positions rounded up to a power of two)
and double, copying what is in use, when a row outgrows them; they are kept between batches, so a
request that arrives to an idle engine pays no allocation. Stale values past a row's length are
never read unmasked, and a masked position adds exactly zero to the attention output.

Example::

    cache = SlotCache(num_layers=12)
    cache.reserve(slots=1, positions=5, like=dynamic_cache)
    cache.load(slot=0, prefill=dynamic_cache, source_row=0, start=3, length=5)
    mask, positions = cache.begin_step(rows=1, dtype=torch.float32, additive=False)
    model(input_ids=..., position_ids=positions[:, None], attention_mask=mask, past_key_values=cache)
    cache.end_step(rows=1)
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

WIDTH_STEP = 16  # attention's width is a multiple of this (at most the capacity, itself a multiple of 64)


def _round_up(n: int, floor: int) -> int:
    return max(floor, 1 << (max(n, 1) - 1).bit_length())


class SlotLayer(CacheLayerMixin):
    """One layer's key and value buffers; ``update`` writes each row's new entry at its position."""

    is_compileable = False
    is_sliding = False

    def __init__(self, cache: SlotCache) -> None:
        super().__init__()
        self.cache = cache
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:  # pragma: no cover
        pass  # buffers are made by SlotCache.reserve, from the prefill's shapes

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        cache = self.cache
        assert self.keys is not None and self.values is not None
        rows = key_states.shape[0]
        # A model split over several GPUs keeps each layer's buffers on its layer's device; the
        # index tensors live on the first layer's (a no-op there, a few bytes copied elsewhere).
        device = self.keys.device
        if cache.joining is not None:  # a step with prompts joining: every token goes to its own slot and position
            slots, positions = (index.to(device) for index in cache.joining)
            self.keys[slots, :, positions] = key_states[0].transpose(0, 1)
            self.values[slots, :, positions] = value_states[0].transpose(0, 1)
            return self.keys, self.values  # whole: engine.attention reads each part's own slots
        slots, positions = cache.row_index[:rows].to(device), cache.lengths[:rows].to(device)
        # Index tensors on dims 0 and 2 select [rows, heads, head_dim]: one entry per row, in place.
        self.keys[slots, :, positions] = key_states[:, :, -1]
        self.values[slots, :, positions] = value_states[:, :, -1]
        return self.keys[:rows, :, : cache.width], self.values[:rows, :, : cache.width]

    def get_mask_sizes(self, *args: Any, **kwargs: Any) -> tuple[int, int]:
        return self.cache.width, 0

    def get_seq_length(self) -> int:
        return self.cache.width

    def get_max_length(self) -> int:
        return -1


class SlotCache(Cache):
    """Per-row slots for a decoder-only model's keys and values (see the module docstring)."""

    def __init__(self, num_layers: int) -> None:
        self.slot_layers = [SlotLayer(self) for _ in range(num_layers)]
        super().__init__(layers=list(self.slot_layers))
        self.lengths = torch.zeros(0, dtype=torch.long)  # tokens cached per slot
        self.row_index = torch.zeros(0, dtype=torch.long)  # arange(slots), for index_put_
        self.host_lengths: list[int] = []  # the same lengths, read without touching a tensor
        self.width = 0  # positions attention reads during the current step
        # During a step that prefills joining prompts too: each token's (slot, position), both [tokens].
        self.joining: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def slots(self) -> int:
        return self.lengths.shape[0]

    @property
    def capacity(self) -> int:
        keys = self.slot_layers[0].keys
        return 0 if keys is None else keys.shape[2]

    def reserve(self, slots: int, positions: int, like: Cache | None = None) -> None:
        """Make room for ``slots`` rows of ``positions`` tokens; the first call takes shapes from ``like``."""
        if slots <= self.slots and positions <= self.capacity:
            return
        new_slots = _round_up(max(slots, self.slots), 4)
        new_capacity = _round_up(max(positions, self.capacity), 64)
        used = sum(1 for n in self.host_lengths if n)  # rows in use are always slots[:used]
        width = max(self.host_lengths, default=0)
        for i, layer in enumerate(self.slot_layers):
            shape_of = layer if layer.keys is not None else like.layers[i] if like is not None else None
            if shape_of is None:
                raise ValueError("the first reserve needs a cache to take the buffers' shapes from")
            _, heads, _, key_dim = shape_of.keys.shape
            value_dim = shape_of.values.shape[-1]
            spec = {"dtype": shape_of.keys.dtype, "device": shape_of.keys.device}
            keys = torch.zeros((new_slots, heads, new_capacity, key_dim), **spec)
            values = torch.zeros((new_slots, heads, new_capacity, value_dim), **spec)
            if layer.keys is not None and layer.values is not None and used:
                keys[:used, :, :width] = layer.keys[:used, :, :width]
                values[:used, :, :width] = layer.values[:used, :, :width]
            layer.keys, layer.values = keys, values
        device = self.slot_layers[0].keys.device  # type: ignore[union-attr]
        lengths = torch.zeros(new_slots, dtype=torch.long, device=device)
        lengths[: self.slots] = self.lengths
        self.lengths = lengths
        self.row_index = torch.arange(new_slots, device=device)
        self.host_lengths = self.host_lengths + [0] * (new_slots - len(self.host_lengths))

    def load(self, slot: int, prefill: Cache, source_row: int, start: int, length: int) -> None:
        """Copy row ``source_row`` of a prefill cache (its positions ``start:start + length``) into ``slot``."""
        for layer, model_layer in zip(self.slot_layers, prefill.layers, strict=True):
            assert layer.keys is not None and layer.values is not None
            layer.keys[slot, :, :length] = model_layer.keys[source_row, :, start : start + length]
            layer.values[slot, :, :length] = model_layer.values[source_row, :, start : start + length]
        self.lengths[slot] = length
        self.host_lengths[slot] = length

    def move(self, source: int, target: int) -> None:
        """Put the row in slot ``source`` into slot ``target`` (its used positions only); ``source`` is freed."""
        length = self.host_lengths[source]
        for layer in self.slot_layers:
            assert layer.keys is not None and layer.values is not None
            layer.keys[target, :, :length] = layer.keys[source, :, :length]
            layer.values[target, :, :length] = layer.values[source, :, :length]
        self.lengths[target] = length
        self.host_lengths[target] = length
        self.free(source)

    def cast(self, dtype: torch.dtype) -> None:
        """Hold the keys and values in ``dtype`` from now on (rows in use keep theirs, cast).

        Not named ``to``: accelerate's offload hooks call ``.to(device)`` on any argument that has one.
        """
        for layer in self.slot_layers:
            if layer.keys is not None and layer.values is not None and layer.keys.dtype != dtype:
                layer.keys, layer.values = layer.keys.to(dtype), layer.values.to(dtype)

    def free(self, slot: int) -> None:
        self.lengths[slot] = 0
        self.host_lengths[slot] = 0

    def begin_step(
        self, rows: int, dtype: torch.dtype, additive: bool, whole: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The attention mask (``[rows, 1, 1, width]``) and position of this step's token per row.

        ``additive``: a float mask to add to the scores (eager attention), else a boolean one (SDPA).
        ``whole``: attention reads the buffers' whole capacity while the longest row fills at least
        half of it (the rest masked), so that ``[:rows]`` is one dense block that a batched product
        takes as it is; ``[:rows, :, :width]`` of a wider buffer is strided, and oneDNN's batched
        product copies a strided operand before every call (``engine.attention``).
        """
        longest = max(self.host_lengths[:rows]) + 1
        if longest > self.capacity:  # a row outgrew the buffers: double them (rare)
            self.reserve(rows, longest)
        width = min(self.capacity, -(-longest // WIDTH_STEP) * WIDTH_STEP)
        self.width = self.capacity if whole and 2 * width >= self.capacity else width
        positions = self.lengths[:rows]
        span = torch.arange(self.width, device=positions.device)
        keep = (span[None, :] <= positions[:, None])[:, None, None, :]
        if not additive:
            return keep, positions
        mask = torch.zeros(keep.shape, dtype=dtype, device=keep.device)
        return mask.masked_fill_(~keep, torch.finfo(dtype).min), positions

    def end_step(self, rows: int) -> None:
        self.lengths[:rows] += 1
        for i in range(rows):
            self.host_lengths[i] += 1
