"""Build the service's small embedded default causal language model.

The model is built entirely offline from material that ships with Python:

1. A corpus is collected from the docstrings of the running interpreter's
   standard library (PSF licence). Source files are parsed with :mod:`ast`;
   nothing is imported. Chat-shaped conversations are made from the same
   docstrings (``chat_corpus.py``) and mixed in.
2. A byte-level BPE tokenizer is trained on the docstrings with ``tokenizers``,
   given the chat role tokens and chat template, and wrapped as a
   ``transformers.PreTrainedTokenizerFast``.
3. A small GPT-2-style model is trained from a seeded random initialisation
   with a plain torch loop for a bounded time: ``--minutes`` of two cores' CPU
   time, stopping at ``--wall-cap`` times that in wall-clock time.
4. Model, tokenizer (with ``chat_template.jinja``), generation config and a
   model card (``model_card.py``) are written to the output directory
   (``models/pydoc-gpt-mini`` by default).

Usage::

    python models/build_default_model.py --minutes 8

Everything except the number of optimisation steps (bounded by time, and
logged) is deterministic given ``--seed``.
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

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GenerationConfig, GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

# Run as a script, this file's directory is on sys.path.
from chat_corpus import CHAT_TEMPLATE, CHAT_TOKENS, END_TOKEN, DocKind, Docstring, Message, make_conversations
from model_card import CardFacts, render_model_card, sample_chats, sample_completions

LOGGER = logging.getLogger("build_default_model")

EOS_TOKEN = "<|endoftext|>"
DEFAULT_OUTPUT = Path(__file__).resolve().parent / "pydoc-gpt-mini"
SKIPPED_DIRS = frozenset({"test", "tests", "idle_test", "idlelib", "lib2to3", "site-packages", "__pycache__"})
DOCSTRING_NODES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
DOC_KINDS: dict[type, DocKind] = {
    ast.Module: "module",
    ast.ClassDef: "class",
    ast.FunctionDef: "function",
    ast.AsyncFunctionDef: "function",
}
MIN_DOCSTRING_CHARS = 40
# Pure-Python implementations that users import under the public name.
PUBLIC_MODULES = {"_pydecimal": "decimal", "_pyio": "io", "_collections_abc": "collections.abc"}
# The budget is counted in minutes of this many cores: the project machine's two.
BUDGET_CORES = 2
HELDOUT_EVERY = 50  # every 50th document goes to the held-out set
EXAMPLE_CHAT: list[Message] = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What does `json.dumps` do?"},
]


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
    threads: int = 1
    wall_cap: float = 4.0
    seq_len: int = 128
    # Half the old batch, twice the steps for the same compute: a lower held-out loss in a short budget.
    batch_size: int = 8
    peak_lr: float = 3e-3
    min_lr: float = 1e-4
    warmup_steps: int = 60
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    log_every: int = 50
    eval_windows: int = 64


@dataclass(frozen=True)
class TrainResult:
    """What the training loop achieved."""

    steps: int
    seconds: float
    cpu_seconds: float
    tokens_seen: int
    final_train_loss: float
    heldout_loss: float
    heldout_chat_loss: float


# --------------------------------------------------------------------------- corpus


def iter_stdlib_files(stdlib: Path) -> Iterator[Path]:
    """Yield the standard library's ``.py`` files in a deterministic order."""
    for path in sorted(stdlib.rglob("*.py"), key=lambda p: p.relative_to(stdlib).as_posix()):
        relative = path.relative_to(stdlib)
        if SKIPPED_DIRS.intersection(relative.parts[:-1]) or relative.name.startswith("test_"):
            continue
        yield path


def module_name(relative: Path) -> str:
    """The dotted name users know a standard library file by: ``json/__init__.py`` is ``json``."""
    parts = relative.with_suffix("").parts
    name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
    return PUBLIC_MODULES.get(name, name)


def iter_docstrings(tree: ast.AST, name: str) -> Iterator[tuple[str, DocKind, str]]:
    """Yield ``(dotted name, kind, docstring)`` of modules, classes and functions in source (depth-first) order."""
    if isinstance(tree, DOCSTRING_NODES):
        docstring = ast.get_docstring(tree, clean=True)
        if docstring:
            yield name, DOC_KINDS[type(tree)], docstring
    for child in ast.iter_child_nodes(tree):
        child_name = f"{name}.{child.name}" if isinstance(child, DOCSTRING_NODES[1:]) else name
        yield from iter_docstrings(child, child_name)


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


def build_corpus(stdlib: Path) -> list[Docstring]:
    """Collect unique, normalised, non-trivial docstrings (with the first name they document) from the stdlib."""
    documents: list[Docstring] = []
    seen: set[str] = set()
    n_files = 0
    for path in iter_stdlib_files(stdlib):
        tree = parse_file(path)
        if tree is None:
            continue
        n_files += 1
        for name, kind, docstring in iter_docstrings(tree, module_name(path.relative_to(stdlib))):
            document = normalise_docstring(docstring)
            if len(document) >= MIN_DOCSTRING_CHARS and document not in seen:
                seen.add(document)
                documents.append(Docstring(name, kind, document))
    n_chars = sum(len(doc.text) for doc in documents)
    LOGGER.info("corpus: %d docstrings, %d chars from %d files under %s", len(documents), n_chars, n_files, stdlib)
    return documents


def split_corpus(documents: Sequence[Docstring]) -> tuple[list[Docstring], list[Docstring]]:
    """Split documents deterministically into training and held-out sets."""
    train = [doc for i, doc in enumerate(documents) if i % HELDOUT_EVERY != HELDOUT_EVERY - 1]
    heldout = [doc for i, doc in enumerate(documents) if i % HELDOUT_EVERY == HELDOUT_EVERY - 1]
    return train, heldout


# --------------------------------------------------------------------------- tokenizer


def train_tokenizer(documents: Sequence[str], vocab_size: int, max_length: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer with the chat tokens and template, and wrap it for ``transformers``."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS_TOKEN, *CHAT_TOKENS],
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
        # Special, so that decoding with skip_special_tokens drops role tokens from answers.
        extra_special_tokens=list(CHAT_TOKENS),
        chat_template=CHAT_TEMPLATE,
        model_max_length=max_length,
    )


def render_chats(tokenizer: PreTrainedTokenizerFast, conversations: Sequence[Sequence[dict[str, str]]]) -> list[str]:
    """Render conversations with the tokenizer's own chat template, as the service will at inference."""
    return [tokenizer.apply_chat_template(list(messages), tokenize=False) for messages in conversations]


def interleave(documents: Sequence[str], chats: Sequence[str]) -> list[str]:
    """Spread chats evenly between documents, keeping the order of each."""
    merged: list[str] = []
    placed = 0
    for i, document in enumerate(documents, start=1):
        merged.append(document)
        due = i * len(chats) // len(documents)
        merged.extend(chats[placed:due])
        placed = due
    return merged


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
    # No attention mask: windows are never padded, and without one attention takes the causal fast path.
    logits = model(input_ids=batch[:, :-1]).logits
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


class Budget:
    """The share of the training budget spent: the process's CPU time, capped by wall-clock time.

    ``seconds`` counts seconds of BUDGET_CORES busy cores, so the same budget buys the same compute
    however many threads train and however loaded the machine is: two threads on an idle two-core
    machine spend it in as many wall-clock seconds; one thread, or a machine shared with other
    work, takes longer, up to ``wall_cap`` times ``seconds``.

    >>> budget = Budget(60.0, wall_cap=4.0)
    >>> 0.0 <= budget.spent() < 1.0
    True
    """

    def __init__(self, seconds: float, wall_cap: float) -> None:
        self.seconds = seconds
        self.wall_limit = seconds * wall_cap
        self._cpu_start = time.process_time()
        self._wall_start = time.monotonic()

    def cpu_seconds(self) -> float:
        """CPU seconds the process used since the start (all its threads)."""
        return time.process_time() - self._cpu_start

    def wall_seconds(self) -> float:
        """Wall-clock seconds since the start."""
        return time.monotonic() - self._wall_start

    def spent(self) -> float:
        """Fraction of the budget used (1.0 or more: done)."""
        return max(self.cpu_seconds() / BUDGET_CORES / self.seconds, self.wall_seconds() / self.wall_limit)


def train(
    model: GPT2LMHeadModel,
    train_stream: torch.Tensor,
    heldout_streams: tuple[torch.Tensor, torch.Tensor],
    settings: TrainSettings,
) -> TrainResult:
    """Train until the budget is spent; return step count and losses."""
    optimizer = make_optimizer(model, settings)
    generator = torch.Generator().manual_seed(settings.seed)
    model.train()
    budget = Budget(settings.budget_s, settings.wall_cap)
    step, smoothed = 0, float("nan")
    while (progress := budget.spent()) < 1.0:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, progress, settings)
        loss = lm_loss(model, sample_batch(train_stream, settings, generator))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        optimizer.step()
        step += 1
        smoothed = loss.item() if math.isnan(smoothed) else 0.9 * smoothed + 0.1 * loss.item()
        if step % settings.log_every == 0:
            LOGGER.info(
                "step %d  %.0fs wall  %.0fs cpu  lr %.2e  train loss %.3f",
                step,
                budget.wall_seconds(),
                budget.cpu_seconds(),
                optimizer.param_groups[0]["lr"],
                smoothed,
            )
    seconds, cpu_seconds = budget.wall_seconds(), budget.cpu_seconds()
    heldout, heldout_chat = (evaluate(model, stream, settings) for stream in heldout_streams)
    tokens = step * settings.batch_size * settings.seq_len
    LOGGER.info(
        "trained %d steps (%d tokens) in %.0fs (%.0fs cpu); train loss %.3f, held-out loss %.3f, "
        "held-out chat loss %.3f",
        step,
        tokens,
        seconds,
        cpu_seconds,
        smoothed,
        heldout,
        heldout_chat,
    )
    return TrainResult(step, seconds, cpu_seconds, tokens, smoothed, heldout, heldout_chat)


# --------------------------------------------------------------------------- output


def directory_size(path: Path) -> int:
    """Total size in bytes of the files in a directory."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def save_checkpoint(model: GPT2LMHeadModel, tokenizer: PreTrainedTokenizerFast, output: Path) -> None:
    """Write weights (safetensors), configs and tokenizer files to ``output``."""
    output.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        # A chat answer ends its turn with END_TOKEN; a plain completion ends with the document's eos.
        eos_token_id=[tokenizer.convert_tokens_to_ids(END_TOKEN), tokenizer.eos_token_id],
        pad_token_id=tokenizer.pad_token_id,
    )
    # transformers>=5 always writes safetensors; the flag keeps 4.x doing the same.
    model.save_pretrained(output, safe_serialization=True)
    tokenizer.save_pretrained(output)
    weights = output / "model.safetensors"
    if not weights.is_file():
        raise RuntimeError(f"expected {weights} to be written")
    weights.chmod(0o644)  # safetensors writes through a 0600 temporary file


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse command-line arguments."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="checkpoint directory")
    parser.add_argument(
        "--minutes",
        type=float,
        default=8.0,
        help=f"training budget in minutes of {BUDGET_CORES} busy cores (wall-clock minutes on an idle machine)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (results depend on it); 2 is faster on an idle machine, 1 wastes less CPU on a shared one",
    )
    parser.add_argument(
        "--wall-cap", type=float, default=4.0, help="stop training after this many times --minutes of wall-clock time"
    )
    parser.add_argument("--seed", type=int, default=1234, help="random seed")
    parser.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary size")
    parser.add_argument(
        "--chats-per-doc", type=int, default=1, help="chat conversations made from each askable training docstring"
    )
    return parser.parse_args(argv)


def build_command(args: argparse.Namespace) -> str:
    """Reconstruct the command line that reproduces this build."""
    command = (
        f"python models/build_default_model.py --minutes {args.minutes:g} "
        f"--seed {args.seed} --vocab-size {args.vocab_size} --chats-per-doc {args.chats_per_doc} "
        f"--threads {args.threads} --wall-cap {args.wall_cap:g}"
    )
    if args.output.resolve() != DEFAULT_OUTPUT:
        command += f" --output {args.output}"
    return command


def seed_everything(seed: int, threads: int) -> None:
    """Seed torch's random generator and fix the thread count (it changes floating-point sums)."""
    torch.manual_seed(seed)
    torch.set_num_threads(threads)


def main(argv: Sequence[str] | None = None) -> None:
    """Build the corpus, train tokenizer and model, and save the checkpoint."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    args = parse_args(argv)
    seed_everything(args.seed, args.threads)
    shape = ModelShape()
    settings = TrainSettings(budget_s=args.minutes * 60, seed=args.seed, threads=args.threads, wall_cap=args.wall_cap)

    documents = build_corpus(Path(sysconfig.get_paths()["stdlib"]))
    train_docs, heldout_docs = split_corpus(documents)
    tokenizer = train_tokenizer([doc.text for doc in train_docs], args.vocab_size, shape.n_positions)
    chats = render_chats(tokenizer, make_conversations(train_docs, args.chats_per_doc, args.seed))
    doc_stream = encode_documents(tokenizer, [doc.text for doc in train_docs])
    chat_stream = encode_documents(tokenizer, chats)
    train_stream = encode_documents(tokenizer, interleave([doc.text for doc in train_docs], chats))
    heldout_stream = encode_documents(tokenizer, [doc.text for doc in heldout_docs])
    heldout_chat_stream = encode_documents(
        tokenizer, render_chats(tokenizer, make_conversations(heldout_docs, 1, args.seed))
    )
    LOGGER.info(
        "tokens: %d training (%d in %d chats), %d held-out, %d held-out chat",
        len(train_stream),
        len(chat_stream),
        len(chats),
        len(heldout_stream),
        len(heldout_chat_stream),
    )

    model = build_model(len(tokenizer), tokenizer.eos_token_id, shape)
    result = train(model, train_stream, (heldout_stream, heldout_chat_stream), settings)
    save_checkpoint(model, tokenizer, args.output)
    samples = sample_completions(model, tokenizer, args.seed)
    chat_samples = sample_chats(model, tokenizer)

    facts = CardFacts(
        command=build_command(args),
        python_version=sysconfig.get_python_version(),
        n_docs=len(documents),
        n_chars=sum(len(doc.text) for doc in documents),
        n_heldout_docs=len(heldout_docs),
        min_docstring_chars=MIN_DOCSTRING_CHARS,
        heldout_every=HELDOUT_EVERY,
        n_conversations=len(chats),
        doc_tokens=len(doc_stream),
        chat_tokens=len(chat_stream),
        vocab_size=len(tokenizer),
        special_tokens={token: tokenizer.convert_tokens_to_ids(token) for token in (EOS_TOKEN, *CHAT_TOKENS)},
        eos_token_ids=list(model.generation_config.eos_token_id),
        example_prompt=tokenizer.apply_chat_template(EXAMPLE_CHAT, tokenize=False, add_generation_prompt=True),
        n_params=count_parameters(model),
        size_mb=directory_size(args.output) / 1e6,
        seed=args.seed,
        result=result,
        samples=samples,
        chat_samples=chat_samples,
    )
    card = render_model_card(facts, shape, settings)
    (args.output / "README.md").write_text(card, encoding="utf-8")
    LOGGER.info("saved %s (%.1f MB)", args.output, directory_size(args.output) / 1e6)


if __name__ == "__main__":
    main()
