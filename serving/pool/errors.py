"""What the pool refuses (admin operations, admission, routing), as exceptions the Gateway maps to statuses.

They carry no HTTP codes: ``serving.api.errors`` maps each to its status, shape and Retry-After. Each
names what a person can change. Raised in the pool controller's replica, they reach the caller
through the Serve handle as the same type.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Self


class PoolError(Exception):
    """Base of the pool's refusals.

    Pickling an exception rebuilds it from ``args``, which hold only the message once a refusal has
    composed it; each refusal is rebuilt from the arguments it was made with instead, so that its
    fields (``served``, ``retry_after_s``...) cross a Ray handle whole.

    >>> import pickle
    >>> pickle.loads(pickle.dumps(ModelUnavailableError("mini", 1.5, retry_after_s=3))).retry_after_s
    3
    """

    _made_with: tuple[tuple[Any, ...], dict[str, Any]] = ((), {})

    def __new__(cls, *args: Any, **kwargs: Any) -> Self:
        error = super().__new__(cls, *args)
        error._made_with = (args, kwargs)
        return error

    def __reduce__(self) -> tuple[Any, ...]:
        args, kwargs = self._made_with
        return (partial(type(self), **kwargs) if kwargs else type(self), args)


class ModelValidationError(PoolError):
    """A model entry has a bad field (-> 422 naming ``field``).

    >>> str(ModelValidationError("max_replicas", "must be at least min_replicas (2), got 1"))
    'max_replicas: must be at least min_replicas (2), got 1'
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class ModelExistsError(PoolError):
    """A model of that name is already served (-> 409)."""


class UnknownModelError(PoolError):
    """No model of that name is served (-> 404 listing ``served``)."""

    def __init__(self, name: str, served: list[str], message: str | None = None) -> None:
        super().__init__(message or f"model {name!r} is not served; served models: {', '.join(served) or 'none'}")
        self.name = name
        self.served = served


class ModelRequiredError(PoolError):
    """Several models are served and the request named none (-> 422 listing ``served``)."""

    def __init__(self, served: list[str]) -> None:
        super().__init__(f"this service serves several models; name one in `model`: {', '.join(served)}")
        self.served = served


class ModelUnavailableError(PoolError):
    """No room for the model within the request's time (-> 503 with ``Retry-After: retry_after_s``)."""

    def __init__(self, name: str, waited_s: float, retry_after_s: int) -> None:
        super().__init__(
            f"model {name!r} is waiting for room on the cluster (models of higher priority hold it); "
            f"waited {waited_s:.1f}s, retry in {retry_after_s}s"
        )
        self.name = name
        self.waited_s = waited_s
        self.retry_after_s = retry_after_s


class TooManyWaitersError(PoolError):
    """Too many requests already wait for room for this model (-> 503 with ``Retry-After`` at once)."""

    def __init__(self, name: str, bound: int, retry_after_s: int) -> None:
        super().__init__(
            f"model {name!r} is waiting for room on the cluster and {bound} requests already wait for it "
            f"(MAX_QUEUED_REQUESTS); retry in {retry_after_s}s"
        )
        self.name = name
        self.bound = bound
        self.retry_after_s = retry_after_s


class WrongTaskError(PoolError):
    """A route the model does not serve: generation on an embedding model, or the reverse (-> 400 naming its routes)."""
