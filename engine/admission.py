"""Which queued rows may join a batch: the per-batch key/value-cache budget (no torch).

A batch's key/value cache holds rows x width tokens: every row is left-padded to the longest, and
each decoding step adds a column to all of them. So a batch of rows whose longest prompt is ``P``
and whose longest remaining output is ``R`` can reach ``rows x (P + R)`` tokens of cache, whatever
the rows' own lengths. ``MAX_BATCH_TOKENS`` bounds that projection: a row joins only when the batch
with it still fits, else it waits at the head of the queue (first come, first served: a long row is
not overtaken forever by short ones) until rows leave. A batch's first row is always admitted; the
engine refuses a single row above the budget before it is queued.

The batcher asks the policy (``Batcher(..., budget=TokenBudget(n))``); the engine tells it the
batch's shape when it polls for more rows (``poll(free_slots, BatchShape(...))``).

Example::

    >>> budget = TokenBudget(100)
    >>> round_ = budget.round(BatchShape(width=10, remaining=(20,)))   # one row: 1 x 30 = 30 tokens
    >>> round_.admit(prompt_tokens=10, max_new_tokens=20)              # 2 x 30 = 60: fits
    True
    >>> round_.admit(prompt_tokens=40, max_new_tokens=5)               # 3 x (40 + 20) = 180: waits
    False
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BatchShape:
    """A running batch as the budget sees it: its cache width now, and each row's tokens still to come."""

    width: int = 0
    remaining: tuple[int, ...] = ()


@dataclass(frozen=True)
class TokenBudget:
    """At most ``max_tokens`` of key/value cache (rows x projected width) per batch; None: no limit."""

    max_tokens: int | None

    def round(self, shape: BatchShape | None = None) -> AdmissionRound:
        """One poll's admission decisions, starting from the batch's ``shape`` (None: an empty batch)."""
        return AdmissionRound(self.max_tokens, shape or BatchShape())

    def fits_alone(self, prompt_tokens: int, max_new_tokens: int) -> bool:
        return self.max_tokens is None or prompt_tokens + max_new_tokens <= self.max_tokens


class AdmissionRound:
    """Admits rows one by one (in queue order) while the batch with them fits the budget."""

    def __init__(self, max_tokens: int | None, shape: BatchShape) -> None:
        self.max_tokens = max_tokens
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
            return False
        # An empty batch takes its first row whatever its size: the engine refused rows that never fit.
        self.rows += 1
        self.width = max(self.width, prompt_tokens)
        self.tail = max(self.tail, max_new_tokens)
        return True
