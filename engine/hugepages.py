"""Packed layers moved onto 2 MB pages, which a decode step streams faster than 4 KB ones.

Every decode step reads every weight once, and at a few rows that read is the step. On 4 KB pages
the CPU walks the page tables every 4 KB of the stream; on 2 MB pages 512 times less often. On the
AMD VM (``transparent_hugepage`` set to ``madvise``, as most distributions ship it: no page is huge
unless asked) one thread read 256 MB at 23-25 GB/s on 4 KB pages and 32-34 GB/s on 2 MB ones, and
a GPT-2-small token's 49 packed products at one row took 13.9-14.1 ms instead of 15.3-15.8 ms.

torch's allocator does not ask for huge pages (unless ``THP_MEM_ALLOC_ENABLE`` is set when the
process starts, which a warm worker's cannot be for one model). Layers mapped from the packed-layer
cache need nothing: on the same VM a token at one row took 20.6 ms on the file's pages, 20.5 ms on 2 MB
pages and 21.8 ms on torch's 4 KB pages (``python -m benchmarks.huge_pages``; why was not established:
large folios in the page cache, whose contiguous entries the CPU's TLB can merge, are a likely
reason). So only layers packed in torch's memory move (``engine.packed_cache.prepare_cached``), and a
node's replicas go on sharing a cache entry's pages. :func:`move_to_huge_pages` copies their bytes
into one anonymous mapping advised ``MADV_HUGEPAGE`` and makes the layers over it again
(:func:`engine.onednn_bytes.tensor_over`, the cache's own way). A replica does it after its first
answer (no wake waits for it) from a thread, while it serves: the first touch of fresh huge pages
took 0.5 s for 247 MB on the AMD VM, a stall no running request should see; the engine then points
its layers at the copy between two steps (:meth:`engine.model.TextGenerator.between_steps`). The
layers compute exactly what they did: the same bytes, the same layout.

The moved bytes are the replica's own memory, as the bytes they replace were.

Example::

    facts = move_to_huge_pages(model)  # {"huge_pages": "moved 49 layers, 247 MB (247 MB on 2 MB pages), ...}
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy

from engine import onednn_bytes
from engine.cpu import PackedLinear

logger = logging.getLogger(__name__)

HUGE_PAGE = 2 << 20
ALIGN = 64  # each layer's bytes start on a cache line, as oneDNN allocates them
THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def thp_mode(setting: Path = THP_SETTING) -> str | None:
    """The kernel's transparent huge page mode (``always``, ``madvise`` or ``never``), or None where unknown.

    >>> import tempfile, pathlib
    >>> f = pathlib.Path(tempfile.mkdtemp()) / "enabled"
    >>> _ = f.write_text("always [madvise] never\\n")
    >>> thp_mode(f)
    'madvise'
    """
    try:
        words = setting.read_text().split()
    except OSError:
        return None
    return next((word.strip("[]") for word in words if word.startswith("[")), None)


def move_to_huge_pages(model: Any, mode: Callable[[], str | None] = thp_mode) -> dict[str, Any]:
    """Copy the model's packed layers onto 2 MB pages and point them there now; what was done.

    Must not run while another thread computes with the layers or reads their bytes: their old bytes
    are freed as they move. A replica uses :func:`move_later` instead.
    """
    apply, facts = copy_to_huge_pages(model, mode)
    if apply is not None:
        apply()
    return facts


def move_later(
    model: Any,
    hand_over: Callable[[Callable[[], None]], None],
    after: threading.Thread | None = None,
    mode: Callable[[], str | None] = thp_mode,
) -> threading.Thread:
    """:func:`move_to_huge_pages` without stopping the engine: a thread copies the bytes (the layers are only
    read meanwhile), then ``hand_over`` gets the swap, for the engine to run between two steps.

    ``after``: a thread that reads the layers' bytes (the cache's writer), waited for first.
    """

    def work() -> None:
        try:
            if after is not None:
                after.join()
            apply, facts = copy_to_huge_pages(model, mode)
        except Exception:  # the layers stay where they are, and answer as before
            logger.exception("packed layers: could not copy them onto 2 MB pages")
            return
        if apply is None:
            logger.info("packed layers %s", facts.get("huge_pages", "not moved"))
        else:
            hand_over(apply)

    thread = threading.Thread(target=work, name="huge-pages", daemon=True)
    thread.start()
    return thread


def copy_to_huge_pages(
    model: Any, mode: Callable[[], str | None] = thp_mode
) -> tuple[Callable[[], None] | None, dict[str, Any]]:
    """Copy the packed layers' bytes into one mapping advised ``MADV_HUGEPAGE`` and make layers over it: the
    swap that points the model's layers at them (None where nothing is moved), and the facts.

    Does nothing (and says why) where the kernel gives no huge pages or torch cannot make oneDNN
    tensors over given bytes.
    """
    layers = [module for module in model.modules() if isinstance(module, PackedLinear)]
    if not layers:
        return None, {}
    thp = mode()
    if thp not in ("always", "madvise"):
        return None, {"huge_pages": f"not used: transparent huge pages are {thp or 'not available'}"}
    if not onednn_bytes.supported():
        return None, {"huge_pages": "not used: this torch cannot make oneDNN tensors over given bytes"}
    started = time.monotonic()
    sizes = [onednn_bytes.size(layer.packed) for layer in layers]
    offsets, total = [], 0
    for size in sizes:
        offsets.append(total)
        total += -(-size // ALIGN) * ALIGN
    region = mmap.mmap(-1, total + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    start = numpy.frombuffer(region, dtype=numpy.uint8).ctypes.data
    base = -(-start // HUGE_PAGE) * HUGE_PAGE  # huge pages back 2 MB-aligned spans only
    region.madvise(mmap.MADV_HUGEPAGE)
    moved = []
    for layer, size, offset in zip(layers, sizes, offsets, strict=True):
        old = layer.packed
        ctypes.memmove(base + offset, onednn_bytes.address(old), size)
        packed = onednn_bytes.tensor_over(base + offset, list(old.shape), old.dtype, onednn_bytes.layout(old))
        if packed is None or onednn_bytes.size(packed) != size:  # not expected: the layout is oneDNN's own
            raise RuntimeError("oneDNN would not take a packed layer's layout back")
        moved.append(packed)
    huge = huge_bytes(base)
    copied = time.monotonic() - started
    facts = {
        "huge_pages": f"moved {len(layers)} layers, {total / 1e6:.0f} MB ({huge / 1e6:.0f} MB on 2 MB pages), "
        f"copied in {copied:.2f}s",
        "huge_page_bytes": huge,
    }

    def apply() -> None:
        for layer, packed in zip(layers, moved, strict=True):
            layer.packed, layer.backing = packed, region  # the old bytes go with the old tensor (or mapping)
        logger.info("packed layers %s", facts["huge_pages"])

    return apply, facts


def huge_bytes(address: int, smaps: Path = Path("/proc/self/smaps")) -> int:
    """How many bytes of the mapping holding ``address`` the kernel backs with huge pages (0 where unknown)."""
    try:
        lines = smaps.read_text().splitlines()
    except OSError:
        return 0
    inside = False
    for line in lines:
        span = line.split(" ", 1)[0]
        if "-" in span and all(c in "0123456789abcdef-" for c in span):
            low, high = (int(part, 16) for part in span.split("-"))
            inside = low <= address < high
        elif inside and line.startswith("AnonHugePages:"):
            return int(line.split()[1]) * 1024
    return 0
