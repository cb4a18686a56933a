"""The sampling fields both OpenAI routes share beyond the basic ones: logit bias, vLLM's extras, and
the constraint a request's answer must match (``response_format`` or vLLM's ``guided_*``).

Only the Gateway's checks live here (types, ranges, one constraint per request); what depends on
the model (a token id in its vocabulary, a schema its grammar library compiles) is checked by the
model server, whose refusal names the same field.

    >>> from serving.api.openai_schemas import CompletionRequest
    >>> body = CompletionRequest(model="m", prompt="a", logit_bias={"7": -100}, min_tokens=2)
    >>> extras = sampling_extras(body, max_new_tokens=8)
    >>> extras["logit_bias"], extras["min_tokens"], extras["constraint"]
    (((7, -100.0),), 2, None)
"""

from __future__ import annotations

import json
from typing import Any

from engine.types import Constraint
from serving.api.errors import ApiError, api_error
from serving.api.openai_schemas import OpenAIRequest

MAX_SCHEMA_CHARS = 100_000  # a schema is compiled in the model replica: bound its size here


def invalid(param: str, what: str) -> ApiError:
    return api_error("bad_request", f"{param}: {what}", param=param)


def logit_bias(bias: dict[str, float] | None) -> tuple[tuple[int, float], ...]:
    """OpenAI's ``{"token id": bias}`` as pairs; keys must be token ids, biases within [-100, 100]."""
    pairs = []
    for key, value in (bias or {}).items():
        if not key.strip().isdigit():
            raise invalid("logit_bias", f"keys are token ids (digits as a string), got {key[:40]!r}")
        if not -100 <= value <= 100:
            raise invalid("logit_bias", f"biases go from -100 to 100, got {value} for token {key}")
        pairs.append((int(key), float(value)))
    return tuple(pairs)


def _json_text(value: Any, param: str) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    if len(text) > MAX_SCHEMA_CHARS:
        raise invalid(param, f"{len(text)} characters; at most {MAX_SCHEMA_CHARS}")
    if isinstance(value, str):
        try:
            json.loads(text)
        except ValueError:
            raise invalid(param, "not valid JSON") from None
    return text


def constraint(body: OpenAIRequest) -> Constraint | None:
    """The one constraint a request asks for, or None; two at once is a 400 naming both."""
    found: list[tuple[str, Constraint]] = []
    fmt = body.response_format
    if fmt is not None and fmt.type == "json_object":
        found.append(("response_format", Constraint("json_object", param="response_format")))
    elif fmt is not None and fmt.type == "json_schema":
        param = "response_format.json_schema.schema"
        if fmt.json_schema is None or fmt.json_schema.schema_ is None:
            raise invalid(param, "required with type json_schema")
        # OpenAI's strict mode: exactly the listed properties. Not strict: extra properties may appear.
        strict = bool(fmt.json_schema.strict)
        found.append(
            ("response_format", Constraint("json_schema", _json_text(fmt.json_schema.schema_, param), strict, param))
        )
    if body.guided_json is not None:
        spec = _json_text(body.guided_json, "guided_json")
        found.append(("guided_json", Constraint("json_schema", spec, False, "guided_json")))
    if body.guided_regex is not None:
        found.append(("guided_regex", Constraint("regex", body.guided_regex, param="guided_regex")))
    if body.guided_choice is not None:
        found.append(("guided_choice", Constraint("choice", json.dumps(body.guided_choice), param="guided_choice")))
    if body.guided_grammar is not None:
        found.append(("guided_grammar", Constraint("grammar", body.guided_grammar, param="guided_grammar")))
    if len(found) > 1:
        names = " and ".join(name for name, _ in found)
        raise invalid(found[1][0], f"one constraint per request: {names} both ask for one")
    return found[0][1] if found else None


def sampling_fields(body: OpenAIRequest) -> dict[str, Any]:
    """The sampling fields both OpenAI routes carry under the same names, as ``sampling_params`` arguments."""
    return {
        "temperature": body.temperature,
        "top_p": body.top_p,
        "top_k": body.top_k,
        "repetition_penalty": body.repetition_penalty,
        "presence_penalty": body.presence_penalty,
        "frequency_penalty": body.frequency_penalty,
        "seed": body.seed,
        "stop": body.stop,
    }


def sampling_extras(body: OpenAIRequest, max_new_tokens: int) -> dict[str, Any]:
    """The SamplingParams fields these request fields set (see ``engine.types.SamplingParams``)."""
    if body.min_tokens > max_new_tokens:
        raise invalid("min_tokens", f"{body.min_tokens} is more than the {max_new_tokens} tokens asked for")
    return {
        "logit_bias": logit_bias(body.logit_bias),
        "min_tokens": body.min_tokens,
        "stop_token_ids": tuple(body.stop_token_ids or ()),
        "ignore_eos": body.ignore_eos,
        "min_p": body.min_p or 0.0,
        "constraint": constraint(body),
    }
