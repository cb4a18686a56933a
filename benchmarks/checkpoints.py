"""Random-weight checkpoints of real model shapes, for timing (their text is meaningless).

They reuse the embedded model's tokenizer. With ``full_vocab`` it is extended with one plain
added token per id beyond its vocabulary, so that every id the model can pick decodes to text:
a streamed answer then sends each token as it comes, which a time to first token needs (an id
that decodes to nothing sends nothing). Without it those ids decode to nothing, which changes no
timing of whole answers and keeps the tokenizer small (its load is part of a cold start).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

CACHE = Path(__file__).resolve().parent / ".cache"
# The embedded model's tokenizer (not imported from settings: GPU hosts run this without pydantic).
TOKENIZER_DIR = Path(__file__).resolve().parent.parent / "models" / "pydoc-gpt-mini"
logger = logging.getLogger(__name__)

SHAPES = {
    # GPT-2 small: 124M parameters.
    "gpt2-small": {"n_layer": 12, "n_embd": 768, "n_head": 12, "n_positions": 1024, "vocab_size": 50257},
    # About 1B parameters (GPU loading benchmark).
    "gpt2-1b": {"n_layer": 18, "n_embd": 2048, "n_head": 16, "n_positions": 2048, "vocab_size": 50257},
}


def random_checkpoint(
    shape: str = "gpt2-small", root: Path = CACHE, dtype: str = "float32", full_vocab: bool = False
) -> Path:
    """Build (once) and return a local checkpoint with random weights of the named shape."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    path = root / f"{shape}-random-{dtype}{'-full-vocab' if full_vocab else ''}"
    if (path / "model.safetensors").exists() or (path / "model.safetensors.index.json").exists():
        return path
    logger.info("building random %s checkpoint at %s", shape, path)
    torch.manual_seed(0)
    config = GPT2Config(**SHAPES[shape], bos_token_id=0, eos_token_id=0, pad_token_id=0)
    model = GPT2LMHeadModel(config).to(getattr(torch, dtype))
    tmp = path.with_suffix(".tmp")
    model.save_pretrained(tmp)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TOKENIZER_DIR / name, tmp / name)
    if full_vocab:
        tokenizer = AutoTokenizer.from_pretrained(tmp)
        tokenizer.add_tokens([f"<w{i}>" for i in range(len(tokenizer), config.vocab_size)])
        tokenizer.save_pretrained(tmp)
    tmp.rename(path)
    return path
