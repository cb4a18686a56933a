"""Build the service's small embedded default causal language model.

The model is built entirely offline from material that ships with Python:

1. A corpus is collected from the docstrings of the running interpreter's
   standard library (PSF licence). Source files are parsed with :mod:`ast`;
   nothing is imported.
2. A byte-level BPE tokenizer is trained on that corpus with ``tokenizers``
   and wrapped as a ``transformers.PreTrainedTokenizerFast``.
3. A small GPT-2-style model is trained from a seeded random initialisation
   with a plain torch loop for a bounded wall-clock budget.
4. Model, tokenizer, generation config and a short model card are written to
   the output directory (``models/pydoc-gpt-mini`` by default).

Usage::

    python models/build_default_model.py --minutes 8

Everything except the number of optimisation steps (bounded by wall-clock
time, and logged) is deterministic given ``--seed``.
"""

from __future__ import annotations

import argparse
import ast
import logging
import math
import re
import sysconfig
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GenerationConfig, GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

LOGGER = logging.getLogger("build_default_model")

EOS_TOKEN = "<|endoftext|>"
DEFAULT_OUTPUT = Path(__file__).resolve().parent / "pydoc-gpt-mini"
SKIPPED_DIRS = frozenset({"test", "tests", "idle_test", "idlelib", "lib2to3", "site-packages", "__pycache__"})
DOCSTRING_NODES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
MIN_DOCSTRING_CHARS = 40
HELDOUT_EVERY = 50  # every 50th document goes to the held-out set
SAMPLE_PROMPTS = ("Return the", "The socket module", "This function")


@dataclass(frozen=True)
class ModelShape:
    """Architecture hyper-parameters of the GPT-2-style model."""

    n_layer: int = 4
    n_embd: int = 256
    n_head: int = 4
    n_positions: int = 512


@dataclass(frozen=True)
class TrainSettings:
    """Optimisation hyper-parameters of the training loop."""

    budget_s: float
    seed: int
    seq_len: int = 128
    batch_size: int = 16
    peak_lr: float = 2e-3
    min_lr: float = 1e-4
    warmup_steps: int = 30
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    log_every: int = 50
    eval_windows: int = 64


@dataclass(frozen=True)
class TrainResult:
    """What the training loop achieved."""

    steps: int
    seconds: float
    tokens_seen: int
    final_train_loss: float
    heldout_loss: float


class Sample(NamedTuple):
    """A prompt with its greedy and sampled completions."""

    prompt: str
    greedy: str
    sampled: str


@dataclass(frozen=True)
class CardFacts:
    """Facts about a finished build, for the model card."""

    command: str
    python_version: str
    n_docs: int
    n_chars: int
    n_heldout_docs: int
    vocab_size: int
    n_params: int
    size_mb: float
    seed: int
    result: TrainResult
    samples: Sequence[Sample]


# --------------------------------------------------------------------------- corpus


def iter_stdlib_files(stdlib: Path) -> Iterator[Path]:
    """Yield the standard library's ``.py`` files in a deterministic order."""
    for path in sorted(stdlib.rglob("*.py"), key=lambda p: p.relative_to(stdlib).as_posix()):
        relative = path.relative_to(stdlib)
        if SKIPPED_DIRS.intersection(relative.parts[:-1]) or relative.name.startswith("test_"):
            continue
        yield path


def iter_docstrings(tree: ast.AST) -> Iterator[str]:
    """Yield module, class and function docstrings in source (depth-first) order."""
    if isinstance(tree, DOCSTRING_NODES):
        docstring = ast.get_docstring(tree, clean=True)
        if docstring:
            yield docstring
    for child in ast.iter_child_nodes(tree):
        yield from iter_docstrings(child)


def is_prose_paragraph(lines: Sequence[str]) -> bool:
    """Tell whether a paragraph is plain prose that may be re-flowed onto one line."""
    return not any(
        line.startswith((" ", ">>>", "...", "-", "*", "+", "|", "=")) or line.endswith("::") for line in lines
    )


def normalise_docstring(text: str) -> str:
    """Normalise whitespace: re-flow prose paragraphs, keep code and lists as they are."""
    text = text.replace("\t", "    ").replace("\r\n", "\n").replace("\r", "\n")
    paragraphs = []
    for block in re.split(r"\n\s*\n", text.strip()):
        lines = [line.rstrip() for line in block.split("\n") if line.strip()]
        if not lines:
            continue
        if is_prose_paragraph(lines):
            paragraphs.append(re.sub(r"\s+", " ", " ".join(lines)))
        else:
            paragraphs.append("\n".join(lines))
    return "\n\n".join(paragraphs)


def parse_file(path: Path) -> ast.AST | None:
    """Parse one source file, returning ``None`` when it cannot be read or parsed."""
    try:
        return ast.parse(path.read_bytes(), filename=str(path))
    except (SyntaxError, ValueError, OSError) as error:
        LOGGER.debug("skipping %s: %s", path, error)
        return None


def build_corpus(stdlib: Path) -> list[str]:
    """Collect unique, normalised, non-trivial docstrings from the standard library."""
    documents: list[str] = []
    seen: set[str] = set()
    n_files = 0
    for path in iter_stdlib_files(stdlib):
        tree = parse_file(path)
        if tree is None:
            continue
        n_files += 1
        for docstring in iter_docstrings(tree):
            document = normalise_docstring(docstring)
            if len(document) >= MIN_DOCSTRING_CHARS and document not in seen:
                seen.add(document)
                documents.append(document)
    n_chars = sum(len(doc) for doc in documents)
    LOGGER.info("corpus: %d docstrings, %d chars from %d files under %s", len(documents), n_chars, n_files, stdlib)
    return documents


def split_corpus(documents: Sequence[str]) -> tuple[list[str], list[str]]:
    """Split documents deterministically into training and held-out sets."""
    train = [doc for i, doc in enumerate(documents) if i % HELDOUT_EVERY != HELDOUT_EVERY - 1]
    heldout = [doc for i, doc in enumerate(documents) if i % HELDOUT_EVERY == HELDOUT_EVERY - 1]
    return train, heldout


# --------------------------------------------------------------------------- tokenizer


def train_tokenizer(documents: Sequence[str], vocab_size: int, max_length: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer and wrap it for ``transformers``."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(documents, trainer=trainer, length=len(documents))
    LOGGER.info("tokenizer: trained byte-level BPE with %d tokens", tokenizer.get_vocab_size())
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        model_max_length=max_length,
    )


def encode_documents(tokenizer: PreTrainedTokenizerFast, documents: Sequence[str]) -> torch.Tensor:
    """Encode documents into one flat token stream, each document preceded by eos."""
    encodings = tokenizer.backend_tokenizer.encode_batch(list(documents), add_special_tokens=False)
    stream: list[int] = []
    for encoding in encodings:
        stream.append(tokenizer.eos_token_id)
        stream.extend(encoding.ids)
    stream.append(tokenizer.eos_token_id)
    return torch.tensor(stream, dtype=torch.long)


# --------------------------------------------------------------------------- model


def build_model(vocab_size: int, eos_token_id: int, shape: ModelShape) -> GPT2LMHeadModel:
    """Create a randomly initialised GPT-2-style model with tied embeddings."""
    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=shape.n_positions,
        n_embd=shape.n_embd,
        n_layer=shape.n_layer,
        n_head=shape.n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=eos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=eos_token_id,
        tie_word_embeddings=True,
    )
    model = GPT2LMHeadModel(config)
    n_params = count_parameters(model)
    LOGGER.info(
        "model: %d layers, %d dims, %d heads, %d parameters",
        shape.n_layer,
        shape.n_embd,
        shape.n_head,
        n_params,
    )
    return model


def count_parameters(model: torch.nn.Module) -> int:
    """Count unique parameters (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters())


def make_optimizer(model: torch.nn.Module, settings: TrainSettings) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on biases and layer norms)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": settings.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=settings.peak_lr, betas=(0.9, 0.95))


def learning_rate(step: int, progress: float, settings: TrainSettings) -> float:
    """Linear warm-up, then cosine decay over the fraction of the time budget used."""
    if step < settings.warmup_steps:
        return settings.peak_lr * (step + 1) / settings.warmup_steps
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return settings.min_lr + (settings.peak_lr - settings.min_lr) * cosine


def sample_batch(stream: torch.Tensor, settings: TrainSettings, generator: torch.Generator) -> torch.Tensor:
    """Draw a batch of random windows of ``seq_len + 1`` tokens from the stream."""
    starts = torch.randint(0, len(stream) - settings.seq_len - 1, (settings.batch_size,), generator=generator)
    return torch.stack([stream[s : s + settings.seq_len + 1] for s in starts.tolist()])


def lm_loss(model: GPT2LMHeadModel, batch: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy of a batch of windows."""
    inputs = batch[:, :-1]
    logits = model(input_ids=inputs, attention_mask=torch.ones_like(inputs)).logits
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1))


@torch.no_grad()
def evaluate(model: GPT2LMHeadModel, stream: torch.Tensor, settings: TrainSettings) -> float:
    """Mean loss over consecutive non-overlapping held-out windows."""
    model.eval()
    width = settings.seq_len + 1
    n_windows = min(settings.eval_windows, (len(stream) - 1) // settings.seq_len)
    windows = [stream[i * settings.seq_len : i * settings.seq_len + width] for i in range(n_windows)]
    losses = [lm_loss(model, torch.stack(windows[i : i + 16])).item() for i in range(0, n_windows, 16)]
    model.train()
    return sum(losses) / len(losses)


def train(
    model: GPT2LMHeadModel, train_stream: torch.Tensor, heldout_stream: torch.Tensor, settings: TrainSettings
) -> TrainResult:
    """Train until the wall-clock budget is spent; return step count and losses."""
    optimizer = make_optimizer(model, settings)
    generator = torch.Generator().manual_seed(settings.seed)
    model.train()
    start = time.monotonic()
    step, smoothed = 0, float("nan")
    while (elapsed := time.monotonic() - start) < settings.budget_s:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, elapsed / settings.budget_s, settings)
        loss = lm_loss(model, sample_batch(train_stream, settings, generator))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        optimizer.step()
        step += 1
        smoothed = loss.item() if math.isnan(smoothed) else 0.9 * smoothed + 0.1 * loss.item()
        if step % settings.log_every == 0:
            LOGGER.info(
                "step %d  %.0fs  lr %.2e  train loss %.3f",
                step,
                elapsed,
                optimizer.param_groups[0]["lr"],
                smoothed,
            )
    seconds = time.monotonic() - start
    heldout = evaluate(model, heldout_stream, settings)
    tokens = step * settings.batch_size * settings.seq_len
    LOGGER.info(
        "trained %d steps (%d tokens) in %.0fs; train loss %.3f, held-out loss %.3f",
        step,
        tokens,
        seconds,
        smoothed,
        heldout,
    )
    return TrainResult(step, seconds, tokens, smoothed, heldout)


# --------------------------------------------------------------------------- output


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


def directory_size(path: Path) -> int:
    """Total size in bytes of the files in a directory."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def save_checkpoint(model: GPT2LMHeadModel, tokenizer: PreTrainedTokenizerFast, output: Path) -> None:
    """Write weights (safetensors), configs and tokenizer files to ``output``."""
    output.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    # transformers>=5 always writes safetensors; the flag keeps 4.x doing the same.
    model.save_pretrained(output, safe_serialization=True)
    tokenizer.save_pretrained(output)
    weights = output / "model.safetensors"
    if not weights.is_file():
        raise RuntimeError(f"expected {weights} to be written")
    weights.chmod(0o644)  # safetensors writes through a 0600 temporary file


def render_model_card(facts: CardFacts, shape: ModelShape, settings: TrainSettings) -> str:
    """Render the README.md model card."""
    result = facts.result
    sample_lines = []
    for sample in facts.samples:
        sample_lines += [
            f"- prompt `{sample.prompt!r}`",
            f"  - greedy: `{sample.greedy!r}`",
            f"  - sampled: `{sample.sampled!r}`",
        ]
    return "\n".join(
        [
            "# pydoc-gpt-mini",
            "",
            "A tiny GPT-2-style causal language model: the service's embedded default model, so",
            "that it runs out of the box without network access. It is a toy: it writes text",
            "that reads like Python documentation, with no factual reliability.",
            "",
            "## Corpus and licence",
            "",
            f"Docstrings of the Python {facts.python_version} standard library: module, class and",
            "function docstrings, parsed with `ast` (never imported), test, idlelib, lib2to3 and",
            f"site-packages skipped, duplicates and docstrings under {MIN_DOCSTRING_CHARS} characters",
            f"dropped; {facts.n_docs} docstrings, {facts.n_chars:,} characters, of which every",
            f"{HELDOUT_EVERY}th docstring ({facts.n_heldout_docs}) is held out for evaluation.",
            "The docstrings are distributed under the Python Software Foundation License",
            "(PSF-2.0). The corpus is not stored; the build script rebuilds it.",
            "",
            "## How it was built",
            "",
            "```",
            facts.command,
            "```",
            "",
            f"- tokenizer: byte-level BPE (`tokenizers`), {facts.vocab_size} tokens, "
            f"`{EOS_TOKEN}` is bos/eos/pad/unk, `model_max_length` {shape.n_positions}",
            f"- architecture: GPT-2 (`GPT2LMHeadModel`), {shape.n_layer} layers, {shape.n_embd} dims, "
            f"{shape.n_head} heads, {shape.n_positions} positions, tied embeddings, float32 weights",
            f"- parameters: {facts.n_params:,}",
            f"- training: seed {facts.seed}, AdamW (peak lr {settings.peak_lr}, cosine decay over the "
            f"time budget), batch {settings.batch_size} x {settings.seq_len} tokens, CPU, 2 threads",
            f"- steps: {result.steps} in {result.seconds:.0f} s ({result.tokens_seen:,} tokens); "
            "the step count depends on wall-clock speed",
            f"- final training loss (EMA): {result.final_train_loss:.3f}; held-out loss: "
            f"{result.heldout_loss:.3f} (perplexity {math.exp(result.heldout_loss):.1f})",
            f"- checkpoint size (weights, configs, tokenizer): {facts.size_mb:.1f} MB",
            "",
            "## Sample completions",
            "",
            "Greedy (repetition_penalty 1.2) and sampled (temperature 0.8, top_k 40, "
            f"torch seed {facts.seed}) completions, 40 new tokens, as produced at build time:",
            "",
            *sample_lines,
            "",
        ]
    )


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse command-line arguments."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="checkpoint directory")
    parser.add_argument("--minutes", type=float, default=8.0, help="training wall-clock budget")
    parser.add_argument("--seed", type=int, default=1234, help="random seed")
    parser.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary size")
    return parser.parse_args(argv)


def build_command(args: argparse.Namespace) -> str:
    """Reconstruct the command line that reproduces this build."""
    command = (
        f"python models/build_default_model.py --minutes {args.minutes:g} "
        f"--seed {args.seed} --vocab-size {args.vocab_size}"
    )
    if args.output.resolve() != DEFAULT_OUTPUT:
        command += f" --output {args.output}"
    return command


def seed_everything(seed: int) -> None:
    """Seed torch's random generator and fix the thread count."""
    torch.manual_seed(seed)
    torch.set_num_threads(2)


def main(argv: Sequence[str] | None = None) -> None:
    """Build the corpus, train tokenizer and model, and save the checkpoint."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    args = parse_args(argv)
    seed_everything(args.seed)
    shape = ModelShape()
    settings = TrainSettings(budget_s=args.minutes * 60, seed=args.seed)

    documents = build_corpus(Path(sysconfig.get_paths()["stdlib"]))
    train_docs, heldout_docs = split_corpus(documents)
    tokenizer = train_tokenizer(train_docs, args.vocab_size, shape.n_positions)
    train_stream = encode_documents(tokenizer, train_docs)
    heldout_stream = encode_documents(tokenizer, heldout_docs)
    LOGGER.info("tokens: %d training, %d held-out", len(train_stream), len(heldout_stream))

    model = build_model(len(tokenizer), tokenizer.eos_token_id, shape)
    result = train(model, train_stream, heldout_stream, settings)
    save_checkpoint(model, tokenizer, args.output)
    samples = sample_completions(model, tokenizer, args.seed)

    facts = CardFacts(
        command=build_command(args),
        python_version=sysconfig.get_python_version(),
        n_docs=len(documents),
        n_chars=sum(map(len, documents)),
        n_heldout_docs=len(heldout_docs),
        vocab_size=len(tokenizer),
        n_params=count_parameters(model),
        size_mb=directory_size(args.output) / 1e6,
        seed=args.seed,
        result=result,
        samples=samples,
    )
    card = render_model_card(facts, shape, settings)
    (args.output / "README.md").write_text(card, encoding="utf-8")
    LOGGER.info("saved %s (%.1f MB)", args.output, directory_size(args.output) / 1e6)


if __name__ == "__main__":
    main()
