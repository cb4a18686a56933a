"""A step's log-probability entries: texts, bytes, best first, and nothing JSON cannot carry."""

from __future__ import annotations

import json
import math

import torch

from engine.logprobs import LOWEST_LOGPROB, TokenTexts, token_logprob
from testing.checkpoints import build_tokenizer


def test_a_token_the_model_rules_out_gets_the_lowest_logprob_not_minus_infinity(tmp_path) -> None:
    tokenizer = build_tokenizer(tmp_path / "tok", vocab_size=300)
    vocab = len(tokenizer)
    logits = torch.full((vocab,), float("-inf"))
    logits[[5, 9]] = torch.tensor([2.0, 1.0])  # two tokens allowed, every other one masked
    logprobs = logits.log_softmax(-1)
    entry = token_logprob(logprobs, chosen=7, top=4, texts=TokenTexts(tokenizer))
    assert entry.logprob == LOWEST_LOGPROB  # chosen, yet ruled out (a forced or prompt token)
    assert [a.logprob for a in entry.top[:2]] == [float(logprobs[5]), float(logprobs[9])]
    assert [a.logprob for a in entry.top[2:]] == [LOWEST_LOGPROB, LOWEST_LOGPROB]
    assert all(math.isfinite(a.logprob) for a in entry.top)
    json.dumps([entry.logprob, *(a.logprob for a in entry.top)], allow_nan=False)  # writable as JSON
    assert entry.top[0].token == TokenTexts(tokenizer).get(5)[0]
