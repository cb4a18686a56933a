"""A daily wall-clock time in a time zone (SCALE_TO_ZERO_AT), and clocks that can be injected.

Occurrences are computed on the zone's own calendar, so ``21:00 America/Chicago`` stays 21:00 there
across daylight-saving changes. A time skipped by a spring-forward shift happens once the clocks
have moved on (Python's zoneinfo reads it with the offset before the shift).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

Clock = Callable[[], datetime]  # returns an aware datetime ("now")

_PATTERN = re.compile(r"^\s*(\d{1,2}):(\d{2})(?::(\d{2}))?\s+(\S+)\s*$")


def system_clock() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class ShiftedClock:
    """The system clock moved by a fixed offset: a test can start it just before SCALE_TO_ZERO_AT.

    >>> start = datetime(2026, 1, 5, 20, 59, 55, tzinfo=ZoneInfo("America/Chicago"))
    >>> clock = ShiftedClock.starting_at(start)
    >>> abs((clock() - start).total_seconds()) < 1
    True
    """

    offset_s: float

    @classmethod
    def starting_at(cls, moment: datetime) -> ShiftedClock:
        return cls(moment.timestamp() - time.time())

    def __call__(self) -> datetime:
        return datetime.fromtimestamp(time.time() + self.offset_s, UTC)


@dataclass(frozen=True)
class DailyTime:
    """``HH:MM[:SS] <IANA zone>``, e.g. ``21:00 America/Chicago``.

    >>> t = DailyTime.parse("21:00 America/Chicago")
    >>> t.last_at_or_before(datetime(2026, 7, 1, 3, 0, tzinfo=UTC)).isoformat()
    '2026-06-30T21:00:00-05:00'
    >>> t.crossed(datetime(2026, 7, 2, 1, 59, tzinfo=UTC), datetime(2026, 7, 2, 2, 0, 1, tzinfo=UTC))
    True
    """

    hour: int
    minute: int
    second: int
    zone: str

    @classmethod
    def parse(cls, text: str) -> DailyTime:
        match = _PATTERN.match(text or "")
        if not match:
            raise ValueError(f"expected 'HH:MM <time zone>' such as '21:00 America/Chicago', got {text!r}")
        hour, minute, second = int(match[1]), int(match[2]), int(match[3] or 0)
        if hour > 23 or minute > 59 or second > 59:
            raise ValueError(f"{text!r} is not a time of day (00:00 to 23:59:59)")
        try:
            ZoneInfo(match[4])
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {match[4]!r} (use an IANA name such as Europe/Paris or UTC)") from None
        return cls(hour, minute, second, match[4])

    def on(self, day: date) -> datetime:
        """This time on ``day`` of the zone's calendar."""
        return datetime(day.year, day.month, day.day, self.hour, self.minute, self.second, tzinfo=ZoneInfo(self.zone))

    def last_at_or_before(self, now: datetime) -> datetime:
        """The latest occurrence not after ``now`` (an aware datetime)."""
        local = now.astimezone(ZoneInfo(self.zone))
        today = self.on(local.date())
        return today if today <= now else self.on(local.date() - timedelta(days=1))

    def crossed(self, since: datetime, now: datetime) -> bool:
        """Whether an occurrence falls in ``(since, now]``."""
        return since < self.last_at_or_before(now) <= now

    def __str__(self) -> str:
        seconds = f":{self.second:02d}" if self.second else ""
        return f"{self.hour:02d}:{self.minute:02d}{seconds} {self.zone}"

    def __repr__(self) -> str:
        return f"DailyTime({str(self)!r})"
