"""Inside a prestarted worker: the Ray setup hook that imports what a replica needs, and registers.

A worker the raylet prestarted for the pool runs :func:`prepare_worker` before it takes any task;
it imports :data:`~serving.warm_pool.common.PRELOAD`, registers in the GCS key-value store, and
watches for the replica that takes it (then holds the node's refill until that replica has
answered) or for the pool's managers to be gone (then it exits).
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ray

from serving.warm_pool.common import HOLD_MAX_S, ORPHAN_AFTER_S, ORPHAN_VARIABLE, PRELOAD, _Kv

logger = logging.getLogger(__name__)

_state: dict[str, Any] = {}  # this process as a warm worker: {"key", "imports_s", "ready_at"}
_answered = threading.Event()  # the replica that took this warm worker has sent its first answer


# --- inside a prestarted worker -------------------------------------------------------------------
def prepare_worker() -> None:
    """Ray setup hook: in a worker the pool prestarted, import :data:`PRELOAD` and register.

    Runs in every worker started with :func:`runtime_env`, before it takes any task. A worker the
    raylet started for a lease (a replica starting cold) has a job already and returns at once;
    its replica imports in its constructor. Raising ends a prestarted worker (Ray exits it).
    """
    try:
        prestarted = ray._private.worker.global_worker.current_job_id.is_nil()
    except Exception:  # never stop a replica's worker over the pool
        logger.warning("warm pool: cannot tell whether this worker was prestarted", exc_info=True)
        return
    if not prestarted:
        return
    started = time.perf_counter()
    _import_gently(PRELOAD)
    # Serve collects garbage once a replica is initialised (then freezes what is left): with the
    # imports frozen here, that collection skips them (0.3 s on this machine, on the cold start).
    gc.collect()
    gc.freeze()
    imports_s = round(time.perf_counter() - started, 3)
    if library := cuda_library_loaded():
        # CUDA reads CUDA_VISIBLE_DEVICES once; Ray sets it when a GPU replica lands here.
        raise RuntimeError(f"the preload imports loaded {library}; this worker cannot host a GPU replica")
    context = ray.get_runtime_context()
    env_hash = _argv_value("--runtime-env-hash")
    key = f"w/{env_hash}/{context.get_node_id()}/{os.getpid()}/{context.get_worker_id()}"
    _state.update(key=key, imports_s=imports_s, ready_at=time.time())
    _kv().put(key, json.dumps({"pid": os.getpid(), "imports_s": imports_s}))
    # Stays until the leading manager has counted it: a replica may take this worker before any
    # manager's round sees its registration or its hold.
    _kv().put("a/" + key.removeprefix("w/"), "arrived")
    threading.Thread(target=_watch, args=(key, f"hb/{env_hash}"), name="warm-pool-watch", daemon=True).start()
    logger.info("warm worker ready: pid %d, imports %.2fs", os.getpid(), imports_s)


def _import_gently(names: tuple[str, ...]) -> None:
    """Import ``names`` in a thread at the lowest CPU priority, so that a refill yields the CPUs to a
    replica loading or answering on this node; the worker's own threads keep theirs."""
    failed: list[BaseException] = []

    def run() -> None:
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)  # this thread only (Linux)
        try:
            for name in names:
                importlib.import_module(name)
        except BaseException as exc:  # re-raised in the hook's thread
            failed.append(exc)

    thread = threading.Thread(target=run, name="warm-pool-imports")
    thread.start()
    thread.join()
    if failed:
        raise failed[0]


def cuda_library_loaded(maps: str | None = None) -> str | None:
    """The CUDA driver library mapped into this process (``/proc/self/maps``), if any."""
    if maps is None:
        try:
            maps = Path("/proc/self/maps").read_text()
        except OSError:
            return None
    for line in maps.splitlines():
        path = line.rpartition(" ")[2]
        if "/libcuda.so" in path or path.startswith("libcuda.so"):
            return path
    return None


def orphan_after_s(environ: Mapping[str, str] = os.environ) -> float:
    """How long this idle worker outlives the last pool manager it saw: the model's WARM_WORKER_ORPHAN_S, which
    the replicas' runtime env (and so this worker's) carries, validated at start; ORPHAN_AFTER_S without it.

    Example::

        >>> orphan_after_s({"WARM_WORKER_ORPHAN_S": "12.5"}), orphan_after_s({})
        (12.5, 30.0)
    """
    try:
        return float(environ[ORPHAN_VARIABLE])
    except (KeyError, ValueError):
        return ORPHAN_AFTER_S


def _watch(key: str, heartbeat_key: str, poll_s: float = 0.2) -> None:
    """Leave the registry when an actor lands here; exit when no pool manager is left."""
    worker = ray._private.worker.global_worker
    orphan_s = orphan_after_s()
    last, changed_at, next_check = None, time.monotonic(), 0.0
    while True:
        if not worker.actor_id.is_nil():
            logger.info("warm worker taken by actor %s", worker.actor_id.hex())
            _hold_until_answered(key)
            return
        now = time.monotonic()
        if now >= next_check:
            next_check = now + 5.0
            beat = _kv().get(heartbeat_key)
            if beat != last:
                last, changed_at = beat, now
            elif now - changed_at > orphan_s and worker.actor_id.is_nil():
                _kv().delete(key)
                logger.info("no warm pool manager for %.0fs: this idle warm worker exits", now - changed_at)
                os._exit(0)
        time.sleep(poll_s)


def _hold_until_answered(key: str, timeout_s: float = HOLD_MAX_S) -> None:
    """Turn this worker's registry entry into a hold that keeps the pool from refilling, until the
    replica here has answered its first request (:func:`replica_answered`), or for at most ``timeout_s``."""
    hold = "t/" + key.removeprefix("w/")
    kv = _kv()
    kv.put(hold, "held")
    kv.delete(key)  # after the put: the manager never sees the node short of a worker meanwhile
    _answered.wait(timeout_s)
    kv.delete(hold)  # a replica that died meanwhile leaves it behind: the manager's liveness check drops it


def _argv_value(flag: str) -> str:
    return next((arg.partition("=")[2] for arg in sys.argv if arg.startswith(flag + "=")), "0")


def worker_report() -> dict[str, Any]:
    """For a replica's cold-start report: did it start in a warm worker (whose process started long
    before the request, so that the replica had no process start of its own)?

    >>> worker_report()  # not in a warm worker
    {'warm_worker': False}
    """
    if not _state:
        return {"warm_worker": False}
    return {"warm_worker": True, "warm_imports_s": _state["imports_s"]}


def process_started_at() -> float | None:
    """Epoch time this process started (Linux), to time a replica's process start (none in a warm worker)."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rpartition(")")[2].split()[19])
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, StopIteration):
        return None


def replica_answered() -> None:
    """The model server calls this once its first answer is out: its warm worker's hold on the
    node's refill ends (nothing happens in a worker that was not warm)."""
    _answered.set()


def _kv() -> _Kv:
    return _Kv()
