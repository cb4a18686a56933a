"""The daily schedule: a time of day in a time zone (``SCALE_TO_ZERO_AT``)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError


@dataclass(frozen=True)
class DailyTime:
    """A time of day in a time zone, e.g. ``21:00 America/Chicago`` (SCALE_TO_ZERO_AT).

    Example::

        >>> at = DailyTime.parse("21:00 UTC")
        >>> at.next_after(datetime(2026, 1, 1, 22, 30, tzinfo=ZoneInfo("UTC"))).isoformat()
        '2026-01-02T21:00:00+00:00'
    """

    at: time
    zone: str

    @classmethod
    def parse(cls, text: str) -> DailyTime:
        match = re.fullmatch(r"\s*(\d{1,2}):(\d{2})\s+(\S+)\s*", text)
        if not match:
            raise ValueError(f"expected 'HH:MM Area/City' (e.g. '21:00 America/Chicago'), got {text!r}")
        hour, minute, zone = int(match.group(1)), int(match.group(2)), match.group(3)
        if hour > 23 or minute > 59:
            raise ValueError(f"{hour:02d}:{minute:02d} is not a time of day")
        try:
            ZoneInfo(zone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(
                f"unknown time zone {zone!r} (use an IANA name such as 'Europe/Berlin' or 'UTC')"
            ) from None
        return cls(time(hour, minute), zone)

    def on(self, day: date) -> datetime:
        """The instant (UTC) when the zone's clock reads this time on ``day``, its own calendar day.

        Computed in UTC, never by comparing wall clocks: a time that occurs twice (the autumn change)
        is its first occurrence, and a time that does not occur (the spring change skips it) is the
        instant the clock jumps past it, as cron does.
        """
        zone = ZoneInfo(self.zone)
        wall = datetime.combine(day, self.at)
        first = wall.replace(tzinfo=zone, fold=0).astimezone(UTC)  # fold=0: the earlier of two
        if first.astimezone(zone).replace(tzinfo=None) == wall:
            return first
        # Skipped: the jump lies between the wall time read with the offset after it and with the one
        # before it; find it to the second (offsets change on whole seconds).
        low, high = wall.replace(tzinfo=zone, fold=1).astimezone(UTC), first
        while high - low > timedelta(seconds=1):
            middle = low + (high - low) / 2
            if middle.astimezone(zone).replace(tzinfo=None) < wall:
                low = middle
            else:
                high = middle
        return high.replace(microsecond=0)

    def next_after(self, moment: datetime) -> datetime:
        """The first occurrence strictly after ``moment`` (an aware datetime), as a UTC instant; one a
        calendar day of the zone."""
        today = moment.astimezone(ZoneInfo(self.zone)).date()
        instant = moment.astimezone(UTC)
        return next(t for offset in range(-1, 3) if (t := self.on(today + timedelta(days=offset))) > instant)

    def __str__(self) -> str:
        return f"{self.at:%H:%M} {self.zone}"
