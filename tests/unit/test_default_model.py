"""The embedded default model's chat format: template, role tokens and end of turn, as the service loads them."""

from __future__ import annotations

import pytest
from jinja2.exceptions import TemplateError

from settings import DEFAULT_MODEL_DIR

ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What does `json.dumps` do?"},
    {"role": "assistant", "content": "Serialize ``obj`` to a JSON formatted ``str``."},
    {"role": "user", "content": "Tell me more."},
]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(DEFAULT_MODEL_DIR)


def render(tokenizer, messages: list[dict], **options: object) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, **options)


def test_the_checkpoint_ships_its_chat_template() -> None:
    assert (DEFAULT_MODEL_DIR / "chat_template.jinja").is_file()


def test_the_template_renders_every_role_and_the_generation_prompt(tokenizer) -> None:
    assert render(tokenizer, CONVERSATION, add_generation_prompt=True) == (
        "<|system|>You are a helpful assistant.<|end|>\n"
        "<|user|>What does `json.dumps` do?<|end|>\n"
        "<|assistant|>Serialize ``obj`` to a JSON formatted ``str``.<|end|>\n"
        "<|user|>Tell me more.<|end|>\n"
        "<|assistant|>"
    )
    assert render(tokenizer, CONVERSATION[1:2]) == "<|user|>What does `json.dumps` do?<|end|>\n"


def test_text_parts_render_as_their_joined_text(tokenizer) -> None:
    parts = [{"type": "text", "text": "Explain "}, {"type": "text", "text": "socket.socket."}]
    assert render(tokenizer, [{"role": "user", "content": parts}]) == "<|user|>Explain socket.socket.<|end|>\n"


@pytest.mark.parametrize(
    ("message", "fragment"),
    [
        ({"role": "tool", "content": "42"}, "Unknown role 'tool'"),
        ({"role": "developer", "content": "Be brief."}, "Unknown role 'developer'"),
        ({"role": "user", "content": None}, "needs its content as a string"),
        ({"role": "user", "content": 42}, "needs its content as a string"),
        ({"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}, "must be text parts"),
    ],
)
def test_the_template_rejects_what_it_cannot_render(tokenizer, message: dict, fragment: str) -> None:
    with pytest.raises(TemplateError, match=fragment):
        render(tokenizer, [*CONVERSATION[:2], message], add_generation_prompt=True)


def test_role_tokens_are_single_special_tokens_that_decoding_can_skip(tokenizer) -> None:
    ids = tokenizer.convert_tokens_to_ids(list(ROLE_TOKENS))
    assert tokenizer.unk_token_id not in ids and set(ids) <= set(tokenizer.all_special_ids)
    encoded = tokenizer(render(tokenizer, CONVERSATION, add_generation_prompt=True), add_special_tokens=False)
    assert sum(token in ids for token in encoded["input_ids"]) == 2 * len(CONVERSATION) + 1
    decoded = tokenizer.decode(encoded["input_ids"], skip_special_tokens=True)
    assert decoded == "".join(m["content"] + "\n" for m in CONVERSATION)


def test_the_end_of_turn_token_ends_generation(tokenizer) -> None:
    """Both the end of a chat turn and the plain end of text stop generation; plain text still ends with eos."""
    from transformers import GenerationConfig

    config = GenerationConfig.from_pretrained(DEFAULT_MODEL_DIR)
    assert tokenizer.eos_token == "<|endoftext|>"
    assert set(config.eos_token_id) == {tokenizer.convert_tokens_to_ids("<|end|>"), tokenizer.eos_token_id}


def test_a_greedy_chat_answer_ends_its_turn_in_plain_text(tokenizer) -> None:
    """The committed weights answer a question with text that stops at <|end|>, not with run-on role tokens."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL_DIR).eval()
    prompt = render(tokenizer, [{"role": "user", "content": "What does `json.dumps` do?"}], add_generation_prompt=True)
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=80, do_sample=False)
    new = output[0, inputs["input_ids"].shape[1] :].tolist()
    assert new[-1] == tokenizer.convert_tokens_to_ids("<|end|>"), tokenizer.decode(new)
    answer = tokenizer.decode(new, skip_special_tokens=True)
    assert answer.strip() and "<|" not in answer and sum(c.isalpha() for c in answer) > len(answer) / 2, answer
