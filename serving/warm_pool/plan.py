"""The pool manager's decisions, as plain Python (no Ray): how many workers to prestart where, who leads."""

from __future__ import annotations

import logging
import threading
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from serving.warm_pool.common import MANAGER_STALE_S, MAX_FAILED_STARTS, START_GRACE_S

logger = logging.getLogger(__name__)


# --- the pool manager -------------------------------------------------------------------------------
@dataclass
class NodePool:
    """What the manager knows of one node's pool."""

    warm: dict[str, int] = field(default_factory=dict)  # registry key -> pid
    pending: list[float] = field(default_factory=list)  # when each prestarted, not yet warm worker was asked for
    held: int = 0  # workers just taken by a replica that is still starting: no refill yet
    seen: set[str] = field(default_factory=set)  # workers seen registered, warm or held (keys without "w/", "t/")
    failed: int = 0  # prestarted workers in a row that never became warm


class PoolPlan:
    """Decides, tick by tick, how many workers to prestart on which node (no Ray in here).

    Example::

        >>> plan = PoolPlan(target=1)
        >>> plan.update(now=0.0, nodes={"n1"}, registered={})
        {'n1': 1}
        >>> plan.update(now=1.0, nodes={"n1"}, registered={"n1": {"k": 42}})  # warm now: nothing to do
        {}
    """

    def __init__(self, target: int, start_grace_s: float = START_GRACE_S):
        self.target = target
        self.start_grace_s = start_grace_s
        self.nodes: dict[str, NodePool] = {}
        self.given_up: set[str] = set()
        self.leading = False  # whether this manager prestarts, or another one sharing its runtime env does
        self._lock = threading.Lock()  # status() reads while the refill thread updates

    def update(
        self,
        now: float,
        nodes: set[str],
        registered: Mapping[str, Mapping[str, int]],
        held: Mapping[str, Collection[str]] | None = None,
        prestart: bool = True,
        arrived: Mapping[str, Collection[str]] | None = None,
    ) -> dict[str, int]:
        """Record the registry as seen at ``now`` (warm workers, and the hold keys of taken ones, per
        node); return the workers to prestart per node (none when ``prestart`` is false: another
        manager leads). ``arrived``: arrival marks of workers that registered, seen or not."""
        with self._lock:
            return self._update(now, nodes, registered, held or {}, prestart, arrived or {})

    def _update(
        self,
        now: float,
        nodes: set[str],
        registered: Mapping[str, Mapping[str, int]],
        held: Mapping[str, Collection[str]],
        prestart: bool,
        arrived_marks: Mapping[str, Collection[str]],
    ) -> dict[str, int]:
        for gone in self.nodes.keys() - nodes:
            del self.nodes[gone]
        wanted = {}
        for node in sorted(nodes):
            pool = self.nodes.setdefault(node, NodePool())
            warm = dict(registered.get(node, {}))
            holds = {_worker_of(key) for key in held.get(node, ())}
            # A prestarted worker that a replica takes as soon as it is warm may be seen only as a
            # hold, never as warm: it arrived all the same (else its start stays pending for
            # START_GRACE_S and the refill waits that long).
            known = {_worker_of(key) for key in warm} | holds
            marked = {_worker_of(key) for key in arrived_marks.get(node, ())}
            arrived = (known | marked) - pool.seen
            pool.seen = known | marked
            pool.held = len(holds)
            del pool.pending[: len(arrived)]
            if arrived:
                pool.failed = 0
            expired = [t for t in pool.pending if now - t > self.start_grace_s]
            if expired:
                pool.pending = [t for t in pool.pending if now - t <= self.start_grace_s]
                pool.failed += len(expired)
            pool.warm = warm
            if not prestart:  # standing by: what this manager asked for is not its business any more
                pool.pending.clear()
                pool.failed = 0
                continue
            if pool.failed >= MAX_FAILED_STARTS:
                if node not in self.given_up:
                    self.given_up.add(node)
                    logger.warning(
                        "warm pool: %d workers prestarted on node %s never became warm within %.0fs; "
                        "no more prestarts there (see the node's worker-*.err logs)",
                        pool.failed,
                        node,
                        self.start_grace_s,
                    )
                continue
            missing = self.target - len(pool.warm) - len(pool.pending) - pool.held
            if missing > 0:
                pool.pending.extend([now] * missing)
                wanted[node] = missing
        return wanted

    def snapshot(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            return self._snapshot()

    def _snapshot(self) -> dict[str, dict[str, Any]]:
        return {
            node: {"warm_pids": sorted(p.warm.values()), "pending": len(p.pending), "held": p.held, "failed": p.failed}
            for node, p in self.nodes.items()
        }


def _worker_of(key: str) -> str:
    """A registry key without its kind: a warm worker ("w/..."), its hold ("t/...") and its arrival
    mark ("a/...") are one worker."""
    return key[2:] if key[:2] in ("w/", "t/", "a/") else key


def elect(
    manager: str, target: int, now: float, managers: Mapping[str, Mapping[str, Any]], leader: str | None
) -> tuple[bool, int]:
    """Whether ``manager`` leads the managers that share its runtime env, and the pool size to keep.

    ``managers``: each manager's last record ``{"target", "at"}``; ``leader``: the recorded leader.
    The leader stays until it is stale; then the live manager with the smallest id takes over. The
    size is the largest target of the live managers.

    >>> records = {"a": {"target": 1, "at": 99.0}, "b": {"target": 2, "at": 80.0}}  # b is gone
    >>> elect("c", 1, now=100.0, managers=records, leader="b")
    (False, 1)
    >>> elect("a", 1, now=100.0, managers=records, leader="b")
    (True, 1)
    """
    live = {m: r["target"] for m, r in managers.items() if now - r["at"] <= MANAGER_STALE_S}
    live[manager] = target
    chosen = leader if leader in live else min(live)
    return chosen == manager, max(live.values())
