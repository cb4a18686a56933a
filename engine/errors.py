"""Why the engine cannot serve a request as asked. No HTTP here: the Gateway maps each to a status.

The messages are written for the person who sent the request, and say what to change.
"""

from __future__ import annotations


class RequestError(ValueError):
    """A request this model cannot serve as asked (the client can fix it)."""


class PromptTooLongError(RequestError):
    """A prompt (plus the tokens to generate) does not fit the model's context or the token limit."""


class ChatTemplateError(RequestError):
    """A chat was sent to a model that has no chat template, or the template rejected the messages."""
