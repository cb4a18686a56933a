"""What crosses the handle for an embedding request (no torch: the Gateway imports it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class EmbeddingRequest:
    """One ``/v1/embeddings`` request: texts or token-id lists (one of them), and the size wanted.

    >>> EmbeddingRequest(texts=("a", "b")).count
    2
    """

    texts: tuple[str, ...] = ()
    token_inputs: tuple[tuple[int, ...], ...] = ()
    dimensions: int | None = None  # None: the model's hidden size
    request_id: str = ""

    @property
    def count(self) -> int:
        return len(self.texts) + len(self.token_inputs)


@dataclass(frozen=True)
class EmbeddingResult:
    """Unit vectors, one per input in order, and the tokens the inputs took."""

    vectors: list[list[float]]
    prompt_tokens: int
    replica: str = "local"
    cold_start: dict[str, Any] | None = field(default=None)
