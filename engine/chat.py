"""Chat prompts: messages rendered with the model's chat template (or an override) into token ids.

The template is the tokenizer's own (``chat_template`` in its files), unless the service gives
one (its CHAT_TEMPLATE setting, resolved to the template's text before it reaches the engine),
which then replaces it. The rendered chat ends with the generation prompt (the assistant's turn).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from engine.errors import ChatTemplateError
from engine.types import ChatMessage

NO_TEMPLATE = (
    "this model has no chat template, so it cannot serve chat messages. Set CHAT_TEMPLATE to a Jinja chat "
    "template (the template text, or the path of a file holding it), or send a plain prompt instead."
)


def message_dict(message: ChatMessage) -> dict[str, Any]:
    """A message as chat templates read it: tool calls with their arguments as objects (as vLLM
    hands them: Hermes/Qwen/Llama templates write ``arguments | tojson``), a tool reply with its call id."""
    out: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.tool_calls:
        out["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": _arguments(c.arguments)}}
            for c in message.tool_calls
        ]
    if message.tool_call_id is not None:
        out["tool_call_id"] = message.tool_call_id
    if message.name is not None:
        out["name"] = message.name
    return out


def _arguments(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def render_chat(
    tokenizer: Any,
    messages: Sequence[ChatMessage],
    template: str | None = None,
    tools: str | None = None,
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
) -> str:
    """The chat as the model reads it, ending with the generation prompt (unless told otherwise:
    ``/tokenize`` may ask for the chat without it, or with the last message left open).

    Raises ChatTemplateError when there is no template, or when the template refuses the messages
    (``raise_exception('...')`` in the template; its message is passed on).

    Example::

        render_chat(tokenizer, [ChatMessage("user", "Hi")])   # '<|user|>Hi<|assistant|>' for some template
    """
    import jinja2

    if template is None and not getattr(tokenizer, "chat_template", None):
        raise ChatTemplateError(NO_TEMPLATE)
    conversation = [message_dict(m) for m in messages]
    try:
        text = tokenizer.apply_chat_template(
            conversation,
            tools=json.loads(tools) if tools else None,
            chat_template=template,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
        )
    except (jinja2.TemplateError, ValueError) as exc:  # ValueError: a final message to continue that is not there
        raise ChatTemplateError(f"the chat template rejected these messages: {exc}") from None
    if not isinstance(text, str):  # a batch or dict answer would mean a template we do not understand
        raise ChatTemplateError("the chat template did not render to text")
    return text


def encode_chat(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a rendered chat, without a second BOS when the template already wrote one.

    Templates usually begin with the BOS token themselves; the tokenizer would add another, which
    changes what the model sees (vLLM drops the tokenizer's one the same way).
    """
    bos = getattr(tokenizer, "bos_token", None)
    add_special = not (bos and text.startswith(bos))
    return list(tokenizer(text, add_special_tokens=add_special)["input_ids"])


def check_template(template: str) -> None:
    """Fail early (at replica start) on a template that is not valid Jinja; ValueError names the problem."""
    import jinja2
    from transformers.utils.chat_template_utils import _compile_jinja_template

    try:
        _compile_jinja_template(template)
    except jinja2.TemplateSyntaxError as exc:
        raise ValueError(f"CHAT_TEMPLATE is not a valid Jinja template: {exc.message} (line {exc.lineno})") from None
