"""The output budget of one request, checked at the Gateway before any model is involved.

What a request can make the Gateway hold and render grows with completions x tokens x (1 + the
log-probability alternatives per token): ``n=16``, ``top_logprobs=20`` and 1,024 tokens is 344,064
entries, hundreds of MB of result objects and seconds of event-loop time for one answer.
MAX_OUTPUT_TOKENS_PER_REQUEST bounds that product for every dialect (400 naming the setting).
"""

from __future__ import annotations

from engine.types import GenerationRequest
from serving.api.errors import api_error


def output_tokens(call: GenerationRequest) -> int:
    """Entries the answer can hold: rows x max new tokens x (1 + alternatives per token).

    >>> from engine.types import SamplingParams
    >>> output_tokens(GenerationRequest("r", SamplingParams(1024, logprobs=20), messages=(), prompts=("a",), n=16))
    344064
    """
    return call.rows * call.params.max_new_tokens * (1 + (call.params.logprobs or 0))


def check_output_budget(call: GenerationRequest, limit: int) -> None:
    """400 when the request may produce more than ``limit`` output entries."""
    asked = output_tokens(call)
    if asked <= limit:
        return
    alternatives = call.params.logprobs or 0
    raise api_error(
        "bad_request",
        f"this request may produce {call.rows} completion(s) x {call.params.max_new_tokens} tokens x "
        f"(1 + {alternatives} log-probability alternatives) = {asked} output tokens; this service allows "
        f"{limit} per request (MAX_OUTPUT_TOKENS_PER_REQUEST). Lower n, the number of prompts, max_tokens or "
        "the log-probability alternatives.",
        code="output_budget_exceeded",
    )
