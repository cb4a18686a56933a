"""``/tokenize`` and ``/detokenize`` in the model's replica: its own tokenizer and chat template.

As vLLM serves them: a prompt (with the tokenizer's special tokens unless ``add_special_tokens`` is
false) or a chat (rendered with the model's chat template, the tools included) becomes token ids,
their count and the model's context length; ``token_strs`` adds each id's token as the vocabulary
spells it. Token ids become text with ``tokenizer.decode``, special tokens kept, as vLLM decodes them.
A chat with ``add_special_tokens`` unset is encoded exactly as ``/v1/chat/completions`` encodes it
(``engine.chat.encode_chat``), so its count is what a chat request is charged.

Plain Python (no torch): the Gateway imports the request and result types.

    >>> TokenizeRequest(prompt="Hello").add_special_tokens
    True
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from engine.chat import encode_chat, render_chat
from engine.errors import InvalidFieldError
from engine.types import ChatMessage


@dataclass(frozen=True)
class TokenizeRequest:
    """A prompt or a chat (one of them) to encode; ``add_special_tokens`` None: the route's default."""

    prompt: str | None = None
    messages: tuple[ChatMessage, ...] = ()
    tools: str | None = None  # the tools as JSON text, as the chat template reads them
    add_special_tokens: bool | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    token_strs: bool = False
    request_id: str = ""


@dataclass(frozen=True)
class TokenizeResult:
    tokens: list[int]
    max_model_len: int | None
    token_strs: list[str] | None = None


@dataclass(frozen=True)
class DetokenizeRequest:
    tokens: tuple[int, ...]
    request_id: str = ""


def tokenize(
    tokenizer: Any, request: TokenizeRequest, template: str | None, max_model_len: int | None
) -> TokenizeResult:
    """The request's token ids (ChatTemplateError for a chat the template cannot render)."""
    if request.prompt is not None:
        special = True if request.add_special_tokens is None else request.add_special_tokens
        ids = list(tokenizer(request.prompt, add_special_tokens=special)["input_ids"])
    else:
        text = render_chat(
            tokenizer,
            request.messages,
            template,
            request.tools,
            add_generation_prompt=request.add_generation_prompt,
            continue_final_message=request.continue_final_message,
        )
        if request.add_special_tokens is None:
            ids = encode_chat(tokenizer, text)
        else:
            ids = list(tokenizer(text, add_special_tokens=request.add_special_tokens)["input_ids"])
    strs = list(tokenizer.convert_ids_to_tokens(ids)) if request.token_strs else None
    return TokenizeResult(ids, max_model_len, strs)


def detokenize(tokenizer: Any, tokens: Sequence[int]) -> str:
    """The text of ``tokens``; an id outside the tokenizer's vocabulary is an ``InvalidFieldError``."""
    vocabulary = len(tokenizer)
    for index, token in enumerate(tokens):
        if not 0 <= token < vocabulary:
            raise InvalidFieldError(
                f"tokens.{index}: token id {token} is outside this model's vocabulary (0 to {vocabulary - 1})",
                param=f"tokens.{index}",
            )
    return tokenizer.decode(list(tokens), skip_special_tokens=False, clean_up_tokenization_spaces=False)
