"""Structured output, tool calls, sampling extras and prompt scoring on real Ray Serve, through the
official `openai` SDK and `langchain-openai`, against a tiny random checkpoint: a random model never
writes valid JSON by chance, so every answer that parses here was made so by constrained decoding."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import openai
import pytest
import torch
from pydantic import BaseModel, Field

from testing.checkpoints import TOOLS_TEMPLATE
from tests.integration.conftest import Service, deploy

MODEL = "tiny-structured"
KEY = "sk-structured-0123"


class City(BaseModel):
    name: str = Field(pattern=r"^[A-Z][a-z]{2,7}$")
    rank: int = Field(ge=0, le=99)
    capital: bool
    region: Literal["north", "south"]


class Weather(BaseModel):
    """The weather forecast for a city."""

    city: str = Field(pattern=r"^[A-Z][a-z]{2,7}$")
    days: int = Field(ge=1, le=7)


WEATHER_TOOL = {"type": "function", "function": {"name": "Weather", "parameters": Weather.model_json_schema()}}


@pytest.fixture(scope="module")
def service(serve_port: int, tiny_chat: Path) -> Service:
    env = {"MODEL_ID": str(tiny_chat), "SERVED_MODEL_NAME": MODEL, "API_KEY": KEY, "MIN_REPLICAS": "1",
           "MAX_NEW_TOKENS": "64", "MAX_NEW_TOKENS_LIMIT": "128", "TEMPERATURE": "0",
           "CHAT_TEMPLATE": TOOLS_TEMPLATE, "DTYPE": "float32"}  # fmt: skip  # float32: compared with `local`
    return deploy(serve_port, env)


@pytest.fixture(scope="module")
def sdk(service: Service) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{service.url}/v1", api_key=KEY, max_retries=0, timeout=180)


@pytest.fixture(scope="module")
def local(tiny_chat: Path):
    """The same checkpoint in this process, to compare the service's numbers with the model's own."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_chat), AutoModelForCausalLM.from_pretrained(tiny_chat).eval()


def ask(question: str = "Name a city") -> list[dict]:
    return [{"role": "user", "content": question}]


def test_free_text_from_this_model_is_not_json(sdk: openai.OpenAI) -> None:
    out = sdk.chat.completions.create(model=MODEL, messages=ask(), max_tokens=40)
    with pytest.raises(ValueError):
        City.model_validate_json(out.choices[0].message.content or "")


def test_sdk_parse_with_a_pydantic_model(sdk: openai.OpenAI) -> None:
    out = sdk.chat.completions.parse(model=MODEL, messages=ask(), response_format=City, max_tokens=100)
    choice = out.choices[0]
    assert isinstance(choice.message.parsed, City) and choice.finish_reason == "stop"
    sampled = sdk.chat.completions.parse(
        model=MODEL, messages=ask(), response_format=City, max_tokens=100, temperature=1.0, seed=3, n=2
    )
    assert all(isinstance(c.message.parsed, City) for c in sampled.choices)


def test_json_object_and_a_streamed_json_schema_answer(sdk: openai.OpenAI, local) -> None:
    # Greedy, this random model writes digits forever inside an object; a bias on "}" (allowed only
    # where the object may close) lets it end. Unconstrained, the same bias never makes JSON.
    close = {str(local[0].convert_tokens_to_ids("}")): 3}
    out = sdk.chat.completions.create(
        model=MODEL, messages=ask(), max_tokens=60, response_format={"type": "json_object"}, logit_bias=close
    )
    assert isinstance(json.loads(out.choices[0].message.content), dict) and out.choices[0].finish_reason == "stop"
    free = sdk.chat.completions.create(model=MODEL, messages=ask(), max_tokens=60, logit_bias=close)
    assert not (free.choices[0].message.content or "").startswith("{")
    schema = {
        "type": "json_schema",
        "json_schema": {"name": "City", "schema": City.model_json_schema(), "strict": True},
    }
    stream = sdk.chat.completions.create(
        model=MODEL, messages=ask(), max_tokens=100, response_format=schema, stream=True, temperature=0.8, seed=11
    )
    chunks = [c for c in stream if c.choices]
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert len(chunks) > 3 and chunks[-1].choices[0].finish_reason == "stop"
    City.model_validate_json(text)


def test_a_schema_the_grammar_library_refuses_is_a_400_naming_it(sdk: openai.OpenAI) -> None:
    schema = {"type": "object", "properties": {"a": {"type": "string", "pattern": "(?<=x)a"}}}
    with pytest.raises(openai.BadRequestError) as caught:
        sdk.chat.completions.create(
            model=MODEL,
            messages=ask(),
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
        )
    error = caught.value.body
    assert error["param"] == "response_format.json_schema.schema" and "Lookbehind" in error["message"], error


def test_langchain_with_structured_output(service: Service) -> None:
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model=MODEL, base_url=f"{service.url}/v1", api_key=KEY, max_tokens=100, temperature=0)
    city = llm.with_structured_output(City).invoke("Name a city")
    assert isinstance(city, City)
    strict = llm.with_structured_output(City, method="json_schema", strict=True).invoke("Name a city")
    assert isinstance(strict, City)


def test_guided_choice_and_regex_through_extra_body(sdk: openai.OpenAI) -> None:
    out = sdk.completions.create(
        model=MODEL, prompt="Yes or no?", max_tokens=10, extra_body={"guided_choice": ["yes", "no"]}
    )
    assert out.choices[0].text in ("yes", "no")
    out = sdk.completions.create(
        model=MODEL, prompt="A code:", max_tokens=10, extra_body={"guided_regex": r"[A-Z]{2}-\d{3}"}
    )
    text = out.choices[0].text
    assert len(text) == 6 and text[:2].isupper() and text[2] == "-" and text[3:].isdigit()


def test_logit_bias_min_tokens_and_stop_token_ids_show_in_the_tokens(sdk: openai.OpenAI, local) -> None:
    tokenizer, _ = local
    the = tokenizer.convert_tokens_to_ids("Ġthe")
    forced = sdk.completions.create(model=MODEL, prompt="Return", max_tokens=5, logit_bias={str(the): 100}, logprobs=0)
    assert forced.choices[0].logprobs.tokens == [" the"] * 5
    # min_tokens holds back stop strings too: "the" within the first 3 tokens does not end the answer.
    bias = {str(the): 100}
    stops = sdk.completions.create(model=MODEL, prompt="Return", max_tokens=8, logit_bias=bias, stop=["the"])
    assert (stops.choices[0].text, stops.usage.completion_tokens) == (" ", 1)
    held = sdk.completions.create(
        model=MODEL, prompt="Return", max_tokens=8, logit_bias=bias, stop=["the"], extra_body={"min_tokens": 3}
    )
    choice = held.choices[0]
    assert (choice.text, held.usage.completion_tokens, choice.finish_reason) == (" the the the ", 4, "stop")
    eos = tokenizer.eos_token_id
    early = {"logit_bias": {str(eos): 100}}
    ended = sdk.completions.create(model=MODEL, prompt="Return", max_tokens=8, extra_body=early)
    assert ended.usage.completion_tokens == 1 and ended.choices[0].finish_reason == "stop"
    held = sdk.completions.create(model=MODEL, prompt="Return", max_tokens=8, extra_body={**early, "min_tokens": 4})
    assert held.usage.completion_tokens == 5 and held.choices[0].finish_reason == "stop"
    free = sdk.completions.create(model=MODEL, prompt="Return", max_tokens=8, logprobs=0)
    third = tokenizer.convert_tokens_to_ids(tokenizer.tokenize(free.choices[0].logprobs.tokens[2]))[0]
    cut = sdk.completions.create(model=MODEL, prompt="Return", max_tokens=8, extra_body={"stop_token_ids": [third]})
    assert cut.choices[0].finish_reason == "stop" and cut.usage.completion_tokens <= 3
    assert free.choices[0].text.startswith(cut.choices[0].text)


def test_prompt_logprobs_equal_the_models_own_log_softmax(sdk: openai.OpenAI, local) -> None:
    tokenizer, model = local
    prompt = "The socket module provides access to the BSD socket interface."
    out = sdk.completions.create(model=MODEL, prompt=prompt, echo=True, logprobs=1, max_tokens=0)
    choice = out.choices[0]
    ids = tokenizer(prompt)["input_ids"]
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0].log_softmax(-1)
    lp = choice.logprobs
    assert choice.text == prompt and out.usage.completion_tokens == 0 and len(lp.tokens) == len(ids)
    assert "".join(lp.tokens) == prompt and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    for j in range(1, len(ids)):
        assert lp.token_logprobs[j] == pytest.approx(float(expected[j - 1, ids[j]]), abs=1e-4)
    # With generation after it, the prompt's entries come first, then the generated tokens'.
    more = sdk.completions.create(model=MODEL, prompt=prompt, echo=True, logprobs=1, max_tokens=3)
    assert more.choices[0].logprobs.token_logprobs[: len(ids)] == lp.token_logprobs
    assert len(more.choices[0].logprobs.tokens) == len(ids) + more.usage.completion_tokens


def test_token_id_prompts_answer_as_their_text(sdk: openai.OpenAI, local) -> None:
    tokenizer, _ = local
    texts = ["Return the number", "Write a haiku"]
    by_text = sdk.completions.create(model=MODEL, prompt=texts, max_tokens=8)
    ids = [tokenizer(t)["input_ids"] for t in texts]
    by_ids = sdk.completions.create(model=MODEL, prompt=ids, max_tokens=8, echo=True)
    assert [c.text for c in by_ids.choices] == [t + c.text for t, c in zip(texts, by_text.choices, strict=True)]
    one = sdk.completions.create(model=MODEL, prompt=ids[0], max_tokens=8)
    assert one.choices[0].text == by_text.choices[0].text
    with pytest.raises(openai.BadRequestError, match="outside this model's vocabulary"):
        sdk.completions.create(model=MODEL, prompt=[1, 10**7], max_tokens=2)


def test_langchain_bind_tools_with_a_named_choice(service: Service) -> None:
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model=MODEL, base_url=f"{service.url}/v1", api_key=KEY, max_tokens=100, temperature=0)
    message = llm.bind_tools([Weather], tool_choice="Weather").invoke("Weather in Oslo?")
    [call] = message.tool_calls
    assert call["name"] == "Weather" and call["id"].startswith("call_")
    Weather(**call["args"])


def test_a_named_tool_choice_ends_with_stop_streamed_and_not(sdk: openai.OpenAI) -> None:
    """OpenAI answers a named tool_choice with finish_reason "stop" (auto and required: "tool_calls"); vLLM too."""
    named = {"type": "function", "function": {"name": "Weather"}}
    kwargs = dict(
        model=MODEL, messages=ask("Weather in Oslo?"), tools=[WEATHER_TOOL], tool_choice=named, max_tokens=100
    )
    choice = sdk.chat.completions.create(**kwargs).choices[0]
    [call] = choice.message.tool_calls
    assert call.function.name == "Weather" and choice.finish_reason == "stop"
    Weather.model_validate_json(call.function.arguments)
    chunks = [c.choices[0] for c in sdk.chat.completions.create(**kwargs, stream=True) if c.choices]
    deltas = [d for c in chunks for d in c.delta.tool_calls or ()]
    assert deltas[0].function.name == "Weather" and chunks[-1].finish_reason == "stop"
    assert "".join(d.function.arguments or "" for d in deltas) == call.function.arguments


def test_a_streamed_required_tool_call(sdk: openai.OpenAI) -> None:
    stream = sdk.chat.completions.create(
        model=MODEL, messages=ask("Weather in Oslo?"), tools=[WEATHER_TOOL], tool_choice="required",
        parallel_tool_calls=False, max_tokens=100, stream=True,
    )  # fmt: skip
    chunks = [c.choices[0] for c in stream if c.choices]
    deltas = [d for c in chunks for d in c.delta.tool_calls or ()]
    assert deltas and {d.index for d in deltas} == {0} and deltas[0].id.startswith("call_")
    assert deltas[0].function.name == "Weather" and chunks[-1].finish_reason == "tool_calls"
    Weather.model_validate_json("".join(d.function.arguments or "" for d in deltas))


def test_a_conversation_with_tool_calls_and_tool_answers_renders(sdk: openai.OpenAI) -> None:
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "Weather", "arguments": '{"city": "Oslo", "days": 2}'},
    }
    messages = [*ask("Weather in Oslo?"), {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"}]  # fmt: skip
    plain = sdk.chat.completions.create(model=MODEL, messages=ask("Weather in Oslo?"), max_tokens=4)
    out = sdk.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER_TOOL], max_tokens=4)
    # The tools, the call and its answer are all in the prompt the template rendered.
    template_text = len(str(Weather.model_json_schema())) + len("sunny, 21 C") + len(call["function"]["arguments"])
    assert out.usage.prompt_tokens > plain.usage.prompt_tokens + template_text // 8
    assert out.choices[0].message.content is not None
