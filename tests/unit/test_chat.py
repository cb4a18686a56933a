"""Chat rendering: the tokenizer's template, an override, none at all, a template that refuses, BOS once."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.chat import NO_TEMPLATE, check_template, encode_chat, render_chat
from engine.errors import ChatTemplateError, PromptTooLongError
from engine.model import EngineConfig, TextGenerator
from engine.types import ChatMessage, SamplingParams
from testing.checkpoints import CHAT_TEMPLATE, build_tiny_causal, build_tokenizer

CHAT = (ChatMessage("system", "Be brief."), ChatMessage("user", "Return the number"))
OVERRIDE = (
    "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}[assistant]{% endif %}"
)


@pytest.fixture(scope="module")
def templated(tmp_path_factory: pytest.TempPathFactory):
    """A tokenizer that ships CHAT_TEMPLATE and, like Llama's, adds BOS when it encodes."""
    return build_tokenizer(tmp_path_factory.mktemp("tok-chat"), chat_template=CHAT_TEMPLATE, add_bos=True)


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory):
    return build_tokenizer(tmp_path_factory.mktemp("tok-plain"))


def test_the_tokenizers_template_renders_with_the_generation_prompt(templated) -> None:
    text = render_chat(templated, CHAT)
    assert text == "<s><|system|>Be brief.\n<|user|>Return the number\n<|assistant|>"


def test_an_override_replaces_the_tokenizers_template(templated, plain) -> None:
    expected = "[system] Be brief. [user] Return the number [assistant]"
    assert render_chat(templated, CHAT, OVERRIDE) == expected
    assert render_chat(plain, CHAT, OVERRIDE) == expected


def test_a_model_without_a_template_asks_for_chat_template(plain) -> None:
    with pytest.raises(ChatTemplateError, match="Set CHAT_TEMPLATE to a Jinja chat template") as caught:
        render_chat(plain, CHAT)
    assert str(caught.value) == NO_TEMPLATE and "path of a file" in NO_TEMPLATE
    assert isinstance(caught.value, ValueError)  # a RequestError: the caller's to fix


def test_a_template_that_raises_becomes_a_chat_template_error_with_its_message(templated) -> None:
    two_users = (ChatMessage("user", "a"), ChatMessage("user", "b"))
    with pytest.raises(ChatTemplateError, match="roles must alternate user/assistant"):
        render_chat(templated, two_users)
    assert render_chat(templated, (*two_users[:1], ChatMessage("assistant", "x"), two_users[1])).endswith(
        "<|assistant|>"
    )


def test_bos_is_not_doubled_when_the_template_writes_it(templated) -> None:
    bos = templated.bos_token_id
    text = render_chat(templated, CHAT)
    ids = encode_chat(templated, text)
    assert ids[0] == bos and ids[1] != bos
    assert templated(text)["input_ids"][:2] == [bos, bos]  # what a plain encode would have done
    # a template that writes no BOS gets the tokenizer's own
    assert encode_chat(templated, render_chat(templated, CHAT, OVERRIDE))[0] == bos


def test_an_invalid_override_is_refused_at_start() -> None:
    check_template(OVERRIDE)
    with pytest.raises(ValueError, match="CHAT_TEMPLATE is not a valid Jinja template"):
        check_template("{% for m in messages %}unclosed")


def test_the_engine_encodes_chats_and_checks_they_fit(tmp_path: Path) -> None:
    engine = TextGenerator.load(EngineConfig(model_id=str(build_tiny_causal(tmp_path, chat_template=CHAT_TEMPLATE))))
    params = SamplingParams(max_new_tokens=4)
    ids = engine.encode_chat(CHAT, params)
    assert ids == encode_chat(engine.tokenizer, render_chat(engine.tokenizer, CHAT))
    assert (
        engine.encode_chat(CHAT, params, OVERRIDE)
        == engine.tokenizer(render_chat(engine.tokenizer, CHAT, OVERRIDE))["input_ids"]
    )
    with pytest.raises(PromptTooLongError, match="exceed the model's context of 128 tokens"):
        engine.encode_chat((ChatMessage("user", "word " * 60),), SamplingParams(max_new_tokens=100))
    [completion] = engine.generate([ids], params)
    assert completion.completion_tokens >= 1
