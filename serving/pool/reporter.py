"""A model replica's side of cold-start progress: fire-and-forget reports to the pool controller."""

from __future__ import annotations

import logging
import time

from ray import serve

logger = logging.getLogger("ray.serve")

CONTROLLER = "PoolController"  # the pool controller's deployment name, in the main application


class PhaseReporter:
    """Sends each finished start-up phase to the pool controller; never blocks, never raises.

    Call ``phase("process_start", s)`` first thing in the constructor (it also tells the pool that
    the replica was placed), then each phase as it completes, then ``first_generation`` after the
    first answer. Example, inside a model deployment's constructor::

        reporter = PhaseReporter(pool="llm", model="mini")
        reporter.phase("process_start", seconds_since_process_start)
        with timer.phase("imports"):
            import torch
        reporter.phase("imports", timer.phases["imports"])
    """

    def __init__(self, pool: str, model: str) -> None:
        self.model = model
        self._pool = pool
        self._handle = None
        try:
            self.replica = serve.get_replica_context().replica_id.unique_id
        except Exception:  # outside a replica (a test, a script): reports are dropped
            self.replica = None

    def phase(self, name: str, seconds: float | None, details: dict | None = None) -> None:
        """``details``: facts of the start (weights bytes, device...), sent with ``first_generation``."""
        if self.replica is None:
            return
        try:
            if self._handle is None:
                self._handle = serve.get_deployment_handle(CONTROLLER, self._pool)
            # Not awaited: the model's start must not wait for (or fail with) the pool controller.
            self._handle.report_phase.remote(self.model, self.replica, name, seconds, time.time(), details)
        except Exception:
            logger.warning("could not report cold-start phase %s of %s to the pool", name, self.model, exc_info=True)
