"""The unit of work between the batcher and the engine, and the callbacks they exchange (no torch).

A request's rows become :class:`WorkItem` s; the engine decodes them in batches and reports, once
per decoding step, one :class:`~engine.types.Delta` per row that advanced (``OnStep``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from engine.types import Delta, SamplingParams


@dataclass(eq=False)
class WorkItem:
    """One row to generate, identified by its stream and its index in the stream's request.

    ``cancelled`` may be set from another thread: the engine drops the row at its next step.
    ``admitted_at`` (``time.monotonic()``) and ``finished`` are set by the thread running the engine.

    Example::

        >>> item = WorkItem(stream=7, row=1, prompt_ids=[5, 6], params=SamplingParams(max_new_tokens=4))
        >>> item.key, item.cancelled
        ((7, 1), False)
    """

    stream: int
    row: int
    prompt_ids: list[int]
    params: SamplingParams
    cancelled: bool = False
    admitted_at: float | None = field(default=None, repr=False)
    finished: bool = field(default=False, repr=False)

    @property
    def key(self) -> tuple[int, int]:
        return (self.stream, self.row)


# on_step(events): the rows that advanced in one decoding step, each with its Delta (index = row).
OnStep = Callable[[list[tuple[WorkItem, Delta]]], None]
# poll(free_slots, shape): more items to join the running batch (continuous batching), or none;
# ``shape`` (engine.admission.BatchShape) lets the batch's token budget decide which fit.
Poll = Callable[..., Sequence[WorkItem]]
# run_batch(items, on_step, poll, max_batch_size): the engine's run().
RunBatch = Callable[[Sequence[WorkItem], OnStep, Poll | None, int], None]


def emit(on_step: OnStep, events: list[tuple[WorkItem, Delta]]) -> None:
    """Pass a step's events on, unless it made none."""
    if events:
        on_step(events)
