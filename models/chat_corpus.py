"""The chat format of the embedded default model, and chat-shaped training text made from docstrings.

The format is ChatML-like with one special token per role and one that ends a turn::

    <|system|>You answer questions about the Python standard library.<|end|>
    <|user|>What does `json.dumps` do?<|end|>
    <|assistant|>Serialize ``obj`` to a JSON formatted ``str``.<|end|>

A turn's text follows its role token directly, as a docstring follows ``<|endoftext|>`` in the
plain corpus, so answers start the way documents do. Generation stops at ``<|end|>``.

Conversations are generated from the same docstrings as the plain corpus: a question about a
module, class or function, answered with the docstring's summary (sometimes more of it), with or
without a system message, some with a second turn. Everything is deterministic given the seed.

>>> doc = Docstring("json.dumps", "function", "Serialize obj to a JSON str. More detail here.")
>>> summary(doc.text)
'Serialize obj to a JSON str.'
>>> [m["role"] for m in make_conversation(doc, [doc], random.Random(0))][-2:]
['user', 'assistant']
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from itertools import takewhile
from typing import Literal, NamedTuple

SYSTEM_TOKEN = "<|system|>"
USER_TOKEN = "<|user|>"
ASSISTANT_TOKEN = "<|assistant|>"
END_TOKEN = "<|end|>"
CHAT_TOKENS = (SYSTEM_TOKEN, USER_TOKEN, ASSISTANT_TOKEN, END_TOKEN)

# Content may be a string or a list of OpenAI-style text parts; anything else is an error the
# caller can act on, never silently dropped.
CHAT_TEMPLATE = """\
{%- for message in messages -%}
    {%- set role = message['role'] -%}
    {%- if role not in ['system', 'user', 'assistant'] -%}
        {{- raise_exception("Unknown role '" ~ role ~ "': this chat template knows system, user and assistant.") -}}
    {%- endif -%}
    {%- if message['content'] is string -%}
        {%- set content = message['content'] -%}
    {%- elif message['content'] is defined and message['content'] is sequence and message['content'] is not mapping -%}
        {%- set text = namespace(value='') -%}
        {%- for part in message['content'] -%}
            {%- if part is not mapping or part['type'] != 'text' or part['text'] is not string -%}
                {{- raise_exception("A " ~ role ~ " message's content parts must be text parts.") -}}
            {%- endif -%}
            {%- set text.value = text.value ~ part['text'] -%}
        {%- endfor -%}
        {%- set content = text.value -%}
    {%- else -%}
        {{- raise_exception("A " ~ role ~ " message needs its content as a string.") -}}
    {%- endif -%}
    {{- '<|' ~ role ~ '|>' ~ content ~ '<|end|>\\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|assistant|>' -}}
{%- endif -%}
"""

SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "You are a helpful assistant that answers questions about Python.",
    "You answer questions about the Python standard library.",
    "You are pydoc-gpt-mini, a small model trained on Python docstrings.",
    "Answer briefly.",
    "Be concise.",
    "You are an expert Python programmer.",
    "Explain Python APIs in plain English.",
)
QUESTIONS = {
    "module": (
        "What is the {name} module?",
        "What does the {name} module do?",
        "What is the `{name}` module for?",
        "Tell me about the {name} module.",
        "Explain the {name} module.",
        "Describe {name}.",
        "What is {name} used for?",
    ),
    "class": (
        "What is {name}?",
        "What is `{name}`?",
        "What does the {name} class do?",
        "Explain {name}.",
        "How do I use {name}?",
        "Describe the `{name}` class.",
        "What is {name} for?",
    ),
    "function": (
        "What does {name} do?",
        "What does `{name}` do?",
        "What does {name}() do?",
        "Explain {name}.",
        "How do I use {name}?",
        "How do I use `{name}()`?",
        "What is {name} for?",
        "Describe `{name}`.",
    ),
}
FOLLOW_UPS = ("Tell me more.", "Go on.", "Can you explain more?", "What else should I know?", "More details, please.")

SYSTEM_SHARE = 0.4  # conversations that open with a system message
TWO_TURN_SHARE = 0.25  # conversations with a second question
MAX_ANSWER_CHARS = 700
# A full stop ends a sentence unless it ends one of these abbreviations.
_ABBREVIATIONS = ("e.g.", "i.e.", "etc.", "vs.", "cf.", "Ex.", "No.")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z`'\"(\[])")


DocKind = Literal["module", "class", "function"]


class Docstring(NamedTuple):
    """A normalised docstring and the dotted name of what it documents."""

    name: str
    kind: DocKind
    text: str


Message = dict[str, str]


def sentences(paragraph: str) -> list[str]:
    """Split a prose paragraph into sentences, keeping abbreviations such as ``e.g.`` inside."""
    parts: list[str] = []
    for piece in _SENTENCE_END.split(paragraph):
        if parts and parts[-1].endswith(_ABBREVIATIONS):
            parts[-1] += " " + piece
        else:
            parts.append(piece)
    return parts


def summary(text: str) -> str:
    """The first sentence of a docstring's first paragraph."""
    return sentences(text.split("\n\n", 1)[0])[0]


def is_askable(doc: Docstring) -> bool:
    """Whether a docstring makes a good answer: a public name, a prose first paragraph, a capitalised summary."""
    if any(part.startswith("_") for part in doc.name.split(".")):
        return False
    head = summary(doc.text)
    return bool(prose(doc.text)) and 12 <= len(head) <= 300 and head[0].isupper()


def prose(text: str) -> list[str]:
    """The paragraphs of a docstring before its first code block or list (and the line that introduces it)."""
    return list(takewhile(lambda p: "\n" not in p and not p.endswith(":"), text.split("\n\n")))


def _finish(text: str) -> str:
    """End an answer with a full stop when its docstring left it out, so every answer ends alike."""
    return text if text.endswith((".", "!", "?")) else text + "."


def _clip(paragraphs: Sequence[str]) -> str:
    """Join whole sentences of ``paragraphs`` up to about MAX_ANSWER_CHARS (at least one sentence)."""
    kept: list[list[str]] = []
    size = 0
    for paragraph in paragraphs:
        kept.append([])
        for sentence in sentences(paragraph):
            if size and size + len(sentence) > MAX_ANSWER_CHARS:
                return "\n\n".join(" ".join(p) for p in kept if p)
            kept[-1].append(sentence)
            size += len(sentence) + 1
    return "\n\n".join(" ".join(p) for p in kept if p)


def answer_and_rest(doc: Docstring, rng: random.Random) -> tuple[str, str]:
    """An answer from the docstring and the prose that follows it (empty when none), for a follow-up.

    The answer is the summary sentence (60%), the first paragraph (30%) or the first two paragraphs
    (10%), as far as the docstring's prose goes.
    """
    paragraphs = prose(doc.text)
    first = sentences(paragraphs[0])
    roll = rng.random()
    if roll < 0.6:
        answer, rest = [first[0]], [" ".join(first[1:])] if len(first) > 1 else paragraphs[1:2]
    else:
        n_paragraphs = 1 if roll < 0.9 else 2
        answer, rest = paragraphs[:n_paragraphs], paragraphs[n_paragraphs : n_paragraphs + 1]
    return _finish(_clip(answer)), _finish(_clip(rest)) if rest else ""


def question(doc: Docstring, rng: random.Random) -> str:
    """A question about the documented name, in one of several phrasings."""
    return rng.choice(QUESTIONS[doc.kind]).format(name=doc.name)


def make_conversation(doc: Docstring, pool: Sequence[Docstring], rng: random.Random) -> list[Message]:
    """One conversation about ``doc``: optional system message, a question, an answer, maybe a second turn."""
    messages: list[Message] = []
    if rng.random() < SYSTEM_SHARE:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    answer, rest = answer_and_rest(doc, rng)
    messages += [{"role": "user", "content": question(doc, rng)}, {"role": "assistant", "content": answer}]
    if rng.random() < TWO_TURN_SHARE:
        if rest and rng.random() < 0.5:
            messages += [{"role": "user", "content": rng.choice(FOLLOW_UPS)}, {"role": "assistant", "content": rest}]
        else:
            other = rng.choice(pool)
            messages += [
                {"role": "user", "content": question(other, rng)},
                {"role": "assistant", "content": answer_and_rest(other, rng)[0]},
            ]
    return messages


def make_conversations(docs: Sequence[Docstring], per_doc: int, seed: int) -> list[list[Message]]:
    """``per_doc`` conversations about each askable docstring, in a seeded shuffled order."""
    rng = random.Random(seed)
    pool = [doc for doc in docs if is_askable(doc)]
    conversations = [make_conversation(doc, pool, rng) for _ in range(per_doc) for doc in pool]
    rng.shuffle(conversations)
    return conversations
