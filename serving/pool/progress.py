"""Cold-start progress: phases that model replicas report while they start, read by every Gateway.

A model replica reports each phase as it completes (``process_start`` first, from the top of its
constructor, which also tells the pool that the replica was placed on a node). The board turns the
reports into the ``waking`` and ``last_cold_start`` fields of /v1/models.

A replica's process may be older than its wake: Ray hands a new actor an idle worker process it started
earlier, minutes before on a busy node. Such a process's start was not paid by the wake, so ``process_start``
counts at most from the last moment the pool saw the model with no replica starting.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

PHASES = ("process_start", "imports", "model_code", "weights", "warmup", "first_generation")
READY_LAG_S = 10.0
LAST_CONSTRUCTOR_PHASE = "warmup"  # after it the replica is ready; first_generation comes with its first answer


@dataclass
class _Replica:
    since: float
    phases: dict[str, float] = field(default_factory=dict)
    ready_at: float | None = None


class ColdStartBoard:
    """Per model, the replicas that are starting and the last finished cold start.

    >>> board = ColdStartBoard()
    >>> board.report("mini", "r1", "process_start", 1.0, at=101.0)
    >>> board.report("mini", "r1", "imports", 2.5, at=103.5)
    >>> board.waking("mini", starting=1, running=0, now=104.0)
    {'since': 100.0, 'phases': {'process_start_s': 1.0, 'imports_s': 2.5}, 'current': 'model_code'}
    >>> for phase, s in (("model_code", 1.5), ("weights", 0.2), ("warmup", 0.1)):
    ...     board.report("mini", "r1", phase, s, at=106.0)
    >>> board.last_cold_start("mini")
    {'total_s': 5.3, 'phases': {'process_start_s': 1.0, 'imports_s': 2.5, 'model_code_s': 1.5, 'weights_s': 0.2, \
'warmup_s': 0.1}, 'finished_at': None}
    >>> board.report("mini", "r1", "first_generation", 0.7, at=106.7)
    >>> board.last_cold_start("mini")["finished_at"], board.last_cold_start("mini")["total_s"]
    (106.7, 6.0)
    """

    def __init__(self) -> None:
        self._starting: dict[str, dict[str, _Replica]] = {}
        self._last: dict[str, dict[str, Any]] = {}
        self._seen_starting: dict[str, float] = {}
        self._quiet_at: dict[str, float] = {}  # when Serve last showed the model with no replica starting

    def report(
        self, model: str, replica: str, phase: str, seconds: float | None, at: float, details: dict | None = None
    ) -> None:
        if phase not in PHASES:
            raise ValueError(f"unknown cold-start phase {phase!r}; phases are {', '.join(PHASES)}")
        seconds = None if seconds is None else round(float(seconds), 4)
        if phase == "first_generation":
            self._finish_first_generation(model, replica, seconds, at, details)
            return
        replicas = self._starting.setdefault(model, {})
        record = replicas.get(replica)
        if record is None:
            since = at - seconds if phase == "process_start" and seconds is not None else at
            quiet_at = self._quiet_at.get(model)
            if phase == "process_start" and quiet_at is not None and since < quiet_at <= at:
                since, seconds = quiet_at, round(at - quiet_at, 4)  # a process Ray had started before this wake
            record = replicas[replica] = _Replica(since=since)
        record.phases[phase] = seconds if seconds is not None else 0.0
        if phase == LAST_CONSTRUCTOR_PHASE:
            record.ready_at = at
            self._last[model] = self._summary(replica, record)

    def _finish_first_generation(
        self, model: str, replica: str, seconds: float | None, at: float, details: dict | None
    ) -> None:
        self._starting.get(model, {}).pop(replica, None)
        last = self._last.get(model)
        if last is None or last.get("replica") != replica or seconds is None:
            return  # a report from a replica whose start we never saw: nothing to complete
        last["phases"]["first_generation_s"] = seconds
        last["total_s"] = round(last["total_s"] + seconds, 4)
        last["finished_at"] = at
        if details:  # the replica's whole report: the engine's finer phases, weights bytes and rate, device
            last["details"] = details

    @staticmethod
    def _summary(replica: str, record: _Replica) -> dict[str, Any]:
        phases = {f"{name}_s": record.phases[name] for name in PHASES if name in record.phases}
        # finished_at stays null until the first generation completes the report: readers (the page) wait for it.
        return {"replica": replica, "total_s": round(sum(phases.values()), 4), "phases": phases, "finished_at": None}

    def constructing(self, model: str, now: float) -> int:
        """Replicas of ``model`` that were placed (they reported) and that Serve may still show as starting.

        A replica that finished its constructor counts for ``READY_LAG_S`` more: Serve marks it running
        a moment later, and until then it must not look like a replica waiting for room. The pool uses
        this count only when Ray's actor table cannot be read (see ``Seen.from_replica_states``): in the
        lag it also counts a replica Serve already calls running, which hides one that waits for room.
        """
        records = self._starting.get(model, {}).values()
        return sum(1 for r in records if r.ready_at is None or now - r.ready_at < READY_LAG_S)

    def observe(self, model: str, starting: int, running: int, now: float, checked_at: float | None = None) -> None:
        """Forget replicas that never finished once Serve shows none starting (they died or were stopped).

        ``checked_at``: when Serve's status was read (default ``now``); a replica that starts later cannot
        have begun its wake before it."""
        if starting == 0:
            self._quiet_at[model] = now if checked_at is None else checked_at
            self._seen_starting.pop(model, None)
            replicas = self._starting.get(model, {})
            for replica in [r for r, record in replicas.items() if record.ready_at is None]:
                del replicas[replica]
        else:
            self._seen_starting.setdefault(model, now)
        if running == 0 and starting == 0:
            self._starting.pop(model, None)

    def waking(self, model: str, starting: int, running: int, now: float) -> dict[str, Any] | None:
        """Progress of the model's wake-up: non-null while it has a replica starting and none running."""
        if running > 0 or starting == 0:
            return None
        records = list(self._starting.get(model, {}).values())
        pending = [r for r in records if r.ready_at is None] or records  # ready ones until Serve calls them running
        if not pending:  # not placed yet, or placed and not reporting: time since Serve showed it starting
            return {"since": round(self._seen_starting.get(model, now), 3), "phases": {}, "current": None}
        record = min(pending, key=lambda r: r.since)
        done = [name for name in PHASES if name in record.phases]
        following = [name for name in PHASES if name not in record.phases]
        return {
            "since": round(record.since, 3),
            "phases": {f"{name}_s": record.phases[name] for name in done},
            "current": following[0] if following else None,
        }

    def last_cold_start(self, model: str) -> dict[str, Any] | None:
        last = self._last.get(model)
        return None if last is None else {key: value for key, value in last.items() if key != "replica"}

    def restore(self, model: str, last_cold_start: dict[str, Any] | None) -> None:
        """The last cold start as a previous pool controller recorded it."""
        if last_cold_start is not None and model not in self._last:
            self._last[model] = {"replica": None, **last_cold_start}

    def forget(self, model: str) -> None:
        self._starting.pop(model, None)
        self._last.pop(model, None)
        self._seen_starting.pop(model, None)
        self._quiet_at.pop(model, None)
