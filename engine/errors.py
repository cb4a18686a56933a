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


class RowFailedError(RuntimeError):
    """Generating one of this request's rows failed (its sampling, detokenizer or stop strings, or
    non-finite scores for it); the rows of other requests in the same batch were not affected."""


class StepFailedError(RuntimeError):
    """A decoding step itself failed (out of memory, a device error): every row in that step
    ended, the engine carries on with the next batch, and the request may be retried as it is."""


class InvalidFieldError(RequestError):
    """A request field the model cannot honour as given (a token id outside the vocabulary...).

    ``param`` names the field (dotted, as the API names it), so the answer can point at it.
    """

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param

    def __reduce__(self) -> tuple:  # crosses a Ray handle with its field named
        return (type(self), (self.args[0], self.param))


class ConstraintError(InvalidFieldError):
    """A schema, regex or grammar the grammar library refuses to compile."""
