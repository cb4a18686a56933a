"""The engine's attention on CPU: a packed prefill attended prompt by prompt, and a decode step fit for the CPU.

A packed prefill (the engine's prompts end to end, ``cu_seq_lens_q`` their bounds) runs SDPA once
per prompt, exactly as that prompt alone would. A bfloat16 decoding step (query length 1, a
prepared mask) reads the slot cache's keys and values as strided views (``engine/kvcache.py``),
and which kernel reads them fastest depends on the CPU:

- **With AMX** (``amx_bf16``): PyTorch's CPU SDPA. Its flash kernel multiplies with AMX tiles and
  reads the strided views as they are. On the Intel VM (two threads, GPT-2-small, 11-token prompts
  decoding 64 tokens) a step took 0.87-0.92x the time of the two products below at 1 to 32 rows;
  at 16 rows one layer's attention took 230 us against 890 us.
- **Without AMX** (AVX512-BF16 only, as on the AMD EPYC VM): two batched products over the same
  keys and values, which SDPA's kernel there took twice as long as (18.5 ms of a 16-row step
  against about 7 ms)::

    scores = keys @ query        # [rows, kv_heads, width, queries per kv head], one GEMV per head
    probs  = softmax(scores * scale + mask) in float32
    out    = probs^T @ values

  which is what transformers' eager attention computes (bfloat16 products, float32 softmax), with
  grouped-query heads folded into the product instead of repeated. ``torch.bmm`` copies a strided
  operand first (oneDNN's matmul wants dense ones, or transposed dense ones), so these steps read
  the cache's buffers whole (``SlotCache.begin_step(whole=True)``) while the longest row fills at
  least half of them: ``[:rows]`` is then one dense block, and ``scores = query @ keys^T`` takes it
  as it is. On the AMD VM (one thread, GPT-2-small, 64 tokens after the benchmark's prompts) a
  16-row step took 41.8 ms against 44.2 ms with the copies, 32 rows 68.4 against 72.9 ms; one row
  alike (21.6 ms). A narrower step reads the strided view and pays the copy.

Everything else (float32 steps, GPUs, no mask) goes to SDPA unchanged. Both are registered with
transformers' attention interface, :data:`NAME` (SDPA decode steps) and :data:`PRODUCTS_NAME`,
with SDPA's mask builder, so the model code calls them like any other implementation.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "cpu_packed_sdpa"  # packed prefills prompt by prompt; decode steps SDPA's (CPUs with AMX)
PRODUCTS_NAME = "cpu_decode_products"  # the same, decode steps as two batched products (CPUs without)


@dataclass(frozen=True)
class JoiningStep:
    """A decode step whose pass also prefills prompts joining the batch (``engine.continuous``).

    The pass's tokens are the decoding rows' (row ``i`` in slot ``i``), then the joining prompts
    end to end; each token's keys and values are already in its slot of the cache, which the
    attention gets whole.
    """

    decode_rows: int
    decode_mask: torch.Tensor  # [decode_rows, 1, 1, width]: each decoding row's positions
    width: int
    prompts: tuple[tuple[int, int, int], ...]  # runs of joining prompts: (first slot, length, how many)


def packed_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """:data:`NAME`: a packed prefill prompt by prompt, every other call SDPA's (decode steps included)."""
    joining = kwargs.pop("joining_step", None)
    if joining is not None:
        return _joining(module, query, key, value, joining, packed_attention, dropout, scaling, **kwargs)
    bounds = kwargs.pop("cu_seq_lens_q", None)
    if bounds is not None and query.shape[0] == 1 and query.shape[2] > 1:
        return _per_prompt(module, query, key, value, bounds.tolist(), dropout, scaling, **kwargs)
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)


def decode_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """:data:`PRODUCTS_NAME`: a bfloat16 decode step as two batched products; the rest as :func:`packed_attention`.

    transformers' attention-interface signature; returns ``[rows, length, heads, head_dim]`` as SDPA's does.
    """
    joining = kwargs.pop("joining_step", None)
    if joining is not None:
        return _joining(module, query, key, value, joining, decode_attention, dropout, scaling, **kwargs)
    rows, heads, length, head_dim = query.shape
    if (
        length != 1
        or attention_mask is None
        or attention_mask.dtype != torch.bool
        or query.dtype != torch.bfloat16
        or query.device.type != "cpu"
        or dropout
        or kwargs.get("softcap") is not None
        or attention_mask.shape[-2] != 1
        or attention_mask.shape[1] not in (1, key.shape[1])
    ):
        return packed_attention(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    kv_heads, width = key.shape[1], key.shape[2]
    group = heads // kv_heads
    scale = head_dim**-0.5 if scaling is None else scaling
    keys, values = key.flatten(0, 1), value.flatten(0, 1)  # [rows * kv_heads, width, head_dim]
    if keys.is_contiguous() and values.is_contiguous():  # the cache's whole buffers (a ``whole`` step)
        # oneDNN takes a dense operand, or a transposed one, as it is: no copy. Query heads on the
        # product's rows, one product per (row, kv head).
        q = query.reshape(rows * kv_heads, group, head_dim).contiguous()
        scores = torch.bmm(q, keys.transpose(1, 2)).float().view(rows, kv_heads, group, width)
        probs = scores.mul_(scale).masked_fill_(~attention_mask, float("-inf")).softmax(dim=-1).to(value.dtype)
        out = torch.bmm(probs.view(rows * kv_heads, group, width), values)  # [rows * kv_heads, group, head_dim]
        return out.reshape(rows, 1, heads, head_dim), None
    # The cache's keys and values are views of larger buffers, dense within each (row, head): fold
    # those two dimensions into bmm's batch. The small operands are made dense (bmm copies
    # transposed ones anyway, at a higher cost).
    q = query.reshape(rows * kv_heads, group, head_dim).transpose(1, 2).contiguous()
    scores = torch.bmm(keys, q).float().view(rows, kv_heads, width, group)
    hidden = ~attention_mask.transpose(-1, -2)  # [rows or 1, 1 or kv_heads, width, 1]
    probs = scores.mul_(scale).masked_fill_(hidden, float("-inf")).softmax(dim=-2).to(value.dtype)
    probs = probs.view(rows * kv_heads, width, group).transpose(1, 2).contiguous()
    out = torch.bmm(probs, values)  # [rows * kv_heads, group, head_dim]
    return out.reshape(rows, 1, heads, head_dim), None


def _per_prompt(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    bounds: list[int],
    dropout: float,
    scaling: float | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """A packed prefill (prompts end to end, ``bounds`` their cumulative lengths): each prompt's own causal SDPA.

    The same computation as the prompt prefilled alone: its answer cannot depend on the prompts it
    was packed with (a masked product over the whole sequence would round differently with its
    length), and no product is spent on the masked-out blocks. Consecutive prompts of one length
    go to SDPA together, as the entries of one batch (one call instead of one per prompt per layer:
    16 prompts of 20 tokens, GPT-2-small, 12 calls instead of 192); each entry is computed alone.
    """
    kwargs.pop("cu_seq_lens_k", None)
    outputs = []
    for first, length, count in equal_runs([b - a for a, b in itertools.pairwise(bounds)]):
        q, k, v = (_as_batch(states, bounds[first], length, count) for states in (query, key, value))
        outputs.append(_causal(module, q, k, v, dropout, scaling, kwargs))
    return torch.cat(outputs, dim=1) if len(outputs) > 1 else outputs[0], None


def _joining(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    step: JoiningStep,
    decode: Any,
    dropout: float,
    scaling: float | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """A :class:`JoiningStep`'s attention: the decoding rows' as any decode step's (``decode``), then each
    run of joining prompts' own causal SDPA over their slots, as a packed prefill does.

    ``query``: ``[1, heads, tokens, dim]``; ``key`` and ``value``: the cache's whole buffers
    ``[slots, kv_heads, capacity, dim]``.
    """
    outputs = []
    rows = step.decode_rows
    if rows:
        q = query[0, :, :rows].transpose(0, 1).unsqueeze(2)  # [rows, heads, 1, dim]
        keys, values = key[:rows, :, : step.width], value[:rows, :, : step.width]
        out = decode(module, q, keys, values, step.decode_mask, dropout, scaling, **kwargs)[0]
        outputs.append(out.reshape(1, rows, *out.shape[2:]))
    start = rows
    for slot, length, count in step.prompts:
        q = _as_batch(query, start, length, count)
        keys, values = key[slot : slot + count, :, :length], value[slot : slot + count, :, :length]
        outputs.append(_causal(module, q, keys, values, dropout, scaling, kwargs))
        start += count * length
    return torch.cat(outputs, dim=1), None


def _causal(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    dropout: float,
    scaling: float | None,
    kwargs: dict[str, Any],
) -> torch.Tensor:
    """A batch of prompts' own causal SDPA (``[count, heads, length, dim]`` each), laid end to end:
    ``[1, count * length, heads, dim]``."""
    out = sdpa_attention_forward(module, query, key, value, None, dropout, scaling, is_causal=True, **kwargs)[0]
    return out.reshape(1, -1, *out.shape[2:])


def _as_batch(states: torch.Tensor, start: int, length: int, count: int) -> torch.Tensor:
    """``count`` prompts of ``length`` tokens laid end to end from ``start`` (``[1, heads, tokens, dim]``), as a
    batch ``[count, heads, length, dim]`` (a view)."""
    span = states[0, :, start : start + length * count]
    return span.unflatten(1, (count, length)).transpose(0, 1)


def equal_runs(lengths: list[int]) -> list[tuple[int, int, int]]:
    """Consecutive prompts of equal length: (index of the run's first prompt, length, how many).

    >>> equal_runs([3, 3, 2, 3])
    [(0, 3, 2), (2, 2, 1), (3, 3, 1)]
    """
    runs, index = [], 0
    for length, group in itertools.groupby(lengths):
        count = len(list(group))
        runs.append((index, length, count))
        index += count
    return runs


for _name, _function in ((NAME, packed_attention), (PRODUCTS_NAME, decode_attention)):
    AttentionInterface.register(_name, _function)
    AttentionMaskInterface.register(_name, sdpa_mask)


def use_decode_attention(model: Any, products: bool) -> str:
    """Switch an SDPA model to :data:`NAME`, or :data:`PRODUCTS_NAME` (``products``); the implementation it now has."""
    name = PRODUCTS_NAME if products else NAME
    if getattr(model.config, "_attn_implementation", None) == "sdpa":
        model.config._attn_implementation = name
        for sub in model.modules():  # submodules may hold their own config object (e.g. a text sub-config)
            config = getattr(sub, "config", None)
            if config is not None and getattr(config, "_attn_implementation", None) == "sdpa":
                config._attn_implementation = name
    return model.config._attn_implementation
