"""Which queued rows may join a batch: the per-batch key/value-cache budget, and the prompt tokens a poll
may admit (no torch).

A batch's key/value cache holds rows x width tokens: every row is left-padded to the longest, and
each decoding step adds a column to all of them. So a batch of rows whose longest prompt is ``P``
and whose longest remaining output is ``R`` can reach ``rows x (P + R)`` tokens of cache, whatever
the rows' own lengths. ``MAX_BATCH_TOKENS`` bounds that projection: a row joins only when the batch
with it still fits, else it waits at the head of the queue (first come, first served: a long row is
not overtaken forever by short ones) until rows leave. A batch's first row is always admitted; the
engine refuses a single row above the budget before it is queued.

A poll also admits at most ``STEP_PROMPT_TOKENS`` of prompt (its first row whatever its length). The
continuous engine polls between decoding steps and prefills what it got in the next step's pass, so with a
small budget a wave of arrivals is prefilled a share a step: its first rows get their first token after a
short step, not all of them after one long pass (vLLM's ``max_num_batched_tokens`` plays this part there).

The batcher asks the policy (``Batcher(..., budget=TokenBudget(n))``); the engine tells it the
batch's shape when it polls for more rows (``poll(free_slots, BatchShape(...))``).

Example::

    >>> budget = TokenBudget(100)
    >>> round_ = budget.round(BatchShape(width=10, remaining=(20,)))   # one row: 1 x 30 = 30 tokens
    >>> round_.admit(prompt_tokens=10, max_new_tokens=20)              # 2 x 30 = 60: fits
    True
    >>> round_.admit(prompt_tokens=40, max_new_tokens=5)               # 3 x (40 + 20) = 180: waits
    False
    >>> round_ = TokenBudget(None, step_prompt_tokens=16).round()
    >>> [round_.admit(10, 8), round_.admit(10, 8), round_.refused]     # 10 + 10 > 16: the next poll's
    [True, False, 'step']
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# Prompt tokens a poll admits where STEP_PROMPT_TOKENS is unset, by device. On a CPU a step's time grows with
# its tokens (about 0.75 ms each for GPT-2-small in bfloat16 on the AMD VM): a 16-prompt wave of 254 tokens
# prefilled in one pass made every one of them wait about 0.24 s. 64 a poll spreads it over four steps: at 16
# streamed clients TTFT p50 fell 30% at the same requests/s (benchmarks/results/peer_vllm.md). A GPU prefills
# thousands of tokens in the time of a decoding step.
STEP_PROMPT_TOKENS = {"cpu": 64, "cuda": 2048}


@dataclass(frozen=True)
class BatchShape:
    """A running batch as the budget sees it: its cache width now, and each row's tokens still to come."""

    width: int = 0
    remaining: tuple[int, ...] = ()


@dataclass(frozen=True)
class TokenBudget:
    """At most ``max_tokens`` of key/value cache (rows x projected width) per batch; None: no limit.

    ``step_prompt_tokens``: prompt tokens one poll may admit (None: no limit), so that the prompts of a wave of
    arrivals are prefilled over a few decoding steps, a share with each, and not all in one long pass that
    every one of them waits for. A poll's first row is admitted whatever its length.
    """

    max_tokens: int | None
    step_prompt_tokens: int | None = None

    def round(self, shape: BatchShape | None = None) -> AdmissionRound:
        """One poll's admission decisions, starting from the batch's ``shape`` (None: an empty batch)."""
        return AdmissionRound(self.max_tokens, shape or BatchShape(), self.step_prompt_tokens)

    def fits_alone(self, prompt_tokens: int, max_new_tokens: int) -> bool:
        return self.max_tokens is None or prompt_tokens + max_new_tokens <= self.max_tokens


class AdmissionRound:
    """Admits rows one by one (in queue order) while the batch with them fits the budget."""

    def __init__(self, max_tokens: int | None, shape: BatchShape, prompt_tokens: int | None = None) -> None:
        self.max_tokens = max_tokens
        self.prompt_tokens = prompt_tokens  # left for this round's prompts (None: no limit)
        self.admitted = 0  # rows this round admitted
        self.refused: Literal["cache", "step"] | None = None  # why the last refused row waits
        self.rows = len(shape.remaining)
        self.width = shape.width
        self.tail = max(shape.remaining, default=0)

    def projected(self, prompt_tokens: int, max_new_tokens: int) -> int:
        """Tokens of cache the batch can reach with one more row of this size."""
        return (self.rows + 1) * (max(self.width, prompt_tokens) + max(self.tail, max_new_tokens))

    def admit(self, prompt_tokens: int, max_new_tokens: int) -> bool:
        """Whether the row joins; if it does, the round counts it for the rows after it."""
        fits = self.max_tokens is None or self.projected(prompt_tokens, max_new_tokens) <= self.max_tokens
        if not fits and self.rows > 0:
            self.refused = "cache"
            return False
        # An empty batch takes its first row whatever its size: the engine refused rows that never fit.
        if self.prompt_tokens is not None:
            if self.admitted and prompt_tokens > self.prompt_tokens:
                self.refused = "step"  # the next poll's (a round's first row joins whatever its length)
                return False
            self.prompt_tokens = max(0, self.prompt_tokens - prompt_tokens)
        self.admitted += 1
        self.rows += 1
        self.width = max(self.width, prompt_tokens)
        self.tail = max(self.tail, max_new_tokens)
        return True
