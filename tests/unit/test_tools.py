"""Tool calling: the parsers (whole and streamed), the plan each tool_choice makes, the template
rendering of tools and tool messages, and the chat route's tool_calls answers with a fake backend."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from engine.chat import render_chat
from engine.tool_parsers import PARSERS
from engine.types import ChatMessage, GenerationRequest, ToolCall
from serving.app import create_app
from settings import build_settings
from testing.checkpoints import TOOLS_TEMPLATE
from tests.fakes import FakeBackend

MODEL = "tiny"
WEATHER = {"type": "function", "function": {"name": "weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}  # fmt: skip
TIME = {"type": "function", "function": {"name": "time", "parameters": {"type": "object", "properties": {}}}}


# --- parsers -------------------------------------------------------------------------------------------


def test_hermes_parses_calls_and_the_content_before_them() -> None:
    text = (
        'Let me look.<tool_call>{"name": "weather", "arguments": {"city": "Oslo"}}</tool_call>\n'
        '<tool_call>{"name": "time", "arguments": {}}</tool_call>'
    )
    out = PARSERS["hermes"]().extract(text)
    assert out.content == "Let me look." and [(c.name, json.loads(c.arguments)) for c in out.calls] == [
        ("weather", {"city": "Oslo"}), ("time", {})]  # fmt: skip
    assert PARSERS["hermes"]().extract("no calls here").calls == []
    broken = PARSERS["hermes"]().extract("<tool_call>{not json</tool_call>")
    assert broken.calls == [] and broken.content == "<tool_call>{not json</tool_call>"


def test_json_parser_reads_an_object_or_a_list_and_parameters_as_arguments() -> None:
    parser = PARSERS["json"]()
    assert [c.name for c in parser.extract(' {"name": "time", "parameters": {}}').calls] == ["time"]
    assert (
        len(parser.extract('[{"name": "a", "arguments": {}}, {"name": "b", "arguments": "{\\"x\\": 1}"}]').calls) == 2
    )
    assert parser.extract("The answer is 4.").calls == [] and parser.extract("The answer is 4.").content


@pytest.mark.parametrize("pieces", [["Hi <", "tool", "_call>{\"name\": \"time\", \"arguments\": {}}</tool_call>"],
                                    ["Hi ", "<tool_call>", "{\"name\": \"time\", \"arguments\": {}}"]])  # fmt: skip
def test_a_hermes_stream_lets_content_through_and_holds_what_may_be_a_call(pieces) -> None:
    stream = PARSERS["hermes"]().stream()
    sent = "".join(stream.feed(piece) for piece in pieces)
    end = stream.finish()
    assert sent + (end.content or "") == "Hi " and [c.name for c in end.calls] == ["time"]


def test_a_stream_that_looked_like_a_call_but_was_not_sends_it_as_content() -> None:
    stream = PARSERS["hermes"]().stream()
    sent = stream.feed("a <tool") + stream.feed("box> b")
    assert sent + (stream.finish().content or "") == "a <toolbox> b"


# --- the chat template ---------------------------------------------------------------------------------


def test_tools_tool_calls_and_tool_messages_reach_the_template(tiny_chat: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_chat)
    messages = [
        ChatMessage("user", "Weather in Oslo?"),
        ChatMessage("assistant", "", (ToolCall("call_1", "weather", '{"city": "Oslo"}'),)),
        ChatMessage("tool", "sunny", tool_call_id="call_1"),
    ]
    text = render_chat(tokenizer, messages, TOOLS_TEMPLATE, json.dumps([WEATHER]))
    assert text.startswith('<|system|>weather:{"type": "object"') or text.startswith("<|system|>weather:")
    assert '<tool_call>{"name": "weather", "arguments": {"city": "Oslo"}}</tool_call>' in text
    assert "<|tool|>call_1=sunny" in text and text.endswith("<|assistant|>")


# --- the route -----------------------------------------------------------------------------------------


@dataclass
class CallingBackend(FakeBackend):
    """A fake model that answers with ``answer`` (a tool call, JSON...) for every choice."""

    answer: str = ""
    finish_reason: str = "stop"

    def _texts(self, request: GenerationRequest) -> list[str]:
        return [self.answer] * request.rows


@pytest.fixture
def backend(tiny_causal: Path) -> CallingBackend:
    return CallingBackend(build_settings({"MODEL_ID": str(tiny_causal), "SERVED_MODEL_NAME": MODEL}))


@pytest.fixture
def client(backend) -> TestClient:
    return TestClient(create_app(backend, backend.settings), raise_server_exceptions=False)


def chat(**extra) -> dict:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Weather in Oslo?"}],
        "tools": [WEATHER, TIME],
        **extra,
    }


def stream_of(client: TestClient, body: dict) -> list[dict]:
    text = client.post("/v1/chat/completions", json={**body, "stream": True}).text
    data = [b.removeprefix("data: ") for b in text.split("\n\n") if b.startswith("data: ")]
    assert data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]]


def test_tool_choice_becomes_a_constraint_and_tools_reach_the_engine(client, backend) -> None:
    backend.answer = '{"city": "Oslo"}'
    client.post("/v1/chat/completions", json=chat(tool_choice={"type": "function", "function": {"name": "weather"}}))
    named = backend.calls[-1]
    assert json.loads(named.params.constraint.spec) == WEATHER["function"]["parameters"]
    assert [t["function"]["name"] for t in json.loads(named.tools)] == ["weather", "time"]
    client.post("/v1/chat/completions", json=chat(tool_choice="required", parallel_tool_calls=False))
    required = json.loads(backend.calls[-1].params.constraint.spec)
    assert required["maxItems"] == 1 and [a["properties"]["name"]["enum"] for a in required["items"]["anyOf"]] == [
        ["weather"], ["time"]]  # fmt: skip
    client.post("/v1/chat/completions", json=chat())  # auto: the model writes freely
    assert backend.calls[-1].params.constraint is None


def test_a_named_call_is_answered_as_tool_calls_whole_and_streamed(client, backend) -> None:
    backend.answer = '{"city": "Oslo"}'
    body = chat(tool_choice={"type": "function", "function": {"name": "weather"}})
    out = client.post("/v1/chat/completions", json=body).json()["choices"][0]
    [call] = out["message"]["tool_calls"]
    assert call["function"] == {"name": "weather", "arguments": '{"city": "Oslo"}'} and call["id"].startswith("call_")
    # OpenAI ends a named choice's call with "stop" (auto and required calls with "tool_calls"); so does vLLM.
    assert out["finish_reason"] == "stop" and out["message"]["content"] is None
    parts = [p["choices"][0] for p in stream_of(client, body)]
    deltas = [p["delta"]["tool_calls"][0] for p in parts if "tool_calls" in p["delta"]]
    assert deltas[0]["id"].startswith("call_") and deltas[0]["function"]["name"] == "weather"
    assert "".join(d["function"]["arguments"] for d in deltas) == '{"city": "Oslo"}'
    assert parts[-1]["finish_reason"] == "stop"
    backend.answer = '[{"name": "weather", "parameters": {"city": "Oslo"}}]'
    required = client.post("/v1/chat/completions", json=chat(tool_choice="required")).json()["choices"][0]
    assert required["message"]["tool_calls"][0]["function"]["name"] == "weather"
    assert required["finish_reason"] == "tool_calls"
    assert stream_of(client, chat(tool_choice="required"))[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_auto_reads_hermes_calls_and_keeps_one_without_parallel_calls(client, backend) -> None:
    backend.answer = (
        'Sure.<tool_call>{"name": "time", "arguments": {}}</tool_call>'
        '<tool_call>{"name": "weather", "arguments": {"city": "Rome"}}</tool_call>'
    )
    out = client.post("/v1/chat/completions", json=chat()).json()["choices"][0]
    assert out["message"]["content"] == "Sure." and [c["function"]["name"] for c in out["message"]["tool_calls"]] == [
        "time", "weather"]  # fmt: skip
    one = client.post("/v1/chat/completions", json=chat(parallel_tool_calls=False)).json()["choices"][0]
    assert [c["function"]["name"] for c in one["message"]["tool_calls"]] == ["time"]
    parts = [p["choices"][0] for p in stream_of(client, chat())]
    assert "".join(p["delta"].get("content") or "" for p in parts) == "Sure."
    calls = [c for p in parts for c in p["delta"].get("tool_calls", [])]
    assert [c["index"] for c in calls] == [0, 1] and parts[-1]["finish_reason"] == "tool_calls"
    none = client.post("/v1/chat/completions", json=chat(tool_choice="none")).json()["choices"][0]
    assert none["message"]["tool_calls"] is None and none["message"]["content"] == backend.answer


BAD = [
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice.function.name", "not among"),
    ({"tools": None, "tool_choice": "required"}, "tool_choice", "needs tools"),
    ({"tools": [WEATHER, WEATHER]}, "tools", "same function name"),
    ({"functions": [{"name": "f"}]}, "functions", "send tools"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages.0.tool_call_id", "required on tool messages"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": [{"id": "1", "type": "function",
      "function": {"name": "f", "arguments": "{}"}}]}]}, "messages.0.tool_calls", "only assistant"),
]  # fmt: skip


@pytest.mark.parametrize(("extra", "param", "fragment"), BAD)
def test_wrong_tool_requests_are_400_naming_the_field(client, backend, extra, param, fragment) -> None:
    response = client.post("/v1/chat/completions", json=chat(**extra))
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and fragment in error["message"], error
    assert backend.calls == []
