"""Waiting for a condition, and watching that one holds: the only polling loops of tests and benchmarks.

>>> wait_for(lambda: 42, timeout=1)
42
>>> holds_for(lambda: True, seconds=0.05, interval=0.01)
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

T = TypeVar("T")


def wait_for(condition: Callable[[], T], timeout: float, interval: float = 0.2, what: str = "condition") -> T:
    """Call ``condition`` every ``interval`` seconds until it returns something truthy, and return that;
    fail (AssertionError naming ``what``) after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


async def wait_for_async(
    condition: Callable[[], T | Awaitable[T]], timeout: float, interval: float = 0.1, what: str = "condition"
) -> T:
    """:func:`wait_for` inside an event loop: ``condition`` may be a plain function or a coroutine function,
    and the loop keeps running between the calls."""
    deadline = time.monotonic() + timeout
    while True:
        value = await _result(condition())
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


def holds_for(check: Callable[[], object], seconds: float, interval: float = 0.25, what: str = "condition") -> None:
    """Call ``check`` every ``interval`` seconds for ``seconds`` seconds; fail on the first sample where it
    returns something falsy (or raises, as a ``check`` with its own assertions does).

    This is how a test observes an absence (nothing grows, nothing starts): it cannot wait for it to happen,
    so it samples a fixed time and asserts on every sample, never sleeps the time through and looks once.
    """
    _check(check(), what)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(interval)
        _check(check(), what)


async def holds_for_async(
    check: Callable[[], Any], seconds: float, interval: float = 0.1, what: str = "condition"
) -> None:
    """:func:`holds_for` inside an event loop (``check`` may be a coroutine function)."""
    _check(await _result(check()), what)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        await asyncio.sleep(interval)
        _check(await _result(check()), what)


async def _result(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


def _check(value: object, what: str) -> None:
    if not value:
        raise AssertionError(f"{what} stopped holding (got {value!r})")
