"""Errors the engine raises for requests it cannot serve; the Gateway maps each to a 4xx."""

from __future__ import annotations


class EngineRequestError(ValueError):
    """A request the model cannot serve as asked. ``status_code`` is the HTTP status it maps to."""

    status_code = 422


class PromptTooLongError(EngineRequestError):
    """A prompt (plus the tokens to generate) does not fit the model's context or the token limit."""

    status_code = 413


class EngineOverloadedError(RuntimeError):
    """The replica is shutting down or its queue is full; the client should retry elsewhere."""
