"""An answer's JSON written in pieces is byte for byte what JSONResponse writes of its model_dump."""

from __future__ import annotations

import json
import math

import pytest
from starlette.responses import JSONResponse

from engine.types import TokenLogprob, TopLogprob
from serving.api import json_body as json_body_module
from serving.api.json_body import Records, json_body
from serving.api.openai_responses import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatMessageOut,
    CompletionChoice,
    CompletionLogprobs,
    CompletionResponse,
    DeltaMessage,
    TokenLogprobOut,
    TopLogprobOut,
    Usage,
    chat_logprobs,
    completion_logprobs,
)

ENVELOPE = {
    "id": "x-1",
    "created": 1,
    "model": "m",
    "usage": Usage(prompt_tokens=3, completion_tokens=9, total_tokens=12),
}


def chat(tokens: int, alternatives: int, n: int = 2) -> ChatCompletionResponse:
    def entry(i: int) -> TokenLogprobOut:
        top = [TopLogprobOut(token=f't{i}.{j} ✓"', logprob=-j / 7, bytes=[116, j]) for j in range(alternatives)]
        return TokenLogprobOut(token=f"t{i}", logprob=-i / 3, bytes=[116], top_logprobs=top)

    choices = [
        ChatChoice(
            index=c,
            message=ChatMessageOut(content="héllo"),
            finish_reason="length",
            logprobs=ChatLogprobs(content=[entry(i) for i in range(tokens)]),
        )
        for c in range(n)
    ]
    return ChatCompletionResponse(choices=choices, **ENVELOPE)


def completion(tokens: int) -> CompletionResponse:
    logprobs = CompletionLogprobs(
        tokens=[f"w{i}" for i in range(tokens)],
        token_logprobs=[None] + [-i / 5 for i in range(1, tokens)],
        top_logprobs=[None] + [{f"w{i}": -0.5, f"v{i}": -1.25} for i in range(1, tokens)],
        text_offset=list(range(tokens)),
    )
    return CompletionResponse(choices=[CompletionChoice(index=0, text="ab", logprobs=logprobs, finish_reason="stop")],
                              **ENVELOPE)  # fmt: skip


def engine_entries(tokens: int, alternatives: int) -> tuple[TokenLogprob, ...]:
    def top(i: int) -> tuple[TopLogprob, ...]:
        return tuple(TopLogprob(f't{i}.{j} ✓"', (116, j), -j / 7) for j in range(alternatives))

    return tuple(TokenLogprob(f"t{i}", (116,), -i / 3, top(i)) for i in range(tokens))


def chat_from_engine(tokens: int, alternatives: int, n: int = 2) -> ChatCompletionResponse:
    """As the routes build it: entries as Records, unvalidated."""
    entries = engine_entries(tokens, alternatives)
    choices = [
        ChatChoice(index=c, message=ChatMessageOut(content="héllo"), finish_reason="length",
                   logprobs=chat_logprobs(entries))
        for c in range(n)
    ]  # fmt: skip
    return ChatCompletionResponse(choices=choices, **ENVELOPE)


def completion_from_engine(tokens: int) -> CompletionResponse:
    logprobs = completion_logprobs(engine_entries(tokens, 3), 0, unscored=1)
    return CompletionResponse(choices=[CompletionChoice(index=0, text="ab", logprobs=logprobs, finish_reason="stop")],
                              **ENVELOPE)  # fmt: skip


@pytest.mark.parametrize("piece", [1, 2, 3, 256])
@pytest.mark.parametrize(
    "answer",
    [chat(40, 5), chat(0, 0, n=1), completion(41), completion(1), chat_from_engine(40, 5), chat_from_engine(0, 0),
     chat_from_engine(1, 20, n=1), completion_from_engine(41), completion_from_engine(1)],
    ids=["chat", "chat-empty", "completion", "completion-one", "chat-records", "chat-records-empty",
         "chat-records-one", "completion-records", "completion-records-one"],
)  # fmt: skip
def test_same_bytes_as_json_response(answer, piece: int) -> None:
    assert json_body(answer, piece=piece) == JSONResponse(answer.model_dump(mode="json")).body


def test_large_answer_is_written_in_pieces_and_reads_back() -> None:
    answer = chat(600, 20, n=3)  # past PIECE: walked field by field
    body = json_body(answer)
    assert body == JSONResponse(answer.model_dump(mode="json")).body
    assert len(json.loads(body)["choices"][2]["logprobs"]["content"]) == 600


def test_records_are_written_a_few_per_call_and_read_back(monkeypatch) -> None:
    answer = chat_from_engine(600, 20, n=3)
    assert isinstance(answer.choices[0].logprobs.content, Records)
    lists: list[int] = []
    dumps = json_body_module._dumps

    def counting(value):
        if isinstance(value, list):
            lists.append(len(value))
        return dumps(value)

    monkeypatch.setattr(json_body_module, "_dumps", counting)
    body = json_body(answer)
    assert body == JSONResponse(answer.model_dump(mode="json")).body
    # 3 choices x 600 entries, 16 per call; nothing else written as a list of more than 256
    assert lists.count(16) == 3 * (600 // 16) and max(lists) <= 256
    entry = json.loads(body)["choices"][2]["logprobs"]["content"][599]
    assert (
        entry["token"] == "t599" and len(entry["top_logprobs"]) == 20 and entry["top_logprobs"][1]["bytes"] == [116, 1]
    )


def test_custom_field_serializer_keeps_pydantic_dump() -> None:
    chunk = ChatCompletionChunk(choices=[ChatChunkChoice(index=0, delta=DeltaMessage(content="a"), finish_reason=None)],
                                id="c", created=1, model="m")  # fmt: skip
    assert json_body(chunk, piece=1) == JSONResponse(chunk.model_dump(mode="json")).body


def test_not_finite_is_refused_as_json_response_refuses() -> None:
    answer = chat(3, 2)
    answer.choices[0].logprobs.content[1]["logprob"] = -math.inf
    with pytest.raises(ValueError):
        JSONResponse(answer.model_dump(mode="json"))
    with pytest.raises(ValueError):
        json_body(answer, piece=1)


def test_computed_fields_keep_pydantic_dump() -> None:
    from pydantic import BaseModel, computed_field

    class Counted(BaseModel):
        values: list[int]

        @computed_field
        @property
        def count(self) -> int:
            return len(self.values)

    answer = Counted(values=list(range(10)))
    assert (
        json_body(answer, piece=2)
        == JSONResponse(answer.model_dump(mode="json")).body
        == (b'{"values":[0,1,2,3,4,5,6,7,8,9],"count":10}')
    )
