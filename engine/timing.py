"""Wall-clock phases of a replica's start-up (no torch here: the import itself is a phase)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
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

    def __init__(self, on_phase: Callable[[str, float], None] | None = None) -> None:
        self.phases: dict[str, float] = {}
        self.facts: dict[str, Any] = {}
        self._on_phase = on_phase  # told of each phase as it ends (progress while a replica starts)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.phases[name] = round(time.perf_counter() - start, 4)
            if self._on_phase is not None:
                self._on_phase(name, self.phases[name])

    def report(self) -> dict[str, Any]:
        """``{"<phase>_s": seconds, ...facts}``, as the replica logs and /healthz shows it."""
        return {**{f"{name}_s": seconds for name, seconds in self.phases.items()}, **self.facts}
