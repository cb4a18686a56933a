"""Embedding models: pooling as the checkpoint declares it, L2 normalisation, and a small batcher.

A sentence-transformers checkpoint names its pooling in ``modules.json`` (a ``Pooling`` module) and
that module's ``config.json`` (``pooling_mode_mean_tokens``, ``pooling_mode_cls_token``,
``pooling_mode_lasttoken``); any other checkpoint gets mean pooling over the attention mask, which is
what most encoders without that file were trained for. Every vector leaves L2-normalised, as
OpenAI's do, so a client may compare them by dot product.

:class:`EmbeddingBatcher` lets many inputs of one request and concurrent requests share forward
passes: one pass at a time, up to ``max_batch_size`` inputs each, taken in arrival order.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from transformers import AutoConfig, AutoModel, AutoTokenizer
from transformers.utils import cached_file

from engine.errors import InvalidFieldError
from engine.loading import _context
from engine.timing import PhaseTimer

logger = logging.getLogger("ray.serve")

Pooling = Literal["mean", "cls", "lasttoken"]
_MODES: dict[str, Pooling] = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_lasttoken": "lasttoken",
}


def _read_json(model_id: str, name: str) -> Any:
    """A JSON file of the checkpoint (a local directory or a hub id), or None when it has none."""
    path = cached_file(model_id, name, _raise_exceptions_for_missing_entries=False)
    if path is None:
        return None
    with open(path) as f:
        return json.load(f)


def declared_pooling(model_id: str) -> Pooling:
    """The pooling the checkpoint's sentence-transformers config declares; mean when it declares none.

    A config asking for a mode this engine lacks (max, weighted mean) is refused at load, not served
    with other vectors than the model was trained to give.
    """
    modules = _read_json(model_id, "modules.json") or []
    pooling = next((m for m in modules if str(m.get("type", "")).endswith("Pooling")), None)
    if pooling is None:
        return "mean"
    config = _read_json(model_id, f"{pooling.get('path') or '1_Pooling'}/config.json") or {}
    chosen = [mode for key, mode in _MODES.items() if config.get(key)]
    others = [k for k, v in config.items() if k.startswith("pooling_mode") and v and k not in _MODES]
    if others or len(chosen) > 1:
        raise ValueError(f"{model_id}: pooling {others or chosen} is not supported (one of mean, cls, lasttoken)")
    return chosen[0] if chosen else "mean"


def pool(hidden: torch.Tensor, mask: torch.Tensor, mode: Pooling) -> torch.Tensor:
    """One vector per row of ``hidden`` (rows x tokens x hidden), padding (``mask`` 0) left out."""
    if mode == "cls":
        return hidden[:, 0]
    if mode == "lasttoken":  # the last real token of each row, wherever the padding side puts it
        last = mask.shape[1] - 1 - mask.flip(1).int().argmax(1)
        return hidden[torch.arange(hidden.shape[0]), last]
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)


def normalise(vectors: torch.Tensor, dimensions: int | None = None) -> torch.Tensor:
    """Unit-length rows, first cut to ``dimensions`` (Matryoshka-style, as OpenAI's ``dimensions``)."""
    if dimensions is not None:
        vectors = vectors[:, :dimensions]
    return torch.nn.functional.normalize(vectors.float(), p=2, dim=-1)


@dataclass(frozen=True)
class EmbedderConfig:
    model_id: str
    device: Literal["cpu", "cuda"] = "cpu"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    trust_remote_code: bool = False
    num_threads: int | None = None
    max_prompt_tokens: int | None = None  # None: the model's context


class Embedder:
    """An encoder and its tokenizer: token ids in, unit vectors out.

    Example::

        embedder = Embedder.load(EmbedderConfig(model_id="/models/tiny-encoder"))
        ids = embedder.encode_texts(["a sentence"])
        vectors = embedder.embed(ids)     # one list of floats per input, L2 norm 1
    """

    def __init__(self, model: Any, tokenizer: Any, pooling: Pooling, config: EmbedderConfig) -> None:
        self.model, self.tokenizer, self.pooling, self.config = model, tokenizer, pooling, config
        self.hidden_size = int(model.config.hidden_size)
        context = _context(model.config) or config.max_prompt_tokens
        bounds = [b for b in (context, config.max_prompt_tokens) if b]
        self.max_tokens = min(bounds) if bounds else 512
        self.device = next(model.parameters()).device

    @classmethod
    def load(cls, config: EmbedderConfig, timer: PhaseTimer | None = None) -> Embedder:
        from engine.model import EngineConfig  # the same dtype choice as generation

        timer = timer or PhaseTimer()
        if config.device == "cpu" and config.num_threads:
            torch.set_num_threads(config.num_threads)
        dtype, why = EngineConfig(model_id=config.model_id, device=config.device, dtype=config.dtype).dtype_choice()
        timer.facts["dtype_reason"] = why
        remote = config.trust_remote_code
        with timer.phase("config"):
            AutoConfig.from_pretrained(config.model_id, trust_remote_code=remote)
            pooling = declared_pooling(config.model_id)
        with timer.phase("tokenizer"):
            tokenizer = AutoTokenizer.from_pretrained(config.model_id, trust_remote_code=remote)
        with timer.phase("weights"):
            model = AutoModel.from_pretrained(config.model_id, dtype=dtype, trust_remote_code=remote)
            model.to(config.device).eval()
        embedder = cls(model, tokenizer, pooling, config)
        with timer.phase("warmup"):
            embedder.embed([embedder.encode_texts(["warm up"])[0]])
        logger.info(
            "loaded embedding model=%s class=%s pooling=%s dtype=%s (%s) hidden=%d max_tokens=%d phases=%s",
            config.model_id, type(model).__name__, pooling, dtype, why, embedder.hidden_size,
            embedder.max_tokens, timer.phases,
        )  # fmt: skip
        return embedder

    def encode_texts(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text with the model's special tokens; too long or empty: ``InvalidFieldError``."""
        ids = [self.tokenizer(text, add_special_tokens=True)["input_ids"] for text in texts]
        self._check(ids, [bool(text) for text in texts])
        return ids

    def check_ids(self, inputs: Sequence[Sequence[int]]) -> list[list[int]]:
        """Token-id inputs as given (no special tokens added), within the vocabulary and the context."""
        vocab = len(self.tokenizer)
        for i, ids in enumerate(inputs):
            bad = next((t for t in ids if not 0 <= t < vocab), None)
            if bad is not None:
                message = f"input[{i}]: token id {bad} is outside the vocabulary (0..{vocab - 1})"
                raise InvalidFieldError(message, "input")
        ids = [list(ids) for ids in inputs]
        self._check(ids, [bool(x) for x in ids])
        return ids

    def _check(self, ids: list[list[int]], non_empty: list[bool]) -> None:
        for i, (row, present) in enumerate(zip(ids, non_empty, strict=True)):
            if not present:
                raise InvalidFieldError(f"input[{i}] is empty; send text or token ids to embed", "input")
            if len(row) > self.max_tokens:
                raise InvalidFieldError(
                    f"input[{i}] is {len(row)} tokens, over this model's limit of {self.max_tokens}; "
                    "shorten or split it",
                    "input",
                )

    def check_dimensions(self, dimensions: int | None) -> None:
        if dimensions is not None and dimensions > self.hidden_size:
            raise InvalidFieldError(
                f"dimensions {dimensions} is above this model's {self.hidden_size}; ask for at most that",
                "dimensions",
            )

    @torch.inference_mode()
    def embed(
        self, batch: Sequence[Sequence[int]], dimensions: Sequence[int | None] | None = None
    ) -> list[list[float]]:
        """Unit vectors for ``batch`` in one forward pass (rows padded; padding masked out of pooling)."""
        width = max(len(ids) for ids in batch)
        pad = self.tokenizer.pad_token_id or 0
        input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, ids in enumerate(batch):  # right padding: cls is token 0 of every row
            input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            mask[row, : len(ids)] = 1
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        hidden = self.model(input_ids=input_ids, attention_mask=mask).last_hidden_state
        pooled = pool(hidden.float(), mask, self.pooling)
        sizes = dimensions or [None] * len(batch)
        return [normalise(pooled[i : i + 1], sizes[i])[0].tolist() for i in range(len(batch))]


# (token ids of each input, each input's dimensions) -> unit vectors; runs off the event loop.
EmbedFn = Callable[[Sequence[Sequence[int]], Sequence[int | None]], list[list[float]]]


class EmbeddingBatcher:
    """Inputs from any request share forward passes: one pass at a time, at most ``max_batch_size`` inputs.

    Example::

        batcher = EmbeddingBatcher(embedder.embed, max_batch_size=32)
        vectors = await batcher.embed(ids, dimensions=None)
    """

    def __init__(self, embed: EmbedFn, max_batch_size: int) -> None:
        self._embed = embed
        self._max = max_batch_size
        self._queue: list[tuple[list[int], int | None, asyncio.Future]] = []
        self._worker: asyncio.Task | None = None
        self.passes = 0
        self.inputs = 0

    async def embed(self, inputs: Sequence[Sequence[int]], dimensions: int | None) -> list[list[float]]:
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in inputs]
        self._queue.extend((list(ids), dimensions, f) for ids, f in zip(inputs, futures, strict=True))
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._run())
        try:
            return list(await asyncio.gather(*futures))
        finally:  # a caller gone: its inputs still queued are dropped, not computed
            self._queue = [item for item in self._queue if not item[2].done()]
            for f in futures:
                f.cancel()

    async def _run(self) -> None:
        while self._queue:
            batch, self._queue = self._queue[: self._max], self._queue[self._max :]
            batch = [item for item in batch if not item[2].done()]
            if not batch:
                continue
            try:
                vectors = await asyncio.to_thread(self._embed, [b[0] for b in batch], [b[1] for b in batch])
            except Exception as exc:  # the pass failed: its inputs' requests fail, later ones still run
                for _, _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            self.passes += 1
            self.inputs += len(batch)
            for (_, _, future), vector in zip(batch, vectors, strict=True):
                if not future.done():
                    future.set_result(vector)

    def stats(self) -> dict[str, int]:
        return {"passes": self.passes, "inputs": self.inputs, "queued": len(self._queue)}
