"""Helpers of the pool's integration tests that also run inside Serve replicas (so: light imports)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path


@dataclass(frozen=True)
class FileClock:
    """A clock the test moves: the pool controller reads "now" (epoch seconds) from ``path``."""

    path: str

    def set(self, moment: datetime) -> None:
        Path(self.path).write_text(repr(moment.timestamp()))

    def __call__(self) -> datetime:
        return datetime.fromtimestamp(float(Path(self.path).read_text()), UTC)
