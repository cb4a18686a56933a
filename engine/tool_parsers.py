"""Tool-call parsers: a model's text -> tool calls, one class per output convention, chosen per model.

No torch: the Gateway parses the text the model server streams. Each parser reads a whole answer
(:meth:`ToolParser.extract`) or a stream (:meth:`ToolParser.stream`: text that is surely content
goes out at once, text that may be a call is held until the answer ends). Registered names are the
``TOOL_PARSER`` setting's values::

    >>> calls = PARSERS["hermes"]().extract('Sure.<tool_call>{"name": "f", "arguments": {"x": 1}}</tool_call>')
    >>> calls.content, [(c.name, c.arguments) for c in calls.calls]
    ('Sure.', [('f', '{"x": 1}')])
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar


@dataclass(frozen=True)
class ParsedCall:
    name: str
    arguments: str  # JSON text of the arguments object


@dataclass
class Extracted:
    content: str | None
    calls: list[ParsedCall] = field(default_factory=list)


def _call(value: Any) -> ParsedCall | None:
    """``{"name": ..., "arguments" | "parameters": {...}}`` as a call, else None."""
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    if isinstance(arguments, str):  # some models write the arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ParsedCall(value["name"], json.dumps(arguments, ensure_ascii=False))


def calls_from_json(text: str) -> list[ParsedCall] | None:
    """A JSON call or a JSON list of calls (vLLM's form for ``tool_choice: required``), else None."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    values = value if isinstance(value, list) else [value]
    calls = [_call(v) for v in values]
    return calls if calls and all(c is not None for c in calls) else None  # type: ignore[return-value]


class ToolStream:
    """A streamed answer read through a parser: ``feed`` returns the content safe to send now."""

    def __init__(self, parser: ToolParser) -> None:
        self.parser = parser
        self.text = ""
        self.sent = 0  # characters of ``text`` sent as content
        self.holding = False  # a call may have begun: nothing more goes out until the end

    def feed(self, text: str) -> str:
        self.text += text
        if self.holding:
            return ""
        start = self.parser.call_start(self.text, self.sent)
        if start is not None:
            self.holding = True
            out, self.sent = self.text[self.sent : start], start
            return out
        safe = len(self.text) - self.parser.held_back(self.text)
        out, self.sent = self.text[self.sent : safe], max(self.sent, safe)
        return out

    def finish(self) -> Extracted:
        """The rest: content not sent yet, and the calls (none: the held text was content after all)."""
        extracted = self.parser.extract(self.text)
        if not extracted.calls:
            return Extracted(self.text[self.sent :] or None)
        content = (extracted.content or "")[self.sent :]
        return Extracted(content or None, extracted.calls)


class ToolParser:
    """Base of the parsers: subclasses define how calls look in the text."""

    name: ClassVar[str]

    def extract(self, text: str) -> Extracted:
        raise NotImplementedError

    def call_start(self, text: str, since: int) -> int | None:
        """Where a call surely begins in ``text`` (at or after ``since``), or None."""
        raise NotImplementedError

    def held_back(self, text: str) -> int:
        """How many trailing characters might begin a call (kept until the next text decides)."""
        return 0

    def stream(self) -> ToolStream:
        return ToolStream(self)


class HermesParser(ToolParser):
    """Hermes / Qwen: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, any number of them."""

    name = "hermes"
    OPEN, CLOSE = "<tool_call>", "</tool_call>"
    _CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)

    def extract(self, text: str) -> Extracted:
        start = text.find(self.OPEN)
        if start < 0:
            return Extracted(text or None)
        calls = []
        for body in self._CALL.findall(text[start:]):
            call = _call(_loads(body))
            if call is None:
                return Extracted(text or None)  # not a well-formed call: the answer is text
            calls.append(call)
        return Extracted(text[:start] or None, calls)

    def call_start(self, text: str, since: int) -> int | None:
        found = text.find(self.OPEN, since)
        return found if found >= 0 else None

    def held_back(self, text: str) -> int:
        for size in range(min(len(self.OPEN) - 1, len(text)), 0, -1):
            if self.OPEN.startswith(text[-size:]):
                return size
        return 0


class JsonParser(ToolParser):
    """Plain JSON: the whole answer is a call object or a list of them (Llama 3.x style), else text."""

    name = "json"

    def extract(self, text: str) -> Extracted:
        calls = calls_from_json(text.strip())
        return Extracted(None, calls) if calls else Extracted(text or None)

    def call_start(self, text: str, since: int) -> int | None:
        stripped = text.lstrip()
        if since == 0 and stripped[:1] in ("{", "["):
            return len(text) - len(stripped)
        return None

    def held_back(self, text: str) -> int:
        return len(text) if not text.strip() else 0  # leading whitespace: a call may follow


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


PARSERS: dict[str, type[ToolParser]] = {parser.name: parser for parser in (HermesParser, JsonParser)}
