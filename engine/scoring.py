"""Prompts given as token ids, and the log-probabilities of a prompt's own tokens (evaluation harnesses).

lm-evaluation-harness scores a continuation by sending ``context + continuation`` with ``echo``,
``logprobs`` and ``max_tokens: 0``, and summing the continuation tokens' log-probabilities: entry
``j`` is ``log_softmax(logits at position j - 1)[ids[j]]``, the first token has none. One forward
pass over the prompt, outside the batch loop (no generation, no key/value cache kept).

Example::

    entries = prompt_logprobs(engine, ids, top=1)   # [None, TokenLogprob(...), ...]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from engine.errors import InvalidFieldError
from engine.logprobs import token_logprob
from engine.types import TokenLogprob


def check_token_prompts(prompts: Sequence[Sequence[int]], vocab_size: int) -> list[list[int]]:
    """Token-id prompts as lists, refusing ids outside the vocabulary and empty prompts."""
    out = []
    for index, ids in enumerate(prompts):
        which = f"prompt {index}" if len(prompts) > 1 else "the prompt"
        if not ids:
            raise InvalidFieldError(f"prompt: {which} has no token ids; send some", param="prompt")
        bad = next((t for t in ids if not 0 <= t < vocab_size), None)
        if bad is not None:
            raise InvalidFieldError(
                f"prompt: {which} holds token id {bad}, outside this model's vocabulary (0 to {vocab_size - 1})",
                param="prompt",
            )
        out.append(list(ids))
    return out


@torch.inference_mode()
def prompt_logprobs(engine: Any, ids: Sequence[int], top: int) -> tuple[TokenLogprob, ...]:
    """Each prompt token's log-probability given the tokens before it; the first token's entry has its
    text only (logprob 0.0, no alternatives): nothing precedes it, and the API shows null."""
    if engine.is_encoder_decoder:
        raise InvalidFieldError(
            "logprobs: prompt log-probabilities need a decoder-only model; this one reads its prompt with an encoder",
            param="logprobs",
        )
    text, raw = engine.texts.get(ids[0])
    first = TokenLogprob(token=text, bytes=raw, logprob=0.0)
    if len(ids) < 2:
        return (first,)
    inputs = torch.tensor([list(ids)], dtype=torch.long, device=engine.device)
    logits = engine.model(input_ids=inputs, use_cache=False).logits[0, :-1].float()
    logprobs = logits.log_softmax(dim=-1)
    entries = [token_logprob(logprobs[j - 1], ids[j], top, engine.texts) for j in range(1, len(ids))]
    return (first, *entries)
