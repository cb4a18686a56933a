"""Tool calling on /v1/chat/completions: ``tools`` and ``tool_choice`` in, ``tool_calls`` out.

As vLLM does it: the tools reach the chat template; ``tool_choice`` ``"required"`` constrains the
answer to a JSON list of ``{"name", "parameters"}`` calls of the given tools, a named function to
its arguments object (both through the grammar constraint, so the calls are valid even from a
small model); ``"auto"`` lets the model write and reads its text with the model's ``TOOL_PARSER``
(``engine.tool_parsers``); ``"none"`` reads nothing. ``parallel_tool_calls: false`` keeps one call.

    plan = tool_plan(body, model)            # None without tools
    constraint = plan.constraint()           # for required / named
    answer = plan.read(text)                 # Extracted(content, calls)
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Literal

from engine.tool_parsers import PARSERS, Extracted, ParsedCall, ToolStream, calls_from_json
from engine.types import Constraint, ToolCall
from serving.api.errors import ApiError, api_error
from serving.api.openai_responses import DeltaMessage, FunctionCallDelta, ToolCallDelta
from serving.api.openai_schemas import ChatCompletionRequest, NamedToolChoice, ToolIn
from settings import ModelConfig

ANY_OBJECT = {"type": "object"}


def _invalid(param: str, what: str) -> ApiError:
    return api_error("bad_request", f"{param}: {what}", param=param)


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def tool_call(call: ParsedCall) -> ToolCall:
    return ToolCall(call_id(), call.name, call.arguments)


@dataclass(frozen=True)
class ToolPlan:
    """How one chat request's answer is read for tool calls."""

    mode: Literal["none", "auto", "required", "named"]
    tools: tuple[tuple[str, dict], ...]  # (name, parameters schema)
    named: str | None = None
    parallel: bool = True
    parser: str = "hermes"

    def constraint(self) -> Constraint | None:
        if self.mode == "named":
            index, schema = next((i, p) for i, (name, p) in enumerate(self.tools) if name == self.named)
            return Constraint("json_schema", json.dumps(schema), True, f"tools.{index}.function.parameters")
        if self.mode == "required":
            calls = [
                {
                    "type": "object",
                    "properties": {"name": {"type": "string", "enum": [name]}, "parameters": parameters},
                    "required": ["name", "parameters"],
                    "additionalProperties": False,
                }
                for name, parameters in self.tools
            ]
            array: dict = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
            if not self.parallel:
                array["maxItems"] = 1
            return Constraint("json_schema", json.dumps(array), True, "tools")
        return None

    def read(self, text: str) -> Extracted:
        """A whole answer's content and calls (at most one with ``parallel_tool_calls: false``)."""
        if self.mode == "named":
            calls = calls_from_json(json.dumps({"name": self.named, "arguments": _object(text)}))
            extracted = Extracted(None, calls) if calls and _object(text) is not None else Extracted(text or None)
        elif self.mode == "required":
            calls = calls_from_json(text)
            extracted = Extracted(None, calls) if calls else Extracted(text or None)
        elif self.mode == "auto":
            extracted = PARSERS[self.parser]().extract(text)
            extracted.calls = [c for c in extracted.calls if c.name in dict(self.tools)]
        else:
            return Extracted(text)
        if not self.parallel:
            extracted.calls = extracted.calls[:1]
        return extracted

    def finish_reason(self, reason: str | None, called: bool) -> str | None:
        """``tool_calls`` when an auto or required answer called a tool and ended by itself; a named
        choice's call keeps the row's own reason (``stop``), as OpenAI and vLLM answer it."""
        return "tool_calls" if called and reason == "stop" and self.mode != "named" else reason

    def stream(self) -> ToolStream | None:
        """For ``auto``: a parser stream that lets content through as soon as it cannot be a call."""
        return PARSERS[self.parser]().stream() if self.mode == "auto" else None


def _object(text: str) -> dict | None:
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def tool_plan(body: ChatCompletionRequest, model: ModelConfig) -> ToolPlan | None:
    """The request's plan, or None when it has no tools; a 400 naming the field for a wrong choice."""
    choice = body.tool_choice
    if not body.tools:
        if choice not in (None, "none", "auto"):
            raise _invalid("tool_choice", "needs tools: send the functions the model may call in `tools`")
        return None
    tools = tuple((t.function.name, t.function.parameters or ANY_OBJECT) for t in body.tools)
    names = [name for name, _ in tools]
    if len(set(names)) != len(names):
        raise _invalid("tools", "two tools have the same function name")
    parallel = body.parallel_tool_calls is not False
    parser = getattr(model, "tool_parser", "hermes")
    if isinstance(choice, NamedToolChoice):
        if choice.function.name not in names:
            raise _invalid("tool_choice.function.name", f"{choice.function.name!r} is not among the tools: {names}")
        return ToolPlan("named", tools, choice.function.name, parallel, parser)
    return ToolPlan(choice or "auto", tools, None, parallel, parser)  # type: ignore[arg-type]


def tools_json(tools: Sequence[ToolIn] | None) -> str | None:
    """The tools as the chat template reads them (OpenAI's list, as JSON text)."""
    if not tools:
        return None
    return json.dumps([tool.model_dump(exclude_none=True) for tool in tools])


class StreamedTools:
    """One streamed choice read for tool calls: a named call's arguments stream as they are written;
    required calls go out whole at the end; auto lets content through until a call may begin."""

    def __init__(self, plan: ToolPlan) -> None:
        self.plan = plan
        self.text = ""
        self.called = False
        self.parser = plan.stream()
        self._id = call_id()

    def feed(self, text: str, ended: bool) -> Iterator[DeltaMessage]:
        self.text += text
        if self.plan.mode == "named":
            if text:
                first = not self.called
                self.called = True
                function = FunctionCallDelta(name=self.plan.named if first else None, arguments=text)
                yield DeltaMessage(
                    tool_calls=[
                        ToolCallDelta(
                            index=0,
                            id=self._id if first else None,
                            type="function" if first else None,
                            function=function,
                        )
                    ]
                )
            return
        if self.parser is not None and (content := self.parser.feed(text)):
            yield DeltaMessage(content=content)
        if not ended:
            return
        answer = self.plan.read(self.text)
        if self.parser is not None:  # what it has not let through yet: the content before a call, or all
            rest = self.parser.finish().content if answer.calls else self.text[self.parser.sent :]
            answer.content = rest or None
        if answer.content:
            yield DeltaMessage(content=answer.content)
        if answer.calls:
            self.called = True
            deltas = [
                ToolCallDelta(index=i, id=call_id(), type="function", function=FunctionCallDelta(**asdict(c)))
                for i, c in enumerate(answer.calls)
            ]
            yield DeltaMessage(tool_calls=deltas)
