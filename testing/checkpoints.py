"""Random-weight checkpoints built on the fly, so that tests and benchmarks never need a hub.

One builder of random GPT-2 weights (:func:`random_gpt2`) serves both: tests' tiny models
(:func:`build_tiny_causal`, with a small tokenizer trained here) and benchmarks' real shapes
(:func:`random_checkpoint`, with the embedded model's tokenizer, built once into a cache). Their text is
meaningless; their shapes and timings are real.

With ``full_vocab`` a benchmark checkpoint's tokenizer is extended with one plain added token per id
beyond its vocabulary, so that every id the model can pick decodes to text: a streamed answer then sends
each token as it comes, which a time to first token needs (an id that decodes to nothing sends nothing).
Without it those ids decode to nothing, which changes no timing of whole answers and keeps the tokenizer
small (its load is part of a cold start).

Nothing here imports the service's settings: GPU hosts build checkpoints without pydantic.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
CACHE = REPO_ROOT / "benchmarks" / ".cache"
# The embedded model's tokenizer, which benchmark checkpoints reuse.
TOKENIZER_DIR = REPO_ROOT / "models" / "pydoc-gpt-mini"
logger = logging.getLogger(__name__)

CORPUS = [
    "Return the number of items in the container.",
    "The socket module provides access to the BSD socket interface.",
    "This function reads a line from the file and returns it as a string.",
    "Raise ValueError if the argument is negative or not an integer.",
    "A Ray Serve deployment scales between a minimum and a maximum number of replicas.",
    "Write a haiku about autumn leaves falling on a quiet river.",
] * 20

# A chat template in the usual shape: BOS first, one block per message, the assistant's turn open
# at the end; it refuses conversations whose roles do not alternate after the system message.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% set offset = 1 if messages[0]['role'] == 'system' else 0 %}"
    "{% for message in messages %}"
    "{% if message['role'] != 'system' and (message['role'] == 'user') != ((loop.index0 - offset) % 2 == 0) %}"
    "{{ raise_exception('roles must alternate user/assistant') }}"
    "{% endif %}"
    "<|{{ message['role'] }}|>{{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

# Real model shapes for benchmarks.
SHAPES = {
    # GPT-2 small: 124M parameters.
    "gpt2-small": {"n_layer": 12, "n_embd": 768, "n_head": 12, "n_positions": 1024, "vocab_size": 50257},
    # About 1B parameters (GPU loading benchmark).
    "gpt2-1b": {"n_layer": 18, "n_embd": 2048, "n_head": 16, "n_positions": 2048, "vocab_size": 50257},
    # About 1.2 GB and 2.8 GB in float32 (303M and 700M parameters): the wake cost by size.
    "gpt2-1.2gb": {"n_layer": 20, "n_embd": 1024, "n_head": 16, "n_positions": 1024, "vocab_size": 50257},
    "gpt2-2.8gb": {"n_layer": 22, "n_embd": 1536, "n_head": 16, "n_positions": 1024, "vocab_size": 50257},
}

# A Hermes-style template for tool calling: the tools in a system block, an assistant's calls as
# <tool_call>{...}</tool_call>, a tool's answer with the id of the call it answers.
TOOLS_TEMPLATE = (
    "{% if tools %}<|system|>{% for t in tools %}{{ t.function.name }}:{{ t.function.parameters | tojson }};"
    "{% endfor %}\n{% endif %}{% for m in messages %}{% if m.tool_calls %}<|assistant|>{% for c in m.tool_calls %}"
    '<tool_call>{"name": "{{ c.function.name }}", "arguments": {{ c.function.arguments | tojson }}}</tool_call>'
    "{% endfor %}\n{% elif m.role == 'tool' %}<|tool|>{{ m.tool_call_id }}={{ m.content }}\n"
    "{% else %}<|{{ m.role }}|>{{ m.content }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def random_gpt2(path: Path, seed: int = 0, dtype: str = "float32", **config: Any) -> Any:
    """Save a GPT-2 with random weights (seeded) of the shape ``config`` (``GPT2Config`` fields) at ``path``;
    returns its config. The tokenizer is the caller's."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    gpt2 = GPT2Config(**config)
    GPT2LMHeadModel(gpt2).to(getattr(torch, dtype)).save_pretrained(path)
    return gpt2


def build_tokenizer(
    path: Path,
    vocab_size: int = 400,
    corpus: Sequence[str] = CORPUS,
    chat_template: str | None = None,
    add_bos: bool = False,
):
    """A byte-level BPE tokenizer trained on ``corpus``, saved in Hugging Face format at ``path``.

    ``chat_template`` ships a chat template with it; ``add_bos`` makes encoding add the BOS token
    ``<s>`` in front (as Llama's tokenizers do).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<pad>", "<s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus, trainer)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
        )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=128)
    fast.eos_token = "<|endoftext|>"
    fast.bos_token = "<s>"
    fast.pad_token = "<pad>"
    if chat_template is not None:
        fast.chat_template = chat_template
    fast.save_pretrained(path)
    return fast


def build_tiny_causal(
    path: Path,
    seed: int = 0,
    n_positions: int = 128,
    n_layer: int = 2,
    chat_template: str | None = None,
    add_bos: bool = False,
) -> Path:
    """A small GPT-2 with random weights (2 layers and a context of 128 tokens by default).

    ``chat_template`` and ``add_bos`` are passed to its tokenizer (:func:`build_tokenizer`).
    """
    tok = build_tokenizer(path, chat_template=chat_template, add_bos=add_bos)
    random_gpt2(
        path,
        seed=seed,
        vocab_size=len(tok),
        n_positions=n_positions,
        n_embd=32,
        n_layer=n_layer,
        n_head=2,
        bos_token_id=tok.eos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    return path


def build_tiny_causal_that_stops(path: Path) -> Path:
    """A tiny GPT-2 (:func:`build_tiny_causal`) whose every next token is its end of text, whatever the prompt
    and the sampling: its answers stop at once rather than run to the limit.

    The final layer norm ignores its input and outputs a large multiple of the end-of-text embedding, so the
    end of text's logit (the hidden state times that embedding, the output layer being tied to the input one)
    is larger than any other by hundreds.
    """
    import torch
    from transformers import GPT2LMHeadModel

    build_tiny_causal(path)
    model = GPT2LMHeadModel.from_pretrained(path)
    eos = model.config.eos_token_id
    with torch.no_grad():
        embedding = model.transformer.wte.weight
        embedding[eos] *= 10
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(embedding[eos] * 1000)
    model.save_pretrained(path)
    return path


def build_tiny_llama(path: Path) -> Path:
    """A random two-layer Llama with grouped-query attention (4 heads over 2 key/value heads): ``nn.Linear`` layers."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer(path)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(3)
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def random_checkpoint(
    shape: str = "gpt2-small", root: Path = CACHE, dtype: str = "float32", full_vocab: bool = False
) -> Path:
    """Build (once) and return a local checkpoint with random weights of the named shape (:data:`SHAPES`),
    with the embedded model's tokenizer."""
    path = root / f"{shape}-random-{dtype}{'-full-vocab' if full_vocab else ''}"
    if (path / "model.safetensors").exists() or (path / "model.safetensors.index.json").exists():
        return path
    logger.info("building random %s checkpoint at %s", shape, path)
    tmp = path.with_suffix(".tmp")
    config = random_gpt2(tmp, seed=0, dtype=dtype, **SHAPES[shape], bos_token_id=0, eos_token_id=0, pad_token_id=0)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TOKENIZER_DIR / name, tmp / name)
    if full_vocab:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tmp)
        tokenizer.add_tokens([f"<w{i}>" for i in range(len(tokenizer), config.vocab_size)])
        tokenizer.save_pretrained(tmp)
    tmp.rename(path)
    return path


def build_tiny_seq2seq(path: Path, seed: int = 0) -> Path:
    """A 1+1-layer BART with random weights (the shape of a summarizer)."""
    import torch
    from transformers import BartConfig, BartForConditionalGeneration

    tok = build_tokenizer(path)
    torch.manual_seed(seed)
    config = BartConfig(
        vocab_size=len(tok),
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=128,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        decoder_start_token_id=tok.eos_token_id,
        forced_eos_token_id=tok.eos_token_id,
        # Untied: with tied random embeddings the decoder's first step echoes its start token (EOS).
        tie_word_embeddings=False,
    )
    BartForConditionalGeneration(config).save_pretrained(path)
    return path


def build_tiny_encoder(
    path: Path, seed: int = 0, pooling: str | None = None, hidden_size: int = 32, n_layer: int = 2
) -> Path:
    """A small BERT encoder with random weights (an embedding model), context 128 tokens.

    ``pooling`` (``mean``, ``cls`` or ``lasttoken``) writes a sentence-transformers ``modules.json`` and
    ``1_Pooling/config.json`` declaring it; None writes neither (the server then pools by mean).
    """
    import json

    import torch
    from transformers import BertConfig, BertModel

    tok = build_tokenizer(path)
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(tok),
        hidden_size=hidden_size,
        num_hidden_layers=n_layer,
        num_attention_heads=2,
        intermediate_size=2 * hidden_size,
        max_position_embeddings=128,
        pad_token_id=tok.pad_token_id,
    )
    BertModel(config).eval().save_pretrained(path)
    if pooling is not None:
        modules = [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
        ]
        (path / "modules.json").write_text(json.dumps(modules))
        (path / "1_Pooling").mkdir(exist_ok=True)
        modes = {f"pooling_mode_{m}": pooling == short for m, short in _POOLING_KEYS.items()}
        (path / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": hidden_size, **modes}))
    return path


_POOLING_KEYS = {"cls_token": "cls", "mean_tokens": "mean", "lasttoken": "lasttoken", "max_tokens": "max"}
