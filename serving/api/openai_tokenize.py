"""``POST /tokenize`` and ``POST /detokenize``, as vLLM serves them beside its OpenAI routes.

``/tokenize`` takes a ``prompt`` (special tokens added unless ``add_special_tokens`` is false) or
chat ``messages`` (rendered with the model's chat template: ``tools``, ``add_generation_prompt``,
``continue_final_message``; encoded as ``/v1/chat/completions`` encodes them unless
``add_special_tokens`` says otherwise) and answers ``{"count", "max_model_len", "tokens"}``, with
``token_strs`` when ``return_token_strs`` asks. ``/detokenize`` takes ``tokens`` and answers
``{"prompt"}``. Both go through the same key check, limits (MAX_PROMPT_CHARS) and OpenAI error
shape as the ``/v1`` routes, and wake a model at zero like any request (the tokenizer lives in the
model's replica). Unknown fields are accepted and logged.
"""

from __future__ import annotations

import logging
from typing import Annotated

from pydantic import BaseModel, Field

from engine import tokenization
from serving.api.errors import api_error, invalid_value
from serving.api.openai_prompts import chat_messages
from serving.api.openai_schemas import ChatMessageIn, ToolIn, _Request
from serving.api.openai_tools import tools_json
from serving.api.params import check_limits
from settings import Settings

logger = logging.getLogger("ray.serve")

MODEL = Field(default=None, min_length=1, description="A served model's id or its MODEL_ID (optional with one).")


class TokenizeRequest(_Request):
    """``POST /tokenize``: ``prompt`` or ``messages``, one of them."""

    model: str | None = MODEL
    prompt: str | None = Field(default=None, description="A text to encode.")
    messages: list[ChatMessageIn] | None = Field(
        default=None, min_length=1, max_length=256, description="A chat, rendered with the model's chat template."
    )
    tools: list[ToolIn] | None = Field(
        default=None, max_length=128, description="With messages: tools the template shows."
    )
    add_special_tokens: bool | None = Field(
        default=None,
        description="Add the tokenizer's special tokens (BOS...). Default: true for a prompt; for messages, as "
        "/v1/chat/completions encodes them.",
    )
    add_generation_prompt: bool = Field(default=True, description="With messages: end with the assistant's turn.")
    continue_final_message: bool = Field(
        default=False, description="With messages: leave the last message open (needs add_generation_prompt false)."
    )
    return_token_strs: bool | None = Field(default=False, description="Also return each id's token string.")


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int | None = Field(description="The model's context length (prompt and output), when known.")
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(_Request):
    """``POST /detokenize``."""

    model: str | None = MODEL
    tokens: list[Annotated[int, Field(ge=0)]] = Field(description="Token ids to turn into text.")


class DetokenizeResponse(BaseModel):
    prompt: str


def _logged(body: _Request, request_id: str) -> None:
    if unknown := body.unknown_fields():
        logger.info("request %s: ignoring fields this API does not define: %s", request_id, ascii(unknown[:8]))


def translate(body: TokenizeRequest, settings: Settings, request_id: str) -> tokenization.TokenizeRequest:
    """The replica's request; a 4xx naming the field for a body that asks for both forms or neither."""
    _logged(body, request_id)
    if (body.prompt is None) == (body.messages is None):
        raise invalid_value("prompt", "send prompt (a text) or messages (a chat): one of them")
    if body.messages is None and body.tools:
        raise invalid_value("tools", "tools are shown to a chat's template: send them with messages")
    if body.continue_final_message and body.add_generation_prompt:
        raise invalid_value(
            "continue_final_message", "cannot be used with add_generation_prompt true; set add_generation_prompt false"
        )
    if body.prompt is not None:
        check_limits([body.prompt], 1, settings)
        return tokenization.TokenizeRequest(
            prompt=body.prompt,
            add_special_tokens=body.add_special_tokens,
            token_strs=bool(body.return_token_strs),
            request_id=request_id,
        )
    messages = chat_messages(body.messages or ())
    check_limits(["".join(m.content for m in messages)], 1, settings, prompt_param="messages")
    return tokenization.TokenizeRequest(
        messages=messages,
        tools=tools_json(body.tools),
        add_special_tokens=body.add_special_tokens,
        add_generation_prompt=body.add_generation_prompt,
        continue_final_message=body.continue_final_message,
        token_strs=bool(body.return_token_strs),
        request_id=request_id,
    )


def translate_detokenize(
    body: DetokenizeRequest, settings: Settings, request_id: str
) -> tokenization.DetokenizeRequest:
    """The replica's request; more ids than MAX_PROMPT_CHARS (no prompt this service takes has more) is a 413."""
    _logged(body, request_id)
    if len(body.tokens) > settings.max_prompt_chars:
        raise api_error(
            "budget",
            f"tokens: {len(body.tokens)} token ids; this service decodes at most {settings.max_prompt_chars} "
            "(MAX_PROMPT_CHARS) at once. Split the request.",
            code="prompt_too_long",
            param="tokens",
        )
    return tokenization.DetokenizeRequest(tuple(body.tokens), request_id)


def response(result: tokenization.TokenizeResult) -> TokenizeResponse:
    return TokenizeResponse(
        count=len(result.tokens), max_model_len=result.max_model_len, tokens=result.tokens, token_strs=result.token_strs
    )
