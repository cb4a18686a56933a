"""What the two OpenAI routes send as their prompts, as the engine takes them: chat messages, and
completion prompts (text, or token ids). A 400 names the field for anything this service does not take.

    >>> completion_prompts([[1, 2], [3]])
    ((), ((1, 2), (3,)))
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from engine.types import ChatMessage, ToolCall
from serving.api.errors import invalid_value, unsupported
from serving.api.openai_schemas import ChatMessageIn

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}


def chat_messages(given: Sequence[ChatMessageIn]) -> tuple[ChatMessage, ...]:
    """The engine's messages; a 400 naming the field for a role, part or field this service does not take."""
    messages = []
    for i, message in enumerate(given):
        where = f"messages.{i}"
        role = ROLES.get(message.role)
        if role is None:
            what = "function messages are replaced by tool messages" if message.role == "function" else (
                f"unknown role {message.role!r}; use system, user, assistant or tool"
            )  # fmt: skip
            raise unsupported(f"{where}.role", what)
        for extra in ("function_call", "audio", "refusal"):
            if (message.model_extra or {}).get(extra):
                raise unsupported(f"{where}.{extra}", "not supported by this service")
        if message.name is not None and role != "tool":
            raise unsupported(f"{where}.name", "participant names are not supported; remove it")
        if message.tool_calls and role != "assistant":
            raise invalid_value(f"{where}.tool_calls", "only assistant messages carry tool calls")
        if role == "tool" and not message.tool_call_id:
            raise invalid_value(f"{where}.tool_call_id", "required on tool messages (the id of the call answered)")
        content = message.content
        if content is None and not message.tool_calls:
            raise invalid_value(f"{where}.content", "required")
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if part.type != "text":
                    raise unsupported(f"{where}.content.{j}.type", f"{part.type!r} parts are not supported; send text")
                if part.text is None:
                    raise invalid_value(f"{where}.content.{j}.text", "required")
                texts.append(part.text)
            content = "".join(texts)
        calls = tuple(ToolCall(c.id, c.function.name, c.function.arguments) for c in message.tool_calls or ())
        tool_call_id = message.tool_call_id if role == "tool" else None
        name = message.name if role == "tool" else None
        messages.append(ChatMessage(role, content or "", calls, tool_call_id, name))  # type: ignore[arg-type]
    return tuple(messages)


def completion_prompts(prompt: Any) -> tuple[tuple[str, ...], tuple[tuple[int, ...], ...]]:
    """Text prompts, or token-id prompts (a list of ints is one prompt, a list of such lists several)."""
    if isinstance(prompt, str):
        return (prompt,), ()
    if not prompt:  # [] passes the schema as an empty list of token ids
        raise invalid_value("prompt", "send a prompt (the list is empty)")
    if isinstance(prompt[0], str):
        return tuple(prompt), ()
    if isinstance(prompt[0], int):
        return (), (tuple(prompt),)
    if any(not ids for ids in prompt):
        raise invalid_value("prompt", "a token-id prompt is empty; send at least one id")
    return (), tuple(tuple(ids) for ids in prompt)
