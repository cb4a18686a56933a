"""The daily schedule: a time of day in a time zone (``SCALE_TO_ZERO_AT``)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, time, timedelta
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

    def next_after(self, moment: datetime) -> datetime:
        """The first occurrence strictly after ``moment`` (an aware datetime)."""
        local = moment.astimezone(ZoneInfo(self.zone))
        candidate = datetime.combine(local.date(), self.at, tzinfo=ZoneInfo(self.zone))
        if candidate <= local:
            candidate = datetime.combine(local.date() + timedelta(days=1), self.at, tzinfo=ZoneInfo(self.zone))
        return candidate

    def __str__(self) -> str:
        return f"{self.at:%H:%M} {self.zone}"
