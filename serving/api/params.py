"""The one parameter policy every dialect shares: defaults from the model's settings, caps, limits.

A dialect's schema checks types and ranges; this module fills what the request left out from the
model's configured defaults and enforces what depends on the service's settings (the token cap,
prompts per request, prompt length), so ``/generate`` and the OpenAI routes agree on every rule.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence

from engine.types import SamplingParams
from serving.api.errors import Family, api_error
from settings import ModelConfig, Settings


def sampling_params(
    model: ModelConfig,
    *,
    max_new_tokens: int | None = None,
    max_new_tokens_field: str = "max_tokens",
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    repetition_penalty: float | None = None,
    presence_penalty: float | None = None,
    frequency_penalty: float | None = None,
    seed: int | None = None,
    stop: Sequence[str] | str | None = None,
    logprobs: int | None = None,
    family: Family = "openai",
) -> SamplingParams:
    """Resolved parameters: what the request set, the model's defaults for the rest.

    The token cap is ``max_new_tokens`` from here to the engine; ``max_new_tokens_field`` is only
    the name the client used for it (``max_tokens``, ``max_completion_tokens``...), for the error.

    Example::

        >>> from settings import ModelConfig
        >>> model = ModelConfig(name="m", model_id="org/m", max_new_tokens=8, temperature=0.0)
        >>> sampling_params(model, stop="\\n").as_dict()["stop"], sampling_params(model).max_new_tokens
        (['\\n'], 8)
    """
    if max_new_tokens is None:
        max_new_tokens = model.max_new_tokens
    if max_new_tokens > model.max_new_tokens_limit:
        raise api_error(
            "validation",
            f"{max_new_tokens_field}: {max_new_tokens} is above this model's limit of {model.max_new_tokens_limit} "
            "(MAX_NEW_TOKENS_LIMIT)",
            family=family,
            param=max_new_tokens_field,
            details=[{"field": max_new_tokens_field, "message": "above the limit", "input": max_new_tokens}],
        )
    temp = temperature if temperature is not None else model.temperature
    if seed is None and temp > 0:
        # Sampling always runs from a known seed (the native API echoes it), so any answer can be reproduced.
        seed = secrets.randbelow(2**31)
    return SamplingParams(
        max_new_tokens=max_new_tokens,
        temperature=temp,
        top_p=top_p if top_p is not None else model.top_p,
        top_k=top_k if top_k is not None else model.top_k,
        repetition_penalty=repetition_penalty if repetition_penalty is not None else model.repetition_penalty,
        presence_penalty=presence_penalty or 0.0,
        frequency_penalty=frequency_penalty or 0.0,
        seed=seed,
        stop=(stop,) if isinstance(stop, str) else tuple(stop or ()),
        logprobs=logprobs,
    )


def check_limits(prompts: Sequence[str], n: int, settings: Settings, prompt_param: str = "prompt") -> None:
    """Limits the Gateway enforces before any model replica is involved (413 when exceeded)."""
    rows = len(prompts) * n
    if rows > settings.max_prompts_per_request:
        asked = f"{len(prompts)} prompts x n={n}" if n > 1 else f"{len(prompts)} prompts"
        raise api_error(
            "budget",
            f"{asked} = {rows} completions in one request; this service makes at most "
            f"{settings.max_prompts_per_request} (MAX_PROMPTS_PER_REQUEST). Split the request.",
            code="too_many_prompts",
            param="n" if n > 1 else prompt_param,
        )
    for index, prompt in enumerate(prompts):
        if len(prompt) > settings.max_prompt_chars:
            which = f"prompt {index}" if len(prompts) > 1 else "the prompt"
            raise api_error(
                "budget",
                f"{which} has {len(prompt)} characters; this service accepts at most "
                f"{settings.max_prompt_chars} (MAX_PROMPT_CHARS).",
                code="prompt_too_long",
                param=prompt_param,
            )
