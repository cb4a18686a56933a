"""SCALE_TO_ZERO_AT over time: when the daily time has passed, and clocks that can be injected.

The daily time itself is ``settings.DailyTime`` (``HH:MM <IANA zone>``, validated with the settings);
occurrences are on the zone's own calendar, so ``21:00 America/Chicago`` stays 21:00 there across
daylight-saving changes, and each is an instant computed in UTC (``DailyTime.on``): once a calendar day,
even on the days when the clock repeats or skips an hour.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from settings import DailyTime

Clock = Callable[[], datetime]  # returns an aware datetime ("now")


def system_clock() -> datetime:
    return datetime.now(UTC)


def crossed(daily: DailyTime, since: datetime, now: datetime) -> bool:
    """Whether an occurrence of ``daily`` falls in ``(since, now]``.

    >>> daily = DailyTime.parse("21:00 America/Chicago")
    >>> crossed(daily, datetime(2026, 7, 2, 1, 59, tzinfo=UTC), datetime(2026, 7, 2, 2, 0, 1, tzinfo=UTC))
    True
    >>> crossed(daily, datetime(2026, 7, 2, 2, 0, 1, tzinfo=UTC), datetime(2026, 7, 3, 1, 0, tzinfo=UTC))
    False
    """
    return daily.next_after(since) <= now


@dataclass(frozen=True)
class ShiftedClock:
    """The system clock moved by a fixed offset: it can start just before SCALE_TO_ZERO_AT.

    >>> from zoneinfo import ZoneInfo
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
