"""Sample answers and the model card (README.md) of the embedded default model, for build_default_model.py."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import torch
from transformers import GPT2LMHeadModel, PreTrainedTokenizerFast

from chat_corpus import (
    CHAT_TOKENS,
    END_TOKEN,
    FOLLOW_UPS,
    MAX_ANSWER_CHARS,
    QUESTIONS,
    SYSTEM_PROMPTS,
    SYSTEM_SHARE,
    TWO_TURN_SHARE,
    Message,
)

if TYPE_CHECKING:
    from build_default_model import ModelShape, TrainResult, TrainSettings

LOGGER = logging.getLogger("build_default_model")

SAMPLE_PROMPTS = ("Return the", "The socket module", "This function")
CHAT_SAMPLES: tuple[tuple[Message, ...], ...] = (
    ({"role": "user", "content": "What does `json.dumps` do?"},),
    ({"role": "user", "content": "Explain socket.socket."},),
    ({"role": "user", "content": "How do I use itertools.chain?"},),
    (
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is the os.path module for?"},
    ),
    (
        {"role": "user", "content": "What does shutil.copy do?"},
        {"role": "assistant", "content": 'Copy data and mode bits ("cp src dst").'},
        {"role": "user", "content": "Tell me more."},
    ),
)
CHAT_NEW_TOKENS = 80


class Sample(NamedTuple):
    """A prompt with its greedy and sampled completions."""

    prompt: str
    greedy: str
    sampled: str


class ChatSample(NamedTuple):
    """A conversation, the model's greedy answer, and whether the answer ended its turn."""

    messages: tuple[Message, ...]
    answer: str
    ended_turn: bool


@dataclass(frozen=True)
class CardFacts:
    """Facts about a finished build, for the model card."""

    command: str
    python_version: str
    n_docs: int
    n_chars: int
    n_heldout_docs: int
    min_docstring_chars: int
    heldout_every: int
    n_conversations: int
    doc_tokens: int
    chat_tokens: int
    vocab_size: int
    special_tokens: dict[str, int]
    example_prompt: str
    eos_token_ids: list[int]
    n_params: int
    size_mb: float
    seed: int
    result: TrainResult
    samples: Sequence[Sample]
    chat_samples: Sequence[ChatSample]


def complete(model: GPT2LMHeadModel, tokenizer: PreTrainedTokenizerFast, prompt: str, **options: object) -> str:
    """Generate 40 new tokens after ``prompt`` and decode prompt plus completion."""
    inputs = tokenizer(prompt, return_tensors="pt")
    output = model.generate(**inputs, max_new_tokens=40, **options)
    return tokenizer.decode(output[0], skip_special_tokens=True)


def sample_completions(model: GPT2LMHeadModel, tokenizer: PreTrainedTokenizerFast, seed: int) -> list[Sample]:
    """Produce a greedy and a sampled completion for each sample prompt."""
    model.eval()
    samples = []
    for prompt in SAMPLE_PROMPTS:
        greedy = complete(model, tokenizer, prompt, do_sample=False, repetition_penalty=1.2)
        torch.manual_seed(seed)
        sampled = complete(model, tokenizer, prompt, do_sample=True, temperature=0.8, top_k=40)
        LOGGER.info("sample %r\n  greedy : %r\n  sampled: %r", prompt, greedy, sampled)
        samples.append(Sample(prompt, greedy, sampled))
    return samples


def chat_answer(
    model: GPT2LMHeadModel, tokenizer: PreTrainedTokenizerFast, messages: Sequence[Message]
) -> tuple[str, bool]:
    """The greedy answer to a conversation, rendered by the chat template, and whether it ended its turn."""
    prompt = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    output = model.generate(**inputs, max_new_tokens=CHAT_NEW_TOKENS, do_sample=False)
    new = output[0, inputs["input_ids"].shape[1] :].tolist()
    return tokenizer.decode(new, skip_special_tokens=True), tokenizer.convert_tokens_to_ids(END_TOKEN) in new


def sample_chats(model: GPT2LMHeadModel, tokenizer: PreTrainedTokenizerFast) -> list[ChatSample]:
    """Greedy answers to the sample conversations."""
    model.eval()
    samples = []
    for messages in CHAT_SAMPLES:
        answer, ended = chat_answer(model, tokenizer, messages)
        LOGGER.info("chat %r\n  answer: %r (ended its turn: %s)", messages[-1]["content"], answer, ended)
        samples.append(ChatSample(messages, answer, ended))
    return samples


def _code(text: str) -> str:
    """Markdown inline code of ``repr(text)``, fenced so that backticks inside stay literal."""
    return f"`` {text!r} ``" if "`" in text else f"`{text!r}`"


def _chat_lines(samples: Sequence[ChatSample]) -> list[str]:
    lines = []
    for sample in samples:
        turns = " / ".join(f"{m['role']}: {_code(m['content'])}" for m in sample.messages)
        ending = "" if sample.ended_turn else f" (no `{END_TOKEN}` within {CHAT_NEW_TOKENS} tokens)"
        lines += [f"- {turns}", f"  - answer: {_code(sample.answer)}{ending}"]
    return lines


def _chat_corpus_lines(facts: CardFacts) -> list[str]:
    total = facts.doc_tokens + facts.chat_tokens
    return [
        "Chat-shaped text is made from the same training docstrings (`models/chat_corpus.py`):",
        f"{facts.n_conversations:,} conversations, {facts.chat_tokens / total:.0%} of the {total:,} training tokens.",
        "Each asks about a documented public name, phrased in one of "
        f"{sum(map(len, QUESTIONS.values()))} ways (for example",
        '"What does `json.dumps` do?", "Explain socket.socket.", "How do I use itertools.chain?"),',
        "and answers with the docstring's summary sentence (60%), its first paragraph (30%) or its",
        f"first two (10%), in whole sentences up to about {MAX_ANSWER_CHARS} characters. {SYSTEM_SHARE:.0%} open with "
        f"one of {len(SYSTEM_PROMPTS)}",
        f"system messages; {TWO_TURN_SHARE:.0%} have a second turn: a follow-up ({len(FOLLOW_UPS)} phrasings such as",
        '"Tell me more.") answered with the sentences that follow, or a question about another name.',
    ]


def render_model_card(facts: CardFacts, shape: ModelShape, settings: TrainSettings) -> str:
    """Render the README.md model card."""
    result = facts.result
    sample_lines = []
    for sample in facts.samples:
        sample_lines += [
            f"- prompt {_code(sample.prompt)}",
            f"  - greedy: {_code(sample.greedy)}",
            f"  - sampled: {_code(sample.sampled)}",
        ]
    tokens = ", ".join(f"`{token}` ({facts.special_tokens[token]})" for token in CHAT_TOKENS)
    eos = facts.eos_token_ids
    return "\n".join(
        [
            "# pydoc-gpt-mini",
            "",
            "A tiny GPT-2-style causal language model: the service's embedded default model, so",
            "that it runs out of the box without network access. It is a toy: it writes text",
            "that reads like Python documentation, with no factual reliability. It completes",
            "text, and it answers chat messages (rendered with its chat template) in the same voice.",
            "",
            "## Corpus and licence",
            "",
            f"Docstrings of the Python {facts.python_version} standard library: module, class and",
            "function docstrings, parsed with `ast` (never imported), test, idlelib, lib2to3 and",
            f"site-packages skipped, duplicates and docstrings under {facts.min_docstring_chars} characters",
            f"dropped; {facts.n_docs} docstrings, {facts.n_chars:,} characters, of which every",
            f"{facts.heldout_every}th docstring ({facts.n_heldout_docs}) is held out for evaluation.",
            "The docstrings are distributed under the Python Software Foundation License",
            "(PSF-2.0). The corpus is not stored; the build script rebuilds it.",
            "",
            *_chat_corpus_lines(facts),
            "",
            "## Chat format",
            "",
            "The template is saved as `chat_template.jinja` (transformers reads it back as",
            "`tokenizer.chat_template`). Each turn is its role token, the content and `<|end|>`, then a",
            "newline; `add_generation_prompt=True` appends `<|assistant|>`:",
            "",
            "```",
            facts.example_prompt,
            "```",
            "",
            f"- special tokens (ids): {tokens}; all special, so decoding with `skip_special_tokens=True`",
            "  removes them",
            "- roles: system, user and assistant, in any order; content is a string or a list of",
            '  `{"type": "text", "text": ...}` parts; any other role or content raises a template error',
            f"- `generation_config.json` ends generation at `<|end|>` or `<|endoftext|>` (`eos_token_id` {eos})",
            "",
            "## How it was built",
            "",
            "```",
            facts.command,
            "```",
            "",
            f"- tokenizer: byte-level BPE (`tokenizers`), {facts.vocab_size} tokens, "
            f"`<|endoftext|>` is bos/eos/pad/unk, `model_max_length` {shape.n_positions}",
            f"- architecture: GPT-2 (`GPT2LMHeadModel`), {shape.n_layer} layers, {shape.n_embd} dims, "
            f"{shape.n_head} heads, {shape.n_positions} positions, tied embeddings, float32 weights",
            f"- parameters: {facts.n_params:,}",
            f"- training: seed {facts.seed}, AdamW (peak lr {settings.peak_lr}, cosine decay over the "
            f"time budget), batch {settings.batch_size} x {settings.seq_len} tokens, CPU, {settings.threads} "
            f"thread{'s' if settings.threads > 1 else ''}",
            f"- budget: {settings.budget_s / 60:g} minutes of two busy cores ({2 * settings.budget_s:.0f} s of CPU "
            f"time), or at most {settings.wall_cap:g} times that in wall-clock time",
            f"- steps: {result.steps} in {result.seconds:.0f} s of wall-clock time and {result.cpu_seconds:.0f} s of "
            f"CPU time ({result.tokens_seen:,} tokens); the step count depends on the machine's speed and load",
            f"- final training loss (EMA): {result.final_train_loss:.3f}; held-out loss: "
            f"{result.heldout_loss:.3f} (perplexity {math.exp(result.heldout_loss):.1f}); held-out chat loss "
            f"(conversations about the held-out docstrings): {result.heldout_chat_loss:.3f}",
            f"- checkpoint size (weights, configs, tokenizer): {facts.size_mb:.1f} MB",
            "",
            "## Sample completions",
            "",
            "Greedy (repetition_penalty 1.2) and sampled (temperature 0.8, top_k 40, "
            f"torch seed {facts.seed}) completions, 40 new tokens, as produced at build time:",
            "",
            *sample_lines,
            "",
            "## Sample chat answers",
            "",
            f"Greedy (no repetition penalty), at most {CHAT_NEW_TOKENS} new tokens, decoded with "
            "`skip_special_tokens=True`, as produced at build time:",
            "",
            *_chat_lines(facts.chat_samples),
            "",
            "## Limits",
            "",
            "- A toy: answers read like docstrings but are often wrong, and names whose documentation",
            "  is not in the standard library's Python sources (C modules such as `itertools`) get",
            "  invented answers.",
            "- It follows no instructions: a system message changes little, and it only knows questions",
            "  shaped like the ones above, in English.",
            f"- Trained on windows of {settings.seq_len} tokens: long prompts and long conversations",
            f"  (the context holds {shape.n_positions}) degrade the answers.",
            "- No tools, images or other content types in the template.",
            "",
        ]
    )
