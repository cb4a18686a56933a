"""Resolved generation parameters and per-prompt results, shared by the Gateway and the engine."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

FinishReason = Literal["stop", "length", "cancelled"]


@dataclass(frozen=True)
class SamplingParams:
    """Generation parameters with every default filled in; what a response echoes.

    Example::

        >>> SamplingParams(max_new_tokens=16, temperature=0.0).greedy
        True
    """

    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["stop"] = list(self.stop)
        return out


@dataclass(frozen=True)
class Completion:
    """One prompt's result: the generated text only (never the prompt) and token counts."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: FinishReason
