"""Log-probabilities of chosen and alternative tokens, with each token's text and exact bytes.

Values are ``log_softmax`` of the model's raw logits at that step: before temperature, the
repetition/presence/frequency penalties and top-k/top-p (vLLM's ``raw_logprobs`` mode), so they
describe the model, not the sampler; a greedy row's chosen token is always the most likely.

A byte-level BPE token (GPT-2 and most recent models) is a string over a 256-character alphabet
standing for bytes, and one character of text may span several tokens: its bytes come from
mapping that alphabet back (``bytes_to_unicode`` inverted). Other tokenizers: SentencePiece byte
tokens ``<0xHH>`` are that byte, any other token is its text in UTF-8 with ``▁`` as a space.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from engine.types import TokenLogprob, TopLogprob

if TYPE_CHECKING:
    import torch

_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")
# What a token the model rules out (a logit of -inf) is given: JSON has no -infinity, and an answer
# holding one could not be sent. vLLM's OpenAI server writes the same value.
LOWEST_LOGPROB = -9999.0


@lru_cache(maxsize=1)
def byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, character -> byte (the inverse of ``bytes_to_unicode``)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(printable)
    shift = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + shift)
            shift += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


def is_byte_level(tokenizer: Any) -> bool:
    """Whether the tokenizer's decoder is byte-level BPE (directly or in a sequence)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend is not None and "ByteLevel" in repr(backend.decoder)


class TokenTexts:
    """Text and bytes of single tokens, cached per id.

    Example::

        texts = TokenTexts(tokenizer)
        texts.get(tokenizer.convert_tokens_to_ids("Ġw"))  # (' w', b' w')
    """

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._byte_level = is_byte_level(tokenizer)
        self._cache: dict[int, tuple[str, tuple[int, ...]]] = {}

    def get(self, token_id: int) -> tuple[str, tuple[int, ...]]:
        cached = self._cache.get(token_id)
        if cached is None:
            cached = self._cache[token_id] = self._lookup(token_id)
        return cached

    def _lookup(self, token_id: int) -> tuple[str, tuple[int, ...]]:
        token = self._tokenizer.convert_ids_to_tokens(token_id)
        if token is None:  # an id beyond the vocabulary (a padded embedding matrix)
            return "", ()
        if self._byte_level and token not in self._tokenizer.all_special_tokens:
            table = byte_decoder()
            if all(ch in table for ch in token):
                raw = bytes(table[ch] for ch in token)
                return raw.decode("utf-8", errors="replace"), tuple(raw)
        match = _BYTE_TOKEN.fullmatch(token)
        if match:
            raw = bytes([int(match.group(1), 16)])
            return raw.decode("utf-8", errors="replace"), tuple(raw)
        text = token.replace("▁", " ")
        return text, tuple(text.encode("utf-8"))


def token_logprob(logprobs: torch.Tensor, chosen: int, top: int, texts: TokenTexts) -> TokenLogprob:
    """The chosen token's entry for one step, with the ``top`` most likely alternatives (best first).

    ``logprobs`` is the step's log-softmax over the vocabulary (one row). A token ruled out (-inf) has
    :data:`LOWEST_LOGPROB`.
    """
    alternatives: tuple[TopLogprob, ...] = ()
    if top > 0:
        values, ids = logprobs.topk(min(top, logprobs.shape[-1]))
        alternatives = tuple(
            TopLogprob(*texts.get(i), logprob=max(v, LOWEST_LOGPROB))
            for v, i in zip(values.tolist(), ids.tolist(), strict=True)
        )
    text, raw = texts.get(chosen)
    return TokenLogprob(token=text, bytes=raw, logprob=max(float(logprobs[chosen]), LOWEST_LOGPROB), top=alternatives)
