"""Wall-clock phases of a replica's start-up (no torch here: the import itself is a phase)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


class PhaseTimer:
    """Durations of named phases in order, plus facts about them (the cold-start breakdown).

    Example::

        >>> timer = PhaseTimer()
        >>> with timer.phase("imports"):
        ...     import json
        >>> list(timer.phases), timer.phases["imports"] >= 0
        (['imports'], True)
    """

    def __init__(self) -> None:
        self.phases: dict[str, float] = {}
        self.facts: dict[str, Any] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.phases[name] = round(time.perf_counter() - start, 4)

    def report(self) -> dict[str, Any]:
        """``{"<phase>_s": seconds, ...facts}``, as the replica logs and /healthz shows it."""
        return {**{f"{name}_s": seconds for name, seconds in self.phases.items()}, **self.facts}
